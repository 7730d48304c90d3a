"""Checks of hyperparameters and the per-parameter options ``scale_invariant``/``channel_axis``."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np

from scaleinv.optax.projection import validate_scale_invariant

__all__ = ["check_learning_rate", "check_number", "per_leaf", "check_option_value"]


def check_number(name: str, value: Any, *, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = True) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``low <= value < high`` (bounds as flagged).

    Arrays (from ``optax.inject_hyperparams``, possibly traced) are accepted unchecked.
    """
    if isinstance(value, (jax.Array, np.ndarray)):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        hi = "inf" if math.isinf(high) else f"{high:g}"
        raise ValueError(f"Invalid {name}: {value!r}; allowed range is {left}{low:g}, {hi}{right}")


def check_learning_rate(value: Any) -> None:
    """A learning rate is a number ``>= 0``, an array or a schedule (a callable of the count)."""
    if not callable(value):
        check_number("learning_rate", value, low=0.0)


def _is_value(x: object) -> bool:
    return isinstance(x, (str, bool, int))


def check_option_value(name: str, value: object) -> None:
    """Check a value or a pytree of values of ``scale_invariant`` or ``channel_axis`` (a
    callable is checked on what it returns, when the params are known)."""
    if callable(value) and not _is_value(value):
        return
    for leaf in jax.tree.leaves(value):
        if name == "scale_invariant":
            validate_scale_invariant(leaf)
        elif isinstance(leaf, bool) or not isinstance(leaf, int):
            raise TypeError(f"Invalid channel_axis: expected an int, got {type(leaf).__name__}")


def per_leaf(name: str, option: object, params: Any, treedef: Any) -> list[Any]:
    """``option`` (a value, a pytree prefix of ``params`` or a callable of ``params``) as one
    value per leaf of ``treedef`` (the params' structure)."""
    if callable(option) and not _is_value(option):
        option = option(params)
    if _is_value(option):
        return [option] * treedef.num_leaves
    try:
        full = jax.tree.map(lambda value, sub: jax.tree.map(lambda _: value, sub), option, params)
        leaves = treedef.flatten_up_to(full)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"Invalid {name}: a pytree of {name} values must have the structure of the params "
            f"(or a prefix of it): {error}"
        ) from error
    for value in leaves:
        check_option_value(name, value)
    return leaves

