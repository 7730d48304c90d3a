"""Views, the invariance test and the radial projection (DESIGN.md section 2).

Everything in scaleinv that decides whether a tensor is scale-invariant, or removes the radial
part of an update, calls this module. It has two forms of the same maths:

* the *reference* form (:func:`select_view`, :func:`project_radial_`) follows the official
  ``adamp`` 0.3.0 code operation for operation and decides on the host (one sync per test);
* the *sync-free* form (:func:`radial_coefficients`) makes the same decision on the device with
  ``torch.where``, so a step built on it never waits for the device and traces under
  ``torch.compile(fullgraph=True)``.

Both describe the projected update as ``p - w * s`` with one scalar ``s_i`` per row of the
chosen view: ``s_i = <w_i, p_i> / (|w_i| + eps)^2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor

View = Literal["channel", "layer"]
ScaleInvariant = Union[Literal["auto", "channel", "layer"], bool]

VIEWS: tuple[View, ...] = ("channel", "layer")
SCALE_INVARIANT_CHOICES: tuple[object, ...] = ("auto", "channel", "layer", False)


def channel_view(x: Tensor) -> Tensor:
    """``x`` as ``[n, numel / n]``: one row per output channel."""
    return x.reshape(x.shape[0], -1)


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
    return value  # type: ignore[return-value]


def max_cosine(w: Tensor, g: Tensor, view: View, eps: float) -> Tensor:
    """``max_i |cos(g_i, w_i)|`` over the rows of ``view`` (a 0-dim tensor).

    ``cos_i = <g_i, w_i> / (max(|g_i|, eps) * max(|w_i|, eps))``.
    """
    as_view = VIEW_FUNCTIONS[view]
    return F.cosine_similarity(as_view(g), as_view(w), dim=1, eps=eps).abs_().max()


def select_view(
    w: Tensor, g: Tensor, scale_invariant: ScaleInvariant, delta: float, eps: float
) -> View | None:
    """The view whose rows the update of ``w`` is projected on, or ``None``.

    Tensors with ``dim() < 2`` are never projected. An annotation (``"channel"``, ``"layer"``,
    ``False``) is taken as given; ``"auto"`` runs the cosine test: the first view of
    (channel, layer) with ``max_i |cos(g_i, w_i)| < delta / sqrt(d_V)`` is chosen. This is the
    reference form: each test reads one number back to the host.
    """
    if w.dim() < 2 or scale_invariant is False:
        return None
    if scale_invariant != "auto":
        return scale_invariant  # type: ignore[return-value]
    for view in VIEWS:
        if max_cosine(w, g, view, eps) < threshold(w, view, delta):
            return view
    return None


def project_radial_(update: Tensor, w: Tensor, view: View, eps: float) -> Tensor:
    """Remove the radial part of ``update`` in place, row by row of ``view``.

    ``u_i = w_i / (|w_i| + eps)``, ``update_i <- update_i - u_i <u_i, update_i>``.
    """
    as_view = VIEW_FUNCTIONS[view]
    expand = (-1,) + (1,) * (w.dim() - 1)
    unit = w / as_view(w).norm(dim=1).reshape(expand).add_(eps)
    update.sub_(unit * as_view(unit * update).sum(dim=1).reshape(expand))
    return update


def _rowwise_dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vecdot(channel_view(a), channel_view(b))


def radial_coefficients(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    updates: Sequence[Tensor],
    *,
    scale_invariant: ScaleInvariant,
    delta: float,
    eps: float,
) -> tuple[list[Tensor], list[Tensor]]:
    """Sync-free invariance test and projection coefficients for tensors with ``dim() >= 2``.

    For each ``w`` (with gradient ``g`` and update ``p``) returns ``s`` shaped ``[n, 1, ...]``
    such that ``p - w * s`` is the projected update, and a 0-dim bool ``projected``:

    * channel view passes: ``s_i = <w_i, p_i> / (|w_i| + eps)^2``;
    * otherwise layer view passes: ``s_i = <w, p> / (|w| + eps)^2`` for every row;
    * neither: ``s = 0``, ``projected = False``.

    The decision is a ``torch.where`` on the device; nothing is read back to the host.
    """
    coefficients: list[Tensor] = []
    projected: list[Tensor] = []
    for w, g, p in zip(weights, grads, updates):
        expand = (-1,) + (1,) * (w.dim() - 1)
        ww = _rowwise_dot(w, w)
        wp = _rowwise_dot(w, p)
        channel_coef = wp / (ww.sqrt() + eps).square()
        layer_coef = wp.sum() / (ww.sum().sqrt() + eps).square()
        if scale_invariant == "channel":
            use_channel = torch.ones((), dtype=torch.bool, device=w.device)
            use_layer = torch.zeros_like(use_channel)
        elif scale_invariant == "layer":
            use_layer = torch.ones((), dtype=torch.bool, device=w.device)
            use_channel = torch.zeros_like(use_layer)
        else:
            gw = _rowwise_dot(g, w)
            gg = _rowwise_dot(g, g)
            w_norm, g_norm = ww.sqrt(), gg.sqrt()
            channel_cos = gw.abs() / (g_norm.clamp_min(eps) * w_norm.clamp_min(eps))
            layer_cos = gw.sum().abs() / (
                gg.sum().sqrt().clamp_min(eps) * ww.sum().sqrt().clamp_min(eps)
            )
            use_channel = channel_cos.amax() < threshold(w, "channel", delta)
            use_layer = ~use_channel & (layer_cos < threshold(w, "layer", delta))
        zero = torch.zeros((), dtype=channel_coef.dtype, device=w.device)
        coef = torch.where(use_channel, channel_coef, torch.where(use_layer, layer_coef, zero))
        coefficients.append(coef.reshape(expand))
        projected.append(use_channel | use_layer)
    return coefficients, projected
