"""``scaleinv.optax``: the ``project`` wrapper (and its interplay with
``optax.add_decayed_weights``), the per-parameter options and the errors on bad input."""

from __future__ import annotations

import pytest
import torch

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import scaleinv.optax as sio  # noqa: E402
from reference import Driven, assert_round_off_close, copy_params, initial_params, make_grad  # noqa: E402,I001
from scaleinv import AdamP  # noqa: E402

SHAPES = [(6,), (4, 5), (3, 2, 3), (5, 2, 3, 3)]
KINDS = ["random", "channel", "layer", "none"]


def grads_for(params, seed: int, kinds=KINDS):
    generator = torch.Generator().manual_seed(seed)
    return [make_grad(p, kind, generator) for p, kind in zip(params, kinds, strict=True)]


def jax_of(tensors):
    return [jnp.asarray(t.detach().numpy()) for t in tensors]


def run(tx, params, steps: int = 6, seed: int = 0):
    """``steps`` of ``tx`` in torch layout on gradients built from its own weights."""
    arrays = jax_of(params)
    state = tx.init(arrays)
    update = jax.jit(tx.update)
    for step in range(steps):
        torch_params = [torch.from_numpy(jax.device_get(a).copy()) for a in arrays]
        grads = jax_of(grads_for(torch_params, seed + step))
        updates, state = update(grads, state, arrays)
        arrays = optax.apply_updates(arrays, updates)
    return [torch.from_numpy(jax.device_get(a).copy()) for a in arrays]


def test_project_around_scale_by_adam_is_adamp() -> None:
    """``chain(project(scale_by_adam(), weight_decay), scale_by_learning_rate)`` is AdamP
    (no nesterov) step for step."""
    init = initial_params(SHAPES, seed=1)
    torch_params = copy_params(init)
    driver = Driven(AdamP(torch_params, lr=1e-2, weight_decay=0.3, foreach=False), torch_params)
    tx = optax.chain(sio.project(optax.scale_by_adam(), weight_decay=0.3, channel_axis=0),
                     optax.scale_by_learning_rate(1e-2))
    arrays = jax_of(init)
    state = tx.init(arrays)
    update = jax.jit(tx.update)
    for step in range(1, 11):
        grads = grads_for([p.detach() for p in torch_params], step)
        driver.step(grads)
        updates, state = update(jax_of(grads), state, arrays)
        arrays = optax.apply_updates(arrays, updates)
        for a, expected in zip(arrays, torch_params, strict=True):
            assert_round_off_close(torch.from_numpy(jax.device_get(a).copy()), expected, step)


def test_decay_inside_the_wrapper_is_projected_away() -> None:
    """``add_decayed_weights`` inside the wrapped chain: projected parameters are not decayed at
    all (the decay is radial), the others are; after the wrapper: all are decayed in full."""
    init = initial_params(SHAPES, seed=2)
    lr = optax.scale_by_learning_rate(1e-2)
    no_decay = run(optax.chain(sio.project(optax.scale_by_adam(), channel_axis=0), lr), init)
    inside = run(optax.chain(sio.project(
        optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(0.5)), channel_axis=0), lr),
        init)
    after = run(optax.chain(sio.project(optax.scale_by_adam(), channel_axis=0),
                            optax.add_decayed_weights(0.5), lr), init)
    full = run(optax.chain(sio.project(optax.scale_by_adam(), weight_decay=0.5,
                                       wd_ratio=1.0, channel_axis=0), lr), init)
    for kind, a, b, c, d in zip(KINDS, no_decay, inside, after, full, strict=True):
        if kind in ("channel", "layer"):  # projected
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        else:
            assert (b - a).abs().max() > 1e-3
        assert (c - a).abs().max() > 1e-3
        torch.testing.assert_close(c, d, rtol=1e-6, atol=1e-6)


def test_options_as_pytree_prefix_and_callable() -> None:
    """A dict prefix and a callable give the same steps as the equivalent full pytree."""
    params = {"conv": {"kernel": jnp.ones((3, 3, 4, 8)) + jnp.arange(8.0),
                       "bias": jnp.zeros(8)},
              "dense": {"kernel": jnp.ones((8, 10)) * jnp.arange(10.0), "bias": jnp.zeros(10)}}
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape),
                         params)
    full = {"conv": {"kernel": "channel", "bias": "auto"},
            "dense": {"kernel": False, "bias": "auto"}}
    prefix = {"conv": "auto", "dense": False}

    def annotate(ps):
        return jax.tree_util.tree_map_with_path(
            lambda path, p: "channel" if path[0].key == "conv" and p.ndim == 4 else
            (False if path[0].key == "dense" else "auto"), ps)

    results = []
    for option in (full, {"conv": {"kernel": "channel", "bias": "auto"}, "dense": False},
                   annotate):
        tx = sio.sgdp(0.1, momentum=0.9, weight_decay=0.1, scale_invariant=option)
        results.append(tx.update(grads, tx.init(params), params)[0])
    for other in results[1:]:
        assert jax.tree.all(jax.tree.map(jnp.array_equal, results[0], other))
    # the prefix with "auto" on the conv kernel: the gradient is not orthogonal, no projection
    tx = sio.sgdp(0.1, momentum=0.9, weight_decay=0.1, scale_invariant=prefix)
    auto = tx.update(grads, tx.init(params), params)[0]
    assert not jnp.array_equal(auto["conv"]["kernel"], results[0]["conv"]["kernel"])
    assert jnp.array_equal(auto["dense"]["kernel"], results[0]["dense"]["kernel"])


@pytest.mark.parametrize(("factory", "kwargs", "error", "match"), [
    (sio.adamp, dict(learning_rate=-1.0), ValueError, "learning_rate"),
    (sio.adamp, dict(learning_rate="fast"), TypeError, "learning_rate"),
    (sio.adamp, dict(learning_rate=1e-3, b1=1.0), ValueError, "b1"),
    (sio.adamp, dict(learning_rate=1e-3, b2=-0.1), ValueError, "b2"),
    (sio.adamp, dict(learning_rate=1e-3, eps=-1.0), ValueError, "eps"),
    (sio.adamp, dict(learning_rate=1e-3, weight_decay=-1.0), ValueError, "weight_decay"),
    (sio.adamp, dict(learning_rate=1e-3, delta=0.0), ValueError, "delta"),
    (sio.adamp, dict(learning_rate=1e-3, wd_ratio=1.5), ValueError, "wd_ratio"),
    (sio.adamp, dict(learning_rate=1e-3, scale_invariant=True), ValueError, "ambiguous"),
    (sio.adamp, dict(learning_rate=1e-3, scale_invariant="rows"), ValueError, "scale_invariant"),
    (sio.adamp, dict(learning_rate=1e-3, channel_axis=1.0), TypeError, "channel_axis"),
    (sio.sgdp, dict(learning_rate=0.1, momentum=1.0), ValueError, "momentum"),
    (sio.sgdp, dict(learning_rate=0.1, dampening=1.5), ValueError, "dampening"),
    (sio.sgdp, dict(learning_rate=0.1, nesterov=True), ValueError, "Nesterov"),
    (sio.sgdp, dict(learning_rate=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError,
     "Nesterov"),
])
def test_bad_hyperparameters_raise(factory, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        factory(**kwargs)


def test_project_checks_its_options() -> None:
    with pytest.raises(ValueError, match="wd_ratio"):
        sio.project(optax.scale_by_adam(), wd_ratio=-0.1)


@pytest.mark.parametrize(("kwargs", "params", "error", "match"), [
    (dict(channel_axis=2), [jnp.ones((3, 4))], ValueError, "channel_axis"),
    (dict(channel_axis=[0, 5]), [jnp.ones((3, 4)), jnp.ones((3, 4))], ValueError,
     "channel_axis"),
    (dict(scale_invariant="channel"), [jnp.ones((3, 4)), jnp.ones(4)], ValueError, "1-D"),
    (dict(scale_invariant=["auto", "channels"]), [jnp.ones((3, 4)), jnp.ones(4)], ValueError,
     "scale_invariant"),
    (dict(scale_invariant=["auto"]), [jnp.ones((3, 4)), jnp.ones(4)], ValueError,
     "structure"),
    (dict(), [jnp.ones((3, 4), jnp.complex64)], TypeError, "complex"),
])
def test_bad_per_parameter_options_raise(kwargs, params, error, match) -> None:
    with pytest.raises(error, match=match):  # at construction where the params are not needed
        tx = sio.adamp(1e-3, **kwargs)
        tx.update(params, tx.init(params), params)


def test_update_needs_params() -> None:
    tx = sio.sgdp(0.1)
    params = [jnp.ones((2, 3))]
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


def test_state_dtypes_and_step_count() -> None:
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.ones(3)}
    state = sio.scale_by_adamp().init(params)
    assert state.count.dtype == jnp.int32
    assert state.mu["w"].dtype == jnp.float32 and state.nu["b"].dtype == jnp.float32
    assert sio.scale_by_sgdp(0.9).init(params).momentum["w"].dtype == jnp.float32
