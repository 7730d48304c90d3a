"""``scaleinv.integrations.timm.register()``: timm's factory builds our AdamP/SGDP, with timm's
defaults, and they step like timm's own copies (timm 1.0)."""

from __future__ import annotations

import sys

import pytest
import torch

from _timm import import_timm
from reference import assert_round_off_close
from scaleinv import SGDP, AdamP
from scaleinv.integrations import timm as scaleinv_timm


@pytest.fixture
def timm_registry():
    timm = import_timm()
    registry = timm.optim._optim_factory.default_registry
    saved = dict(registry._optimizers)
    yield timm
    registry._optimizers.clear()
    registry._optimizers.update(saved)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 5),
    )


def train(net: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 3, 8, 8, generator=generator)
        y = torch.randint(0, 5, (6,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize(("name", "cls", "kwargs"), [
    ("adamp", AdamP, dict(lr=1e-2, weight_decay=0.05)),
    ("sgdp", SGDP, dict(lr=0.1, weight_decay=1e-3)),
    ("cadamp", AdamP, dict(lr=1e-2, weight_decay=0.05)),
    ("csgdp", SGDP, dict(lr=0.1, weight_decay=1e-3)),
])
def test_factory_builds_ours_and_steps_like_timms(timm_registry, name, cls, kwargs) -> None:
    create = timm_registry.optim.create_optimizer_v2
    theirs_net = model()
    theirs = create(theirs_net, name, **kwargs)
    assert type(theirs).__module__.startswith("timm.")
    scaleinv_timm.register()
    ours_net = model()
    ours = create(ours_net, name, **kwargs)
    assert type(ours) is cls
    assert ours.defaults["nesterov"] is True
    if cls is AdamP:
        assert ours.defaults["wd_ratio"] == 0.01
    else:
        assert ours.defaults["momentum"] == 0.9
    # timm's groups: no weight decay on 1-D params, the rest with it
    assert sorted(g["weight_decay"] for g in ours.param_groups) == [0.0, kwargs["weight_decay"]]
    train(theirs_net, theirs, 8)
    train(ours_net, ours, 8)
    for mine, timms in zip(ours_net.parameters(), theirs_net.parameters(), strict=True):
        assert_round_off_close(mine, timms, 8)


def test_scaleinv_defaults_on_request(timm_registry) -> None:
    scaleinv_timm.register(timm_defaults=False)
    ours = timm_registry.optim.create_optimizer_v2(model(), "adamp")
    assert type(ours) is AdamP
    assert ours.defaults["wd_ratio"] == 0.1 and ours.defaults["nesterov"] is False
    sgdp = timm_registry.optim.create_optimizer_v2(model(), "sgdp", lr=0.1)
    assert sgdp.defaults["nesterov"] is False and sgdp.defaults["momentum"] == 0.9


def test_sgdp_without_lr_is_refused_like_timms(timm_registry) -> None:
    scaleinv_timm.register()
    with pytest.raises(ValueError, match="lr"):
        timm_registry.optim.create_optimizer_v2(model(), "sgdp")


def test_cautious_names_build_ours_with_caution(timm_registry) -> None:
    """``cadamp``/``csgdp`` become our classes with ``caution=True`` (their steps equal timm's:
    :func:`test_factory_builds_ours_and_steps_like_timms`); other names stay timm's."""
    scaleinv_timm.register()
    create = timm_registry.optim.create_optimizer_v2
    cadamp = create(model(), "cadamp")
    assert type(cadamp) is AdamP and cadamp.defaults["caution"] is True
    assert type(create(model(), "csgdp", lr=0.1)) is SGDP
    assert type(create(model(), "adamw")).__module__.startswith("torch.")
    scaleinv_timm.register(timm_defaults=False)
    assert create(model(), "cadamp").defaults["caution"] is True


def test_bad_argument() -> None:
    with pytest.raises(TypeError, match="timm_defaults"):
        scaleinv_timm.register(timm_defaults="yes")  # type: ignore[arg-type]


def test_clear_error_without_timm(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm.optim", None)  # import of timm.optim fails
    with pytest.raises(ImportError, match="pip install timm"):
        scaleinv_timm.register()
