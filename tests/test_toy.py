"""The 2-D toy: norms against values computed independently of the optimizers (numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from scaleinv.experiments.toy import (
    TARGET,
    plot_toy,
    run_toy,
    run_toy_suite,
    toy_gradient,
    toy_table,
)

LR = 0.1
STEPS = 60
EPS = 1e-8  # SGDP's default eps in the unit vector
TARGET_VECTOR = np.array(TARGET)


def _updates(trajectory: np.ndarray) -> np.ndarray:
    return -(trajectory[1:] - trajectory[:-1]) / LR


def test_gradient_descent_norm_grows_by_the_squared_step_exactly() -> None:
    run = run_toy(0.0, project=False, lr=LR, steps=STEPS)
    w = run.trajectory
    for t in range(STEPS):
        g = toy_gradient(w[t], TARGET_VECTOR)
        np.testing.assert_allclose(w[t + 1], w[t] - LR * g, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(w[t + 1] @ w[t + 1], w[t] @ w[t] + LR**2 * (g @ g), rtol=1e-12)


@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_projected_momentum_matches_an_independent_recursion(momentum: float) -> None:
    """SGDP: ``buf = m buf + g``, ``p = buf - u <u, buf>`` with ``u = w / (|w| + eps)``, and
    ``|w'|^2 = |w|^2 + lr^2 |p|^2`` (exact up to the ``eps`` of the unit vector)."""
    run = run_toy(momentum, project=True, lr=LR, steps=STEPS)
    w = run.trajectory
    buf = np.zeros(2)
    for t in range(STEPS):
        buf = momentum * buf + toy_gradient(w[t], TARGET_VECTOR)
        u = w[t] / (np.linalg.norm(w[t]) + EPS)
        p = buf - u * (u @ buf)
        np.testing.assert_allclose(w[t + 1], w[t] - LR * p, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(w[t + 1] @ w[t + 1], w[t] @ w[t] + LR**2 * (p @ p), rtol=1e-7)


@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_momentum_without_projection_matches_heavy_ball(momentum: float) -> None:
    run = run_toy(momentum, project=False, lr=LR, steps=STEPS)
    w = np.array(run.trajectory[0])
    buf = np.zeros(2)
    for t in range(STEPS):
        buf = momentum * buf + toy_gradient(w, TARGET_VECTOR)
        w = w - LR * buf
        np.testing.assert_allclose(run.trajectory[t + 1], w, rtol=1e-9, atol=1e-12)


def test_momentum_grows_the_norm_and_the_projection_stops_it() -> None:
    runs = {(r.momentum, r.projected): r for r in run_toy_suite(lr=LR, steps=100)}
    final = {key: run.norms[-1] for key, run in runs.items()}
    assert final[(0.99, False)] > final[(0.9, False)] > 2 * final[(0.9, True)]
    assert final[(0.99, False)] > 10 * final[(0.99, True)]
    assert final[(0.0, False)] < final[(0.9, True)] < 1.5
    # Scale invariance: every run heads to the target direction, whatever its norm.
    assert all(run.angles[-1] < 1.0 for run in runs.values())


def test_table_and_plot(tmp_path) -> None:
    runs = run_toy_suite(lr=LR, steps=20)
    table = toy_table(runs)
    assert "GD + momentum 0.99 + projection" in table and "27.87" in table
    assert table.count("\n") == len(runs) + 2
    plot_toy(runs, tmp_path / "toy.png")
    assert (tmp_path / "toy.png").read_bytes()[:4] == b"\x89PNG"
