"""timm's optimizer factory builds scaleinv's AdamP and SGDP: ``register()``.

::

    import timm.optim
    from scaleinv.integrations import timm as scaleinv_timm

    scaleinv_timm.register()
    optimizer = timm.optim.create_optimizer_v2(model, "adamp", lr=1e-3, weight_decay=0.05)
    # -> scaleinv.AdamP, with timm's defaults for "adamp": wd_ratio=0.01, nesterov=True

timm (an optional dependency) ships its own copies of AdamP and SGDP; ``register()`` replaces
the ``"adamp"`` and ``"sgdp"`` entries of timm's registry (``timm.optim._optim_factory
.default_registry``) with :class:`scaleinv.AdamP` and :class:`scaleinv.SGDP`. With
``timm_defaults=True`` (the default) the entries keep timm's defaults, so a timm training
script runs the same algorithm as before; ``timm_defaults=False`` uses scaleinv's (the paper's:
``wd_ratio=0.1, nesterov=False``). timm's ``caution=True`` variants (``"cadamp"``,
``"csgdp"``) become scaleinv's classes with ``caution=True``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register", "TIMM_DEFAULTS"]

#: timm's defaults for its entries (timm 1.0: ``timm.optim._optim_factory``); momentum 0.9 is
#: added by timm's factory itself for any optimizer with momentum.
TIMM_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamp": {"wd_ratio": 0.01, "nesterov": True},
    "sgdp": {"nesterov": True},
    "cadamp": {"wd_ratio": 0.01, "nesterov": True, "caution": True},
    "csgdp": {"nesterov": True, "caution": True},
}


def _optim_factory() -> Any:
    try:
        from timm.optim import _optim_factory
    except ImportError as error:
        raise ImportError(
            "scaleinv.integrations.timm needs timm: pip install timm"
        ) from error
    if not hasattr(_optim_factory, "default_registry"):
        raise ImportError(
            "scaleinv.integrations.timm needs timm >= 1.0 (an optimizer registry in "
            "timm.optim._optim_factory); pip install -U timm"
        )
    return _optim_factory


def register(*, timm_defaults: bool = True) -> None:
    """Make ``timm.optim.create_optimizer_v2(model, "adamp" | "sgdp" | "cadamp" | "csgdp")``
    build scaleinv's classes.

    Args:
        timm_defaults: keep timm's defaults for these names (``adamp``: ``wd_ratio=0.01,
            nesterov=True``; ``sgdp``: ``nesterov=True``); ``False``: scaleinv's defaults.
            Arguments given to ``create_optimizer_v2`` override either.
    """
    if not isinstance(timm_defaults, bool):
        raise TypeError(f"Invalid timm_defaults: expected a bool, got {type(timm_defaults)!r}")
    factory = _optim_factory()
    from scaleinv import SGDP, AdamP

    entries = [
        ("adamp", AdamP, "scaleinv.AdamP: Adam with the radial part of the update removed on "
         "scale-invariant weights", dict(has_betas=True)),
        ("sgdp", SGDP, "scaleinv.SGDP: SGD with momentum, radial part of the update removed on "
         "scale-invariant weights", dict(has_momentum=True)),
    ]
    entries += [
        (f"c{name}", cls, f"{description}, cautious update (caution=True)", flags)
        for name, cls, description, flags in entries
    ]
    for name, cls, description, flags in entries:
        if timm_defaults:
            defaults: dict[str, Any] | None = dict(TIMM_DEFAULTS[name])
        else:
            defaults = {"caution": True} if name.startswith("c") else None
        factory.default_registry.register(
            factory.OptimInfo(name=name, opt_class=cls, description=description,
                              defaults=defaults, **flags)
        )
