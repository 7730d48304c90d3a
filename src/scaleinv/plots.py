"""The paper's figures from monitor logs: weight-norm growth and effective step size over steps.

Rendering uses matplotlib's Agg canvas directly (no pyplot, no change of the global backend),
so it works on headless machines and inside other programs.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from scaleinv.monitor import load_records

__all__ = ["norm_and_step_curves", "plot_norms_and_steps"]

Log = Sequence[Mapping[str, Any]] | str | os.PathLike

SCALE_INVARIANT_KINDS = ("channel", "layer")


def _as_records(log: Log) -> Sequence[Mapping[str, Any]]:
    if isinstance(log, (str, os.PathLike)):
        return load_records(log)
    if isinstance(log, Sequence):
        return log
    raise TypeError(
        f"a log must be a list of monitor records or a CSV/JSONL path, got {type(log).__name__}"
    )


def _selected(records: Sequence[Mapping[str, Any]],
              kinds: Iterable[str] | None) -> list[Mapping[str, Any]]:
    if kinds is not None:
        wanted = set(kinds)
        return [r for r in records if r["kind"] in wanted]
    invariant = [r for r in records if r["kind"] in SCALE_INVARIANT_KINDS]
    return invariant or list(records)


def norm_and_step_curves(
    records: Sequence[Mapping[str, Any]], kinds: Iterable[str] | None = None
) -> tuple[list[int], list[float], list[float]]:
    """Per recorded step: ``(steps, norm_ratio, effective_step)``.

    ``norm_ratio_t = sqrt(sum_w |w_t|^2) / sqrt(sum_w |w_0|^2)`` over the selected tensors
    (``|w_0|`` before the first recorded step); ``effective_step_t`` is the mean of
    ``|dw| / |w|`` over them. ``kinds`` selects tensors by kind; by default the scale-invariant
    ones (``"channel"``, ``"layer"``), or all where the log has none.
    """
    chosen = _selected(records, kinds)
    initial: dict[str, float] = {}
    current: dict[str, float] = {}
    by_step: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in chosen:
        by_step[int(r["step"])].append(r)
        initial.setdefault(r["name"], r["weight_norm"] - r["norm_change"])
    start = math.sqrt(sum(v * v for v in initial.values()))
    steps, ratios, effective = [], [], []
    for step in sorted(by_step):
        rows = by_step[step]
        for r in rows:
            current[r["name"]] = r["weight_norm"]
        norm = math.sqrt(sum(v * v for v in current.values()))
        finite = [r["effective_step"] for r in rows if math.isfinite(r["effective_step"])]
        steps.append(step)
        ratios.append(norm / start if start > 0 else math.nan)
        effective.append(sum(finite) / len(finite) if finite else math.nan)
    return steps, ratios, effective


def plot_norms_and_steps(
    logs: Mapping[str, Log],
    path: str | os.PathLike[str],
    *,
    kinds: Iterable[str] | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Weight-norm growth and effective step size over steps, one line per optimizer.

    Args:
        logs: ``{label: records or CSV/JSONL path}``, e.g. ``{"SGD": ..., "SGDP": ...}``.
        path: where to write the figure (the format follows the suffix, e.g. ``.png``).
        kinds: which tensors to aggregate (default: the scale-invariant ones).
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(logs, Mapping) or not logs:
        raise ValueError("logs must be a non-empty mapping {label: records or path}")
    kinds = None if kinds is None else tuple(kinds)
    figure = Figure(figsize=(10, 4), dpi=dpi)
    FigureCanvasAgg(figure)
    norm_axis, step_axis = figure.subplots(1, 2)
    for label, log in logs.items():
        steps, ratios, effective = norm_and_step_curves(_as_records(log), kinds)
        norm_axis.plot(steps, ratios, label=label)
        step_axis.plot(steps, effective, label=label)
    norm_axis.set(xlabel="step", ylabel="|w_t| / |w_0|", title="weight norm")
    step_axis.set(xlabel="step", ylabel="|dw| / |w|", title="effective step size")
    if any(v > 0 for line in step_axis.get_lines() for v in line.get_ydata() if v == v):
        step_axis.set_yscale("log")
    for axis in (norm_axis, step_axis):
        axis.grid(True, alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path
