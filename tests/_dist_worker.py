"""Multi-process side of ``test_distributed.py``: two CPU processes talking over gloo.

:func:`launch` spawns the processes once; each runs every job below and rank 0 writes one JSON
file of measurements, which the tests read and judge. Every training case compares the
distributed run with a single-process run of the same model on the same data: the reference
accumulates the gradients of each rank's micro-batch (BatchNorm sees the same batches), so both
take the same steps up to the order of floating-point sums.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import socket
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from scaleinv import SGDP, AdamP, project
from scaleinv.projection import (
    channel_view,
    project_radial_,
    radial_coefficients,
    select_view,
)

WORLD_SIZE = 2
STEPS = 4
PER_RANK_BATCH = 4
DELTA, EPS = 0.1, 1e-8
MODELS = ("cnn", "transformer")
STRATEGIES = ("ddp", "fsdp2", "hsdp", "zero")


@contextlib.contextmanager
def triton_backend() -> Any:
    """Fused steps take the Triton kernels (here on CPU processes: through Triton's interpreter,
    which ``conftest.py`` switched on before these processes were spawned)."""
    before = os.environ.get("SCALEINV_BACKEND")
    os.environ["SCALEINV_BACKEND"] = "triton"
    try:
        yield
    finally:
        if before is None:
            del os.environ["SCALEINV_BACKEND"]
        else:
            os.environ["SCALEINV_BACKEND"] = before


def with_triton(cls: type) -> type:
    """``cls`` whose ``step`` runs under :func:`triton_backend`."""

    class WithTriton(cls):  # type: ignore[valid-type,misc]
        def step(self, closure: Any = None) -> Any:
            with triton_backend():
                return super().step(closure)

    return WithTriton


HAS_TRITON = importlib.util.find_spec("triton") is not None


def projected_adamw(params: Any, **options: Any) -> torch.optim.Optimizer:
    """``scaleinv.project`` around ``torch.optim.AdamW``: the wrapper under the same tests."""
    return project(torch.optim.AdamW(params, **options))


OPTIMIZERS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "adamp": (AdamP, dict(lr=1e-2, weight_decay=1e-2)),
    "sgdp": (SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "project_adamw": (projected_adamw, dict(lr=1e-2, weight_decay=1e-2)),
    "adamp_fused": (AdamP, dict(lr=1e-2, weight_decay=1e-2, fused=True)),
    "sgdp_fused": (SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, fused=True)),
    "adamp_triton": (with_triton(AdamP), dict(lr=1e-2, weight_decay=1e-2, fused=True)),
    "sgdp_triton": (with_triton(SGDP), dict(lr=0.1, momentum=0.9, weight_decay=1e-3, fused=True)),
}
MODES = ("auto", "channel")
FOREACH = (False, True)


def training_cases() -> list[str]:
    """Names ``strategy/model/optimizer/mode/foreach=...`` of every training case.

    ``hsdp`` (FSDP2 on a 1 x 2 mesh: placements ``(Replicate(), Shard(0))``) runs AdamP ``auto``
    only: what it adds is a second mesh dimension, not another optimizer. The ``*_fused``
    optimizers run with ``foreach=False`` only (the two options exclude each other); on these
    CPU processes their DTensor shards take the multi-tensor body, elsewhere the C kernels. The
    ``*_triton`` ones take the Triton kernels (through the interpreter), FSDP2's row shards
    included (one all-reduce of their row statistics per group); they run under DDP and FSDP2
    (HSDP with AdamP ``auto``), where Triton is installed.
    """
    return [
        f"{s}/{m}/{o}/{mode}/foreach={f}"
        for s in STRATEGIES for m in MODELS for o in OPTIMIZERS for mode in MODES for f in FOREACH
        if (s != "hsdp" or (o, mode) in (("adamp", "auto"), ("adamp_triton", "auto")))
        and not ((o.endswith("_fused") or o.endswith("_triton")) and f)  # fused: no foreach
        and not (o.endswith("_triton") and (not HAS_TRITON or s == "zero"))
    ]


# ----------------------------------------------------------------------------------- models


class PartlyNormalizedCNN(nn.Module):
    """Conv + BN, but ``conv1``'s last two channels skip the BN.

    Under FSDP2 ``conv1.weight`` (5 rows) is split 3 + 2: rank 0 holds only normalised (invariant)
    rows, rank 1 only raw ones, so a per-rank max of the channel cosines would let rank 0 project
    and rank 1 not. ``head`` has one row: rank 1's shard of it is empty.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(5, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x)
        h = F.relu(torch.cat([self.bn1(h[:, :3]), h[:, 3:]], dim=1))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3))).squeeze(-1)


class TinyTransformer(nn.Module):
    """One post-LN block with QK-norm and a normalised MLP input: layer-view invariance."""

    def __init__(self, vocab: int = 11, d: int = 8, heads: int = 2, hidden: int = 12) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, hidden, bias=False)
        self.ff_norm = nn.LayerNorm(hidden)
        self.ff2 = nn.Linear(hidden, d)
        self.norm2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def _split(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        return x.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        q, k, v = (self._split(proj(x)) for proj in (self.q, self.k, self.v))
        q = F.layer_norm(q, q.shape[-1:])
        k = F.layer_norm(k, k.shape[-1:])
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = self.norm1(x + self.out(attn.transpose(1, 2).reshape(x.shape)))
        x = self.norm2(x + self.ff2(F.gelu(self.ff_norm(self.ff1(x)))))
        return self.head(x)


def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return PartlyNormalizedCNN() if name == "cnn" else TinyTransformer()


def global_batch(name: str, step: int) -> tuple[Tensor, Tensor]:
    """The batch of ``step`` for all ranks together; rank ``r`` takes its ``r``-th slice."""
    gen = torch.Generator().manual_seed(1000 + step)
    n = WORLD_SIZE * PER_RANK_BATCH
    if name == "cnn":
        return torch.randn(n, 3, 6, 6, generator=gen), torch.randn(n, generator=gen)
    tokens = torch.randint(0, 11, (n, 7), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(name: str, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    if name == "cnn":
        return F.mse_loss(out, y)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def micro_batch(name: str, step: int, rank: int) -> tuple[Tensor, Tensor]:
    x, y = global_batch(name, step)
    rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
    return x[rows], y[rows]


def param_groups(model: nn.Module, mode: str) -> list[dict[str, Any]]:
    """Matrices in one group with ``scale_invariant=mode``; vectors in a group of their own."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": matrices, "scale_invariant": mode},
        {"params": vectors, "scale_invariant": False},
    ]


# ------------------------------------------------------------------- collective bookkeeping


class CollectiveLog(TorchDispatchMode):
    """Records every collective run under it: its name and the elements it moves."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor turn the op into local ops and collectives first
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if func.namespace in ("_c10d_functional", "c10d_functional", "c10d") and name not in (
            "wait_tensor", "_wrap_tensor_autograd"
        ):
            moved = sum(t.numel() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor))
            self.calls.append((name, moved))
        return out


def summarize(calls: list[tuple[str, int]]) -> dict[str, Any]:
    counts = Counter(name for name, _ in calls)
    return {
        "counts": dict(counts),
        "largest": max((moved for _, moved in calls), default=0),
        "gathers": sum(n for name, n in counts.items() if "gather" in name),
    }


# ------------------------------------------------------------------------------ projection


PROJECTION_SHAPES = {
    "even": (4, 3, 2, 2), "uneven": (5, 6), "one_row": (1, 6), "three_rows": (3, 2, 2)
}
GRADIENT_KINDS = ("channel_invariant", "layer_invariant", "half_invariant", "random")


def projection_cases() -> list[str]:
    """Names ``shape/gradient kind`` of the projection job's cases."""
    return [f"{shape}/{kind}" for shape in PROJECTION_SHAPES for kind in GRADIENT_KINDS]


def projection_job(rank: int, mesh: DeviceMesh) -> dict[str, Any]:
    """The projection functions on Shard(0) DTensors against the same functions unsharded."""
    results: dict[str, Any] = {}
    for case in projection_cases():
        shape_name, kind = case.split("/")
        shape = PROJECTION_SHAPES[shape_name]
        gen = torch.Generator().manual_seed(7)
        w, g, p = (torch.randn(shape, generator=gen) for _ in range(3))
        g = _make_gradient(w, g, kind)
        dw, dg, dp = (distribute_tensor(t, mesh, [Shard(0)]) for t in (w, g, p))
        log = CollectiveLog()
        with log:
            view = select_view(dw, dg, "auto", DELTA, EPS)
            projected = dp.clone()
            if view is not None:
                project_radial_(projected, dw, view, EPS)
            (coef,), (flag,) = radial_coefficients(
                [dw], [dg], [dp], scale_invariant="auto", delta=DELTA, eps=EPS
            )
            flag_value = bool(flag)
        expected_view = select_view(w, g, "auto", DELTA, EPS)
        expected = p.clone()
        if expected_view is not None:
            project_radial_(expected, w, expected_view, EPS)
        (expected_coef,), (expected_flag,) = radial_coefficients(
            [w], [g], [p], scale_invariant="auto", delta=DELTA, eps=EPS
        )
        results[case] = {
            "views": _on_all_ranks(view),
            "flags": _on_all_ranks(flag_value),
            "local_rows": _on_all_ranks(dw.to_local().shape[0]),
            "expected_view": expected_view,
            "expected_flag": bool(expected_flag),
            "projection_error": (projected.full_tensor() - expected).abs().max().item(),
            "coefficient_error": (coef.full_tensor() - expected_coef).abs().max().item(),
            "collectives": summarize(log.calls),
        }
    return results


def _make_gradient(w: Tensor, g: Tensor, kind: str) -> Tensor:
    """``g`` with its radial part removed per row, for the whole tensor, for the first half of
    the rows (rank 0's shard) or not at all."""
    rows_w, rows_g = channel_view(w), channel_view(g)
    per_row = rows_g - rows_w * (rows_g * rows_w).sum(1, keepdim=True) / rows_w.square().sum(
        1, keepdim=True
    )
    if kind == "channel_invariant":
        return per_row.reshape(w.shape)
    if kind == "layer_invariant":
        return g - w * (g * w).sum() / w.square().sum()
    if kind == "half_invariant":
        first = (w.shape[0] + 1) // 2
        return torch.cat([per_row[:first], rows_g[first:]]).reshape(w.shape)
    return g


# -------------------------------------------------------------------------------- training


def reference_run(
    model_name: str, optimizer_name: str, mode: str, foreach: bool
) -> tuple[list[Tensor], Counter[str]]:
    """Single process: each step accumulates the mean of the ranks' micro-batch losses."""
    cls, hyper = OPTIMIZERS[optimizer_name]
    model = build_model(model_name)
    optimizer = cls(param_groups(model, mode), foreach=foreach, **hyper)
    branches: Counter[str] = Counter()
    for step in range(STEPS):
        optimizer.zero_grad()
        for r in range(WORLD_SIZE):
            x, y = micro_batch(model_name, step, r)
            (loss_of(model_name, model, x, y) / WORLD_SIZE).backward()
        for p in model.parameters():
            if p.dim() >= 2:
                branches[str(select_view(p.detach(), p.grad, "auto", DELTA, EPS))] += 1
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()], branches


def distributed_run(
    strategy: str, model_name: str, optimizer_name: str, mode: str, foreach: bool,
    rank: int, mesh: DeviceMesh,
) -> tuple[list[Tensor], dict[str, Any]]:
    cls, hyper = OPTIMIZERS[optimizer_name]
    model = build_model(model_name)
    if strategy in ("fsdp2", "hsdp"):
        if strategy == "hsdp":
            mesh = init_device_mesh("cpu", (1, WORLD_SIZE), mesh_dim_names=("replicate", "shard"))
        fully_shard(model, mesh=mesh)
        wrapped: nn.Module = model
        optimizer: Any = cls(param_groups(model, mode), foreach=foreach, **hyper)
    else:
        wrapped = DistributedDataParallel(model)
        if strategy == "ddp":
            optimizer = cls(param_groups(model, mode), foreach=foreach, **hyper)
        else:
            optimizer = ZeroRedundancyOptimizer(
                param_groups(model, mode), optimizer_class=cls, foreach=foreach, **hyper
            )
    log = CollectiveLog()
    for step in range(STEPS):
        optimizer.zero_grad()
        x, y = micro_batch(model_name, step, rank)
        loss_of(model_name, wrapped, x, y).backward()
        with log:
            optimizer.step()
    params = [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in model.parameters()]
    info: dict[str, Any] = {"step_collectives": summarize(log.calls)}
    if strategy in ("fsdp2", "hsdp"):
        weight = next(p for p in model.parameters() if p.dim() >= 2)
        info["placements"] = [str(p) for p in weight.placements]
        info["local_rows"] = _on_all_ranks(
            {n: p.to_local().shape[0] for n, p in model.named_parameters()}
        )
    return params, info


def _on_all_ranks(value: Any) -> list[Any]:
    gathered: list[Any] = [None] * WORLD_SIZE
    dist.all_gather_object(gathered, value)
    return gathered


def training_job(rank: int, mesh: DeviceMesh, cases: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    references: dict[tuple[str, str, str, bool], tuple[list[Tensor], Counter[str]]] = {}
    for case in cases:
        strategy, model_name, optimizer_name, mode, foreach_text = case.split("/")
        foreach = foreach_text == "foreach=True"
        key = (model_name, optimizer_name, mode, foreach)
        if key not in references:
            references[key] = reference_run(*key)
        expected, branches = references[key]
        started = time.perf_counter()
        params, info = distributed_run(
            strategy, model_name, optimizer_name, mode, foreach, rank, mesh
        )
        info["seconds"] = time.perf_counter() - started
        start = build_model(model_name)
        error = max((a - b).abs().max().item() for a, b in zip(params, expected, strict=True))
        moved = max(
            (b - s).abs().max().item()
            for b, s in zip(expected, start.parameters(), strict=True)
        )
        worst = torch.tensor([error])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # the worse of the two ranks
        results[case] = {"error": worst.item(), "moved": moved, "branches": dict(branches), **info}
    return results


# ------------------------------------------------------------------------------------ FSDP1


def fsdp1_job(rank: int) -> dict[str, Any]:
    """FSDP1 hands the optimizer 1-D flat shards: check they are refused, or warned about."""
    results: dict[str, Any] = {}
    for use_orig_params in (False, True):
        for optimizer_name in ("adamp", "sgdp"):
            cls, hyper = OPTIMIZERS[optimizer_name]
            name = f"{cls.__name__}/use_orig_params={use_orig_params}"
            model = FullyShardedDataParallel(
                build_model("cnn"), device_id=torch.device("cpu"), use_orig_params=use_orig_params
            )
            x, y = micro_batch("cnn", 0, rank)
            loss_of("cnn", model, x, y).backward()
            refused = cls(model.parameters(), **hyper)
            try:
                refused.step()
                error = None
            except ValueError as exc:
                error = str(exc)
            allowed = cls(model.parameters(), allow_flat_params=True, **hyper)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                allowed.step()
            results[name] = {
                "error": error,
                "warnings": [str(w.message) for w in caught if w.category is UserWarning],
                "shapes": [tuple(p.shape) for p in model.parameters()],
            }
    return results


# ------------------------------------------------------------------------------------ entry


def _worker(rank: int, port: int, out: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120)
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        jobs: dict[str, Callable[[], dict[str, Any]]] = {
            "projection": lambda: projection_job(rank, mesh),
            "training": lambda: training_job(rank, mesh, cases),
            "fsdp1": lambda: fsdp1_job(rank),
        }
        results: dict[str, Any] = {"seconds": {}}
        for name, job in jobs.items():
            started = time.perf_counter()
            results[name] = job()
            results["seconds"][name] = time.perf_counter() - started
        if rank == 0:
            Path(out).write_text(json.dumps(results, indent=1))
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, cases: list[str]) -> dict[str, Any]:
    """Run the jobs, with the training ``cases``, on ``WORLD_SIZE`` CPU processes; return rank
    0's measurements."""
    mp.spawn(_worker, args=(free_port(), str(out), cases), nprocs=WORLD_SIZE, join=True)
    return json.loads(Path(out).read_text())


if __name__ == "__main__":
    import sys

    if not torch.cuda.is_available():  # as conftest.py does: the Triton cases' interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    start = time.perf_counter()
    found = launch(Path(sys.argv[1] if len(sys.argv) > 1 else "dist_results.json"),
                   training_cases())
    print(json.dumps(found, indent=1))
    print(f"{time.perf_counter() - start:.1f} s")
