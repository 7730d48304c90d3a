"""scaleinv: momentum optimizers that behave on scale-invariant weights (SGDP, AdamP).

The functional forms live beside their classes, as in ``torch.optim``:
``scaleinv.adamp.adamp`` and ``scaleinv.sgdp.sgdp``.
"""

from scaleinv.adamp import AdamP
from scaleinv.sgdp import SGDP
from scaleinv.wrap import project

__all__ = ["AdamP", "SGDP", "project"]
__version__ = "0.1.0"
