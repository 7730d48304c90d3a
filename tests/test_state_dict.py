"""state_dict()/load_state_dict(): resuming is invisible, ``adamp`` 0.3.0 checkpoints load and
continue identically, and everything survives ``torch.save``/``torch.load(weights_only=True)``."""

from __future__ import annotations

import copy
import io

import adamp as official
import pytest
import torch

from reference import (
    Driven,
    assert_round_off_close,
    copy_params,
    initial_params,
    replay,
    run_lockstep,
)
from scaleinv import SGDP, AdamP

SHAPES = [(6,), (4, 5), (3, 2, 3), (5, 2, 3, 3), (4, 6)]
KINDS = ["random", "channel", "layer", "none", "random"]
CHANNELS_LAST = [False, False, False, True, False]
ADAMP_HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, delta=0.1,
                wd_ratio=0.1, nesterov=True)
SGDP_HP = dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=False,
               eps=1e-8, delta=0.1, wd_ratio=0.1)
FIRST, SECOND = 10, 10


def make(optimizer: str, params, **kwargs):
    if optimizer == "adamp":
        return AdamP(params, **ADAMP_HP, **kwargs)
    return SGDP(params, **SGDP_HP, **kwargs)


def save_and_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    for p_a, p_b in zip(a.state, b.state, strict=True):
        state_a, state_b = a.state[p_a], b.state[p_b]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(torch.as_tensor(state_a[key]), torch.as_tensor(state_b[key])), key


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("through_file", [False, True])
def test_resume_mid_run_is_invisible(optimizer: str, foreach: bool, through_file: bool) -> None:
    """Save after FIRST steps, load into a fresh optimizer on fresh params, continue SECOND
    steps on the same gradients: bitwise the same as FIRST + SECOND uninterrupted steps."""
    init = initial_params(SHAPES, seed=21)
    whole_params = copy_params(init, CHANNELS_LAST)
    whole = make(optimizer, whole_params, foreach=foreach)
    stream = run_lockstep([Driven(whole, whole_params)], KINDS, FIRST + SECOND, seed=21)

    first_params = copy_params(init, CHANNELS_LAST)
    first = make(optimizer, first_params, foreach=foreach)
    replay([Driven(first, first_params)], stream[:FIRST])
    saved = first.state_dict()
    saved = save_and_load(saved) if through_file else copy.deepcopy(saved)
    resumed_params = copy_params([p.detach() for p in first_params], CHANNELS_LAST)
    resumed = make(optimizer, resumed_params, foreach=foreach)
    resumed.load_state_dict(saved)
    assert_same_state(first, resumed)
    assert resumed.state_dict()["param_groups"] == first.state_dict()["param_groups"]
    del first  # only the loaded state carries on

    replay([Driven(resumed, resumed_params)], stream[FIRST:])
    for w_whole, w_resumed in zip(whole_params, resumed_params, strict=True):
        assert torch.equal(w_resumed, w_whole)
    assert_same_state(whole, resumed)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("foreach", [False, True])
def test_official_checkpoint_loads_and_continues(optimizer: str, foreach: bool) -> None:
    """An ``adamp`` 0.3.0 state_dict (int ``step``, none of our options) loads into ours, keeps
    the options ours was built with, and continues like the official optimizer: bitwise with
    ``foreach=False``, to round-off with ``foreach=True``."""
    init = initial_params(SHAPES, seed=23)
    official_params = copy_params(init)
    if optimizer == "adamp":
        reference_opt = official.AdamP(official_params, **ADAMP_HP)
        options = dict(foreach=foreach, scale_invariant="auto")
    else:
        reference_opt = official.SGDP(official_params, **SGDP_HP)
        options = dict(foreach=foreach, project_momentum=True)
    run_lockstep([Driven(reference_opt, official_params)], KINDS, FIRST, seed=23)
    checkpoint = save_and_load(reference_opt.state_dict())

    ours_params = copy_params([p.detach() for p in official_params], CHANNELS_LAST)
    ours = make(optimizer, ours_params, **options)
    ours.load_state_dict(checkpoint)
    for group in ours.param_groups:
        for key, value in options.items():
            assert group[key] == value, key
    for p in ours_params:
        if optimizer == "adamp":
            step = ours.state[p]["step"]
            assert torch.is_tensor(step) and step.dtype == torch.float32
            assert step.item() == FIRST
        assert ours.state[p].keys() == reference_opt.state[official_params[0]].keys()

    run_lockstep([Driven(reference_opt, official_params), Driven(ours, ours_params)],
                 KINDS, SECOND, seed=24)
    for w_official, w_ours in zip(official_params, ours_params, strict=True):
        if foreach:
            assert_round_off_close(w_ours, w_official, FIRST + SECOND)
        else:
            assert torch.equal(w_ours, w_official)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_state_and_hyperparameter_names_match_official(optimizer: str) -> None:
    init = initial_params(SHAPES, seed=25)
    official_params, ours_params = copy_params(init), copy_params(init)
    if optimizer == "adamp":
        reference_opt = official.AdamP(official_params, **ADAMP_HP)
    else:
        reference_opt = official.SGDP(official_params, **SGDP_HP)
    ours = make(optimizer, ours_params)
    run_lockstep([Driven(reference_opt, official_params), Driven(ours, ours_params)],
                 KINDS, 2, seed=25)
    theirs, mine = reference_opt.state_dict(), ours.state_dict()
    assert set(theirs["param_groups"][0]) <= set(mine["param_groups"][0])
    for key, value in theirs["param_groups"][0].items():
        if key != "params":
            assert mine["param_groups"][0][key] == value, key
    assert theirs["state"].keys() == mine["state"].keys()
    for index, state in theirs["state"].items():
        assert set(state) <= set(mine["state"][index])
