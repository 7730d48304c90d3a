"""AdamP: Adam with the radial part of the update removed on scale-invariant weights."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias, cast, overload

import torch
from torch import Tensor
from torch.optim import Optimizer

from scaleinv import backends
from scaleinv._common import (
    ScaleInvariantOptimizer,
    as_step_counter,
    check_number,
    new_state,
    new_step_counter,
    nonempty,
    run_bodies,
    step_value,
)
from scaleinv.fused import fused_adamp
from scaleinv.projection import (
    ScaleInvariant,
    cautious_,
    project_radial_,
    radial_coefficients,
    select_view,
    validate_scale_invariant,
    weight_decay_ratio,
)

__all__ = ["AdamP", "adamp"]


def _step_on_device(group: dict[str, Any], p: Tensor) -> bool:
    """Step counters live on the param's device for capturable or fused groups (as in
    ``torch.optim.Adam``; ``fused=None`` as :func:`scaleinv.backends.resolve_fused` decides): a
    fused step then reads no counter on the host."""
    return bool(group["capturable"]) or backends.resolve_fused(group["fused"], group["foreach"],
                                                               [p])


class AdamP(ScaleInvariantOptimizer):
    r"""AdamP (Heo et al., ICLR 2021), numerically faithful to the official ``adamp`` 0.3.0.

    Per tensor ``w`` with gradient ``g``::

        m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2 ;  t += 1
        p = m / (sqrt(v) / sqrt(1 - b2^t) + eps)      (nesterov: b1 m + (1 - b1) g for m)
        p, r = project(w, g, p)                         # r = wd_ratio if projected else 1
        w = w (1 - lr weight_decay r) - lr / (1 - b1^t) p

    ``project`` removes the radial part of ``p`` per output channel or for the whole tensor when
    the cosine test (or the group's ``scale_invariant`` annotation) says ``w`` is
    scale-invariant; see :mod:`scaleinv.projection`.

    Args:
        params: parameters or param groups.
        lr: learning rate, ``>= 0``.
        betas: ``(b1, b2)``, each in ``[0, 1)``.
        eps: added to the denominator and to the norms of the projection, ``>= 0``.
        weight_decay: decoupled weight decay, ``>= 0``.
        delta: threshold of the cosine test, ``> 0``.
        wd_ratio: weight-decay multiplier for projected tensors, in ``[0, 1]``.
        nesterov: Nesterov momentum in the update direction.
        maximize: maximise the objective (``p.grad`` itself is left unchanged).
        foreach: multi-tensor, sync-free body; ``None`` picks like ``torch.optim``.
        capturable: keep step counters on the device so a step can be captured in a CUDA graph.
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
            0/0), at 4 more bytes per element (2 moments). ``False``: state in the param's dtype.
        caution: the cautious update of timm's ``cadamp``/``csgdp`` (Liang et al., 2024): update
            entries whose sign disagrees with the gradient's are dropped and the rest rescaled,
            in the spherical form on projected tensors (:func:`scaleinv.projection.cautious_`).
            Runs on the single-tensor body (host decisions; slower on a GPU).
    """

    option_defaults: dict[str, Any] = dict(
        maximize=False, foreach=None, capturable=False, fused=None, scale_invariant="auto",
        allow_flat_params=False, float32_state=True, caution=False,
    )

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        scale_invariant: ScaleInvariant = "auto",
        allow_flat_params: bool = False,
        fused: bool | None = None,
        float32_state: bool = True,
        caution: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta,
            wd_ratio=wd_ratio, nesterov=nesterov, maximize=maximize, foreach=foreach,
            capturable=capturable, scale_invariant=scale_invariant,
            allow_flat_params=allow_flat_params, fused=fused,
            float32_state=float32_state, caution=caution,
        )
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def check_hyperparameters(options: dict[str, Any]) -> None:
        """Raise ``ValueError``/``TypeError`` for a hyperparameter out of its range."""
        check_number("lr", options["lr"], low=0.0)
        betas = options["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
        check_number("betas[0]", betas[0], low=0.0, high=1.0)
        check_number("betas[1]", betas[1], low=0.0, high=1.0)
        check_number("eps", options["eps"], low=0.0)
        check_number("weight_decay", options["weight_decay"], low=0.0)
        check_number("delta", options["delta"], low=0.0, low_open=True)
        check_number("wd_ratio", options["wd_ratio"], low=0.0, high=1.0, high_open=False)
        validate_scale_invariant(options["scale_invariant"])
        for flag in ("float32_state", "caution"):
            if not isinstance(options.get(flag, False), bool):
                raise TypeError(f"Invalid {flag}: {options[flag]!r}; expected a bool")
        if options["capturable"] and options["foreach"] is False:
            raise ValueError(
                "capturable=True needs the sync-free multi-tensor body: pass foreach=True or None"
            )
        if options["fused"] and options["foreach"]:
            raise ValueError("fused=True and foreach=True cannot be used together")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state:
                    p_state["step"] = as_step_counter(p_state["step"], p,
                                                      _step_on_device(group, p))

    def _init_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
        exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[Tensor],
    ) -> None:
        for p in group["params"]:
            if p.grad is None or p.numel() == 0:  # an empty tensor has nothing to step
                continue
            state = self.state[p]
            if len(state) == 0:
                state["step"] = new_step_counter(p, _step_on_device(group, p))
                state["exp_avg"] = new_state(p, group)
                state["exp_avg_sq"] = new_state(p, group)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])

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
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, steps)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adamp(
                params, grads, exp_avgs, exp_avg_sqs, steps, backend=body,
                grad_scale=grad_scale, found_inf=found_inf,
                # counters left on the device by a fused step: the multi-tensor body keeps them
                capturable=group["capturable"] or (body == "foreach"
                                                   and steps[0].device.type != "cpu"),
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], delta=group["delta"],
                wd_ratio=group["wd_ratio"], nesterov=group["nesterov"],
                maximize=group["maximize"], scale_invariant=group["scale_invariant"],
                caution=group["caution"],
            )
        return loss


def adamp(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool = False,
    capturable: bool = False,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
    maximize: bool,
    scale_invariant: ScaleInvariant = "auto",
    fused: bool | None = None,
    backend: str | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    caution: bool = False,
) -> None:
    """Functional AdamP over lists of tensors (see :class:`AdamP` for the maths).

    ``backend`` names the body (:mod:`scaleinv.backends`: ``"reference"``, ``"foreach"``, a
    fused backend, or ``"fused"`` for the fused path's choice); without it ``fused`` and
    ``foreach`` choose. Empty tensors are skipped. ``grad_scale`` and ``found_inf`` (from a
    ``torch.amp.GradScaler``): the gradients are divided by ``grad_scale``, and nothing
    changes where ``found_inf`` is nonzero (:mod:`scaleinv._amp`).
    """
    if backend is None:
        backend = "fused" if fused else "foreach" if foreach else "reference"
    tensors = nonempty(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if not tensors[0]:
        return
    hyper: dict[str, Any] = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, delta=delta,
        wd_ratio=wd_ratio, nesterov=nesterov, maximize=maximize, scale_invariant=scale_invariant,
    )
    run_bodies(
        tensors, backend=backend, caution=caution, grad_scale=grad_scale, found_inf=found_inf,
        single=functools.partial(_single_tensor_adamp, capturable=capturable),
        multi=_multi_tensor_adamp, fused=fused_adamp, hyper=hyper,
        # counters left on the device (by a fused step) keep the multi-tensor body sync-free
        multi_options=lambda ts: {"capturable": capturable or ts[4][0].device.type != "cpu"},
    )


def _single_tensor_adamp(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *, capturable: bool, lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, delta: float, wd_ratio: float,
    nesterov: bool, maximize: bool, scale_invariant: ScaleInvariant, caution: bool = False,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True
    ):
        if maximize:
            grad = -grad
        if torch.is_complex(param):
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)

        step_t += 1
        step = step_value(step_t)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step

        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        step_size = lr / bias_correction1

        if nesterov:
            perturb = (beta1 * exp_avg + (1 - beta1) * grad) / denom
        else:
            perturb = exp_avg / denom

        ratio = 1.0
        view = select_view(param, grad, scale_invariant, delta, eps)
        if view is not None:
            project_radial_(perturb, param, view, eps)
            ratio = wd_ratio
        if caution:
            cautious_(perturb, grad, param, view, eps)

        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay * ratio)
        param.add_(perturb, alpha=-step_size)  # type: ignore[arg-type]  # a tensor when compiling


# What torch._foreach_* take and give (the out-of-place ones return tuples).
_TensorList: TypeAlias = list[Tensor] | tuple[Tensor, ...]


def _multi_tensor_adamp(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *, capturable: bool, lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, delta: float, wd_ratio: float,
    nesterov: bool, maximize: bool, scale_invariant: ScaleInvariant,
) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, state_steps]  # type: ignore[list-item]
    )
    for lists, _ in grouped.values():
        # torch types the lists as holding None (its grads may be missing); ours are all tensors.
        d_params, d_grads_in, d_exp_avgs, d_exp_avg_sqs, d_steps = cast(list[list[Tensor]], lists)
        d_grads: _TensorList = d_grads_in
        d_params = [torch.view_as_real(p) if torch.is_complex(p) else p for p in d_params]
        d_exp_avgs = [torch.view_as_real(m) if torch.is_complex(m) else m for m in d_exp_avgs]
        d_exp_avg_sqs = [
            torch.view_as_real(v) if torch.is_complex(v) else v for v in d_exp_avg_sqs
        ]
        if maximize:
            d_grads = torch._foreach_neg(d_grads)
        d_grads = [torch.view_as_real(g) if torch.is_complex(g) else g for g in d_grads]

        torch._foreach_add_(d_steps, 1)
        torch._foreach_mul_(d_exp_avgs, beta1)
        torch._foreach_add_(d_exp_avgs, d_grads, alpha=1 - beta1)
        torch._foreach_mul_(d_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(d_exp_avg_sqs, d_grads, d_grads, value=1 - beta2)

        denom = torch._foreach_sqrt(d_exp_avg_sqs)
        if capturable:
            bias_correction1 = torch._foreach_pow(beta1, d_steps)
            torch._foreach_neg_(bias_correction1)
            torch._foreach_add_(bias_correction1, 1)
            bias_correction2 = torch._foreach_pow(beta2, d_steps)
            torch._foreach_neg_(bias_correction2)
            torch._foreach_add_(bias_correction2, 1)
            torch._foreach_sqrt_(bias_correction2)
            torch._foreach_div_(denom, bias_correction2)
            step_sizes: list[Any] | tuple[Any, ...] = torch._foreach_div(bias_correction1, lr)
            torch._foreach_reciprocal_(step_sizes)
        else:
            step_counts = [step_value(s) for s in d_steps]
            torch._foreach_div_(denom, [(1 - beta2**s) ** 0.5 for s in step_counts])
            step_sizes = [lr / (1 - beta1**s) for s in step_counts]
        torch._foreach_add_(denom, eps)

        if nesterov:
            perturb = torch._foreach_mul(d_exp_avgs, beta1)
            torch._foreach_add_(perturb, d_grads, alpha=1 - beta1)
            torch._foreach_div_(perturb, denom)
        else:
            perturb = torch._foreach_div(d_exp_avgs, denom)

        # w <- w * (1 - lr wd r + step_size s) - step_size p: decay and projection in one pass.
        plain_decay = 1 - lr * weight_decay
        decay: list[Any] = [plain_decay] * len(d_params)
        testable = [i for i, p in enumerate(d_params) if p.dim() >= 2]
        if testable and scale_invariant is not False:
            coefficients, projected = radial_coefficients(
                [d_params[i] for i in testable], [d_grads[i] for i in testable],
                [perturb[i] for i in testable],
                scale_invariant=scale_invariant, delta=delta, eps=eps,
            )
            for i, coef, was_projected in zip(testable, coefficients, projected, strict=True):
                ratio = weight_decay_ratio(was_projected, wd_ratio, coef.dtype)
                decay[i] = (1 - lr * weight_decay * ratio) + step_sizes[i] * coef
        for p, factor in zip(d_params, decay, strict=True):
            if isinstance(factor, Tensor):
                p.mul_(factor)
        plain = [
            p for p, factor in zip(d_params, decay, strict=True) if not isinstance(factor, Tensor)
        ]
        if weight_decay != 0 and plain:
            torch._foreach_mul_(plain, plain_decay)
        torch._foreach_mul_(perturb, step_sizes)
        torch._foreach_sub_(d_params, perturb)
