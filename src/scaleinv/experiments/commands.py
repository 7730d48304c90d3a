"""The ``scaleinv`` command: ``compare``, ``toy`` and ``inspect`` (see docs/experiments.md).

Only typer is imported at the top: torch and the experiment modules are imported inside the
commands, so ``scaleinv --help`` stays fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from scaleinv.experiments import OPTIMIZER_NAMES, TASK_NAMES

if TYPE_CHECKING:
    from scaleinv.experiments.records import RunResult
    from scaleinv.experiments.runner import CompareConfig, Outcome

app = typer.Typer(
    help="Experiments with SGDP and AdamP on scale-invariant weights, on offline data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

INTERRUPTED_EXIT_CODE = 130
USAGE_EXIT_CODE = 2


def fail(message: str) -> typer.Exit:
    """Print ``Error: message`` to stderr; the caller raises the returned exit (status 2)."""
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(USAGE_EXIT_CODE)


def _check_task(name: str, allow_all: bool = False) -> str:
    allowed = list(TASK_NAMES) + (["all"] if allow_all else [])
    if name not in allowed:
        raise typer.BadParameter(f"unknown task {name!r}; allowed: {', '.join(allowed)}",
                                 param_hint="--task")
    return name


def _check_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"unknown device {device!r}; allowed: cpu, cuda",
                                 param_hint="--device")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter("CUDA is not available on this machine; use --device cpu",
                                     param_hint="--device")
    return device


def _check_optimizers(text: str | None, task: str) -> tuple[str, ...]:
    from scaleinv.experiments.optimizers import parse_optimizers
    from scaleinv.experiments.tasks import TASKS

    if text is None:
        return TASKS[task].optimizers
    try:
        return parse_optimizers(text)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--optimizers") from error


def _check_data(tasks: list[str]) -> None:
    """Every task's data package is installed, before anything trains."""
    from scaleinv.experiments.data import missing_packages
    from scaleinv.experiments.tasks import TASKS

    for name in tasks:
        missing = missing_packages(TASKS[name].packages)
        if missing:
            commands = "; ".join(dict.fromkeys(missing.values()))
            raise fail(f"task {name!r} needs the data package(s) {', '.join(missing)}, "
                       f"which are not installed.\nInstall with: {commands}")


TASK_HELP = "Task, or 'all' for every task with its defaults. Tasks: " + ", ".join(TASK_NAMES)
OPTIMIZER_HELP = ("Comma-separated optimizers (default: the task's list). Allowed: "
                  + ", ".join(OPTIMIZER_NAMES))
COMPARE_HELP = (
    "Train each optimizer on a task from the same seeds, initial weights and batches, and "
    "write a table (Markdown, CSV, JSON) of the final metric, the weight-norm ratio of the "
    "scale-invariant weights and the mean effective step, with figures (PNG). The output goes "
    "to a new folder; Ctrl-C keeps every finished run and exits with status 130."
)


@app.command(help=COMPARE_HELP)
def compare(
    task: Annotated[str, typer.Option(help=TASK_HELP)] = "digits",
    optimizers: Annotated[str | None, typer.Option(help=OPTIMIZER_HELP)] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds 0 .. N-1 for every optimizer.")] = 3,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs; default: the task's.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    out: Annotated[Path | None, typer.Option(
        help="Output folder (must be new or empty unless --overwrite); default: a new "
             "scaleinv-runs/<task>, scaleinv-runs/<task>-2, ...")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Write into a non-empty --out; earlier results are replaced only when the new "
             "comparison finishes.")] = False,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads.")] = 1,
    monitor_every: Annotated[int, typer.Option(
        min=1, help="Record norms and steps every N optimizer steps.")] = 5,
    progress: Annotated[bool, typer.Option(
        help="Show a progress bar per run (a line per finished run is printed either "
             "way).")] = True,
    small: Annotated[bool, typer.Option(hidden=True, help="Tiny data slice (for tests).")] = False,
) -> None:
    from scaleinv.experiments.runner import OutputError, check_output, fresh_folder

    _check_task(task, allow_all=True)
    _check_device(device)
    if task == "all" and optimizers is not None:
        raise typer.BadParameter("--optimizers cannot be combined with --task all (each task "
                                 "runs its own list)", param_hint="--optimizers")
    tasks: list[str] = list(TASK_NAMES) if task == "all" else [task]
    chosen = {name: _check_optimizers(optimizers, name) for name in tasks}
    _check_data(tasks)
    root = out if out is not None else fresh_folder(Path("scaleinv-runs"), task)
    folders = {name: root / name if task == "all" else root for name in tasks}
    try:
        check_output(root, overwrite)
        for folder in folders.values():
            check_output(folder, overwrite)
    except OutputError as error:
        raise fail(str(error)) from None

    import torch

    torch.set_num_threads(threads)
    with _sigterm_as_interrupt():
        _compare_tasks(task, chosen, folders, root, seeds, epochs, device, progress, small,
                       monitor_every)


def _compare_tasks(task: str, chosen: dict[str, tuple[str, ...]], folders: dict[str, Path],
                   root: Path, seeds: int, epochs: int | None, device: str, progress: bool,
                   small: bool, monitor_every: int) -> None:
    from scaleinv.experiments.runner import CompareConfig

    total = seeds * sum(len(names) for names in chosen.values())
    done = 0
    sections: list[str] = []
    written: list[str] = []
    finished = False
    try:
        for name, names in chosen.items():
            outcome = _run_task(
                CompareConfig(task=name, optimizers=names, seeds=seeds, epochs=epochs,
                              device=device, out=folders[name], progress=progress, small=small,
                              monitor_every=monitor_every, first_run=done + 1,
                              total_runs=total))
            done += len(outcome.results)
            sections.append((outcome.folder / "summary.md").read_text())
            typer.echo(sections[-1])
            written.append(_files_line(outcome.folder, outcome.files))
        finished = True
    finally:
        combined = root / "summary.md"
        if task == "all" and sections and (finished or not combined.exists()):
            # the tasks that finished, also after Ctrl-C (but never over an earlier summary)
            from scaleinv.experiments.records import write_atomic

            write_atomic(combined, "\n".join(sections))
            written.append(_files_line(root, ["summary.md"]))
        for line in written:
            typer.echo(line)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (``kill``, a job scheduler) like Ctrl-C: keep the finished runs."""
    import signal
    import threading

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _files_line(folder: Path, files: list[str]) -> str:
    return f"Wrote {folder}/: {', '.join(files)}"


def _run_task(config: CompareConfig) -> Outcome:
    from scaleinv.experiments.runner import compare as run_comparison

    def announce(number: int, total: int, result: RunResult) -> None:
        metric = "n/a" if result.metric != result.metric else f"{result.metric:.4g}"
        typer.echo(f"run {number} of {total} done: {result.task} {result.optimizer} seed "
                   f"{result.seed}: metric {metric}, weight-norm ratio "
                   f"{result.norm_ratio:.3f}, {result.wall_time:.1f} s"
                   + (" (diverged)" if result.diverged else ""))

    try:
        return run_comparison(config, on_result=announce)
    except KeyboardInterrupt as interrupt:
        outcome = getattr(interrupt, "outcome", None)
        if outcome is not None and outcome.files:
            typer.echo((outcome.folder / "summary.md").read_text())
            typer.echo(f"Interrupted: the {len(outcome.results)} finished run(s) are in "
                       f"{outcome.folder}/ ({', '.join(outcome.files)}); earlier results "
                       "were left as they were.", err=True)
        else:
            typer.echo("Interrupted before any run finished; nothing was written.", err=True)
        raise typer.Exit(INTERRUPTED_EXIT_CODE) from None


@app.command(help="The paper's 2-D toy: GD, GD + momentum (0.9, 0.99) and GD + momentum + "
                  "projection on L(w) = -cos(w, w*), from |w_0| = 1. Prints the final norms "
                  "and angles and plots the trajectories.")
def toy(
    lr: Annotated[float, typer.Option(help="Learning rate, > 0.")] = 0.1,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 100,
    start: Annotated[float, typer.Option(help="Initial angle to the target, degrees.")] = 135.0,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("scaleinv-runs/toy"),
) -> None:
    if not lr > 0:
        raise typer.BadParameter(f"must be > 0, got {lr!r}", param_hint="--lr")
    from scaleinv.experiments.records import write_atomic
    from scaleinv.experiments.runner import OutputError, check_output
    from scaleinv.experiments.toy import plot_toy, run_toy_suite, toy_table

    try:
        check_output(out, overwrite=True)
    except OutputError as error:
        raise fail(str(error)) from None
    runs = run_toy_suite(lr=lr, steps=steps, start_degrees=start)
    table = toy_table(runs)
    header = (f"Toy: L(w) = -cos(w, w*), w* = (1, 0), |w_0| = 1 at {start:g} degrees, "
              f"lr {lr:g}, {steps} steps, float64.\n\n")
    write_atomic(out / "toy.md", header + table)
    plot_toy(runs, out / "toy.png")
    typer.echo(header + table)
    typer.echo(_files_line(out, ["toy.md", "toy.png"]))


@app.command(help="Print which parameters of a task's model are scale-invariant (per channel "
                  "or per layer), as the optimizers' cosine test and the inspector see them.")
def inspect(
    task: Annotated[str, typer.Option(help="Task whose model to inspect. Tasks: "
                                           + ", ".join(TASK_NAMES))] = "digits",
) -> None:
    _check_task(task)
    _check_data([task])
    import torch

    from scaleinv.experiments.tasks import get_task
    from scaleinv.inspect import find_scale_invariant

    chosen = get_task(task)
    data = chosen.load(small=True)
    torch.manual_seed(0)
    model = chosen.build_model(data)
    found = find_scale_invariant(model, chosen.example_inputs(data))
    typer.echo(f"{task}: {chosen.description}")
    typer.echo(found.table() if hasattr(found, "table") else str(found))
