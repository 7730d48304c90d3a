"""Weight norms, effective step sizes and the radial/tangential split of updates, per step.

The paper's argument in numbers: for a scale-invariant weight ``w``, an update ``dw`` splits into
a radial part (along ``w``) and a tangential part (orthogonal to it). Only the tangential part
changes the function; with the radial part removed, ``|w + dw|^2 = |w|^2 + |dw|^2``, so the norm
grows slowly and the *effective* step size ``|dw| / |w|`` stays large. :class:`StepSizeMonitor`
records these quantities for every parameter every ``every`` optimizer steps, through the
optimizer's step hooks, without a host-device synchronisation on the training path: the values
stay on the device until :meth:`StepSizeMonitor.flush` reads all pending steps in one batch.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from scaleinv.adamp import AdamP
from scaleinv.projection import invariance_flags
from scaleinv.sgdp import SGDP

__all__ = ["RECORD_KEYS", "StepSizeMonitor", "load_records"]

RECORD_KEYS: tuple[str, ...] = (
    "step", "name", "kind", "weight_norm", "norm_change", "update_norm", "radial_norm",
    "tangential_norm", "effective_step", "angular_update", "projected", "view",
)
_MEASURED = RECORD_KEYS[3:10]  # the float columns, in the order the device rows hold them
_FLOAT_KEYS = frozenset(_MEASURED)


@dataclass
class _Tracked:
    name: str
    param: Tensor
    kind: str


@dataclass
class _Entry:
    """Host-side facts about one parameter at one recorded step."""

    name: str
    kind: str
    device: torch.device
    row: int
    decided: bool = False  # the device row holds the (use_channel, use_layer) flags
    applies: bool = True  # False: the optimizer has no projection or the param had no grad


@dataclass
class _PendingStep:
    step: int
    entries: list[_Entry]
    rows: dict[torch.device, Tensor]


class StepSizeMonitor:
    """Record, every ``every`` optimizer steps, how each parameter moved.

    Per parameter and recorded step (``w`` before the step, ``w'`` after, ``dw = w' - w``,
    ``u = w / |w|``, all over the whole tensor):

    ==================  ===========================================================
    ``weight_norm``     ``|w'|``
    ``norm_change``     ``|w'| - |w|``
    ``update_norm``     ``|dw|``
    ``radial_norm``     ``|<dw, u>|``, the part of the update along ``w``
    ``tangential_norm`` ``|dw - u <dw, u>|``
    ``effective_step``  ``|dw| / |w|``
    ``angular_update``  angle between ``w`` and ``w'`` in radians
    ``projected``       whether AdamP/SGDP removed the radial part (``None``: another
                        optimizer, or no gradient)
    ``view``            ``"channel"``, ``"layer"`` or ``None``: the view it projected on
    ==================  ===========================================================

    ``projected``/``view`` are recomputed from the pre-step weight and the gradient with the
    param group's ``delta``, ``eps`` and ``scale_invariant`` by
    :func:`scaleinv.projection.invariance_flags` (the sync-free form of
    :func:`~scaleinv.projection.select_view`), for :class:`~scaleinv.AdamP`,
    :class:`~scaleinv.SGDP` and optimizers wrapped by :func:`scaleinv.project`.

    Args:
        model_or_params: an ``nn.Module`` (names from ``named_parameters()``) or an iterable of
            parameters or ``(name, parameter)`` pairs. A module's parameters that the optimizer
            does not hold (frozen ones) are skipped; an explicit parameter the optimizer does
            not hold, or nothing to track at all, raises ``ValueError``.
        optimizer: any ``torch.optim.Optimizer``; its step hooks are used.
        every: record steps ``1, every + 1, 2 every + 1, ...`` (1-based optimizer steps).
        invariance: optional mapping ``name -> kind`` (e.g. from
            :func:`scaleinv.inspect.find_scale_invariant`); missing names are ``"unknown"``.
        writer: optional TensorBoard ``SummaryWriter`` (anything with ``add_scalar``), or a log
            directory for one (needs the ``tensorboard`` package).
        flush_every: read the device values back after this many recorded steps.
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
        optimizer: Optimizer,
        every: int = 1,
        invariance: Mapping[str, Any] | None = None,
        writer: Any = None,
        *,
        flush_every: int = 256,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.every = _check_count("every", every)
        self.flush_every = _check_count("flush_every", flush_every)
        self.optimizer = optimizer
        kinds = {} if invariance is None else invariance
        named = _held(_named(model_or_params), optimizer,
                      explicit=not isinstance(model_or_params, nn.Module))
        self._tracked = [_Tracked(name, p, _kind_name(kinds.get(name))) for name, p in named]
        self._records: list[dict[str, Any]] = []
        self._pending: list[_PendingStep] = []
        self._snapshot: tuple[int, list[tuple[_Tracked, dict[str, Any]]], list[Tensor]] | None
        self._snapshot = None
        self._steps = 0
        self._writer, self._owns_writer = _resolve_writer(writer)
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        self._closed = False

    # -- hooks ---------------------------------------------------------------------------------

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        step = self._steps + 1
        if (step - 1) % self.every:
            return
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        held = [(t, group_of[id(t.param)]) for t in self._tracked if id(t.param) in group_of]
        with torch.no_grad():
            before = [t.param.detach().clone() for t, _ in held]
        self._snapshot = (step, held, before)

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._steps += 1
        if self._snapshot is None:
            return
        step, held, before = self._snapshot
        self._snapshot = None
        rows: dict[torch.device, list[Tensor]] = defaultdict(list)
        entries = []
        with torch.no_grad():
            for (tracked, group), w in zip(held, before, strict=True):
                settings = _projection_settings(optimizer, group)
                values, entry = _measure(tracked, w, settings)
                entry.row = len(rows[values.device])
                rows[values.device].append(values)
                entries.append(entry)
            stacked = {device: _stack(values) for device, values in rows.items()}
        self._pending.append(_PendingStep(step, entries, stacked))
        if len(self._pending) >= self.flush_every:
            self.flush()

    # -- results -------------------------------------------------------------------------------

    @property
    def records(self) -> list[dict[str, Any]]:
        """All records so far (flushes first); each a dict with exactly :data:`RECORD_KEYS`."""
        self.flush()
        return self._records

    def flush(self) -> None:
        """Read every pending step back from the device in one batch (one sync per device)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        for p in pending:
            for device, rows in p.rows.items():
                by_device[device].append(rows)
        host = {device: _stack(parts, cat=True).tolist() for device, parts in by_device.items()}
        start: dict[torch.device, int] = defaultdict(int)
        new: list[dict[str, Any]] = []
        for p in pending:
            for entry in p.entries:
                new.append(_record(p.step, entry, host[entry.device][start[entry.device]
                                                                      + entry.row]))
            for device, rows in p.rows.items():
                start[device] += rows.shape[0]
        self._records.extend(new)
        self._write(new)

    def _write(self, records: list[dict[str, Any]]) -> None:
        if self._writer is None:
            return
        for r in records:
            for key in ("weight_norm", "effective_step", "angular_update", "radial_norm",
                        "tangential_norm"):
                self._writer.add_scalar(f"scaleinv/{r['name']}/{key}", r[key], r["step"])

    def summary(self) -> dict[str, dict[str, Any]]:
        """Aggregates per kind (``"channel"``, ``"layer"``, ``"none"``, ``"unknown"``).

        For each kind: ``params``, ``records``, ``steps``; ``mean_effective_step``,
        ``mean_angular_update``, ``mean_radial_fraction`` (mean of ``radial / update`` norms);
        ``initial_weight_norm`` and ``final_weight_norm`` (``sqrt(sum |w|^2)`` over the kind's
        tensors before the first and after the last recorded step) and their
        ``weight_norm_ratio``; ``projected_fraction`` (``None`` where unknown).
        """
        by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in self.records:
            by_kind[r["kind"]].append(r)
        return {kind: _aggregate(rs) for kind, rs in by_kind.items()}

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the records as CSV (header :data:`RECORD_KEYS`); returns the path."""
        path = Path(path)
        with path.open("w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=RECORD_KEYS)
            out.writeheader()
            for r in self.records:
                out.writerow({k: "" if r[k] is None else r[k] for k in RECORD_KEYS})
        return path

    def to_jsonl(self, path: str | os.PathLike[str]) -> Path:
        """Write the records as JSON lines; returns the path."""
        path = Path(path)
        with path.open("w") as f:
            for r in self.records:
                f.write(json.dumps(_strict(r), allow_nan=False) + "\n")
        return path

    def close(self) -> None:
        """Remove the hooks, flush, and flush (and close, if it made it) the writer."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._snapshot = None
        self.flush()
        if self._writer is not None:
            if self._owns_writer:
                self._writer.close()
            elif callable(getattr(self._writer, "flush", None)):
                self._writer.flush()

    def __enter__(self) -> StepSizeMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- measuring ---------------------------------------------------------------------------------


def _measure(tracked: _Tracked, before: Tensor,
             settings: tuple[Any, float, float] | None) -> tuple[Tensor, _Entry]:
    """The seven measured values (plus the projection's two flags) of one parameter as one
    device tensor; ``settings`` is ``(scale_invariant, delta, eps)`` where the optimizer
    projects."""
    p = tracked.param
    w, after = _real(before), _real(p.detach())
    dtype = torch.promote_types(w.dtype, torch.float32)
    w0, w1 = w.reshape(-1).to(dtype), after.reshape(-1).to(dtype)
    update = w1 - w0
    norm0 = torch.linalg.vector_norm(w0)
    norm1 = torch.linalg.vector_norm(w1)
    update_norm = torch.linalg.vector_norm(update)
    unit = w0 / norm0.clamp_min(torch.finfo(dtype).tiny)
    radial = torch.dot(update, unit)
    tangential = torch.linalg.vector_norm(update - unit * radial)
    measured = [norm1, norm1 - norm0, update_norm, radial.abs(), tangential,
                update_norm / norm0, torch.atan2(tangential, norm0 + radial)]

    entry = _Entry(tracked.name, tracked.kind, w0.device, row=0)
    flags = [torch.zeros((), dtype=dtype, device=w0.device)] * 2
    if settings is None or p.grad is None:
        entry.applies = False
    elif w.dim() >= 2:  # 1-D tensors are never projected
        mode, delta, eps = settings
        use_channel, use_layer = invariance_flags(w, _real(p.grad), scale_invariant=mode,
                                                  delta=delta, eps=eps)
        flags = [use_channel.to(dtype), use_layer.to(dtype)]
        entry.decided = True
    return torch.stack(measured + flags), entry


def _record(step: int, entry: _Entry, values: list[float]) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step, "name": entry.name, "kind": entry.kind}
    record.update(zip(_MEASURED, values[: len(_MEASURED)], strict=True))
    view = None
    if entry.decided:
        use_channel, use_layer = values[len(_MEASURED):]
        view = "channel" if use_channel else "layer" if use_layer else None
    record["projected"] = (view is not None) if entry.applies else None
    record["view"] = view
    return record


def _aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    initial: dict[str, float] = {}
    final: dict[str, float] = {}
    for r in records:
        initial.setdefault(r["name"], r["weight_norm"] - r["norm_change"])
        final[r["name"]] = r["weight_norm"]
    start = math.sqrt(sum(v * v for v in initial.values()))
    end = math.sqrt(sum(v * v for v in final.values()))
    projected = [float(r["projected"]) for r in records if r["projected"] is not None]
    return {
        "params": len(initial),
        "records": len(records),
        "steps": len({r["step"] for r in records}),
        "mean_effective_step": _mean(r["effective_step"] for r in records),
        "mean_angular_update": _mean(r["angular_update"] for r in records),
        "mean_radial_fraction": _mean(
            r["radial_norm"] / r["update_norm"] for r in records if r["update_norm"] > 0
        ),
        "initial_weight_norm": start,
        "final_weight_norm": end,
        "weight_norm_ratio": end / start if start > 0 else math.nan,
        "projected_fraction": _mean(projected) if projected else None,
    }


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _stack(tensors: list[Tensor], cat: bool = False) -> Tensor:
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
    tensors = [t.to(dtype) for t in tensors]
    return torch.cat(tensors) if cat else torch.stack(tensors)


def _projection_settings(optimizer: Optimizer,
                         group: Mapping[str, Any]) -> tuple[Any, float, float] | None:
    """``(scale_invariant, delta, eps)`` of a group whose updates the optimizer projects:
    AdamP/SGDP (their group ``eps``) or a :func:`scaleinv.project` wrapper (its ``eps``, or the
    group's for a wrapped AdamP/SGDP); ``None`` for any other optimizer."""
    if "delta" not in group or "scale_invariant" not in group:
        return None
    base = getattr(optimizer, "base", None)
    wrapper_eps: Any = getattr(optimizer, "eps", None)
    if isinstance(optimizer, (AdamP, SGDP)) or isinstance(base, (AdamP, SGDP)):
        eps = group["eps"]
    elif isinstance(base, Optimizer) and type(wrapper_eps) in (int, float):
        eps = wrapper_eps
    else:
        return None
    return group["scale_invariant"], group["delta"], eps


# -- arguments ---------------------------------------------------------------------------------


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name}: expected an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"Invalid {name}: {value}; allowed range is [1, inf)")
    return value


def _kind_name(kind: Any) -> str:
    return "unknown" if kind is None else str(getattr(kind, "value", kind))


def _named(source: Any) -> list[tuple[str, Tensor]]:
    if isinstance(source, nn.Module):
        return list(source.named_parameters())
    if isinstance(source, Tensor):
        raise TypeError("model_or_params must be a module or an iterable of parameters, "
                        "not a single tensor: wrap it in a list")
    try:
        items = list(source)
    except TypeError:
        raise TypeError(
            "model_or_params must be an nn.Module or an iterable of parameters or "
            f"(name, parameter) pairs, got {type(source).__name__}"
        ) from None
    named: list[tuple[str, Tensor]] = []
    seen: set[int] = set()
    for i, item in enumerate(items):
        name, p = item if isinstance(item, tuple) else (f"param{i}", item)
        if not isinstance(p, Tensor) or not isinstance(name, str):
            raise TypeError(
                "model_or_params items must be tensors or (str, tensor) pairs, got "
                f"{type(item).__name__}"
            )
        if id(p) not in seen:
            seen.add(id(p))
            named.append((name, p))
    return named


def _held(named: list[tuple[str, Tensor]], optimizer: Optimizer,
          explicit: bool) -> list[tuple[str, Tensor]]:
    """The parameters ``optimizer`` holds; refuses explicit ones it does not, and nothing."""
    held_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    held = [(name, p) for name, p in named if id(p) in held_ids]
    foreign = [name for name, p in named if id(p) not in held_ids]
    if explicit and foreign:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"model_or_params holds {len(foreign)} parameter(s) that the optimizer does not "
            f"update ({listed}); pass the parameters given to the optimizer"
        )
    if not held:
        raise ValueError(
            "model_or_params has no parameter that the optimizer updates (an exhausted "
            "generator, or another model's parameters?)"
        )
    return held


def _resolve_writer(writer: Any) -> tuple[Any, bool]:
    if writer is None:
        return None, False
    if isinstance(writer, (str, os.PathLike)):
        if importlib.util.find_spec("tensorboard") is None:
            raise ImportError(
                "writer=<log directory> needs the tensorboard package: pip install tensorboard"
            )
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=os.fspath(writer)), True
    if not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            "writer must have add_scalar(tag, value, step) (e.g. a "
            "torch.utils.tensorboard.SummaryWriter) or be a log directory"
        )
    return writer, False


# -- reading logs back -------------------------------------------------------------------------


def _strict(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record with NaN and infinities as ``None`` (strict JSON ``null``)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read records written by :meth:`StepSizeMonitor.to_csv` (``.csv``) or
    :meth:`StepSizeMonitor.to_jsonl` (any other suffix)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            return [_parse_csv_row(row) for row in csv.DictReader(f)]
    with path.open() as f:
        records = [json.loads(line) for line in f if line.strip()]
    for record in records:  # strict JSON stores NaN and infinities as null
        for key in _FLOAT_KEYS:
            if record.get(key, 0.0) is None:
                record[key] = math.nan
    return records


def _parse_csv_row(row: Mapping[str, str]) -> dict[str, Any]:
    missing = set(RECORD_KEYS) - set(row)
    if missing:
        raise ValueError(f"not a monitor CSV: columns {sorted(missing)} are missing")
    record: dict[str, Any] = {}
    for key in RECORD_KEYS:
        text = row[key]
        if key == "step":
            record[key] = int(text)
        elif key in _FLOAT_KEYS:
            record[key] = float(text)
        elif key == "projected":
            record[key] = None if text == "" else text == "True"
        elif key == "view":
            record[key] = text or None
        else:
            record[key] = text
    return record
