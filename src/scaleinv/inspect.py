"""Which parameters of a model are scale-invariant: found from its structure, checked numerically.

A parameter ``w`` (``dim() >= 2``) is

* ``"channel"``-invariant when the model's output is unchanged by ``w_i -> c_i w_i`` for every
  choice of positive factors ``c_i``, one per output channel (row ``i`` of ``w`` reshaped to
  ``[n, -1]``); this implies the next kind;
* ``"layer"``-invariant when only ``w -> c w`` with one positive ``c`` leaves it unchanged;
* ``"none"`` otherwise. One-dimensional parameters are never projected and are always ``"none"``.

Two independent answers are computed and compared:

1. **Structure.** One forward pass is recorded op by op (a ``TorchFunctionMode`` sees every torch
   function, forward hooks name the module each op ran in). For each candidate the recorded graph
   is re-played symbolically: the value of every tensor is tracked as "scaled by ``c^k`` where
   ``c`` may vary along these axes, plus an unscaled offset along those", through linear maps,
   positively homogeneous activations (ReLU), pooling, reshapes, until a normalization removes the
   factor (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm, ``F.normalize``, weight norm,
   a tensor divided by its own statistics) or it reaches the output.
2. **Numbers.** Each candidate is rescaled by random positive factors (per row, then whole) and
   the model's output is compared with the unscaled output. This is the ground truth: where the
   two answers differ, the numeric one is used and the report says so.

Inspection also reports what the optimizers' cosine test (:func:`scaleinv.projection.select_view`
with ``"auto"``) decides on a real gradient, so that one sees where the cheap test and the truth
differ. Inspection runs the model in training mode and leaves its parameters, buffers, gradients,
modes and the global random state as they were.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, cast, overload

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from scaleinv.projection import VIEWS, max_cosine, select_view, threshold

__all__ = [
    "Invariance",
    "InvarianceReport",
    "ParamInvariance",
    "find_scale_invariant",
    "param_groups",
]


class Invariance(str, enum.Enum):
    """How a parameter tensor is scale-invariant: per output channel, as a whole, or not at all."""

    CHANNEL = "channel"
    LAYER = "layer"
    NONE = "none"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def scale_invariant(self) -> Literal["channel", "layer"] | bool:
        """The optimizers' per-group annotation: ``"channel"``, ``"layer"`` or ``False``."""
        return False if self is Invariance.NONE else self.value

    @property
    def describe(self) -> str:
        return {"channel": "per channel", "layer": "whole tensor", "none": "not invariant"}[
            self.value
        ]


@dataclass(frozen=True)
class ParamInvariance:
    """Everything the inspector found about one parameter.

    ``kind`` is the answer (the numeric check's where it ran). ``structural`` is what the model's
    structure implies (``None`` where the structure could not be read), ``numeric_change`` the
    relative change of the output, ``|f(scaled) - f| / |f|``, under random per-row (``"channel"``)
    and whole-tensor (``"layer"``) rescaling. ``cosine_view`` is the cosine test's decision on
    the example batch's gradient, with the per-view ``max_i |cos(g_i, w_i)|`` and thresholds.
    """

    name: str
    shape: tuple[int, ...]
    kind: Invariance
    reason: str
    structural: Invariance | None = None
    numeric: Invariance | None = None
    numeric_change: Mapping[str, float] = field(default_factory=dict)
    cosine_view: str | None = None
    max_cosines: Mapping[str, float] = field(default_factory=dict)
    thresholds: Mapping[str, float] = field(default_factory=dict)

    @property
    def structure_agrees(self) -> bool:
        """Whether the structural rule gave the same answer as the numeric check."""
        return self.structural is None or self.numeric is None or self.structural == self.numeric

    @property
    def cosine_agrees(self) -> bool:
        """Whether the cosine test picks the view the truth calls for (``None`` for ``"none"``)."""
        expected = None if self.kind is Invariance.NONE else self.kind.value
        return self.cosine_view == expected


class InvarianceReport(Mapping[str, Invariance]):
    """Read-only mapping ``parameter name -> Invariance``, with the reasons and a printable table.

    ``report[name]`` is the kind; ``report.details[name]`` the full :class:`ParamInvariance`;
    ``report.reason(name)`` e.g. ``"conv1.weight -> bn1 (BatchNorm2d): per channel"``;
    ``print(report)`` prints the table and the reasons.
    """

    def __init__(self, details: Sequence[ParamInvariance], structure_note: str | None = None):
        self.details: dict[str, ParamInvariance] = {d.name: d for d in details}
        self.structure_note = structure_note

    def __getitem__(self, name: str) -> Invariance:
        return self.details[name].kind

    def __iter__(self) -> Iterator[str]:
        return iter(self.details)

    def __len__(self) -> int:
        return len(self.details)

    def __repr__(self) -> str:
        return f"InvarianceReport({ {n: d.kind.value for n, d in self.details.items()} })"

    def reason(self, name: str) -> str:
        """Why ``name`` got its kind (structure, and the numeric check where they differ)."""
        return self.details[name].reason

    def disagreements(self) -> list[str]:
        """Names where the structural rule and the numeric check differ (numeric was used)."""
        return [n for n, d in self.details.items() if not d.structure_agrees]

    def cosine_disagreements(self) -> list[str]:
        """Names where the cosine test, on the example batch, picks another view than the truth."""
        return [n for n, d in self.details.items() if not d.cosine_agrees]

    def table(self) -> str:
        """A fixed-width table of all parameters, followed by the reasons."""
        header = ("parameter", "shape", "invariance", "structure", "change ch/layer",
                  "cosine test", "max cos ch/layer (threshold)", "note")
        rows = [header] + [_table_row(d) for d in self.details.values()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                 for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.structure_note:
            lines.append(f"structure: {self.structure_note}")
        lines.append("reasons:")
        lines.extend(f"  {d.reason}" for d in self.details.values())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _table_row(d: ParamInvariance) -> tuple[str, ...]:
    notes = []
    if not d.structure_agrees:
        notes.append("structure disagrees")
    if len(d.shape) >= 2 and not d.cosine_agrees:
        notes.append("cosine test disagrees")
    if d.max_cosines:
        cos = " / ".join(
            f"{d.max_cosines[v]:.2g} ({d.thresholds[v]:.2g})" for v in VIEWS if v in d.max_cosines
        )
    else:
        cos = "-"
    return (
        d.name,
        "x".join(str(s) for s in d.shape) or "scalar",
        d.kind.value,
        "-" if d.structural is None else d.structural.value,
        f"{_fmt(d.numeric_change.get('channel'))} / {_fmt(d.numeric_change.get('layer'))}",
        "-" if len(d.shape) < 2 else str(d.cosine_view),
        cos,
        ", ".join(notes),
    )


# --------------------------------------------------------------------------------------------
# Recording one forward pass
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    """A recorded tensor: a node (one per value; an in-place op makes a new node) and its shape."""

    node: int
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass
class _Op:
    name: str
    label: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: list[int]
    outputs: list[_Ref]

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[index] if index < len(self.args) else default

    @property
    def where(self) -> str:
        return f"{self.label} [{self.name}]" if self.label != self.name else self.name


def _op_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", type(func).__name__)
    if name == "__get__":  # a tensor property such as .T or .data
        name = "get_" + getattr(getattr(func, "__self__", None), "__name__", "?")
    return name


class _Recorder(TorchFunctionMode):
    """Records every torch function call of a forward pass as an :class:`_Op`."""

    def __init__(self, labels: list[str]) -> None:
        super().__init__()
        self.labels = labels
        self.ops: list[_Op] = []
        self.error: str | None = None
        self._node_of: dict[int, int] = {}
        self._leaf_of: dict[int, int] = {}
        self._alive: list[Tensor] = []  # keeps ids unique while recording

    def _new_node(self, t: Tensor) -> int:
        node = len(self._alive)
        self._alive.append(t)
        self._node_of[id(t)] = node
        return node

    def ref(self, t: Tensor) -> _Ref:
        node = self._node_of.get(id(t))
        if node is None:
            node = self._new_node(t)
            self._leaf_of[id(t)] = node
        return _Ref(node, tuple(t.shape))

    def leaf_node(self, t: Tensor) -> int | None:
        return self._leaf_of.get(id(t))

    def release(self) -> None:
        self._alive = []

    def _convert(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            return self.ref(value)
        if isinstance(value, torch.Size):
            return tuple(value)
        if type(value) in (list, tuple):
            return type(value)(self._convert(v) for v in value)
        if isinstance(value, dict):
            return {k: self._convert(v) for k, v in value.items()}
        return value

    def __torch_function__(self, func: Callable[..., Any], types: Sequence[type],
                           args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.error is None:
            try:
                self._record(func, args, kwargs, out)
            except Exception as exc:  # the record is lost, never the user's forward pass
                self.error = f"could not record {_op_name(func)}: {type(exc).__name__}: {exc}"
        return out

    def _record(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        name = _op_name(func)
        if name == "__setitem__":
            results = [args[0]]
        elif isinstance(out, Tensor):
            results = [out]
        elif isinstance(out, (tuple, list)):
            results = [t for t in out if isinstance(t, Tensor)]
        else:
            results = []
        if not results:
            return
        converted_args = self._convert(tuple(args))
        converted_kwargs = self._convert(dict(kwargs))
        inputs = [r.node for r in _refs((converted_args, converted_kwargs))]
        outputs = [_Ref(self._new_node(t), tuple(t.shape)) for t in results]
        label = self.labels[-1] if self.labels and self.labels[-1] else name
        self.ops.append(_Op(name, label, converted_args, converted_kwargs, inputs, outputs))


def _refs(value: Any) -> Iterator[_Ref]:
    if isinstance(value, _Ref):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _refs(v)


def _tensor_leaves(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensor_leaves(v)]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensor_leaves(v)]
    return []


def _module_label(qualname: str, module: nn.Module) -> str:
    return f"{qualname} ({type(module).__name__})" if qualname else ""


@contextmanager
def _labelled(model: nn.Module, labels: list[str]) -> Iterator[None]:
    """Forward hooks that keep ``labels[-1]`` = the module whose forward is running."""

    def push(label: str) -> Callable[..., None]:
        return lambda module, args: labels.append(label)

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        labels.pop()

    handles = []
    for qualname, module in model.named_modules():
        label = _module_label(qualname, module)
        handles.append(module.register_forward_pre_hook(push(label), prepend=True))
        handles.append(module.register_forward_hook(pop, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Trace:
    ops: list[_Op]
    param_nodes: dict[str, int | None]
    output_nodes: list[int]
    owner_labels: dict[str, str]
    error: str | None


def _record_forward(model: nn.Module, run: Callable[[], Any],
                    named: Sequence[tuple[str, Tensor]]) -> _Trace:
    labels: list[str] = []
    recorder = _Recorder(labels)
    with torch.no_grad(), _labelled(model, labels), recorder:
        output = run()
    output_nodes = [recorder.ref(t).node for t in _tensor_leaves(output)]
    param_nodes = {name: recorder.leaf_node(p) for name, p in named}
    modules = dict(model.named_modules())
    owner_labels = {}
    for name, _ in named:
        owner = name.rpartition(".")[0]
        owner_labels[name] = _module_label(owner, modules[owner]) if owner in modules else ""
    recorder.release()
    return _Trace(recorder.ops, param_nodes, output_nodes, owner_labels, recorder.error)


# --------------------------------------------------------------------------------------------
# Symbolic replay: how a value changes when one parameter is rescaled
# --------------------------------------------------------------------------------------------

# Additive constants this small are taken for an epsilon (``w / (w.std() + 1e-5)``).
_NEGLIGIBLE = 1e-3

Axes: TypeAlias = frozenset[int]


@dataclass(frozen=True)
class _Scaled:
    """The value becomes ``c^degree * v + offset``: ``c > 0`` may vary along ``varying`` (and is
    constant along every other axis); ``offset`` (``None``: no offset) does not change with the
    rescaling and may vary along the given axes."""

    varying: Axes
    degree: float = 1.0
    offset: Axes | None = None
    path: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Broken:
    """The value changes in a way no rule describes."""

    where: str


@dataclass(frozen=True)
class _Absorbed:
    """A normalization removed the factor: the value no longer changes."""

    state: _Scaled


_State: TypeAlias = _Scaled | _Broken | None  # None: unchanged by the rescaling
_Result: TypeAlias = _State | _Absorbed  # what a rule gives one output


def _union(a: Axes | None, b: Axes | None) -> Axes | None:
    if a is None and b is None:
        return None
    return (a or frozenset()) | (b or frozenset())


def _live_axes(ref: _Ref, out_rank: int) -> Axes:
    """Axes (of a broadcast result of rank ``out_rank``) along which ``ref`` can vary."""
    shift = out_rank - ref.rank
    return frozenset(a + shift for a, n in enumerate(ref.shape) if n != 1)


@overload
def _keep_live(axes: Axes, shape: tuple[int, ...]) -> Axes: ...
@overload
def _keep_live(axes: Axes | None, shape: tuple[int, ...]) -> Axes | None: ...
def _keep_live(axes: Axes | None, shape: tuple[int, ...]) -> Axes | None:
    if axes is None:
        return None
    return frozenset(a for a in axes if 0 <= a < len(shape) and shape[a] != 1)


def _shift(s: _Scaled, shift: int) -> _Scaled:
    if shift == 0:
        return s
    offset = None if s.offset is None else frozenset(a + shift for a in s.offset)
    return dataclasses.replace(s, varying=frozenset(a + shift for a in s.varying), offset=offset)


@overload
def _remap(axes: Axes, mapping: Callable[[int], int | None]) -> Axes: ...
@overload
def _remap(axes: None, mapping: Callable[[int], int | None]) -> None: ...
@overload
def _remap(axes: Axes | None, mapping: Callable[[int], int | None]) -> Axes | None: ...
def _remap(axes: Axes | None, mapping: Callable[[int], int | None]) -> Axes | None:
    if axes is None:
        return None
    mapped = set()
    for a in axes:
        b = mapping(a)
        if b is None:
            raise _BreakError(_SHAPE)
        mapped.add(b)
    return frozenset(mapped)


class _BreakError(Exception):
    """Raised by a rule that has no answer for this input (the message says why)."""


_OFFSET = "an unscaled offset (e.g. a bias) reaches it"
_MIXES = "it mixes entries whose factors differ"
_TWO = "it combines values that change differently"
_SHAPE = "no rule for this reshaping or indexing"


def _canonical(name: str) -> tuple[str, bool]:
    """``(operation, operands swapped)`` for the many spellings of one operation."""
    swapped = False
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core in ("iadd", "isub", "imul", "itruediv", "idiv", "ipow", "imatmul"):
            core = core[1:]
        elif core in ("radd", "rsub", "rmul", "rtruediv", "rdiv", "rpow", "rmatmul"):
            core, swapped = core[1:], True
        name = core
    elif name.endswith("_") and not name.endswith("__") and name not in ("copy_", "fill_",
                                                                         "zero_"):
        name = name[:-1]
    aliases = {"truediv": "div", "true_divide": "div", "divide": "div", "multiply": "mul",
               "subtract": "sub", "concat": "cat", "concatenate": "cat", "clip": "clamp",
               "swapaxes": "transpose", "swapdims": "transpose", "negative": "neg",
               "absolute": "abs", "get_T": "T", "get_mT": "mT", "get_H": "T", "get_mH": "mT",
               "get_data": "detach", "adjoint": "mT"}
    if name == "rsub":
        name, swapped = "sub", True
    return aliases.get(name, name), swapped


_PASSTHROUGH = {"clone", "contiguous", "detach", "to", "float", "double", "half", "bfloat16",
                "type", "type_as", "cpu", "cuda", "requires_grad", "neg", "positive", "alias",
                "identity", "pin_memory", "coalesce"}
_HOMOGENEOUS = {"relu", "leaky_relu", "prelu", "rrelu", "abs", "dropout", "dropout1d",
                "dropout2d", "dropout3d", "feature_dropout"}
_POOLS = {f"{kind}{d}d{suffix}" for kind in ("max_pool", "avg_pool", "adaptive_avg_pool",
                                             "adaptive_max_pool", "_max_pool", "lp_pool")
          for d in (1, 2, 3) for suffix in ("", "_with_indices")} | {"interpolate"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
             "reshape_as", "ravel"}
_EXPANDS = {"expand", "expand_as", "broadcast_to"}
_SUMS = {"sum", "mean", "nansum", "nanmean"}
_EXTREMES = {"amax", "amin", "max", "min", "median", "nanmedian"}
_NORMS = {"norm", "linalg_vector_norm", "vector_norm"}
_SPREADS = {"std", "var", "std_mean", "var_mean"}
_POWERS = {"sqrt": 0.5, "rsqrt": -0.5, "reciprocal": -1.0, "square": 2.0}
_CONVS = {"conv1d", "conv2d", "conv3d"}
_CONV_TRANSPOSES = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_MATMULS = {"matmul", "mm", "bmm"}


def _first_input(op: _Op) -> Any:
    return op.arg(0, "input", op.kwargs.get("self"))


def _rule(op: _Op, name: str, swapped: bool, st: Callable[[Any], _State]) -> Any:
    """The state of each output of ``op`` given the states of its inputs (all ``_Scaled`` or
    ``None`` here); raises :class:`_BreakError` when no rule applies."""
    out = op.outputs[0]
    x = _first_input(op)
    sx = st(x)
    if name in ("copy_",):
        return st(op.arg(1, "src"))
    if name in ("fill_", "zero_"):
        return None
    if name in _PASSTHROUGH:
        return _only_first(op, st, sx)
    if name in _HOMOGENEOUS:
        s = _only_first(op, st, sx)
        if s.offset is not None:
            raise _BreakError(_OFFSET)
        return s
    if name in _POOLS:
        s = _only_first(op, st, sx)
        if not s.varying <= {0, 1} or not (s.offset or frozenset()) <= {0, 1}:
            raise _BreakError("it pools over axes along which the factor varies")
        if s.offset is not None and "avg" in name and op.arg(3, "padding", 0) not in (0, (0,)):
            raise _BreakError(_OFFSET)
        return [s] + [None] * (len(op.outputs) - 1)
    if name in _RESHAPES:
        return _reshape(_only_first(op, st, sx), x.shape, out.shape)
    if name in _EXPANDS:
        return _shift(_only_first(op, st, sx), out.rank - x.rank)
    if name in ("permute", "transpose", "t", "T", "mT", "movedim"):
        return _permute(op, name, _only_first(op, st, sx), x.rank)
    if name == "getitem":
        return _getitem(op, st, sx, x)
    if name in ("chunk", "split", "tensor_split", "narrow", "unbind", "select"):
        return _split(op, name, _only_first(op, st, sx), x.rank)
    if name in ("cat", "stack"):
        return _cat(op, name, st)
    if name in _SUMS | _EXTREMES | _NORMS | _SPREADS:
        if name in ("max", "min") and isinstance(op.arg(1, "other"), _Ref):
            return _same_pair(st(x), st(op.arg(1, "other")))
        return _reduce(op, name, _only_first(op, st, sx), x)
    if name in ("maximum", "minimum", "fmax", "fmin"):
        return _same_pair(st(x), st(op.arg(1, "other")))
    if name in ("add", "sub"):
        return _add(op, st, swapped)
    if name == "mul":
        return _mul(op, st)
    if name == "div":
        return _div(op, st, swapped)
    if name == "pow" and not swapped:
        return _power(_only_first(op, st, sx), op.arg(1, "exponent"))
    if name in _POWERS:
        return _power(_only_first(op, st, sx), _POWERS[name])
    if name in ("clamp", "clamp_min"):
        return _clamp(op, name, _only_first(op, st, sx))
    if name == "pad":
        return _pad(op, _only_first(op, st, sx))
    if name == "linear":
        return _linear(op, st, out.rank)
    if name in _CONVS:
        return _conv(op, st, transpose=False)
    if name in _CONV_TRANSPOSES:
        return _conv(op, st, transpose=True)
    if name in _MATMULS:
        return _matmul(op, st, out.rank)
    if name in ("mv", "dot", "vdot", "inner"):
        return _vector_product(op, name, st)
    if name == "embedding":
        return _embedding(op, st, out.rank)
    if name in ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm",
                "normalize", "_weight_norm"):
        return _normalization(op, name, st, sx, x)
    raise _BreakError("no rule for this operation")


def _only_first(op: _Op, st: Callable[[Any], _State], sx: _State) -> _Scaled:
    """The first input's state; breaks if any other input also changes."""
    others = [r for r in _refs((op.args[1:], {k: v for k, v in op.kwargs.items()
                                              if k not in ("input", "self", "out")}))]
    if not isinstance(sx, _Scaled) or any(st(r) is not None for r in others):
        raise _BreakError(_TWO)
    return sx


def _same_pair(a: _State, b: _State) -> _Scaled:
    if isinstance(a, _Scaled) and isinstance(b, _Scaled) and a.offset is None and b.offset is None \
            and a.varying == b.varying and a.degree == b.degree:
        return a
    raise _BreakError(_TWO)


def _reshape(s: _Scaled, src: tuple[int, ...], dst: tuple[int, ...]) -> _Scaled:
    varying = _reshape_axes(s.varying, src, dst)
    offset = None if s.offset is None else _reshape_axes(s.offset, src, dst)
    return dataclasses.replace(s, varying=varying, offset=offset)


def _reshape_axes(axes: Axes, src: Sequence[int], dst: Sequence[int]) -> Axes:
    """Where a factor that varies along ``axes`` of shape ``src`` varies after a reshape to
    ``dst``: pair minimal runs of axes with equal products; a run of ``dst`` varies if its
    ``src`` run holds a varying axis."""
    if not axes:
        return frozenset()
    s = [(a, n) for a, n in enumerate(src) if n != 1]
    d = [(a, n) for a, n in enumerate(dst) if n != 1]
    if any(n == 0 for _, n in s):
        raise _BreakError(_SHAPE)
    result: set[int] = set()
    i = j = 0
    while i < len(s) and j < len(d):
        run_s, run_d = [s[i][0]], [d[j][0]]
        size_s, size_d = s[i][1], d[j][1]
        while size_s != size_d:
            if size_s < size_d:
                i += 1
                if i == len(s):
                    raise _BreakError(_SHAPE)
                run_s.append(s[i][0])
                size_s *= s[i][1]
            else:
                j += 1
                if j == len(d):
                    raise _BreakError(_SHAPE)
                run_d.append(d[j][0])
                size_d *= d[j][1]
        if axes & set(run_s):
            result.update(run_d)
        i += 1
        j += 1
    return frozenset(result)


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _permute(op: _Op, name: str, s: _Scaled, rank: int) -> _Scaled:
    order = list(range(rank))
    if name == "permute":
        dims = op.kwargs.get("dims")
        if dims is None:
            dims = op.args[1] if len(op.args) == 2 and not isinstance(op.args[1], int) \
                else op.args[1:]
        order = [_norm_dim(d, rank) for d in dims]
    elif name == "transpose":
        d0, d1 = _norm_dim(op.arg(1, "dim0"), rank), _norm_dim(op.arg(2, "dim1"), rank)
        order[d0], order[d1] = order[d1], order[d0]
    elif name == "t" and rank == 2 or name == "T":
        order.reverse()
    elif name == "mT":
        order[-1], order[-2] = order[-2], order[-1]
    elif name == "movedim":
        raise _BreakError(_SHAPE)
    new_axis = {old: new for new, old in enumerate(order)}
    return dataclasses.replace(s, varying=_remap(s.varying, new_axis.get),
                               offset=_remap(s.offset, new_axis.get))


def _index_map(index: Any, rank: int, allow_select: bool) -> Callable[[int], int | None]:
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (_Ref, list, bool)) for i in items):
        raise _BreakError(_SHAPE)
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        expanded.extend([slice(None)] * (rank - consumed) if i is Ellipsis else [i])
    expanded.extend([slice(None)] * (rank - sum(1 for i in expanded if i is not None)))
    mapping: dict[int, int | None] = {}
    src = dst = 0
    for i in expanded:
        if i is None:
            dst += 1
        elif isinstance(i, int):
            mapping[src] = -1 if allow_select else None
            src += 1
        elif isinstance(i, slice):
            mapping[src] = dst
            src += 1
            dst += 1
        else:
            raise _BreakError(_SHAPE)
    return mapping.get


def _getitem(op: _Op, st: Callable[[Any], _State], sx: _State, x: _Ref) -> _Scaled:
    index = op.args[1]
    if any(st(r) is not None for r in _refs(index)) or not isinstance(sx, _Scaled):
        raise _BreakError(_SHAPE)
    try:
        varying = _remap(sx.varying, _index_map(index, x.rank, allow_select=False))
        offset = _remap(sx.offset, _index_map(index, x.rank, allow_select=True))
    except _BreakError:
        if sx.varying or sx.offset:  # advanced indexing keeps only a single factor intact
            raise
        return sx
    offset = None if offset is None else frozenset(a for a in offset if a >= 0)
    return dataclasses.replace(sx, varying=varying, offset=offset)


def _split(op: _Op, name: str, s: _Scaled, rank: int) -> list[_Scaled]:
    dim_index = {"chunk": 2, "split": 2, "tensor_split": 2, "narrow": 1, "unbind": 1,
                 "select": 1}[name]
    dim = _norm_dim(op.arg(dim_index, "dim", 0), rank)
    if name in ("unbind", "select"):
        if dim in s.varying:
            raise _BreakError(_MIXES)
        drop = {a: (a if a < dim else a - 1) for a in range(rank) if a != dim}
        offset = None if s.offset is None else frozenset(drop[a] for a in s.offset if a != dim)
        s = dataclasses.replace(s, varying=_remap(s.varying, drop.get), offset=offset)
    return [s] * len(op.outputs)


def _cat(op: _Op, name: str, st: Callable[[Any], _State]) -> _Scaled:
    tensors = op.arg(0, "tensors")
    states = [st(t) for t in tensors]
    scaled = [s for s in states if isinstance(s, _Scaled)]
    if len(scaled) != len(states) or any(
        s.varying != scaled[0].varying or s.degree != scaled[0].degree for s in scaled
    ):
        raise _BreakError(_TWO)
    first = scaled[0]
    rank = op.outputs[0].rank
    dim = _norm_dim(op.arg(1, "dim", 0), rank)
    offset = first.offset
    for s in scaled[1:]:
        offset = _union(offset, s.offset)
    if name == "stack":
        shift = {a: (a if a < dim else a + 1) for a in range(rank)}
        return dataclasses.replace(first, varying=_remap(first.varying, shift.get),
                                   offset=_remap(offset, shift.get))
    if dim in first.varying:
        raise _BreakError(_MIXES)
    return dataclasses.replace(first, offset=offset)


def _reduced_dims(op: _Op, name: str, rank: int) -> set[int]:
    dims = op.kwargs.get("dim", op.kwargs.get("axis"))
    if dims is None:
        position = 2 if name in _NORMS else 1
        candidate = op.args[position] if position < len(op.args) else None
        if isinstance(candidate, (int, tuple, list)) and not isinstance(candidate, bool):
            dims = candidate
    if dims is None or dims == [] or dims == ():
        return set(range(rank))
    dims = [dims] if isinstance(dims, int) else dims
    return {_norm_dim(d, rank) for d in dims}


def _reduce(op: _Op, name: str, s: _Scaled, x: _Ref) -> Any:
    reduced = _reduced_dims(op, name, x.rank)
    kept_rank = op.outputs[0].rank
    if kept_rank == x.rank:
        mapping = {a: a for a in range(x.rank)}
    elif kept_rank == x.rank - len(reduced):
        kept = [a for a in range(x.rank) if a not in reduced]
        mapping = {a: i for i, a in enumerate(kept)}
    else:
        raise _BreakError(_SHAPE)
    if s.varying & reduced:
        raise _BreakError(_MIXES)
    varying = _remap(s.varying, mapping.get)
    offset_in = s.offset
    if name in _SUMS:
        offset = None if offset_in is None else frozenset(mapping[a] for a in offset_in
                                                           if a not in reduced)
    elif name in _EXTREMES:
        if offset_in is not None and offset_in & reduced:
            raise _BreakError(_OFFSET)
        offset = _remap(offset_in, mapping.get)
    elif name in _NORMS:
        if offset_in is not None:
            raise _BreakError(_OFFSET)
        offset = None
    else:  # spreads drop an offset that is constant over the reduced axes
        if offset_in is not None and offset_in & reduced:
            raise _BreakError(_OFFSET)
        offset = None
    degree = 2 * s.degree if name.startswith("var") else s.degree
    result = dataclasses.replace(s, varying=varying, offset=offset, degree=degree)
    if name in ("std_mean", "var_mean"):
        mean = dataclasses.replace(s, varying=varying, offset=_remap(
            None if offset_in is None else offset_in - reduced, mapping.get))
        return [result, mean]
    return [result] + [None] * (len(op.outputs) - 1)  # max/min with dim: (values, indices)


def _operands(op: _Op, swapped: bool) -> tuple[Any, Any]:
    a, b = _first_input(op), op.arg(1, "other")
    return (b, a) if swapped else (a, b)


def _aligned(st: Callable[[Any], _State], value: Any, rank: int) -> _State:
    s = st(value)
    return _shift(s, rank - value.rank) if isinstance(s, _Scaled) else s


def _add(op: _Op, st: Callable[[Any], _State], swapped: bool) -> _Scaled:
    a, b = _operands(op, swapped)
    rank = op.outputs[0].rank
    sa, sb = _aligned(st, a, rank), _aligned(st, b, rank)
    if isinstance(sa, _Scaled) and isinstance(sb, _Scaled):
        if sa.varying != sb.varying or sa.degree != sb.degree:
            raise _BreakError(_TWO)
        return dataclasses.replace(sa, offset=_union(sa.offset, sb.offset))
    s, other = (sa, b) if isinstance(sa, _Scaled) else (sb, a)
    assert isinstance(s, _Scaled)
    if isinstance(other, _Ref):
        return dataclasses.replace(s, offset=_union(s.offset, _live_axes(other, rank)))
    if isinstance(other, (int, float)) and abs(other) <= _NEGLIGIBLE:
        return s
    return dataclasses.replace(s, offset=_union(s.offset, frozenset()))


def _mul(op: _Op, st: Callable[[Any], _State]) -> _Result:
    a, b = _operands(op, False)
    rank = op.outputs[0].rank
    sa, sb = _aligned(st, a, rank), _aligned(st, b, rank)
    if isinstance(sa, _Scaled) and isinstance(sb, _Scaled):
        return _combine(sa, sb, sb.degree)
    s, other = (sa, b) if isinstance(sa, _Scaled) else (sb, a)
    assert isinstance(s, _Scaled)
    if isinstance(other, _Ref):
        offset = None if s.offset is None else s.offset | _live_axes(other, rank)
        return dataclasses.replace(s, offset=offset)
    if isinstance(other, (int, float)) and other == 0:
        return None
    return s


def _div(op: _Op, st: Callable[[Any], _State], swapped: bool) -> _Result:
    a, b = _operands(op, swapped)
    rank = op.outputs[0].rank
    sa = _aligned(st, a, rank) if isinstance(a, _Ref) else None
    sb = _aligned(st, b, rank) if isinstance(b, _Ref) else None
    if isinstance(sa, _Scaled) and isinstance(sb, _Scaled):
        return _combine(sa, sb, -sb.degree)
    if isinstance(sa, _Scaled):
        offset = sa.offset if sa.offset is None or not isinstance(b, _Ref) else (
            sa.offset | _live_axes(b, rank))
        return dataclasses.replace(sa, offset=offset)
    assert isinstance(sb, _Scaled)
    if sb.offset is not None:
        raise _BreakError(_OFFSET)
    return dataclasses.replace(sb, degree=-sb.degree)


def _combine(sa: _Scaled, sb: _Scaled, degree_b: float) -> _Result:
    """The product of two rescaled values: ``c^(k_a + degree_b)``; degree 0 means invariant."""
    if sa.offset is not None or sb.offset is not None or sa.varying != sb.varying:
        raise _BreakError(_TWO)
    degree = sa.degree + degree_b
    if degree == 0:
        return _Absorbed(sa)
    return dataclasses.replace(sa, degree=degree)


def _power(s: _Scaled, exponent: Any) -> _State:
    if not isinstance(exponent, (int, float)) or s.offset is not None:
        raise _BreakError(_OFFSET)
    return None if exponent == 0 else dataclasses.replace(s, degree=s.degree * exponent)


def _clamp(op: _Op, name: str, s: _Scaled) -> _Scaled:
    low = op.arg(1, "min")
    high = None if name == "clamp_min" else op.arg(2, "max")
    if high is None and isinstance(low, (int, float)) and 0 <= low <= _NEGLIGIBLE \
            and s.offset is None:
        return s
    raise _BreakError("it clips values")


def _pad(op: _Op, s: _Scaled) -> _Scaled:
    pad = op.arg(1, "pad")
    rank = op.outputs[0].rank
    padded = set(range(rank - len(pad) // 2, rank))
    mode = op.arg(2, "mode", "constant")
    value = op.arg(3, "value", None)
    if mode == "constant" and not value:
        return dataclasses.replace(s, offset=None if s.offset is None else s.offset | padded)
    if s.varying & padded or (s.offset or frozenset()) & padded:
        raise _BreakError(_MIXES)
    return s


def _linear(op: _Op, st: Callable[[Any], _State], rank: int) -> _Scaled:
    x, w, b = _first_input(op), op.arg(1, "weight"), op.arg(2, "bias")
    sx, sw, sb = st(x), st(w), st(b)
    last = rank - 1
    if sb is not None or (sx is not None and sw is not None):
        raise _BreakError(_TWO)
    if isinstance(sw, _Scaled):  # rows of the weight are output features
        if sw.offset is not None or not sw.varying <= {0}:
            raise _BreakError(_MIXES)
        varying = frozenset({last}) if sw.varying else frozenset()
        return dataclasses.replace(sw, varying=varying, offset=frozenset({last}) if b else None)
    assert isinstance(sx, _Scaled)
    if last in sx.varying:
        raise _BreakError(_MIXES)
    offset = None
    if sx.offset is not None or b is not None:
        offset = (sx.offset or frozenset()) - {last} | {last}
    return dataclasses.replace(sx, offset=offset)


def _conv(op: _Op, st: Callable[[Any], _State], transpose: bool) -> _Scaled:
    x, w, b = _first_input(op), op.arg(1, "weight"), op.arg(2, "bias")
    sx, sw, sb = st(x), st(w), st(b)
    rank = op.outputs[0].rank
    if sb is not None or (sx is not None and sw is not None):
        raise _BreakError(_TWO)
    if isinstance(sw, _Scaled):
        # conv: weight rows are output channels; conv_transpose: rows are input channels.
        if sw.offset is not None or not sw.varying <= ({0} if not transpose else set()):
            raise _BreakError(_MIXES)
        varying = frozenset({1}) if sw.varying else frozenset()
        return dataclasses.replace(sw, varying=varying, offset=frozenset({1}) if b else None)
    assert isinstance(sx, _Scaled)
    groups = op.arg(6, "groups", 1)
    depthwise = not transpose and groups == x.shape[1]
    if not sx.varying <= ({0, 1} if depthwise else {0}):
        raise _BreakError(_MIXES)
    if sx.offset is not None:
        offset: Axes | None = frozenset(range(1, rank)) | (sx.offset & {0})
    else:
        offset = frozenset({1}) if b is not None else None
    return dataclasses.replace(sx, offset=offset)


def _matmul(op: _Op, st: Callable[[Any], _State], rank: int) -> _Scaled:
    a, b = _first_input(op), op.arg(1, "other", op.arg(1, "mat2"))
    sa, sb = st(a), st(b)
    if (isinstance(sa, _Scaled) and sa.offset is not None) or (
            isinstance(sb, _Scaled) and sb.offset is not None):
        raise _BreakError(_OFFSET)
    if isinstance(sa, _Scaled) and isinstance(sb, _Scaled):
        if sa.varying or sb.varying:
            raise _BreakError(_TWO)
        return dataclasses.replace(sa, degree=sa.degree + sb.degree)
    if a.rank < 2 or b.rank < 2:
        s = cast(_Scaled, sa if isinstance(sa, _Scaled) else sb)  # one input is rescaled
        if s.varying:
            raise _BreakError(_MIXES)
        return s
    if isinstance(sa, _Scaled):
        if a.rank - 1 in sa.varying:
            raise _BreakError(_MIXES)
        return _shift(sa, rank - a.rank)
    assert isinstance(sb, _Scaled)
    if b.rank - 2 in sb.varying:
        raise _BreakError(_MIXES)
    return _shift(sb, rank - b.rank)


def _vector_product(op: _Op, name: str, st: Callable[[Any], _State]) -> _Scaled:
    a, b = _first_input(op), op.arg(1, "vec", op.arg(1, "other"))
    sa, sb = st(a), st(b)
    states = [s for s in (sa, sb) if isinstance(s, _Scaled)]
    if any(s.offset is not None for s in states):
        raise _BreakError(_OFFSET)
    if name == "mv" and isinstance(sa, _Scaled) and sb is None and sa.varying <= {0}:
        return sa
    if any(s.varying for s in states):
        raise _BreakError(_MIXES)
    return dataclasses.replace(states[0], degree=sum(s.degree for s in states))


def _embedding(op: _Op, st: Callable[[Any], _State], rank: int) -> _Scaled:
    ids, w = _first_input(op), op.arg(1, "weight")
    sw = st(w)
    if st(ids) is not None or not isinstance(sw, _Scaled) or op.arg(3, "max_norm") is not None:
        raise _BreakError(_TWO)
    if sw.offset is not None or not sw.varying <= {0}:
        raise _BreakError(_MIXES)
    varying = frozenset(range(rank - 1)) if sw.varying else frozenset()
    return dataclasses.replace(sw, varying=varying)


def _normalization(op: _Op, name: str, st: Callable[[Any], _State], sx: _State,
                   x: _Ref) -> _Result:
    if name == "_weight_norm":
        return _weight_norm(op, st)
    s = _only_first(op, st, sx)
    offset = s.offset
    rank = x.rank
    if name == "batch_norm" and not op.arg(5, "training", False):
        return dataclasses.replace(s, offset=_union(offset, frozenset({1})))
    if name == "instance_norm" and not op.arg(5, "use_input_stats", True):
        return dataclasses.replace(s, offset=_union(offset, frozenset({1})))
    if name in ("batch_norm", "instance_norm", "group_norm"):
        # statistics per channel (batch norm), per sample and channel (instance norm), per
        # sample and group of channels (group norm); the factor and offset must be constant
        # over the axes the statistics run over.
        if name == "batch_norm":
            allowed = {1}
        elif name == "instance_norm":
            allowed = {0, 1}
        else:
            allowed = {0, 1} if x.shape[1] == op.arg(1, "num_groups") else {0}
        if not s.varying <= allowed:
            raise _BreakError("its statistics run over channels whose factors differ")
        if offset is not None and not offset <= allowed:
            raise _BreakError(_OFFSET + " that it does not subtract")
        return _Absorbed(s)
    if name in ("layer_norm", "rms_norm"):
        shape = op.arg(1, "normalized_shape")
        count = 1 if isinstance(shape, int) else len(shape)
        normalized = set(range(rank - count, rank))
        centred = name == "layer_norm"
        if s.varying & normalized:
            raise _BreakError("it normalizes over axes along which the factor varies")
        if offset is not None and (not centred or offset & normalized):
            raise _BreakError(_OFFSET + " that it does not subtract")
        return _Absorbed(s)
    dim = _norm_dim(op.arg(2, "dim", 1), rank)  # F.normalize
    if dim in s.varying:
        raise _BreakError("it normalizes along an axis along which the factor varies")
    if offset is not None:
        raise _BreakError(_OFFSET)
    return _Absorbed(s)


def _weight_norm(op: _Op, st: Callable[[Any], _State]) -> _Result:
    """``torch._weight_norm(v, g, dim) = g * v / |v|`` (norm over all axes but ``dim``;
    ``dim=-1``: the whole tensor)."""
    v, g = op.arg(0, "v"), op.arg(1, "g")
    dim = op.arg(2, "dim", 0)
    sv, sg = st(v), st(g)
    if sv is not None and sg is not None:
        raise _BreakError(_TWO)
    if isinstance(sv, _Scaled):
        allowed = set() if dim == -1 else {_norm_dim(dim, v.rank)}
        if sv.offset is None and sv.varying <= allowed:
            return _Absorbed(sv)
        raise _BreakError(_MIXES)
    assert isinstance(sg, _Scaled)
    return _shift(sg, v.rank - g.rank)


@dataclass(frozen=True)
class _Verdict:
    invariant: bool
    text: str


def _replay(trace: _Trace, node: int, start: _Scaled, owner: str) -> _Verdict:
    """Follow the rescaling of one parameter (state ``start`` at ``node``) to the outputs."""
    states: dict[int, _Scaled | _Broken] = {node: start}
    absorbed: list[tuple[str, ...]] = []
    first_break: str | None = None

    def st(value: Any) -> _State:
        return states.get(value.node) if isinstance(value, _Ref) else None

    for op in trace.ops:
        touched = [states[n] for n in op.inputs if n in states]
        if not touched:
            continue
        broken = next((s for s in touched if isinstance(s, _Broken)), None)
        if broken is not None:
            results: Any = broken
        else:
            name, swapped = _canonical(op.name)
            try:
                results = _rule(op, name, swapped, st)
            except (_BreakError, AttributeError, TypeError, IndexError, KeyError,
                    ValueError) as exc:
                why = str(exc) if isinstance(exc, _BreakError) else "no rule for this case"
                results = _Broken(f"{op.where}: {why}")
                first_break = first_break or results.where
        if not isinstance(results, list):
            results = [results] * len(op.outputs)
        for ref, result in zip(op.outputs, results, strict=False):
            if isinstance(result, _Absorbed):
                path = result.state.path
                absorbed.append(path if path and path[-1] == op.label else path + (op.label,))
            elif isinstance(result, _Scaled):
                shaped = dataclasses.replace(
                    result,
                    varying=_keep_live(result.varying, ref.shape),
                    offset=_keep_live(result.offset, ref.shape),
                    path=_extend(result.path, op.label, owner),
                )
                states[ref.node] = shaped
            elif isinstance(result, _Broken):
                states[ref.node] = result
    leaks = [states[n] for n in trace.output_nodes if n in states]
    if not leaks:
        hops = sorted({" -> ".join(p) for p in absorbed})
        return _Verdict(True, "; ".join(hops) if hops else "does not reach the output")
    leak = leaks[0]
    if isinstance(leak, _Broken):
        return _Verdict(False, f"breaks at {first_break or leak.where}")
    route = " -> ".join(leak.path)
    return _Verdict(False, "the output scales with it" + (f" (via {route})" if route else ""))


def _extend(path: tuple[str, ...], label: str, owner: str) -> tuple[str, ...]:
    if not label or label == owner or (path and path[-1] == label):
        return path
    return path + (label,)


def _structural_kind(trace: _Trace, name: str, p: Tensor) -> tuple[Invariance | None, str]:
    node = trace.param_nodes.get(name)
    if node is None:
        return None, f"{name}: not used in the forward pass"
    owner = trace.owner_labels.get(name, "")
    per_row = _replay(trace, node, _Scaled(frozenset({0}) if p.shape[0] > 1 else frozenset()),
                      owner)
    if per_row.invariant:
        return Invariance.CHANNEL, f"{name} -> {per_row.text}: per channel"
    whole = _replay(trace, node, _Scaled(frozenset()), owner)
    if whole.invariant:
        return Invariance.LAYER, (
            f"{name} -> {whole.text}: whole tensor (not per channel: {per_row.text})"
        )
    return Invariance.NONE, f"{name}: not invariant: {whole.text}"


# --------------------------------------------------------------------------------------------
# Numeric check and the cosine test
# --------------------------------------------------------------------------------------------


def _random_factors(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """Positive factors in ``[1/3, 1/1.5] U [1.5, 3]``: far enough from 1 to show any change."""
    magnitude = torch.empty(shape, dtype=torch.float64).uniform_(
        math.log(1.5), math.log(3.0), generator=generator
    )
    sign = torch.randint(0, 2, shape, generator=generator, dtype=torch.float64) * 2 - 1
    return (magnitude * sign).exp()


def _relative_change(new: Any, reference: Sequence[Tensor]) -> float:
    """``|f' - f| / |f|`` over all floating outputs (absolute where ``f`` is zero)."""
    diff = total = 0.0
    for a, b in zip(_tensor_leaves(new), reference, strict=True):
        if not (a.is_floating_point() or a.is_complex()):
            diff += float((a != b).any())
            continue
        diff += float((a.detach().double() - b.double()).abs().square().sum())
        total += float(b.double().abs().square().sum())
    if not math.isfinite(diff):
        return math.inf
    return math.sqrt(diff) / math.sqrt(total) if total > 0 else math.sqrt(diff)


def _numeric_kind(p: Tensor, forward: Callable[[], Any], reference: Sequence[Tensor],
                  generator: torch.Generator, rtol: float) -> tuple[Invariance, dict[str, float]]:
    changes: dict[str, float] = {}
    for view in VIEWS:
        rows = p.shape[0] if view == "channel" else 1
        factors = _random_factors((rows,) + (1,) * (p.dim() - 1), generator)
        original = p.detach().clone()
        with torch.no_grad():
            p.mul_(factors.to(device=p.device, dtype=p.dtype))
        try:
            changes[view] = _relative_change(forward(), reference)
        finally:
            with torch.no_grad():
                p.copy_(original)
        if changes[view] <= rtol:
            return Invariance(view), changes
    return Invariance.NONE, changes


class _RandomProjection:
    """Default loss: ``sum(out * r)`` with fixed standard-normal ``r``, one per output tensor."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.weights: dict[tuple[int, tuple[int, ...]], Tensor] = {}

    def __call__(self, output: Any) -> Tensor:
        total: Tensor | None = None
        for i, t in enumerate(_tensor_leaves(output)):
            if not t.is_floating_point():
                continue
            key = (i, tuple(t.shape))
            if key not in self.weights:
                self.weights[key] = torch.randn(t.shape, generator=self.generator)
            term = (t * self.weights[key].to(device=t.device, dtype=t.dtype)).sum()
            total = term if total is None else total + term
        if total is None:
            raise ValueError("the model's output holds no floating-point tensor; pass loss_fn")
        return total


# The cosine test's view (``None``: not projected), per-view max cosines and thresholds.
_Cosine: TypeAlias = tuple[str | None, dict[str, float], dict[str, float]]


def _cosine_tests(named: Sequence[tuple[str, Tensor]], grads: Mapping[str, Tensor | None],
                  delta: float, eps: float) -> dict[str, _Cosine]:
    results: dict[str, _Cosine] = {}
    for name, p in named:
        g = grads.get(name)
        if p.dim() < 2 or p.numel() == 0 or g is None:  # never tested
            results[name] = (None, {}, {})
            continue
        w = p.detach()
        view = select_view(w, g, "auto", delta, eps)
        cosines: dict[str, float] = {v: float(max_cosine(w, g, v, eps)) for v in VIEWS}
        thresholds: dict[str, float] = {v: threshold(w, v, delta) for v in VIEWS}
        results[name] = (view, cosines, thresholds)
    return results


# --------------------------------------------------------------------------------------------
# Keeping the model as it was
# --------------------------------------------------------------------------------------------


@contextmanager
def _left_as_found(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Training mode inside; modes, parameters, buffers and random state restored after.

    Yields a function that restores the buffers (BatchNorm running statistics) in between."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.detach().clone()) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t, _ in params + buffers if t.device.type == "cuda"})

    def restore_buffers() -> None:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)

    with torch.random.fork_rng(devices=devices):
        try:
            model.train()
            yield restore_buffers
        finally:
            with torch.no_grad():
                for p, saved in params:
                    p.copy_(saved)
            restore_buffers()
            for m, training in modes:
                m.training = training


def _as_call(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    raise TypeError(
        "example_inputs must be a Tensor, a tuple/list of positional arguments or a dict of "
        f"keyword arguments; got {type(example_inputs).__name__}"
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def find_scale_invariant(
    model: nn.Module,
    example_inputs: Any,
    *,
    loss_fn: Callable[[Any], Tensor] | None = None,
    delta: float = 0.1,
    eps: float = 1e-8,
    rtol: float = 1e-3,
    seed: int = 0,
) -> InvarianceReport:
    """Find, for every parameter of ``model``, whether it is scale-invariant and how.

    Args:
        model: the model; run in training mode, left as found.
        example_inputs: a batch: a Tensor, a tuple of positional arguments or a dict of keyword
            arguments. Batch statistics need a batch of more than one sample.
        loss_fn: ``loss_fn(output) -> scalar`` for the cosine test's gradient; default
            ``sum(output * r)`` with fixed random ``r``.
        delta, eps: the cosine test's settings (as in :class:`~scaleinv.AdamP`).
        rtol: largest relative output change ``|f(scaled) - f| / |f|`` still called invariant.
        seed: seeds the random factors, the default loss and every forward pass (dropout).

    Returns:
        An :class:`InvarianceReport`: ``report[name]`` is an :class:`Invariance`
        (``"channel"``, ``"layer"`` or ``"none"``), keyed like ``model.named_parameters()``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"Invalid rtol: {rtol!r}; allowed range is (0, inf)")
    if not (isinstance(delta, (int, float)) and delta > 0):
        raise ValueError(f"Invalid delta: {delta!r}; allowed range is (0, inf)")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"Invalid eps: {eps!r}; allowed range is [0, inf)")
    args, kwargs = _as_call(example_inputs)
    named = list(model.named_parameters())
    loss_fn = loss_fn if loss_fn is not None else _RandomProjection(seed)

    with _left_as_found(model) as restore_buffers:

        def forward() -> Any:
            restore_buffers()
            torch.manual_seed(seed)
            return model(*args, **kwargs)

        trace = _record_forward(model, forward, named)
        with torch.no_grad():
            reference = [t.detach().clone() for t in _tensor_leaves(forward())]
        grads = _gradients(named, forward, loss_fn)
        cosine = _cosine_tests(named, grads, delta, eps)
        generator = torch.Generator().manual_seed(seed)
        details = []
        for name, p in named:
            details.append(_inspect_one(name, p, trace, forward, reference, generator, rtol,
                                        cosine[name]))
    note = None if trace.error is None else f"partly unreadable ({trace.error})"
    return InvarianceReport(details, note)


def _gradients(named: Sequence[tuple[str, Tensor]], forward: Callable[[], Any],
               loss_fn: Callable[[Any], Tensor]) -> dict[str, Tensor | None]:
    trainable = [(n, p) for n, p in named if p.requires_grad]
    with torch.enable_grad():
        loss = loss_fn(forward())
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a tensor with exactly one element")
        if not trainable or not loss.requires_grad:
            return {}
        grads = torch.autograd.grad(loss.reshape(()), [p for _, p in trainable],
                                    allow_unused=True)
    return {n: g for (n, _), g in zip(trainable, grads, strict=True)}


def _inspect_one(name: str, p: Tensor, trace: _Trace, forward: Callable[[], Any],
                 reference: Sequence[Tensor], generator: torch.Generator, rtol: float,
                 cosine: _Cosine) -> ParamInvariance:
    shape = tuple(p.shape)
    view, cosines, thresholds = cosine
    if p.dim() < 2:
        return ParamInvariance(name, shape, Invariance.NONE,
                               f"{name}: 1-D, never projected", cosine_view=None)
    if p.numel() == 0:
        return ParamInvariance(name, shape, Invariance.NONE,
                               f"{name}: empty, never projected", cosine_view=None)
    if trace.param_nodes.get(name) is None and trace.error is None:
        return ParamInvariance(name, shape, Invariance.NONE,
                               f"{name}: not used in the forward pass", cosine_view=view,
                               max_cosines=cosines, thresholds=thresholds)
    with torch.no_grad():
        numeric, changes = _numeric_kind(p, forward, reference, generator, rtol)
    if trace.error is None:
        structural, reason = _structural_kind(trace, name, p)
    else:
        structural, reason = None, f"{name}: structure unavailable"
    if structural is None:
        reason = f"{reason}; numeric check: {numeric.describe}"
    elif structural != numeric:
        shown = min(changes.values())
        reason = (f"{reason}; but the numeric check finds {numeric.describe} "
                  f"(output change {shown:.1e}): the numeric result is used")
    return ParamInvariance(name, shape, numeric, reason, structural=structural, numeric=numeric,
                           numeric_change=changes, cosine_view=view, max_cosines=cosines,
                           thresholds=thresholds)


def _as_invariance(kind: Any) -> Invariance:
    if kind is False or kind is None:
        return Invariance.NONE
    try:
        return Invariance(getattr(kind, "value", kind))
    except ValueError:
        raise ValueError(
            f"Invalid invariance kind {kind!r}; allowed: 'channel', 'layer', 'none'"
        ) from None


GROUP_KEYS: tuple[str, ...] = ("channel", "layer", "none", "1d")


def param_groups(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    invariance: Mapping[str, Any] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    **inspect_kwargs: Any,
) -> list[dict[str, Any]]:
    """Optimizer param groups annotated with ``scale_invariant=`` from an inspection.

    Groups, in this order and only where non-empty: ``"channel"`` (``scale_invariant=
    "channel"``), ``"layer"`` (``"layer"``), ``"none"`` (tensors with ``dim() >= 2`` that are not
    invariant, ``False``) and ``"1d"`` (biases and norm gains, ``False``).

    Args:
        model: the model whose ``named_parameters()`` are grouped.
        example_inputs: a batch for :func:`find_scale_invariant` (not needed with ``invariance``).
        invariance: a mapping ``name -> kind`` (e.g. an earlier report); names it lacks count as
            ``"none"``.
        options: extra settings per group, e.g. ``{"1d": {"weight_decay": 0.0}}``.
        **inspect_kwargs: passed to :func:`find_scale_invariant`.
    """
    options = dict(options or {})
    unknown = set(options) - set(GROUP_KEYS)
    if unknown:
        raise ValueError(f"Invalid options keys {sorted(unknown)}; allowed: {list(GROUP_KEYS)}")
    for key, extra in options.items():
        if not isinstance(extra, Mapping) or {"params", "scale_invariant"} & set(extra):
            raise ValueError(
                f"Invalid options[{key!r}]: expected a dict of optimizer settings without "
                "'params' or 'scale_invariant'"
            )
    if invariance is None:
        if example_inputs is None:
            raise ValueError("param_groups needs example_inputs (to inspect) or invariance")
        invariance = find_scale_invariant(model, example_inputs, **inspect_kwargs)
    buckets: dict[str, list[Tensor]] = {key: [] for key in GROUP_KEYS}
    for name, p in model.named_parameters():
        key = "1d" if p.dim() < 2 else _as_invariance(invariance.get(name, "none")).value
        buckets[key].append(p)
    annotation = {"channel": "channel", "layer": "layer", "none": False, "1d": False}
    return [
        {"params": params, "scale_invariant": annotation[key], **options.get(key, {})}
        for key, params in buckets.items()
        if params
    ]
