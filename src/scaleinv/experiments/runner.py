"""Training runs and the comparison loop behind ``scaleinv compare``.

Every optimizer of a comparison trains from the same initial weights (the global RNG is seeded
with the run's seed right before the model is built) and sees the same batches in the same order
(drawn from a ``torch.Generator`` seeded with the same seed). Each finished run is appended to
``runs.jsonl`` and the summary files are rewritten at once, so an interrupted comparison keeps
every run that finished.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from scaleinv.experiments import report
from scaleinv.experiments.optimizers import make_optimizer
from scaleinv.experiments.records import EpochStats, RunResult, dumps
from scaleinv.experiments.tasks import Batch, Task, get_task

__all__ = [
    "RESULT_FILES",
    "CompareConfig",
    "EpochStats",
    "OutputError",
    "RunResult",
    "check_output",
    "compare",
    "lr_factor",
    "scale_invariant_names",
    "train_run",
]


def lr_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then a cosine decay to zero.

    ``f = (step + 1) / W`` for ``step < W = warmup_fraction * total``, then
    ``f = (1 + cos(pi (step - W) / (total - W))) / 2``.
    """
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def scale_invariant_names(task: Task, data: Any) -> dict[str, str]:
    """Parameter names of the task's model that the inspector finds scale-invariant, with their
    kind (``"channel"`` or ``"layer"``). Inspects a throwaway copy of the model."""
    from scaleinv.inspect import find_scale_invariant

    model = task.build_model(data)
    found = find_scale_invariant(model, task.example_inputs(data))
    return {
        name: str(getattr(kind, "value", kind))
        for name, kind in found.items()
        if str(getattr(kind, "value", kind)) in ("channel", "layer")
    }


def _norms(model: nn.Module, names: Iterable[str]) -> dict[str, float]:
    params = dict(model.named_parameters())
    return {name: params[name].detach().norm().item() for name in names}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return tuple(t.to(device, non_blocking=True) for t in batch)


def train_run(
    task: Task,
    data: Any,
    optimizer_name: str,
    seed: int,
    *,
    epochs: int,
    invariant: dict[str, str],
    device: torch.device | str = "cpu",
    progress: bool = True,
    monitor_every: int = 1,
    label: str | None = None,
) -> tuple[RunResult, list[dict[str, Any]]]:
    """Train ``task``'s model with ``optimizer_name`` from seed ``seed``.

    Returns the run's result and the monitor's records of the scale-invariant tensors.
    ``label`` names the progress bar (default: task, optimizer and seed).
    """
    from scaleinv.monitor import StepSizeMonitor

    device = torch.device(device)
    torch.manual_seed(seed)
    model = task.build_model(data).to(device)
    initial = _norms(model, invariant)
    optimizer = make_optimizer(optimizer_name, model.parameters(), task.settings)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    monitor = StepSizeMonitor(model, optimizer, every=monitor_every, invariance=invariant)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = task.steps_per_epoch(data)
    total_steps = epochs * steps_per_epoch

    history: list[EpochStats] = []
    step, seen_records, diverged = 0, 0, False
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc=label or f"{task.name} {optimizer_name} seed {seed}",
               disable=not progress, leave=True, dynamic_ncols=True)
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            losses = []
            for batch in task.batches(data, generator):
                factor = lr_factor(step, total_steps, task.warmup_fraction)
                for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base_lr * factor
                loss = task.loss(model, _to_device(batch, device))
                if not torch.isfinite(loss):
                    diverged = True
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                losses.append(loss.item())
                step += 1
                bar.update(1)
            new_records = [r for r in monitor.records[seen_records:] if r["name"] in invariant]
            seen_records = len(monitor.records)
            metric = math.nan if diverged else task.evaluate(model, data, device)
            norms = _norms(model, invariant)
            history.append(EpochStats(
                epoch=epoch, step=step, train_loss=_mean(losses), metric=metric,
                norm_ratio=_mean([norms[n] / initial[n] for n in invariant]),
                effective_step=_mean([float(r["effective_step"]) for r in new_records]),
                seconds=time.perf_counter() - started,
            ))
            bar.set_postfix(loss=f"{history[-1].train_loss:.3f}", metric=f"{metric:.3f}")
            if diverged:
                break
    finally:
        bar.close()
        monitor.close()

    records = [r for r in monitor.records if r["name"] in invariant]
    result = RunResult(
        task=task.name, optimizer=optimizer_name, seed=seed, epochs=epochs,
        metric=history[-1].metric if history else math.nan,
        norm_ratio=history[-1].norm_ratio if history else math.nan,
        effective_step=_mean([float(r["effective_step"]) for r in records]),
        projected_fraction=_mean(
            [float(r["projected"]) for r in records if r["projected"] is not None]
        ),
        wall_time=time.perf_counter() - started, diverged=diverged, history=history,
    )
    return result, records


RESULT_FILES = ("runs.jsonl", "steps.jsonl", "summary.md", "summary.csv", "summary.json",
                "curves.png", "steps.png")
"""The files a comparison writes into its output folder."""


class OutputError(ValueError):
    """The output folder cannot be used (occupied, not a folder, or not writable)."""


def check_output(folder: Path, overwrite: bool) -> None:
    """Create ``folder`` if needed and make sure a comparison can write into it.

    Raises :class:`OutputError` with a one-line reason when ``folder`` is a file, cannot be
    created or written, or already holds files and ``overwrite`` is false.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputError(f"--out {folder} is not empty; choose a new folder or pass "
                          "--overwrite (earlier results are replaced only when the new run "
                          "finishes)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".scaleinv-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputError(f"--out {folder} cannot be written: {reason}") from None


def fresh_folder(parent: Path, name: str) -> Path:
    """``parent/name`` if that does not exist yet, otherwise ``parent/name-2``, ``-3``, ..."""
    candidate, number = Path(parent) / name, 1
    while candidate.exists():
        number += 1
        candidate = Path(parent) / f"{name}-{number}"
    return candidate


@dataclass
class CompareConfig:
    """What ``scaleinv compare`` runs: one task, several optimizers, seeds ``0 .. seeds-1``."""

    task: str
    optimizers: tuple[str, ...]
    seeds: int = 3
    epochs: int | None = None
    device: str = "cpu"
    out: Path = Path("scaleinv-runs")
    progress: bool = True
    small: bool = False
    monitor_every: int = 5
    first_run: int = 1
    """Number of this comparison's first run in an overall count (for ``--task all``)."""
    total_runs: int | None = None
    """Runs in the overall count; default: this comparison's."""


@dataclass
class Outcome:
    """Where a comparison's files went: ``folder`` (``out``, or ``out/interrupted`` when an
    interrupted run would have replaced earlier results) and their names."""

    results: list[RunResult]
    folder: Path
    files: list[str]
    complete: bool


def compare(
    config: CompareConfig,
    on_result: Callable[[int, int, RunResult], None] | None = None,
) -> Outcome:
    """Run every (seed, optimizer) of ``config`` and write the results into ``config.out``.

    Seeds are the outer loop, so an interrupted comparison still compares every optimizer on
    the seeds it finished. Files are written into a staging folder inside ``config.out`` and
    moved into place (``os.replace``) when the comparison finishes. On ``KeyboardInterrupt`` the
    finished runs and their tables are moved into ``config.out`` if it held no results before,
    otherwise into ``config.out/interrupted``; then the interrupt is re-raised with the
    :class:`Outcome` as its ``outcome`` attribute. ``on_result(number, total, result)`` is
    called after each run.
    """
    task = get_task(config.task)
    epochs = config.epochs if config.epochs is not None else task.epochs
    data = task.load(small=config.small)
    invariant = scale_invariant_names(task, data)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    had_results = any((out / name).exists() for name in RESULT_FILES)
    staging = Path(tempfile.mkdtemp(prefix=".scaleinv-partial-", dir=out))
    meta = report.Metadata.collect(task, config.optimizers, config.seeds, epochs, config.device,
                                   invariant)
    total = config.total_runs or config.seeds * len(config.optimizers)
    number = config.first_run - 1
    results: list[RunResult] = []
    step_logs: dict[str, list[dict[str, Any]]] = {}
    complete = False
    try:
        with (staging / "runs.jsonl").open("w") as runs_file:
            for seed in range(config.seeds):
                for name in config.optimizers:
                    number += 1
                    result, records = train_run(
                        task, data, name, seed, epochs=epochs, invariant=invariant,
                        device=config.device, progress=config.progress,
                        monitor_every=config.monitor_every,
                        label=f"run {number} of {total}: {task.name} {name} seed {seed}",
                    )
                    results.append(result)
                    if seed == 0:
                        step_logs[name] = records
                    runs_file.write(dumps(result.to_json()) + "\n")
                    runs_file.flush()
                    if on_result is not None:
                        on_result(number, total, result)
        complete = True
    except KeyboardInterrupt as interrupt:
        if results:
            report.write_all(staging, task, results, meta, step_logs, complete=False)
        folder = out if not had_results else fresh_folder(out, "interrupted")
        interrupt.outcome = _publish(staging, folder, results, complete=False)  # type: ignore[attr-defined]
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.write_all(staging, task, results, meta, step_logs, complete=True)
    return _publish(staging, out, results, complete=complete)


def _publish(staging: Path, folder: Path, results: list[RunResult], complete: bool) -> Outcome:
    """Move the staged files into ``folder`` (each with ``os.replace``) and drop the staging."""
    files = []
    if results:
        folder.mkdir(parents=True, exist_ok=True)
        for name in RESULT_FILES:
            if (staging / name).exists():
                os.replace(staging / name, folder / name)
                files.append(name)
    shutil.rmtree(staging, ignore_errors=True)
    return Outcome(results, folder, files, complete)
