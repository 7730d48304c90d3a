"""What a ``torch.amp.GradScaler`` step asks of a body: divide the gradients by ``grad_scale``
and make no change at all where ``found_inf`` is set.

The Triton kernels do both on the device (no host read). The other bodies read ``found_inf``
once on the host (free on a CPU, one wait on CUDA) and step unscaled copies of the gradients;
``p.grad`` keeps its scaled values either way, as with ``torch.optim.Adam(fused=True)``.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["skip_step", "unscaled"]


def skip_step(found_inf: Tensor | None) -> bool:
    """Whether ``found_inf`` says to skip the step (reads one element on the host)."""
    return found_inf is not None and bool(found_inf)


def unscaled(grads: list[Tensor], grad_scale: Tensor | None) -> list[Tensor]:
    """``grads / grad_scale`` as new tensors, or ``grads`` where there is no scale."""
    if grad_scale is None or not grads:
        return grads
    return [g / grad_scale.to(g.device) for g in grads]
