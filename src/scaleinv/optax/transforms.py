"""AdamP and SGDP as optax transformations, and the projection for any optax chain.

``scale_by_adamp`` and ``scale_by_sgdp`` return the update *direction* (the decoupled weight
decay included), to be scaled by ``-learning_rate`` as in ``optax.adamw``'s chain; ``adamp`` and
``sgdp`` are those chains. ``project`` wraps any transformation. Each parameter's options
``scale_invariant`` and ``channel_axis`` are given as one value, a pytree (a prefix of the
params' structure) or a callable of the params, like optax masks; they are read while tracing.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from scaleinv.optax._options import (
    check_learning_rate,
    check_number,
    check_option_value,
    per_leaf,
)
from scaleinv.optax.projection import (
    ScaleInvariant,
    compute_dtype,
    is_candidate,
    project_radial,
    validate_channel_axis,
)

__all__ = [
    "ScaleByAdamPState",
    "ScaleBySGDPState",
    "adamp",
    "project",
    "scale_by_adamp",
    "scale_by_sgdp",
    "sgdp",
]

Option = Any  # a value, a pytree of values or a callable of the params


class _Plan(NamedTuple):
    """What to do with one parameter: ``None`` (never projected) or its annotation and axis."""

    scale_invariant: ScaleInvariant
    channel_axis: int


def _plans(params: Any, treedef: Any, scale_invariant: Option,
           channel_axis: Option) -> list[_Plan | None]:
    plans: list[_Plan | None] = []
    modes = per_leaf("scale_invariant", scale_invariant, params, treedef)
    axes = per_leaf("channel_axis", channel_axis, params, treedef)
    for w, mode, axis in zip(treedef.flatten_up_to(params), modes, axes, strict=True):
        shape = tuple(w.shape)
        if jnp.iscomplexobj(w):
            raise TypeError(f"complex parameters are not supported (a parameter of shape {shape})")
        if mode in ("channel", "layer") and len(shape) < 2:
            raise ValueError(
                f"scale_invariant={mode!r} was given for a parameter of shape {shape}; only "
                "arrays with at least 2 dimensions can be projected. Give 1-D parameters "
                "'auto' or False (scale_invariant takes a pytree or a callable of the params)."
            )
        if mode is False or not is_candidate(shape):
            plans.append(None)
        else:
            plans.append(_Plan(mode, validate_channel_axis(axis, shape)))
    return plans


def _project(w: jax.Array, g: jax.Array, p: jax.Array, plan: _Plan | None, *, delta: Any,
             eps: Any, wd_ratio: Any) -> tuple[jax.Array, jax.Array | float]:
    """``(p, r)``: ``p`` projected where ``plan`` says so, and the weight-decay factor ``r``
    (``wd_ratio`` where projected, else 1)."""
    if plan is None:
        return p, 1.0
    p, projected = project_radial(
        w, g, p, scale_invariant=plan.scale_invariant, channel_axis=plan.channel_axis,
        delta=delta, eps=eps,
    )
    ratio = jnp.where(projected, jnp.asarray(wd_ratio, p.dtype), jnp.asarray(1, p.dtype))
    return p, ratio


def _is_zero(value: Any) -> bool:
    return isinstance(value, numbers.Real) and value == 0


def _decayed(p: jax.Array, w: jax.Array, weight_decay: Any, ratio: Any) -> jax.Array:
    """``p + weight_decay r w`` (``p`` itself when the decay is a literal 0)."""
    return p if _is_zero(weight_decay) else p + (weight_decay * ratio) * w


def _bias_correction(decay: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``1 - decay^count`` as ``-expm1(count log(decay))``: ``1 - 0.999`` in float32 is off by
    1e-5 relative, the log taken in Python double is not."""
    if isinstance(decay, numbers.Real):
        log_decay = math.log(decay) if decay > 0 else -math.inf
    else:
        log_decay = jnp.log(jnp.asarray(decay, dtype))
    return -jnp.expm1(count.astype(dtype) * log_decay)


def _need_params(params: Any, name: str) -> None:
    if params is None:
        raise ValueError(f"{name} needs the params: call update(updates, state, params)")


def _check_projection_options(delta: Any, wd_ratio: Any, eps: Any, weight_decay: Any,
                              scale_invariant: Option, channel_axis: Option) -> None:
    check_number("eps", eps, low=0.0)
    check_number("weight_decay", weight_decay, low=0.0)
    check_number("delta", delta, low=0.0, low_open=True)
    check_number("wd_ratio", wd_ratio, low=0.0, high=1.0, high_open=False)
    check_option_value("scale_invariant", scale_invariant)
    check_option_value("channel_axis", channel_axis)


class ScaleByAdamPState(NamedTuple):
    """State of :func:`scale_by_adamp`: the step count and the moments (float32 for 16-bit
    params)."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adamp(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
    delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False, *,
    scale_invariant: Option = "auto", channel_axis: Option = -1,
) -> optax.GradientTransformation:
    r"""AdamP's direction: scaled by ``-lr`` it is the step of ``scaleinv.AdamP``.

    Per parameter ``w`` with gradient ``g``::

        m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2 ;  t += 1
        p = m / (sqrt(v) / sqrt(1 - b2^t) + eps)     (nesterov: b1 m + (1 - b1) g for m)
        p, r = project(w, g, p)                        # r = wd_ratio if projected else 1
        update = p / (1 - b1^t) + weight_decay r w
    """
    for name, value in (("b1", b1), ("b2", b2)):
        check_number(name, value, low=0.0, high=1.0)
    _check_projection_options(delta, wd_ratio, eps, weight_decay, scale_invariant, channel_axis)

    def init_fn(params: optax.Params) -> ScaleByAdamPState:
        zeros = jax.tree.map(lambda w: jnp.zeros(w.shape, compute_dtype(w.dtype)), params)
        return ScaleByAdamPState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.copy, zeros))

    def update_fn(updates: optax.Updates, state: ScaleByAdamPState,
                  params: optax.Params | None = None) -> tuple[optax.Updates, ScaleByAdamPState]:
        _need_params(params, "scale_by_adamp")
        grads, treedef = jax.tree.flatten(updates)
        weights = treedef.flatten_up_to(params)
        plans = _plans(params, treedef, scale_invariant, channel_axis)
        count = optax.safe_int32_increment(state.count)
        out, mus, nus = [], [], []
        for w, g, m, v, plan in zip(weights, grads, treedef.flatten_up_to(state.mu),
                                    treedef.flatten_up_to(state.nu), plans, strict=True):
            dtype = m.dtype
            w, g = w.astype(dtype), g.astype(dtype)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g  # not g * g: XLA would share it with the test's
            denom = jnp.sqrt(v) / jnp.sqrt(_bias_correction(b2, count, dtype)) + eps
            p = (b1 * m + (1 - b1) * g) / denom if nesterov else m / denom
            p, ratio = _project(w, g, p, plan, delta=delta, eps=eps, wd_ratio=wd_ratio)
            out.append(_decayed(p / _bias_correction(b1, count, dtype), w, weight_decay, ratio))
            mus.append(m)
            nus.append(v)
        new_state = ScaleByAdamPState(count, treedef.unflatten(mus), treedef.unflatten(nus))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleBySGDPState(NamedTuple):
    """State of :func:`scale_by_sgdp`: the momentum buffer (float32 for 16-bit params)."""

    momentum: optax.Updates


def scale_by_sgdp(
    momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
    nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1, wd_ratio: float = 0.1, *,
    project_momentum: bool = False, scale_invariant: Option = "auto", channel_axis: Option = -1,
) -> optax.GradientTransformation:
    r"""SGDP's direction: scaled by ``-lr`` it is the step of ``scaleinv.SGDP``.

    Per parameter ``w`` with gradient ``g`` (the buffer starts at zero)::

        buf = momentum buf + (1 - dampening) g
        p = g + momentum buf if nesterov else buf
        p, r = project(w, g, p)                       # r = wd_ratio if projected else 1
        update = p + weight_decay r w / (1 - momentum)

    ``project_momentum=True`` (without nesterov) stores the projected ``p`` as the buffer, as
    the official ``adamp`` code does; the default projects only the update, as the paper does.
    """
    check_number("momentum", momentum, low=0.0, high=1.0)
    check_number("dampening", dampening, low=0.0, high=1.0, high_open=False)
    _check_projection_options(delta, wd_ratio, eps, weight_decay, scale_invariant, channel_axis)
    if nesterov and ((isinstance(momentum, numbers.Real) and momentum <= 0)
                     or (isinstance(dampening, numbers.Real) and dampening != 0)):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
    project_buffer = project_momentum and not nesterov

    def init_fn(params: optax.Params) -> ScaleBySGDPState:
        return ScaleBySGDPState(
            jax.tree.map(lambda w: jnp.zeros(w.shape, compute_dtype(w.dtype)), params)
        )

    def update_fn(updates: optax.Updates, state: ScaleBySGDPState,
                  params: optax.Params | None = None) -> tuple[optax.Updates, ScaleBySGDPState]:
        _need_params(params, "scale_by_sgdp")
        grads, treedef = jax.tree.flatten(updates)
        weights = treedef.flatten_up_to(params)
        plans = _plans(params, treedef, scale_invariant, channel_axis)
        decay = weight_decay / (1 - momentum)
        out, bufs = [], []
        for w, g, buf, plan in zip(weights, grads, treedef.flatten_up_to(state.momentum), plans,
                                   strict=True):
            dtype = buf.dtype
            w, g = w.astype(dtype), g.astype(dtype)
            buf = momentum * buf + (1 - dampening) * g
            p = g + momentum * buf if nesterov else buf
            p, ratio = _project(w, g, p, plan, delta=delta, eps=eps, wd_ratio=wd_ratio)
            out.append(_decayed(p, w, decay, ratio))
            bufs.append(p if project_buffer else buf)
        return treedef.unflatten(out), ScaleBySGDPState(treedef.unflatten(bufs))

    return optax.GradientTransformation(init_fn, update_fn)


def adamp(
    learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1,
    nesterov: bool = False, *, scale_invariant: Option = "auto", channel_axis: Option = -1,
) -> optax.GradientTransformation:
    """AdamP (Heo et al., ICLR 2021): the step of ``scaleinv.AdamP``, channel axis last by
    default (Flax/Haiku layout; ``channel_axis=0`` for torch-layout arrays).

    ``optax.chain(scale_by_adamp(...), optax.scale_by_learning_rate(learning_rate))``; the
    weight decay is decoupled and multiplied by ``learning_rate`` (not by the bias-corrected
    step size) and by ``wd_ratio`` on projected parameters.
    """
    check_learning_rate(learning_rate)
    return optax.chain(
        scale_by_adamp(b1, b2, eps, weight_decay, delta, wd_ratio, nesterov,
                       scale_invariant=scale_invariant, channel_axis=channel_axis),
        optax.scale_by_learning_rate(learning_rate),
    )


def sgdp(
    learning_rate: optax.ScalarOrSchedule, momentum: float = 0.0, dampening: float = 0.0,
    weight_decay: float = 0.0, nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1,
    wd_ratio: float = 0.1, *, project_momentum: bool = False, scale_invariant: Option = "auto",
    channel_axis: Option = -1,
) -> optax.GradientTransformation:
    """SGDP (Heo et al., ICLR 2021): the step of ``scaleinv.SGDP`` (``project_momentum`` as
    there), channel axis last by default.

    ``optax.chain(scale_by_sgdp(...), optax.scale_by_learning_rate(learning_rate))``; the decay
    is decoupled, ``w <- w (1 - lr weight_decay r / (1 - momentum))``.
    """
    check_learning_rate(learning_rate)
    return optax.chain(
        scale_by_sgdp(momentum, dampening, weight_decay, nesterov, eps, delta, wd_ratio,
                      project_momentum=project_momentum, scale_invariant=scale_invariant,
                      channel_axis=channel_axis),
        optax.scale_by_learning_rate(learning_rate),
    )


def project(
    inner: optax.GradientTransformation, *, weight_decay: float = 0.0, delta: float = 0.1,
    wd_ratio: float = 0.1, eps: float = 1e-8, scale_invariant: Option = "auto",
    channel_axis: Option = -1,
) -> optax.GradientTransformation:
    r"""``inner`` with the radial part of its updates removed on scale-invariant parameters.

    The analogue of ``scaleinv.project`` for optax. With ``g`` the gradients this wrapper
    receives (the cosine test reads them) and ``u`` the updates of ``inner``::

        u, r = project(w, g, u)                       # r = wd_ratio if projected else 1
        update = u + weight_decay r w

    ``weight_decay`` follows ``optax.add_decayed_weights``: place the wrapper before
    ``optax.scale_by_learning_rate`` so that the decay is decoupled and scaled by the learning
    rate, e.g. ``optax.chain(project(optax.scale_by_adam(), weight_decay=1e-2),
    optax.scale_by_learning_rate(1e-3))`` is AdamP without nesterov. A decay *inside* ``inner``
    (``optax.add_decayed_weights``, ``optax.adamw``) is radial and is projected away on the
    projected parameters (they are not decayed at all); one placed after the wrapper decays every
    parameter in full. The state is ``inner``'s.
    """
    _check_projection_options(delta, wd_ratio, eps, weight_decay, scale_invariant, channel_axis)

    def update_fn(updates: optax.Updates, state: optax.OptState,
                  params: optax.Params | None = None) -> tuple[optax.Updates, optax.OptState]:
        _need_params(params, "project")
        inner_updates, state = inner.update(updates, state, params)
        grads, treedef = jax.tree.flatten(updates)
        weights = treedef.flatten_up_to(params)
        plans = _plans(params, treedef, scale_invariant, channel_axis)
        out = []
        for w, g, u, plan in zip(weights, grads, treedef.flatten_up_to(inner_updates), plans,
                                 strict=True):
            dtype = compute_dtype(w.dtype)
            p, ratio = _project(w.astype(dtype), g.astype(dtype), u.astype(dtype), plan,
                                delta=delta, eps=eps, wd_ratio=wd_ratio)
            out.append(_decayed(p, w.astype(dtype), weight_decay, ratio).astype(u.dtype))
        return treedef.unflatten(out), state

    return optax.GradientTransformation(inner.init, update_fn)
