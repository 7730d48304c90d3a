"""Result tables (Markdown, CSV, JSON) and figures (PNG) of a comparison.

Files written into the output folder:

* ``summary.md``, ``summary.csv``, ``summary.json``: one row per optimizer, mean and standard
  deviation over seeds of the final metric, of the final weight-norm ratio of the
  scale-invariant tensors and of the mean effective step size, the share of projected updates,
  the mean wall time; and each "P" optimizer against its base optimizer.
* ``curves.png``: metric, weight-norm ratio and effective step size per epoch (mean over seeds).
* ``steps.png``: the monitor's per-step weight norms and effective steps of seed 0
  (:func:`scaleinv.plots.plot_norms_and_steps`).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from scaleinv.experiments.optimizers import PROJECTED
from scaleinv.experiments.runner import RunResult
from scaleinv.experiments.tasks import Task

__all__ = ["BASE_OF", "Metadata", "summarise", "write_figures", "write_tables"]

BASE_OF: dict[str, tuple[str, ...]] = {
    "sgdp": ("sgd",),
    "adamp": ("adamw", "adam"),
    "radamp": ("radam",),
    "nadamp": ("nadam",),
}
"""Base optimizer(s) of each "P" optimizer, first match wins (same hyperparameters)."""


@dataclass
class Metadata:
    """How a comparison was run: task, settings, machine and command."""

    task: str
    description: str
    metric: str
    higher_is_better: bool
    optimizers: list[str]
    hyperparameters: dict[str, str]
    seeds: list[int]
    epochs: int
    device: str
    scale_invariant: dict[str, str]
    command: str
    machine: str
    torch: str
    threads: int
    started: str

    @classmethod
    def collect(cls, task: Task, optimizers: Sequence[str], seeds: int, epochs: int,
                device: str, invariant: dict[str, str]) -> Metadata:
        return cls(
            task=task.name, description=task.description, metric=task.metric,
            higher_is_better=task.higher_is_better, optimizers=list(optimizers),
            hyperparameters={name: task.hyperparameters(name) for name in optimizers},
            seeds=list(range(seeds)), epochs=epochs, device=device,
            scale_invariant=dict(invariant),
            command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                    f"{platform.system()} {platform.release()}",
            torch=torch.__version__, threads=torch.get_num_threads(),
            started=datetime.datetime.now().isoformat(timespec="seconds"),
        )


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def summarise(results: Sequence[RunResult], optimizers: Sequence[str]) -> list[dict[str, Any]]:
    """One row per optimizer (in ``optimizers`` order) over the seeds it finished."""
    rows = []
    for name in optimizers:
        runs = [r for r in results if r.optimizer == name]
        if not runs:
            continue
        row: dict[str, Any] = {"optimizer": name, "runs": len(runs)}
        for key in ("metric", "norm_ratio", "effective_step"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([getattr(r, key) for r in runs])
        row["projected_fraction"] = statistics.fmean(r.projected_fraction for r in runs)
        row["wall_time_mean"] = statistics.fmean(r.wall_time for r in runs)
        row["diverged"] = sum(r.diverged for r in runs)
        rows.append(row)
    return rows


def compare_pairs(rows: Sequence[dict[str, Any]], higher_is_better: bool) -> list[dict[str, Any]]:
    """Each "P" optimizer against its base: metric difference and both norm ratios and steps."""
    by_name = {row["optimizer"]: row for row in rows}
    pairs = []
    for projected, bases in BASE_OF.items():
        base = next((b for b in bases if b in by_name), None)
        if projected not in by_name or base is None:
            continue
        p, b = by_name[projected], by_name[base]
        gain = p["metric_mean"] - b["metric_mean"]
        pairs.append({
            "projected": projected, "base": base,
            "metric_gain": gain if higher_is_better else -gain,
            "norm_ratio": (b["norm_ratio_mean"], p["norm_ratio_mean"]),
            "effective_step": (b["effective_step_mean"], p["effective_step_mean"]),
        })
    return pairs


def _pm(mean: float, std: float, fmt: str) -> str:
    if math.isnan(std):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def _percent(fraction: float) -> str:
    return "n/a" if math.isnan(fraction) else f"{100 * fraction:.0f}%"


def markdown(meta: Metadata, rows: Sequence[dict[str, Any]], complete: bool) -> str:
    """The summary as a Markdown section."""
    metric_fmt = ".3f" if "bits" in meta.metric else ".2f"
    kinds = list(meta.scale_invariant.values())
    better = "higher" if meta.higher_is_better else "lower"
    lines = [
        f"### {meta.task}: {meta.description}",
        "",
        f"Metric: {meta.metric}, {better} is better. Seeds {meta.seeds}, {meta.epochs} epochs, "
        f"device {meta.device}. Scale-invariant tensors (inspector): {len(kinds)} "
        f"({kinds.count('channel')} per channel, {kinds.count('layer')} per layer).",
    ]
    if not complete:
        lines += ["", "**Partial results: the comparison was interrupted.**"]
    lines += [
        "",
        f"| optimizer | {meta.metric} | SI weight-norm ratio | mean effective step "
        "| projected | wall time (s) | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        diverged = f" ({row['diverged']} diverged)" if row["diverged"] else ""
        lines.append(
            f"| {row['optimizer']} | {_pm(row['metric_mean'], row['metric_std'], metric_fmt)} "
            f"| {_pm(row['norm_ratio_mean'], row['norm_ratio_std'], '.3f')} "
            f"| {_pm(row['effective_step_mean'], row['effective_step_std'], '.3g')} "
            f"| {_percent(row['projected_fraction'])} | {row['wall_time_mean']:.1f} "
            f"| {row['runs']}{diverged} |"
        )
    pairs = compare_pairs(rows, meta.higher_is_better)
    if pairs:
        lines += ["", "P optimizer against its base (same hyperparameters):", ""]
        for pair in pairs:
            (nb, np_), (eb, ep) = pair["norm_ratio"], pair["effective_step"]
            lines.append(
                f"- {pair['projected']} vs {pair['base']}: metric {pair['metric_gain']:+.3f} "
                f"(positive = better), weight-norm ratio {nb:.3f} -> {np_:.3f}, "
                f"effective step {eb:.3g} -> {ep:.3g}"
            )
    lines += ["", "Hyperparameters:", ""]
    lines += [f"- {name}: {text}" for name, text in meta.hyperparameters.items()]
    lines += ["", f"Command: `{meta.command}`; {meta.machine}; torch {meta.torch}, "
                  f"{meta.threads} thread(s); started {meta.started}."]
    return "\n".join(lines) + "\n"


def write_tables(out: Path, task: Task, results: Sequence[RunResult], meta: Metadata,
                 complete: bool) -> list[dict[str, Any]]:
    """Write ``summary.md``, ``summary.csv`` and ``summary.json``; return the rows."""
    rows = summarise(results, meta.optimizers)
    (out / "summary.md").write_text(markdown(meta, rows, complete))
    fields = ["optimizer", "runs", "metric_mean", "metric_std", "norm_ratio_mean",
              "norm_ratio_std", "effective_step_mean", "effective_step_std",
              "projected_fraction", "wall_time_mean", "diverged"]
    with (out / "summary.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "meta": asdict(meta), "complete": complete, "summary": rows,
        "pairs": compare_pairs(rows, task.higher_is_better),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return rows


def _epoch_means(runs: Sequence[RunResult], key: str) -> tuple[list[int], list[float]]:
    length = min(len(r.history) for r in runs)
    epochs = [runs[0].history[i].epoch for i in range(length)]
    means = [statistics.fmean(getattr(r.history[i], key) for r in runs) for i in range(length)]
    return epochs, means


def plot_curves(task: Task, results: Sequence[RunResult], path: Path) -> None:
    """Three panels per epoch, mean over seeds: metric, weight-norm ratio, effective step."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 3.4), layout="constrained")
    axes = figure.subplots(1, 3)
    panels = [("metric", task.metric), ("norm_ratio", "SI weight norm / initial"),
              ("effective_step", "mean effective step (SI)")]
    names = list(dict.fromkeys(r.optimizer for r in results))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name in names:
            runs = [r for r in results if r.optimizer == name and r.history]
            if not runs:
                continue
            epochs, means = _epoch_means(runs, key)
            style = "-" if name in PROJECTED else "--"
            ax.plot(epochs, means, style, marker=".", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if key == "effective_step":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{task.name}: mean over seeds", fontsize=10)
    figure.savefig(path, dpi=72)


def write_figures(out: Path, task: Task, results: Sequence[RunResult],
                  step_logs: dict[str, list[dict[str, Any]]]) -> None:
    """Write ``curves.png`` and ``steps.png``; a failure to plot only warns (the tables stay)."""
    if not results:
        return
    try:
        plot_curves(task, results, out / "curves.png")
        if step_logs:
            from scaleinv.plots import plot_norms_and_steps

            plot_norms_and_steps(step_logs, out / "steps.png")
    except Exception as error:  # noqa: BLE001 - a figure must not cost the results
        warnings.warn(f"could not write the figures into {out}: {error!r}", stacklevel=2)
