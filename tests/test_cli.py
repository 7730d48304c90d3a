"""The ``scaleinv`` command end to end on tiny configurations (typer's CliRunner)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from scaleinv.cli import INTERRUPTED_EXIT_CODE, app
from scaleinv.experiments import runner as runner_module

cli = CliRunner()
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


def test_compare_interrupted_keeps_finished_runs_and_exits_130(tmp_path, monkeypatch) -> None:
    real_train_run = runner_module.train_run
    calls = []

    def interrupt_second_run(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train_run(*args, **kwargs)

    monkeypatch.setattr(runner_module, "train_run", interrupt_second_run)
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
