"""Scale-out: DDP, FSDP2 and ZeroRedundancyOptimizer take the same steps as one
process, FSDP2's decisions are shared without gathering parameters, and flat 1-D shards (FSDP1,
DeepSpeed ZeRO) are refused instead of silently never projected.

The multi-process part runs once per session (two CPU processes over gloo, see
``_dist_worker.py``); each test below judges one of its measurements.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from scaleinv import SGDP, AdamP
from scaleinv.distributed import flat_shard_reason, is_dtensor, rows_max

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("needs torch.distributed with the gloo backend", allow_module_level=True)

import _dist_worker  # noqa: E402  (imports torch.distributed.fsdp, absent without distributed)

CASES = _dist_worker.training_cases()
SHARDED = ("fsdp2", "hsdp")
# Sums over rows split across ranks round differently: a few float32 ulps over STEPS steps.
ROUND_OFF = 1e-5


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("distributed") / "results.json"
    return _dist_worker.launch(out, CASES)


# ------------------------------------------------------------------ same steps as one process


@pytest.mark.slow  # the two-process gloo runs: minutes of setup on a busy 2-core machine
@pytest.mark.parametrize("case", CASES)
def test_same_steps_as_one_process(measured: dict[str, Any], case: str) -> None:
    result = measured["training"][case]
    assert result["moved"] > 1e-2, "the weights barely moved: a wrong step would not show"
    assert result["error"] <= ROUND_OFF, (
        f"{case}: parameters differ from the single-process run by {result['error']:.3g} after "
        f"{_dist_worker.STEPS} steps (weights moved {result['moved']:.3g})"
    )


@pytest.mark.slow  # the two-process gloo runs: minutes of setup on a busy 2-core machine
def test_the_runs_exercise_every_branch(measured: dict[str, Any]) -> None:
    """The cosine test chose channel, layer and no projection in the runs compared above."""
    chosen: dict[str, Counter[str]] = {model: Counter() for model in _dist_worker.MODELS}
    for case, result in measured["training"].items():
        chosen[case.split("/")[1]].update(result["branches"])
    assert chosen["cnn"]["channel"] > 0 and chosen["cnn"]["None"] > 0, chosen
    assert chosen["transformer"]["layer"] > 0 and chosen["transformer"]["None"] > 0, chosen


@pytest.mark.slow  # the two-process gloo runs: minutes of setup on a busy 2-core machine
def test_fsdp2_cases_shard_unevenly_down_to_an_empty_shard(measured: dict[str, Any]) -> None:
    for case in CASES:
        if case.split("/")[0] not in SHARDED:
            continue
        result = measured["training"][case]
        rows = result["local_rows"]
        assert result["placements"][-1] == "S(0)", (case, result["placements"])
        assert any(r0 != r1 for r0, r1 in zip(rows[0].values(), rows[1].values(), strict=True))
        if case.split("/")[1] == "cnn":
            assert [r["head.weight"] for r in rows] == [1, 0], rows


@pytest.mark.slow  # the two-process gloo runs: minutes of setup on a busy 2-core machine
@pytest.mark.parametrize("case", [c for c in CASES if c.split("/")[0] in SHARDED])
def test_fsdp2_step_gathers_no_parameter(measured: dict[str, Any], case: str) -> None:
    """The optimizer step's only collectives are all-reduces (no all-gather): of one element
    each in the multi-tensor body; in the Triton kernels' step, two per group and step (the
    row statistics of all the group's shards: a max, then the sums)."""
    collectives = measured["training"][case]["step_collectives"]
    assert collectives["gathers"] == 0, collectives
    if "_triton/" in case:
        assert set(collectives["counts"]) == {"allreduce_"}, collectives
        assert collectives["counts"]["allreduce_"] == 2 * _dist_worker.STEPS, collectives
    else:
        assert set(collectives["counts"]) <= {"all_reduce"}, collectives
        assert collectives["largest"] <= 1, collectives
    if "/auto/" in case:  # the test's reductions are shared, so the decision is too
        assert sum(collectives["counts"].values()) > 0, collectives


# --------------------------------------------------------------- projection on Shard(0) DTensors


@pytest.mark.slow  # the two-process gloo runs: minutes of setup on a busy 2-core machine
def test_sharded_projection_covers_every_outcome(measured: dict[str, Any]) -> None:
    results = measured["projection"].values()
    assert {r["expected_view"] for r in results} == {"channel", "layer", None}
    assert any(r["local_rows"][1] == 0 for r in results), "no case with an empty shard"
    half = [r for name, r in measured["projection"].items() if "half_invariant" in name]
    # rank 0's rows pass the channel test, rank 1's do not: a per-rank max would disagree
    assert any(r["expected_view"] is None and r["local_rows"][1] > 0 for r in half)


@pytest.mark.slow  # the two-process gloo runs: minutes of setup on a busy 2-core machine
@pytest.mark.parametrize("name", sorted(_dist_worker.projection_cases()))
def test_sharded_projection_matches_unsharded(measured: dict[str, Any], name: str) -> None:
    result = measured["projection"][name]
    assert result["views"] == [result["expected_view"]] * _dist_worker.WORLD_SIZE, result
    assert result["flags"] == [result["expected_flag"]] * _dist_worker.WORLD_SIZE, result
    assert result["projection_error"] <= 1e-6, result
    assert result["coefficient_error"] <= 1e-6, result
    assert result["collectives"]["gathers"] == 0, result
    assert result["collectives"]["largest"] <= 1, result


# ------------------------------------------------------------------------------- flat shards


@pytest.mark.slow  # the two-process gloo runs: minutes of setup on a busy 2-core machine
@pytest.mark.parametrize("optimizer", ["AdamP", "SGDP"])
@pytest.mark.parametrize(
    ("use_orig_params", "reason"),
    [(False, "FSDP FlatParameter"), (True, "use_orig_params=True")],
)
def test_fsdp1_flat_shards_are_refused_with_the_reason(
    measured: dict[str, Any], optimizer: str, use_orig_params: bool, reason: str
) -> None:
    result = measured["fsdp1"][f"{optimizer}/use_orig_params={use_orig_params}"]
    assert all(len(shape) == 1 for shape in result["shapes"]), result["shapes"]
    assert result["error"] is not None and reason in result["error"], result["error"]
    assert "fully_shard" in result["error"] and "allow_flat_params=True" in result["error"]
    assert result["warnings"], "allow_flat_params=True stepped without a warning"
    assert all("without projection" in w for w in result["warnings"])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6, bias=False), nn.LayerNorm(6), nn.Linear(6, 2))


def _backward(model: nn.Module) -> None:
    model(torch.randn(3, 4)).square().mean().backward()


def _deepspeed_style_flat_partition(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """What DeepSpeed ZeRO-1/2 does: each group's tensors replaced by one flat 1-D partition."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    flat.grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    optimizer.param_groups[0]["params"] = [flat]


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_params_swapped_in_after_construction_are_refused(cls: type) -> None:
    model = _model()
    optimizer = cls(model.parameters(), lr=0.1)
    _backward(model)
    _deepspeed_style_flat_partition(optimizer, model)
    with pytest.raises(ValueError, match="after the optimizer was built.*DeepSpeed ZeRO"):
        optimizer.step()


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_allow_flat_params_steps_them_with_one_warning(cls: type) -> None:
    model = _model()
    optimizer = cls(model.parameters(), lr=0.1, allow_flat_params=True)
    _backward(model)
    _deepspeed_style_flat_partition(optimizer, model)
    flat = optimizer.param_groups[0]["params"][0]
    before = flat.detach().clone()
    with pytest.warns(UserWarning, match="without projection"):
        optimizer.step()
    assert not torch.equal(flat, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()  # the state exists now: no second check, no second warning


def test_flat_parameter_is_recognised() -> None:
    from torch.distributed.fsdp import FlatParameter

    flat = FlatParameter(torch.zeros(6), requires_grad=True)
    assert "FlatParameter" in str(flat_shard_reason(flat, AdamP([flat])))


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_genuine_vectors_are_not_flat_shards(cls: type) -> None:
    """Vectors given at construction, added later with add_param_group, or kept through a copy."""
    model = _model()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = cls(matrices, lr=0.1)
    optimizer.add_param_group({"params": vectors})
    _backward(model)
    optimizer.step()
    clone = copy.deepcopy(optimizer)
    for group in clone.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    clone.state.clear()
    clone.step()


def test_rows_max_of_plain_tensors_is_amax() -> None:
    x = torch.tensor([0.25, 3.0, 1.5])
    assert not is_dtensor(x)
    assert rows_max(x).item() == 3.0
