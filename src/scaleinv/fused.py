"""The fused path (``fused=True``): a step in as few passes over memory as the maths allows.

AdamP must know, for each tensor, whether the cosine test passes before any weight is written,
so an exact step reads the tensor at least twice (``docs/performance.md``). The fused
backends (:mod:`scaleinv.backends`) do it:

* ``"native"`` (CPU, float32/float64): C kernels (:mod:`scaleinv._fused_cpu`), one call per
  group. The test reads ``g`` and ``w`` only; a tensor projected per channel is then updated
  row by row with the row's update kept in cache: 9 arrays of one element per weight
  (``torch.optim.AdamW(fused=True)``: 7); with ``scale_invariant`` given, 7. The layer view
  needs a third pass (12; 10 when the previous step took it too).
* ``"triton"`` (CUDA, float32/float16/bfloat16, where Triton is installed): Triton kernels
  (:mod:`scaleinv._fused_triton`), one launch per pass over every tensor of a group: 10
  arrays for a tensor that may be projected, 7 for one never projected. FSDP2's row shards
  (``Shard(0)`` DTensors) run as their local tensors, with the test's per-tensor statistics
  all-reduced between the passes (two collectives per group; eager mode only).
* ``"compiled"`` / ``"eager"``: per-tensor kernels (:mod:`scaleinv._fused_compiled`).

Both kernel families are custom operators (:mod:`scaleinv._ops`), so a step compiled with
``torch.compile`` runs them too. Tensors a backend cannot take (rows that are not contiguous
blocks of memory, states of another dtype, 1-D tensors on the compiled backend, DTensors
while compiling) are returned to the caller, which steps them with the multi-tensor body:
this module never imports an optimizer.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from scaleinv import _fused_compiled, _layout, _ops
from scaleinv._amp import skip_step, unscaled
from scaleinv.backends import BACKENDS, first_that_runs, fused_backend, triton_kernels
from scaleinv.distributed import all_reduce_row_statistics, is_dtensor
from scaleinv.projection import ScaleInvariant

__all__ = ["FUSED_BACKENDS", "default_backend", "fused_adamp", "fused_sgdp"]

FUSED_BACKENDS: tuple[str, ...] = tuple(name for name, b in BACKENDS.items() if b.fused)


def default_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fused backend ``fused=True`` takes for a device and dtype
    (:func:`scaleinv.backends.fused_backend`; ``"foreach"``: none)."""
    return fused_backend(device, dtype)


def _resolve(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend for one device and dtype: the first of the comma-separated ``backend``
    that runs there (an error if none does), else :func:`default_backend`'s choice."""
    if backend is None:
        return default_backend(device, dtype)
    names = backend.split(",")
    if any(name not in FUSED_BACKENDS for name in names):
        raise ValueError(f"Invalid fused backend: {backend!r}; allowed: {FUSED_BACKENDS} or None")
    chosen = first_that_runs(backend, device, dtype)
    if chosen is None:
        summaries = "; ".join(
            f"{name}: {BACKENDS[name].summary}, {', '.join(map(str, BACKENDS[name].dtypes))}"
            for name in names)
        raise ValueError(f"the {backend} fused backend cannot step {dtype} tensors on {device} "
                         f"here ({summaries})")
    return chosen


def _takes(chosen: str, params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]],
           steps: list[Tensor] | None, scale_invariant: ScaleInvariant) -> list[int]:
    """Indices (into ``params``) of the tensors backend ``chosen`` steps; from metadata only."""
    taken = []
    for i, (w, g) in enumerate(zip(params, grads, strict=True)):
        tensor_states = [s[i] for s in states]
        if chosen == "native":
            ok = _layout.native_takes(w, g, tensor_states, None if steps is None else steps[i])
        elif chosen == "triton" and not torch.compiler.is_compiling():
            ok = True  # split_triton sorts them out (it may build row views and shards)
        elif chosen == "triton":
            ok = not is_dtensor(w) and _layout.row_views(
                w, g, tensor_states, alias=False) is not None
        else:  # compiled, eager: tensors that may be projected, as row views
            ok = (w.dim() >= 2 and scale_invariant is not False and not is_dtensor(w)
                  and _layout.row_views(w, g, tensor_states, alias=False) is not None)
        if ok:
            taken.append(i)
    return taken


def _pick(tensors: list[Tensor], indices: list[int]) -> list[Tensor]:
    return tensors if len(indices) == len(tensors) else [tensors[i] for i in indices]


def fused_adamp(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *, lr: float | Tensor, beta1: float,
    beta2: float, eps: float, weight_decay: float, delta: float, wd_ratio: float,
    nesterov: bool, maximize: bool, scale_invariant: ScaleInvariant,
    backend: str | None = None, grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> list[int]:
    """AdamP over lists of tensors, fused (see :class:`scaleinv.AdamP` for the maths).

    ``backend``: a fused backend of :mod:`scaleinv.backends`, or ``None`` to pick per device
    and dtype. ``grad_scale``, ``found_inf``: as in :mod:`scaleinv._amp` (the Triton kernels
    apply them on the device). Returns the indices of the tensors it did not step, for the
    multi-tensor body.
    """
    hyper: dict[str, Any] = dict(
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, delta=delta,
        wd_ratio=wd_ratio, nesterov=nesterov, maximize=maximize,
    )
    left: list[int] = []
    grouped = _layout.group_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, state_steps])
    for (device, dtype), ((d_params, d_grads, d_ms, d_vs, d_steps), indices) in grouped.items():
        d_params, d_grads, d_ms, d_vs = (
            _layout.as_real(ts, dtype) for ts in (d_params, d_grads, d_ms, d_vs))
        chosen = _resolve(backend, device, dtype)
        if chosen == "foreach":
            left.extend(indices)
            continue
        taken = _takes(chosen, d_params, d_grads, [d_ms, d_vs], d_steps, scale_invariant)
        left.extend(indices[i] for i in sorted(set(range(len(indices))) - set(taken)))
        if not taken:
            continue
        w, g, m, v, s = (_pick(t, taken) for t in (d_params, d_grads, d_ms, d_vs, d_steps))
        if chosen == "triton":
            left.extend(indices[taken[i]] for i in _triton_adamp(
                w, g, m, v, s, lr=lr, scale_invariant=scale_invariant, grad_scale=grad_scale,
                found_inf=found_inf, **hyper))
            continue
        if skip_step(found_inf):
            continue
        g = unscaled(g, grad_scale)
        if chosen == "native":
            _ops.run("native_adamp_", w, g, m, v, s, _layout.modes(w, scale_invariant), lr=lr,
                     **hyper)
        else:
            views = [_layout.row_views(*t[:2], list(t[2:])) for t in zip(w, g, m, v, strict=True)]
            _fused_compiled.tensorwise_adamp(views, s, backend=chosen, lr=lr,  # type: ignore[arg-type]
                                             scale_invariant=scale_invariant, **hyper)
    return sorted(left)


def _triton_adamp(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                  exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr: float | Tensor,
                  scale_invariant: ScaleInvariant, grad_scale: Tensor | None,
                  found_inf: Tensor | None, **hyper: Any) -> list[int]:
    """The Triton launches of one group; returns the indices (into ``params``) left over."""
    if torch.compiler.is_compiling():  # _takes kept only what the kernels take as they are
        _ops.run("triton_adamp_", params, grads, exp_avgs, exp_avg_sqs, steps,
                 _layout.modes(params, scale_invariant), lr=lr, grad_scale=grad_scale,
                 found_inf=found_inf, **hyper)
        return []
    kernels = triton_kernels()
    assert kernels is not None  # _resolve checked
    launches, left = _layout.split_triton(params, grads, [exp_avgs, exp_avg_sqs])
    for taken, columns, sharded in launches:
        w, g, m, v, s = (_pick(t, taken) for t in (params, grads, exp_avgs, exp_avg_sqs, steps))
        modes = _layout.modes(w, scale_invariant)
        if sharded is None:
            _ops.run("triton_adamp_", w, g, m, v, s, modes, lr=lr, grad_scale=grad_scale,
                     found_inf=found_inf, **hyper)
        else:
            whole, group = sharded
            kernels.adamp_step(
                *columns, s, modes, lr=lr, grad_scale=grad_scale, found_inf=found_inf, **hyper,
                shards=kernels.Shards(whole, functools.partial(all_reduce_row_statistics, group)))
    return left


def fused_sgdp(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *,
    lr: float | Tensor, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
    eps: float, delta: float, wd_ratio: float, project_momentum: bool = False,
    maximize: bool = False, scale_invariant: ScaleInvariant = "auto",
    backend: str | None = None, grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> list[int]:
    """SGDP over lists of tensors, fused (see :class:`scaleinv.SGDP` for the maths;
    ``backend`` and the returned indices as in :func:`fused_adamp`)."""
    project_buffer = project_momentum and not nesterov
    hyper: dict[str, Any] = dict(
        momentum=momentum, dampening=dampening, eps=eps, weight_decay=weight_decay,
        delta=delta, wd_ratio=wd_ratio, nesterov=nesterov, maximize=maximize,
        project_buffer=project_buffer,
    )
    left: list[int] = []
    grouped = _layout.group_by_device_and_dtype([params, grads, momentum_buffers])
    for (device, dtype), ((d_params, d_grads, d_bufs), indices) in grouped.items():
        d_params, d_grads, d_bufs = (
            _layout.as_real(ts, dtype) for ts in (d_params, d_grads, d_bufs))
        chosen = _resolve(backend, device, dtype)
        if chosen == "foreach":
            left.extend(indices)
            continue
        taken = _takes(chosen, d_params, d_grads, [d_bufs], None, scale_invariant)
        left.extend(indices[i] for i in sorted(set(range(len(indices))) - set(taken)))
        if not taken:
            continue
        w, g, b = (_pick(t, taken) for t in (d_params, d_grads, d_bufs))
        if chosen == "triton":
            left.extend(indices[taken[i]] for i in _triton_sgdp(
                w, g, b, lr=lr, scale_invariant=scale_invariant, grad_scale=grad_scale,
                found_inf=found_inf, **hyper))
            continue
        if skip_step(found_inf):
            continue
        g = unscaled(g, grad_scale)
        if chosen == "native":
            _ops.run("native_sgdp_", w, g, b, _layout.modes(w, scale_invariant), lr=lr, **hyper)
        else:
            views = [_layout.row_views(*t[:2], list(t[2:])) for t in zip(w, g, b, strict=True)]
            _fused_compiled.tensorwise_sgdp(views, backend=chosen, lr=float(lr),  # type: ignore[arg-type]
                                            scale_invariant=scale_invariant, **hyper)
    return sorted(left)


def _triton_sgdp(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *,
                 lr: float | Tensor, scale_invariant: ScaleInvariant,
                 grad_scale: Tensor | None, found_inf: Tensor | None,
                 **hyper: Any) -> list[int]:
    """The Triton launches of one group; returns the indices (into ``params``) left over."""
    if torch.compiler.is_compiling():  # _takes kept only what the kernels take as they are
        _ops.run("triton_sgdp_", params, grads, momentum_buffers,
                 _layout.modes(params, scale_invariant), lr=lr, grad_scale=grad_scale,
                 found_inf=found_inf, **hyper)
        return []
    kernels = triton_kernels()
    assert kernels is not None  # _resolve checked
    launches, left = _layout.split_triton(params, grads, [momentum_buffers])
    for taken, columns, sharded in launches:
        w, g, b = (_pick(t, taken) for t in (params, grads, momentum_buffers))
        modes = _layout.modes(w, scale_invariant)
        if sharded is None:
            _ops.run("triton_sgdp_", w, g, b, modes, lr=lr, grad_scale=grad_scale,
                     found_inf=found_inf, **hyper)
        else:
            whole, group = sharded
            lr_value = float(lr)
            momentum, wd, ratio = hyper["momentum"], hyper["weight_decay"], hyper["wd_ratio"]
            kernels.sgdp_step(
                *columns, modes, lr=lr_value, momentum=momentum, dampening=hyper["dampening"],
                eps=hyper["eps"], decay_plain=1 - lr_value * wd / (1 - momentum),
                decay_projected=1 - lr_value * wd * ratio / (1 - momentum),
                delta=hyper["delta"], nesterov=hyper["nesterov"], maximize=hyper["maximize"],
                project_buffer=hyper["project_buffer"], grad_scale=grad_scale,
                found_inf=found_inf,
                shards=kernels.Shards(whole, functools.partial(all_reduce_row_statistics, group)))
    return left
