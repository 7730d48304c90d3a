"""scaleinv.project: exact against AdamP/SGDP, projected updates for other optimizers, the API.

The problems are built so that each tensor hits one path of the invariance test: a loss of
``w_i / |w_i|`` (per output channel) makes the gradient orthogonal to every row, a loss of
``w / |w|`` makes it orthogonal to the whole tensor only, a loss of ``w`` itself passes neither.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

import scaleinv
from scaleinv.projection import select_view
from scaleinv.wrap import ProjectedOptimizer, decay_kind

FLOAT32_EPS = torch.finfo(torch.float32).eps
EPS = 1e-8
SHAPES = {"channel": (8, 4, 3, 3), "layer": (6, 10), "none": (5, 7), "bias": (5,)}
EXPECTED_VIEWS = {"channel": "channel", "layer": "layer", "none": None, "bias": None}


class Problem:
    """A seeded loss over named tensors; ``kind`` says what the loss sees of each tensor."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.initial = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
        self.targets = {
            k: (torch.randn(s, generator=gen, dtype=dtype),
                torch.randn(s, generator=gen, dtype=dtype),
                torch.rand(s, generator=gen) + 0.5)
            for k, s in shapes.items()
        }

    def params(self) -> dict[str, torch.nn.Parameter]:
        return {k: torch.nn.Parameter(v.clone()) for k, v in self.initial.items()}

    @staticmethod
    def seen(name: str, w: Tensor) -> Tensor:
        if name.startswith("channel"):
            return w / w.reshape(w.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (w.dim() - 1))
        if name.startswith("layer"):
            return w / w.norm()
        return w

    def backward(self, params: dict[str, torch.nn.Parameter], scale: Any = None) -> Tensor:
        loss = torch.zeros(())
        for name, w in params.items():
            a, b, c = self.targets[name]
            u = self.seen(name, w)
            loss = loss + (a.conj() * u).real.sum() + 0.5 * (c * (u - b).abs() ** 2).sum()
        (loss if scale is None else scale(loss)).backward()
        with torch.no_grad():
            for name, w in params.items():
                push_radially(name, w)
        return loss.detach()


def push_radially(name: str, w: torch.nn.Parameter) -> None:
    """Tilt an invariant tensor's gradient towards ``w``, to a cosine of 0.3 of the threshold.

    The test still passes, but the gradient now has a radial part for the projection to
    remove (an exactly tangential gradient would leave plain SGD with nothing to project).
    """
    if not name.startswith(("channel", "layer")):
        return
    rows = real(w).shape[0] if name.startswith("channel") else 1
    w_rows, g_rows = real(w).reshape(rows, -1), real(w.grad).reshape(rows, -1)
    cosine = 0.3 * 0.1 / w_rows.shape[1] ** 0.5
    g_rows += cosine * g_rows.norm(dim=1, keepdim=True) * w_rows / w_rows.norm(dim=1, keepdim=True)


def real(x: Tensor) -> Tensor:
    return torch.view_as_real(x) if x.is_complex() else x


def views_of(params: dict[str, torch.nn.Parameter]) -> dict[str, str | None]:
    return {
        k: select_view(real(p.detach()), real(p.grad), "auto", 0.1, EPS)
        for k, p in params.items()
    }


def run(problem: Problem, make, steps: int) -> tuple[dict[str, Tensor], list[dict]]:
    params = problem.params()
    optimizer = make(list(params.values()))
    views = []
    for _ in range(steps):
        optimizer.zero_grad()
        problem.backward(params)
        views.append(views_of(params))
        optimizer.step()
    return {k: p.detach() for k, p in params.items()}, views


def assert_round_off(actual: dict[str, Tensor], expected: dict[str, Tensor], steps: int) -> None:
    for name in expected:
        scale = expected[name].abs().max()
        torch.testing.assert_close(
            actual[name], expected[name], rtol=0, atol=4 * steps * FLOAT32_EPS * scale,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def reference_projection(update: Tensor, w: Tensor, view: str) -> Tensor:
    """``update - u <u, update>`` per row of ``view``, in float64 (the test's own oracle)."""
    rows = w.double().reshape(w.shape[0] if view == "channel" else 1, -1)
    d = update.double().reshape(rows.shape)
    u = rows / (rows.norm(dim=1, keepdim=True) + EPS)
    return (d - u * (u * d).sum(dim=1, keepdim=True)).reshape(update.shape)


# ---------------------------------------------------------------------------------------------
# Exact against AdamP and SGDP


@pytest.mark.parametrize("foreach", [False, True])
def test_wrapped_adamw_is_adamp(foreach: bool) -> None:
    problem, steps = Problem(SHAPES, seed=1), 25
    options = dict(lr=0.01, betas=(0.9, 0.99), eps=EPS, weight_decay=0.1, foreach=foreach)
    expected, views = run(problem, lambda p: scaleinv.AdamP(p, **options), steps)
    actual, _ = run(problem, lambda p: scaleinv.project(torch.optim.AdamW(p, **options)), steps)
    assert views == [EXPECTED_VIEWS] * steps
    assert_round_off(actual, expected, steps)


@pytest.mark.parametrize(
    ("momentum", "nesterov", "foreach"),
    [(0.9, False, False), (0.9, True, True), (0.9, True, False), (0.0, False, True)],
)
def test_wrapped_sgd_is_sgdp(momentum: float, nesterov: bool, foreach: bool) -> None:
    problem, steps = Problem(SHAPES, seed=2), 25
    options = dict(lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=0.01)
    expected, views = run(problem, lambda p: scaleinv.SGDP(p, **options), steps)
    actual, _ = run(
        problem, lambda p: scaleinv.project(torch.optim.SGD(p, **options, foreach=foreach)), steps
    )
    assert views == [EXPECTED_VIEWS] * steps
    assert_round_off(actual, expected, steps)


def test_wrapped_complex_adamw_is_adamp() -> None:
    # Complex tensors are tested and projected as real views: [n, ...] -> [n, ..., 2].
    shapes = {"channel": (6, 5), "none": (4, 3), "bias": (4,)}
    problem, steps = Problem(shapes, seed=3, dtype=torch.complex64), 20
    options = dict(lr=0.01, weight_decay=0.1)
    expected, views = run(problem, lambda p: scaleinv.AdamP(p, **options), steps)
    actual, _ = run(problem, lambda p: scaleinv.project(torch.optim.AdamW(p, **options)), steps)
    assert views == [{"channel": "channel", "none": None, "bias": None}] * steps
    assert_round_off({k: real(v) for k, v in actual.items()},
                     {k: real(v) for k, v in expected.items()}, steps)


def test_without_invariance_adamw_is_untouched() -> None:
    problem, steps = Problem(SHAPES, seed=4), 5
    options = dict(lr=0.01, weight_decay=0.1)
    expected, _ = run(problem, lambda p: torch.optim.AdamW(p, **options), steps)
    actual, _ = run(
        problem,
        lambda p: scaleinv.project(torch.optim.AdamW(p, **options), scale_invariant=False),
        steps,
    )
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


# ---------------------------------------------------------------------------------------------
# Other optimizers: the wrapped update is the base update with its radial part removed

GENERIC = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05),
    "SGD-l2": lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=0.01),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "RAdam-decoupled": lambda p: torch.optim.RAdam(
        p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True
    ),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "NAdam-decoupled": lambda p: torch.optim.NAdam(
        p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True
    ),
    "Adam-l2": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9),
    "Adafactor": lambda p: torch.optim.Adafactor(p, lr=0.01, weight_decay=0.1),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
}


def expected_step(base: torch.optim.Optimizer, group: dict, name: str, w0: Tensor, g: Tensor,
                  w_base: Tensor) -> Tensor:
    """What the wrapper must produce from the base optimizer's own step ``w0 -> w_base``."""
    view = select_view(w0, g, "auto", 0.1, EPS)
    if view is None:
        return w_base
    kind = decay_kind(base, group)
    rate = 0.0 if kind == "coupled" else group["lr"] * group["weight_decay"]
    if kind == "sgd":
        rate /= 1 - group["momentum"]
    update = w_base.double() - (1 - rate) * w0.double()  # the base's update without its decay
    ratio = group["wd_ratio"]
    return (w0.double() * (1 - rate * ratio) + reference_projection(update, w0, view)).float()


def check_against_base(problem: Problem, make, steps: int) -> None:
    params = problem.params()
    wrapped = scaleinv.project(make(list(params.values())))
    for _ in range(steps):
        wrapped.zero_grad()
        problem.backward(params)
        assert views_of(params) == {k: EXPECTED_VIEWS[k.split("_")[0]] for k in params}
        before = {k: p.detach().clone() for k, p in params.items()}
        oracle = copy.deepcopy(wrapped.base)
        for p, q in zip(wrapped.param_groups[0]["params"], oracle.param_groups[0]["params"],
                        strict=True):
            q.grad = p.grad.clone()
        oracle.step()
        wrapped.step()
        for (name, p), q in zip(params.items(), oracle.param_groups[0]["params"], strict=True):
            w0 = before[name]
            expected = expected_step(wrapped.base, wrapped.param_groups[0], name, w0, p.grad,
                                     q.detach())
            torch.testing.assert_close(
                p.detach(), expected, rtol=0, atol=16 * FLOAT32_EPS * w0.abs().max(),
                msg=lambda m, name=name: f"{name}: {m}",
            )
            if EXPECTED_VIEWS[name.split("_")[0]] is None:
                continue
            if decay_kind(wrapped.base, wrapped.param_groups[0]) == "coupled":
                # Δ ⟂ w per row: nothing of the update changes the norm to first order
                view = EXPECTED_VIEWS[name]
                rows = 1 if view == "layer" else w0.shape[0]
                delta = (p.detach() - w0).reshape(rows, -1)
                cos = (delta * w0.reshape(rows, -1)).sum(1) / (
                    delta.norm(dim=1) * w0.reshape(rows, -1).norm(dim=1)
                )
                assert cos.abs().max() < 1e-3, (name, cos)


@pytest.mark.parametrize("name", list(GENERIC))
def test_wrapped_update_is_projected_base_update(name: str) -> None:
    check_against_base(Problem(SHAPES, seed=5), GENERIC[name], steps=3)


def test_wrapped_muon_update_is_projected() -> None:
    shapes = {"channel": (16, 32), "none": (8, 12)}
    check_against_base(
        Problem(shapes, seed=6), lambda p: torch.optim.Muon(p, lr=0.02, weight_decay=0.1), 3
    )


def test_decay_kinds() -> None:
    p = [torch.nn.Parameter(torch.ones(2, 2))]
    cases = {
        "decoupled": [torch.optim.AdamW(p), torch.optim.Adafactor(p), torch.optim.Muon(p),
                      torch.optim.RAdam(p, decoupled_weight_decay=True)],
        "coupled": [torch.optim.Adam(p), torch.optim.RAdam(p), torch.optim.Adagrad(p),
                    torch.optim.RMSprop(p)],
        "sgd": [torch.optim.SGD(p, lr=0.1)],
    }
    for kind, optimizers in cases.items():
        for optimizer in optimizers:
            assert decay_kind(optimizer, optimizer.param_groups[0]) == kind, optimizer


# ---------------------------------------------------------------------------------------------
# AdamP and SGDP: options are passed through, nothing is copied


def test_adamp_is_passed_through(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = Problem(SHAPES, seed=7)

    def no_copy(*args, **kwargs):
        raise AssertionError("the wrapper prepared (copied) tensors for AdamP")

    monkeypatch.setattr(ProjectedOptimizer, "_prepare", no_copy)
    expected, _ = run(problem, lambda p: scaleinv.AdamP(p, lr=0.01, delta=0.2, wd_ratio=0.5,
                                                        weight_decay=0.1), 5)
    actual, _ = run(
        problem,
        lambda p: scaleinv.project(scaleinv.AdamP(p, lr=0.01, weight_decay=0.1), delta=0.2,
                                   wd_ratio=0.5),
        5,
    )
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_options_fill_groups_but_keep_explicit_values() -> None:
    a, b = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(3))
    sgdp = scaleinv.SGDP([{"params": [a]}, {"params": [b], "wd_ratio": 1.0}], lr=0.1)
    wrapped = scaleinv.project(sgdp, wd_ratio=0.3, delta=0.5)
    assert [g["wd_ratio"] for g in wrapped.param_groups] == [0.3, 1.0]
    assert [g["delta"] for g in wrapped.param_groups] == [0.5, 0.5]
    adamw = torch.optim.AdamW([{"params": [a], "scale_invariant": False}, {"params": [b]}])
    wrapped = scaleinv.project(adamw, scale_invariant="auto")
    assert [g["scale_invariant"] for g in wrapped.param_groups] == [False, "auto"]


def test_only_candidate_tensors_are_copied() -> None:
    params = Problem(SHAPES).params()
    for p in params.values():
        p.grad = torch.randn_like(p)
    wrapped = scaleinv.project(torch.optim.AdamW(params.values()))
    plan = wrapped._prepare(wrapped.param_groups[0])
    assert [tuple(s.shape) for s in plan.snapshots] == [s for s in SHAPES.values() if len(s) > 1]
    wrapped.param_groups[0]["scale_invariant"] = False
    assert wrapped._prepare(wrapped.param_groups[0]).snapshots == []


# ---------------------------------------------------------------------------------------------
# Used like the base optimizer


def make_wrapped(problem: Problem, **options):
    params = problem.params()
    return params, scaleinv.project(torch.optim.AdamW(params.values(), lr=0.01), **options)


def test_is_an_optimizer_sharing_groups_and_state() -> None:
    params, wrapped = make_wrapped(Problem(SHAPES))
    assert isinstance(wrapped, torch.optim.Optimizer)
    assert wrapped.param_groups is wrapped.base.param_groups
    assert wrapped.state is wrapped.base.state
    assert wrapped.defaults is wrapped.base.defaults
    assert wrapped.param_groups[0]["delta"] == 0.1
    assert "AdamW" in repr(wrapped)
    assert wrapped.step.__name__ == "step"


def test_lr_scheduler_drives_the_base_without_warnings() -> None:
    problem = Problem(SHAPES)
    params, wrapped = make_wrapped(problem)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler = torch.optim.lr_scheduler.StepLR(wrapped, step_size=1, gamma=0.5)
        for _ in range(3):
            wrapped.zero_grad()
            problem.backward(params)
            wrapped.step()
            scheduler.step()
    assert wrapped.base.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)


def test_closure_is_evaluated_once_and_returns_the_loss() -> None:
    problem = Problem(SHAPES)
    params, wrapped = make_wrapped(problem)
    calls = []

    def closure() -> Tensor:
        calls.append(torch.is_grad_enabled())
        wrapped.zero_grad()
        return problem.backward(params)

    loss = wrapped.step(closure)
    assert calls == [True]
    assert torch.is_tensor(loss) and loss.isfinite()
    assert all(len(wrapped.state[p]) > 0 for p in params.values())


def test_grad_scaler_and_clipping_drive_the_wrapper() -> None:
    problem = Problem(SHAPES)
    params, wrapped = make_wrapped(problem)
    unscaled = problem.params()
    problem.backward(unscaled)
    grads = {k: p.grad for k, p in unscaled.items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    problem.backward(params, scale=scaler.scale)
    scaler.unscale_(wrapped)  # through the shared param_groups
    for name, p in params.items():
        torch.testing.assert_close(p.grad, grads[name])
    torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
    scaler.step(wrapped)
    scaler.update()
    assert all(wrapped.state[p]["step"] == 1 for p in params.values())


def test_zero_grad_passes_through() -> None:
    problem = Problem(SHAPES)
    params, wrapped = make_wrapped(problem)
    problem.backward(params)
    wrapped.zero_grad()
    assert all(p.grad is None for p in params.values())


def test_state_dict_round_trip_continues_the_same_trajectory() -> None:
    problem = Problem(SHAPES, seed=8)
    params, wrapped = make_wrapped(problem, wd_ratio=0.2)

    def train(params, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            problem.backward(params)
            optimizer.step()

    train(params, wrapped, 4)
    saved = copy.deepcopy(wrapped.state_dict())
    assert saved["param_groups"][0]["wd_ratio"] == 0.2
    halfway = {k: p.detach().clone() for k, p in params.items()}
    train(params, wrapped, 4)

    resumed = {k: torch.nn.Parameter(v) for k, v in halfway.items()}
    again = scaleinv.project(torch.optim.AdamW(resumed.values(), lr=0.5))
    again.load_state_dict(saved)
    assert again.param_groups[0]["wd_ratio"] == 0.2 and again.param_groups[0]["lr"] == 0.01
    train(resumed, again, 4)
    for name in params:
        assert torch.equal(resumed[name], params[name]), name


def test_plain_state_dict_loads_and_gets_the_options() -> None:
    problem = Problem(SHAPES)
    params = problem.params()
    plain = torch.optim.AdamW(params.values())
    problem.backward(params)
    plain.step()
    params2, wrapped = make_wrapped(problem, delta=0.3)
    wrapped.load_state_dict(plain.state_dict())
    assert wrapped.param_groups[0]["delta"] == 0.3
    assert wrapped.param_groups[0]["scale_invariant"] == "auto"


def test_add_param_group() -> None:
    params, wrapped = make_wrapped(Problem(SHAPES), wd_ratio=0.4)
    extra = torch.nn.Parameter(torch.randn(4, 3))
    wrapped.add_param_group({"params": [extra], "delta": 0.2})
    group = wrapped.base.param_groups[-1]
    assert (group["delta"], group["wd_ratio"], group["scale_invariant"]) == (0.2, 0.4, "auto")
    assert group["lr"] == 0.01
    with pytest.raises(ValueError, match="wd_ratio"):
        wrapped.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, 2))],
                                 "wd_ratio": 2.0})
    assert len(wrapped.param_groups) == 2


def test_step_hooks() -> None:
    problem = Problem(SHAPES)
    params, wrapped = make_wrapped(problem)
    seen = []
    handles = [
        wrapped.register_step_pre_hook(lambda opt, a, k: seen.append(("pre", opt))),
        wrapped.register_step_post_hook(lambda opt, a, k: seen.append(("post", opt))),
        wrapped.base.register_step_post_hook(lambda opt, a, k: seen.append(("base", opt))),
        register_optimizer_step_pre_hook(
            lambda opt, a, k: seen.append(("global", opt))
        ),
    ]
    try:
        problem.backward(params)
        wrapped.step()
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [("global", wrapped), ("pre", wrapped), ("base", wrapped.base),
                    ("post", wrapped)]


def test_state_dict_hooks() -> None:
    params, wrapped = make_wrapped(Problem(SHAPES))
    seen = []
    wrapped.register_state_dict_pre_hook(lambda opt: seen.append(("save", opt)))
    wrapped.register_state_dict_post_hook(lambda opt, sd: {**sd, "note": 1})
    wrapped.register_load_state_dict_pre_hook(lambda opt, sd: seen.append(("load", sd.pop("note"))))
    wrapped.register_load_state_dict_post_hook(lambda opt: seen.append(("loaded", opt)))
    state_dict = wrapped.state_dict()
    assert state_dict["note"] == 1
    wrapped.load_state_dict(state_dict)
    assert seen == [("save", wrapped), ("load", 1), ("loaded", wrapped)]


def test_copy_and_pickle() -> None:
    problem = Problem(SHAPES)
    params, wrapped = make_wrapped(problem, wd_ratio=0.25)
    problem.backward(params)
    wrapped.step()
    twin = copy.deepcopy(wrapped)
    assert twin.param_groups[0]["wd_ratio"] == 0.25 and twin.base is not wrapped.base
    restored = pickle.loads(pickle.dumps(wrapped))
    assert isinstance(restored, ProjectedOptimizer) and restored.eps == wrapped.eps
    assert restored.register_step_pre_hook(lambda *a: None) is not None


def test_public_attributes_read_through() -> None:
    _, wrapped = make_wrapped(Problem(SHAPES))
    wrapped.base.custom_flag = 3
    assert wrapped.custom_flag == 3
    with pytest.raises(AttributeError):
        _ = wrapped._no_such_private


# ---------------------------------------------------------------------------------------------
# Bad input


def adamw() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.ones(3, 2))])


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"delta": 0.0}, ValueError, "delta"),
        ({"delta": -1.0}, ValueError, "delta"),
        ({"wd_ratio": 1.5}, ValueError, r"wd_ratio.*\[0, 1\]"),
        ({"wd_ratio": -0.1}, ValueError, "wd_ratio"),
        ({"scale_invariant": True}, ValueError, "ambiguous"),
        ({"scale_invariant": "rows"}, ValueError, "scale_invariant"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"delta": "0.1"}, TypeError, "delta"),
    ],
)
def test_bad_options(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        scaleinv.project(adamw(), **options)


def test_bad_optimizers() -> None:
    p = [torch.nn.Parameter(torch.ones(3, 2))]
    with pytest.raises(TypeError, match="instance"):
        scaleinv.project(torch.optim.AdamW)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        scaleinv.project(p)
    with pytest.raises(TypeError, match="already projected"):
        scaleinv.project(scaleinv.project(adamw()))
    with pytest.raises(TypeError, match="LBFGS"):
        scaleinv.project(torch.optim.LBFGS(p))

    class Clashing(torch.optim.SGD):
        def __init__(self, params):
            super().__init__(params, lr=0.1)
            self.defaults["delta"] = 1.0

    with pytest.raises(ValueError, match="delta"):
        scaleinv.project(Clashing(p))
    with pytest.raises(ValueError, match="momentum"):
        scaleinv.project(torch.optim.SGD(p, lr=0.1, momentum=1.0, weight_decay=0.1))
    two_groups = torch.optim.AdamW([{"params": p}, {"params": [torch.nn.Parameter(torch.ones(3))]}])
    with pytest.raises(ValueError, match="dim"):
        scaleinv.project(two_groups, scale_invariant="channel")
    assert "scale_invariant" not in two_groups.param_groups[0]  # nothing changed


def test_sparse_gradients_are_refused() -> None:
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    wrapped = scaleinv.project(torch.optim.SparseAdam(embedding.parameters()))
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        wrapped.step()
    wrapped.param_groups[0]["scale_invariant"] = False
    wrapped.step()
