"""The registry behind ``tests/test_matrix.py``: optimizers, backends, dtypes and layouts.

In the spirit of ``torch.testing._internal.common_optimizers.OptimizerInfo``: each optimizer is
described once (:class:`OptimInfo`: how to build ours, the float64 reference and the official
``adamp`` 0.3.0 equivalent from one set of hyperparameters, and what it supports), and
:func:`run_case` drives all three on the same gradients. A backend is selected only through the
``SCALEINV_BACKEND`` environment variable; which backends run a dtype on this machine comes
from ``scaleinv.backends.available_backends`` (a table of our own where it does not exist).

Parameters are built from float64 values rounded once to the case's dtype, so ours, the
reference and the official optimizer start from the same numbers; each step's gradients are
built by :func:`reference.make_grad` from the reference's weights (so the branch of the cosine
test is known in advance), rounded to the dtype, and fed to all three.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import adamp as official
import pytest
import torch
from torch import Tensor

import scaleinv
from reference import ReferenceAdamP, ReferenceSGDP, as_real64, make_grad

# ---------------------------------------------------------------------------------------------
# Backends and dtypes

BACKENDS = ("reference", "foreach", "native", "triton", "compiled", "eager")
SLOW_BACKENDS = frozenset({"compiled"})  # compiles for about a minute per key on a CPU
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "complex64": torch.complex64,
}
CPU = torch.device("cpu")


def _declared() -> Callable[[torch.device, torch.dtype], Sequence[str]] | None:
    if importlib.util.find_spec("scaleinv.backends") is None:
        return None
    return getattr(importlib.import_module("scaleinv.backends"), "available_backends", None)


def _fallback_available(dtype: torch.dtype) -> list[str]:
    """What the code before ``scaleinv.backends`` could run on a CPU (its fused.py)."""
    names = ["reference", "foreach", "compiled", "eager"]
    if dtype in (torch.float32, torch.float64):
        names.append("native")
    triton = importlib.util.find_spec("triton") is not None
    if triton and os.environ.get("TRITON_INTERPRET") == "1" and dtype in (
            torch.float32, torch.float16, torch.bfloat16):
        names.append("triton")
    return names


def available(dtype: torch.dtype) -> list[str]:
    """The backends of :data:`BACKENDS` that run ``dtype`` on this machine's CPU."""
    declared = _declared()
    names = declared(CPU, dtype) if declared is not None else _fallback_available(dtype)
    return [name for name in BACKENDS if name in set(names)]


def backend_params(dtypes: Sequence[str], backends: Sequence[str] = BACKENDS,
                   slow: Sequence[str] = ()) -> list[Any]:
    """``pytest.param(backend, dtype)`` for every available pair, slow ones marked; ids
    ``backend-dtype``."""
    out = []
    for dtype_name in dtypes:
        for backend in available(DTYPES[dtype_name]):
            if backend not in backends:
                continue
            marks = [pytest.mark.slow] if backend in SLOW_BACKENDS or backend in slow else []
            out.append(pytest.param(backend, dtype_name, marks=marks,
                                    id=f"{backend}-{dtype_name}"))
    return out


def use_backend(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    monkeypatch.setenv("SCALEINV_BACKEND", backend)


# ---------------------------------------------------------------------------------------------
# Optimizers


ADAM_HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, delta=0.1,
                  wd_ratio=0.1, nesterov=False, maximize=False)
SGD_HYPER = dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.05, nesterov=False,
                 eps=1e-8, delta=0.1, wd_ratio=0.1, project_momentum=False, maximize=False)


# float16: eps = 1e-8 rounds to 0 and Adam's v = (1 - b2) g^2 underflows for small elements,
# where p = m / (sqrt(v) + eps) then differs from the float64 reference by O(1) (in
# torch.optim.AdamW and adamp 0.3.0 as in every body). A large eps bounds the slope 1 / eps.
DTYPE_HYPER: dict[torch.dtype, dict] = {torch.float16: dict(eps=1e-1)}


def _adamp(groups: list[dict], h: dict) -> torch.optim.Optimizer:
    return scaleinv.AdamP(groups, **h)


def _sgdp(groups: list[dict], h: dict) -> torch.optim.Optimizer:
    return scaleinv.SGDP(groups, **h)


def _project_adamw(groups: list[dict], h: dict) -> torch.optim.Optimizer:
    base = torch.optim.AdamW(groups, lr=h["lr"], betas=h["betas"], eps=h["eps"],
                             weight_decay=h["weight_decay"], maximize=h["maximize"])
    return scaleinv.project(base, delta=h["delta"], wd_ratio=h["wd_ratio"], eps=h["eps"])


def _project_sgd(groups: list[dict], h: dict) -> torch.optim.Optimizer:
    base = torch.optim.SGD(groups, lr=h["lr"], momentum=h["momentum"],
                           dampening=h["dampening"], weight_decay=h["weight_decay"],
                           nesterov=h["nesterov"], maximize=h["maximize"])
    return scaleinv.project(base, delta=h["delta"], wd_ratio=h["wd_ratio"], eps=h["eps"])


def _official_adamp(params: list[Tensor], h: dict) -> torch.optim.Optimizer:
    return official.AdamP(params, lr=h["lr"], betas=h["betas"], eps=h["eps"],
                          weight_decay=h["weight_decay"], delta=h["delta"],
                          wd_ratio=h["wd_ratio"], nesterov=h["nesterov"])


def _official_sgdp(params: list[Tensor], h: dict) -> torch.optim.Optimizer:
    return official.SGDP(params, lr=h["lr"], momentum=h["momentum"], dampening=h["dampening"],
                         weight_decay=h["weight_decay"], nesterov=h["nesterov"], eps=h["eps"],
                         delta=h["delta"], wd_ratio=h["wd_ratio"])


@dataclass(frozen=True)
class OptimInfo:
    """One optimizer of the matrix.

    ``build(groups, hyper)`` makes ours; ``official(params, hyper)`` the ``adamp`` 0.3.0
    optimizer that equals it (``None``: there is none, e.g. SGDP's paper default or
    ``maximize``); the reference follows ``family`` (``"adam"``: :class:`ReferenceAdamP`,
    ``"sgd"``: :class:`ReferenceSGDP`). ``hyper`` overrides the family's defaults.
    """

    name: str
    family: str
    build: Callable[[list[dict], dict], torch.optim.Optimizer]
    official: Callable[[list[Tensor], dict], torch.optim.Optimizer] | None = None
    hyper: dict = field(default_factory=dict)
    supports_complex: bool = True
    wraps: bool = False  # project(torch.optim.X): the annotation is a wrapper group option

    def hyperparameters(self, **overrides: Any) -> dict:
        base = ADAM_HYPER if self.family == "adam" else SGD_HYPER
        return {**base, **self.hyper, **overrides}

    def reference(self, params: Sequence[Tensor], h: dict, scale_invariant: object,
                  ) -> ReferenceAdamP | ReferenceSGDP:
        if self.family == "adam":
            return ReferenceAdamP(
                params, lr=h["lr"], betas=h["betas"], eps=h["eps"],
                weight_decay=h["weight_decay"], delta=h["delta"], wd_ratio=h["wd_ratio"],
                nesterov=h["nesterov"], maximize=h["maximize"], scale_invariant=scale_invariant)
        return ReferenceSGDP(
            params, lr=h["lr"], momentum=h["momentum"], dampening=h["dampening"],
            weight_decay=h["weight_decay"], nesterov=h["nesterov"], eps=h["eps"],
            delta=h["delta"], wd_ratio=h["wd_ratio"], project_momentum=h["project_momentum"],
            maximize=h["maximize"], scale_invariant=scale_invariant)

    def ours(self, groups: list[dict], h: dict) -> torch.optim.Optimizer:
        if self.wraps:
            h = {k: v for k, v in h.items() if k != "project_momentum"}
        return self.build(groups, h)


OPTIMIZERS: dict[str, OptimInfo] = {info.name: info for info in [
    OptimInfo("AdamP", "adam", _adamp, official=_official_adamp),
    OptimInfo("AdamP-nesterov-maximize", "adam", _adamp,
              hyper=dict(nesterov=True, maximize=True)),
    OptimInfo("SGDP", "sgd", _sgdp),
    OptimInfo("SGDP-project_momentum", "sgd", _sgdp, official=_official_sgdp,
              hyper=dict(project_momentum=True)),
    OptimInfo("SGDP-nesterov", "sgd", _sgdp, official=_official_sgdp,
              hyper=dict(nesterov=True)),
    OptimInfo("project-AdamW", "adam", _project_adamw, official=_official_adamp, wraps=True),
    OptimInfo("project-SGD", "sgd", _project_sgd, wraps=True),
]}
CORE_OPTIMIZERS = ("AdamP", "SGDP", "SGDP-project_momentum", "project-AdamW", "project-SGD")

# ---------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class Spec:
    """One parameter: logical ``shape``, the kind of gradient :func:`make_grad` builds,
    how its memory is laid out and how its gradient is."""

    shape: tuple[int, ...]
    kind: str = "none"
    layout: str = "contiguous"  # contiguous, channels_last, transposed, strided
    grad_layout: str = "like"  # like (the param's strides) or contiguous


def _lay_out(t: Tensor, layout: str) -> Tensor:
    """``t``'s values in memory laid out as ``layout`` (same logical shape and values)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # dims 0 and 1 swapped in memory: rows are not blocks
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided":  # every other element of a larger buffer: not dense
        buffer = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        buffer[..., ::2] = t
        return buffer[..., ::2]
    raise ValueError(layout)


LAYOUTS: dict[str, list[Spec]] = {
    "1d": [Spec((7,), "random"), Spec((1,), "random")],
    "2d": [Spec((4, 6), "channel"), Spec((5, 3), "layer"), Spec((3, 4), "none")],
    "3d": [Spec((3, 2, 5), "channel"), Spec((4, 3, 2), "layer"), Spec((2, 3, 3), "none")],
    "4d": [Spec((4, 3, 2, 2), "channel"), Spec((3, 2, 3, 1), "layer"),
           Spec((2, 2, 2, 3), "none")],
    "channels_last": [Spec((4, 3, 2, 2), "channel", "channels_last"),
                      Spec((3, 2, 3, 3), "layer", "channels_last"),
                      Spec((4, 3, 2, 2), "channel", "channels_last", "contiguous")],
    "transposed": [Spec((4, 6), "channel", "transposed"),
                   Spec((3, 4, 2, 2), "layer", "transposed"),
                   Spec((4, 5), "none", "transposed", "contiguous")],
    "strided": [Spec((4, 6), "channel", "strided"), Spec((6,), "random", "strided"),
                Spec((3, 2, 4), "layer", "strided")],
}
# every layout in one group: what a model's parameter list looks like
LAYOUTS["mixed"] = [LAYOUTS[name][i] for name in LAYOUTS for i in (0, 1)]


def make_params(specs: Sequence[Spec], dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    """Leaf tensors of ``dtype`` laid out as ``specs`` say, from seeded Gaussian values."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for spec in specs:
        if dtype.is_complex:
            values = torch.randn((*spec.shape, 2), generator=generator, dtype=torch.float64)
            t = torch.view_as_complex(values.to(dtype.to_real()))
        else:
            t = torch.randn(spec.shape, generator=generator, dtype=torch.float64).to(dtype)
        params.append(_lay_out(t, spec.layout).requires_grad_(True))
    return params


def grad_kind(spec: Spec, dtype: torch.dtype) -> str:
    """The kind of gradient built for ``spec``: a complex 1-D tensor is stepped as a 2-D real
    view, which the test sees, so its gradient gets a known branch too."""
    if spec.kind == "random" and dtype.is_complex:
        return "none"
    return spec.kind


def make_grads(specs: Sequence[Spec], weights64: Sequence[Tensor], dtype: torch.dtype,
               generator: torch.Generator) -> list[Tensor]:
    """Contiguous gradients of ``dtype`` built from the reference's (real, float64) weights."""
    grads = []
    for spec, w in zip(specs, weights64, strict=True):
        g = make_grad(w, grad_kind(spec, dtype), generator)
        if dtype.is_complex:
            grads.append(torch.view_as_complex(g.to(dtype.to_real()).contiguous()))
        else:
            grads.append(g.to(dtype))
    return grads


def install_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None],
                  specs: Sequence[Spec] | None = None) -> None:
    """``p.grad`` laid out like ``p`` (or contiguous where the spec says so)."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if g is None:
            p.grad = None
        elif specs is not None and specs[i].grad_layout == "contiguous":
            p.grad = g.clone().contiguous()
        else:
            p.grad = torch.empty_like(p).copy_(g)


def groups_for(params: Sequence[Tensor], scale_invariant: object) -> list[dict]:
    """One group, or with an annotation a second group (``scale_invariant=False``) for the
    tensors that cannot carry it (1-D real tensors)."""
    if scale_invariant in ("auto", False):
        return [{"params": list(params), "scale_invariant": scale_invariant}]
    testable = [p for p in params if p.dim() + p.is_complex() >= 2]
    rest = [p for p in params if p.dim() + p.is_complex() < 2]
    groups = [{"params": testable, "scale_invariant": scale_invariant}]
    if rest:
        groups.append({"params": rest, "scale_invariant": False})
    return groups


# ---------------------------------------------------------------------------------------------
# Driving a case


@dataclass
class Run:
    """The three optimizers of a case after its steps."""

    params: list[Tensor]  # ours
    reference: ReferenceAdamP | ReferenceSGDP
    official_params: list[Tensor] | None
    optimizer: torch.optim.Optimizer
    steps: int


GradHook = Callable[[int, list[Tensor]], None]  # (step, grads) -> None, edits in place


def run_case(
    info: OptimInfo, dtype: torch.dtype, specs: Sequence[Spec], scale_invariant: object,
    steps: int, *, seed: int = 0, hyper: dict | None = None, grad_hook: GradHook | None = None,
    params: Sequence[Tensor] | None = None, grads: Sequence[Sequence[Tensor]] | None = None,
    with_official: bool = True,
) -> Run:
    """``steps`` steps of ours, the float64 reference and (where it exists, for real dtypes
    and ``scale_invariant="auto"``) ``adamp`` 0.3.0 on the same gradients.

    ``params`` replaces the built parameters; ``grads`` (one list per step) replaces the built
    gradients; ``grad_hook`` edits each step's gradients before they are fed to all three.
    """
    h = info.hyperparameters(**{**DTYPE_HYPER.get(dtype, {}), **(hyper or {})})
    if params is None:
        ours = make_params(specs, dtype, seed)
    else:
        ours = [torch.empty_like(p).copy_(p.detach()).requires_grad_(True) for p in params]
    reference = info.reference(ours, h, scale_invariant)
    optimizer = info.ours(groups_for(ours, scale_invariant), h)
    theirs = None
    if (with_official and info.official is not None and scale_invariant == "auto"
            and not dtype.is_complex):
        theirs = [p.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
                  for p in ours]
        official_optimizer = info.official(theirs, h)
    generator = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        if grads is not None:
            step_grads = [g.clone() for g in grads[step]]
        else:
            step_grads = make_grads(specs, [w.nan_to_num(0.0, 0.0, 0.0)
                                            for w in reference.params], dtype, generator)
        if grad_hook is not None:
            grad_hook(step, step_grads)
        install_grads(ours, step_grads, specs)
        optimizer.step()
        reference.step(step_grads)
        if theirs is not None:
            install_grads(theirs, step_grads)
            official_optimizer.step()
    return Run(ours, reference, theirs, optimizer, steps)


def real(t: Tensor) -> Tensor:
    return torch.view_as_real(t.detach()) if t.is_complex() else t.detach()


__all__ = [
    "BACKENDS", "CORE_OPTIMIZERS", "DTYPES", "LAYOUTS", "OPTIMIZERS", "OptimInfo", "Run",
    "Spec", "as_real64", "available", "backend_params", "groups_for", "install_grads",
    "make_grads", "make_params", "real", "run_case", "use_backend",
]
