"""How the kernels see memory: every tensor as ``[n, d]`` rows (output channels) that are
contiguous blocks of memory, read in memory order; a 1-D tensor is one row.

These functions look only at metadata (shapes, strides, dtypes), so the choice of which
tensors a kernel takes can be made while ``torch.compile`` traces a step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from scaleinv._constants import MODE_OF_ANNOTATION, MODE_PLAIN
from scaleinv.distributed import is_dtensor, row_shard_group
from scaleinv.projection import ScaleInvariant

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["as_real", "group_by_device_and_dtype", "local_rows", "modes", "native_gradient",
           "native_takes", "row_views", "split_triton"]


def group_by_device_and_dtype(
    tensorlists: list[list[Tensor]],
) -> dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor]], list[int]]]:
    """``torch.optim``'s grouping (lists per device and dtype of the first list, with the
    indices), also while compiling, where torch's own helper gives one group keyed ``None``."""
    if not torch.compiler.is_compiling():
        grouped = Optimizer._group_tensors_by_device_and_dtype(
            tensorlists, with_indices=True)  # type: ignore[arg-type]
        return {key: (lists, indices) for key, (lists, indices) in grouped.items()}  # type: ignore[misc]
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor]], list[int]]] = {}
    for i, first in enumerate(tensorlists[0]):
        lists, indices = groups.setdefault(
            (first.device, first.dtype), ([[] for _ in tensorlists], []))
        for column, tensors in zip(lists, tensorlists, strict=True):
            column.append(tensors[i])
        indices.append(i)
    return groups


def modes(params: list[Tensor], scale_invariant: ScaleInvariant) -> list[int]:
    """The kernels' per-tensor mode (``MODE_*`` of :mod:`scaleinv._constants`): never project
    (1-D tensors, ``False``), the test (``"auto"``), or a given view."""
    mode = MODE_OF_ANNOTATION[scale_invariant]
    return [mode if p.dim() >= 2 else MODE_PLAIN for p in params]


def row_order(t: Tensor) -> tuple[int, ...]:
    """Dims of ``t`` from the outermost in memory to the innermost, dim 0 first."""
    strides = t.stride()
    return (0, *sorted(range(1, t.dim()), key=lambda i: -strides[i]))


def rows(t: Tensor, order: tuple[int, ...]) -> Tensor | None:
    """``t`` as an ``[n, d]`` view, or ``None`` where its rows are not contiguous blocks."""
    if t.dim() < 2:
        return t.view(1, -1) if t.is_contiguous() else None
    permuted = t.permute(order)
    return permuted.view(t.shape[0], -1) if permuted.is_contiguous() else None


def rows_are_blocks(t: Tensor) -> bool:
    return t.is_contiguous() or rows(t, row_order(t)) is not None


def native_takes(w: Tensor, grad: Tensor, states: list[Tensor], step: Tensor | None) -> bool:
    """Whether the C kernels, which read raw memory, can step ``w``: its states laid out like
    it, rows that are contiguous blocks, one dtype, and (AdamP) a float32 CPU step counter.
    A gradient laid out otherwise is copied (:func:`native_gradient`); it is only read."""
    if any(t.dtype != w.dtype for t in (grad, *states)) or is_dtensor(w):
        return False
    if step is not None and not (step.dtype == torch.float32 and step.device.type == "cpu"
                                 and step.numel() == 1):
        return False
    if w.is_contiguous() and all(s.is_contiguous() for s in states):
        return True
    return rows_are_blocks(w) and all(s.stride() == w.stride() for s in states)


def native_gradient(w: Tensor, grad: Tensor) -> Tensor:
    """``grad`` laid out like ``w`` (a copy where it is not)."""
    return grad if grad.stride() == w.stride() else torch.empty_like(w).copy_(grad)


def unviewed(t: Tensor) -> Tensor:
    """A tensor on the memory of ``t`` that is not a view of it: dynamo guards on the base of
    a view input, which would make each layout of each parameter a compilation of its own."""
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def row_views(w: Tensor, grad: Tensor, states: list[Tensor], *,
              alias: bool = True) -> list[Tensor] | None:
    """``[w, grad, *states]`` as ``[n, d]`` tensors in ``w``'s memory order, or ``None``. A
    gradient laid out otherwise is copied; the states must be laid out like ``w``, in one
    dtype (float32 state of a 16-bit ``w`` included). ``alias``:
    the views as fresh tensors on the same memory (see :func:`unviewed`); ``False`` to only
    check the layout (traceable)."""
    if w.numel() == 0 or grad.dtype != w.dtype or len({t.dtype for t in states}) > 1:
        return None
    order = row_order(w)
    views = [rows(t, order) for t in (w, *states)]
    if any(v is None for v in views):
        return None
    grad_rows = grad.permute(order).reshape(w.shape[0], -1)
    if not alias:
        return [views[0], grad_rows, *views[1:]]  # type: ignore[list-item]
    return [unviewed(t) for t in (views[0], grad_rows, *views[1:])]  # type: ignore[arg-type]


TritonLaunch = tuple[list[int], list[list[Tensor]], Any]  # indices, columns, shards or None


def split_triton(
    params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]],
) -> tuple[list[TritonLaunch], list[int]]:
    """The launches of the Triton kernels (indices, inputs as columns ``[ws, gs, *states]``,
    and for row shards their whole shapes and process group), and the indices left
    to the multi-tensor body. The kernels read each tensor from its first element in ``w``'s
    memory order: the tensors themselves where all are contiguous (the usual case, checked
    first: this runs per tensor per step, before the first launch), else row views. FSDP2's
    row shards go in one launch per process group, as their local tensors; other DTensors are
    left to the multi-tensor body."""
    columns: list[list[Tensor]] = [params, grads, *states]
    state_dtype = states[0][0].dtype  # one per launch: the group's params share a dtype
    if (all(all(map(Tensor.is_contiguous, column)) for column in columns)
            and all(map(Tensor.numel, params)) and not any(map(is_dtensor, params))
            and all(s.dtype == state_dtype for column in states for s in column)):
        return [(list(range(len(params))), columns, None)], []
    launches: dict[Any, tuple[list[int], list[list[Tensor]], list[torch.Size]]] = {}
    left: list[int] = []
    for i, tensors in enumerate(zip(*columns, strict=True)):
        w, g, *tensor_states = tensors
        group = row_shard_group(w)
        if any(t.dtype != state_dtype for t in tensor_states):
            rows = None
        elif group is not None:  # every rank takes it, so the partials line up across ranks
            rows = local_rows(tensors)
        elif is_dtensor(w):
            rows = None
        else:
            rows = row_views(w, g, tensor_states)
        if rows is None:
            left.append(i)
            continue
        taken, kept, whole = launches.setdefault(group, ([], [[] for _ in columns], []))
        taken.append(i)
        whole.append(tensors[0].shape)
        for column, t in zip(kept, rows, strict=True):
            column.append(t)
    return [
        (taken, kept, None if group is None else (whole, group))
        for group, (taken, kept, whole) in launches.items()
    ], left


def local_rows(tensors: tuple[Tensor, ...]) -> list[Tensor]:
    """A row shard's local ``[w, g, *states]`` as ``[n_local, d]`` tensors (FSDP2 keeps them
    contiguous; an empty shard gives ``[0, d]``)."""
    d = tensors[0].shape[1:].numel()
    local = [cast("DTensor", t).to_local() for t in tensors]  # row shards are DTensors
    if not all(t.is_contiguous() for t in local):
        raise RuntimeError(
            "scaleinv's fused step needs contiguous local shards of a row-sharded DTensor "
            f"(got strides {[t.stride() for t in local]}); use foreach=True for this group"
        )
    return [t.view(t.shape[0], d) for t in local]


def as_real(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Complex tensors as their real views (``dtype``: the group's, checked once)."""
    if not dtype.is_complex:
        return tensors
    return [torch.view_as_real(t) for t in tensors]
