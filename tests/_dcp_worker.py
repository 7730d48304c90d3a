"""Multi-process side of ``test_distributed_checkpoint.py``: FSDP2 checkpoints, 2 -> 1 -> 2 ranks.

Per case of :data:`CASES` (``_dist_worker``'s models; AdamP or SGDP with ``foreach=True`` and
``scale_invariant="auto"`` on the matrices):

1. two CPU processes (gloo) train the model under FSDP2 for ``K`` steps and save model and
   optimizer with ``torch.distributed.checkpoint`` (:func:`phase_sharded`);
2. one process, plain model, no process group, loads that folder (DCP gathers the shards),
   takes ``M`` steps on the same global batches and saves again (:func:`phase_single`);
3. two processes load that, take ``M`` more steps and hand back the full weights and state.

:func:`uninterrupted` is the single-process run of ``K + 2 M`` steps that all this must equal.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from _dist_worker import (
    DELTA,
    EPS,
    OPTIMIZERS,
    WORLD_SIZE,
    build_model,
    free_port,
    loss_of,
    micro_batch,
    param_groups,
)
from scaleinv.projection import select_view

K, M = 3, 2  # steps before the first checkpoint; steps after each load
# ``model/optimizer``: the CNN's shards are uneven (5 rows on 2 ranks) and one is empty (rank 1's
# half of a 1-row head), its convolutions pass the channel test; the Transformer's LayerNorms
# make some matrices pass the layer test.
CASES = ("cnn/adamp", "cnn/sgdp", "transformer/adamp")


def folder(root: Path, case: str, written_by: str) -> Path:
    return root / f"{case.replace('/', '-')}-{written_by}"


def build(case: str, sharded: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    model_name, optimizer_name = case.split("/")
    cls, hyper = OPTIMIZERS[optimizer_name]
    model = build_model(model_name)
    if sharded:
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD_SIZE,)))
    return model, cls(param_groups(model, "auto"), foreach=True, **hyper)


def train(
    case: str, model: nn.Module, optimizer: torch.optim.Optimizer, steps: range,
    ranks: list[int], branches: Counter[str] | None = None,
) -> None:
    """Steps on the global batches: each process averages the micro-batches of ``ranks``.

    ``branches`` (unsharded models only) counts the cosine test's choice for each matrix."""
    model_name = case.split("/")[0]
    for step in steps:
        optimizer.zero_grad()
        for r in ranks:
            x, y = micro_batch(model_name, step, r)
            (loss_of(model_name, model, x, y) / len(ranks)).backward()  # FSDP2: mean over ranks
        if branches is not None:
            branches.update(str(select_view(p.detach(), p.grad, "auto", DELTA, EPS))
                            for p in model.parameters() if p.dim() >= 2)
        optimizer.step()


def save(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
         options: StateDictOptions | None = None) -> None:
    state = {"model": get_model_state_dict(model, options=options),
             "optim": get_optimizer_state_dict(model, optimizer, options=options)}
    dcp.save(state, checkpoint_id=str(folder))


def load(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
         options: StateDictOptions | None = None) -> None:
    state = {"model": get_model_state_dict(model, options=options),
             "optim": get_optimizer_state_dict(model, optimizer, options=options)}
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optim"], options=options)


def steps_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """AdamP's step counter of each parameter (empty for SGDP)."""
    return {
        name: float(optimizer.state[p]["step"])
        for name, p in model.named_parameters() if "step" in optimizer.state.get(p, {})
    }


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Parameters and optimizer state as whole tensors keyed by name (a collective if sharded)."""
    whole = StateDictOptions(full_state_dict=True)
    params = {n: p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()
              for n, p in model.named_parameters()}
    optim = get_optimizer_state_dict(model, optimizer, options=whole)["state"]
    return {"params": params,
            "state": {n: {k: v.detach().clone() for k, v in s.items()} for n, s in optim.items()}}


# --------------------------------------------------------------------------- the three phases


def uninterrupted(case: str, stops: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    """One process, no checkpoint: the full state after each of ``stops`` steps."""
    model, optimizer = build(case, sharded=False)
    snapshots, done, branches = {}, 0, Counter[str]()
    for stop in stops:
        train(case, model, optimizer, range(done, stop), list(range(WORLD_SIZE)), branches)
        done = stop
        snapshots[stop] = {**full_state(model, optimizer), "steps": steps_of(model, optimizer),
                           "branches": dict(branches)}
    return snapshots


def phase_single(
    case: str, source: Path, target: Path, reset_steps: bool = False
) -> dict[str, Any]:
    """Load the 2-rank checkpoint into one process, step ``M`` times, save to ``target``.

    ``reset_steps`` zeroes AdamP's step counters after loading: a control showing that the
    comparison notices a counter that did not survive.
    """
    model, optimizer = build(case, sharded=False)
    load(model, optimizer, source)
    loaded = steps_of(model, optimizer)
    kinds = {type(v).__name__ for s in optimizer.state.values() for v in s.values()}
    if reset_steps:
        for s in optimizer.state.values():
            s["step"].zero_()
    train(case, model, optimizer, range(K, K + M), list(range(WORLD_SIZE)))
    save(model, optimizer, target)
    return {**full_state(model, optimizer), "loaded_steps": loaded, "state_types": sorted(kinds)}


def phase_sharded(rank: int, first: bool, root: Path) -> dict[str, Any]:
    """Phase 1 (``first``: train ``K`` steps, save) or 3 (load, ``M`` more steps)."""
    results: dict[str, Any] = {}
    for case in CASES:
        model, optimizer = build(case, sharded=True)
        result: dict[str, Any] = {}
        if first:
            train(case, model, optimizer, range(K), [rank])
            save(model, optimizer, folder(root, case, "2ranks"))
        else:
            load(model, optimizer, folder(root, case, "1rank"))
            result["loaded_steps"] = steps_of(model, optimizer)
            result["state_types"] = sorted(
                {type(v).__name__ for s in optimizer.state.values() for v in s.values()}
            )
            train(case, model, optimizer, range(K + M, K + 2 * M), [rank])
            result["final_steps"] = steps_of(model, optimizer)
            result.update(full_state(model, optimizer))
        result["local_rows"] = {n: p.to_local().shape[0] for n, p in model.named_parameters()}
        results[case] = result
    return results


def _worker(rank: int, port: int, first: bool, root: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=120))
    try:
        results = phase_sharded(rank, first, Path(root))
        torch.save(results, Path(root) / f"phase{1 if first else 3}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(first: bool, root: Path) -> list[dict[str, Any]]:
    """Run phase 1 (``first``) or 3 on ``WORLD_SIZE`` processes; each rank's results."""
    mp.spawn(_worker, args=(free_port(), first, str(root)), nprocs=WORLD_SIZE, join=True)
    phase = 1 if first else 3
    return [torch.load(root / f"phase{phase}-rank{r}.pt") for r in range(WORLD_SIZE)]


def max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def state_difference(a: dict[str, dict[str, Tensor]], b: dict[str, dict[str, Tensor]]) -> float:
    """The largest difference between two optimizer states (per-parameter dicts of tensors)."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(max_difference(a[name], b[name]) for name in a)


def chunks(folder: Path) -> dict[str, int]:
    """How many pieces each saved tensor of a DCP checkpoint was written in."""
    metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {key: len(m.chunks) for key, m in metadata.items() if hasattr(m, "chunks")}
