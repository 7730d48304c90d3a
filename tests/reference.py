"""What the maths says, written from docs/contract.md and nothing else.

Two things live here, both independent of ``scaleinv`` and of ``adamp``:

* a float64 reference of AdamP and SGDP (:class:`ReferenceAdamP`, :class:`ReferenceSGDP`) with
  its own cosine test (:func:`reference_view`) and projection (:func:`reference_project`);
* gradients built so that the branch the cosine test takes is known in advance
  (:func:`make_grad`): ``"channel"`` (orthogonal to ``w`` row by row), ``"layer"`` (orthogonal to
  ``w`` as a whole, far from orthogonal row by row) and ``"none"`` (far from orthogonal either way).
  ``"random"`` is a plain Gaussian whose branch is not fixed in advance.

And the plumbing the optimizer tests share: drivers that step several optimizers on the same
gradients (:func:`run_lockstep`, :func:`replay`), logs of the branch each run took
(:func:`record_official_views`, :func:`record_projected`, :func:`check_branches`), the
round-off tolerance (:func:`assert_round_off_close`) and hypothesis strategies for layouts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from unittest import mock

import hypothesis.strategies as st
import torch
from torch import Tensor

KINDS = ("channel", "layer", "none", "random")
EXPECTED_VIEW = {"channel": "channel", "layer": "layer", "none": None}


def rows(x: Tensor, view: str) -> Tensor:
    """``x`` as ``[n, numel / n]`` (``"channel"``) or ``[1, numel]`` (``"layer"``)."""
    return x.reshape(x.shape[0], -1) if view == "channel" else x.reshape(1, -1)


def row_cosines(w: Tensor, g: Tensor, view: str, eps: float) -> Tensor:
    """``|<g_i, w_i>| / (max(|g_i|, eps) max(|w_i|, eps))`` for every row ``i`` of ``view``."""
    w_rows, g_rows = rows(w, view), rows(g, view)
    dots = (w_rows * g_rows).sum(dim=1).abs()
    return dots / (g_rows.norm(dim=1).clamp_min(eps) * w_rows.norm(dim=1).clamp_min(eps))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the test's sums are formed and compared: float64 for float64 tensors, else
    float32 (16-bit tensors; complex64 as its float32 real view)."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def reference_view(
    w: Tensor, g: Tensor, delta: float, eps: float, scale_invariant: object = "auto",
    accumulate: torch.dtype = torch.float64,
) -> str | None:
    """The view the update of ``w`` is projected on: the first of (channel, layer) whose
    largest row cosine is below ``delta / sqrt(d_V)``, or ``None``; annotations are obeyed.

    ``accumulate``: the dtype the cosines are computed and compared in (strict ``<``; the
    threshold rounded to that dtype); see :func:`accumulation_dtype`. A NaN cosine fails."""
    if w.dim() < 2 or scale_invariant is False:
        return None
    if scale_invariant in ("channel", "layer"):
        return scale_invariant  # type: ignore[return-value]
    w, g = w.to(accumulate), g.to(accumulate)
    for view in ("channel", "layer"):
        row_len = rows(w, view).shape[1]
        limit = torch.tensor(delta / math.sqrt(row_len), dtype=accumulate)
        if row_cosines(w, g, view, eps).max() < limit:
            return view
    return None


def as_real64(t: Tensor) -> Tensor:
    """A float64 copy of ``t``; a complex tensor as its real view ``[..., 2]`` (how every
    body steps it)."""
    t = t.detach()
    return (torch.view_as_real(t) if t.is_complex() else t).double().clone()


def reference_project(w: Tensor, p: Tensor, view: str, eps: float) -> Tensor:
    """``p_i - u_i <u_i, p_i>`` with ``u_i = w_i / (|w_i| + eps)``, row by row of ``view``."""
    w_rows, p_rows = rows(w, view), rows(p, view)
    unit = w_rows / (w_rows.norm(dim=1, keepdim=True) + eps)
    return (p_rows - unit * (unit * p_rows).sum(dim=1, keepdim=True)).reshape(p.shape)


class ReferenceAdamP:
    """AdamP in float64 over copies of ``params``; ``step(grads)`` follows docs/contract.md.

    Complex tensors are stepped as their real views; ``maximize`` negates the gradients."""

    def __init__(self, params: Sequence[Tensor], *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, delta: float, wd_ratio: float,
                 nesterov: bool, scale_invariant: object = "auto", maximize: bool = False) -> None:
        self.params = [as_real64(p) for p in params]
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.t = 0
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.weight_decay, self.delta, self.wd_ratio = weight_decay, delta, wd_ratio
        self.nesterov, self.scale_invariant = nesterov, scale_invariant
        self.maximize = maximize
        self.views: list[list[str | None]] = []

    def step(self, grads: Sequence[Tensor]) -> None:
        self.t += 1
        b1, b2, lr, t = self.b1, self.b2, self.lr, self.t
        views = []
        for w, g, m, v in zip(self.params, grads, self.exp_avgs, self.exp_avg_sqs, strict=True):
            g = -as_real64(g) if self.maximize else as_real64(g)
            m.copy_(b1 * m + (1 - b1) * g)
            v.copy_(b2 * v + (1 - b2) * g * g)
            denom = v.sqrt() / math.sqrt(1 - b2**t) + self.eps
            p = (b1 * m + (1 - b1) * g) / denom if self.nesterov else m / denom
            view = reference_view(w, g, self.delta, self.eps, self.scale_invariant)
            ratio = 1.0
            if view is not None:
                p = reference_project(w, p, view, self.eps)
                ratio = self.wd_ratio
            views.append(view)
            w.copy_(w * (1 - lr * self.weight_decay * ratio) - lr / (1 - b1**t) * p)
        self.views.append(views)


class ReferenceSGDP:
    """SGDP in float64; ``project_momentum`` stores the projected buffer (the official quirk).

    Complex tensors are stepped as their real views; ``maximize`` negates the gradients."""

    def __init__(self, params: Sequence[Tensor], *, lr: float, momentum: float,
                 dampening: float, weight_decay: float, nesterov: bool, eps: float,
                 delta: float, wd_ratio: float, project_momentum: bool = False,
                 scale_invariant: object = "auto", maximize: bool = False) -> None:
        self.params = [as_real64(p) for p in params]
        self.buffers = [torch.zeros_like(p) for p in self.params]
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.nesterov, self.eps = weight_decay, nesterov, eps
        self.delta, self.wd_ratio = delta, wd_ratio
        self.project_momentum, self.scale_invariant = project_momentum, scale_invariant
        self.maximize = maximize
        self.views: list[list[str | None]] = []

    def step(self, grads: Sequence[Tensor]) -> None:
        mu, lr = self.momentum, self.lr
        views = []
        for w, g, buf in zip(self.params, grads, self.buffers, strict=True):
            g = -as_real64(g) if self.maximize else as_real64(g)
            buf.copy_(mu * buf + (1 - self.dampening) * g)
            p = g + mu * buf if self.nesterov else buf.clone()
            view = reference_view(w, g, self.delta, self.eps, self.scale_invariant)
            ratio = 1.0
            if view is not None:
                p = reference_project(w, p, view, self.eps)
                ratio = self.wd_ratio
                if self.project_momentum and not self.nesterov:
                    buf.copy_(p)
            views.append(view)
            w.copy_(w * (1 - lr * self.weight_decay * ratio / (1 - mu)) - lr * p)
        self.views.append(views)


def _tangential_rows(r: Tensor, w: Tensor) -> Tensor:
    """``r_i - w_i <w_i, r_i> / |w_i|^2`` for each output channel (float64, ``[n, d]``)."""
    w_rows, r_rows = rows(w, "channel"), rows(r, "channel")
    coef = (w_rows * r_rows).sum(dim=1, keepdim=True) / (w_rows * w_rows).sum(dim=1, keepdim=True)
    return r_rows - coef * w_rows


def make_grad(w: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """A gradient for ``w`` (same shape and dtype, contiguous) of the given ``kind``.

    ``w`` must have at least 2 rows of length >= 2 for the kinds ``"channel"``, ``"layer"`` and
    ``"none"``. With ``t_i`` a random vector orthogonal to ``w_i`` and ``c`` a random scale:

    * ``"channel"``: ``g_i = c t_i``; every row cosine is 0 (up to round-off).
    * ``"layer"``: ``g_i = c (t_i / |t_i| + s_i w_i / |w_i|) / |w_i|`` with signs ``s_i = +1, -1,
      +1, ...`` (0 for the last of an odd count), so ``<g, w> = c sum_i s_i = 0`` while rows
      with ``s_i != 0`` have cosine ``1 / sqrt(2)``.
    * ``"none"``: ``g_i = c (w_i + |w_i| t_i / |t_i|)``: every row cosine and the whole-tensor
      cosine are ``1 / sqrt(2)``.
    * ``"random"``: ``c`` times a standard Gaussian tensor.
    """
    shape = w.shape
    scale = 10 ** (torch.rand((), generator=generator, dtype=torch.float64).item() * 2 - 1)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "random" or w.dim() < 2:
        return (scale * noise).to(w.dtype)
    w64 = w.detach().double().contiguous()
    w_rows = rows(w64, "channel")
    w_norms = w_rows.norm(dim=1, keepdim=True)
    tangent = _tangential_rows(noise, w64)
    if kind == "channel":
        g_rows = tangent
    elif kind == "layer":
        n = w_rows.shape[0]
        signs = torch.tensor([(-1.0) ** i for i in range(n)], dtype=torch.float64)
        if n % 2:
            signs[-1] = 0.0
        unit_tangent = tangent / tangent.norm(dim=1, keepdim=True)
        g_rows = (unit_tangent + signs[:, None] * w_rows / w_norms) / w_norms
    elif kind == "none":
        unit_tangent = tangent / tangent.norm(dim=1, keepdim=True)
        g_rows = w_rows + w_norms * unit_tangent
    else:
        raise ValueError(f"unknown gradient kind {kind!r}; allowed: {KINDS}")
    return (scale * g_rows).reshape(shape).to(w.dtype)


# ---------------------------------------------------------------------------------------------
# Driving several optimizers on the same gradients


def initial_params(shapes: Sequence[tuple[int, ...]], seed: int) -> list[Tensor]:
    """Seeded float32 Gaussian tensors of ``shapes`` (contiguous)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def copy_params(params: Sequence[Tensor], channels_last: Sequence[bool] = ()) -> list[Tensor]:
    """Fresh leaf copies of ``params``; entry ``i`` is channels_last where ``channels_last[i]``."""
    flags = list(channels_last) + [False] * (len(params) - len(channels_last))
    return [
        p.detach().clone(
            memory_format=torch.channels_last if flag else torch.contiguous_format
        ).requires_grad_(True)
        for p, flag in zip(params, flags, strict=True)
    ]


class Driven:
    """An optimizer over ``params``; ``step(grads)`` installs ``grads`` (in each param's memory
    format) as ``.grad`` and steps. The float64 references have the same ``params``/``step``."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> None:
        self.optimizer, self.params = optimizer, list(params)

    def step(self, grads: Sequence[Tensor]) -> None:
        for p, g in zip(self.params, grads, strict=True):
            p.grad = torch.empty_like(p).copy_(g)
        self.optimizer.step()


def run_lockstep(drivers: Sequence[object], kinds: Sequence[str], steps: int, seed: int,
                 guide: int = 0) -> list[list[Tensor]]:
    """``steps`` steps of every driver on the same float32 gradients, built by
    :func:`make_grad` from the current weights of ``drivers[guide]``; returns the gradients."""
    generator = torch.Generator().manual_seed(seed)
    stream = []
    for _ in range(steps):
        guide_params = drivers[guide].params  # type: ignore[attr-defined]
        grads = [
            make_grad(w.detach(), kind, generator).float()
            for w, kind in zip(guide_params, kinds, strict=True)
        ]
        replay(drivers, [grads])
        stream.append(grads)
    return stream


def replay(drivers: Sequence[object], stream: Sequence[Sequence[Tensor]]) -> None:
    """One step of every driver per entry of ``stream`` (a list of gradients per step)."""
    for grads in stream:
        for driver in drivers:
            driver.step(grads)  # type: ignore[attr-defined]


def record_official_views(optimizer: torch.optim.Optimizer) -> dict[int, list[str | None]]:
    """Log, per parameter, the view the official ``adamp`` optimizer projected on at each step.

    Wraps the instance's ``_projection`` (called for every tensor with ``dim() > 1``) and asks
    :func:`scaleinv.projection.select_view` about the very inputs the official code received.
    """
    from scaleinv.projection import select_view

    log: dict[int, list[str | None]] = {}
    original = optimizer._projection  # type: ignore[attr-defined]

    def projection(p, grad, perturb, delta, wd_ratio, eps):  # noqa: ANN001, ANN202
        view = select_view(p.data, grad, "auto", delta, eps)
        log.setdefault(id(p), []).append(view)
        return original(p, grad, perturb, delta, wd_ratio, eps)

    optimizer._projection = projection  # type: ignore[attr-defined]
    return log


@contextlib.contextmanager
def record_projected(module: object) -> Iterator[dict[int, list[bool]]]:
    """Log, per parameter (by ``data_ptr``), whether the sync-free body of ``module``
    (``scaleinv.adamp`` or ``scaleinv.sgdp``) projected it at each step."""
    log: dict[int, list[bool]] = {}
    original = module.radial_coefficients  # type: ignore[attr-defined]

    def radial_coefficients(weights, grads, updates, **kwargs):  # noqa: ANN001, ANN202
        coefficients, projected = original(weights, grads, updates, **kwargs)
        for w, flag in zip(weights, projected, strict=True):
            log.setdefault(w.data_ptr(), []).append(bool(flag))
        return coefficients, projected

    with mock.patch.object(module, "radial_coefficients", radial_coefficients):
        yield log


# ---------------------------------------------------------------------------------------------
# Comparing trajectories

FLOAT32_EPS = torch.finfo(torch.float32).eps
ULPS_PER_STEP = 4


def round_off_tolerance(steps: int) -> float:
    """Relative tolerance for two float32 trajectories that differ only in operation order.

    Each step rounds every element a bounded number of times; re-ordered sums, ``w * s`` against
    ``u <u, p>`` in the projection and fused decay factors move each rounding by a few ulps of
    the largest value involved, and the errors add up over steps (the gradients do not feed them
    back: they are built from one shared trajectory). Measured: about 9 ulps of ``max|w|`` after
    30 steps of AdamP; we allow ``ULPS_PER_STEP = 4`` ulps per step.
    """
    return ULPS_PER_STEP * steps * FLOAT32_EPS


def dtype_tolerance(dtype: torch.dtype, steps: int) -> float:
    """:func:`round_off_tolerance` in ulps of ``dtype`` (of its real part if complex)."""
    real = dtype.to_real() if dtype.is_complex else dtype
    return ULPS_PER_STEP * steps * torch.finfo(real).eps


def assert_dtype_close(actual: Tensor, expected: Tensor, steps: int,
                       dtype: torch.dtype | None = None, scale: float = 0.0) -> None:
    """``actual`` (any dtype; complex as its real view) against a float64 ``expected``: NaN at
    the same elements, infinities equal, and the finite elements within
    ``tol * (|expected| + max(max|expected|, scale))``, ``tol = dtype_tolerance(dtype,
    steps)``; ``scale``: the largest value the step rounded on the way (e.g. the weights
    before it, where the step cancels them)."""
    dtype = actual.dtype if dtype is None else dtype
    actual = as_real64(actual)
    expected = expected.detach().double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    finite = expected.isfinite()
    tol = dtype_tolerance(dtype, steps)
    largest = expected[finite].abs().max().item() if finite.any() else 0.0
    scale = max(largest, scale, FLOAT32_EPS)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, equal_nan=True)


def assert_round_off_close(actual: Tensor, expected: Tensor, steps: int) -> None:
    """``|actual - expected| <= tol * (|expected| + max|expected|)`` elementwise (any dtype)."""
    tol = round_off_tolerance(steps)
    expected = expected.detach().to(actual.dtype)
    scale = max(expected.abs().max().item(), FLOAT32_EPS)
    torch.testing.assert_close(actual.detach(), expected, rtol=tol, atol=tol * scale)


# ---------------------------------------------------------------------------------------------
# Layouts of parameters and checks of the branches taken


@st.composite
def multi_dim_shape(draw: st.DrawFn, dims: int | None = None) -> tuple[int, ...]:
    """A 2-D, 3-D or 4-D (conv) shape with at least 2 rows of length at least 2."""
    dims = draw(st.sampled_from([2, 3, 4])) if dims is None else dims
    n = draw(st.integers(2, 6))
    if dims == 2:
        return (n, draw(st.integers(2, 10)))
    if dims == 3:
        return (n, draw(st.integers(1, 4)), draw(st.integers(2, 5)))
    k = draw(st.sampled_from([1, 2, 3]))
    return (n, draw(st.integers(2, 4)), k, k)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[tuple[int, ...]], list[str], list[bool]]:
    """Shapes, gradient kinds and channels_last flags: a bias, one tensor of every kind and
    one channels_last conv weight whose branch is known."""
    shapes: list[tuple[int, ...]] = [(draw(st.integers(1, 8)),)]
    kinds = ["random"]
    channels_last = [False]
    for kind in ("channel", "layer", "none", "random"):
        shape = draw(multi_dim_shape())
        shapes.append(shape)
        kinds.append(kind)
        channels_last.append(len(shape) == 4 and draw(st.booleans()))
    shapes.append(draw(multi_dim_shape(dims=4)))
    kinds.append(draw(st.sampled_from(["channel", "layer", "none"])))
    channels_last.append(True)
    return shapes, kinds, channels_last


def check_branches(official_log: dict[int, list], foreach_log: dict[int, list[bool]],
                   official_params: list[torch.Tensor], foreach_params: list[torch.Tensor],
                   kinds: list[str], steps: int) -> None:
    """Every built gradient took its branch in the official run at every step, and the
    sync-free body projected exactly when the official code did."""
    for w_official, w_foreach, kind in zip(official_params, foreach_params, kinds, strict=True):
        if w_official.dim() < 2:
            assert id(w_official) not in official_log
            assert w_foreach.data_ptr() not in foreach_log
            continue
        views = official_log[id(w_official)]
        assert len(views) == steps
        if kind in EXPECTED_VIEW:
            assert views == [EXPECTED_VIEW[kind]] * steps, kind
        assert foreach_log[w_foreach.data_ptr()] == [v is not None for v in views]
