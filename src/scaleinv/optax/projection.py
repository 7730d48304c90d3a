"""Views, the invariance test and the radial projection for JAX arrays.

The same maths as :mod:`scaleinv.projection` (the torch side), written for arrays whose output
channel sits on any axis (``channel_axis``; Flax and Haiku keep it last). Row ``i`` of the
*channel view* is the slice ``channel_axis == i``; the *layer view* is the whole array as one row.
Row statistics are reductions over every other axis, so nothing is transposed or copied, and a
parameter whose channels are sharded across devices is reduced where it lies.

For a parameter ``w`` with gradient ``g`` and update ``p``::

    cos_i = |<g_i, w_i>| / (max(|g_i|, eps) max(|w_i|, eps))
    channel view passes:  max_i cos_i < delta / sqrt(numel / n)
    layer view passes:    cos < delta / sqrt(numel)     (only tried when the channel view fails)
    p_i <- p_i - w_i <w_i, p_i> / (|w_i| + eps)^2       (rows of the first view that passes)

Only arrays with at least 2 dimensions and at least one element are tested. The decision is a
``jnp.where`` on the device. Statistics are taken in float32 for 16-bit arrays (float64 for
float64 ones); a NaN or inf in ``w`` or ``g`` makes the cosine NaN and the view fail.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

View = Literal["channel", "layer"]
ScaleInvariant = Literal["auto", "channel", "layer"] | bool

__all__ = [
    "compute_dtype",
    "invariance_flags",
    "is_candidate",
    "project_radial",
    "validate_channel_axis",
    "validate_scale_invariant",
]


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype statistics and optimizer state use: float32 for 16-bit floats, else ``dtype``."""
    return jnp.promote_types(dtype, jnp.float32)


def validate_scale_invariant(value: object) -> ScaleInvariant:
    """Return ``value`` if it is a valid ``scale_invariant`` annotation, else raise."""
    if isinstance(value, bool):
        if value:
            raise ValueError(
                "scale_invariant=True is ambiguous: use 'channel' (per output channel) or "
                "'layer' (whole array); allowed: 'auto', 'channel', 'layer', False"
            )
        return False
    if not isinstance(value, str) or value not in ("auto", "channel", "layer"):
        raise ValueError(
            f"Invalid scale_invariant: {value!r}; allowed: 'auto', 'channel', 'layer', False"
        )
    return value  # type: ignore[return-value]


def validate_channel_axis(value: object, shape: tuple[int, ...]) -> int:
    """``value`` as a non-negative axis of an array of ``shape``, or raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid channel_axis: expected an int, got {type(value).__name__}")
    ndim = len(shape)
    if not -ndim <= value < ndim:
        raise ValueError(
            f"Invalid channel_axis: {value} for a parameter of shape {shape}; "
            f"allowed range is [{-ndim}, {ndim - 1}]"
        )
    return value % ndim


def is_candidate(shape: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` is ever tested or projected (``ndim >= 2``, not empty)."""
    return len(shape) >= 2 and math.prod(shape) > 0


def _other_axes(ndim: int, channel_axis: int) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a != channel_axis)


def _row_dot(a: jax.Array, b: jax.Array, channel_axis: int) -> jax.Array:
    """``<a_i, b_i>`` per channel, shaped to broadcast against ``a``."""
    return jnp.sum(a * b, axis=_other_axes(a.ndim, channel_axis), keepdims=True)


def _total(row_sums: jax.Array) -> jax.Array:
    """The sum of the row sums. Behind a barrier: XLA would otherwise merge the two reductions
    into a second pass over the whole array."""
    return jnp.sum(lax.optimization_barrier(row_sums))


def invariance_flags(
    w: jax.Array, g: jax.Array, *, scale_invariant: ScaleInvariant, channel_axis: int,
    delta: Any, eps: Any, w_sq: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """0-dim bools ``(use_channel, use_layer)`` for a candidate ``w`` (at most one true).

    An annotation (``"channel"``, ``"layer"``, ``False``) is taken as given; ``"auto"`` runs the
    cosine test, channel view first. ``w_sq``, the rows' ``|w_i|^2``, saves a pass.
    """
    if scale_invariant is not False and scale_invariant != "auto":
        return jnp.asarray(scale_invariant == "channel"), jnp.asarray(scale_invariant == "layer")
    if scale_invariant is False:
        return jnp.asarray(False), jnp.asarray(False)
    if w_sq is None:
        w_sq = _row_dot(w, w, channel_axis)
    g_sq = _row_dot(g, g, channel_axis)
    gw = _row_dot(g, w, channel_axis)
    w_norm, g_norm = jnp.sqrt(w_sq), jnp.sqrt(g_sq)
    channel_cos = jnp.abs(gw) / (jnp.maximum(g_norm, eps) * jnp.maximum(w_norm, eps))
    layer_cos = jnp.abs(_total(gw)) / (
        jnp.maximum(jnp.sqrt(_total(g_sq)), eps) * jnp.maximum(jnp.sqrt(_total(w_sq)), eps)
    )
    n = w.shape[channel_axis]
    use_channel = jnp.max(channel_cos) < delta / math.sqrt(w.size // n)
    use_layer = ~use_channel & (layer_cos < delta / math.sqrt(w.size))
    return use_channel, use_layer


def project_radial(
    w: jax.Array, g: jax.Array, p: jax.Array, *, scale_invariant: ScaleInvariant,
    channel_axis: int, delta: Any, eps: Any,
) -> tuple[jax.Array, jax.Array]:
    """``(p projected, projected)`` for a candidate ``w`` (all three in the compute dtype).

    ``p - w s`` with ``s_i = <w_i, p_i> / (|w_i| + eps)^2`` on the channel view, the same
    ``s = <w, p> / (|w| + eps)^2`` for every row on the layer view, ``s = 0`` when neither view
    passes; ``projected`` is a 0-dim bool.
    """
    w_sq = _row_dot(w, w, channel_axis)
    wp = _row_dot(w, p, channel_axis)
    use_channel, use_layer = invariance_flags(
        w, g, scale_invariant=scale_invariant, channel_axis=channel_axis, delta=delta, eps=eps,
        w_sq=w_sq,
    )
    channel_s = wp / jnp.square(jnp.sqrt(w_sq) + eps)
    if scale_invariant == "channel":
        s = channel_s
    else:
        layer_s = _total(wp) / jnp.square(jnp.sqrt(_total(w_sq)) + eps)
        s = jnp.where(use_channel, channel_s, jnp.where(use_layer, layer_s, jnp.zeros_like(wp)))
    return p - w * s, use_channel | use_layer
