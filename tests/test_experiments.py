"""Experiment tasks: data, models, optimizers, training runs and reports on small slices."""

from __future__ import annotations

import itertools
import json
import math
import os

import pytest
import torch

from scaleinv.experiments import OPTIMIZER_NAMES as LISTED_OPTIMIZERS
from scaleinv.experiments import TASK_NAMES
from scaleinv.experiments import data as datasets
from scaleinv.experiments.optimizers import (
    OPTIMIZER_NAMES,
    PROJECTED,
    make_optimizer,
    parse_optimizers,
)
from scaleinv.experiments.records import RunResult, dumps, read_runs, write_jsonl
from scaleinv.experiments.report import compare_pairs, paired_difference, rerender, summarise
from scaleinv.experiments.runner import (
    CompareConfig,
    compare,
    lr_factor,
    scale_invariant_names,
    train_run,
)
from scaleinv.experiments.tasks import TASKS, get_task, recall_at_1
from scaleinv.projection import select_view

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=list(TASKS))
def task_and_data(request):
    task = TASKS[request.param]
    return task, task.load(small=True)


def test_every_task_trains_a_few_steps_and_scores(task_and_data) -> None:
    task, data = task_and_data
    torch.manual_seed(0)
    model = task.build_model(data)
    optimizer = make_optimizer(task.optimizers[-1], model.parameters(), task.settings)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for batch in itertools.islice(task.batches(data, torch.Generator().manual_seed(0)), 3):
        loss = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert sum(changed) >= len(changed) // 2
    metric = task.evaluate(model, data, torch.device("cpu"))
    assert math.isfinite(metric)
    if "%" in task.metric:
        assert 0.0 <= metric <= 100.0
    else:  # bits per character of an untrained model: near log2(vocabulary), far above zero
        assert 1.0 < metric < 2 * math.log2(len(data.vocabulary))


def test_every_task_has_weights_on_which_the_projection_fires(task_and_data) -> None:
    """The reference cosine test (the optimizers' own) passes on the task's normalised weights;
    for the Transformer this is what makes AdamW vs AdamP a real comparison."""
    task, data = task_and_data
    torch.manual_seed(0)
    model = task.build_model(data)
    batch = next(iter(task.batches(data, torch.Generator().manual_seed(0))))
    task.loss(model, batch).backward()
    fired = {
        name: select_view(p, p.grad, "auto", 0.1, 1e-8)
        for name, p in model.named_parameters() if p.grad is not None
    }
    projected = [name for name, view in fired.items() if view is not None]
    assert len(projected) >= 3, fired
    if task.name == "shakespeare":
        directions = [n for n in fired if n.endswith("parametrizations.weight.original1")]
        assert directions and all(fired[n] == "channel" for n in directions)
    if task.name == "mnist1d-mlp":
        assert {fired[f"net.{i}.weight"] for i in (1, 4, 7)} == {"layer"}


def test_inspector_agrees_with_the_cosine_test(task_and_data) -> None:
    task, data = task_and_data
    invariant = scale_invariant_names(task, data)
    assert invariant, "the inspector found no scale-invariant weight"
    torch.manual_seed(0)
    model = task.build_model(data)
    params = dict(model.named_parameters())
    assert set(invariant) <= set(params)
    assert not any(name.endswith("bias") for name in invariant)
    assert all(params[name].dim() >= 2 for name in invariant)


def test_same_seed_gives_same_initialisation_and_data_order() -> None:
    task = get_task("digits")
    data = task.load(small=True)
    models = []
    for _ in range(2):
        torch.manual_seed(3)
        models.append(task.build_model(data))
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    orders = [
        [y.tolist() for _, y in task.batches(data, torch.Generator().manual_seed(3))]
        for _ in range(2)
    ]
    assert orders[0] == orders[1]
    other = [y.tolist() for _, y in task.batches(data, torch.Generator().manual_seed(4))]
    assert other != orders[0]


def test_train_run_records_norms_and_steps() -> None:
    task = get_task("digits")
    data = task.load(small=True)
    invariant = scale_invariant_names(task, data)
    result, records = train_run(task, data, "sgdp", 0, epochs=2, invariant=invariant,
                                progress=False)
    assert [e.epoch for e in result.history] == [1, 2]
    assert result.history[-1].step == 2 * task.steps_per_epoch(data)
    assert records and {r["name"] for r in records} <= set(invariant)
    assert result.norm_ratio > 0 and result.effective_step > 0
    assert 0.0 < result.projected_fraction <= 1.0
    assert result.metric == result.history[-1].metric
    json.dumps(result.to_json())


def test_projection_slows_norm_growth_on_digits() -> None:
    """The paper's mechanism on a short run: SGD grows the BN-followed conv weights' norms
    faster than SGDP (same seed, same batches)."""
    task = get_task("digits")
    data = task.load(small=True)
    invariant = scale_invariant_names(task, data)
    ratios = {
        name: train_run(task, data, name, 0, epochs=3, invariant=invariant,
                        progress=False)[0].norm_ratio
        for name in ("sgd", "sgdp")
    }
    assert ratios["sgdp"] < ratios["sgd"]


def test_compare_writes_tables_and_keeps_the_seed_order(tmp_path) -> None:
    config = CompareConfig(task="mnist1d-mlp", optimizers=("adamw", "adamp"), seeds=2, epochs=1,
                           out=tmp_path, progress=False, small=True)
    outcome = compare(config)
    assert outcome.complete and outcome.folder == tmp_path
    results = outcome.results
    assert [(r.seed, r.optimizer) for r in results] == [
        (0, "adamw"), (0, "adamp"), (1, "adamw"), (1, "adamp")
    ]
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] is True
    assert [row["optimizer"] for row in summary["summary"]] == ["adamw", "adamp"]
    assert summary["pairs"][0]["projected"] == "adamp" and summary["pairs"][0]["base"] == "adamw"
    for name in ("summary.md", "summary.csv", "curves.png", "steps.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_the_torch_free_name_lists_match_the_registries() -> None:
    assert list(TASK_NAMES) == list(TASKS)
    assert LISTED_OPTIMIZERS == OPTIMIZER_NAMES


def test_paired_difference_mean_t_interval_and_signs() -> None:
    metrics = {"sgd": [90.0, 91.0, 92.0, 93.0, 94.0], "sgdp": [91.0, 93.0, 92.0, 96.0, 93.0]}
    runs = [RunResult("t", name, seed, 1, value, 1.0, 0.1, 0.0, 1.0, False)
            for name, values in metrics.items() for seed, value in enumerate(values)]
    paired = paired_difference(runs, "sgdp", "sgd", higher_is_better=True)
    diffs = [1.0, 2.0, 0.0, 3.0, -1.0]
    mean, sd = sum(diffs) / 5, math.sqrt(sum((d - 1.0) ** 2 for d in diffs) / 4)
    assert paired["mean"] == pytest.approx(mean)
    assert paired["ci95"] == pytest.approx(2.776445 * sd / math.sqrt(5), rel=1e-5)  # t(0.975, 4)
    assert (paired["n"], paired["better"], paired["worse"], paired["ties"]) == (5, 3, 1, 1)
    lower = paired_difference(runs, "sgdp", "sgd", higher_is_better=False)
    assert lower["mean"] == pytest.approx(-mean) and lower["better"] == 1
    unpaired = [r for r in runs if not (r.optimizer == "sgd" and r.seed > 0)]
    single = paired_difference(unpaired, "sgdp", "sgd", higher_is_better=True)
    assert single["n"] == 1 and math.isnan(single["ci95"])
    assert paired_difference(runs, "adamp", "adam", higher_is_better=True) is None


def test_runs_round_trip_through_strict_json(tmp_path) -> None:
    run = RunResult("t", "sgd", 0, 1, math.nan, math.inf, 0.1, math.nan, 1.0, True)
    text = dumps(run.to_json())
    assert "NaN" not in text and "Infinity" not in text and '"metric": null' in text
    path = write_jsonl(tmp_path / "runs.jsonl", [run.to_json()])
    (back,) = read_runs(path)
    assert math.isnan(back.metric) and math.isnan(back.norm_ratio) and back.diverged
    assert [p.name for p in tmp_path.iterdir()] == ["runs.jsonl"]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_rerender_rebuilds_the_same_tables(tmp_path) -> None:
    config = CompareConfig(task="digits", optimizers=("sgd", "sgdp"), seeds=2, epochs=1,
                           out=tmp_path, progress=False, small=True)
    compare(config)
    tables = {n: (tmp_path / n).read_text() for n in ("summary.md", "summary.json")}
    (tmp_path / "curves.png").unlink()
    rerender(tmp_path)
    assert {n: (tmp_path / n).read_text() for n in tables} == tables
    assert (tmp_path / "curves.png").exists()


def test_summary_statistics_are_mean_and_sample_std() -> None:
    runs = [
        RunResult("t", "sgd", seed, 1, metric, 2.0, 0.1, 0.0, 1.0, False)
        for seed, metric in enumerate([90.0, 92.0, 94.0])
    ] + [RunResult("t", "sgdp", 0, 1, 95.0, 1.5, 0.2, 1.0, 1.0, False)]
    rows = summarise(runs, ["sgd", "sgdp", "adam"])
    assert [r["optimizer"] for r in rows] == ["sgd", "sgdp"]
    assert rows[0]["metric_mean"] == pytest.approx(92.0)
    assert rows[0]["metric_std"] == pytest.approx(2.0)
    assert math.isnan(rows[1]["metric_std"])
    (pair,) = compare_pairs(rows, higher_is_better=False)
    assert pair["metric_gain"] == pytest.approx(-3.0)
    assert pair["norm_ratio"] == (2.0, 1.5)


def test_lr_factor_warms_up_then_follows_a_cosine() -> None:
    assert [lr_factor(s, 100, 0.1) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 0.1) == pytest.approx(0.5)
    assert lr_factor(0, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(100, 100, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_recall_at_1() -> None:
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.8, 0.3]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    # Nearest neighbours: 0->1, 1->0 (or 4), 2->3, 3->2, 4->1 (label 0: a miss).
    assert recall_at_1(embeddings, labels) == pytest.approx(80.0)


def test_parse_optimizers_validates_names() -> None:
    assert parse_optimizers(" SGD, sgdp ") == ("sgd", "sgdp")
    with pytest.raises(ValueError, match="allowed: sgd, sgdp, adam"):
        parse_optimizers("sgd,lamb")
    with pytest.raises(ValueError, match="more than once"):
        parse_optimizers("adam,adam")
    with pytest.raises(ValueError, match="No optimizer"):
        parse_optimizers(" , ")
    with pytest.raises(ValueError, match="Unknown task 'cifar'; allowed: digits"):
        get_task("cifar")


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_builds_and_steps(name: str) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4))
    optimizer = make_optimizer(name, conv.parameters(), get_task("digits").settings)
    target = torch.randn(8, 4, 4, 4)
    (conv(torch.randn(8, 1, 6, 6)) * target).mean().backward()
    before = conv[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, conv[0].weight)
    if name in PROJECTED:  # the radial part is removed: the norm grows only to second order
        growth = conv[0].weight.norm() - before.norm()
        assert abs(growth.item()) < 1e-3 * before.norm().item()


def test_pairs_share_hyperparameters() -> None:
    for task in TASKS.values():
        for projected in PROJECTED & set(task.optimizers):
            base = {"sgdp": "sgd", "adamp": "adamw"}[projected]
            base_text = task.hyperparameters(base)
            if projected == "adamp" and "adamw" not in task.optimizers:
                base_text = task.hyperparameters("adam")
            assert task.hyperparameters(projected).startswith(base_text)


def test_mnist1d_is_generated_without_writing_files(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    datasets.load_mnist1d.cache_clear()
    loaded = datasets.load_mnist1d()
    assert os.listdir(tmp_path) == []
    assert loaded.x_train.shape == (4000, 1, 40) and loaded.x_test.shape == (1000, 1, 40)
    assert loaded.num_classes == 10


def test_offline_data_shapes_and_fixed_splits() -> None:
    digits = datasets.load_digits()
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert abs(digits.x_train.mean().item()) < 1e-4
    mnist = datasets.load_mnist5k()
    assert mnist.x_train.shape == (4000, 1, 28, 28) and len(mnist.y_test) == 1000
    assert torch.bincount(mnist.y_test).tolist() == [100] * 10
    corpus = datasets.load_shakespeare()
    assert len(datasets.shakespeare_files()) == 42
    assert len(corpus.train) > 4_000_000 and 300_000 < len(corpus.valid) < 1_000_000
    assert int(corpus.train.max()) < len(corpus.vocabulary) <= 100
    text = "".join(corpus.vocabulary[i] for i in corpus.valid[:200].tolist())
    assert text.isprintable() or "\n" in text
