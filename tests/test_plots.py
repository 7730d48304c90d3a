"""Tests for scaleinv.plots: the paper's figures from monitor logs."""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleinv import SGDP
from scaleinv.monitor import StepSizeMonitor
from scaleinv.plots import norm_and_step_curves, plot_norms_and_steps

torch.set_num_threads(1)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(step: int, name: str, kind: str, before: float, after: float,
           effective: float) -> dict:
    return {"step": step, "name": name, "kind": kind, "weight_norm": after,
            "norm_change": after - before, "update_norm": effective * before,
            "radial_norm": 0.0, "tangential_norm": effective * before,
            "effective_step": effective, "angular_update": effective, "projected": True,
            "view": "channel"}


def test_curves_aggregate_the_scale_invariant_tensors() -> None:
    records = [
        record(1, "a", "channel", 3.0, 3.0, 0.1), record(1, "b", "layer", 4.0, 4.0, 0.3),
        record(1, "c", "none", 1.0, 9.0, 5.0),
        record(3, "a", "channel", 3.0, 6.0, 0.2), record(3, "b", "layer", 4.0, 8.0, 0.4),
    ]
    steps, ratios, effective = norm_and_step_curves(records)
    assert steps == [1, 3]
    assert ratios == pytest.approx([1.0, 2.0])  # sqrt(36 + 64) / sqrt(9 + 16)
    assert effective == pytest.approx([0.2, 0.3])
    _, all_ratios, _ = norm_and_step_curves(records, kinds=["none"])
    assert all_ratios == pytest.approx([9.0])
    _, _, unknown = norm_and_step_curves([dict(r, kind="unknown") for r in records[:2]])
    assert unknown == pytest.approx([0.2])  # no invariant kinds: every tensor
    assert math.isnan(norm_and_step_curves([record(1, "z", "channel", 0.0, 0.0, 0.0)])[1][0])


def toy_log(scale_invariant, tmp_path, suffix: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.BatchNorm1d(6, affine=False))
    optimizer = SGDP(model.parameters(), lr=0.1, momentum=0.9, scale_invariant=scale_invariant)
    monitor = StepSizeMonitor(model, optimizer, invariance={"0.weight": "channel"})
    x, target = torch.randn(16, 8), torch.randn(16, 6)
    for _ in range(10):
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        optimizer.step()
    if suffix == "records":
        return monitor.records
    writer = monitor.to_csv if suffix == ".csv" else monitor.to_jsonl
    return writer(tmp_path / f"log{scale_invariant}{suffix}")


def test_plot_writes_a_png_from_records_and_files(tmp_path) -> None:
    backend = matplotlib.get_backend()
    logs = {
        "SGD (momentum)": toy_log(False, tmp_path, ".csv"),
        "SGDP": toy_log("auto", tmp_path, ".jsonl"),
        "SGDP, records": toy_log("channel", tmp_path, "records"),
    }
    out = plot_norms_and_steps(logs, tmp_path / "figure.png", title="norm growth")
    assert out == tmp_path / "figure.png"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert matplotlib.get_backend() == backend  # the global backend is left alone


def test_plot_bad_logs(tmp_path) -> None:
    with pytest.raises(ValueError, match="logs"):
        plot_norms_and_steps({}, tmp_path / "x.png")
    with pytest.raises(TypeError, match="log"):
        plot_norms_and_steps({"a": 3}, tmp_path / "x.png")
