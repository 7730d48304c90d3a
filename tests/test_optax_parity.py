"""``scaleinv.optax.adamp``/``sgdp`` step for step against the torch single-tensor bodies
(``foreach=False``) on identical arrays, the channel axis first (torch layout), last (Flax layout)
or anywhere, with gradients built so that every branch of the cosine test fires; plus the edge
cases of the contract (NaN, zero rows, empty arrays) and the 16-bit and float64 dtypes.

Tolerance: ``reference.round_off_tolerance`` (4 float32 ulps of the largest value per step),
checked after every step.
"""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import scaleinv.optax as sio  # noqa: E402
from reference import (  # noqa: E402
    EXPECTED_VIEW,
    Driven,
    ReferenceAdamP,
    ReferenceSGDP,
    assert_round_off_close,
    copy_params,
    initial_params,
    make_grad,
    multi_dim_shape,
    run_lockstep,
)
from scaleinv import SGDP, AdamP  # noqa: E402
from scaleinv.optax.projection import invariance_flags, is_candidate  # noqa: E402

STEPS = 12
KINDS = ["random", "channel", "layer", "none", "random", "channel"]


def to_jax(t: torch.Tensor, position: int) -> jax.Array:
    """``t`` (torch layout) as a JAX array whose channel axis moved to ``position``."""
    a = t.detach().numpy()
    return jnp.asarray(np.moveaxis(a, 0, position) if a.ndim >= 2 else a)


def to_torch(a: jax.Array, position: int) -> torch.Tensor:
    a = np.asarray(a)
    return torch.from_numpy(np.moveaxis(a, position, 0).copy() if a.ndim >= 2 else a.copy())


class JaxDriver:
    """A jitted optax transformation over JAX copies of torch-layout ``params``; ``step(grads)``
    takes torch-layout gradients. Logs the view the cosine test picks for each parameter.

    ``update``: a jitted ``tx.update`` to reuse (compiling is the slow part on a CPU);
    ``hyperparams``: values for the state of an ``optax.inject_hyperparams`` transformation."""

    def __init__(self, tx, params, positions, *, delta: float, eps: float, update=None,
                 hyperparams=None) -> None:
        self.positions = positions
        self.arrays = [to_jax(p, pos) for p, pos in zip(params, positions, strict=True)]
        self.state = tx.init(self.arrays)
        for name, value in (hyperparams or {}).items():
            assert name in self.state.hyperparams, name
            self.state.hyperparams[name] = jnp.asarray(value, jnp.float32)
        self.update = update or jax.jit(tx.update)
        self.delta, self.eps = delta, eps
        self.views: list[list[str | None]] = []

    @property
    def params(self) -> list[torch.Tensor]:
        return [to_torch(a, pos) for a, pos in zip(self.arrays, self.positions, strict=True)]

    def step(self, grads) -> None:
        g = [to_jax(t, pos) for t, pos in zip(grads, self.positions, strict=True)]
        axes = tuple(pos % w.ndim if is_candidate(w.shape) else None
                     for w, pos in zip(self.arrays, self.positions, strict=True))
        flags = _flags(axes)(self.arrays, g, self.delta, self.eps)
        self.views.append(["channel" if c else "layer" if lay else None for c, lay in flags])
        updates, self.state = self.update(g, self.state, self.arrays)
        self.arrays = optax.apply_updates(self.arrays, updates)


@functools.cache
def _flags(axes: tuple[int | None, ...]):
    """A jitted cosine test of every parameter (``(False, False)`` for 1-D ones)."""
    def flags(ws, gs, delta, eps):
        return [(False, False) if axis is None else
                invariance_flags(w, g, scale_invariant="auto", channel_axis=axis, delta=delta,
                                 eps=eps)
                for w, g, axis in zip(ws, gs, axes, strict=True)]
    return jax.jit(flags)


def positions_for(shapes, layout: str, data) -> list[int]:
    if layout == "first":
        return [0] * len(shapes)
    if layout == "last":
        return [-1] * len(shapes)
    return [data.draw(st.integers(-len(s), len(s) - 1)) if len(s) >= 2 else 0 for s in shapes]


def channel_axis_option(layout: str, positions: list[int]):
    """The option as users give it: one value for the uniform layouts, a pytree otherwise."""
    return {"first": 0, "last": -1}.get(layout, positions)


def lockstep(torch_driver, jax_driver, kinds, seed: int) -> None:
    """``STEPS`` steps of both on the same gradients; parameters compared after every step."""
    for step in range(1, STEPS + 1):
        run_lockstep([torch_driver, jax_driver], kinds, 1, seed + step)
        for expected, actual in zip(torch_driver.params, jax_driver.params, strict=True):
            assert_round_off_close(actual, expected, step)
    for kind, views in zip(kinds, zip(*jax_driver.views, strict=True), strict=True):
        if kind in EXPECTED_VIEW:
            assert list(views) == [EXPECTED_VIEW[kind]] * STEPS, kind


@st.composite
def layout_shapes(draw) -> list[tuple[int, ...]]:
    return [(draw(st.integers(1, 8)),)] + [draw(multi_dim_shape()) for _ in KINDS[1:]]


adamp_hyperparameters = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 0.1),
    "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.99),
    "b2": st.sampled_from([0.999]) | st.floats(0.5, 0.9999),
    "eps": st.sampled_from([1e-8, 1e-6, 1e-4]),
    "weight_decay": st.sampled_from([0.0]) | st.floats(0.0, 0.5),
    # delta <= 0.5: the built cosines (0 or 1/sqrt(2)) stay far from the thresholds.
    "delta": st.floats(0.02, 0.5),
    "wd_ratio": st.floats(0.0, 1.0),
    "nesterov": st.booleans(),
})


@st.composite
def sgdp_hyperparameters(draw) -> dict[str, object]:
    momentum = draw(st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.95))
    nesterov = momentum > 0 and draw(st.booleans())
    return {
        "lr": draw(st.floats(1e-3, 0.1)),
        "momentum": momentum,
        "dampening": 0.0 if nesterov else draw(st.sampled_from([0.0]) | st.floats(0.0, 0.9)),
        "weight_decay": draw(st.sampled_from([0.0]) | st.floats(0.0, 0.1)),
        "nesterov": nesterov,
        "eps": draw(st.sampled_from([1e-8, 1e-6, 1e-4])),
        "delta": draw(st.floats(0.02, 0.5)),
        "wd_ratio": draw(st.floats(0.0, 1.0)),
        "project_momentum": draw(st.booleans()),
    }


def torch_adamp(params, hp):
    return AdamP(params, lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
                 weight_decay=hp["weight_decay"], delta=hp["delta"], wd_ratio=hp["wd_ratio"],
                 nesterov=hp["nesterov"], foreach=False)


SHAPES = [(7,), (4, 6), (3, 2, 5), (5, 3, 2, 2), (6, 4, 3, 3), (2, 9)]
POSITIONS = {"first": [0] * 6, "last": [-1] * 6, "mixed": [0, 1, -1, 2, -3, 0]}
STATIC = ("nesterov", "project_momentum", "scale_invariant", "channel_axis")


@functools.cache
def injected(name: str, layout: str, **static):
    """``optax.inject_hyperparams`` of ``sio.adamp``/``sio.sgdp`` and its jitted update, built
    once per layout and static options: the examples then change numbers, not the program."""
    statics = STATIC if name == "sgdp" else tuple(a for a in STATIC if a != "project_momentum")
    factory = optax.inject_hyperparams(getattr(sio, name), static_args=statics)
    option = channel_axis_option(layout, POSITIONS[layout])
    placeholders = dict(eps=1e-8, weight_decay=0.1, delta=0.1, wd_ratio=0.1)  # all injected
    placeholders.update(dict(b1=0.9, b2=0.999) if name == "adamp" else
                        dict(momentum=0.9, dampening=0.0))
    tx = factory(learning_rate=0.1, channel_axis=option, **placeholders, **static)
    return tx, jax.jit(tx.update)


def run_adamp(shapes, positions, hp, seed: int, tx, update=None, hyperparams=None) -> None:
    init = initial_params(shapes, seed)
    torch_params = copy_params(init)
    lockstep(Driven(torch_adamp(torch_params, hp), torch_params),
             JaxDriver(tx, init, positions, delta=hp["delta"], eps=hp["eps"], update=update,
                       hyperparams=hyperparams), KINDS, seed)


def run_sgdp(shapes, positions, hp, seed: int, tx, update=None, hyperparams=None) -> None:
    init = initial_params(shapes, seed)
    torch_params = copy_params(init)
    options = {k: v for k, v in hp.items() if k != "lr"}
    optimizer = SGDP(torch_params, lr=hp["lr"], **options, foreach=False)
    lockstep(Driven(optimizer, torch_params),
             JaxDriver(tx, init, positions, delta=hp["delta"], eps=hp["eps"], update=update,
                       hyperparams=hyperparams), KINDS, seed)


def numeric(hp: dict[str, object], lr: str = "lr") -> dict[str, object]:
    """The numeric hyperparameters under optax's names."""
    out = {("learning_rate" if k == lr else k): v for k, v in hp.items()
           if not isinstance(v, bool)}
    return out


@pytest.mark.parametrize("layout", ["first", "last", "mixed"])
@settings(max_examples=8)
@given(hp=adamp_hyperparameters, seed=st.integers(0, 2**16))
def test_adamp_equals_torch(layout: str, hp, seed: int) -> None:
    """Hyperparameters injected (``optax.inject_hyperparams``): one compilation per layout."""
    tx, update = injected("adamp", layout, nesterov=hp["nesterov"])
    run_adamp(SHAPES, POSITIONS[layout], hp, seed, tx, update, numeric(hp))


@pytest.mark.parametrize("layout", ["first", "last", "mixed"])
@settings(max_examples=8)
@given(hp=sgdp_hyperparameters(), seed=st.integers(0, 2**16))
def test_sgdp_equals_torch(layout: str, hp, seed: int) -> None:
    tx, update = injected("sgdp", layout, nesterov=hp["nesterov"],
                          project_momentum=hp["project_momentum"])
    run_sgdp(SHAPES, POSITIONS[layout], hp, seed, tx, update, numeric(hp))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["first", "last", "mixed"])
@settings(max_examples=6)
@given(shapes=layout_shapes(), hp=adamp_hyperparameters, seed=st.integers(0, 2**16),
       data=st.data())
def test_adamp_equals_torch_any_shapes(layout: str, shapes, hp, seed: int, data) -> None:
    """Plain (non-injected) hyperparameters, drawn shapes and channel positions."""
    positions = positions_for(shapes, layout, data)
    tx = sio.adamp(hp["lr"], hp["b1"], hp["b2"], hp["eps"], hp["weight_decay"], hp["delta"],
                   hp["wd_ratio"], hp["nesterov"],
                   channel_axis=channel_axis_option(layout, positions))
    run_adamp(shapes, positions, hp, seed, tx)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["first", "last", "mixed"])
@settings(max_examples=6)
@given(shapes=layout_shapes(), hp=sgdp_hyperparameters(), seed=st.integers(0, 2**16),
       data=st.data())
def test_sgdp_equals_torch_any_shapes(layout: str, shapes, hp, seed: int, data) -> None:
    positions = positions_for(shapes, layout, data)
    options = {k: v for k, v in hp.items() if k != "lr"}
    tx = sio.sgdp(hp["lr"], **options, channel_axis=channel_axis_option(layout, positions))
    run_sgdp(shapes, positions, hp, seed, tx)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_schedule_equals_torch_lr_per_step(optimizer: str) -> None:
    """A schedule's value at count ``t - 1`` is torch's ``lr`` at step ``t``."""
    schedule = optax.linear_schedule(0.05, 0.005, STEPS)
    shapes = [(5,), (4, 6), (3, 2, 3), (6, 3, 2, 2)]
    init = initial_params(shapes, seed=1)
    torch_params = copy_params(init)
    if optimizer == "adamp":
        tx = sio.adamp(schedule, weight_decay=0.1, channel_axis=0)
        opt = AdamP(torch_params, lr=0.05, weight_decay=0.1, foreach=False)
    else:
        tx = sio.sgdp(schedule, momentum=0.9, weight_decay=0.1, channel_axis=0)
        opt = SGDP(torch_params, lr=0.05, momentum=0.9, weight_decay=0.1, foreach=False)
    jax_driver = JaxDriver(tx, init, [0] * 4, delta=0.1, eps=1e-8)
    torch_driver = Driven(opt, torch_params)
    kinds = ["random", "channel", "layer", "none"]
    for step in range(1, STEPS + 1):
        opt.param_groups[0]["lr"] = float(schedule(step - 1))
        run_lockstep([torch_driver, jax_driver], kinds, 1, seed=step)
        for expected, actual in zip(torch_driver.params, jax_driver.params, strict=True):
            assert_round_off_close(actual, expected, step)


def test_projection_changes_the_step_only_where_taken() -> None:
    """Against ``scale_invariant=False``: the projected parameters move differently, the others
    identically (the parity tests cannot pass by never projecting)."""
    shapes = [(6,), (4, 5), (3, 2, 3), (5, 2, 3, 3)]
    kinds = ["random", "channel", "layer", "none"]
    init = initial_params(shapes, seed=3)
    runs = []
    for mode in ("auto", False):
        tx = sio.adamp(1e-2, weight_decay=0.5, scale_invariant=mode, channel_axis=0)
        runs.append(JaxDriver(tx, init, [0] * 4, delta=0.1, eps=1e-8))
    guide_params = copy_params(init)
    guide = Driven(AdamP(guide_params, lr=1e-2, weight_decay=0.5, foreach=False), guide_params)
    run_lockstep([guide, *runs], kinds, 5, seed=0)
    for kind, a, b in zip(kinds, runs[0].params, runs[1].params, strict=True):
        if EXPECTED_VIEW.get(kind) is not None:
            assert (a - b).abs().max() > 1e-4, kind
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["channel", "layer"])
def test_annotation_equals_torch_annotation(mode: str) -> None:
    """``scale_invariant`` given as a callable of the params: 1-D arrays ``"auto"``, the rest
    ``mode``; equals torch's per-group annotation."""
    shapes = [(4, 5), (3, 2, 3), (5, 2, 3, 3)]
    init = initial_params(shapes, seed=5)
    torch_params = copy_params(init)
    opt = AdamP(torch_params, lr=1e-2, weight_decay=0.2, scale_invariant=mode, foreach=False)
    tx = sio.adamp(1e-2, weight_decay=0.2, channel_axis=-1,
                   scale_invariant=lambda ps: [mode if p.ndim >= 2 else "auto" for p in ps])
    lockstep_kinds = ["none", "random", "none"]
    jax_driver = JaxDriver(tx, init, [-1] * 3, delta=0.1, eps=1e-8)
    torch_driver = Driven(opt, torch_params)
    for step in range(1, 6):
        run_lockstep([torch_driver, jax_driver], lockstep_kinds, 1, seed=step)
        for expected, actual in zip(torch_driver.params, jax_driver.params, strict=True):
            assert_round_off_close(actual, expected, step)


# ---------------------------------------------------------------------------------------------
# Edges


def step_both(optimizer: str, params, grads, *, eps: float = 1e-8, steps: int = 3):
    """``steps`` steps of torch (single tensor) and JAX on fixed ``grads``; both results."""
    torch_params = copy_params(params)
    if optimizer == "adamp":
        opt = AdamP(torch_params, lr=1e-2, eps=eps, weight_decay=0.1, foreach=False)
        tx = sio.adamp(1e-2, eps=eps, weight_decay=0.1, channel_axis=0)
    else:
        opt = SGDP(torch_params, lr=1e-2, momentum=0.9, eps=eps, weight_decay=0.1,
                   foreach=False)
        tx = sio.sgdp(1e-2, momentum=0.9, eps=eps, weight_decay=0.1, channel_axis=0)
    driver = JaxDriver(tx, params, [0] * len(params), delta=0.1, eps=eps)
    for _ in range(steps):
        Driven(opt, torch_params).step(grads)
        driver.step(grads)
    return [p.detach() for p in torch_params], driver.params


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_nan_gradient_is_not_projected_and_stays_put(optimizer: str) -> None:
    generator = torch.Generator().manual_seed(0)
    params = initial_params([(4, 5), (3, 6)], seed=2)
    grads = [make_grad(params[0], "channel", generator), make_grad(params[1], "channel", generator)]
    grads[0][1, 2] = float("nan")
    expected, actual = step_both(optimizer, params, grads)
    for e, a in zip(expected, actual, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(actual[0]).any() and not torch.isnan(actual[1]).any()


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_zero_rows(optimizer: str, eps: float) -> None:
    """A zero row of ``w`` and a zero gradient row: finite where torch is finite (with
    ``eps=0`` the zero row makes the cosine NaN there and the view fails, as in torch)."""
    generator = torch.Generator().manual_seed(1)
    params = initial_params([(4, 5), (3, 2, 2)], seed=4)
    params[0][2] = 0.0
    grads = [make_grad(p, "channel", generator) for p in params]
    grads[1][0] = 0.0
    expected, actual = step_both(optimizer, params, grads, eps=eps)
    for e, a in zip(expected, actual, strict=True):
        assert torch.equal(torch.isfinite(a), torch.isfinite(e))
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_empty_arrays_are_skipped(optimizer: str) -> None:
    """Empty arrays step without error and leave the others as torch steps them alone (torch's
    own bodies raise on empty tensors with 2+ dimensions, so they are left out of its run)."""
    params = initial_params([(4, 5)], seed=6)
    grads = [make_grad(params[0], "channel", torch.Generator().manual_seed(2))]
    expected, _ = step_both(optimizer, params, grads)
    tx = (sio.adamp(1e-2, weight_decay=0.1, channel_axis=0) if optimizer == "adamp" else
          sio.sgdp(1e-2, momentum=0.9, weight_decay=0.1, channel_axis=0))
    shapes = [(0, 3), (4, 0, 2), (0,)]
    empty = [jnp.zeros(s) for s in shapes]
    driver = JaxDriver(tx, [*params, *(torch.zeros(s) for s in shapes)], [0] * 4, delta=0.1,
                       eps=1e-8)
    for _ in range(3):
        driver.step([*grads, *(torch.zeros(s) for s in shapes)])
    assert [a.shape for a in driver.arrays[1:]] == [e.shape for e in empty]
    torch.testing.assert_close(driver.params[0], expected[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_params_keep_float32_moments(dtype: str) -> None:
    """16-bit params: float32 state and statistics; the result is the float64 reference's
    within the 16-bit rounding of ``w`` at each step."""
    shapes = [(6,), (4, 5), (3, 2, 3), (5, 2, 3, 3)]
    kinds = ["random", "channel", "layer", "none"]
    init = [p.to(getattr(torch, dtype)).float() for p in initial_params(shapes, seed=8)]
    tx = sio.adamp(5e-2, weight_decay=0.1, channel_axis=0)
    arrays = [jnp.asarray(p.numpy(), dtype=dtype) for p in init]
    state = tx.init(arrays)
    assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(state[0].mu))
    reference = ReferenceAdamP(init, lr=5e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                               delta=0.1, wd_ratio=0.1, nesterov=False)
    update = jax.jit(tx.update)
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        grads = [make_grad(w.float(), kind, generator)
                 for w, kind in zip(reference.params, kinds, strict=True)]
        reference.step(grads)
        updates, state = update([jnp.asarray(g.numpy(), dtype=dtype) for g in grads], state,
                                arrays)
        arrays = optax.apply_updates(arrays, updates)
        assert all(a.dtype == dtype for a in arrays)
        for a, expected in zip(arrays, reference.params, strict=True):  # 1 ulp of the 16 bits
            np.testing.assert_allclose(np.asarray(a, dtype=np.float64), expected.numpy(),
                                       rtol=float(jnp.finfo(dtype).eps), atol=1e-6)
        reference.params = [torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in arrays]
    assert reference.views[-1] == [None, "channel", "layer", None]


def test_float64_params_step_in_float64() -> None:
    shapes = [(6,), (4, 5), (3, 2, 3), (5, 2, 3, 3)]
    kinds = ["random", "channel", "layer", "none"]
    init = initial_params(shapes, seed=9)
    hp = dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=True, eps=1e-8,
              delta=0.1, wd_ratio=0.1)
    reference = ReferenceSGDP(init, **hp)
    generator = torch.Generator().manual_seed(4)
    with jax.enable_x64(True):
        tx = sio.sgdp(hp.pop("lr"), **hp, channel_axis=0)
        arrays = [jnp.asarray(p.double().numpy()) for p in init]
        state = tx.init(arrays)
        update = jax.jit(tx.update)
        for _ in range(STEPS):
            grads = [make_grad(w.float(), kind, generator).double()
                     for w, kind in zip(reference.params, kinds, strict=True)]
            reference.step(grads)
            updates, state = update([jnp.asarray(g.numpy()) for g in grads], state, arrays)
            arrays = optax.apply_updates(arrays, updates)
        assert all(a.dtype == jnp.float64 for a in arrays)
        for a, e in zip(arrays, reference.params, strict=True):
            np.testing.assert_allclose(np.asarray(a), e.numpy(), rtol=1e-12, atol=1e-12)
    assert reference.views[-1] == [None, "channel", "layer", None]
