"""The fused path (``fused=True``): a step in as few passes over memory as the maths allows.

AdamP must know, for each tensor, whether the cosine test passes before any weight is written,
so an exact step reads the tensor at least twice (DESIGN.md section 5). Three backends do it:

* ``"native"`` (CPU, float32/float64): C kernels (:mod:`scaleinv._fused_cpu`), one call per
  group. The test reads ``g`` and ``w`` only; a tensor projected per channel is then updated
  row by row with the row's update kept in cache, so the whole step moves 9 arrays of one
  element per weight (``torch.optim.AdamW(fused=True)``: 7); with ``scale_invariant`` given,
  7. The layer view needs a third pass (12).
* ``"triton"`` (CUDA, float32/float16/bfloat16, where Triton is installed): Triton kernels
  (:mod:`scaleinv._fused_triton`), one launch per pass over every tensor of a group: 10
  arrays for a tensor that may be projected (tested or annotated), 7 for one never projected.
  FSDP2's row shards (``Shard(0)`` DTensors) run as their local tensors, with the test's
  per-tensor statistics all-reduced between the passes (two collectives per group). On a CPU
  it runs only under Triton's interpreter (``TRITON_INTERPRET=1``, tests).
* ``"compiled"`` (any device; the CUDA default where Triton is missing): one
  ``torch.compile(dynamic=True, fullgraph=True)`` kernel per tensor, written with
  :func:`scaleinv.projection.radial_coefficients`, so the decision stays on the device (no
  host synchronisation). Dynamic shapes: one compilation serves every shape.

``"eager"`` runs the compiled backend's per-tensor functions without compiling them (a
reference and a debugging aid); ``"foreach"`` hands everything to the multi-tensor body (the
CPU default where the C kernels cannot be built, or for other dtypes). Tensors a backend
cannot take (rows that are not contiguous blocks of memory, states of another dtype, 1-D
tensors on the compiled backend) go through the multi-tensor body too, which is exact and
sync-free.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import types
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from scaleinv import _fused_cpu
from scaleinv.distributed import all_reduce_row_statistics, is_dtensor, row_shard_group
from scaleinv.projection import ScaleInvariant, radial_coefficients

__all__ = ["BACKENDS", "default_backend", "fused_adamp", "fused_sgdp"]

Backend = Literal["native", "triton", "compiled", "eager", "foreach"]
BACKENDS: tuple[str, ...] = ("native", "triton", "compiled", "eager", "foreach")


@functools.cache
def _triton() -> types.ModuleType | None:
    """:mod:`scaleinv._fused_triton`, or ``None`` where Triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    from scaleinv import _fused_triton

    return _fused_triton


def _triton_runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    kernels = _triton()
    on_device = device.type == "cuda" or (
        device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return kernels is not None and on_device and kernels.supports(dtype)


def fused_by_default(p: Tensor) -> bool:
    """Whether ``fused=None`` takes the fused path for a group whose first param is ``p``: where
    the Triton backend runs (a CUDA tensor, or FSDP2's row shard of one)."""
    return (p.device.type == "cuda" and (not is_dtensor(p) or row_shard_group(p) is not None)
            and _triton_runs_on(p.device, p.dtype))


def default_backend(device: torch.device, dtype: torch.dtype) -> Backend:
    """CPU: ``"native"`` for float32/float64 where the C kernels build, else ``"foreach"``;
    CUDA: ``"triton"`` for float32/float16/bfloat16 where Triton is installed; other devices
    and dtypes: ``"compiled"``."""
    if device.type == "cuda" and _triton_runs_on(device, dtype):
        return "triton"
    if device.type != "cpu":
        return "compiled"
    if dtype in _fused_cpu.DTYPE_SUFFIX and _fused_cpu.load() is not None:
        return "native"
    return "foreach"


def _check_backend(backend: str | None) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"Invalid fused backend: {backend!r}; allowed: {BACKENDS} or None")


# ---------------------------------------------------------------------------------------------
# Layout: every kernel sees a tensor as [n, d] rows (output channels) that are contiguous
# blocks of memory, read in memory order; a 1-D tensor is one row.


def _row_order(t: Tensor) -> tuple[int, ...]:
    """Dims of ``t`` from the outermost in memory to the innermost, dim 0 first."""
    return (0, *sorted(range(1, t.dim()), key=lambda i: -t.stride(i)))


def _rows(t: Tensor, order: tuple[int, ...]) -> Tensor | None:
    """``t`` as an ``[n, d]`` view, or ``None`` where its rows are not contiguous blocks."""
    if t.dim() < 2:
        return t.view(1, -1) if t.is_contiguous() else None
    permuted = t.permute(order)
    return permuted.view(t.shape[0], -1) if permuted.is_contiguous() else None


def _rows_are_blocks(t: Tensor) -> bool:
    return t.is_contiguous() or _rows(t, _row_order(t)) is not None


def _native_tensors(w: Tensor, grad: Tensor, states: list[Tensor]) -> list[Tensor] | None:
    """``[w, grad, *states]`` for the C kernels, which read raw memory: all laid out like
    ``w`` (a gradient laid out otherwise is copied; it is only read), or ``None``."""
    if w.numel() == 0 or any(t.dtype != w.dtype for t in (grad, *states)):
        return None
    if w.is_contiguous() and all(s.is_contiguous() for s in states):
        layout_ok = True
    else:
        layout_ok = _rows_are_blocks(w) and all(s.stride() == w.stride() for s in states)
    if not layout_ok:
        return None
    if grad.stride() != w.stride():
        grad = torch.empty_like(w).copy_(grad)
    return [w, grad, *states]


def _unviewed(t: Tensor) -> Tensor:
    """A tensor on the memory of ``t`` that is not a view of it: dynamo guards on the base of
    a view input, which would make each layout of each parameter a compilation of its own."""
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _row_views(w: Tensor, grad: Tensor, states: list[Tensor]) -> list[Tensor] | None:
    """``[w, grad, *states]`` as ``[n, d]`` tensors in ``w``'s memory order, or ``None``. A
    gradient laid out otherwise is copied; the states must be laid out like ``w``."""
    if w.numel() == 0 or any(t.dtype != w.dtype for t in (grad, *states)):
        return None
    order = _row_order(w)
    views = [_rows(t, order) for t in (w, *states)]
    if any(v is None for v in views):
        return None
    grad_rows = grad.permute(order).reshape(w.shape[0], -1)
    return [_unviewed(t) for t in (views[0], grad_rows, *views[1:])]  # type: ignore[arg-type]


TritonLaunch = tuple[list[int], list[list[Tensor]], Any]  # indices, columns, shards or None


def _split_triton(
    params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]],
) -> tuple[list[TritonLaunch], list[int]]:
    """The launches of the Triton kernels (indices, inputs as columns ``[ws, gs, *states]``,
    and for row shards their :class:`~scaleinv._fused_triton.Shards`), and the indices left
    to the multi-tensor body. The kernels read each tensor from its first element in ``w``'s
    memory order: the tensors themselves where all are contiguous (the usual case, checked
    first: this runs per tensor per step, before the first launch), else row views. FSDP2's
    row shards go in one launch per process group, as their local tensors; other DTensors are
    left to the multi-tensor body."""
    columns: list[list[Tensor]] = [params, grads, *states]
    if (all(all(map(Tensor.is_contiguous, column)) for column in columns)
            and all(map(Tensor.numel, params)) and not any(map(is_dtensor, params))):
        return [(list(range(len(params))), columns, None)], []
    launches: dict[Any, tuple[list[int], list[list[Tensor]], list[torch.Size]]] = {}
    left: list[int] = []
    for i, tensors in enumerate(zip(*columns, strict=True)):
        w, g, *tensor_states = tensors
        group = row_shard_group(w)
        if group is not None:  # every rank takes it, so the partials line up across ranks
            rows = _local_rows(tensors)
        elif is_dtensor(w):
            rows = None
        else:
            rows = _row_views(w, g, tensor_states)
        if rows is None:
            left.append(i)
            continue
        taken, kept, whole = launches.setdefault(group, ([], [[] for _ in columns], []))
        taken.append(i)
        whole.append(tensors[0].shape)
        for column, t in zip(kept, rows, strict=True):
            column.append(t)
    return [
        (taken, kept, None if group is None else _triton().Shards(  # type: ignore[union-attr]
            whole, functools.partial(all_reduce_row_statistics, group)))
        for group, (taken, kept, whole) in launches.items()
    ], left


def _local_rows(tensors: tuple[Tensor, ...]) -> list[Tensor]:
    """A row shard's local ``[w, g, *states]`` as ``[n_local, d]`` tensors (FSDP2 keeps them
    contiguous; an empty shard gives ``[0, d]``)."""
    d = tensors[0].shape[1:].numel()
    local = [t.to_local() for t in tensors]
    if not all(t.is_contiguous() for t in local):
        raise RuntimeError(
            "scaleinv's fused step needs contiguous local shards of a row-sharded DTensor "
            f"(got strides {[t.stride() for t in local]}); use foreach=True for this group"
        )
    return [t.view(t.shape[0], d) for t in local]


def _as_real(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Complex tensors as their real views (``dtype``: the group's, checked once)."""
    if not dtype.is_complex:
        return tensors
    return [torch.view_as_real(t) for t in tensors]


def _native_step(step: Tensor) -> bool:
    return step.dtype == torch.float32 and step.device.type == "cpu" and step.numel() == 1


def _split(
    params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]], backend: Backend,
    scale_invariant: ScaleInvariant, steps: list[Tensor] | None = None,
) -> tuple[list[int], list[list[Tensor]], list[int]]:
    """Indices the backend takes with its inputs (``[w, g, *states]`` per tensor), and the
    indices left to the multi-tensor body. The compiled backend takes only tensors it may
    project; the native one takes every tensor it can read (with a float32 CPU step counter
    where there is one)."""
    taken: list[int] = []
    inputs: list[list[Tensor]] = []
    left: list[int] = []
    for i, (w, g) in enumerate(zip(params, grads, strict=True)):
        tensor_states = [s[i] for s in states]
        if backend == "foreach" or is_dtensor(w):  # shards go where the test is all-reduced
            tensor_inputs = None
        elif backend == "native":
            tensor_inputs = None
            if steps is None or _native_step(steps[i]):
                tensor_inputs = _native_tensors(w, g, tensor_states)
        elif w.dim() >= 2 and scale_invariant is not False:
            tensor_inputs = _row_views(w, g, tensor_states)
        else:
            tensor_inputs = None
        if tensor_inputs is None:
            left.append(i)
        else:
            taken.append(i)
            inputs.append(tensor_inputs)
    return taken, inputs, left


def _modes(params: list[Tensor], scale_invariant: ScaleInvariant,
           kernels: types.ModuleType = _fused_cpu) -> list[int]:
    """The kernels' per-tensor mode (``kernels.MODE_*``): never project (1-D tensors,
    ``False``), or the test, or a given view."""
    if scale_invariant is False:
        return [kernels.MODE_PLAIN] * len(params)
    mode = {"auto": kernels.MODE_AUTO, "channel": kernels.MODE_CHANNEL,
            "layer": kernels.MODE_LAYER}[scale_invariant]  # type: ignore[index]
    return [mode if p.dim() >= 2 else kernels.MODE_PLAIN for p in params]


class _ViewMemory:
    """Which parameters took the layer view at their last native step (weakly, by identity).

    For those the C kernels gather the test's sums in the first of two passes instead of
    reading ``g`` and ``w`` once more before them: 10 arrays instead of 12. The choice only
    changes how memory is read, never the result.
    """

    def __init__(self) -> None:
        self._layer: dict[int, weakref.ref] = {}

    def modes(self, params: list[Tensor], modes: list[int]) -> list[int]:
        return [
            _fused_cpu.MODE_AUTO_TWO_PASS
            if mode == _fused_cpu.MODE_AUTO and self._was_layer(p) else mode
            for p, mode in zip(params, modes, strict=True)
        ]

    def remember(self, params: list[Tensor], views: list[str | None]) -> None:
        for p, view in zip(params, views, strict=True):
            if view == "layer":
                self._layer[id(p)] = weakref.ref(p)
            else:
                self._layer.pop(id(p), None)
        if len(self._layer) > 4096:  # forget parameters that no longer exist
            self._layer = {k: r for k, r in self._layer.items() if r() is not None}

    def _was_layer(self, p: Tensor) -> bool:
        ref = self._layer.get(id(p))
        return ref is not None and ref() is p


_VIEWS = _ViewMemory()


def _resolve(backend: Backend | None, device: torch.device, dtype: torch.dtype) -> Backend:
    chosen = backend or default_backend(device, dtype)
    if chosen == "native" and (device.type != "cpu" or dtype not in _fused_cpu.DTYPE_SUFFIX
                               or _fused_cpu.load() is None):
        raise ValueError(
            f"the native fused backend needs float32/float64 CPU tensors and a C compiler; "
            f"got {dtype} tensors on {device}"
        )
    if chosen == "triton" and not _triton_runs_on(device, dtype):
        raise ValueError(
            f"the triton fused backend needs Triton installed and float32/float16/bfloat16 "
            f"CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); got {dtype} tensors "
            f"on {device}"
        )
    return chosen


# ---------------------------------------------------------------------------------------------
# Per-tensor bodies of the compiled backend (traced by torch.compile, dynamic shapes).


def _adamp_tensor(
    w: Tensor, g: Tensor, m: Tensor, v: Tensor, step_size: float | Tensor,
    bias_correction2_rsqrt: float | Tensor, beta1: float, beta2: float, eps: float,
    decay_plain: float | Tensor, decay_projected: float | Tensor, sign: float, nesterov: float,
    delta: float, scale_invariant: ScaleInvariant,
) -> None:
    """One AdamP step of one ``[n, d]`` tensor; ``nesterov`` is 1.0 or 0.0 (a number, so that
    it does not multiply compilations)."""
    g = g * sign
    m_new = m * beta1 + g * (1 - beta1)
    v_new = v * beta2 + g * g * (1 - beta2)
    numerator = m_new * (1 - nesterov + nesterov * beta1) + g * (nesterov * (1 - beta1))
    p = numerator / (v_new.sqrt() * bias_correction2_rsqrt + eps)
    (coef,), (projected,) = radial_coefficients(
        [w], [g], [p], scale_invariant=scale_invariant, delta=delta, eps=eps
    )
    decay = projected.to(w.dtype) * (decay_projected - decay_plain) + decay_plain
    m.copy_(m_new)
    v.copy_(v_new)
    w.copy_(w * (decay + step_size * coef) - step_size * p)


def _sgdp_tensor(
    w: Tensor, g: Tensor, b: Tensor, lr: float, momentum: float, dampening: float, eps: float,
    decay_plain: float, decay_projected: float, sign: float, nesterov: float, delta: float,
    scale_invariant: ScaleInvariant, project_buffer: bool,
) -> None:
    """One SGDP step of one ``[n, d]`` tensor (``nesterov`` as in :func:`_adamp_tensor`)."""
    g = g * sign
    b_new = b * momentum + g * (1 - dampening)
    p = g * nesterov + b_new * (1 - nesterov + nesterov * momentum)
    (coef,), (projected,) = radial_coefficients(
        [w], [g], [p], scale_invariant=scale_invariant, delta=delta, eps=eps
    )
    decay = projected.to(w.dtype) * (decay_projected - decay_plain) + decay_plain
    b.copy_(p - w * coef if project_buffer else b_new)
    w.copy_(w * (decay + lr * coef) - lr * p)


@functools.cache
def _compiled(body: Callable[..., None], key: tuple[object, ...]) -> Callable[..., None]:
    """``body`` compiled for one ``key`` (dtype, annotation, ...). Dynamo keeps the graphs of
    a function with its code object, and at most ``recompile_limit`` of them; a copy of the
    code per key keeps each list short (shape specialisations only)."""
    code = body.__code__.replace(co_name=f"{body.__name__}_{abs(hash(key)):x}")
    copy = types.FunctionType(code, body.__globals__, code.co_name, body.__defaults__)
    return torch.compile(copy, dynamic=True, fullgraph=True)


def _tensor_body(body: Callable[..., None], backend: Backend,
                 key: tuple[object, ...]) -> Callable[..., None]:
    return _compiled(body, key) if backend == "compiled" else body


# ---------------------------------------------------------------------------------------------
# AdamP


def fused_adamp(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *, capturable: bool,
    lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
    delta: float, wd_ratio: float, nesterov: bool, maximize: bool,
    scale_invariant: ScaleInvariant, backend: Backend | None = None,
) -> None:
    """AdamP over lists of tensors, fused (see :class:`scaleinv.AdamP` for the maths).

    ``backend``: one of :data:`BACKENDS`, or ``None`` to pick per device and dtype
    (:func:`default_backend`).
    """
    from scaleinv.adamp import _multi_tensor_adamp

    _check_backend(backend)
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, state_steps]  # type: ignore[list-item]
    )
    hyper: dict[str, Any] = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, delta=delta,
        wd_ratio=wd_ratio, nesterov=nesterov, maximize=maximize,
        scale_invariant=scale_invariant,
    )
    for (device, dtype), ((d_params, d_grads, d_ms, d_vs, d_steps), _) in grouped.items():
        d_params, d_grads, d_ms, d_vs = (_as_real(ts, dtype) for ts in (d_params, d_grads, d_ms,
                                                                        d_vs))
        chosen = _resolve(backend, device, dtype)
        if chosen == "triton":
            launches, left = _split_triton(d_params, d_grads, [d_ms, d_vs])
            for taken, columns, shards in launches:
                every = len(taken) == len(d_params)
                _triton_adamp(
                    columns, d_steps if every else [d_steps[i] for i in taken],
                    d_params if every else [d_params[i] for i in taken], shards=shards,
                    **hyper)
        else:
            taken, inputs, left = _split(d_params, d_grads, [d_ms, d_vs], chosen,
                                         scale_invariant, d_steps)
            if taken:
                steps = [d_steps[i] for i in taken]
                if chosen == "native":
                    _native_adamp(inputs, steps, **hyper)
                else:
                    _tensorwise_adamp(inputs, steps, backend=chosen, **hyper)
        if left:
            left_steps = [d_steps[i] for i in left]
            _multi_tensor_adamp(
                *([ts[i] for i in left] for ts in (d_params, d_grads, d_ms, d_vs)), left_steps,
                capturable=capturable or left_steps[0].device.type != "cpu", **hyper,
            )


def _adamp_constants(lr: float | Tensor, beta1: float, beta2: float, weight_decay: float,
                     wd_ratio: float, maximize: bool, nesterov: bool) -> dict[str, Any]:
    """Scalars of the per-tensor body: floats (an int would be a compilation of its own), and
    the decay factors as tensors where ``lr`` is one (reading it would synchronise)."""
    if not isinstance(lr, Tensor):
        lr = float(lr)
    return dict(
        beta1=float(beta1), beta2=float(beta2), decay_plain=1 - lr * weight_decay,
        decay_projected=1 - lr * weight_decay * wd_ratio, sign=-1.0 if maximize else 1.0,
        nesterov=1.0 if nesterov else 0.0,
    )


def _native_adamp(
    inputs: list[list[Tensor]], steps: list[Tensor], *, lr: float | Tensor, beta1: float,
    beta2: float, eps: float, weight_decay: float, delta: float, wd_ratio: float,
    nesterov: bool, maximize: bool, scale_invariant: ScaleInvariant,
) -> None:
    lr_value = float(lr)
    params = [t[0] for t in inputs]
    views = _fused_cpu.adamp_step(
        params, *([t[k] for t in inputs] for k in range(1, 4)), steps,
        _VIEWS.modes(params, _modes(params, scale_invariant)), lr=lr_value, beta1=beta1,
        beta2=beta2, eps=eps, decay_plain=1 - lr_value * weight_decay,
        decay_projected=1 - lr_value * weight_decay * wd_ratio, delta=delta,
        nesterov=nesterov, maximize=maximize,
    )
    _VIEWS.remember(params, views)


def _triton_adamp(
    columns: list[list[Tensor]], steps: list[Tensor], originals: list[Tensor], *, shards: Any,
    lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
    delta: float, wd_ratio: float, nesterov: bool, maximize: bool,
    scale_invariant: ScaleInvariant,
) -> None:
    """``columns``: ``[ws, gs, ms, vs]`` from :func:`_split_triton`; ``originals``, the
    params they stand for (real views of complex ones), give the modes (a 1-D tensor is
    never projected)."""
    kernels = _triton()
    assert kernels is not None  # _resolve checked
    kernels.adamp_step(
        *columns, steps,
        _modes(originals, scale_invariant, kernels), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, wd_ratio=wd_ratio, delta=delta, nesterov=nesterov,
        maximize=maximize, shards=shards,
    )


def _tensorwise_adamp(
    views: list[list[Tensor]], steps: list[Tensor], *, backend: Backend, lr: float | Tensor,
    beta1: float, beta2: float, eps: float, weight_decay: float, delta: float, wd_ratio: float,
    nesterov: bool, maximize: bool, scale_invariant: ScaleInvariant,
) -> None:
    torch._foreach_add_(steps, 1)
    constants = _adamp_constants(lr, beta1, beta2, weight_decay, wd_ratio, maximize, nesterov)
    on_host = all(s.device.type == "cpu" for s in steps) and not isinstance(lr, Tensor)
    key = (views[0][0].dtype, scale_invariant, on_host, isinstance(lr, Tensor))
    body = _tensor_body(_adamp_tensor, backend, key)
    if on_host:
        counts = [float(s) for s in steps]
        step_sizes: list[Any] = [float(lr) / (1 - beta1**t) for t in counts]
        rsqrts: list[Any] = [1 / math.sqrt(1 - beta2**t) for t in counts]
    else:
        # Step counters on the device (capturable): bias corrections stay there too.
        step_sizes = list(torch._foreach_div(torch._foreach_neg(
            torch._foreach_sub(torch._foreach_pow(beta1, steps), 1)), lr))
        torch._foreach_reciprocal_(step_sizes)
        rsqrts = list(torch._foreach_neg(torch._foreach_sub(torch._foreach_pow(beta2, steps), 1)))
        torch._foreach_rsqrt_(rsqrts)
    for (w, g, m, v), step_size, rsqrt in zip(views, step_sizes, rsqrts, strict=True):
        body(w, g, m, v, step_size, rsqrt, eps=float(eps), delta=float(delta),
             scale_invariant=scale_invariant, **constants)


# ---------------------------------------------------------------------------------------------
# SGDP


def fused_sgdp(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *,
    lr: float | Tensor, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
    eps: float, delta: float, wd_ratio: float, project_momentum: bool = False,
    maximize: bool = False, scale_invariant: ScaleInvariant = "auto",
    backend: Backend | None = None,
) -> None:
    """SGDP over lists of tensors, fused (see :class:`scaleinv.SGDP` for the maths;
    ``backend`` as in :func:`fused_adamp`)."""
    from scaleinv.sgdp import _multi_tensor_sgdp

    _check_backend(backend)
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, momentum_buffers]  # type: ignore[list-item]
    )
    lr_value = float(lr)
    hyper: dict[str, Any] = dict(
        momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        eps=eps, delta=delta, wd_ratio=wd_ratio, project_momentum=project_momentum,
        maximize=maximize, scale_invariant=scale_invariant,
    )
    constants = dict(  # floats all (an int would be a compilation of its own)
        lr=lr_value, momentum=float(momentum), dampening=float(dampening), eps=float(eps),
        decay_plain=1 - lr_value * weight_decay / (1 - momentum),
        decay_projected=1 - lr_value * weight_decay * wd_ratio / (1 - momentum),
        delta=float(delta), nesterov=nesterov,
    )
    project_buffer = project_momentum and not nesterov
    for (device, dtype), ((d_params, d_grads, d_bufs), _) in grouped.items():
        d_params, d_grads, d_bufs = (_as_real(ts, dtype) for ts in (d_params, d_grads, d_bufs))
        chosen = _resolve(backend, device, dtype)
        if chosen == "triton":
            launches, left = _split_triton(d_params, d_grads, [d_bufs])
            kernels = _triton()
            assert kernels is not None  # _resolve checked
            for taken, columns, shards in launches:
                kernels.sgdp_step(
                    *columns, _modes([d_params[i] for i in taken], scale_invariant, kernels),
                    nesterov=nesterov, maximize=maximize, project_buffer=project_buffer,
                    shards=shards, **{k: v for k, v in constants.items() if k != "nesterov"},
                )
        else:
            taken, inputs, left = _split(d_params, d_grads, [d_bufs], chosen, scale_invariant)
            if taken and chosen == "native":
                native_params = [t[0] for t in inputs]
                modes = _VIEWS.modes(native_params, _modes(native_params, scale_invariant))
                views = _fused_cpu.sgdp_step(
                    native_params, *([t[k] for t in inputs] for k in range(1, 3)), modes,
                    project_buffer=project_buffer, maximize=maximize, **constants,
                )
                _VIEWS.remember(native_params, views)
            elif taken:
                key = (inputs[0][0].dtype, scale_invariant, project_buffer)
                body = _tensor_body(_sgdp_tensor, chosen, key)
                tensor_constants = dict(constants, nesterov=1.0 if nesterov else 0.0,
                                        sign=-1.0 if maximize else 1.0)
                for w, g, b in inputs:
                    body(w, g, b, scale_invariant=scale_invariant,
                         project_buffer=project_buffer, **tensor_constants)
        if left:
            _multi_tensor_sgdp(
                *([ts[i] for i in left] for ts in (d_params, d_grads, d_bufs)), lr=lr, **hyper
            )
