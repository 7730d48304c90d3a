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

try:
    import matplotlib  # noqa: F401 - imported here only to fail early with a clear message
except ImportError as error:  # ModuleNotFoundError, or a module hidden as None
    raise ImportError(
        "scaleinv.plots needs matplotlib, from the 'experiments' extra: "
        "pip install 'scaleinv[experiments]'"
    ) from error

from scaleinv.monitor import load_records

__all__ = ["norm_and_step_curves", "plot_norms_and_steps"]

Log = Sequence[Mapping[str, Any]] | str | os.PathLike[str]

SCALE_INVARIANT_KINDS = ("channel", "layer")


def _as_records(log: Log) -> Sequence[Mapping[str, Any]]:
    if isinstance(log, (str, os.PathLike)):
        return load_records(log)
    records = log  # a new name: mypy would put ``str`` back in ``log``'s narrowed type below
    if not isinstance(records, Sequence):
        raise TypeError(
            f"a log must be a list of monitor records or a CSV/JSONL path, "
            f"got {type(records).__name__}"
        )
    return records


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

    ``norm_ratio_t`` is the mean over the selected tensors of ``|w_t| / |w_0|`` (``|w_0|``
    before the first recorded step; the definition of ``scaleinv compare``'s tables);
    ``effective_step_t`` is the mean of ``|dw| / |w|`` over them. ``kinds`` selects tensors
    by kind; by default the scale-invariant ones (``"channel"``, ``"layer"``), or all where
    the log has none.
    """
    chosen = _selected(records, kinds)
    initial: dict[str, float] = {}
    current: dict[str, float] = {}
    by_step: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in chosen:
        by_step[int(r["step"])].append(r)
        initial.setdefault(r["name"], r["weight_norm"] - r["norm_change"])
    steps, ratios, effective = [], [], []
    for step in sorted(by_step):
        rows = by_step[step]
        for r in rows:
            current[r["name"]] = r["weight_norm"]
        per_tensor = [current[n] / initial[n] for n in current if initial[n] > 0]
        finite = [r["effective_step"] for r in rows if math.isfinite(r["effective_step"])]
        steps.append(step)
        ratios.append(sum(per_tensor) / len(per_tensor) if per_tensor else math.nan)
        effective.append(sum(finite) / len(finite) if finite else math.nan)
    return steps, ratios, effective


def plot_norms_and_steps(
    logs: Mapping[str, Log],
    path: str | os.PathLike[str],
    *,
    kinds: Iterable[str] | None = None,
    title: str | None = None,
    dpi: int = 120,
    styles: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Weight-norm growth and effective step size over steps, one line per optimizer.

    Args:
        logs: ``{label: records or CSV/JSONL path}``, e.g. ``{"SGD": ..., "SGDP": ...}``.
        path: where to write the figure (the format follows the suffix, e.g. ``.png``).
        kinds: which tensors to aggregate (default: the scale-invariant ones).
        title: figure title.
        dpi: resolution of the saved figure.
        styles: optional matplotlib line keywords per label (colour, line style, marker).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(logs, Mapping) or not logs:
        raise ValueError("logs must be a non-empty mapping {label: records or path}")
    kinds = None if kinds is None else tuple(kinds)
    figure = Figure(figsize=(11, 4.5), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    norm_axis, step_axis = figure.subplots(1, 2)
    for label, log in logs.items():
        steps, ratios, effective = norm_and_step_curves(_as_records(log), kinds)
        line = {"label": label, "lw": 1.4, **(styles or {}).get(label, {})}
        line["markevery"] = max(1, len(steps) // 10)
        norm_axis.plot(steps, ratios, **line)
        step_axis.plot(steps, effective, **line)
    norm_axis.set(xlabel="optimizer step", ylabel="mean over tensors of |w_t| / |w_0|",
                  title="weight-norm growth")
    step_axis.set(xlabel="optimizer step", ylabel="mean over tensors of |Δw| / |w|",
                  title="effective step size")
    if any(v > 0 for line in step_axis.get_lines() for v in line.get_ydata() if v == v):
        step_axis.set_yscale("log")
        step_axis.set_ylabel("mean over tensors of |Δw| / |w| (log)")
    for axis in (norm_axis, step_axis):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=9)
    if title:
        figure.suptitle(title, fontsize=11)
    path = Path(path)
    figure.savefig(path, dpi=dpi)
    return path
