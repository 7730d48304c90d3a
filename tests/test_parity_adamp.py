"""AdamP against the official ``adamp`` 0.3.0 and against the float64 reference.

Every example runs, on the same gradients, the official optimizer (on contiguous copies),
ours with ``foreach=False`` and ours with ``foreach=True`` (on channels_last tensors where the
layout says so) for ``STEPS`` steps. Gradients are built per tensor to take one known branch of
the cosine test (see ``reference.make_grad``), and each run checks that the branch really was
taken, by the official code and by our sync-free body, at every step.

* ``foreach=False`` mirrors the official operations, so it must be **bitwise** equal.
* ``foreach=True`` orders the operations differently (fused decay and projection, ``w * s``
  instead of ``u <u, p>``); it must agree to float32 round-off, ``reference.round_off_tolerance``:
  4 ulps of the tensor's largest value per step.
"""

from __future__ import annotations

import importlib

import adamp as official
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from reference import (
    EXPECTED_VIEW,
    Driven,
    ReferenceAdamP,
    assert_round_off_close,
    check_branches,
    copy_params,
    initial_params,
    layouts,
    record_official_views,
    record_projected,
    run_lockstep,
)
from scaleinv import AdamP

ADAMP_MODULE = importlib.import_module("scaleinv.adamp")  # the module holding the bodies
STEPS = 20

adamp_hyperparameters = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 0.1),
    "betas": st.tuples(st.sampled_from([0.0, 0.5, 0.9]) | st.floats(0.0, 0.99),
                       st.sampled_from([0.999]) | st.floats(0.5, 0.9999)),
    "eps": st.sampled_from([1e-8, 1e-6, 1e-4]),
    "weight_decay": st.sampled_from([0.0]) | st.floats(0.0, 0.5),
    # delta <= 0.5 keeps the thresholds of the built gradients far apart: built row cosines
    # are 0 or 1/sqrt(2), thresholds are delta/sqrt(d) with d >= 2.
    "delta": st.floats(0.02, 0.5),
    "wd_ratio": st.floats(0.0, 1.0),
    "nesterov": st.booleans(),
})


@settings(max_examples=80)
@given(layout=layouts(), hp=adamp_hyperparameters, seed=st.integers(0, 2**16))
def test_adamp_matches_official(layout, hp, seed: int) -> None:
    shapes, kinds, channels_last = layout
    init = initial_params(shapes, seed)
    official_params = copy_params(init)
    reference_opt = official.AdamP(official_params, **hp)
    official_log = record_official_views(reference_opt)
    single_params = copy_params(init, channels_last)
    multi_params = copy_params(init, channels_last)
    single = AdamP(single_params, foreach=False, **hp)
    multi = AdamP(multi_params, foreach=True, **hp)
    with record_projected(ADAMP_MODULE) as foreach_log:
        run_lockstep([Driven(reference_opt, official_params), Driven(single, single_params),
                      Driven(multi, multi_params)], kinds, STEPS, seed)

    check_branches(official_log, foreach_log, official_params, multi_params, kinds, STEPS)
    for i, w_official in enumerate(official_params):
        state = reference_opt.state[w_official]
        for params, opt in ((single_params, single), (multi_params, multi)):
            ours = opt.state[params[i]]
            assert ours["step"].item() == state["step"] == STEPS
            if channels_last[i]:
                assert params[i].is_contiguous(memory_format=torch.channels_last)
                assert ours["exp_avg"].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(single_params[i], w_official)
        assert torch.equal(single.state[single_params[i]]["exp_avg"], state["exp_avg"])
        assert torch.equal(single.state[single_params[i]]["exp_avg_sq"], state["exp_avg_sq"])
        assert_round_off_close(multi_params[i], w_official, STEPS)
        assert_round_off_close(multi.state[multi_params[i]]["exp_avg"], state["exp_avg"], STEPS)
        assert_round_off_close(
            multi.state[multi_params[i]]["exp_avg_sq"], state["exp_avg_sq"], STEPS
        )


@settings(max_examples=25)
@pytest.mark.parametrize("foreach", [False, True])
@given(layout=layouts(), hp=adamp_hyperparameters, seed=st.integers(0, 2**16))
def test_adamp_matches_float64_reference(foreach: bool, layout, hp, seed: int) -> None:
    shapes, kinds, channels_last = layout
    init = initial_params(shapes, seed)
    reference = ReferenceAdamP(init, **hp)
    params = copy_params(init, channels_last)
    ours = AdamP(params, foreach=foreach, **hp)
    run_lockstep([reference, Driven(ours, params)], kinds, STEPS, seed)

    for views in reference.views:
        for view, kind in zip(views, kinds, strict=True):
            if kind in EXPECTED_VIEW:
                assert view == EXPECTED_VIEW[kind]
    for w, w64 in zip(params, reference.params, strict=True):
        assert_round_off_close(w, w64, STEPS)


@pytest.mark.slow
@settings(max_examples=300)
@given(layout=layouts(), hp=adamp_hyperparameters, seed=st.integers(0, 2**32 - 1))
def test_adamp_matches_official_many(layout, hp, seed: int) -> None:
    test_adamp_matches_official.hypothesis.inner_test(layout=layout, hp=hp, seed=seed)
