"""Radial projection for any ``torch.optim`` optimizer: ``scaleinv.project(optimizer)``.

For every parameter ``w`` with gradient ``g`` the wrapper lets the base optimizer compute its
update ``Δ`` and replaces it, on tensors the invariance test (or the ``scale_invariant``
annotation) marks as scale-invariant, by its tangential part, with that tensor's decoupled weight
decay scaled by ``wd_ratio``::

    (use_channel, use_layer) = invariance_flags(w, g)     # before the base step: w, g untouched
    Δ = base_step(w) - keep * w                           # keep: the base's own decay factor
    Δ, r = Δ - w s, (wd_ratio if projected else 1)         # s: radial_coefficients(w, Δ)
    w = w (1 - decay r) + Δ

``keep`` and ``decay`` depend on how the base optimizer decays weights (see ``docs/wrap.md``):
decoupled decay (AdamW, Adafactor, Muon, ``decoupled_weight_decay=True``) is left to the base and
taken back out of ``Δ``; ``torch.optim.SGD``'s decay is run the SGDP way (decoupled, divided by
``1 - momentum``); coupled L2 decay (Adam, RAdam, NAdam, Adamax, Adagrad, RMSprop, ...) stays
part of the base's update and is projected with it.

A generic base optimizer changes ``w`` in place, so the wrapper keeps a copy of every candidate
tensor (``dim() >= 2`` in a group whose ``scale_invariant`` is not ``False``) for the length of a
step. ``scaleinv.AdamP`` and ``scaleinv.SGDP`` already project: for them the wrapper only sets
their group options and copies nothing. The decision is made on the device, so a step performs no
host-device synchronisation of its own.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from scaleinv._common import check_group_params, check_number
from scaleinv.adamp import AdamP
from scaleinv.projection import (
    ScaleInvariant,
    invariance_flags,
    radial_coefficients,
    validate_scale_invariant,
    weight_decay_ratio,
)
from scaleinv.sgdp import SGDP

__all__ = ["ProjectedOptimizer", "project"]

PROJECTION_OPTIONS = ("delta", "wd_ratio", "scale_invariant")
"""Group keys the wrapper adds to (and reads from) the base optimizer's param groups."""

DecayKind = Literal["decoupled", "sgd", "coupled"]

_PROJECTING = (AdamP, SGDP)
# Optimizers with their own decoupled decay; Adafactor and Muon are missing from older torch.
_DECOUPLED = tuple(
    getattr(torch.optim, name) for name in ("Adafactor", "Muon") if hasattr(torch.optim, name)
)
_DECOUPLED_FLAG = (torch.optim.Adam, torch.optim.RAdam, torch.optim.NAdam)


def project(
    optimizer: Optimizer,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    scale_invariant: ScaleInvariant = "auto",
    *,
    eps: float = 1e-8,
) -> ProjectedOptimizer:
    r"""Wrap ``optimizer`` so that its updates lose their radial part on scale-invariant weights.

    Per tensor ``w`` (``dim() >= 2``) with gradient ``g`` and base update ``Δ``: if the cosine
    test ``max_i |cos(g_i, w_i)| < delta / sqrt(d_V)`` passes for the channel view (else the
    layer view), or the group's ``scale_invariant`` annotation names a view, then per row ``i``
    of that view ``Δ_i <- Δ_i - u_i <u_i, Δ_i>`` with ``u_i = w_i / (|w_i| + eps)``, and the
    tensor's decoupled weight decay is multiplied by ``wd_ratio``. Other tensors keep the base
    update.

    The result is a :class:`torch.optim.Optimizer` sharing ``param_groups`` and ``state`` with
    ``optimizer``: LR schedulers, ``zero_grad``, closures, ``state_dict`` and hooks work on it.
    ``delta``, ``wd_ratio`` and ``scale_invariant`` become options of every param group (a value
    a group of a ``torch.optim`` optimizer already carries is kept; for ``scaleinv.AdamP`` and
    ``scaleinv.SGDP`` these arguments replace their constructor's values).

    Args:
        optimizer: a ``torch.optim.Optimizer`` instance (not ``LBFGS``, not already projected).
        delta: threshold of the cosine test, ``> 0``.
        wd_ratio: weight-decay multiplier for projected tensors, in ``[0, 1]``.
        scale_invariant: ``"auto"`` (cosine test), ``"channel"``, ``"layer"`` or ``False``.
        eps: added to the norms of the test and the projection, ``>= 0`` (AdamP and SGDP use
            their own group ``eps``).
    """
    return ProjectedOptimizer(
        optimizer, delta=delta, wd_ratio=wd_ratio, scale_invariant=scale_invariant, eps=eps
    )


@dataclass
class _GroupStep:
    """What the wrapper does around the base step for one param group."""

    group: dict[str, Any]
    params: list[Tensor] = field(default_factory=list)  # candidates (real views)
    snapshots: list[Tensor] = field(default_factory=list)  # their values before the base step
    flags: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    keep: float | Tensor = 1.0  # w -> keep * w is the decay the base applies itself
    decay: float | Tensor = 0.0  # rate of the decay the wrapper applies: w -> (1 - decay r) w
    predecayed: list[Tensor] = field(default_factory=list)  # others, when the wrapper decays
    saved_weight_decay: Any = None  # SGD's weight_decay, zeroed while the base steps


class ProjectedOptimizer(Optimizer):
    """A ``torch.optim`` optimizer whose updates are radially projected; see :func:`project`.

    ``param_groups``, ``state`` and ``defaults`` are the base optimizer's own objects; ``base``
    is the wrapped optimizer. Step hooks registered on the wrapper run around the projected
    step (global hooks run once per step, for the wrapper); hooks registered on ``base`` run
    around the base's unprojected step.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        scale_invariant: ScaleInvariant = "auto",
        eps: float = 1e-8,
    ) -> None:
        _check_base(optimizer)
        options = dict(delta=delta, wd_ratio=wd_ratio, scale_invariant=scale_invariant)
        _check_options(options)
        check_number("eps", eps, low=0.0)
        self.base = optimizer
        self.eps = eps
        self.projection_defaults = options
        self._init_hooks()
        self._adopt_groups(replace_base_defaults=True)

    def _init_hooks(self) -> None:
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    def _adopt_groups(self, groups: list[dict[str, Any]] | None = None,
                      replace_base_defaults: bool = False) -> None:
        """Give ``groups`` (default: all) the projection options they lack.

        All groups are validated before any is changed. With ``replace_base_defaults``, values
        an AdamP/SGDP group only has from its constructor's defaults are replaced too.
        """
        groups = self.param_groups if groups is None else groups
        base_defaults = self.base.defaults if isinstance(self.base, _PROJECTING) else {}
        merged = []
        for group in groups:
            options = {}
            for key, value in self.projection_defaults.items():
                inherited = replace_base_defaults and key in base_defaults
                if key not in group or (inherited and group[key] == base_defaults[key]):
                    options[key] = value
            merged.append({**group, **options})
            self._check_group(merged[-1])
        for group, options in zip(groups, merged, strict=True):
            group.update(options)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_options(group)
        check_group_params(group)
        if (
            isinstance(self.base, torch.optim.SGD)
            and group["weight_decay"] != 0
            and group["momentum"] >= 1
        ):
            raise ValueError(
                f"Invalid momentum: {group['momentum']!r}; the wrapper decays SGD's weights by "
                "lr * weight_decay / (1 - momentum) (as SGDP does), which needs momentum < 1"
            )

    # The base optimizer's own objects, shared (LR schedulers and users see one set of groups).
    # Pyright rejects any property over a base-class attribute, even a read-write one.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    @param_groups.setter
    def param_groups(  # pyright: ignore[reportIncompatibleVariableOverride]
            self, value: list[dict[str, Any]]) -> None:
        self.base.param_groups = value

    @property
    def state(self) -> defaultdict[torch.Tensor, Any]:
        return self.base.state

    @state.setter
    def state(  # pyright: ignore[reportIncompatibleVariableOverride]
            self, value: defaultdict[torch.Tensor, Any]) -> None:
        self.base.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base.defaults = value

    def __getattr__(self, name: str) -> Any:
        # Public attributes of the base (e.g. a custom optimizer's methods) read through.
        base = self.__dict__.get("base")
        if base is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(base, name)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "base": self.base, "eps": self.eps, "projection_defaults": self.projection_defaults,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps}, base={self.base!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer, with the wrapper's options where it gives none."""
        for key, value in self.projection_defaults.items():
            param_group.setdefault(key, value)
        self.base.add_param_group(param_group)
        try:
            self._adopt_groups(self.param_groups[-1:])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict``; its groups carry the projection options."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.base.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer; groups saved without projection options get ours."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self.base.load_state_dict(state_dict)
        self._adopt_groups()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One projected step; ``closure`` (evaluated once, here) returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if isinstance(self.base, _PROJECTING):
            self._base_step()
            return loss
        plans = [self._prepare(group) for group in self.param_groups]
        for plan in plans:
            if plan.saved_weight_decay is not None:
                plan.group["weight_decay"] = 0.0
            if plan.predecayed:
                torch._foreach_mul_(plan.predecayed, 1 - plan.decay)
        try:
            self._base_step()
        finally:
            for plan in plans:
                if plan.saved_weight_decay is not None:
                    plan.group["weight_decay"] = plan.saved_weight_decay
        for plan in plans:
            _finish(plan, self.eps)
        return loss

    def _base_step(self) -> None:
        """Run the base's step with the base's own hooks, but not the global ones again."""
        base = self.base
        step = type(base).step
        if getattr(step, "hooked", False):
            step = step.__wrapped__  # type: ignore[attr-defined]
        args: tuple[Any, ...] = (base,)
        kwargs: dict[str, Any] = {}
        for pre_hook in base._optimizer_step_pre_hooks.values():
            result = pre_hook(base, args, kwargs)
            if result is not None:
                args, kwargs = result
        step(*args, **kwargs)
        for post_hook in base._optimizer_step_post_hooks.values():
            post_hook(base, args, kwargs)

    def _prepare(self, group: dict[str, Any]) -> _GroupStep:
        """Decide and snapshot the candidates of one group and plan its weight decay.

        Only the snapshots are made here; nothing the base optimizer reads is changed yet.
        """
        for key, value in self.projection_defaults.items():
            group.setdefault(key, value)  # a group added to the base directly
        plan = _GroupStep(group)
        mode = group["scale_invariant"]
        others: list[Tensor] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            w = torch.view_as_real(p) if torch.is_complex(p) else p
            if mode is False or w.dim() < 2 or w.numel() == 0:  # never tested nor projected
                others.append(p)
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "project() needs dense gradients on the tensors it tests; put parameters "
                    "with sparse gradients in a group with scale_invariant=False"
                )
            g = torch.view_as_real(p.grad) if torch.is_complex(p.grad) else p.grad
            plan.flags.append(
                invariance_flags(w, g, scale_invariant=mode, delta=group["delta"], eps=self.eps)
            )
            plan.params.append(w)
            plan.snapshots.append(w.clone(memory_format=torch.preserve_format))
        weight_decay = group.get("weight_decay", 0)
        if isinstance(weight_decay, (int, float)) and weight_decay == 0:
            return plan
        kind = decay_kind(self.base, group)
        if kind == "decoupled":
            plan.decay = group["lr"] * weight_decay
            plan.keep = 1 - plan.decay
        elif kind == "sgd":
            plan.decay = group["lr"] * weight_decay / (1 - group["momentum"])
            plan.saved_weight_decay = weight_decay
            plan.predecayed = others
        return plan


def decay_kind(optimizer: Optimizer, group: dict[str, Any]) -> DecayKind:
    """How ``optimizer`` applies ``group``'s ``weight_decay``, as far as the wrapper knows.

    ``"decoupled"``: ``w <- (1 - lr wd) w`` before the update (AdamW, Adafactor, Muon, Adam,
    RAdam and NAdam with ``decoupled_weight_decay=True``); ``"sgd"``: ``torch.optim.SGD``, whose
    L2 term the wrapper replaces by SGDP's decoupled ``lr wd / (1 - momentum)``; ``"coupled"``:
    anything else (the decay is part of the base's update and is projected with it).
    """
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, _DECOUPLED):
        return "decoupled"
    if isinstance(optimizer, _DECOUPLED_FLAG) and group.get("decoupled_weight_decay", False):
        return "decoupled"
    return "coupled"


def _finish(plan: _GroupStep, eps: float) -> None:
    r"""After the base step: ``w <- Δ + w_0 (1 - decay r - s)`` with ``Δ = w - keep w_0``."""
    if not plan.params:
        return
    for w, w0 in zip(plan.params, plan.snapshots, strict=True):
        _sub_scaled_(w, w0, plan.keep)
    group = plan.group
    coefficients, projected = radial_coefficients(
        plan.snapshots, plan.snapshots, plan.params,  # grads are not read: the flags decide
        scale_invariant=group["scale_invariant"], delta=group["delta"], eps=eps,
        flags=plan.flags,
    )
    for w, w0, coef, was_projected in zip(
        plan.params, plan.snapshots, coefficients, projected, strict=True
    ):
        if isinstance(plan.decay, float) and plan.decay == 0:
            factor = 1 - coef
        else:
            ratio = weight_decay_ratio(was_projected, group["wd_ratio"], w.dtype)
            factor = (1 - plan.decay * ratio) - coef
        w.addcmul_(w0, factor)


def _sub_scaled_(x: Tensor, y: Tensor, scale: float | Tensor) -> None:
    """``x <- x - scale * y`` for a Python or a 0-dim tensor ``scale``."""
    if isinstance(scale, Tensor):
        x.sub_(y * scale)
    elif scale == 1:
        x.sub_(y)
    else:
        x.sub_(y, alpha=scale)


def _check_options(options: dict[str, Any]) -> None:
    check_number("delta", options["delta"], low=0.0, low_open=True)
    check_number("wd_ratio", options["wd_ratio"], low=0.0, high=1.0, high_open=False)
    validate_scale_invariant(options["scale_invariant"])


def _check_base(optimizer: object) -> None:
    if isinstance(optimizer, type):
        raise TypeError(
            f"project() needs an optimizer instance, got the class {optimizer.__name__}: "
            f"build it first, e.g. project({optimizer.__name__}(model.parameters()))"
        )
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            "Invalid optimizer: expected a torch.optim.Optimizer instance, got "
            f"{type(optimizer).__name__}"
        )
    if isinstance(optimizer, ProjectedOptimizer):
        raise TypeError("Invalid optimizer: it is already projected (project() was applied)")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError(
            "Invalid optimizer: LBFGS re-evaluates the closure and searches along a line within "
            "one step; the per-tensor radial projection is not defined for it"
        )
    if not isinstance(optimizer, _PROJECTING):
        clash = [key for key in PROJECTION_OPTIONS if key in optimizer.defaults]
        if clash:
            raise ValueError(
                f"Invalid optimizer: {type(optimizer).__name__} already uses the group "
                f"option(s) {clash} that project() needs for its own settings"
            )
