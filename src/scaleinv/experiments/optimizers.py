"""The optimizers the experiments compare, built from one set of hyperparameters per task.

Each "P" optimizer gets exactly the hyperparameters of its base optimizer:

========  ==========================================  ======================================
name      optimizer                                   pairs with
========  ==========================================  ======================================
sgd       ``torch.optim.SGD`` (momentum, nesterov)     sgdp
sgdp      :class:`scaleinv.SGDP`                       sgd
adam      ``torch.optim.Adam`` (``adam_weight_decay``) adamp when ``weight_decay`` is 0 too
adamw     ``torch.optim.AdamW``                        adamp
adamp     :class:`scaleinv.AdamP`                      adamw
radam(p)  ``torch.optim.RAdam`` (decoupled decay)      ``scaleinv.project(RAdam)``
nadam(p)  ``torch.optim.NAdam`` (decoupled decay)      ``scaleinv.project(NAdam)``
========  ==========================================  ======================================

SGD's weight decay is coupled (added to the gradient) as in ``torch.optim.SGD``; SGDP applies it
decoupled as ``lr * weight_decay / (1 - momentum)`` per step, the same amount in steady state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from scaleinv.adamp import AdamP
from scaleinv.sgdp import SGDP

__all__ = [
    "OPTIMIZER_NAMES",
    "PROJECTED",
    "OptimizerSettings",
    "make_optimizer",
    "parse_optimizers",
]


@dataclass(frozen=True)
class OptimizerSettings:
    """Hyperparameters of one task, shared by each optimizer and its "P" version.

    Defaults follow the paper's practice: SGD lr 0.1, momentum 0.9, Nesterov, weight decay 1e-4;
    Adam-family lr 1e-3, betas (0.9, 0.999); decoupled weight decay 1e-2 for AdamW/AdamP (the
    ``adamp`` README's value) and none for plain Adam; ``delta = 0.1``, ``wd_ratio = 0.1``.
    """

    sgd_lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    sgd_weight_decay: float = 1e-4
    adam_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 0.0
    adamw_weight_decay: float = 1e-2
    delta: float = 0.1
    wd_ratio: float = 0.1

    def describe(self, name: str) -> str:
        """The hyperparameters ``name`` runs with, as one line."""
        if name in ("sgd", "sgdp"):
            text = (f"lr {self.sgd_lr:g}, momentum {self.momentum:g}, "
                    f"nesterov {self.nesterov}, weight decay {self.sgd_weight_decay:g}")
        else:
            decay = self.adam_weight_decay if name == "adam" else self.adamw_weight_decay
            text = f"lr {self.adam_lr:g}, betas {self.betas}, weight decay {decay:g}"
        if name in PROJECTED:
            text += f", delta {self.delta:g}, wd_ratio {self.wd_ratio:g}"
        return text


def _sgd(params: Iterable[Tensor], s: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=s.sgd_lr, momentum=s.momentum, nesterov=s.nesterov,
                           weight_decay=s.sgd_weight_decay)


def _sgdp(params: Iterable[Tensor], s: OptimizerSettings) -> torch.optim.Optimizer:
    return SGDP(params, lr=s.sgd_lr, momentum=s.momentum, nesterov=s.nesterov,
                weight_decay=s.sgd_weight_decay, delta=s.delta, wd_ratio=s.wd_ratio)


def _adam(params: Iterable[Tensor], s: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=s.adam_lr, betas=s.betas, weight_decay=s.adam_weight_decay)


def _adamw(params: Iterable[Tensor], s: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=s.adam_lr, betas=s.betas,
                             weight_decay=s.adamw_weight_decay)


def _adamp(params: Iterable[Tensor], s: OptimizerSettings) -> torch.optim.Optimizer:
    return AdamP(params, lr=s.adam_lr, betas=s.betas, weight_decay=s.adamw_weight_decay,
                 delta=s.delta, wd_ratio=s.wd_ratio)


def _torch_adam_variant(kind: str, project: bool) -> Callable[..., Any]:
    def build(params: Iterable[Tensor], s: OptimizerSettings) -> Any:
        base = getattr(torch.optim, kind)(
            params, lr=s.adam_lr, betas=s.betas, weight_decay=s.adamw_weight_decay,
            decoupled_weight_decay=True,
        )
        if not project:
            return base
        try:
            from scaleinv.wrap import project as add_projection
        except ImportError as error:  # pragma: no cover - depends on the installed version
            raise RuntimeError(
                f"{kind.lower()}p needs scaleinv.wrap.project, which this installation lacks"
            ) from error
        return add_projection(base, delta=s.delta, wd_ratio=s.wd_ratio)

    return build


_BUILDERS: dict[str, Callable[[Iterable[Tensor], OptimizerSettings], Any]] = {
    "sgd": _sgd,
    "sgdp": _sgdp,
    "adam": _adam,
    "adamw": _adamw,
    "adamp": _adamp,
    "radam": _torch_adam_variant("RAdam", project=False),
    "radamp": _torch_adam_variant("RAdam", project=True),
    "nadam": _torch_adam_variant("NAdam", project=False),
    "nadamp": _torch_adam_variant("NAdam", project=True),
}

OPTIMIZER_NAMES: tuple[str, ...] = tuple(_BUILDERS)
PROJECTED: frozenset[str] = frozenset({"sgdp", "adamp", "radamp", "nadamp"})


def make_optimizer(name: str, params: Iterable[Tensor], settings: OptimizerSettings) -> Any:
    """Build optimizer ``name`` over ``params`` with the task's ``settings``."""
    if name not in _BUILDERS:
        raise ValueError(f"Unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZER_NAMES)}")
    return _BUILDERS[name](params, settings)


def parse_optimizers(text: str) -> tuple[str, ...]:
    """``"sgd,sgdp"`` -> ``("sgd", "sgdp")``; unknown or repeated names raise ``ValueError``."""
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not names:
        raise ValueError(f"No optimizer given; allowed: {', '.join(OPTIMIZER_NAMES)}")
    unknown = [n for n in names if n not in _BUILDERS]
    if unknown:
        raise ValueError(
            f"Unknown optimizer(s) {', '.join(unknown)}; allowed: {', '.join(OPTIMIZER_NAMES)}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"Optimizer(s) given more than once: {', '.join(repeated)}")
    return names
