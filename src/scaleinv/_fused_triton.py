"""The GPU kernels of the fused path: Triton, one launch per pass over all tensors of a group.

Imported only where Triton is installed (it is an optional dependency; CPU installs never need
it). Every tensor is seen as ``[n, d]`` rows that are contiguous blocks of memory, and one
program handles one row; a tensor that is never projected (1-D, ``scale_invariant=False``) is
cut into rows of :data:`PLAIN_ROW` elements. The tensors' addresses reach the kernels through a
table of pointers, so a whole group is one launch whatever its number of tensors.

AdamP's passes, in arrays of one element per weight (``docs/performance.md``):

* never projected: one pass that updates the state and the weight, like
  ``torch.optim.AdamW(fused=True)`` (7 arrays);
* otherwise (``"auto"``, or a view given): pass 1 updates the state and writes each row's sums
  ``|g_i|^2, <g_i, w_i>, |w_i|^2, <w_i, p_i>`` (6 arrays); a small decision kernel (one
  program per tensor) runs the cosine test on those sums, or takes the given view, and writes
  the view and the layer coefficient; pass 2 reads ``m``, ``v`` and ``w``, recomputes ``p``
  and writes ``w`` (4 arrays, 5 with nesterov): 10 in all (SGDP: 4 + 3 = 7).

A one-pass kernel for ``scale_invariant="channel"`` (each row held in registers while
``<w_i, p_i>`` is summed: 7 arrays) was measured slower on an H200 than these two passes (one
program per row of up to 8192 elements leaves too few programs per SM), and was dropped.

FSDP2's row shards run as their local tensors: the decision kernel then runs twice, first
writing each tensor's local statistics, which the caller all-reduces across the shards (two
collectives for the whole group, see :class:`Shards`), then deciding from them.

The decision never leaves the device: no host synchronisation. The cosine test and the
projection coefficient are the maths of :mod:`scaleinv.projection` written again for a kernel;
``tests/test_triton.py`` holds them to the single-tensor reference (on a CPU through Triton's
interpreter, ``TRITON_INTERPRET=1``). SGDP uses the same kernels with its own state update.
"""

from __future__ import annotations

import functools
import itertools
import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

from scaleinv._constants import (
    MODE_CHANNEL,
    MODE_LAYER,
    MODE_PLAIN,
    VIEW_CHANNEL,
    VIEW_LAYER,
    VIEW_NONE,
)

__all__ = ["PLAIN_ROW", "Shards", "adamp_step", "sgdp_step", "supports"]

BLOCK = 256  # elements per chunk of a row (H200: as good as 128 or 512; 1024, 2048 slower)
NUM_WARPS = 4  # per program of the looped passes
PLAIN_ROW = 8192  # row length of a tensor that is never projected
DECIDE_BLOCK = 1024  # rows per chunk of the decision kernel
_META = 5  # int64 per tensor: numel, row length, mode, first row, number of rows
# The same numbers as seen from inside a kernel (which reads only constexpr globals).
_K_META = tl.constexpr(_META)
_K_PLAIN, _K_CHANNEL, _K_LAYER = (tl.constexpr(m) for m in (MODE_PLAIN, MODE_CHANNEL, MODE_LAYER))
_K_VIEW_NONE, _K_VIEW_CHANNEL, _K_VIEW_LAYER = (
    tl.constexpr(float(v)) for v in (VIEW_NONE, VIEW_CHANNEL, VIEW_LAYER))
# Where a kernel takes the step sizes from: its arguments, a [K, 4] table, the step counters.
FROM_ARGUMENTS, FROM_TABLE, FROM_COUNTERS = 0, 1, 2
_K_FROM_TABLE, _K_FROM_COUNTERS = tl.constexpr(FROM_TABLE), tl.constexpr(FROM_COUNTERS)
_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def supports(dtype: torch.dtype) -> bool:
    return dtype in _DTYPES


# ---------------------------------------------------------------------------------------------
# Maths shared by the kernels


@triton.jit
def _new_state(g, a, b, c1, c2, IS_ADAM: tl.constexpr):
    """Adam: ``m = c1 m + (1 - c1) g``, ``v = c2 v + (1 - c2) g^2``; SGD: ``buf = c1 buf +
    c2 g`` (``c1`` the momentum, ``c2 = 1 - dampening``; ``b`` unused)."""
    if IS_ADAM:
        a = a * c1 + g * (1 - c1)
        b = b * c2 + g * g * (1 - c2)
    else:
        a = a * c1 + g * c2
    return a, b


@triton.jit
def _direction(g, a, b, c1, rsqrt, eps, IS_ADAM: tl.constexpr, NESTEROV: tl.constexpr):
    """The update ``p`` from the new state. Adam: ``n / (sqrt(v) / sqrt(1 - beta2^t) + eps)``
    with ``n = m`` or, nesterov, ``beta1 m + (1 - beta1) g``; SGD: ``buf`` or, nesterov,
    ``g + momentum buf``."""
    if IS_ADAM:
        if NESTEROV:
            numerator = a * c1 + g * (1 - c1)
        else:
            numerator = a
        p = numerator / (tl.sqrt(b) * rsqrt + eps)
    else:
        if NESTEROV:
            p = g + a * c1
        else:
            p = a
    return p


@triton.jit
def _coefficient(wp, ww, eps):
    """``s = <w, p> / (|w| + eps)^2``: the projected update is ``p - w s``."""
    norm = tl.sqrt(ww) + eps
    return wp / (norm * norm)


@triton.jit
def _power(base_hi, base_lo, exponent):
    """``base^n`` in float64 for a whole number ``n = exponent`` below ``2^25`` (repeated
    squaring); ``base = base_hi + base_lo``, two float32 numbers that keep float64 precision."""
    base = tl.cast(base_hi, tl.float64) + tl.cast(base_lo, tl.float64)
    n = exponent.to(tl.int64)
    result = base * 0.0 + 1.0
    for _ in tl.static_range(25):  # pyright: ignore[reportGeneralTypeIssues]  # 2^24: float32
        result = tl.where((n & 1) == 1, result * base, result)
        base = base * base
        n = n >> 1
    return result


@triton.jit
def _scalars(scalars, table, K, t, step_size, rsqrt, decay_plain, decay_projected,
             b1_hi, b1_lo, b2_hi, b2_lo, SOURCE: tl.constexpr):
    """Step size, ``1 / sqrt(1 - beta2^t)`` and the two decay factors of tensor ``t``. Where
    from (``SOURCE``): the arguments; row ``t`` of the ``[K, 4]`` device array ``scalars``; or
    the tensor's step counter (row 4 of ``table``), with ``step_size`` holding ``lr``:
    ``lr / (1 - beta1^t)`` and ``1 / sqrt(1 - beta2^t)`` from ``beta = b_hi + b_lo``."""
    if SOURCE == _K_FROM_TABLE:
        step_size = tl.load(scalars + 4 * t)
        rsqrt = tl.load(scalars + 4 * t + 1)
        decay_plain = tl.load(scalars + 4 * t + 2)
        decay_projected = tl.load(scalars + 4 * t + 3)
    elif SOURCE == _K_FROM_COUNTERS:
        count = tl.load(tl.load(table + 4 * K + t).to(tl.pointer_type(tl.float32)))
        bias1 = (1.0 - _power(b1_hi, b1_lo, count)).to(tl.float32)
        bias2 = (1.0 - _power(b2_hi, b2_lo, count)).to(tl.float32)
        step_size = step_size / bias1
        rsqrt = 1.0 / tl.sqrt_rn(bias2)
    return step_size, rsqrt, decay_plain, decay_projected


@triton.jit
def _amp(amp, length, sign):
    """A ``GradScaler``'s ``(1 / scale, found_inf)`` at ``amp``: the row length to step (0 where
    an inf was found, so nothing is read or written) and the gradient's factor."""
    length = tl.where(tl.load(amp + 1) != 0.0, 0, length)
    return length, sign * tl.load(amp)


@triton.jit
def _row(table, meta, row_tensor, r, K, DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr):
    """Tensor ``t`` of global row ``r``, the row's start and length, the tensor's mode, and
    pointers to the row in ``w``, ``g`` (``DTYPE``) and the two states (``STATE_DTYPE``)."""
    t = tl.load(row_tensor + r)
    numel = tl.load(meta + _K_META * t)
    row_len = tl.load(meta + _K_META * t + 1)
    mode = tl.load(meta + _K_META * t + 2)
    first_row = tl.load(meta + _K_META * t + 3)
    start = (r - first_row) * row_len
    length = tl.minimum(row_len, numel - start)
    kind = tl.pointer_type(DTYPE)  # pyright: ignore[reportArgumentType]
    w = tl.load(table + t).to(kind) + start
    g = tl.load(table + K + t).to(kind) + start
    state_kind = tl.pointer_type(STATE_DTYPE)  # pyright: ignore[reportArgumentType]
    a = tl.load(table + 2 * K + t).to(state_kind) + start
    b = tl.load(table + 3 * K + t).to(state_kind) + start
    return t, mode, length, w, g, a, b


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _first_pass(
    table, meta, row_tensor, rows, stats, scalars, K,
    c1, c2, eps, sign, step_size, rsqrt, decay_plain, decay_projected,
    b1_hi, b1_lo, b2_hi, b2_lo, amp,
    DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, IS_ADAM: tl.constexpr,
    NESTEROV: tl.constexpr, HAS_AMP: tl.constexpr,
    SOURCE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Never-projected rows: the whole step. Other rows: new state, and the row's sums
    ``(|g|^2, <g, w>, |w|^2, <w, p>)`` into ``stats[r]``. ``HAS_AMP``: ``amp`` holds
    ``(1 / grad_scale, found_inf)`` of a ``GradScaler``; with ``found_inf`` nothing is
    written."""
    r = tl.load(rows + tl.program_id(0))
    t, mode, length, w_ptr, g_ptr, a_ptr, b_ptr = _row(
        table, meta, row_tensor, r, K, DTYPE, STATE_DTYPE)
    if HAS_AMP:
        length, sign = _amp(amp, length, sign)
    step_size, rsqrt, decay_plain, decay_projected = _scalars(
        scalars, table, K, t, step_size, rsqrt, decay_plain, decay_projected, b1_hi, b1_lo,
        b2_hi, b2_lo, SOURCE)
    offsets = tl.arange(0, BLOCK)
    gg = tl.zeros([BLOCK], dtype=tl.float32)
    gw = tl.zeros([BLOCK], dtype=tl.float32)
    ww = tl.zeros([BLOCK], dtype=tl.float32)
    wp = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, length, BLOCK):
        mask = start + offsets < length
        g = tl.load(g_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32) * sign
        a = tl.load(a_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32)
        b = a
        if IS_ADAM:
            b = tl.load(b_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32)
        a, b = _new_state(g, a, b, c1, c2, IS_ADAM)
        tl.store(a_ptr + start + offsets, a.to(STATE_DTYPE), mask=mask)
        if IS_ADAM:
            tl.store(b_ptr + start + offsets, b.to(STATE_DTYPE), mask=mask)
        p = _direction(g, a, b, c1, rsqrt, eps, IS_ADAM, NESTEROV)
        w = tl.load(w_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32)
        if mode == _K_PLAIN:
            tl.store(w_ptr + start + offsets, (w * decay_plain - step_size * p).to(DTYPE),
                     mask=mask)
        else:
            gg += g * g
            gw += g * w
            ww += w * w
            wp += tl.where(mask, w * p, 0.0)  # a masked lane's p is 0/0 when eps = 0
    if mode != _K_PLAIN:
        tl.store(stats + 4 * r, tl.sum(gg, 0))
        tl.store(stats + 4 * r + 1, tl.sum(gw, 0))
        tl.store(stats + 4 * r + 2, tl.sum(ww, 0))
        tl.store(stats + 4 * r + 3, tl.sum(wp, 0))


@triton.jit
def _decide(meta, thresholds, tensors, stats, partials, views, eps, K,
            PHASE: tl.constexpr, BLOCK: tl.constexpr):
    """One tensor: the view (``"auto"``: the cosine test on the row sums; else the annotation)
    into ``views[2t]`` and the layer coefficient ``<w, p> / (|w| + eps)^2`` into ``views[2t+1]``.

    Test: channel if ``max_i |<g_i, w_i>| / (max(|g_i|, eps) max(|w_i|, eps)) < delta /
    sqrt(d)``, else layer if the same on the whole tensor ``< delta / sqrt(n d)``.

    ``PHASE`` 0 does it all; for a tensor whose rows are sharded across processes, phase 1
    writes this process's part, ``partials[c * K + t]`` for ``c`` = (max row cosine, ``|g|^2``,
    ``<g, w>``, ``|w|^2``, ``<w, p>``), which the caller all-reduces (max, then sums), and
    phase 2 decides from them."""
    t = tl.load(tensors + tl.program_id(0))
    mode = tl.load(meta + _K_META * t + 2)
    if PHASE == 2:
        max_cos = tl.load(partials + t)
        gg_sum = tl.load(partials + K + t)
        gw_sum = tl.load(partials + 2 * K + t)
        ww_sum = tl.load(partials + 3 * K + t)
        wp_sum = tl.load(partials + 4 * K + t)
    else:
        first_row = tl.load(meta + _K_META * t + 3)
        n_rows = tl.load(meta + _K_META * t + 4)
        offsets = tl.arange(0, BLOCK)
        row_max = tl.zeros([BLOCK], dtype=tl.float32)
        gg = tl.zeros([BLOCK], dtype=tl.float32)
        gw = tl.zeros([BLOCK], dtype=tl.float32)
        ww = tl.zeros([BLOCK], dtype=tl.float32)
        wp = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_rows, BLOCK):
            mask = start + offsets < n_rows
            row = stats + 4 * (first_row + start + offsets)
            row_gg = tl.load(row, mask=mask, other=0.0)
            row_gw = tl.load(row + 1, mask=mask, other=0.0)
            row_ww = tl.load(row + 2, mask=mask, other=0.0)
            cos = tl.abs(row_gw) / (tl.maximum(tl.sqrt(row_gg), eps)
                                    * tl.maximum(tl.sqrt(row_ww), eps))
            cos = tl.where(cos == cos, cos, float("inf"))  # NaN fails the test, as inf does
            row_max = tl.maximum(row_max, tl.where(mask, cos, 0.0))
            gg += row_gg
            gw += row_gw
            ww += row_ww
            wp += tl.load(row + 3, mask=mask, other=0.0)
        max_cos = tl.max(row_max, 0)
        gg_sum = tl.sum(gg, 0)
        gw_sum = tl.sum(gw, 0)
        ww_sum = tl.sum(ww, 0)
        wp_sum = tl.sum(wp, 0)
    if PHASE == 1:
        tl.store(partials + t, max_cos)
        tl.store(partials + K + t, gg_sum)
        tl.store(partials + 2 * K + t, gw_sum)
        tl.store(partials + 3 * K + t, ww_sum)
        tl.store(partials + 4 * K + t, wp_sum)
    else:
        layer_cos = tl.abs(gw_sum) / (tl.maximum(tl.sqrt(gg_sum), eps)
                                      * tl.maximum(tl.sqrt(ww_sum), eps))
        channel_ok = max_cos < tl.load(thresholds + 2 * t)
        layer_ok = layer_cos < tl.load(thresholds + 2 * t + 1)
        view = tl.where(mode == _K_CHANNEL, _K_VIEW_CHANNEL, tl.where(
            mode == _K_LAYER, _K_VIEW_LAYER, tl.where(
                channel_ok, _K_VIEW_CHANNEL, tl.where(layer_ok, _K_VIEW_LAYER, _K_VIEW_NONE))))
        tl.store(views + 2 * t, view)
        tl.store(views + 2 * t + 1, _coefficient(wp_sum, ww_sum, eps))


@triton.jit
def _second_pass(
    table, meta, row_tensor, rows, stats, views, scalars, K,
    c1, eps, sign, step_size, rsqrt, decay_plain, decay_projected,
    b1_hi, b1_lo, b2_hi, b2_lo, amp,
    DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, IS_ADAM: tl.constexpr,
    NESTEROV: tl.constexpr, HAS_AMP: tl.constexpr,
    SOURCE: tl.constexpr, PROJECT_BUFFER: tl.constexpr, BLOCK: tl.constexpr,
):
    """The weight of a row whose tensor took the test: ``w <- w (decay + lr s) - lr p`` with
    ``p`` recomputed from the new state and ``s`` the view's coefficient (0: no view).
    ``HAS_AMP`` as in :func:`_first_pass`."""
    r = tl.load(rows + tl.program_id(0))
    t, mode, length, w_ptr, g_ptr, a_ptr, b_ptr = _row(
        table, meta, row_tensor, r, K, DTYPE, STATE_DTYPE)
    if HAS_AMP:
        length, sign = _amp(amp, length, sign)
    step_size, rsqrt, decay_plain, decay_projected = _scalars(
        scalars, table, K, t, step_size, rsqrt, decay_plain, decay_projected, b1_hi, b1_lo,
        b2_hi, b2_lo, SOURCE)
    view = tl.load(views + 2 * t)
    channel_s = _coefficient(tl.load(stats + 4 * r + 3), tl.load(stats + 4 * r + 2), eps)
    s = tl.where(view == _K_VIEW_CHANNEL, channel_s,
                 tl.where(view == _K_VIEW_LAYER, tl.load(views + 2 * t + 1), 0.0))
    decay = tl.where(view == _K_VIEW_NONE, decay_plain, decay_projected)
    offsets = tl.arange(0, BLOCK)
    for start in range(0, length, BLOCK):
        mask = start + offsets < length
        a = tl.load(a_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32)
        g = a  # read only with nesterov
        b = a
        if IS_ADAM:
            b = tl.load(b_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32)
        if NESTEROV:
            g = tl.load(g_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32) * sign
        p = _direction(g, a, b, c1, rsqrt, eps, IS_ADAM, NESTEROV)
        w = tl.load(w_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32)
        if PROJECT_BUFFER:
            tl.store(a_ptr + start + offsets, (p - w * s).to(STATE_DTYPE), mask=mask)
        tl.store(w_ptr + start + offsets, (w * (decay + step_size * s) - step_size * p).to(DTYPE),
                 mask=mask)


# ---------------------------------------------------------------------------------------------
# Plans: the tables of one layout of a group, built once and kept on the device


@dataclass
class _Plan:
    meta: Tensor  # int64 [K, _META]
    thresholds: Tensor  # float32 [K, 2]: delta / sqrt(d), delta / sqrt(n d)
    row_tensor: Tensor  # int32 [R]: the tensor of each global row
    looped_rows: Tensor  # int64: rows of the first pass
    second_rows: Tensor  # int64: rows of tensors that take the test or need two passes
    decided: Tensor  # int64: tensors of those rows
    n_rows: int


def _layout_key(params: list[Tensor], modes: list[int], delta: float,
                whole: list[torch.Size] | None) -> _Key:
    return (params[0].device, delta, PLAIN_ROW, tuple(p.shape for p in params), tuple(modes),
            None if whole is None else tuple(whole))


def _build_plan(params: list[Tensor], modes: list[int], delta: float,
                whole: list[torch.Size] | None) -> _Plan:
    """``whole``: the shapes of the whole tensors where ``params`` are row shards of them (the
    thresholds are the whole tensor's), else ``None``."""
    device = params[0].device
    meta, thresholds, row_tensor = [], [], []
    looped: list[Tensor] = []
    second: list[Tensor] = []
    decided: list[int] = []
    first_row = 0
    for t, (p, mode) in enumerate(zip(params, modes, strict=True)):
        numel = p.numel()
        shape = p.shape if whole is None else whole[t]
        row_len = PLAIN_ROW if mode == MODE_PLAIN else math.prod(shape[1:])
        n_rows = -(-numel // row_len)
        meta.append([numel, row_len, mode, first_row, n_rows])
        thresholds.append([delta / math.sqrt(row_len), delta / math.sqrt(shape.numel())])
        row_tensor.append(torch.full((n_rows,), t, dtype=torch.int32))
        rows = torch.arange(first_row, first_row + n_rows)
        looped.append(rows)
        if mode != MODE_PLAIN:
            second.append(rows)
            decided.append(t)
        first_row += n_rows

    def on_device(rows: list[Tensor]) -> Tensor:
        return _copy_to(torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64), device)

    return _Plan(
        meta=_to_device(meta, torch.int64, device),
        thresholds=_to_device(thresholds, torch.float32, device),
        row_tensor=_copy_to(torch.cat(row_tensor), device),
        looped_rows=on_device(looped), second_rows=on_device(second),
        decided=_to_device(decided, torch.int64, device),
        n_rows=first_row,
    )


@dataclass
class Shards:
    """Row shards of whole tensors (FSDP2's ``Shard(0)``): their whole shapes, and a function
    that all-reduces the ``[5, K]`` partial statistics in place across the shards (row 0 by
    max, the others by sum)."""

    whole: list[torch.Size]
    all_reduce: Callable[[Tensor], None]


_Key: TypeAlias = tuple[Any, ...]
_V = TypeVar("_V")


class _Cache(Generic[_V]):
    """A few recent entries by key. Entries made while a CUDA graph is being captured are kept
    for good: the graph reads their tensors on every replay."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._recent: OrderedDict[_Key, _V] = OrderedDict()
        self._captured: dict[_Key, _V] = {}

    def get(self, key: _Key, build: Callable[[], _V]) -> _V:
        if key in self._captured:
            return self._captured[key]
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        value = build()
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            self._captured[key] = value
        else:
            self._recent[key] = value
            while len(self._recent) > self._size:
                self._recent.popitem(last=False)
        return value


_PLANS: _Cache[_Plan] = _Cache(16)
_POINTERS: _Cache[Tensor] = _Cache(16)


_CAPTURED_SOURCES: list[Tensor] = []  # pinned sources of copies that a CUDA graph replays


def _copy_to(host: Tensor, device: torch.device) -> Tensor:
    """``host`` on ``device`` without a blocking copy (from pinned memory on CUDA)."""
    if device.type != "cuda":
        return host.to(device)
    host = host.pin_memory()
    if torch.cuda.is_current_stream_capturing():
        _CAPTURED_SOURCES.append(host)
    return host.to(device, non_blocking=True)


def _to_device(values: list[Any], dtype: torch.dtype, device: torch.device) -> Tensor:
    return _copy_to(torch.tensor(values, dtype=dtype), device)


def _pointer_table(tensors: list[list[Tensor]], device: torch.device) -> Tensor:
    """int64 ``[5, K]`` on ``device``: the addresses of each tensor's ``w``, ``g``, two states
    and step counter (rows of ``w`` again where there is none)."""
    pointers = tuple(map(Tensor.data_ptr, itertools.chain.from_iterable(tensors)))
    return _POINTERS.get((device, pointers), lambda: _to_device(list(pointers), torch.int64,
                                                                 device))


@functools.lru_cache(maxsize=64)
def _split_float(x: float) -> tuple[float, float]:
    """``x`` as two float32 numbers whose float64 sum is ``x`` to about 48 bits."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


def _launch(
    params: list[Tensor], grads: list[Tensor], states_a: list[Tensor],
    states_b: list[Tensor] | None, counters: list[Tensor] | None, modes: list[int],
    source: int, scalars: Tensor | None, constants: dict[str, float], *, is_adam: bool,
    nesterov: bool, project_buffer: bool, delta: float, eps: float, shards: Shards | None,
    amp: Tensor | None = None,
) -> None:
    """The passes over one group. ``source`` (``FROM_*``) says where the step sizes come
    from: ``constants``, the ``[K, 4]`` array ``scalars``, or the step ``counters``.
    ``shards``: where ``params`` are row shards, the whole shapes and how to all-reduce."""
    device = params[0].device
    whole = None if shards is None else shards.whole
    plan = _PLANS.get(
        _layout_key(params, modes, delta, whole),
        lambda: _build_plan(params, modes, delta, whole))
    table = _pointer_table([params, grads, states_a, states_b or states_a, counters or params],
                           device)
    stats = torch.empty((plan.n_rows, 4), dtype=torch.float32, device=device)
    views = torch.empty((len(params), 2), dtype=torch.float32, device=device)
    common = dict(DTYPE=_DTYPES[params[0].dtype], STATE_DTYPE=_DTYPES[states_a[0].dtype],
                  IS_ADAM=is_adam, NESTEROV=nesterov, HAS_AMP=amp is not None,
                  SOURCE=source)
    scalar_table = scalars if scalars is not None else stats  # read only FROM_TABLE
    K = len(params)
    step = (constants["step_size"], constants["rsqrt"], constants["decay_plain"],
            constants["decay_projected"], *_split_float(constants["c1"]),
            *_split_float(constants["c2"]))
    c1, c2, sign = constants["c1"], constants["c2"], constants["sign"]
    if plan.looped_rows.numel():
        _first_pass[(plan.looped_rows.numel(),)](
            table, plan.meta, plan.row_tensor, plan.looped_rows, stats, scalar_table, K,
            c1, c2, eps, sign, *step, amp if amp is not None else stats, BLOCK=BLOCK,
            num_warps=NUM_WARPS, **common)  # pyright: ignore[reportCallIssue]  # a launch option
    if plan.decided.numel():
        # Triton's types take constexpr arguments for the kernel's constexpr values.
        decide: Callable[..., None] = _decide[(plan.decided.numel(),)]
        tables = (plan.meta, plan.thresholds, plan.decided, stats)
        if shards is None:
            decide(*tables, stats, views, eps, K, PHASE=0, BLOCK=DECIDE_BLOCK)
        else:
            partials = torch.zeros((5, K), dtype=torch.float32, device=device)
            decide(*tables, partials, views, eps, K, PHASE=1, BLOCK=DECIDE_BLOCK)
            shards.all_reduce(partials)
            decide(*tables, partials, views, eps, K, PHASE=2, BLOCK=DECIDE_BLOCK)
    if plan.second_rows.numel():
        _second_pass[(plan.second_rows.numel(),)](
            table, plan.meta, plan.row_tensor, plan.second_rows, stats, views, scalar_table, K,
            c1, eps, sign, *step, amp if amp is not None else stats,
            PROJECT_BUFFER=project_buffer, BLOCK=BLOCK,
            num_warps=NUM_WARPS, **common)  # pyright: ignore[reportCallIssue]  # a launch option


def _amp_array(grad_scale: Tensor | None, found_inf: Tensor | None,
               device: torch.device) -> Tensor | None:
    """``[1 / grad_scale, found_inf]`` (float32, on ``device``) for the kernels, computed there
    (no host read); ``None`` without a ``GradScaler``."""
    if grad_scale is None and found_inf is None:
        return None
    inverse = (torch.ones((), device=device) if grad_scale is None
               else grad_scale.to(device, torch.float32).reciprocal())
    found = (torch.zeros((), device=device) if found_inf is None
             else found_inf.to(device, torch.float32))
    return torch.stack([inverse, found])


def adamp_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], modes: list[int], *, lr: float | Tensor, beta1: float, beta2: float,
    eps: float, weight_decay: float, wd_ratio: float, delta: float, nesterov: bool,
    maximize: bool, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
    shards: Shards | None = None,
) -> None:
    """One AdamP step of ``params`` (one device and dtype, rows as blocks of memory) with
    per-tensor ``modes`` (``MODE_*``); ``shards`` where they are row shards. Increments
    ``steps``.

    Float32 step counters on the params' device (fused, capturable) are read by the kernels,
    which compute the bias corrections themselves; counters on the host of a GPU give the step
    sizes as numbers (arguments, or a small table where the counters differ); a ``lr`` on the
    device gives a ``[K, 4]`` device array computed there. Nothing is read back from the
    device."""
    device = params[0].device
    amp = _amp_array(grad_scale, found_inf, device)
    if amp is not None and found_inf is not None and steps[0].device != found_inf.device:
        if bool(found_inf):  # host counters: decided on the host (one read)
            return
        amp[1] = 0.0
    torch._foreach_add_(steps, 1)
    if isinstance(lr, Tensor) and lr.device.type == "cpu":
        lr = float(lr)
    constants = dict(c1=float(beta1), c2=float(beta2), sign=-1.0 if maximize else 1.0,
                     step_size=0.0, rsqrt=0.0, decay_plain=0.0, decay_projected=0.0)
    source, scalars, counters = FROM_ARGUMENTS, None, None
    steps_on_device = steps[0].device == device  # a group keeps all its counters alike
    if isinstance(lr, Tensor):
        if steps_on_device:
            counts = torch.stack(steps).to(device, torch.float32)
        else:
            counts = _to_device([float(s) for s in steps], torch.float32, device)
        lr_decay = lr * weight_decay
        source, scalars = FROM_TABLE, torch.stack([
            lr / (1 - torch.pow(beta1, counts)), (1 - torch.pow(beta2, counts)).rsqrt(),
            torch.ones_like(counts) - lr_decay, torch.ones_like(counts) - lr_decay * wd_ratio,
        ], dim=1)
    elif steps_on_device and steps[0].dtype == torch.float32:
        source, counters = FROM_COUNTERS, steps
        constants.update(step_size=lr, decay_plain=1 - lr * weight_decay,
                         decay_projected=1 - lr * weight_decay * wd_ratio)
    else:
        per_tensor = [(lr / (1 - beta1**t), 1 / math.sqrt(1 - beta2**t))
                      for t in (float(s) for s in steps)]  # host counters: no device read
        decays = (1 - lr * weight_decay, 1 - lr * weight_decay * wd_ratio)
        if len(set(per_tensor)) == 1:
            constants.update(step_size=per_tensor[0][0], rsqrt=per_tensor[0][1],
                             decay_plain=decays[0], decay_projected=decays[1])
        else:
            source = FROM_TABLE
            scalars = _to_device([[*x, *decays] for x in per_tensor], torch.float32, device)
    _launch(params, grads, exp_avgs, exp_avg_sqs, counters, modes, source, scalars, constants,
            is_adam=True, nesterov=nesterov, project_buffer=False, delta=delta, eps=eps,
            shards=shards, amp=amp)
    if amp is not None and steps[0].device == device:
        torch._foreach_sub_(steps, [amp[1]] * len(steps))  # a skipped step does not count


def sgdp_step(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], modes: list[int],
    *, lr: float, momentum: float, dampening: float, eps: float, decay_plain: float,
    decay_projected: float, delta: float, nesterov: bool, maximize: bool,
    project_buffer: bool, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
    shards: Shards | None = None,
) -> None:
    """One SGDP step of ``params`` (as :func:`adamp_step`; ``decay_*`` are the factors of
    :class:`scaleinv.SGDP`)."""
    constants = dict(c1=float(momentum), c2=1.0 - float(dampening),
                     sign=-1.0 if maximize else 1.0, step_size=float(lr), rsqrt=1.0,
                     decay_plain=float(decay_plain), decay_projected=float(decay_projected))
    _launch(params, grads, momentum_buffers, None, None, modes, FROM_ARGUMENTS, None, constants,
            is_adam=False, nesterov=nesterov, project_buffer=project_buffer, delta=delta,
            eps=eps, shards=shards, amp=_amp_array(grad_scale, found_inf, params[0].device))
