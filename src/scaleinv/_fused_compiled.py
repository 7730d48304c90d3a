"""The ``compiled`` and ``eager`` fused backends: one kernel per tensor, written with
:func:`scaleinv.projection.radial_coefficients`, so the decision stays on the device.

``compiled`` runs each per-tensor body through ``torch.compile(dynamic=True, fullgraph=True)``
(one compilation serves every shape); ``eager`` runs the same bodies without compiling them (a
reference and a debugging aid). They take tensors with ``dim() >= 2`` that may be projected,
as ``[n, d]`` row views; the multi-tensor body steps the others.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from scaleinv.projection import ScaleInvariant, radial_coefficients

__all__ = ["tensorwise_adamp", "tensorwise_sgdp"]


def _adamp_tensor(
    w: Tensor, g: Tensor, m: Tensor, v: Tensor, step_size: float | Tensor,
    bias_correction2_rsqrt: float | Tensor, beta1: float, beta2: float, eps: float,
    decay_plain: float | Tensor, decay_projected: float | Tensor, sign: float, nesterov: float,
    delta: float, scale_invariant: ScaleInvariant,
) -> None:
    """One AdamP step of one ``[n, d]`` tensor; ``nesterov`` is 1.0 or 0.0 (a number, so that
    it does not multiply compilations)."""
    g = g.to(m.dtype) * sign  # in the state's dtype (float32 for 16-bit params)
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
    g = g.to(b.dtype) * sign  # in the state's dtype (float32 for 16-bit params)
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


def _tensor_body(body: Callable[..., None], backend: str,
                 key: tuple[object, ...]) -> Callable[..., None]:
    return _compiled(body, key) if backend == "compiled" else body


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


def tensorwise_adamp(
    views: list[list[Tensor]], steps: list[Tensor], *, backend: str, lr: float | Tensor,
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


def tensorwise_sgdp(
    views: list[list[Tensor]], *, backend: str, lr: float, momentum: float, dampening: float,
    eps: float, weight_decay: float, delta: float, wd_ratio: float, nesterov: bool,
    maximize: bool, project_buffer: bool, scale_invariant: ScaleInvariant,
) -> None:
    """SGDP over ``[w, g, buf]`` row views, one per-tensor kernel each."""
    key = (views[0][0].dtype, scale_invariant, project_buffer)
    body = _tensor_body(_sgdp_tensor, backend, key)
    constants = dict(  # floats all (an int would be a compilation of its own)
        lr=float(lr), momentum=float(momentum), dampening=float(dampening), eps=float(eps),
        decay_plain=1 - float(lr) * weight_decay / (1 - momentum),
        decay_projected=1 - float(lr) * weight_decay * wd_ratio / (1 - momentum),
        delta=float(delta), nesterov=1.0 if nesterov else 0.0, sign=-1.0 if maximize else 1.0,
    )
    for w, g, b in views:
        body(w, g, b, scale_invariant=scale_invariant, project_buffer=project_buffer,
             **constants)
