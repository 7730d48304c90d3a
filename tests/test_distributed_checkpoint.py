"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): AdamP/SGDP state saved under FSDP2
on two ranks, loaded into one process, saved, loaded into two ranks again, continues with the
same steps as a run that was never interrupted.

The multi-process part runs once per session (see ``_dcp_worker.py``); the single-process round
trip at the end runs in the default suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("needs torch.distributed with the gloo backend", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions  # noqa: E402

import _dcp_worker as worker  # noqa: E402  (imports torch.distributed.fsdp)
from _dcp_worker import NAMES, K, M  # noqa: E402

# float32; sums over rows split across ranks round differently (measured: up to 1.4e-7)
ROUND_OFF = 1e-6
STATE_KEYS = {"adamp": {"step", "exp_avg", "exp_avg_sq"}, "sgdp": {"momentum"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dcp")
    first = worker.launch(True, root)
    single = {n: worker.phase_single(n, root / f"{n}-2ranks", root / f"{n}-1rank") for n in NAMES}
    control = worker.phase_single("adamp", root / "adamp-2ranks", root / "control",
                                  reset_steps=True)
    last = worker.launch(False, root)
    return {
        "first": first, "single": single, "control": control, "last": last,
        "reference": {n: worker.uninterrupted(n, (K, K + M, K + 2 * M)) for n in NAMES},
        "chunks": {folder: worker.chunks(root / folder)
                   for n in NAMES for folder in (f"{n}-2ranks", f"{n}-1rank")},
    }


@pytest.mark.slow  # three phases, two of them two-process gloo runs: ~30 s on 2 busy cores
@pytest.mark.parametrize("name", NAMES)
def test_resharded_run_takes_the_same_steps(runs: dict[str, Any], name: str) -> None:
    reference = runs["reference"][name]
    start = dict(worker.build_model(worker.MODEL).named_parameters())
    moved = worker.max_difference(reference[K + 2 * M]["params"],
                                  {n: p.detach() for n, p in start.items()})
    assert moved > 1e-2, "the weights barely moved: a wrong step would not show"
    branches = reference[K + 2 * M]["branches"]
    assert branches.get("channel", 0) > 0 and branches.get("None", 0) > 0, branches
    after_single = worker.max_difference(runs["single"][name]["params"],
                                         reference[K + M]["params"])
    assert after_single <= ROUND_OFF, f"{name}: 2 -> 1 ranks: weights off by {after_single:.3g}"
    for rank, result in enumerate(runs["last"]):
        error = worker.max_difference(result[name]["params"], reference[K + 2 * M]["params"])
        assert error <= ROUND_OFF, f"{name}: 2 -> 1 -> 2 ranks, rank {rank}: off by {error:.3g}"


@pytest.mark.slow  # three phases, two of them two-process gloo runs: ~30 s on 2 busy cores
@pytest.mark.parametrize("name", NAMES)
def test_optimizer_state_survives(runs: dict[str, Any], name: str) -> None:
    expected = runs["reference"][name][K + 2 * M]["state"]
    assert {key for s in expected.values() for key in s} == STATE_KEYS[name]
    for result in runs["last"]:
        error = worker.state_difference(result[name]["state"], expected)
        assert error <= ROUND_OFF, f"{name}: optimizer state off by {error:.3g}"


@pytest.mark.slow  # three phases, two of them two-process gloo runs: ~30 s on 2 busy cores
def test_step_counters_survive(runs: dict[str, Any]) -> None:
    """AdamP's bias corrections read ``step``: it must come back as saved, on every rank."""
    names = {n for n, _ in worker.build_model(worker.MODEL).named_parameters()}
    assert runs["single"]["adamp"]["loaded_steps"] == dict.fromkeys(names, float(K))
    for result in runs["last"]:
        assert result["adamp"]["loaded_steps"] == dict.fromkeys(names, float(K + M))
        assert result["adamp"]["final_steps"] == dict.fromkeys(names, float(K + 2 * M))
        assert result["sgdp"]["loaded_steps"] == {}


@pytest.mark.slow  # three phases, two of them two-process gloo runs: ~30 s on 2 busy cores
def test_a_lost_step_counter_would_show(runs: dict[str, Any]) -> None:
    """The comparison above can fail: counters zeroed after loading change the weights."""
    error = worker.max_difference(runs["control"]["params"],
                                  runs["reference"]["adamp"][K + M]["params"])
    assert error > 100 * ROUND_OFF, error


@pytest.mark.slow  # three phases, two of them two-process gloo runs: ~30 s on 2 busy cores
@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_were_resharded(runs: dict[str, Any], name: str) -> None:
    """2 ranks wrote row shards (uneven, one empty), 1 rank whole tensors, and each side loaded
    the other's layout: plain tensors in one process, DTensors on two ranks."""
    rows = [result[name]["local_rows"] for result in runs["first"]]
    assert [r["conv1.weight"] for r in rows] == [3, 2]
    assert [r["head.weight"] for r in rows] == [1, 0]
    buffer = "exp_avg" if name == "adamp" else "momentum"
    sharded, whole = runs["chunks"][f"{name}-2ranks"], runs["chunks"][f"{name}-1rank"]
    assert sharded[f"optim.state.conv1.weight.{buffer}"] == 2, sharded
    assert sharded["model.conv1.weight"] == 2, sharded
    assert whole[f"optim.state.conv1.weight.{buffer}"] == 1, whole
    assert runs["single"][name]["state_types"] == ["Tensor"]
    for result in runs["last"]:
        assert "DTensor" in result[name]["state_types"]


# ------------------------------------------------------------------ one process, no FSDP


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("name", NAMES)
def test_single_process_round_trip(tmp_path: Path, name: str, flatten: bool) -> None:
    """DCP's state_dict helpers and save/load without a process group: the same steps, with
    the optimizer state nested (the default) or flattened to one key per value."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model, optimizer = worker.build(name, sharded=False)
    every_rank = list(range(worker.WORLD_SIZE))
    worker.train(model, optimizer, range(K), every_rank)
    with pytest.warns(UserWarning, match="single process"):
        worker.save(model, optimizer, tmp_path, options)
    saved = dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata
    assert ("optim.param_groups.conv1.weight.scale_invariant" in saved) == flatten, sorted(saved)
    resumed, resumed_optimizer = worker.build(name, sharded=False)
    with pytest.warns(UserWarning, match="single process"):
        worker.load(resumed, resumed_optimizer, tmp_path, options)
    worker.train(resumed, resumed_optimizer, range(K, K + M), every_rank)
    expected = worker.uninterrupted(name, (K + M,))[K + M]
    got = worker.full_state(resumed, resumed_optimizer)
    assert worker.max_difference(got["params"], expected["params"]) == 0.0
    assert worker.state_difference(got["state"], expected["state"]) == 0.0
    if name == "adamp":
        assert set(worker.steps_of(resumed, resumed_optimizer).values()) == {float(K + M)}
    assert isinstance(next(iter(resumed_optimizer.state.values()))[
        "exp_avg" if name == "adamp" else "momentum"], torch.Tensor)
