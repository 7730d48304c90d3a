"""The CPU kernels of the fused path: C99 + OpenMP, built once per machine, called via ctypes.

One call runs a whole AdamP or SGDP step over every tensor of a group. Per tensor ``w`` (seen
as ``[n, d]`` rows, one per output channel) the kernel reads memory as few times as the maths
allows (``docs/performance.md``); AdamP's counts, in arrays of one element per weight:

* never projected (1-D tensors, ``scale_invariant=False``): one pass, like
  ``torch.optim.AdamW(fused=True)`` (7 arrays);
* ``"auto"``: first the cosine test, which reads only ``g`` and ``w`` (2 arrays), then
* no view: the same single pass (2 + 7 = 9 arrays);
* channel view: one pass per row; the row's update ``p`` is kept in a cache-resident buffer
  while ``<w_i, p_i>`` is summed, then ``w_i`` is written from cache (2 + 7 = 9 arrays; 7
  when ``scale_invariant="channel"`` skips the test);
* layer view, or rows longer than the buffer: state update and dot products (6 arrays), then
  the weight update (4 arrays; 5 with nesterov).

The decision is made inside the kernel (on a CPU there is no host-device round trip to
avoid). The cosine test and the projection are the maths of :mod:`scaleinv.projection`
written again in C (``scaleinv/csrc``), since C cannot call it; the shared test matrix
(``tests/test_matrix.py``) holds every body to the float64 reference and to ``adamp`` 0.3.0,
edge cases included (``docs/contract.md``).

The library is built on first use by :mod:`scaleinv._cbuild` (a private, verified cache).
Where no compiler works, :func:`load` warns once with the compiler's diagnostics and returns
``None``, and the multi-tensor body runs instead.
"""

from __future__ import annotations

import ctypes
import threading

import torch
from torch import Tensor

from scaleinv._cbuild import BuildError, load_library, warn_fallback
from scaleinv._constants import (
    MODE_AUTO,
    MODE_AUTO_TWO_PASS,
    MODE_CHANNEL,
    MODE_LAYER,
    MODE_PLAIN,
    VIEW_NAMES,
)

__all__ = ["DTYPE_SUFFIX", "MODE_AUTO", "MODE_AUTO_TWO_PASS", "MODE_CHANNEL", "MODE_LAYER",
           "MODE_PLAIN", "adamp_step", "load", "sgdp_step"]

DTYPE_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


class _AdamPGroup(ctypes.Structure):
    _fields_ = [(name, ctypes.c_double) for name in (
        "lr", "beta1", "beta2", "eps", "decay_plain", "decay_projected", "delta", "sign")
    ] + [("nesterov", ctypes.c_int32), ("nthreads", ctypes.c_int32)]


class _SGDPGroup(ctypes.Structure):
    _fields_ = [(name, ctypes.c_double) for name in (
        "lr", "momentum", "dampening", "eps", "decay_plain", "decay_projected", "delta", "sign")
    ] + [("nesterov", ctypes.c_int32), ("project_buffer", ctypes.c_int32),
         ("nthreads", ctypes.c_int32)]


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_load_failed = False


def load() -> ctypes.CDLL | None:
    """The kernel library, built on first use (:mod:`scaleinv._cbuild`); ``None``, after one
    warning with the compiler's diagnostics, where no C compiler can build it."""
    global _library, _load_failed
    if _library is not None or _load_failed:
        return _library
    with _lock:
        if _library is not None or _load_failed:
            return _library
        try:
            _library = _declare(load_library())
        except BuildError as error:
            _load_failed = True
            warn_fallback(error)
        return _library


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for suffix in DTYPE_SUFFIX.values():
        getattr(lib, f"scaleinv_adamp_{suffix}").argtypes = [
            i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.POINTER(_AdamPGroup), ptr, ptr]
        getattr(lib, f"scaleinv_sgdp_{suffix}").argtypes = [
            i64, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.POINTER(_SGDPGroup), ptr, ptr]
    return lib


def _pointers(tensors: list[Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _run(kernel: str, tensors: list[list[Tensor]], modes: list[int],
         group: ctypes.Structure) -> list[str | None]:
    """Call ``kernel`` on ``tensors`` (lists whose first is the params; the last may be the
    float32 step counters); returns the view each param was projected on."""
    lib = load()
    if lib is None:
        raise RuntimeError("the fused CPU kernels are not available (no working C compiler)")
    params = tensors[0]
    count = len(params)
    rows = [p.shape[0] if p.dim() >= 2 else 1 for p in params]
    lengths = [p.numel() // n for p, n in zip(params, rows, strict=True)]
    scratch = (ctypes.c_double * (4 * max(rows)))()
    views = (ctypes.c_int8 * count)()
    function = getattr(lib, f"{kernel}_{DTYPE_SUFFIX[params[0].dtype]}")
    function(count, *[_pointers(ts) for ts in tensors], (ctypes.c_int64 * count)(*rows),
             (ctypes.c_int64 * count)(*lengths), (ctypes.c_int32 * count)(*modes),
             ctypes.byref(group), scratch, views)
    return [VIEW_NAMES[v] for v in views]


def adamp_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], steps: list[Tensor], modes: list[int], *, lr: float,
    beta1: float, beta2: float, eps: float, decay_plain: float, decay_projected: float,
    delta: float, nesterov: bool, maximize: bool,
) -> list[str | None]:
    """One AdamP step in place; returns the view each tensor was projected on.

    All tensors: CPU, one dtype (float32 or float64), rows (output channels) that are
    contiguous blocks of memory, laid out like their param; ``steps``: float32 0-dim
    counters, incremented here. ``modes``: :data:`MODE_PLAIN` (never project),
    :data:`MODE_AUTO` (cosine test), :data:`MODE_CHANNEL` or :data:`MODE_LAYER` per tensor.
    Per tensor, after ``t += 1`` and the moment updates::

        p = m / (sqrt(v) / sqrt(1 - beta2^t) + eps)      (nesterov: beta1 m + (1 - beta1) g)
        w <- w (decay + lr s / (1 - beta1^t)) - lr / (1 - beta1^t) p

    with ``s`` the radial coefficient of the chosen view, ``decay = decay_projected``; no
    view: ``s = 0``, ``decay = decay_plain``.
    """
    group = _AdamPGroup(lr, beta1, beta2, eps, decay_plain, decay_projected, delta,
                        -1.0 if maximize else 1.0, int(nesterov), torch.get_num_threads())
    return _run("scaleinv_adamp", [params, grads, exp_avgs, exp_avg_sqs, steps], modes, group)


def sgdp_step(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], modes: list[int],
    *, lr: float, momentum: float, dampening: float, eps: float, decay_plain: float,
    decay_projected: float, delta: float, nesterov: bool, project_buffer: bool,
    maximize: bool,
) -> list[str | None]:
    """One SGDP step in place (tensors and ``modes`` as in :func:`adamp_step`)::

        b <- momentum b + (1 - dampening) g ;  p = g + momentum b (nesterov) or b
        w <- w (decay + lr s) - lr p           (project_buffer: b <- p - w s too)
    """
    group = _SGDPGroup(lr, momentum, dampening, eps, decay_plain, decay_projected, delta,
                       -1.0 if maximize else 1.0, int(nesterov), int(project_buffer),
                       torch.get_num_threads())
    return _run("scaleinv_sgdp", [params, grads, momentum_buffers], modes, group)
