"""scaleinv: momentum optimizers that behave on scale-invariant weights (SGDP, AdamP).

The functional forms live beside their classes, as in ``torch.optim``:
``scaleinv.adamp.adamp`` and ``scaleinv.sgdp.sgdp``.

The top-level names are imported on first use, so that ``import scaleinv.optax`` and
``scaleinv --help`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scaleinv.adamp import AdamP
    from scaleinv.sgdp import SGDP
    from scaleinv.wrap import project

__all__ = ["AdamP", "SGDP", "project"]
__version__ = "0.1.0"

_LAZY = {"AdamP": "scaleinv.adamp", "SGDP": "scaleinv.sgdp", "project": "scaleinv.wrap"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'scaleinv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
