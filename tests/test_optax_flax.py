"""The paper's effect in Flax: a BatchNorm CNN on the offline digits data. The conv kernels
followed by BatchNorm are scale-invariant; with Adam their norms grow, with AdamP (same data,
same steps) much less."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nn = pytest.importorskip("flax.linen")
datasets = pytest.importorskip("sklearn.datasets")
jnp = jax.numpy

import scaleinv.optax as sio  # noqa: E402


class BNCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        for width in (16, 32):
            x = nn.Conv(width, (3, 3), use_bias=False)(x)  # kernel HWIO: channel axis last
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def train(tx, images, labels, steps: int = 150, batch: int = 128):
    """``steps`` of ``tx`` on fixed minibatches; the conv kernels' norm ratios and accuracy."""
    model = BNCNN()
    variables = model.init(jax.random.key(0), images[:2], train=False)
    params, stats = variables["params"], variables["batch_stats"]
    state = tx.init(params)

    @jax.jit
    def step(params, stats, state, x, y):
        def loss_fn(p):
            logits, updated = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                          mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updated["batch_stats"]
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), stats, state

    order = np.random.default_rng(0).permutation(len(images))
    for i in range(steps):
        idx = np.take(order, np.arange(i * batch, (i + 1) * batch), mode="wrap")
        params, stats, state = step(params, stats, state, images[idx], labels[idx])

    def kernel_norms(p):
        return np.array([float(jnp.linalg.norm(p[f"Conv_{i}"]["kernel"])) for i in range(2)])

    logits = jax.jit(model.apply, static_argnames="train")(
        {"params": params, "batch_stats": stats}, images, train=False)
    accuracy = float((logits.argmax(-1) == labels).mean())
    return kernel_norms(params) / kernel_norms(variables["params"]), accuracy


@pytest.mark.slow  # two jitted training loops: ~10-25 s on a small shared CPU
def test_adamp_slows_the_norm_growth_of_bn_conv_kernels() -> None:
    digits = datasets.load_digits()
    images = jnp.asarray(digits.images[..., None] / 16.0, jnp.float32)
    labels = jnp.asarray(digits.target)
    adam_growth, adam_accuracy = train(optax.adam(1e-2), images, labels)
    adamp_growth, adamp_accuracy = train(sio.adamp(1e-2), images, labels)
    print(f"norm ratio adam {adam_growth} adamp {adamp_growth}; "
          f"accuracy adam {adam_accuracy:.3f} adamp {adamp_accuracy:.3f}")
    assert min(adam_accuracy, adamp_accuracy) > 0.9
    assert np.all(adam_growth > 1.05)
    assert np.all(adamp_growth - 1 < 0.5 * (adam_growth - 1))
