"""The ``torch.optim.Optimizer`` contract: param groups, add_param_group, LR schedulers,
closures, zero_grad, params without gradients, ``maximize`` and ``capturable``.

Comparisons with the official ``adamp`` 0.3.0 are bitwise for ``foreach=False`` and within
``reference.round_off_tolerance`` for ``foreach=True`` (see ``test_parity_adamp``).
"""

from __future__ import annotations

import adamp as official
import pytest
import torch
from torch.optim import lr_scheduler

from reference import (
    Driven,
    assert_round_off_close,
    copy_params,
    initial_params,
    replay,
    run_lockstep,
)
from scaleinv import SGDP, AdamP

STEPS = 20
SHAPES = [(6,), (4, 5), (3, 2, 3), (5, 2, 3, 3), (4, 6), (5,)]
KINDS = ["random", "channel", "layer", "none", "channel", "random"]


def assert_matches(ours: list[torch.Tensor], theirs: list[torch.Tensor], foreach: bool,
                   steps: int = STEPS) -> None:
    for w_ours, w_theirs in zip(ours, theirs, strict=True):
        if foreach:
            assert_round_off_close(w_ours, w_theirs, steps)
        else:
            assert torch.equal(w_ours, w_theirs)


def groups_of(params: list[torch.Tensor], optimizer: str) -> list[dict]:
    """Three groups with different hyperparameters (the official names and ranges)."""
    if optimizer == "adamp":
        return [
            {"params": params[:2], "lr": 1e-2, "weight_decay": 0.1, "nesterov": True},
            {"params": params[2:4], "lr": 3e-3, "betas": (0.5, 0.9), "delta": 0.2,
             "wd_ratio": 0.5, "weight_decay": 1e-2},
            {"params": params[4:], "eps": 1e-6},
        ]
    return [
        {"params": params[:2], "lr": 5e-2, "weight_decay": 1e-2, "nesterov": True},
        {"params": params[2:4], "momentum": 0.5, "dampening": 0.3, "delta": 0.2,
         "wd_ratio": 0.5, "weight_decay": 1e-2},
        {"params": params[4:], "momentum": 0.0, "eps": 1e-6},
    ]


def make_pair(optimizer: str, params_official, params_ours, foreach: bool, grouped: bool = True):
    if optimizer == "adamp":
        defaults = dict(lr=1e-3)
        reference_opt = official.AdamP(
            groups_of(params_official, optimizer) if grouped else params_official, **defaults
        )
        ours = AdamP(groups_of(params_ours, optimizer) if grouped else params_ours,
                     foreach=foreach, **defaults)
    else:
        defaults = dict(lr=1e-2, momentum=0.9)
        reference_opt = official.SGDP(
            groups_of(params_official, optimizer) if grouped else params_official, **defaults
        )
        ours = SGDP(groups_of(params_ours, optimizer) if grouped else params_ours,
                    foreach=foreach, project_momentum=True, **defaults)
    return reference_opt, ours


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("foreach", [False, True])
def test_param_groups_with_different_hyperparameters(optimizer: str, foreach: bool) -> None:
    init = initial_params(SHAPES, seed=31)
    official_params, ours_params = copy_params(init), copy_params(init)
    reference_opt, ours = make_pair(optimizer, official_params, ours_params, foreach)
    run_lockstep([Driven(reference_opt, official_params), Driven(ours, ours_params)],
                 KINDS, STEPS, seed=31)
    assert_matches(ours_params, official_params, foreach)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("foreach", [False, True])
def test_add_param_group_mid_run(optimizer: str, foreach: bool) -> None:
    """Half the tensors from the start, the rest added as a group with other hyperparameters
    after STEPS // 2 steps (they get no gradient before)."""
    init = initial_params(SHAPES, seed=33)
    official_params, ours_params = copy_params(init), copy_params(init)
    reference_opt, ours = make_pair(optimizer, official_params[:3], ours_params[:3], foreach,
                                    grouped=False)
    drivers = [Driven(reference_opt, official_params[:3]), Driven(ours, ours_params[:3])]
    run_lockstep(drivers, KINDS[:3], STEPS // 2, seed=33)
    extra = {"lr": 2e-3, "weight_decay": 0.05, "wd_ratio": 0.3}
    reference_opt.add_param_group({"params": official_params[3:], **extra})
    ours.add_param_group({"params": ours_params[3:], **extra})
    assert ours.param_groups[-1]["foreach"] == foreach  # defaults fill the new group
    drivers = [Driven(reference_opt, official_params), Driven(ours, ours_params)]
    run_lockstep(drivers, KINDS, STEPS // 2, seed=34)
    assert_matches(ours_params, official_params, foreach)


class Scheduled(Driven):
    """A driver that steps its LR scheduler after every optimizer step."""

    def __init__(self, optimizer, params, scheduler) -> None:
        super().__init__(optimizer, params)
        self.scheduler = scheduler

    def step(self, grads) -> None:
        super().step(grads)
        self.scheduler.step()


SCHEDULERS = {
    "step": lambda opt: lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    "onecycle": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=STEPS),
    "cosine": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-4),
}


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("schedule", sorted(SCHEDULERS))
def test_lr_schedulers(optimizer: str, foreach: bool, schedule: str) -> None:
    """Schedulers drive ours as they drive the official optimizer (OneCycleLR also cycles
    ``betas[0]`` of AdamP and ``momentum`` of SGDP)."""
    init = initial_params(SHAPES, seed=35)
    official_params, ours_params = copy_params(init), copy_params(init)
    reference_opt, ours = make_pair(optimizer, official_params, ours_params, foreach)
    drivers = [Scheduled(reference_opt, official_params, SCHEDULERS[schedule](reference_opt)),
               Scheduled(ours, ours_params, SCHEDULERS[schedule](ours))]
    run_lockstep(drivers, KINDS, STEPS, seed=35)
    lrs = [group["lr"] for group in ours.param_groups]
    assert lrs == [group["lr"] for group in reference_opt.param_groups]
    assert_matches(ours_params, official_params, foreach)


def tiny_model_and_data(seed: int):
    """A conv + batch-norm model (scale-invariant conv weights) and one batch."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3),
    )
    data = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    return model, data


def build(optimizer: str, params, foreach: bool, **kwargs):
    if optimizer == "adamp":
        return AdamP(params, lr=1e-2, weight_decay=1e-2, foreach=foreach, **kwargs)
    return SGDP(params, lr=1e-1, momentum=0.9, weight_decay=1e-3, foreach=foreach, **kwargs)


def make_closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("foreach", [False, True])
def test_closure(optimizer: str, foreach: bool) -> None:
    """``step(closure)`` runs the closure with gradients enabled, returns its loss and steps
    exactly like zero_grad / backward / step by hand."""
    results = []
    for use_closure in (False, True):
        model, (x, y) = tiny_model_and_data(seed=37)
        opt = build(optimizer, model.parameters(), foreach)
        losses = []
        closure = make_closure(model, opt, x, y)
        for _ in range(5):
            if use_closure:
                losses.append(opt.step(closure).item())
            else:
                losses.append(closure().item())
                assert opt.step() is None
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (losses_by_hand, params_by_hand), (losses_closure, params_closure) = results
    assert losses_closure == losses_by_hand
    assert losses_closure[-1] < losses_closure[0]
    for a, b in zip(params_closure, params_by_hand, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("foreach", [False, True])
def test_zero_grad_and_params_without_grads(optimizer: str, foreach: bool) -> None:
    """Params whose ``.grad`` is None are left bitwise untouched and get no state; after
    ``zero_grad()`` a step changes nothing."""
    init = initial_params(SHAPES, seed=39)
    params = copy_params(init)
    opt = build(optimizer, params, foreach)
    with_grad = [0, 1, 3]
    generator = torch.Generator().manual_seed(39)
    for _ in range(3):
        for i in with_grad:
            params[i].grad = torch.randn(params[i].shape, generator=generator)
        opt.step()
    for i, (w0, w) in enumerate(zip(init, params, strict=True)):
        if i in with_grad:
            assert not torch.equal(w, w0)
            assert len(opt.state[w]) > 0
        else:
            assert torch.equal(w, w0)
            assert w not in opt.state

    opt.zero_grad()
    assert all(p.grad is None for p in params)
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    opt.step()
    for a, b in zip(params, before, strict=True):
        assert torch.equal(a, b)
    for key, value in opt.state[params[0]].items():
        assert torch.equal(value, state_before[key])

    params[0].grad = torch.ones_like(params[0])
    opt.zero_grad(set_to_none=False)
    assert torch.count_nonzero(params[0].grad) == 0


class Negated(Driven):
    """A driver that feeds the negated gradients (the gradients of ``-loss``)."""

    def step(self, grads) -> None:
        super().step([-g for g in grads])


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("foreach", [False, True])
def test_maximize(optimizer: str, foreach: bool) -> None:
    """``maximize=True`` on ``loss`` is minimizing ``-loss`` (bitwise), and ``p.grad`` is left
    as it was."""
    init = initial_params(SHAPES, seed=41)
    max_params, min_params = copy_params(init), copy_params(init)
    maximizer = build(optimizer, max_params, foreach, maximize=True)
    minimizer = build(optimizer, min_params, foreach)
    stream = run_lockstep([Driven(maximizer, max_params), Negated(minimizer, min_params)],
                          KINDS, STEPS, seed=41)
    for w_max, w_min, g in zip(max_params, min_params, stream[-1], strict=True):
        assert torch.equal(w_max, w_min)
        assert torch.equal(w_max.grad, g)


@pytest.mark.parametrize("foreach", [None, True])
def test_capturable_on_cpu_matches_non_capturable(foreach) -> None:
    """``capturable=True`` keeps step counters on the param's device as float32 tensors and
    computes the bias corrections on the device (float32 instead of Python floats): the same
    trajectory to round-off."""
    init = initial_params(SHAPES, seed=43)
    cap_params, plain_params = copy_params(init), copy_params(init)
    hp = dict(lr=1e-2, weight_decay=0.1, nesterov=True)
    capturable = AdamP(cap_params, capturable=True, foreach=foreach, **hp)
    plain = AdamP(plain_params, foreach=True, **hp)
    run_lockstep([Driven(capturable, cap_params), Driven(plain, plain_params)],
                 KINDS, STEPS, seed=43)
    for w_cap, w_plain in zip(cap_params, plain_params, strict=True):
        step = capturable.state[w_cap]["step"]
        assert step.device == w_cap.device and step.dtype == torch.float32
        assert step.item() == STEPS
        assert_round_off_close(w_cap, w_plain, STEPS)


def test_capturable_needs_the_multi_tensor_body() -> None:
    w = torch.nn.Parameter(torch.randn(3, 4))
    w.grad = torch.randn(3, 4)
    with pytest.raises(ValueError, match="capturable"):
        AdamP([w], capturable=True, foreach=False).step()


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_foreach_none_on_cpu_is_the_single_tensor_body(optimizer: str) -> None:
    init = initial_params(SHAPES, seed=45)
    default_params, single_params = copy_params(init), copy_params(init)
    default = build(optimizer, default_params, foreach=None)
    single = build(optimizer, single_params, foreach=False)
    run_lockstep([Driven(default, default_params), Driven(single, single_params)],
                 KINDS, 5, seed=45)
    assert_matches(default_params, single_params, foreach=False)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("foreach", [False, True])
def test_tensor_lr_equals_float_lr(optimizer: str, foreach: bool) -> None:
    init = initial_params(SHAPES, seed=47)
    float_params, tensor_params = copy_params(init), copy_params(init)
    as_float = build(optimizer, float_params, foreach)
    as_tensor = build(optimizer, tensor_params, foreach)
    for group in as_tensor.param_groups:
        group["lr"] = torch.tensor(group["lr"])
    stream = run_lockstep([Driven(as_float, float_params)], KINDS, 5, seed=47)
    replay([Driven(as_tensor, tensor_params)], stream)
    for w_tensor, w_float in zip(tensor_params, float_params, strict=True):
        assert_round_off_close(w_tensor, w_float, 5)
