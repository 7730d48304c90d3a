"""AdamP and SGDP for JAX, as optax transformations (``pip install 'scaleinv[jax]'``).

``adamp`` and ``sgdp`` give the steps of ``scaleinv.AdamP`` and ``scaleinv.SGDP``; ``project``
adds the radial projection to any optax transformation. Nothing here imports torch.
"""

from scaleinv.optax.transforms import (
    ScaleByAdamPState,
    ScaleBySGDPState,
    adamp,
    project,
    scale_by_adamp,
    scale_by_sgdp,
    sgdp,
)

__all__ = [
    "ScaleByAdamPState",
    "ScaleBySGDPState",
    "adamp",
    "project",
    "scale_by_adamp",
    "scale_by_sgdp",
    "sgdp",
]
