"""Tests for scaleinv.monitor: step-size diagnostics recorded through optimizer hooks."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import scaleinv
from scaleinv import SGDP, AdamP
from scaleinv.inspect import find_scale_invariant
from scaleinv.monitor import RECORD_KEYS, StepSizeMonitor, load_records
from scaleinv.projection import select_view

torch.set_num_threads(1)


def bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int,
          on_grads: Any = None) -> None:
    x, y = batch()
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if on_grads is not None:
            on_grads(step)
        optimizer.step()


def test_records_have_exactly_the_documented_keys() -> None:
    torch.manual_seed(0)
    model = bn_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = StepSizeMonitor(model, optimizer)
    train(model, optimizer, steps=3)
    records = monitor.records
    names = [n for n, _ in model.named_parameters()]
    assert len(records) == 3 * len(names)
    assert all(tuple(r) == RECORD_KEYS for r in records)
    assert [r["step"] for r in records] == [s for s in (1, 2, 3) for _ in names]
    assert [r["name"] for r in records[: len(names)]] == names
    assert {r["kind"] for r in records} == {"unknown"}
    assert all(r["projected"] is None and r["view"] is None for r in records)
    assert all(isinstance(r[k], float) for r in records for k in RECORD_KEYS[3:10])


def test_measurements_match_a_direct_computation() -> None:
    torch.manual_seed(0)
    model = bn_cnn()
    optimizer = AdamP(model.parameters(), lr=0.05, weight_decay=0.1)
    monitor = StepSizeMonitor(model, optimizer, every=2)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def remember(step: int) -> None:
        snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    train(model, optimizer, steps=3, on_grads=remember)
    after = {n: p.detach() for n, p in model.named_parameters()}
    records = [r for r in monitor.records if r["step"] == 3]
    assert {r["step"] for r in monitor.records} == {1, 3}
    for r in records:
        w0, w1 = snapshots[3][r["name"]].flatten().double(), after[r["name"]].flatten().double()
        dw = w1 - w0
        radial = torch.dot(dw, w0) / w0.norm()
        tangential = (dw - w0 / w0.norm() * radial).norm()
        cos = torch.dot(w0, w1) / (w0.norm() * w1.norm())
        expected = {
            "weight_norm": w1.norm(), "norm_change": w1.norm() - w0.norm(),
            "update_norm": dw.norm(), "radial_norm": radial.abs(),
            "tangential_norm": tangential, "effective_step": dw.norm() / w0.norm(),
            "angular_update": torch.acos(cos.clamp(-1, 1)),
        }
        for key, value in expected.items():
            assert r[key] == pytest.approx(float(value), rel=1e-4, abs=1e-6), (r["name"], key)


def test_every_k_records_steps_one_k_plus_one() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = StepSizeMonitor(model, optimizer, every=3)
    x = torch.randn(5, 4)
    for _ in range(8):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    assert sorted({r["step"] for r in monitor.records}) == [1, 4, 7]


@pytest.mark.parametrize("make", [
    lambda p: AdamP(p, lr=1e-2, weight_decay=1e-2, foreach=True),
    lambda p: AdamP(p, lr=1e-2, foreach=False),
    lambda p: SGDP(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda p: torch.optim.AdamW(p, lr=1e-2),
])
def test_monitor_does_not_change_training(make) -> None:
    def trajectory(monitored: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = bn_cnn()
        optimizer = make(model.parameters())
        monitor = StepSizeMonitor(model, optimizer, every=2) if monitored else None
        train(model, optimizer, steps=4)
        if monitor is not None:
            assert monitor.records
            monitor.close()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(trajectory(True), trajectory(False), strict=True):
        assert torch.equal(a, b)


def test_projection_decision_is_select_views() -> None:
    torch.manual_seed(0)
    model = bn_cnn()
    groups = [
        {"params": [model[0].weight], "scale_invariant": "layer"},
        {"params": [p for n, p in model.named_parameters() if n != "0.weight"]},
    ]
    optimizer = AdamP(groups, lr=0.05, delta=0.1, eps=1e-8)
    monitor = StepSizeMonitor(model, optimizer)
    expected: dict[tuple[int, str], str | None] = {}

    def decide(step: int) -> None:
        for name, p in model.named_parameters():
            mode = "layer" if name == "0.weight" else "auto"
            expected[step, name] = select_view(p.detach().clone(), p.grad, mode, 0.1, 1e-8)

    train(model, optimizer, steps=3, on_grads=decide)
    records = monitor.records
    assert len(records) == len(expected)
    for r in records:
        assert r["view"] == expected[r["step"], r["name"]], r
        assert r["projected"] is (r["view"] is not None)
    views = {r["name"]: r["view"] for r in records}
    assert views["0.weight"] == "layer" and views["3.weight"] == "channel"
    assert views["8.weight"] is None and views["1.weight"] is None


def test_records_without_gradient_have_no_projection() -> None:
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 2, bias=False))
    optimizer = SGDP(model.parameters(), lr=0.1)
    monitor = StepSizeMonitor(model, optimizer)
    model[1](torch.randn(2, 3)).sum().backward()  # model[0] gets no gradient
    optimizer.step()
    first = monitor.records[0]
    assert first["name"] == "0.weight" and first["projected"] is None
    assert first["update_norm"] == 0.0 and first["effective_step"] == 0.0


class SyncCounter(TorchFunctionMode):
    """Counts calls that read a tensor's value on the host."""

    NAMES = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__",
                       "cpu", "numpy", "__array__"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make", [
    lambda p: AdamP(p, lr=1e-2, foreach=True),
    lambda p: SGDP(p, lr=0.1, momentum=0.9, foreach=True),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
])
def test_recording_adds_no_host_read_until_flush(make) -> None:
    def reads_during_steps(monitored: bool) -> tuple[int, StepSizeMonitor | None]:
        torch.manual_seed(0)
        model = bn_cnn()
        optimizer = make(model.parameters())
        monitor = StepSizeMonitor(model, optimizer, every=2) if monitored else None
        x, y = batch()
        counter = SyncCounter()
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with counter:
                optimizer.step()
        return counter.count, monitor

    baseline, _ = reads_during_steps(False)
    with_monitor, monitor = reads_during_steps(True)
    assert with_monitor == baseline
    assert monitor is not None
    counter = SyncCounter()
    with counter:
        monitor.flush()
    assert counter.count == 1  # one .tolist() for all pending steps
    assert sorted({r["step"] for r in monitor.records}) == [1, 3, 5]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("make", [
    lambda p: AdamP(p, lr=1e-2, foreach=True, capturable=True),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
])
def test_recording_adds_no_cuda_sync(make) -> None:
    def syncs_during_steps(monitored: bool) -> tuple[int, StepSizeMonitor | None]:
        torch.manual_seed(0)
        model = bn_cnn().cuda()
        optimizer = make(model.parameters())
        monitor = StepSizeMonitor(model, optimizer, every=2) if monitored else None
        x, y = (t.cuda() for t in batch())
        syncs = 0
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    optimizer.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs += sum("synchroniz" in str(w.message) for w in caught)
        return syncs, monitor

    baseline, _ = syncs_during_steps(False)
    with_monitor, monitor = syncs_during_steps(True)
    assert with_monitor == baseline
    assert monitor is not None and sorted({r["step"] for r in monitor.records}) == [1, 3, 5]


def test_wrapped_optimizer_projection_is_reported() -> None:
    torch.manual_seed(0)
    model = bn_cnn()
    optimizer = scaleinv.project(torch.optim.AdamW(model.parameters(), lr=1e-2), eps=1e-6)
    monitor = StepSizeMonitor(model, optimizer)
    expected: dict[tuple[int, str], str | None] = {}

    def decide(step: int) -> None:
        for name, p in model.named_parameters():
            expected[step, name] = select_view(p.detach().clone(), p.grad, "auto", 0.1, 1e-6)

    train(model, optimizer, steps=2, on_grads=decide)
    assert {(r["step"], r["name"]): r["view"] for r in monitor.records} == expected
    assert {r["name"] for r in monitor.records if r["projected"]} == {"0.weight", "3.weight"}


# -- the paper's identity ----------------------------------------------------------------------


def scale_invariant_toy() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A weight followed by BatchNorm: the loss is invariant to rescaling each of its rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.BatchNorm1d(6, affine=False)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 8, generator=g, dtype=torch.float64)
    target = torch.randn(32, 6, generator=g, dtype=torch.float64)
    return model, x, target


def run_toy(make, steps: int = 25) -> tuple[StepSizeMonitor, list[float]]:
    model, x, target = scale_invariant_toy()
    optimizer = make(model.parameters())
    monitor = StepSizeMonitor(model, optimizer, invariance={"0.weight": "channel"})
    grad_norms = []
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        grad_norms.append(float(model[0].weight.grad.norm()))
        optimizer.step()
    return monitor, grad_norms


def test_projection_makes_updates_tangential_and_norm_growth_pythagorean() -> None:
    lr = 0.5
    monitor, grad_norms = run_toy(lambda p: SGDP(p, lr=lr, momentum=0.0))
    records = monitor.records
    for r, g in zip(records, grad_norms, strict=True):
        before = r["weight_norm"] - r["norm_change"]
        assert r["projected"] is True and r["view"] == "channel"
        assert r["radial_norm"] <= 1e-6 * r["update_norm"]
        # |w_{t+1}|^2 = |w_t|^2 + |dw|^2 with |dw| = lr |p|
        assert r["weight_norm"] ** 2 - before**2 == pytest.approx(r["update_norm"] ** 2,
                                                                 rel=1e-4)
        assert r["update_norm"] == pytest.approx(lr * g, rel=1e-6)
        assert r["effective_step"] == pytest.approx(r["angular_update"], rel=0.05)


def test_momentum_without_projection_grows_the_norm_faster() -> None:
    projected, _ = run_toy(lambda p: SGDP(p, lr=0.1, momentum=0.9))
    plain, _ = run_toy(lambda p: SGDP(p, lr=0.1, momentum=0.9, scale_invariant=False))
    for r in projected.records:  # with momentum too, the update stays tangential
        before = r["weight_norm"] - r["norm_change"]
        assert r["radial_norm"] <= 1e-6 * r["update_norm"]
        assert r["weight_norm"] ** 2 - before**2 == pytest.approx(r["update_norm"] ** 2,
                                                                 rel=1e-4)
    with_projection = projected.summary()["channel"]
    without = plain.summary()["channel"]
    assert without["projected_fraction"] == 0.0 and with_projection["projected_fraction"] == 1.0
    assert without["mean_radial_fraction"] > 0.1
    assert without["weight_norm_ratio"] > 1.5 * with_projection["weight_norm_ratio"]
    growth = [r["weight_norm"] ** 2 - (r["weight_norm"] - r["norm_change"]) ** 2 - r[
        "update_norm"] ** 2 for r in plain.records]
    assert sum(growth) > 0  # the radial parts add norm beyond the Pythagorean growth


# -- summary, files, hooks, arguments ----------------------------------------------------------


def test_summary_per_kind_with_an_inspection() -> None:
    torch.manual_seed(0)
    model = bn_cnn()
    x, _ = batch()
    report = find_scale_invariant(model, x)
    initial = {n: p.detach().norm().item() for n, p in model.named_parameters()}
    optimizer = SGDP(model.parameters(), lr=0.1, momentum=0.9)
    monitor = StepSizeMonitor(model, optimizer, invariance=report)
    train(model, optimizer, steps=3)
    summary = monitor.summary()
    assert set(summary) == {"channel", "none"}
    channel = summary["channel"]
    names = ["0.weight", "3.weight"]
    assert channel["params"] == 2 and channel["records"] == 6 and channel["steps"] == 3
    final = math.sqrt(sum(model.get_parameter(n).detach().norm().item() ** 2 for n in names))
    start = math.sqrt(sum(initial[n] ** 2 for n in names))
    assert channel["initial_weight_norm"] == pytest.approx(start, rel=1e-5)
    assert channel["final_weight_norm"] == pytest.approx(final, rel=1e-5)
    assert channel["weight_norm_ratio"] == pytest.approx(final / start, rel=1e-5)
    assert channel["projected_fraction"] == 1.0
    assert channel["mean_radial_fraction"] < 1e-3
    records = [r for r in monitor.records if r["kind"] == "channel"]
    assert channel["mean_effective_step"] == pytest.approx(
        sum(r["effective_step"] for r in records) / len(records))


def test_csv_and_jsonl_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = bn_cnn()
    optimizer = AdamP(model.parameters(), lr=1e-2)
    monitor = StepSizeMonitor(model, optimizer, invariance={"0.weight": "channel"})
    train(model, optimizer, steps=2)
    csv_path = monitor.to_csv(tmp_path / "log.csv")
    jsonl_path = monitor.to_jsonl(tmp_path / "log.jsonl")
    assert csv_path.read_text().splitlines()[0] == ",".join(RECORD_KEYS)
    assert load_records(csv_path) == monitor.records
    non_finite = [r for r in monitor.records if not math.isfinite(r["effective_step"])]
    assert non_finite, "the bias starts at zero: its effective step is infinite"

    def forbid(name: str) -> None:
        raise ValueError(f"{name} is not strict JSON")

    for line in jsonl_path.read_text().splitlines():  # strict JSON: null, never NaN/Infinity
        json.loads(line, parse_constant=forbid)
    assert missing_as_none(load_records(jsonl_path)) == missing_as_none(monitor.records)


def missing_as_none(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: None if isinstance(v, float) and not math.isfinite(v) else v
             for k, v in r.items()} for r in records]


def test_close_removes_hooks_and_keeps_records() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with StepSizeMonitor(model, optimizer) as monitor:
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
    optimizer.step()
    monitor.close()  # closing twice is harmless
    assert {r["step"] for r in monitor.records} == {1}
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_params_given_as_iterables() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)  # model[1] is not optimized
    by_list = StepSizeMonitor(list(model[0].parameters()), optimizer)
    by_pairs = StepSizeMonitor(model[0].named_parameters(), optimizer,
                               invariance={"weight": "layer"})
    by_module = StepSizeMonitor(model, optimizer)  # a module's frozen parameters are skipped
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    assert [r["name"] for r in by_list.records] == ["param0", "param1"]
    assert [(r["name"], r["kind"]) for r in by_pairs.records] == [
        ("weight", "layer"), ("bias", "unknown")]
    assert [r["name"] for r in by_module.records] == ["0.weight", "0.bias"]


def test_parameters_the_optimizer_does_not_hold_are_refused() -> None:
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"model_or_params holds 2 parameter\(s\).*weight"):
        StepSizeMonitor(other.named_parameters(), optimizer)
    with pytest.raises(ValueError, match="model_or_params holds 1 parameter"):
        StepSizeMonitor([model.weight, other.bias], optimizer)
    with pytest.raises(ValueError, match="model_or_params has no parameter"):
        StepSizeMonitor(other, optimizer)
    exhausted = model.parameters()
    list(exhausted)
    with pytest.raises(ValueError, match="exhausted generator"):
        StepSizeMonitor(exhausted, optimizer)


def test_bad_arguments() -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="every"):
        StepSizeMonitor(model, optimizer, every=0)
    with pytest.raises(TypeError, match="every"):
        StepSizeMonitor(model, optimizer, every=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer"):
        StepSizeMonitor(model, "sgd")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model_or_params"):
        StepSizeMonitor(model.weight, optimizer)
    with pytest.raises(TypeError, match="model_or_params"):
        StepSizeMonitor([1, 2], optimizer)
    with pytest.raises(TypeError, match="writer"):
        StepSizeMonitor(model, optimizer, writer=object())


class FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.flushed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        self.flushed = True


def test_writer_receives_scalars_at_each_flush() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = FakeWriter()
    monitor = StepSizeMonitor(model, optimizer, writer=writer, flush_every=2)
    x = torch.randn(4, 3)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
    assert {step for _, _, step in writer.scalars} == {1, 2}  # flushed after two steps
    monitor.close()
    assert writer.flushed and {step for _, _, step in writer.scalars} == {1, 2, 3}
    record = monitor.records[0]
    assert ("scaleinv/weight/effective_step", record["effective_step"], 1) in writer.scalars


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed")
def test_tensorboard_writer_from_a_log_directory(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = StepSizeMonitor(model, optimizer, writer=tmp_path / "tb")
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    monitor.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
