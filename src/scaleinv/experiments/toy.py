"""The paper's 2-D toy problem: a loss that depends only on the direction of ``w``.

``L(w) = -<w / |w|, w* / |w*|>`` (minus the cosine similarity to a target ``w*``). Its gradient
``g = -(u* - <u*, u> u) / |w|`` (``u = w / |w|``) is orthogonal to ``w``, so plain gradient
descent grows the norm only by second-order terms, ``|w_{t+1}|^2 = |w_t|^2 + lr^2 |g_t|^2``;
momentum adds the radial part of past gradients and grows the norm much faster, which shrinks
the effective step ``lr / |w|^2``. Removing the radial part of each update (SGDP) keeps the
norm growth at the second-order level: ``|w_{t+1}|^2 = |w_t|^2 + lr^2 |p_t|^2``.

The optimizers are the real ones: ``torch.optim.SGD`` and :class:`scaleinv.SGDP`, in float64,
on ``w`` stored as a ``[1, 2]`` tensor (one channel, so SGDP's cosine test sees it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from scaleinv.sgdp import SGDP

__all__ = ["ToyRun", "plot_toy", "run_toy", "run_toy_suite", "toy_gradient", "toy_loss",
           "toy_table"]

TARGET = (1.0, 0.0)
CONVERGED_DEGREES = 1.0


def toy_loss(w: Tensor, target: Tensor) -> Tensor:
    """``-<w/|w|, w*/|w*|>``: depends only on the direction of ``w``."""
    loss: Tensor = -(w / w.norm() * (target / target.norm())).sum()  # Tensor `/` is untyped
    return loss


def toy_gradient(w: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The analytic gradient of :func:`toy_loss`: ``-(u* - <u*, u> u) / |w|``."""
    norm = np.linalg.norm(w)
    u, u_star = w / norm, target / np.linalg.norm(target)
    gradient: np.ndarray = -(u_star - (u_star @ u) * u) / norm
    return gradient


@dataclass
class ToyRun:
    """One optimizer's trajectory ``[steps + 1, 2]`` on the toy problem."""

    label: str
    momentum: float
    projected: bool
    trajectory: np.ndarray

    @property
    def norms(self) -> np.ndarray:
        norms: np.ndarray = np.linalg.norm(self.trajectory, axis=1)
        return norms

    @property
    def angles(self) -> np.ndarray:
        """Angle to the target, in degrees, at every step."""
        angles: np.ndarray = np.degrees(
            np.abs(np.arctan2(self.trajectory[:, 1], self.trajectory[:, 0])))
        return angles

    @property
    def steps_to_converge(self) -> int | None:
        """First step from which the angle to the target stays below one degree."""
        far = np.nonzero(self.angles >= CONVERGED_DEGREES)[0]
        if len(far) == 0:
            return 0
        last_far = int(far[-1])
        return None if last_far == len(self.angles) - 1 else last_far + 1


def run_toy(
    momentum: float, project: bool, *, lr: float = 0.1, steps: int = 100,
    start_degrees: float = 135.0,
) -> ToyRun:
    """Optimise the toy loss from ``|w_0| = 1`` at ``start_degrees`` from the target."""
    angle = math.radians(start_degrees)
    w = torch.tensor([[math.cos(angle), math.sin(angle)]], dtype=torch.float64,
                     requires_grad=True)
    target = torch.tensor([TARGET], dtype=torch.float64)
    optimizer_class = SGDP if project else torch.optim.SGD
    optimizer = optimizer_class([w], lr=lr, momentum=momentum)
    trajectory = [w.detach()[0].clone()]
    for _ in range(steps):
        optimizer.zero_grad()
        toy_loss(w, target).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        trajectory.append(w.detach()[0].clone())
    name = "GD" if momentum == 0 else f"GD + momentum {momentum:g}"
    label = name + (" + projection" if project else "")
    return ToyRun(label, momentum, project, torch.stack(trajectory).numpy())


def run_toy_suite(*, lr: float = 0.1, steps: int = 100, start_degrees: float = 135.0,
                  momenta: tuple[float, ...] = (0.9, 0.99)) -> list[ToyRun]:
    """GD, GD + momentum for each of ``momenta``, and the same with the projection (SGDP)."""
    settings = [(0.0, False)] + [(m, False) for m in momenta] + [(m, True) for m in momenta]
    return [run_toy(m, p, lr=lr, steps=steps, start_degrees=start_degrees) for m, p in settings]


PAPER_NORMS = {0.9: 2.93, 0.99: 27.87}
"""Final norms the paper's project page reports for momentum GD without projection."""


def toy_table(runs: list[ToyRun]) -> str:
    """Markdown table of final norms, final angles and steps to converge."""
    lines = [
        "| optimizer | final norm | project page | final angle (deg) | steps to < 1 deg |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        paper = PAPER_NORMS.get(run.momentum) if not run.projected else None
        converged = run.steps_to_converge
        lines.append(
            f"| {run.label} | {run.norms[-1]:.3f} | {'' if paper is None else paper} "
            f"| {run.angles[-1]:.3f} | {'not within the run' if converged is None else converged} |"
        )
    return "\n".join(lines) + "\n"


ANGLE_FLOOR_DEGREES = 1e-3
"""The angle panel is logarithmic: angles below this value are drawn at it."""


def plot_toy(runs: list[ToyRun], path: Path, plane_limit: float = 3.0) -> None:
    """Trajectories in the plane (clipped to ``|x|, |y| <= plane_limit``), the angle to the
    target (drawn at :data:`ANGLE_FLOOR_DEGREES` when below it) and the norm, against steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(14, 5), layout="constrained")
    FigureCanvasAgg(figure)
    plane, angles, norms = figure.subplots(1, 3)
    circle = np.linspace(0, 2 * np.pi, 200)
    plane.plot(np.cos(circle), np.sin(circle), color="0.8", lw=1, label="|w| = 1")
    plane.plot([0, plane_limit], [0, 0], color="k", lw=0.8, ls=":", label="target direction w*")
    markers = ["o", "v", "^", "s", "D"]
    for run, marker in zip(runs, markers * len(runs), strict=False):
        style = {"ls": "--" if run.momentum > 0 and not run.projected else "-", "lw": 1.5,
                 "marker": marker, "ms": 4, "markevery": max(1, len(run.norms) // 10),
                 "label": run.label}
        plane.plot(run.trajectory[:, 0], run.trajectory[:, 1], **style)
        angles.plot(np.maximum(run.angles, ANGLE_FLOOR_DEGREES), **style)
        norms.plot(run.norms, **style)
    plane.set_xlim(-plane_limit, plane_limit)
    plane.set_ylim(-plane_limit, plane_limit)
    plane.set_aspect("equal")
    plane.set(xlabel="w[0]", ylabel="w[1]")
    plane.set_title(f"trajectories of w (clipped to ±{plane_limit:g})", fontsize=11)
    angles.set_yscale("log")
    angles.set_ylabel(f"angle to w* (degrees, log; floored at {ANGLE_FLOOR_DEGREES:g})")
    angles.axhline(CONVERGED_DEGREES, color="0.5", lw=0.8)
    angles.set_title(f"convergence (grey line: {CONVERGED_DEGREES:g} degree)", fontsize=11)
    norms.set_yscale("log")
    norms.set_ylabel("|w| (log)")
    norms.set_title("weight norm", fontsize=11)
    for ax in (angles, norms):
        ax.set_xlabel("step")
    for ax in (plane, angles, norms):
        ax.grid(alpha=0.3)
    norms.legend(fontsize=9)
    plane.legend(handles=plane.get_lines()[:2], fontsize=9, loc="lower left")
    figure.suptitle("Toy: L(w) = -cos(w, w*), w* = (1, 0), |w_0| = 1; SGD and SGDP in float64",
                    fontsize=12)
    figure.savefig(path, dpi=110)
