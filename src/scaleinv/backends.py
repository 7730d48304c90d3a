"""The bodies that can run a step, what each takes, and the one function that chooses.

Every body implements the same contract (``docs/contract.md``):

=============  ==========================  ===================  ===============================
name           what it is                  devices              dtypes
=============  ==========================  ===================  ===============================
``reference``  single-tensor body, the     any                  any floating or complex
               same ops as ``adamp`` 0.3.0
``foreach``    multi-tensor body,          any                  any floating or complex
               sync-free (``foreach=True``)
``native``     C kernels (``fused=True``)  CPU                  float32, float64
``triton``     Triton kernels              CUDA (CPU only under float32, float16, bfloat16
               (``fused=True``)            ``TRITON_INTERPRET``)
``compiled``   ``torch.compile``-d per-    any                  any floating
               tensor kernels
``eager``      ``compiled``'s bodies, not  any                  any floating
               compiled (a debugging aid)
=============  ==========================  ===================  ===============================

A fused backend takes the tensors whose rows are contiguous blocks of memory laid out like
their parameter (and, for ``triton``, row shards of FSDP2); it declines the others, which the
multi-tensor body steps in the same call. Empty tensors are never handed to any body.

The choice (:func:`choose`): the environment variable ``SCALEINV_BACKEND``, when set, forces
one backend for every step (tests use it; a forced backend that cannot run on a group's
device and dtype raises before anything changes). Otherwise ``fused`` and ``foreach`` decide
as documented on :class:`scaleinv.AdamP`.
"""

from __future__ import annotations

import importlib.util
import os
import types
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach

from scaleinv.distributed import is_dtensor, row_shard_group

__all__ = ["BACKENDS", "ENV_VAR", "Backend", "available_backends", "choose", "choose_cautious",
           "first_that_runs",
           "forced_backend", "fused_backend", "fused_backends"]

ENV_VAR = "SCALEINV_BACKEND"

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COMPLEX = (torch.complex64, torch.complex128)


@dataclass(frozen=True)
class Backend:
    """One body: its name, whether it is a fused kernel, the devices and dtypes it takes."""

    name: str
    fused: bool
    devices: tuple[str, ...] | None  # None: any device
    dtypes: tuple[torch.dtype, ...]
    summary: str

    def runs_on(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this body can step tensors of ``dtype`` on ``device`` here (installed
        dependencies and compilers included)."""
        if dtype.is_complex:  # stepped as its real view
            dtype = dtype.to_real()
        if dtype not in self.dtypes:
            return False
        if self.name == "native":
            from scaleinv import _fused_cpu

            return device.type == "cpu" and _fused_cpu.load() is not None
        if self.name == "triton":
            return _triton_runs_on(device)
        return self.devices is None or device.type in self.devices


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("reference", False, None, _FLOATS + _COMPLEX,
            "single-tensor body (the same operations as adamp 0.3.0)"),
    Backend("foreach", False, None, _FLOATS + _COMPLEX, "multi-tensor body, no host sync"),
    Backend("native", True, ("cpu",), (torch.float32, torch.float64),
            "C kernels (CPU, built with the system C compiler)"),
    Backend("triton", True, ("cuda",), (torch.float32, torch.float16, torch.bfloat16),
            "Triton kernels (CUDA; CPU tensors only under TRITON_INTERPRET=1)"),
    Backend("compiled", True, None, _FLOATS, "torch.compile-d per-tensor kernels"),
    Backend("eager", True, None, _FLOATS, "the compiled backend's bodies, eagerly"),
)}


_TRITON: dict[str, types.ModuleType | None] = {}  # a plain memo: dynamo traces it as it is


def triton_kernels() -> types.ModuleType | None:
    """:mod:`scaleinv._fused_triton`, or ``None`` where Triton is not installed."""
    if "kernels" not in _TRITON:
        if importlib.util.find_spec("triton") is None:
            _TRITON["kernels"] = None
        else:
            from scaleinv import _fused_triton

            _TRITON["kernels"] = _fused_triton
    return _TRITON["kernels"]


def _triton_runs_on(device: torch.device) -> bool:
    on_device = device.type == "cuda" or (
        device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return on_device and triton_kernels() is not None


def forced_backend() -> str | None:
    """What ``SCALEINV_BACKEND`` forces, or ``None`` where it is unset or empty: one backend,
    or a comma-separated list of fused backends (the first that runs on a device and dtype
    is taken, e.g. ``triton,eager``)."""
    value = os.environ.get(ENV_VAR, "").replace(" ", "")
    if not value:
        return None
    names = value.split(",")
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or (len(names) > 1 and not all(BACKENDS[name].fused for name in names)):
        raise ValueError(
            f"Invalid {ENV_VAR}: {value!r}; allowed: one of {', '.join(BACKENDS)}, or a "
            f"comma-separated list of fused backends ({', '.join(fused_backends())}), or unset"
        )
    return value


def fused_backends() -> list[str]:
    """The names of the fused backends."""
    return [name for name, b in BACKENDS.items() if b.fused]


def first_that_runs(names: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """The first backend of the comma-separated ``names`` that runs on ``device``/``dtype``."""
    for name in names.split(","):
        if BACKENDS[name].runs_on(device, dtype):
            return name
    return None


def available_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """The backends that can step ``dtype`` tensors on ``device`` on this machine."""
    device = torch.device(device)
    return [name for name, b in BACKENDS.items() if b.runs_on(device, dtype)]


def fused_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fused backend ``fused=True`` takes: ``triton`` on CUDA where Triton runs (float32,
    float16, bfloat16); ``native`` on a CPU for float32/float64 where the C kernels build;
    ``compiled`` on other devices; else ``foreach`` (the multi-tensor body)."""
    if device.type == "cuda" and BACKENDS["triton"].runs_on(device, dtype):
        return "triton"
    if BACKENDS["native"].runs_on(device, dtype):
        return "native"
    if device.type not in ("cpu", "meta") and dtype in _FLOATS:
        return "compiled"
    return "foreach"


def fused_by_default(p: Tensor) -> bool:
    """Whether ``fused=None`` takes the fused path for a group whose first param is ``p``:
    where the Triton backend runs (a CUDA tensor, or FSDP2's row shard of one)."""
    return (p.device.type == "cuda" and (not is_dtensor(p) or row_shard_group(p) is not None)
            and BACKENDS["triton"].runs_on(p.device, p.dtype))


def resolve_fused(fused: bool | None, foreach: bool | None, params: list[Tensor]) -> bool:
    """``fused=None`` takes the fused path where its Triton kernels run (also under
    ``torch.compile``: the kernels are custom ops), unless ``foreach`` is given; otherwise the
    choice given."""
    if fused is not None:
        return fused
    if foreach is not None or not params:
        return False
    return fused_by_default(params[0])


def resolve_foreach(foreach: bool | None, capturable: bool, params: list[Tensor]) -> bool:
    """``foreach=None`` picks like ``torch.optim``; ``capturable`` needs the sync-free body."""
    if foreach is None:
        if capturable:
            return True
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
        return foreach
    if capturable and not foreach:
        raise ValueError(
            "capturable=True needs the sync-free multi-tensor body: pass foreach=True or None"
        )
    return foreach


def choose(fused: bool | None, foreach: bool | None, capturable: bool,
           params: list[Tensor]) -> str:
    """The body that steps one group of ``params``: the forced backend(s) if
    ``SCALEINV_BACKEND`` is set (checked against the params' devices and dtypes), else
    ``"fused"`` (the fused path, whose backend :func:`fused_backend` picks per device and
    dtype), ``"foreach"`` or ``"reference"`` as ``fused`` and ``foreach`` say."""
    for p in params:
        if p.device.type == "meta":
            raise ValueError(
                "scaleinv optimizers cannot step meta tensors (they hold no values); "
                "materialise the model first, e.g. with module.to_empty(device=...)")
    forced = forced_backend()
    if forced is not None:
        for p in params:
            if first_that_runs(forced, p.device, p.dtype) is None:
                raise ValueError(
                    f"{ENV_VAR}={forced!r} cannot step {p.dtype} parameters on {p.device}; "
                    f"available there: {', '.join(available_backends(p.device, p.dtype))}"
                )
        return forced
    if resolve_fused(fused, foreach, params):
        return "fused"
    return "foreach" if resolve_foreach(foreach, capturable, params) else "reference"


def choose_cautious(params: list[Tensor]) -> str:
    """The body of a ``caution=True`` group: the single-tensor one (an error if
    ``SCALEINV_BACKEND`` forces another)."""
    forced = forced_backend()
    if forced not in (None, "reference"):
        raise ValueError(f"{ENV_VAR}={forced!r}: caution=True runs on the 'reference' body only")
    choose(None, False, False, params)  # the checks every step makes (meta tensors)
    return "reference"

