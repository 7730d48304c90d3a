"""What scaleinv needs to know about sharded parameters.

The cosine test and the projection need, per tensor, its rows (the channel view) and
reductions over all of them (the max of the row cosines, the layer-view dot products). How a
training setup hands tensors to the optimizer decides whether that is possible:

* DDP and ``ZeroRedundancyOptimizer`` give every rank whole tensors: nothing to do.
* FSDP2 (``fully_shard``) gives every rank a ``DTensor`` sharded along dim 0 (``Shard(0)``):
  each row lives on one rank, so row statistics are local, and the per-tensor reductions come
  out as DTensor ``Partial`` values that DTensor all-reduces (one scalar each) when they are
  compared with the threshold. Every rank then takes the same branch, and no parameter is
  gathered. :func:`rows_max` is the one reduction DTensor cannot do for us: a rank whose shard
  holds no rows (more ranks than rows).
* Flat shards (FSDP1's ``FlatParameter``, FSDP1 ``use_orig_params=True`` views, the flat
  partitions DeepSpeed ZeRO puts into the param groups) are 1-D slices of several tensors laid
  end to end: the rows and the tensor boundaries the test needs are gone, so the projection
  would silently never fire. :func:`check_flat_shard` refuses them, or warns once when the user
  opts in with ``allow_flat_params=True``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
from torch import Tensor

__all__ = [
    "all_reduce_row_statistics", "check_flat_shard", "flat_shard_reason", "is_dtensor",
    "remember_params", "row_shard_group", "rows_max",
]

if TYPE_CHECKING or torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
else:  # a torch build without torch.distributed has no DTensor either
    DTensor = None


def is_dtensor(x: Tensor) -> TypeGuard[DTensor]:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters are)."""
    return DTensor is not None and isinstance(x, DTensor)


def row_shard_group(x: Tensor) -> Any:
    """The process group across which the rows of DTensor ``x`` are split, where they are split
    along dim 0 over one mesh dimension and replicated over any other (FSDP2, HSDP); else
    ``None`` (a plain tensor, or another layout)."""
    if not is_dtensor(x):
        return None
    placements = x.placements
    sharded = [i for i, p in enumerate(placements) if p.is_shard()]
    # is_shard() is true of Shard placements only, which the type checkers cannot follow.
    if len(sharded) != 1 or cast("Shard", placements[sharded[0]]).dim != 0:
        return None
    if not all(p.is_shard() or p.is_replicate() for p in placements):
        return None
    return x.device_mesh.get_group(sharded[0])


def all_reduce_row_statistics(group: Any, partials: Tensor) -> None:
    """All-reduce, in place across ``group``, per-tensor statistics of row shards: row 0 of
    ``partials`` (the largest row cosine) by max, the other rows (sums) by sum. Two collectives
    whatever the number of tensors."""
    torch.distributed.all_reduce(partials[0], op=torch.distributed.ReduceOp.MAX, group=group)
    torch.distributed.all_reduce(partials[1:], op=torch.distributed.ReduceOp.SUM, group=group)


def rows_max(x: Tensor) -> Tensor:
    """``max_i x_i`` of a 1-D tensor holding one statistic per row (a 0-dim tensor).

    A DTensor whose rows are sharded is reduced on each rank (``-inf`` on a rank that holds no
    row) and returned as a ``Partial("max")`` DTensor, which DTensor all-reduces, one element,
    when it is next used with a replicated value.
    """
    if not is_dtensor(x):
        return x.amax()
    whole = tuple(Replicate() if p.is_partial() else p for p in x.placements)
    if whole != tuple(x.placements):
        x = x.redistribute(x.device_mesh, whole)
    local = x.to_local()
    local_max = local.amax() if local.numel() > 0 else local.new_full((), float("-inf"))
    placements = [Partial("max") if p.is_shard() else p for p in whole]
    return DTensor.from_local(local_max, x.device_mesh, placements, run_check=False)


@dataclass
class _BuiltWith:
    """The tensors an optimizer was built with (by id), to recognise tensors swapped in later."""

    param_ids: set[int] = field(default_factory=set)
    fsdp_matrix: bool = False  # some FSDP1-managed tensor kept its shape: FSDP1 did not shard


_BUILT_WITH = "_scaleinv_built_with"


def _built_with(optimizer: Any) -> _BuiltWith:
    record: _BuiltWith | None = optimizer.__dict__.get(_BUILT_WITH)
    if record is None:  # e.g. an unpickled optimizer: take its groups as they are now
        record = _BuiltWith()
        optimizer.__dict__[_BUILT_WITH] = record
        for group in optimizer.param_groups:
            remember_params(optimizer, group)
    return record


def remember_params(optimizer: Any, group: dict[str, Any]) -> None:
    """Record the tensors of ``group`` as ones ``optimizer`` was given (call in add_param_group)."""
    record = optimizer.__dict__.setdefault(_BUILT_WITH, _BuiltWith())
    for p in group["params"]:
        record.param_ids.add(id(p))
        if getattr(p, "_fsdp_flattened", False) and p.dim() >= 2:
            record.fsdp_matrix = True


def flat_shard_reason(p: Tensor, optimizer: Any) -> str | None:
    """Why ``p`` is a flat 1-D shard rather than a parameter with its own shape, or ``None``."""
    if getattr(p, "_is_flat_param", False):
        return (
            "it is an FSDP FlatParameter (FullyShardedDataParallel with use_orig_params=False "
            "flattens all tensors of a module into one 1-D parameter and shards that)"
        )
    if p.dim() != 1:
        return None
    record = _built_with(optimizer)
    if getattr(p, "_fsdp_flattened", False) and not record.fsdp_matrix:
        return (
            "it is a 1-D view into an FSDP FlatParameter shard (FullyShardedDataParallel with "
            "use_orig_params=True shows each rank's slice of every tensor as a flat 1-D view)"
        )
    if id(p) not in record.param_ids:
        return (
            "it was put into a param group after the optimizer was built, as DeepSpeed ZeRO does "
            "when it replaces each group's tensors by this rank's flat 1-D partition"
        )
    return None


def check_flat_shard(optimizer: Any, p: Tensor, group: dict[str, Any]) -> None:
    """Refuse a flat 1-D shard in ``group`` (warn once if ``group["allow_flat_params"]``).

    Called when ``optimizer`` first meets ``p`` (when it creates its state).
    """
    reason = flat_shard_reason(p, optimizer)
    if reason is None:
        return
    name = type(optimizer).__name__
    explanation = (
        f"{name} was given a flat 1-D shard of shape {tuple(p.shape)}: {reason}. The cosine test "
        "and the projection need each tensor whole, in its own shape, so on flat shards they "
        f"never fire and {name} steps like its plain counterpart (Adam/SGD with decoupled "
        "weight decay)."
    )
    if not group.get("allow_flat_params", False):
        raise ValueError(
            f"{explanation} Shard with FSDP2 (torch.distributed.fsdp.fully_shard), which keeps "
            "shapes, or use DDP or ZeroRedundancyOptimizer; pass allow_flat_params=True to step "
            "without projection on such tensors. See docs/distributed.md."
        )
    warnings.warn(
        f"{name}(allow_flat_params=True) steps flat 1-D shards without projection: the cosine "
        "test needs each tensor whole in its own shape (FSDP1 FlatParameter, DeepSpeed ZeRO "
        "partitions). Use FSDP2 (fully_shard) to keep the projection. See docs/distributed.md.",
        UserWarning,
        stacklevel=3,
    )
