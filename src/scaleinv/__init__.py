"""scaleinv: momentum optimizers that behave on scale-invariant weights (SGDP, AdamP)."""

from scaleinv.adamp import AdamP, adamp
from scaleinv.sgdp import SGDP, sgdp
from scaleinv.wrap import project

__all__ = ["AdamP", "SGDP", "adamp", "project", "sgdp"]
__version__ = "0.1.0"
