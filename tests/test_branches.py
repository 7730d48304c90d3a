"""The branches of the cosine test: the built gradients take the branch they are built for (so
the parity tests cannot pass by never projecting), the projection really changes the step, and
the ``scale_invariant`` annotations force or disable it."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from reference import (
    EXPECTED_VIEW,
    Driven,
    ReferenceAdamP,
    ReferenceSGDP,
    assert_round_off_close,
    copy_params,
    initial_params,
    make_grad,
    multi_dim_shape,
    reference_project,
    reference_view,
    rows,
    run_lockstep,
)
from scaleinv import SGDP, AdamP
from scaleinv.projection import radial_coefficients, select_view

STEPS = 20
BUILT_KINDS = ("channel", "layer", "none")


@settings(max_examples=100)
@given(shape=multi_dim_shape(), kind=st.sampled_from(BUILT_KINDS), channels_last=st.booleans(),
       delta=st.floats(0.02, 0.5), eps=st.sampled_from([1e-8, 1e-4]),
       seed=st.integers(0, 2**16))
def test_built_gradients_take_their_branch(shape, kind, channels_last, delta, eps, seed) -> None:
    """Reference decision, ``select_view`` and the sync-free flags all agree with the kind; the
    sync-free coefficients give the reference projection of that view."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator)
    g = make_grad(w, kind, generator)
    p = torch.randn(shape, generator=generator)
    if channels_last and w.dim() == 4:
        w, g, p = (t.contiguous(memory_format=torch.channels_last) for t in (w, g, p))
    expected = EXPECTED_VIEW[kind]

    assert reference_view(w.double(), g.double(), delta, eps) == expected
    assert select_view(w, g, "auto", delta, eps) == expected
    (coef,), (projected,) = radial_coefficients(
        [w], [g], [p], scale_invariant="auto", delta=delta, eps=eps
    )
    assert bool(projected) == (expected is not None)
    projected_update = p - w * coef
    wanted = p.double()
    if expected is not None:
        wanted = reference_project(w.double(), wanted, expected, eps)
    torch.testing.assert_close(projected_update.double(), wanted, rtol=1e-5, atol=1e-5)


def make_optimizer(optimizer: str, params, foreach: bool, **kwargs):
    if optimizer == "adamp":
        return AdamP(params, lr=1e-2, foreach=foreach, **kwargs)
    return SGDP(params, lr=1e-2, momentum=0.9, foreach=foreach, **kwargs)


BRANCH_SHAPES = [(6,), (4, 5), (3, 2, 3), (5, 2, 3, 3)]
BRANCH_KINDS = ["random", "channel", "layer", "none"]


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("foreach", [False, True])
def test_projection_changes_the_step_exactly_where_taken(optimizer: str, foreach: bool) -> None:
    """Against the same optimizer with ``scale_invariant=False``: projected tensors move
    differently (projected update and ``wd_ratio``), the others identically."""
    init = initial_params(BRANCH_SHAPES, seed=3)
    projected_params, plain_params = copy_params(init), copy_params(init)
    projected_opt = make_optimizer(optimizer, projected_params, foreach, weight_decay=0.5)
    plain_opt = make_optimizer(
        optimizer, plain_params, foreach, weight_decay=0.5, scale_invariant=False
    )
    run_lockstep([Driven(projected_opt, projected_params), Driven(plain_opt, plain_params)],
                 BRANCH_KINDS, steps=3, seed=3)
    for w_projected, w_plain, kind in zip(projected_params, plain_params, BRANCH_KINDS,
                                          strict=True):
        if EXPECTED_VIEW.get(kind) is None:
            assert torch.equal(w_projected, w_plain), kind
        else:
            assert not torch.allclose(w_projected, w_plain, rtol=1e-3, atol=1e-4), kind


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("foreach", [False, True])
def test_projected_step_is_tangential(optimizer: str, foreach: bool) -> None:
    """Without weight decay, a projected step is orthogonal to ``w`` row by row of its view
    (for AdamP the unprojected step, about ``lr sign(g)``, is far from orthogonal)."""
    init = initial_params(BRANCH_SHAPES, seed=3)
    params = copy_params(init)
    opt = make_optimizer(optimizer, params, foreach)
    run_lockstep([Driven(opt, params)], BRANCH_KINDS, steps=1, seed=3)
    for w0, w, kind in zip(init, params, BRANCH_KINDS, strict=True):
        view = EXPECTED_VIEW.get(kind)
        if view is None:
            continue
        step = (w - w0).double()
        radial = (rows(step, view) * rows(w0.double(), view)).sum(dim=1)
        # float32 round-off of w - w0: a few ulps of each element of w
        round_off = 4 * torch.finfo(torch.float32).eps * w0.norm() ** 2
        assert radial.abs().max() <= 1e-5 * step.norm() * w0.norm() + round_off, kind


# --- annotations -----------------------------------------------------------------------------

ADAMP_HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, delta=0.1,
                wd_ratio=0.1, nesterov=True)
SGDP_HP = dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=False,
               eps=1e-8, delta=0.1, wd_ratio=0.1)


def run_pair(optimizer: str, shapes, kinds, annotations: tuple, foreach: bool, seed: int = 5,
             **extra):
    """Params of two runs on the same gradients (guided by the first): one per annotation."""
    init = initial_params(shapes, seed)
    drivers = []
    for annotation in annotations:
        params = copy_params(init)
        if optimizer == "adamp":
            opt = AdamP(params, foreach=foreach, scale_invariant=annotation, **ADAMP_HP, **extra)
        else:
            opt = SGDP(params, foreach=foreach, scale_invariant=annotation, **SGDP_HP, **extra)
        drivers.append(Driven(opt, params))
    run_lockstep(drivers, kinds, STEPS, seed)
    return init, [d.params for d in drivers]


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("view", ["channel", "layer"])
def test_annotation_equals_auto_when_auto_picks_it(optimizer, foreach, view) -> None:
    shapes = [(4, 5), (5, 3, 3, 3), (3, 2, 4)]
    _, (auto, annotated) = run_pair(optimizer, shapes, [view] * 3, ("auto", view), foreach)
    for w_auto, w_annotated in zip(auto, annotated, strict=True):
        assert torch.equal(w_annotated, w_auto)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("annotation", ["channel", "layer", False])
def test_annotation_matches_reference(optimizer, foreach, annotation) -> None:
    """An annotation is obeyed whatever the gradients say (the cosine test would pick
    ``none``/``channel``/``layer`` here); checked against the float64 reference."""
    shapes = [(4, 5), (5, 3, 3, 3), (3, 2, 4)]
    kinds = ["none", "channel", "layer"]
    init = initial_params(shapes, seed=11)
    params = copy_params(init)
    if optimizer == "adamp":
        ours = AdamP(params, foreach=foreach, scale_invariant=annotation, **ADAMP_HP)
        reference = ReferenceAdamP(init, scale_invariant=annotation, **ADAMP_HP)
    else:
        ours = SGDP(params, foreach=foreach, scale_invariant=annotation, **SGDP_HP)
        reference = ReferenceSGDP(init, scale_invariant=annotation, **SGDP_HP)
    run_lockstep([reference, Driven(ours, params)], kinds, STEPS, seed=11)
    assert reference.views == [[annotation or None] * 3] * STEPS
    for w, w64 in zip(params, reference.params, strict=True):
        assert_round_off_close(w, w64, STEPS)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("annotation", ["auto", "channel", "layer", False])
def test_annotations_agree_across_foreach(optimizer, annotation) -> None:
    shapes = [(7,), (4, 5), (5, 3, 3, 3), (3, 2, 4)]
    kinds = ["random", "none", "channel", "layer"]
    if annotation in ("channel", "layer"):
        shapes, kinds = shapes[1:], kinds[1:]
    init = initial_params(shapes, seed=13)
    drivers = []
    for foreach in (False, True):
        params = copy_params(init)
        if optimizer == "adamp":
            opt = AdamP(params, foreach=foreach, scale_invariant=annotation, **ADAMP_HP)
        else:
            opt = SGDP(params, foreach=foreach, scale_invariant=annotation, **SGDP_HP)
        drivers.append(Driven(opt, params))
    run_lockstep(drivers, kinds, STEPS, seed=13)
    for w_single, w_multi in zip(drivers[0].params, drivers[1].params, strict=True):
        assert_round_off_close(w_multi, w_single, STEPS)


@pytest.mark.parametrize("foreach", [False, True])
def test_adamp_without_projection_is_adamw(foreach: bool) -> None:
    shapes = [(7,), (4, 5), (5, 3, 3, 3), (3, 2, 4)]
    kinds = ["random", "channel", "layer", "none"]
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    init = initial_params(shapes, seed=17)
    ours_params, adamw_params = copy_params(init), copy_params(init)
    ours = AdamP(ours_params, foreach=foreach, scale_invariant=False, **hp)
    adamw = torch.optim.AdamW(adamw_params, foreach=foreach, **hp)
    run_lockstep([Driven(ours, ours_params), Driven(adamw, adamw_params)], kinds, STEPS, seed=17)
    for w, w_adamw in zip(ours_params, adamw_params, strict=True):
        assert_round_off_close(w, w_adamw, STEPS)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgdp_without_projection_is_sgd_momentum(foreach: bool, nesterov: bool) -> None:
    """Without weight decay and dampening, SGDP's zero-started buffer equals SGD's
    first-gradient-started one, so ``scale_invariant=False`` gives ``torch.optim.SGD``."""
    shapes = [(7,), (4, 5), (5, 3, 3, 3), (3, 2, 4)]
    kinds = ["random", "channel", "layer", "none"]
    hp = dict(lr=1e-2, momentum=0.9, nesterov=nesterov)
    init = initial_params(shapes, seed=19)
    ours_params, sgd_params = copy_params(init), copy_params(init)
    ours = SGDP(ours_params, foreach=foreach, scale_invariant=False, **hp)
    sgd = torch.optim.SGD(sgd_params, foreach=foreach, **hp)
    run_lockstep([Driven(ours, ours_params), Driven(sgd, sgd_params)], kinds, STEPS, seed=19)
    for w, w_sgd in zip(ours_params, sgd_params, strict=True):
        assert_round_off_close(w, w_sgd, STEPS)
