"""The fused kernels as PyTorch custom operators (``torch.ops.scaleinv.*``).

``torch.compile`` cannot trace into ctypes calls or Triton launchers with host-side caches;
as custom operators (``torch.library.custom_op``, with fake implementations that only
declare the in-place updates) the kernels appear in the compiled graph as single nodes, so
``torch.compile(opt.step, fullgraph=True)`` runs the same kernels as eager mode.

In eager mode :func:`run` calls the implementation directly: the dispatcher would add host
time to every step and change nothing.

Each operator steps every tensor it is given; the caller (:mod:`scaleinv.fused`) passes only
tensors the kernel takes (a choice made from metadata alone, so it is traceable).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from scaleinv import _fused_cpu
from scaleinv._layout import native_gradient, split_triton
from scaleinv.backends import triton_kernels

__all__ = ["run"]

_ADAMP_MUTATES = ("params", "exp_avgs", "exp_avg_sqs", "steps")
_SGDP_MUTATES = ("params", "momentum_buffers")


class _ViewMemory:
    """Which parameters took the layer view at their last native step (weakly, by identity).

    For those the C kernels gather the test's sums in the first of two passes instead of
    reading ``g`` and ``w`` once more before them: 10 arrays instead of 12. The choice only
    changes how memory is read, never the result.
    """

    def __init__(self) -> None:
        import weakref

        self._ref = weakref.ref
        self._layer: dict[int, Any] = {}

    def modes(self, params: list[Tensor], modes: list[int]) -> list[int]:
        return [
            _fused_cpu.MODE_AUTO_TWO_PASS
            if mode == _fused_cpu.MODE_AUTO and self._was_layer(p) else mode
            for p, mode in zip(params, modes, strict=True)
        ]

    def remember(self, params: list[Tensor], views: list[str | None]) -> None:
        for p, view in zip(params, views, strict=True):
            if view == "layer":
                self._layer[id(p)] = self._ref(p)
            else:
                self._layer.pop(id(p), None)
        if len(self._layer) > 4096:  # forget parameters that no longer exist
            self._layer = {k: r for k, r in self._layer.items() if r() is not None}

    def _was_layer(self, p: Tensor) -> bool:
        ref = self._layer.get(id(p))
        return ref is not None and ref() is p


_VIEWS = _ViewMemory()


# ---------------------------------------------------------------------------------------------
# C kernels (CPU)


@torch.library.custom_op("scaleinv::native_adamp_", mutates_args=_ADAMP_MUTATES,
                         device_types="cpu")
def native_adamp_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], steps: list[Tensor], modes: list[int], lr: float,
    lr_tensor: Tensor | None, beta1: float, beta2: float, eps: float, weight_decay: float,
    delta: float, wd_ratio: float, nesterov: bool, maximize: bool,
) -> None:
    """One AdamP step of CPU float32/float64 tensors by the C kernels (increments ``steps``)."""
    lr_value = float(lr_tensor) if lr_tensor is not None else lr
    grads = [native_gradient(w, g) for w, g in zip(params, grads, strict=True)]
    views = _fused_cpu.adamp_step(
        params, grads, exp_avgs, exp_avg_sqs, steps, _VIEWS.modes(params, modes),
        lr=lr_value, beta1=beta1, beta2=beta2, eps=eps,
        decay_plain=1 - lr_value * weight_decay,
        decay_projected=1 - lr_value * weight_decay * wd_ratio, delta=delta,
        nesterov=nesterov, maximize=maximize,
    )
    _VIEWS.remember(params, views)


@native_adamp_.register_fake
def _(*args: Any, **kwargs: Any) -> None:
    return None


@torch.library.custom_op("scaleinv::native_sgdp_", mutates_args=_SGDP_MUTATES,
                         device_types="cpu")
def native_sgdp_(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], modes: list[int],
    lr: float, lr_tensor: Tensor | None, momentum: float, dampening: float, eps: float,
    weight_decay: float, delta: float, wd_ratio: float, nesterov: bool, maximize: bool,
    project_buffer: bool,
) -> None:
    """One SGDP step of CPU float32/float64 tensors by the C kernels."""
    lr_value = float(lr_tensor) if lr_tensor is not None else lr
    grads = [native_gradient(w, g) for w, g in zip(params, grads, strict=True)]
    views = _fused_cpu.sgdp_step(
        params, grads, momentum_buffers, _VIEWS.modes(params, modes), lr=lr_value,
        momentum=momentum, dampening=dampening, eps=eps,
        decay_plain=1 - lr_value * weight_decay / (1 - momentum),
        decay_projected=1 - lr_value * weight_decay * wd_ratio / (1 - momentum), delta=delta,
        nesterov=nesterov, project_buffer=project_buffer, maximize=maximize,
    )
    _VIEWS.remember(params, views)


@native_sgdp_.register_fake
def _(*args: Any, **kwargs: Any) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# Triton kernels (CUDA; CPU under TRITON_INTERPRET=1)


def _triton_columns(params: list[Tensor], grads: list[Tensor],
                    states: list[list[Tensor]]) -> list[list[Tensor]]:
    """The kernels' ``[ws, gs, *states]`` columns of tensors the caller checked they take."""
    launches, left = split_triton(params, grads, states)
    if left or len(launches) != 1 or launches[0][2] is not None:
        raise RuntimeError("scaleinv: the Triton operator was given tensors it cannot take")
    return launches[0][1]


@torch.library.custom_op("scaleinv::triton_adamp_", mutates_args=_ADAMP_MUTATES)
def triton_adamp_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], steps: list[Tensor], modes: list[int], lr: float,
    lr_tensor: Tensor | None, beta1: float, beta2: float, eps: float, weight_decay: float,
    delta: float, wd_ratio: float, nesterov: bool, maximize: bool,
    grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
) -> None:
    """One AdamP step by the Triton kernels (increments ``steps``; ``grad_scale`` and
    ``found_inf`` of a ``GradScaler`` are applied on the device)."""
    kernels = triton_kernels()
    assert kernels is not None  # the caller checked
    kernels.adamp_step(
        *_triton_columns(params, grads, [exp_avgs, exp_avg_sqs]), steps, modes,
        lr=lr_tensor if lr_tensor is not None else lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, wd_ratio=wd_ratio, delta=delta, nesterov=nesterov,
        maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
    )


@triton_adamp_.register_fake
def _(*args: Any, **kwargs: Any) -> None:
    return None


@torch.library.custom_op("scaleinv::triton_sgdp_", mutates_args=_SGDP_MUTATES)
def triton_sgdp_(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], modes: list[int],
    lr: float, lr_tensor: Tensor | None, momentum: float, dampening: float, eps: float,
    weight_decay: float, delta: float, wd_ratio: float, nesterov: bool, maximize: bool,
    project_buffer: bool, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
) -> None:
    """One SGDP step by the Triton kernels (``grad_scale``, ``found_inf`` as for AdamP)."""
    kernels = triton_kernels()
    assert kernels is not None  # the caller checked
    lr_value = float(lr_tensor) if lr_tensor is not None else lr
    kernels.sgdp_step(
        *_triton_columns(params, grads, [momentum_buffers]), modes, lr=lr_value,
        momentum=momentum, dampening=dampening, eps=eps,
        decay_plain=1 - lr_value * weight_decay / (1 - momentum),
        decay_projected=1 - lr_value * weight_decay * wd_ratio / (1 - momentum), delta=delta,
        nesterov=nesterov, maximize=maximize, project_buffer=project_buffer,
        grad_scale=grad_scale, found_inf=found_inf,
    )


@triton_sgdp_.register_fake
def _(*args: Any, **kwargs: Any) -> None:
    return None


_OPERATORS: dict[str, Any] = {
    "native_adamp_": native_adamp_, "native_sgdp_": native_sgdp_,
    "triton_adamp_": triton_adamp_, "triton_sgdp_": triton_sgdp_,
}


def run(name: str, *args: Any, lr: float | Tensor, **kwargs: Any) -> None:
    """Run operator ``name``: through the dispatcher while compiling (a graph node), else its
    implementation directly. ``lr`` may be a number or a one-element tensor."""
    lr_tensor = lr if isinstance(lr, Tensor) else None
    lr_value = 0.0 if lr_tensor is not None else float(lr)
    operator = _OPERATORS[name]
    call: Callable[..., None] = (
        operator if torch.compiler.is_compiling() else operator._init_fn)
    call(*args, lr=lr_value, lr_tensor=lr_tensor, **kwargs)
