"""Views, the invariance test and the radial projection (``docs/contract.md``).

Everything in scaleinv that decides whether a tensor is scale-invariant, or removes the radial
part of an update, calls this module. It has two forms of the same maths:

* the *reference* form (:func:`select_view`, :func:`project_radial_`) follows the official
  ``adamp`` 0.3.0 code operation for operation and decides on the host (one sync per test);
* the *sync-free* form (:func:`radial_coefficients`) makes the same decision on the device with
  ``torch.where``, so a step built on it never waits for the device and traces under
  ``torch.compile(fullgraph=True)``.

Both describe the projected update as ``p - w * s`` with one scalar ``s_i`` per row of the
chosen view: ``s_i = <w_i, p_i> / (|w_i| + eps)^2``. Row sums, cosines and the threshold
comparison run in :func:`accumulation_dtype` (float32 for 16-bit tensors, float64 for
float64), as ``docs/contract.md`` states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from scaleinv.distributed import is_dtensor, rows_max

View = Literal["channel", "layer"]
ScaleInvariant = Literal["auto", "channel", "layer"] | bool

VIEWS: tuple[View, ...] = ("channel", "layer")
SCALE_INVARIANT_CHOICES: tuple[object, ...] = ("auto", "channel", "layer", False)


def channel_view(x: Tensor) -> Tensor:
    """``x`` as ``[n, numel / n]``: one row per output channel."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def layer_view(x: Tensor) -> Tensor:
    """``x`` as ``[1, numel]``: the whole tensor as one row."""
    return x.reshape(1, -1)


VIEW_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "channel": channel_view,
    "layer": layer_view,
}


def row_length(x: Tensor, view: View) -> int:
    """Length ``d_V`` of one row of ``x`` under ``view``."""
    return x.numel() // x.shape[0] if view == "channel" else x.numel()


def threshold(x: Tensor, view: View, delta: float) -> float:
    """The invariance threshold ``delta / sqrt(d_V)`` of ``x`` under ``view``."""
    return delta / math.sqrt(row_length(x, view))


def validate_scale_invariant(value: object) -> ScaleInvariant:
    """Return ``value`` if it is a valid ``scale_invariant`` annotation, else raise."""
    if isinstance(value, bool):
        if value:
            raise ValueError(
                "scale_invariant=True is ambiguous: use 'channel' (per output channel) or "
                "'layer' (whole tensor); allowed: 'auto', 'channel', 'layer', False"
            )
        return False
    if value not in ("auto", "channel", "layer"):
        raise ValueError(
            f"Invalid scale_invariant: {value!r}; allowed: 'auto', 'channel', 'layer', False"
        )
    return value


def max_cosine(w: Tensor, g: Tensor, view: View, eps: float) -> Tensor:
    """``max_i |cos(g_i, w_i)|`` over the rows of ``view`` (a 0-dim tensor).

    ``cos_i = <g_i, w_i> / (max(|g_i|, eps) * max(|w_i|, eps))``.
    """
    as_view = VIEW_FUNCTIONS[view]
    dtype = accumulation_dtype(w.dtype)
    return rows_max(F.cosine_similarity(as_view(g).to(dtype), as_view(w).to(dtype), dim=1,
                                        eps=eps).abs_())


def select_view(
    w: Tensor, g: Tensor, scale_invariant: ScaleInvariant, delta: float, eps: float
) -> View | None:
    """The view whose rows the update of ``w`` is projected on, or ``None``.

    Tensors with ``dim() < 2`` are never projected. An annotation (``"channel"``, ``"layer"``,
    ``False``) is taken as given; ``"auto"`` runs the cosine test: the first view of
    (channel, layer) with ``max_i |cos(g_i, w_i)| < delta / sqrt(d_V)`` is chosen. This is the
    reference form: each test reads one number back to the host.
    """
    if w.dim() < 2 or w.numel() == 0 or scale_invariant is False:
        return None
    if scale_invariant != "auto":
        return scale_invariant  # type: ignore[return-value]
    if is_dtensor(w):  # rows sharded across ranks: the layer view cannot be flattened locally
        use_channel, use_layer = invariance_flags(
            w, g, scale_invariant="auto", delta=delta, eps=eps
        )
        return "channel" if use_channel else "layer" if use_layer else None
    for view in VIEWS:
        if max_cosine(w, g, view, eps) < threshold(w, view, delta):
            return view
    return None


def project_radial_(update: Tensor, w: Tensor, view: View, eps: float) -> Tensor:
    """Remove the radial part of ``update`` in place, row by row of ``view``.

    ``u_i = w_i / (|w_i| + eps)``, ``update_i <- update_i - u_i <u_i, update_i>``.
    """
    if view == "layer" and is_dtensor(w):  # rows sharded: sum the row statistics instead
        (coefficient,), _ = radial_coefficients(
            [w], [w], [update], scale_invariant="layer", delta=1.0, eps=eps
        )
        return update.sub_(w * coefficient)
    as_view = VIEW_FUNCTIONS[view]
    expand = (-1,) + (1,) * (w.dim() - 1)
    unit = w / as_view(w).norm(dim=1).reshape(expand).add_(eps)
    update.sub_(unit * as_view(unit * update).sum(dim=1).reshape(expand))
    return update


def _rowwise_dot(a: Tensor, b: Tensor) -> Tensor:
    dtype = accumulation_dtype(a.dtype)
    dots: Tensor = torch.linalg.vecdot(channel_view(a).to(dtype), channel_view(b).to(dtype))
    return dots


def _row_norms(x: Tensor) -> Tensor:
    norms: Tensor = torch.linalg.vector_norm(
        channel_view(x), dim=1, dtype=accumulation_dtype(x.dtype))
    return norms


def _channel_coefficients(wp: Tensor, w_norm: Tensor, eps: float) -> Tensor:
    """``s_i = <w_i, p_i> / (|w_i| + eps)^2`` from the row dot products and norms."""
    return wp / (w_norm + eps).square()


def _layer_coefficient(wp: Tensor, w_norm: Tensor, eps: float) -> Tensor:
    """``s = <w, p> / (|w| + eps)^2`` (0-dim) from the row dot products and norms."""
    return wp.sum() / (w_norm.square().sum().sqrt() + eps).square()


def invariance_flags(
    w: Tensor,
    g: Tensor,
    *,
    scale_invariant: ScaleInvariant,
    delta: float,
    eps: float,
    w_norm: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sync-free :func:`select_view` for one tensor with ``dim() >= 2``.

    Returns 0-dim bools ``(use_channel, use_layer)``, at most one true: the annotation if one is
    given (``False``: neither), else the cosine test (channel view first, then layer view).
    ``w_norm``, the row norms ``|w_i|`` of the channel view, saves a pass when the caller has it.
    """
    if scale_invariant is not False and scale_invariant != "auto":
        given = torch.ones((), dtype=torch.bool, device=w.device)
        return (given, ~given) if scale_invariant == "channel" else (~given, given)
    if scale_invariant is False or w.numel() == 0:  # an empty tensor is never projected
        false = torch.zeros((), dtype=torch.bool, device=w.device)
        return false, false
    if w_norm is None:
        w_norm = _row_norms(w)
    g_norm = _row_norms(g)
    gw = _rowwise_dot(g, w)
    channel_cos = gw.abs() / (g_norm.clamp_min(eps) * w_norm.clamp_min(eps))
    # a NaN cosine fails the test; as +inf it also survives a max that drops NaN (inductor's)
    channel_cos = channel_cos.nan_to_num(nan=math.inf, posinf=math.inf)
    layer_g_norm = g_norm.square().sum().sqrt()
    layer_w_norm = w_norm.square().sum().sqrt()
    layer_cos = gw.sum().abs() / (layer_g_norm.clamp_min(eps) * layer_w_norm.clamp_min(eps))
    use_channel = rows_max(channel_cos) < threshold(w, "channel", delta)
    use_layer = ~use_channel & (layer_cos < threshold(w, "layer", delta))
    return use_channel, use_layer


def radial_coefficients(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    updates: Sequence[Tensor],
    *,
    scale_invariant: ScaleInvariant,
    delta: float,
    eps: float,
    flags: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Sync-free invariance test and projection coefficients for tensors with ``dim() >= 2``.

    For each ``w`` (with gradient ``g`` and update ``p``) returns ``s`` shaped ``[n, 1, ...]``
    such that ``p - w * s`` is the projected update, and a 0-dim bool ``projected``:

    * channel view passes: ``s_i = <w_i, p_i> / (|w_i| + eps)^2``;
    * otherwise layer view passes: ``s_i = <w, p> / (|w| + eps)^2`` for every row;
    * neither: ``s = 0``, ``projected = False``.

    The decision is a ``torch.where`` on the device; nothing is read back to the host.
    ``flags``, one ``(use_channel, use_layer)`` pair per tensor from :func:`invariance_flags`,
    replaces the test (``grads`` is then not read): a decision made before ``w`` changed.
    """
    coefficients: list[Tensor] = []
    projected: list[Tensor] = []
    for i, (w, g, p) in enumerate(zip(weights, grads, updates, strict=True)):
        expand = (-1,) + (1,) * (w.dim() - 1)
        w_norm = _row_norms(w)
        wp = _rowwise_dot(w, p)
        if flags is not None:
            use_channel, use_layer = flags[i]
        else:
            use_channel, use_layer = invariance_flags(
                w, g, scale_invariant=scale_invariant, delta=delta, eps=eps, w_norm=w_norm
            )
        # The view known on the host saves launches in eager mode (compiled, kernels are fused
        # anyway, and this graph once tripped inductor: KeyError in its loop body, torch 2.13).
        if flags is None and scale_invariant == "channel" and not torch.compiler.is_compiling():
            coef = _channel_coefficients(wp, w_norm, eps)
        else:
            # a tensor, not 0.0: a Python number would make DTensor redistribute (FSDP2)
            zero = torch.zeros((), dtype=wp.dtype, device=w.device)
            coef = torch.where(use_channel, _channel_coefficients(wp, w_norm, eps),
                               torch.where(use_layer, _layer_coefficient(wp, w_norm, eps), zero))
        coefficients.append(coef.reshape(expand))
        projected.append(use_channel | use_layer)
    return coefficients, projected


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype row sums, comparisons and scalar factors use for ``dtype`` tensors: float64
    for float64, float32 for float32 and the 16-bit types."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_decay_ratio(projected: Tensor, wd_ratio: float, dtype: torch.dtype) -> Tensor:
    """``r = wd_ratio`` where ``projected`` else ``1``: a 0-dim tensor on ``projected``'s device
    (no host read) in :func:`accumulation_dtype` of ``dtype``, so that the decay factor
    ``1 - lr weight_decay r`` is formed at the tensor's precision."""
    one = torch.ones((), dtype=accumulation_dtype(dtype), device=projected.device)
    return torch.where(projected, wd_ratio, one)


def cautious_(update: Tensor, grad: Tensor, w: Tensor, view: View | None, eps: float) -> Tensor:
    """The cautious update (Liang et al., 2024; timm's ``caution=True``), in place.

    Entries of ``update`` whose sign disagrees with the gradient's are zeroed and the rest
    rescaled by the fraction kept: ``update <- update * m / max(mean(m), 1e-3)`` with
    ``m = [update * d > 0]``. Where ``update`` was projected on ``view`` (the spherical form),
    ``d`` is the gradient with its radial part removed and the result is projected again;
    otherwise ``d = grad``.
    """
    direction = grad if view is None else project_radial_(grad.clone(), w, view, eps)
    mask = (update * direction > 0).to(update.dtype)
    update.mul_(mask.div_(mask.mean().clamp_(min=1e-3)))
    if view is not None:
        project_radial_(update, w, view, eps)
    return update

