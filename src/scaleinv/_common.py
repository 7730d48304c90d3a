"""Argument checks and group plumbing shared by AdamP and SGDP."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from scaleinv._amp import skip_step, unscaled
from scaleinv.backends import choose, choose_cautious
from scaleinv.distributed import check_flat_shard, remember_params
from scaleinv.projection import validate_scale_invariant


def check_number(name: str, value: Any, *, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = True) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``low <= value < high`` (bounds as flagged)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must have exactly one element")
        if value.requires_grad:
            raise ValueError(f"Invalid {name}: a tensor {name} must not require grad")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: expected a real number, got {type(value).__name__}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        hi = "inf" if math.isinf(high) else f"{high:g}"
        raise ValueError(f"Invalid {name}: {value!r}; allowed range is {left}{low:g}, {hi}{right}")


def check_group_params(group: dict[str, Any]) -> None:
    """Refuse a group that mixes annotations with tensors that cannot carry them."""
    mode = validate_scale_invariant(group["scale_invariant"])
    group["scale_invariant"] = mode
    if mode in ("channel", "layer"):
        for p in group["params"]:
            if p.dim() + p.is_complex() < 2:  # complex parameters are stepped as real views
                raise ValueError(
                    f"scale_invariant={mode!r} was given for a group holding a parameter of "
                    f"shape {tuple(p.shape)}; only tensors with dim() >= 2 can be projected. "
                    "Put 1-D parameters (biases, norm gains) in a group of their own."
                )


def with_current_options(
    state_dict: dict[str, Any], param_groups: list[dict[str, Any]]
) -> dict[str, Any]:
    """``state_dict`` whose saved groups take the keys they lack from ``param_groups``.

    Checkpoints of ``adamp`` 0.3.0 carry none of our options (``foreach``, ``scale_invariant``,
    ``project_momentum``, ...); loading one must not reset them to their defaults.
    """
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        return state_dict  # torch.optim raises its own error
    merged = [
        {**current, **saved} for current, saved in zip(param_groups, saved_groups, strict=True)
    ]
    return {**state_dict, "param_groups": merged}


def run_bodies(
    tensors: list[list[Tensor]], *, backend: str, caution: bool, grad_scale: Tensor | None,
    found_inf: Tensor | None, single: Callable[..., None], multi: Callable[..., None],
    fused: Callable[..., list[int]], hyper: dict[str, Any],
    multi_options: Callable[[list[list[Tensor]]], dict[str, Any]] = lambda tensors: {},
) -> None:
    """Step ``tensors`` (``[params, grads, *states]``, none empty) with the body ``backend``
    names: ``single`` (``"reference"``), ``multi`` (``"foreach"``), or ``fused`` for a fused
    backend, whose declined tensors ``multi`` steps. ``multi_options(tensors)`` adds options of
    the multi-tensor call; ``grad_scale``/``found_inf`` as in :mod:`scaleinv._amp`."""
    if caution and backend != "reference":
        raise ValueError(f"caution=True runs on the single-tensor body (backend='reference'), "
                         f"not {backend!r}")
    if backend in ("reference", "foreach"):
        if skip_step(found_inf):
            return
        tensors = [tensors[0], unscaled(tensors[1], grad_scale), *tensors[2:]]
        if backend == "reference":
            single(*tensors, **hyper, **({"caution": True} if caution else {}))
        else:
            multi(*tensors, **hyper, **multi_options(tensors))
        return
    left = fused(*tensors, backend=None if backend == "fused" else backend,
                 grad_scale=grad_scale, found_inf=found_inf, **hyper)
    if left and not skip_step(found_inf):
        rest = [[ts[i] for i in left] for ts in tensors]
        rest[1] = unscaled(rest[1], grad_scale)
        multi(*rest, **hyper, **multi_options(rest))


def nonempty(*tensorlists: list[Tensor]) -> list[list[Tensor]]:
    """The lists without the positions where the first list holds an empty tensor."""
    if all(t.numel() for t in tensorlists[0]):
        return list(tensorlists)
    keep = [i for i, t in enumerate(tensorlists[0]) if t.numel()]
    return [[ts[i] for i in keep] for ts in tensorlists]


HALF_DTYPES = (torch.float16, torch.bfloat16)


def state_dtype(p: Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype of ``p``'s moments or momentum buffer: float32 for a 16-bit ``p`` in a group
    with ``float32_state`` (the default), else ``p``'s own."""
    if p.dtype in HALF_DTYPES and group.get("float32_state", True):
        return torch.float32
    return p.dtype


def new_state(p: Tensor, group: dict[str, Any]) -> Tensor:
    """A zero state tensor for ``p``: laid out like it, in :func:`state_dtype`."""
    return torch.zeros_like(p, dtype=state_dtype(p, group), memory_format=torch.preserve_format)


def check_grad(p: Tensor, optimizer: str) -> None:
    if p.grad is not None and p.grad.is_sparse:
        raise RuntimeError(f"{optimizer} does not support sparse gradients")


def new_step_counter(p: Tensor, on_device: bool) -> Tensor:
    """A step counter the way ``torch.optim.Adam`` keeps it: on the param's device if
    ``on_device`` (capturable or fused), else on the host."""
    if on_device:
        return torch.zeros((), dtype=torch.float32, device=p.device)
    return torch.tensor(0.0, dtype=torch.float32)


def as_step_counter(step: Any, p: Tensor, on_device: bool) -> Tensor:
    """Turn a loaded ``step`` (an int in ``adamp`` 0.3.0 state_dicts) into our tensor counter."""
    if torch.is_tensor(step):
        target = p.device if on_device else torch.device("cpu")
        return step.to(device=target, dtype=torch.float32)
    counter = new_step_counter(p, on_device)
    counter.fill_(float(step))
    return counter


def step_value(step: Tensor) -> float | Tensor:
    """The counter as a float in eager mode, as the tensor itself while compiling."""
    if torch.compiler.is_compiling():
        return step
    return step.item()


class ScaleInvariantOptimizer(Optimizer):
    """The base class of AdamP and SGDP: group checks, checkpoint loading, option defaults.

    (Not to be confused with :class:`scaleinv.wrap.ProjectedOptimizer`, the wrapper that
    :func:`scaleinv.project` puts around any ``torch.optim`` optimizer.)

    ``option_defaults`` lists the group options beyond ``adamp`` 0.3.0, filled in when an
    older pickle or checkpoint lacks them.
    """

    option_defaults: dict[str, Any] = {}
    # torch.amp.GradScaler sets ``grad_scale`` and ``found_inf`` on the optimizer and lets
    # step() unscale the gradients and skip the update (scaleinv._amp; docs/amp.md).
    _step_supports_amp_scaling = True

    def amp_scaling(self) -> tuple[Tensor | None, Tensor | None]:
        """``(grad_scale, found_inf)`` a ``torch.amp.GradScaler`` step set, or ``None``s."""
        return getattr(self, "grad_scale", None), getattr(self, "found_inf", None)

    @staticmethod
    def check_hyperparameters(options: dict[str, Any]) -> None:
        """Raise ``ValueError``/``TypeError`` for a hyperparameter out of its range."""
        raise NotImplementedError

    def check_step(self) -> list[str]:
        """Everything a step could refuse, checked before anything changes; returns the body
        (:func:`scaleinv.backends.choose`) of each group."""
        name = type(self).__name__
        bodies = []
        for group in self.param_groups:
            stepped = [p for p in group["params"] if p.grad is not None and p.numel() != 0]
            for p in stepped:
                check_grad(p, name)
                if p not in self.state:
                    check_flat_shard(self, p, group)
            if group.get("caution", False):  # only the single-tensor body has the mask
                bodies.append(choose_cautious(stepped))
            else:
                bodies.append(choose(group["fused"], group["foreach"],
                                     group.get("capturable", False), stepped))
        return bodies

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters are checked like the constructor's, and a refused
        group is not kept."""
        super().add_param_group(param_group)
        try:
            self.check_hyperparameters(self.param_groups[-1])
            check_group_params(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        remember_params(self, self.param_groups[-1])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ``state_dict``; options it lacks (an ``adamp`` 0.3.0 checkpoint has none of ours)
        keep the values this optimizer was built with. Checkpoints of other optimizers go
        through :func:`scaleinv.integrations.checkpoints.migrate` (continued or refused here,
        never in ``step``); the loaded hyperparameters are checked like the constructor's."""
        from scaleinv.integrations.checkpoints import migrate

        kind = "AdamP" if "betas" in self.defaults else "SGDP"
        merged = with_current_options(migrate(state_dict, kind), self.param_groups)
        if len(merged["param_groups"]) == len(self.param_groups):
            for group in merged["param_groups"]:
                self.check_hyperparameters(group)
        super().load_state_dict(merged)
        self._restore_state_dtypes(merged)

    def _restore_state_dtypes(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim`` casts loaded state to each param's dtype; float32 state of 16-bit
        params is put back from the checkpoint's own tensors, unrounded."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        groups = [g for g in self.param_groups for _ in g["params"]]
        for saved_id, p, group in zip(saved_ids, params, groups, strict=True):
            saved = state_dict["state"].get(saved_id)
            dtype = state_dtype(p, group)
            if saved is None or dtype == p.dtype:
                continue
            for key, value in saved.items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.option_defaults.items():
                group.setdefault(key, value)
