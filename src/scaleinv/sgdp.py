"""SGDP: SGD with momentum, minus the radial part of the update on scale-invariant weights."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast, overload

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import required

from scaleinv._common import (
    ScaleInvariantOptimizer,
    check_number,
    new_state,
    nonempty,
    run_bodies,
)
from scaleinv.fused import fused_sgdp
from scaleinv.projection import (
    ScaleInvariant,
    cautious_,
    project_radial_,
    radial_coefficients,
    select_view,
    validate_scale_invariant,
    weight_decay_ratio,
)

__all__ = ["SGDP", "sgdp"]


class SGDP(ScaleInvariantOptimizer):
    r"""SGDP (Heo et al., ICLR 2021), numerically faithful to the official ``adamp`` 0.3.0.

    Per tensor ``w`` with gradient ``g`` (the buffer starts at zero, unlike ``torch.optim.SGD``)::

        buf = momentum buf + (1 - dampening) g
        p = g + momentum buf if nesterov else buf
        p, r = project(w, g, p)                  # r = wd_ratio if projected else 1
        w = w (1 - lr weight_decay r / (1 - momentum)) - lr p

    By default only the update is projected, as in the paper. The official code, without
    nesterov, projects the momentum buffer itself in place (the stored buffer loses its radial
    part too); ``project_momentum=True`` reproduces that exactly.

    Args:
        params: parameters or param groups.
        lr: learning rate, ``>= 0``; required, here or in every param group.
        momentum: momentum factor, in ``[0, 1)``.
        dampening: dampening of the gradient in the buffer, in ``[0, 1]``.
        weight_decay: decoupled weight decay, ``>= 0``.
        nesterov: Nesterov momentum (needs ``dampening == 0`` when ``momentum > 0``; with
            ``momentum == 0`` the update is the gradient, as in ``adamp`` 0.3.0).
        eps: added to the norms of the cosine test and the projection, ``>= 0``.
        delta: threshold of the cosine test, ``> 0``.
        wd_ratio: weight-decay multiplier for projected tensors, in ``[0, 1]``.
        project_momentum: also strip the radial part from the stored buffer (official quirk).
        maximize: maximise the objective (``p.grad`` itself is left unchanged).
        foreach: multi-tensor, sync-free body; ``None`` picks like ``torch.optim``.
        fused: the fused path (:mod:`scaleinv.fused`: Triton kernels on CUDA, C kernels on CPU,
            compiled kernels elsewhere). ``None``: fused for CUDA params where Triton is
            installed, unless ``foreach`` is given; else ``False``. The kernels are custom
            operators, so ``torch.compile(optimizer.step)`` runs them too.
            Not with ``foreach=True``.
        scale_invariant: ``"auto"`` (cosine test), ``"channel"``, ``"layer"`` or ``False``.
        allow_flat_params: step flat 1-D shards (FSDP1, DeepSpeed ZeRO) without projection, with
            a warning, instead of refusing them; see ``docs/distributed.md``.
        float32_state: keep the state of float16/bfloat16 params in float32 (default): pure
            16-bit training then stays finite with the default ``eps`` (in 16 bits ``eps=1e-8``
            and small second moments underflow to 0, and ``m / (sqrt(v) + eps)`` becomes
            0/0), at 4 more bytes per element (1 buffer). ``False``: state in the param's dtype.
        caution: the cautious update of timm's ``cadamp``/``csgdp`` (Liang et al., 2024): update
            entries whose sign disagrees with the gradient's are dropped and the rest rescaled,
            in the spherical form on projected tensors (:func:`scaleinv.projection.cautious_`).
            Runs on the single-tensor body (host decisions; slower on a GPU).
    """

    option_defaults: dict[str, Any] = dict(
        project_momentum=False, maximize=False, foreach=None, fused=None,
        scale_invariant="auto", allow_flat_params=False, float32_state=True, caution=False,
    )

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = required,  # type: ignore[assignment]  # torch's sentinel
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        *,
        project_momentum: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        scale_invariant: ScaleInvariant = "auto",
        allow_flat_params: bool = False,
        fused: bool | None = None,
        float32_state: bool = True,
        caution: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio,
            project_momentum=project_momentum, maximize=maximize, foreach=foreach,
            scale_invariant=scale_invariant, allow_flat_params=allow_flat_params, fused=fused,
            float32_state=float32_state, caution=caution,
        )
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def check_hyperparameters(options: dict[str, Any]) -> None:
        """Raise ``ValueError``/``TypeError`` for a hyperparameter out of its range."""
        momentum, dampening = options["momentum"], options["dampening"]
        if options["lr"] is not required:  # no default: every group gives its own
            check_number("lr", options["lr"], low=0.0)
        check_number("momentum", momentum, low=0.0, high=1.0)
        check_number("dampening", dampening, low=0.0, high=1.0, high_open=False)
        check_number("weight_decay", options["weight_decay"], low=0.0)
        check_number("eps", options["eps"], low=0.0)
        check_number("delta", options["delta"], low=0.0, low_open=True)
        check_number("wd_ratio", options["wd_ratio"], low=0.0, high=1.0, high_open=False)
        if options["nesterov"] and momentum != 0 and dampening != 0:
            raise ValueError("Nesterov momentum requires zero dampening")
        validate_scale_invariant(options["scale_invariant"])
        if options.get("caution") and options["project_momentum"]:
            raise ValueError("caution=True cannot be combined with project_momentum=True (the "
                             "mask applies to the update, not the stored buffer)")
        for flag in ("float32_state", "caution"):
            if not isinstance(options.get(flag, False), bool):
                raise TypeError(f"Invalid {flag}: {options[flag]!r}; expected a bool")
        if options["fused"] and options["foreach"]:
            raise ValueError("fused=True and foreach=True cannot be used together")

    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step; ``closure`` re-evaluates the model, returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        bodies = self.check_step()
        grad_scale, found_inf = self.amp_scaling()
        for group, body in zip(self.param_groups, bodies, strict=True):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor] = []
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:  # an empty tensor has nothing to step
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["momentum"] = new_state(p, group)
                params.append(p)
                grads.append(p.grad)
                buffers.append(state["momentum"])
            if not params:
                continue
            sgdp(
                params, grads, buffers, backend=body,
                grad_scale=grad_scale, found_inf=found_inf,
                lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                eps=group["eps"], delta=group["delta"], wd_ratio=group["wd_ratio"],
                project_momentum=group["project_momentum"], maximize=group["maximize"],
                scale_invariant=group["scale_invariant"],
                caution=group["caution"],
            )
        return loss


def sgdp(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    foreach: bool = False,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
    project_momentum: bool = False,
    maximize: bool = False,
    scale_invariant: ScaleInvariant = "auto",
    fused: bool | None = None,
    backend: str | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    caution: bool = False,
) -> None:
    """Functional SGDP over lists of tensors (see :class:`SGDP` for the maths; ``backend``,
    ``fused``, ``foreach``, ``grad_scale`` and ``found_inf`` as in
    :func:`scaleinv.adamp.adamp`). Empty tensors are skipped."""
    if backend is None:
        backend = "fused" if fused else "foreach" if foreach else "reference"
    tensors = nonempty(params, grads, momentum_buffers)
    if not tensors[0]:
        return
    hyper: dict[str, Any] = dict(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio,
        project_momentum=project_momentum, maximize=maximize, scale_invariant=scale_invariant,
    )
    run_bodies(
        tensors, backend=backend, caution=caution, grad_scale=grad_scale, found_inf=found_inf,
        single=_single_tensor_sgdp, multi=_multi_tensor_sgdp, fused=fused_sgdp, hyper=hyper,
    )


def _single_tensor_sgdp(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, lr: float,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool, eps: float,
    delta: float, wd_ratio: float, project_momentum: bool, maximize: bool,
    scale_invariant: ScaleInvariant, caution: bool = False,
) -> None:
    for param, grad, buf in zip(params, grads, momentum_buffers, strict=True):
        if maximize:
            grad = -grad
        if torch.is_complex(param):
            param, grad, buf = (torch.view_as_real(t) for t in (param, grad, buf))

        buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        update = grad + momentum * buf if nesterov else buf

        ratio = 1.0
        view = select_view(param, grad, scale_invariant, delta, eps)
        if caution and update is buf:
            update = buf.clone(memory_format=torch.preserve_format)
        if view is not None:
            if update is buf and not project_momentum:
                update = buf.clone(memory_format=torch.preserve_format)
            project_radial_(update, param, view, eps)
            ratio = wd_ratio
        if caution:
            cautious_(update, grad, param, view, eps)

        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay * ratio / (1 - momentum))
        param.add_(update, alpha=-lr)


def _multi_tensor_sgdp(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, lr: float,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool, eps: float,
    delta: float, wd_ratio: float, project_momentum: bool, maximize: bool,
    scale_invariant: ScaleInvariant,
) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, momentum_buffers]  # type: ignore[list-item]
    )
    project_buffer = project_momentum and not nesterov
    for lists, _ in grouped.values():
        # torch types the lists as holding None (its grads may be missing); ours are all tensors.
        d_params, d_grads, d_bufs = cast(list[list[Tensor]], lists)
        d_params, d_grads, d_bufs = (
            [torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors]
            for tensors in (d_params, torch._foreach_neg(d_grads) if maximize else d_grads, d_bufs)
        )

        torch._foreach_mul_(d_bufs, momentum)
        torch._foreach_add_(d_bufs, d_grads, alpha=1 - dampening)
        updates = torch._foreach_add(d_grads, d_bufs, alpha=momentum) if nesterov else d_bufs

        # w <- w * (1 - lr wd r / (1 - momentum) + lr s) - lr p: decay and projection in one pass.
        plain_decay = 1 - lr * weight_decay / (1 - momentum)
        decay: list[Any] = [plain_decay] * len(d_params)
        testable = [i for i, p in enumerate(d_params) if p.dim() >= 2]
        if testable and scale_invariant is not False:
            coefficients, projected = radial_coefficients(
                [d_params[i] for i in testable], [d_grads[i] for i in testable],
                [updates[i] for i in testable],
                scale_invariant=scale_invariant, delta=delta, eps=eps,
            )
            for i, coef, was_projected in zip(testable, coefficients, projected, strict=True):
                ratio = weight_decay_ratio(was_projected, wd_ratio, d_params[i].dtype)
                decay[i] = 1 - lr * weight_decay * ratio / (1 - momentum)
                if project_buffer:
                    d_bufs[i].sub_(d_params[i] * coef)
                else:
                    decay[i] = decay[i] + lr * coef
        for p, factor in zip(d_params, decay, strict=True):
            if isinstance(factor, Tensor):
                p.mul_(factor)
        plain = [
            p for p, factor in zip(d_params, decay, strict=True) if not isinstance(factor, Tensor)
        ]
        if weight_decay != 0 and plain:
            torch._foreach_mul_(plain, plain_decay)
        torch._foreach_add_(d_params, updates, alpha=-lr)
