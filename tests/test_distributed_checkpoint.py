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
import torch.distributed as dist

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("needs torch.distributed with the gloo backend", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions  # noqa: E402

import _dcp_worker as worker  # noqa: E402  (imports torch.distributed.fsdp)
from _dcp_worker import CASES, K, M  # noqa: E402

# float32; sums over rows split across ranks round differently (measured: up to 1.4e-7)
ROUND_OFF = 1e-6
STATE_KEYS = {"adamp": {"step", "exp_avg", "exp_avg_sq"}, "sgdp": {"momentum"}}
# the cosine test's choices in the uninterrupted runs: projected and not, in every case
BRANCHES = {"cnn": {"channel", "None"}, "transformer": {"layer", "None"}}
CONTROL = "cnn/adamp"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dcp")
    first = worker.launch(True, root)
    single = {
        case: worker.phase_single(case, worker.folder(root, case, "2ranks"),
                                  worker.folder(root, case, "1rank"))
        for case in CASES
    }
    control = worker.phase_single(CONTROL, worker.folder(root, CONTROL, "2ranks"),
                                  root / "control", reset_steps=True)
    last = worker.launch(False, root)
    return {
        "first": first, "single": single, "control": control, "last": last,
        "reference": {case: worker.uninterrupted(case, (K, K + M, K + 2 * M)) for case in CASES},
        "chunks": {(case, by): worker.chunks(worker.folder(root, case, by))
                   for case in CASES for by in ("2ranks", "1rank")},
    }


def _names(case: str, matrices: bool = False) -> list[str]:
    model = worker.build_model(case.split("/")[0])
    return [n for n, p in model.named_parameters() if p.dim() >= 2 or not matrices]


@pytest.mark.slow  # three phases, two of them two-process gloo runs: ~40 s on 2 busy cores
@pytest.mark.parametrize("case", CASES)
def test_resharded_run_takes_the_same_steps(runs: dict[str, Any], case: str) -> None:
    reference = runs["reference"][case]
    start = worker.build_model(case.split("/")[0]).named_parameters()
    moved = worker.max_difference(reference[K + 2 * M]["params"],
                                  {n: p.detach() for n, p in start})
    assert moved > 1e-2, "the weights barely moved: a wrong step would not show"
    branches = reference[K + 2 * M]["branches"]
    assert set(branches) >= BRANCHES[case.split("/")[0]], branches
    after_single = worker.max_difference(runs["single"][case]["params"],
                                         reference[K + M]["params"])
    assert after_single <= ROUND_OFF, f"{case}: 2 -> 1 ranks: weights off by {after_single:.3g}"
    for rank, result in enumerate(runs["last"]):
        error = worker.max_difference(result[case]["params"], reference[K + 2 * M]["params"])
        assert error <= ROUND_OFF, f"{case}: 2 -> 1 -> 2 ranks, rank {rank}: off by {error:.3g}"


@pytest.mark.slow  # three phases, two of them two-process gloo runs: ~40 s on 2 busy cores
@pytest.mark.parametrize("case", CASES)
def test_optimizer_state_survives(runs: dict[str, Any], case: str) -> None:
    expected = runs["reference"][case][K + 2 * M]["state"]
    assert {key for s in expected.values() for key in s} == STATE_KEYS[case.split("/")[1]]
    for result in runs["last"]:
        error = worker.state_difference(result[case]["state"], expected)
        assert error <= ROUND_OFF, f"{case}: optimizer state off by {error:.3g}"


@pytest.mark.slow  # three phases, two of them two-process gloo runs: ~40 s on 2 busy cores
@pytest.mark.parametrize("case", CASES)
def test_step_counters_survive(runs: dict[str, Any], case: str) -> None:
    """AdamP's bias corrections read ``step``: it must come back as saved, on every rank."""
    if case.endswith("/sgdp"):
        assert runs["single"][case]["loaded_steps"] == {}
        assert all(result[case]["loaded_steps"] == {} for result in runs["last"])
        return
    names = _names(case)
    assert runs["single"][case]["loaded_steps"] == dict.fromkeys(names, float(K))
    for result in runs["last"]:
        assert result[case]["loaded_steps"] == dict.fromkeys(names, float(K + M))
        assert result[case]["final_steps"] == dict.fromkeys(names, float(K + 2 * M))


@pytest.mark.slow  # three phases, two of them two-process gloo runs: ~40 s on 2 busy cores
def test_a_lost_step_counter_would_show(runs: dict[str, Any]) -> None:
    """The comparison above can fail: counters zeroed after loading change the weights."""
    error = worker.max_difference(runs["control"]["params"],
                                  runs["reference"][CONTROL][K + M]["params"])
    assert error > 100 * ROUND_OFF, error


@pytest.mark.slow  # three phases, two of them two-process gloo runs: ~40 s on 2 busy cores
@pytest.mark.parametrize("case", CASES)
def test_checkpoints_were_resharded(runs: dict[str, Any], case: str) -> None:
    """2 ranks wrote row shards (uneven, in the CNN one empty), 1 rank whole tensors, and each
    side loaded the other's layout: plain tensors in one process, DTensors on two ranks."""
    rows = [result[case]["local_rows"] for result in runs["first"]]
    if case.startswith("cnn/"):
        assert [r["conv1.weight"] for r in rows] == [3, 2]
        assert [r["head.weight"] for r in rows] == [1, 0]
    else:
        assert [r["embed.weight"] for r in rows] == [6, 5]
    buffer = "momentum" if case.endswith("/sgdp") else "exp_avg"
    sharded, whole = runs["chunks"][case, "2ranks"], runs["chunks"][case, "1rank"]
    for name in _names(case, matrices=True):
        assert sharded[f"optim.state.{name}.{buffer}"] == 2, sharded
        assert sharded[f"model.{name}"] == 2, sharded
        assert whole[f"optim.state.{name}.{buffer}"] == 1, whole
    assert runs["single"][case]["state_types"] == ["Tensor"]
    for result in runs["last"]:
        assert "DTensor" in result[case]["state_types"]


# ------------------------------------------------------------------ one process, no FSDP


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("case", ["cnn/adamp", "cnn/sgdp"])
def test_single_process_round_trip(tmp_path: Path, case: str, flatten: bool) -> None:
    """DCP's state_dict helpers and save/load without a process group: the same steps, with
    the optimizer state nested (the default) or flattened to one key per value."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model, optimizer = worker.build(case, sharded=False)
    every_rank = list(range(worker.WORLD_SIZE))
    worker.train(case, model, optimizer, range(K), every_rank)
    with pytest.warns(UserWarning, match="single process"):
        worker.save(model, optimizer, tmp_path, options)
    saved = dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata
    assert ("optim.param_groups.conv1.weight.scale_invariant" in saved) == flatten, sorted(saved)
    resumed, resumed_optimizer = worker.build(case, sharded=False)
    with pytest.warns(UserWarning, match="single process"):
        worker.load(resumed, resumed_optimizer, tmp_path, options)
    worker.train(case, resumed, resumed_optimizer, range(K, K + M), every_rank)
    expected = worker.uninterrupted(case, (K + M,))[K + M]
    got = worker.full_state(resumed, resumed_optimizer)
    assert worker.max_difference(got["params"], expected["params"]) == 0.0
    assert worker.state_difference(got["state"], expected["state"]) == 0.0
    assert {key for s in got["state"].values() for key in s} == STATE_KEYS[case.split("/")[1]]
    if case.endswith("/adamp"):
        assert set(worker.steps_of(resumed, resumed_optimizer).values()) == {float(K + M)}
