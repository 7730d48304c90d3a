"""Result tables (Markdown, CSV, JSON) and figures (PNG) of a comparison.

Files written into the output folder (each to a temporary name, then moved into place):

* ``summary.md``, ``summary.csv``, ``summary.json``: one row per optimizer, mean and standard
  deviation over seeds of the final metric, of the final weight-norm ratio of the
  scale-invariant tensors and of the mean effective step size, the share of projected updates,
  the mean wall time; and each "P" optimizer against its base, paired by seed (mean difference,
  95% confidence interval, sign count).
* ``steps.jsonl``: the monitor's per-step records of seed 0, one line each, with ``optimizer``.
* ``curves.png``: metric, weight-norm ratio, effective step and effective step P / base per
  epoch (mean over seeds).
* ``steps.png``: the per-step weight-norm ratio and effective step of seed 0
  (:func:`scaleinv.plots.plot_norms_and_steps`).

:func:`rerender` rebuilds the tables and figures from ``runs.jsonl``, ``steps.jsonl`` and the
metadata in ``summary.json``.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import platform
import statistics
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from scaleinv.experiments.optimizers import PROJECTED
from scaleinv.experiments.records import RunResult, dumps, read_runs, write_atomic, write_jsonl
from scaleinv.experiments.tasks import Task, get_task

__all__ = ["BASE_OF", "Metadata", "paired_difference", "rerender", "summarise",
           "write_all", "write_figures", "write_tables"]

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
            command=" ".join([_program(), *sys.argv[1:]]),
            machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                    f"{platform.system()} {platform.release()}",
            torch=torch.__version__, threads=torch.get_num_threads(),
            started=datetime.datetime.now().isoformat(timespec="seconds"),
        )

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Metadata:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


def _program() -> str:
    name = Path(sys.argv[0]).name
    return "python -m scaleinv" if name == "__main__.py" else name


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


def t_quantile_975(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom (scipy)."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def paired_difference(results: Sequence[RunResult], projected: str, base: str,
                      higher_is_better: bool) -> dict[str, Any] | None:
    """``P - base`` of the final metric on each seed both finished (sign: + = P better).

    Returns ``mean``, ``ci95`` (the half-width ``t_{0.975, n-1} s / sqrt(n)`` of the 95%
    confidence interval of the mean paired difference, ``nan`` for ``n < 2``), ``n``, and the
    seed counts ``better``, ``worse``, ``ties``; ``None`` when no seed has both runs.
    """
    metric = {(r.optimizer, r.seed): r.metric for r in results}
    seeds = sorted(s for (name, s) in metric if name == projected and (base, s) in metric)
    sign = 1.0 if higher_is_better else -1.0
    diffs = [sign * (metric[(projected, s)] - metric[(base, s)]) for s in seeds]
    diffs = [d for d in diffs if math.isfinite(d)]
    if not diffs:
        return None
    n = len(diffs)
    mean = statistics.fmean(diffs)
    ci = t_quantile_975(n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "ci95": ci, "n": n, "better": sum(d > 0 for d in diffs),
            "worse": sum(d < 0 for d in diffs), "ties": sum(d == 0 for d in diffs)}


def base_of(projected: str, names: Sequence[str]) -> str | None:
    """The base optimizer ``projected`` is compared with among ``names`` (or ``None``)."""
    return next((b for b in BASE_OF.get(projected, ()) if b in names), None)


def compare_pairs(rows: Sequence[dict[str, Any]], higher_is_better: bool,
                  results: Sequence[RunResult] = ()) -> list[dict[str, Any]]:
    """Each "P" optimizer against its base: metric difference of the means, both norm ratios
    and mean effective steps, and (given the runs) the paired difference by seed."""
    by_name = {row["optimizer"]: row for row in rows}
    pairs = []
    for projected in BASE_OF:
        base = base_of(projected, list(by_name))
        if projected not in by_name or base is None:
            continue
        p, b = by_name[projected], by_name[base]
        gain = p["metric_mean"] - b["metric_mean"]
        pairs.append({
            "projected": projected, "base": base,
            "metric_gain": gain if higher_is_better else -gain,
            "paired": paired_difference(results, projected, base, higher_is_better),
            "norm_ratio": (b["norm_ratio_mean"], p["norm_ratio_mean"]),
            "effective_step": (b["effective_step_mean"], p["effective_step_mean"]),
        })
    return pairs


def _pm(mean: float, std: float, fmt: str) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(std):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def _percent(fraction: float) -> str:
    return "n/a" if math.isnan(fraction) else f"{100 * fraction:.0f}%"


def paired_text(paired: dict[str, Any] | None, fmt: str) -> str:
    """``+1.90 [+0.10, +3.70] (P better on 3 of 3 seeds)``."""
    if paired is None:
        return "n/a"
    mean, ci, n = paired["mean"], paired["ci95"], paired["n"]
    interval = "" if math.isnan(ci) else (
        f" [{format(mean - ci, '+' + fmt)}, {format(mean + ci, '+' + fmt)}]")
    ties = f", {paired['ties']} tied" if paired["ties"] else ""
    return (f"{format(mean, '+' + fmt)}{interval} (P better on {paired['better']} of {n} "
            f"seeds{ties})")


def metric_format(meta: Metadata) -> str:
    return ".3f" if "bits" in meta.metric else ".2f"


def markdown(meta: Metadata, rows: Sequence[dict[str, Any]], complete: bool,
             results: Sequence[RunResult] = ()) -> str:
    """The summary as a Markdown section."""
    metric_fmt = metric_format(meta)
    kinds = list(meta.scale_invariant.values())
    better = "higher" if meta.higher_is_better else "lower"
    lines = [
        f"### {meta.task}: {meta.description}",
        "",
        f"Metric: {meta.metric}, {better} is better. Seeds {meta.seeds}, {meta.epochs} epochs, "
        f"device {meta.device}. Scale-invariant tensors (inspector): {len(kinds)} "
        f"({kinds.count('channel')} per channel, {kinds.count('layer')} per layer). "
        "Values: mean ± sample std over seeds.",
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
    pairs = compare_pairs(rows, meta.higher_is_better, results)
    if pairs:
        lines += ["", "P optimizer against its base (same hyperparameters; metric: P − base on "
                      "the same seed, mean and 95% t-interval; + = P better):", ""]
        for pair in pairs:
            (nb, np_), (eb, ep) = pair["norm_ratio"], pair["effective_step"]
            lines.append(
                f"- {pair['projected']} vs {pair['base']}: metric "
                f"{paired_text(pair['paired'], metric_fmt)}, weight-norm ratio "
                f"{nb:.3f} -> {np_:.3f}, effective step {eb:.3g} -> {ep:.3g} "
                f"({ep / eb:.2f}x)"
            )
    lines += ["", "Hyperparameters:", ""]
    lines += [f"- {name}: {text}" for name, text in meta.hyperparameters.items()]
    lines += ["", f"Command: `{meta.command}`; {meta.machine}; torch {meta.torch}, "
                  f"{meta.threads} thread(s); started {meta.started}."]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["optimizer", "runs", "metric_mean", "metric_std", "norm_ratio_mean",
              "norm_ratio_std", "effective_step_mean", "effective_step_std",
              "projected_fraction", "wall_time_mean", "diverged"]


def write_tables(out: Path, task: Task, results: Sequence[RunResult], meta: Metadata,
                 complete: bool) -> list[dict[str, Any]]:
    """Write ``summary.md``, ``summary.csv`` and ``summary.json``; return the rows."""
    rows = summarise(results, meta.optimizers)
    write_atomic(out / "summary.md", markdown(meta, rows, complete, results))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                      for k, v in row.items()} for row in rows)
    write_atomic(out / "summary.csv", text.getvalue())
    summary = {
        "meta": asdict(meta), "complete": complete, "summary": rows,
        "pairs": compare_pairs(rows, task.higher_is_better, results),
    }
    write_atomic(out / "summary.json", dumps(summary, indent=2) + "\n")
    return rows


def write_steps(out: Path, step_logs: dict[str, list[dict[str, Any]]]) -> None:
    """``steps.jsonl``: every per-step record of seed 0, with its ``optimizer``."""
    lines = [dumps({"optimizer": name, **record}) + "\n"
             for name, records in step_logs.items() for record in records]
    write_atomic(out / "steps.jsonl", "".join(lines))


def read_steps(path: Path) -> dict[str, list[dict[str, Any]]]:
    logs: dict[str, list[dict[str, Any]]] = {}
    with Path(path).open() as stream:
        for line in stream:
            if line.strip():
                record = json.loads(line)
                logs.setdefault(record.pop("optimizer"), []).append(record)
    for records in logs.values():
        for record in records:
            for key, value in record.items():
                if value is None and key not in ("projected", "view"):
                    record[key] = math.nan
    return logs


STYLES: dict[str, dict[str, Any]] = {
    "sgd": {"color": "tab:blue", "ls": "--", "marker": "o"},
    "sgdp": {"color": "navy", "ls": "-", "marker": "s"},
    "adam": {"color": "tab:orange", "ls": ":", "marker": "v"},
    "adamw": {"color": "darkgoldenrod", "ls": "--", "marker": "^"},
    "adamp": {"color": "tab:red", "ls": "-", "marker": "D"},
    "radam": {"color": "tab:green", "ls": "--", "marker": "o"},
    "radamp": {"color": "darkgreen", "ls": "-", "marker": "s"},
    "nadam": {"color": "tab:purple", "ls": "--", "marker": "v"},
    "nadamp": {"color": "indigo", "ls": "-", "marker": "D"},
}
"""Line style of each optimizer: a P optimizer is solid, in a darker colour than its base."""


def style(name: str, points: int) -> dict[str, Any]:
    """Matplotlib keyword arguments for ``name``'s line of ``points`` points (about 10
    markers per line, so that overlapping lines stay distinguishable)."""
    return {**STYLES.get(name, {"ls": "-", "marker": "."}), "lw": 1.6, "ms": 5,
            "markevery": max(1, points // 10), "label": name}


def _epoch_means(runs: Sequence[RunResult], key: str) -> tuple[list[int], list[float]]:
    length = min(len(r.history) for r in runs)
    epochs = [runs[0].history[i].epoch for i in range(length)]
    means = [statistics.fmean(getattr(r.history[i], key) for r in runs) for i in range(length)]
    return epochs, means


def plot_curves(task: Task, meta: Metadata, results: Sequence[RunResult], path: Path) -> None:
    """Four panels per epoch, each the mean over seeds: the metric, the weight-norm ratio and
    the effective step of the scale-invariant tensors, and the effective step of each P
    optimizer divided by its base's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    names = [n for n in meta.optimizers if any(r.optimizer == n and r.history for r in results)]
    seeds = sorted({r.seed for r in results})
    figure = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2).ravel()
    panels = [
        ("metric", task.metric, "linear"),
        ("norm_ratio", "weight-norm ratio |w_t| / |w_0|", "linear"),
        ("effective_step", "effective step |Δw| / |w| (log)", "log"),
    ]
    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for ax, (key, label, scale) in zip(axes, panels, strict=False):
        for name in names:
            runs = [r for r in results if r.optimizer == name and r.history]
            epochs, means = _epoch_means(runs, key)
            curves.setdefault(name, {})[key] = (epochs, means)
            ax.plot(epochs, means, **style(name, len(epochs)))
        ax.set_ylabel(label)
        ax.set_yscale(scale)
    ratio_axis = axes[3]
    ratio_axis.axhline(1.0, color="0.4", lw=1)
    for projected in names:
        base = base_of(projected, names)
        if projected not in PROJECTED or base is None:
            continue
        (epochs, p), (_, b) = curves[projected]["effective_step"], curves[base]["effective_step"]
        ratios = [x / y if y > 0 else math.nan for x, y in zip(p, b, strict=False)]
        ratio_axis.plot(epochs[:len(ratios)], ratios,
                        **{**style(projected, len(ratios)), "label": f"{projected} / {base}"})
    ratio_axis.set_ylabel("effective step, P / base (log)")
    ratio_axis.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ratio_axis.yaxis.set_major_formatter(plain)
    low, high = ratio_axis.get_ylim()
    ratio_axis.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())
    panel_titles = ["held-out metric", "norm growth of the scale-invariant weights",
                    "effective step of those weights", "effective step: P optimizer / its base"]
    for ax, title in zip(axes, panel_titles, strict=True):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=10)
        if any(not line.get_label().startswith("_") for line in ax.get_lines()):
            ax.legend(fontsize=9)
    figure.suptitle(
        f"{task.name}: {task.description}\nmean over {len(seeds)} "
        f"seed{'s' if len(seeds) > 1 else ''} {seeds} of the "
        f"per-epoch values; scale-invariant tensors: {len(meta.scale_invariant)} "
        "(norm ratio: mean of |w_t|/|w_0| over them)", fontsize=11)
    figure.savefig(path, dpi=110)


def write_figures(out: Path, task: Task, meta: Metadata, results: Sequence[RunResult],
                  step_logs: dict[str, list[dict[str, Any]]]) -> None:
    """Write ``curves.png`` and ``steps.png``; a failure to plot only warns (the tables stay)."""
    if not results:
        return
    try:
        _write_png(out / "curves.png", lambda p: plot_curves(task, meta, results, p))
        if step_logs:
            from scaleinv.plots import plot_norms_and_steps

            title = (f"{task.name}: seed 0 only, every recorded step; mean over the "
                     f"{len(meta.scale_invariant)} scale-invariant tensors")
            _write_png(out / "steps.png", lambda p: plot_norms_and_steps(
                step_logs, p, title=title, styles={n: style(n, 0) for n in step_logs}))
    except Exception as error:  # noqa: BLE001 - a figure must not cost the results
        warnings.warn(f"could not write the figures into {out}: {error!r}", stacklevel=2)


def _write_png(path: Path, draw: Any) -> None:
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        draw(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_all(out: Path, task: Task, results: Sequence[RunResult], meta: Metadata,
              step_logs: dict[str, list[dict[str, Any]]], complete: bool) -> None:
    """Tables, ``steps.jsonl`` and figures of ``results`` into ``out``."""
    write_tables(out, task, results, meta, complete)
    if step_logs:
        write_steps(out, step_logs)
    write_figures(out, task, meta, results, step_logs)


def rerender(folder: Path) -> None:
    """Rewrite the tables and figures of a finished comparison from its ``runs.jsonl``,
    ``steps.jsonl`` (when present) and the metadata of its ``summary.json``; ``runs.jsonl`` is
    rewritten as strict JSON (files of older versions held bare ``NaN``)."""
    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    meta = Metadata.from_json(summary["meta"])
    task = get_task(meta.task)
    results = read_runs(folder / "runs.jsonl")
    write_jsonl(folder / "runs.jsonl", [r.to_json() for r in results])
    steps = folder / "steps.jsonl"
    step_logs = read_steps(steps) if steps.exists() else {}
    write_tables(folder, task, results, meta, summary["complete"])
    write_figures(folder, task, meta, results, step_logs)
