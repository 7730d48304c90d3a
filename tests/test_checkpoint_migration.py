"""Signatures as in ``adamp`` 0.3.0 / ``torch.optim`` and checkpoints of other optimizers.

Each foreign checkpoint is continued by ours and by the official ``adamp`` 0.3.0 given the same
state by hand (the definition of "continues correctly"); the ones that cannot continue as the
same algorithm are refused at ``load_state_dict``, leaving the optimizer untouched.
"""

from __future__ import annotations

import io

import adamp as official
import pytest
import torch

from _timm import import_timm
from reference import Driven, assert_round_off_close, copy_params, initial_params, run_lockstep
from scaleinv import SGDP, AdamP

SHAPES = [(4, 5), (3, 2, 3), (6,), (5, 4)]
KINDS = ["channel", "layer", "random", "random"]
FIRST, SECOND = 4, 6


def through_file(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # int steps of adamp-style checkpoints


# --- signatures -------------------------------------------------------------------------------


def test_sgdp_lr_in_groups_only() -> None:
    w, b = copy_params(initial_params([(4, 5), (5,)], seed=1))
    optimizer = SGDP([{"params": [w], "lr": 0.1}, {"params": [b], "lr": 0.2}], momentum=0.9)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.2]
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    before = b.detach().clone()
    optimizer.step()
    torch.testing.assert_close(b.detach(), before - 0.2)


def test_sgdp_group_without_lr_and_no_default_is_refused() -> None:
    w, b = copy_params(initial_params([(4, 5), (5,)], seed=1))
    with pytest.raises(ValueError, match="lr"):
        SGDP([{"params": [w], "lr": 0.1}, {"params": [b]}], momentum=0.9)
    with pytest.raises(ValueError, match="lr"):
        SGDP([w])
    optimizer = SGDP([{"params": [w], "lr": 0.1}])
    with pytest.raises(ValueError, match="lr"):
        optimizer.add_param_group({"params": [b]})
    with pytest.raises(ValueError, match=r"lr.*\[0, inf\)"):
        optimizer.add_param_group({"params": [b], "lr": -1.0})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("impl", ["single", "foreach", "fused"])
@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgdp_nesterov_without_momentum_matches_adamp_0_3_0(impl: str, dampening: float) -> None:
    """``nesterov=True, momentum=0``: refused before; adamp 0.3.0 steps ``w -= lr g``."""
    init = initial_params(SHAPES, seed=3)
    hp = dict(lr=0.5, momentum=0.0, dampening=dampening, weight_decay=1e-2, nesterov=True)
    ours_params, ref_params = copy_params(init), copy_params(init)
    options = {"single": dict(foreach=False, fused=False), "foreach": dict(foreach=True),
               "fused": dict(fused=True)}[impl]
    ours = Driven(SGDP(ours_params, **hp, **options), ours_params)
    ref = Driven(official.SGDP(ref_params, **hp), ref_params)
    run_lockstep([ref, ours], KINDS, steps=FIRST + SECOND, seed=4)
    for actual, expected in zip(ours_params, ref_params, strict=True):
        assert_round_off_close(actual, expected, FIRST + SECOND)


# --- checkpoints that continue -----------------------------------------------------------------


def _adamp_state(source_state: dict, step_of) -> dict:
    return {"step": int(step_of(source_state)), "exp_avg": source_state["exp_avg"].clone(),
            "exp_avg_sq": source_state["exp_avg_sq"].clone()}


def _sources():
    """(name, our class, make source optimizer, hyperparameters for the official reference,
    state of the official reference from the source's per-param state and group)."""
    import pytorch_optimizer
    import torch_optimizer

    def sgd_state(s, g):
        return {"momentum": s["momentum_buffer"].clone()}

    def adam_state(s, g):
        return _adamp_state(s, lambda s: s["step"].item())

    def adamp_state(s, g):
        return _adamp_state(s, lambda s: s["step"])

    def po_adamp_state(s, g):
        return _adamp_state(s, lambda s: g["step"])

    def sgdp_state(s, g):
        return {"momentum": s["momentum"].clone()}

    adam_hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    sgdp_hp = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True)
    adamp_hp = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2, wd_ratio=0.1, nesterov=True)
    return [
        ("torch SGD", SGDP, lambda ps: torch.optim.SGD(ps, **sgdp_hp), sgdp_hp, sgd_state),
        ("torch Adam", AdamP, lambda ps: torch.optim.Adam(ps, **adam_hp), adam_hp, adam_state),
        ("torch AdamW", AdamP,
         lambda ps: torch.optim.AdamW(ps, **{**adam_hp, "weight_decay": 0.05}),
         {**adam_hp, "weight_decay": 0.05}, adam_state),
        ("torch Adam decoupled", AdamP,
         lambda ps: torch.optim.Adam(ps, **{**adam_hp, "weight_decay": 0.05},
                                     decoupled_weight_decay=True),
         {**adam_hp, "weight_decay": 0.05}, adam_state),
        ("torch-optimizer AdamP", AdamP, lambda ps: torch_optimizer.AdamP(ps, **adamp_hp),
         adamp_hp, adamp_state),
        ("torch-optimizer SGDP", SGDP, lambda ps: torch_optimizer.SGDP(ps, **sgdp_hp), sgdp_hp,
         sgdp_state),
        ("pytorch_optimizer AdamP", AdamP,
         lambda ps: pytorch_optimizer.AdamP(ps, **adamp_hp), adamp_hp, po_adamp_state),
        ("pytorch_optimizer SGDP", SGDP, lambda ps: pytorch_optimizer.SGDP(ps, **sgdp_hp),
         sgdp_hp, sgdp_state),
        ("timm AdamP", AdamP, lambda ps: import_timm().optim.AdamP(ps, **adamp_hp), adamp_hp,
         adamp_state),
        ("timm SGDP", SGDP, lambda ps: import_timm().optim.SGDP(ps, **sgdp_hp), sgdp_hp,
         sgdp_state),
    ]


SOURCE_NAMES = [
    "torch SGD", "torch Adam", "torch AdamW", "torch Adam decoupled", "torch-optimizer AdamP",
    "torch-optimizer SGDP", "pytorch_optimizer AdamP", "pytorch_optimizer SGDP", "timm AdamP",
    "timm SGDP",
]


@pytest.mark.parametrize("name", SOURCE_NAMES)
@pytest.mark.parametrize("foreach", [False, True])
def test_foreign_checkpoint_continues(name: str, foreach: bool) -> None:
    pytest.importorskip("pytorch_optimizer")
    pytest.importorskip("torch_optimizer")
    _, cls, make_source, hp, to_official = dict((s[0], s) for s in _sources())[name]
    init = initial_params(SHAPES, seed=5)
    source_params = copy_params(init)
    source = Driven(make_source(source_params), source_params)
    run_lockstep([source], KINDS, steps=FIRST, seed=6)
    checkpoint = through_file(source.optimizer.state_dict())

    ours_params, ref_params = copy_params(source_params), copy_params(source_params)
    defaults = {"lr": 123.0} if cls is SGDP else {}  # replaced by the checkpoint's
    ours = Driven(cls(ours_params, foreach=foreach, **defaults), ours_params)
    ours.optimizer.load_state_dict(checkpoint)
    assert ours.optimizer.param_groups[0]["lr"] == hp["lr"]
    assert ours.optimizer.param_groups[0]["foreach"] is foreach  # ours, not the source's

    official_cls = official.AdamP if cls is AdamP else official.SGDP
    ref = Driven(official_cls(ref_params, **hp), ref_params)
    group = checkpoint["param_groups"][0]
    for index, p in enumerate(ref_params):
        ref.optimizer.state[p] = to_official(checkpoint["state"][index], group)

    run_lockstep([ref, ours], KINDS, steps=SECOND, seed=7)
    for actual, expected in zip(ours_params, ref_params, strict=True):
        assert_round_off_close(actual, expected, FIRST + SECOND)
    # and our checkpoint of it round-trips
    again = cls(copy_params(ours_params), **defaults)
    again.load_state_dict(through_file(ours.optimizer.state_dict()))


def test_sgd_checkpoint_without_momentum_starts_a_zero_buffer() -> None:
    init = initial_params(SHAPES, seed=8)
    ps = copy_params(init)
    sgd = Driven(torch.optim.SGD(ps, lr=0.1), ps)
    run_lockstep([sgd], KINDS, steps=2, seed=9)
    ours = SGDP(copy_params(ps), lr=1.0)
    ours.load_state_dict(sgd.optimizer.state_dict())
    assert ours.param_groups[0]["lr"] == 0.1 and ours.param_groups[0]["momentum"] == 0


# --- checkpoints that are refused --------------------------------------------------------------


def _refused_cases():
    import pytorch_optimizer

    return {
        "Adam L2 decay": (AdamP, lambda ps: torch.optim.Adam(ps, weight_decay=1e-4),
                          "decoupled"),
        "Adam amsgrad": (AdamP, lambda ps: torch.optim.Adam(ps, amsgrad=True), "AMSGrad"),
        "Adam into SGDP": (SGDP, lambda ps: torch.optim.AdamW(ps), "scaleinv.AdamP"),
        "SGD into AdamP": (AdamP, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                           "scaleinv.SGDP"),
        "AdamP into SGDP": (SGDP, lambda ps: AdamP(ps), "scaleinv.AdamP"),
        "SGDP into AdamP": (AdamP, lambda ps: SGDP(ps, lr=0.1), "scaleinv.SGDP"),
        "RMSprop": (AdamP, lambda ps: torch.optim.RMSprop(ps), "neither"),
        "NAdam": (AdamP, lambda ps: torch.optim.NAdam(ps), "neither"),
        "pytorch_optimizer coupled": (
            AdamP, lambda ps: pytorch_optimizer.AdamP(ps, weight_decay=1e-2,
                                                      weight_decouple=False), "coupled"),
        "pytorch_optimizer fixed decay": (
            SGDP, lambda ps: pytorch_optimizer.SGDP(ps, lr=0.1, weight_decay=1e-2,
                                                    fixed_decay=True), "fixed_decay"),
        "out of range": (SGDP, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=1.5),
                         "momentum"),
    }


REFUSED = [
    "Adam L2 decay", "Adam amsgrad", "Adam into SGDP", "SGD into AdamP", "AdamP into SGDP",
    "SGDP into AdamP", "RMSprop", "NAdam", "pytorch_optimizer coupled",
    "pytorch_optimizer fixed decay", "out of range",
]


@pytest.mark.parametrize("case", REFUSED)
def test_foreign_checkpoint_refused_at_load(case: str) -> None:
    pytest.importorskip("pytorch_optimizer")
    cls, make_source, message = _refused_cases()[case]
    init = initial_params(SHAPES, seed=10)
    ps = copy_params(init)
    source = Driven(make_source(ps), ps)
    run_lockstep([source], KINDS, steps=2, seed=11)
    checkpoint = through_file(source.optimizer.state_dict())

    ours_params = copy_params(init)
    ours = Driven(cls(ours_params, lr=0.01), ours_params)
    run_lockstep([ours], KINDS, steps=1, seed=12)
    before = through_file(ours.optimizer.state_dict())
    with pytest.raises(ValueError, match=message) as error:
        ours.optimizer.load_state_dict(checkpoint)
    assert "Cannot load" in str(error.value) or "Invalid" in str(error.value)
    after = ours.optimizer.state_dict()  # untouched by the refused load
    assert after["param_groups"] == before["param_groups"]
    for index, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(after["state"][index][key]),
                               torch.as_tensor(value))
    run_lockstep([ours], KINDS, steps=1, seed=13)  # and still steps


@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
def test_timm_cautious_checkpoint_continues_with_caution(name: str) -> None:
    """A checkpoint of timm's ``caution=True`` optimizer continues as ours with ``caution``:
    the same steps as timm's own optimizer resumed from it."""
    timm = import_timm()
    hp = (dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2, nesterov=True) if name == "AdamP"
          else dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True))
    timm_cls, cls = getattr(timm.optim, name), {"AdamP": AdamP, "SGDP": SGDP}[name]
    init = initial_params(SHAPES, seed=21)
    source_params = copy_params(init)
    source = Driven(timm_cls(source_params, caution=True, **hp), source_params)
    run_lockstep([source], KINDS, steps=FIRST, seed=22)
    checkpoint = through_file(source.optimizer.state_dict())

    ours_params, theirs_params = copy_params(source_params), copy_params(source_params)
    ours = Driven(cls(ours_params, **({"lr": 1.0} if cls is SGDP else {})), ours_params)
    ours.optimizer.load_state_dict(checkpoint)
    assert ours.optimizer.param_groups[0]["caution"] is True
    theirs = Driven(timm_cls(theirs_params, caution=True, **hp), theirs_params)
    theirs.optimizer.load_state_dict(through_file(checkpoint))  # its own tensors, not shared
    run_lockstep([theirs, ours], KINDS, steps=SECOND, seed=23)
    for actual, expected in zip(ours_params, theirs_params, strict=True):
        assert_round_off_close(actual, expected, FIRST + SECOND)
