"""What a comparison records, and how it is written without losing anything.

``RunResult`` and ``EpochStats`` are the per-run records (shared by :mod:`.runner`, which makes
them, and :mod:`.report`, which summarises them). Files are strict JSON (a missing or
non-finite value is ``null``) and are written to a temporary name, then moved into place with
``os.replace``, so a reader never sees half a file and an interruption never truncates one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "EpochStats",
    "RunResult",
    "dumps",
    "read_runs",
    "strict",
    "write_atomic",
]


@dataclass
class EpochStats:
    """What one epoch of one run ended with."""

    epoch: int
    step: int
    train_loss: float
    metric: float
    norm_ratio: float
    effective_step: float
    seconds: float


@dataclass
class RunResult:
    """One optimizer, one seed: the final numbers and the per-epoch history.

    ``norm_ratio`` is the mean over scale-invariant tensors of ``|w_T| / |w_0|``;
    ``effective_step`` is the monitor's effective step ``|w_{t+1} - w_t| / |w_t|`` averaged over
    those tensors and all recorded steps; ``projected_fraction`` is the share of those records
    where the optimizer removed the radial part (NaN for an optimizer without projection).
    """

    task: str
    optimizer: str
    seed: int
    epochs: int
    metric: float
    norm_ratio: float
    effective_step: float
    projected_fraction: float
    wall_time: float
    diverged: bool
    history: list[EpochStats] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The run as a strict-JSON-ready dict (non-finite numbers become ``None``)."""
        row: dict[str, Any] = strict(asdict(self))
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> RunResult:
        """Inverse of :meth:`to_json` (``None`` numbers come back as NaN)."""
        values = {f.name: row[f.name] for f in fields(cls) if f.name in row}
        for key in ("metric", "norm_ratio", "effective_step", "projected_fraction", "wall_time"):
            values[key] = _number(values.get(key))
        values["history"] = [_epoch_from_json(epoch) for epoch in row.get("history", [])]
        return cls(**values)


def _epoch_from_json(epoch: dict[str, Any]) -> EpochStats:
    values: dict[str, Any] = {k: (_number(v) if k not in ("epoch", "step") else v)
                              for k, v in epoch.items()}
    return EpochStats(**values)


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def strict(value: Any) -> Any:
    """``value`` with every NaN or infinity (also inside lists, tuples, dicts) replaced by
    ``None``, so that ``json.dumps(..., allow_nan=False)`` accepts it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON: non-finite numbers are written as ``null``."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path``, then move it onto ``path`` (with
    the permissions an ordinary ``open`` would give, not ``mkstemp``'s private 0600)."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                             dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_UMASK)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_runs(path: Path) -> list[RunResult]:
    """The runs of a ``runs.jsonl`` file."""
    with Path(path).open() as stream:
        return [RunResult.from_json(json.loads(line)) for line in stream if line.strip()]


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """Strict JSON lines, written atomically."""
    return write_atomic(path, "".join(dumps(row) + "\n" for row in rows))
