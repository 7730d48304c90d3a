"""The ``scaleinv`` command: ``compare``, ``toy`` and ``inspect`` (see docs/experiments.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Experiments with SGDP and AdamP on scale-invariant weights, on offline data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

INTERRUPTED_EXIT_CODE = 130


def _task_names() -> list[str]:
    from scaleinv.experiments.tasks import TASKS

    return list(TASKS)


def _check_task(name: str, allow_all: bool = False) -> str:
    allowed = _task_names() + (["all"] if allow_all else [])
    if name not in allowed:
        raise typer.BadParameter(f"unknown task {name!r}; allowed: {', '.join(allowed)}",
                                 param_hint="--task")
    return name


def _check_device(device: str) -> str:
    import torch

    if device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"unknown device {device!r}; allowed: cpu, cuda",
                                 param_hint="--device")
    if device == "cuda" and not torch.cuda.is_available():
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


def _run_task(task: str, optimizers: tuple[str, ...], seeds: int, epochs: int | None,
              device: str, out: Path, progress: bool, small: bool, monitor_every: int) -> str:
    from scaleinv.experiments.runner import CompareConfig, compare

    config = CompareConfig(task=task, optimizers=optimizers, seeds=seeds, epochs=epochs,
                           device=device, out=out, progress=progress, small=small,
                           monitor_every=monitor_every)
    try:
        compare(config)
    except KeyboardInterrupt:
        summary = out / "summary.md"
        if summary.exists():
            typer.echo(summary.read_text())
        typer.echo(f"Interrupted: the runs that finished are in {out}", err=True)
        raise typer.Exit(INTERRUPTED_EXIT_CODE) from None
    return (out / "summary.md").read_text()


@app.command()
def compare(
    task: Annotated[str, typer.Option(help="Task name, or 'all' for every task with its "
                                           "defaults.")] = "digits",
    optimizers: Annotated[str | None, typer.Option(
        help="Comma-separated optimizers; default: the task's list. Allowed: sgd, sgdp, adam, "
             "adamw, adamp, radam, radamp, nadam, nadamp.")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds 0 .. N-1 for every optimizer.")] = 3,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs; default: the task's.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    out: Annotated[Path | None, typer.Option(
        help="Output folder; default: scaleinv-runs/<task>.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads.")] = 1,
    monitor_every: Annotated[int, typer.Option(
        min=1, help="Record norms and steps every N optimizer steps.")] = 5,
    progress: Annotated[bool, typer.Option(help="Show a progress bar per run.")] = True,
    small: Annotated[bool, typer.Option(hidden=True, help="Tiny data slice (for tests).")] = False,
) -> None:
    """Train each optimizer on a task with the same seeds, initialisation and data order.

    Prints and saves (Markdown, CSV, JSON) a table of the final metric, the weight-norm ratio of
    the scale-invariant weights and the mean effective step size (mean ± std over seeds), and
    saves the curves as PNG. Ctrl-C keeps the runs that finished and exits with code 130.
    """
    import torch

    _check_task(task, allow_all=True)
    _check_device(device)
    if task == "all" and optimizers is not None:
        raise typer.BadParameter("--optimizers cannot be combined with --task all (each task "
                                 "runs its own list)", param_hint="--optimizers")
    torch.set_num_threads(threads)
    tasks = _task_names() if task == "all" else [task]
    root = out if out is not None else Path("scaleinv-runs")
    chosen = {name: _check_optimizers(optimizers, name) for name in tasks}
    sections: list[str] = []
    try:
        for name, names in chosen.items():
            folder = root / name if (task == "all" or out is None) else root
            sections.append(_run_task(name, names, seeds, epochs, device, folder, progress,
                                      small, monitor_every))
            typer.echo(sections[-1])
    finally:
        if task == "all" and sections:  # the tasks that finished, also after Ctrl-C
            (root / "summary.md").write_text("\n".join(sections))


@app.command()
def toy(
    lr: Annotated[float, typer.Option(help="Learning rate, > 0.")] = 0.1,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 100,
    start: Annotated[float, typer.Option(help="Initial angle to the target, degrees.")] = 135.0,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("scaleinv-runs/toy"),
) -> None:
    """The paper's 2-D toy: GD, GD + momentum (0.9, 0.99) and GD + momentum + projection on
    ``-cos(w, w*)``, from ``|w_0| = 1``. Prints the final norms and plots the trajectories."""
    from scaleinv.experiments.toy import plot_toy, run_toy_suite, toy_table

    if not lr > 0:
        raise typer.BadParameter(f"must be > 0, got {lr!r}", param_hint="--lr")
    runs = run_toy_suite(lr=lr, steps=steps, start_degrees=start)
    table = toy_table(runs)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"Toy: L(w) = -cos(w, w*), w* = (1, 0), |w_0| = 1 at {start:g} degrees, "
              f"lr {lr:g}, {steps} steps, float64.\n\n")
    (out / "toy.md").write_text(header + table)
    plot_toy(runs, out / "toy.png")
    typer.echo(header + table)
    typer.echo(f"Wrote {out / 'toy.md'} and {out / 'toy.png'}")


@app.command()
def inspect(
    task: Annotated[str, typer.Option(help="Task whose model to inspect.")] = "digits",
) -> None:
    """Print which parameters of a task's model are scale-invariant (per channel or layer)."""
    import torch

    from scaleinv.experiments.tasks import get_task
    from scaleinv.inspect import find_scale_invariant

    _check_task(task)
    chosen = get_task(task)
    data = chosen.load(small=True)
    torch.manual_seed(0)
    model = chosen.build_model(data)
    found = find_scale_invariant(model, chosen.example_inputs(data))
    typer.echo(f"{task}: {chosen.description}")
    typer.echo(found.table() if hasattr(found, "table") else str(found))


if __name__ == "__main__":  # pragma: no cover
    app()
