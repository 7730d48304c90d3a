"""``scaleinv.optax`` in fresh interpreters: imported where torch cannot be, and stepping
parameters sharded over 2 host devices (``XLA_FLAGS`` must be set before JAX starts)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_python(code: str, **env: str) -> str:
    environment = {**os.environ, "PYTHONPATH": SRC, **env}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environment,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_import_and_step_without_torch() -> None:
    out = run_python("""
        import sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        import jax, jax.numpy as jnp, optax
        import scaleinv
        import scaleinv.optax as sio
        params = {"w": jnp.ones((3, 3, 4, 8)), "b": jnp.zeros(8)}
        grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1), params)
        for tx in (sio.adamp(1e-3, weight_decay=0.1), sio.sgdp(0.1, momentum=0.9),
                   optax.chain(sio.project(optax.scale_by_adam()),
                               optax.scale_by_learning_rate(1e-3))):
            updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
            assert jnp.all(jnp.isfinite(updates["w"]))
        try:
            scaleinv.AdamP
        except ImportError:
            pass
        else:
            raise AssertionError("the shim did not block torch")
        assert sys.modules["torch"] is None
        assert not [m for m in sys.modules if m.startswith("torch.")]
        print("no torch: ok")
    """)
    assert "no torch: ok" in out


SHARDED = """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import scaleinv.optax as sio
    from scaleinv.optax.projection import invariance_flags

    assert len(jax.devices()) == 2, jax.devices()
    rng = np.random.default_rng(0)
    # channel axis last (Flax layout); channels split across the 2 devices
    shapes = {"conv": (3, 3, 4, 8), "dense": (16, 10), "conv2": (2, 2, 3, 6), "bias": (8,)}
    kinds = {"conv": "channel", "dense": "layer", "conv2": "none", "bias": "random"}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}

    def grad(w, kind):
        if kind == "random" or w.ndim < 2:
            return rng.standard_normal(w.shape).astype(np.float32)
        rows = np.moveaxis(w, -1, 0).reshape(w.shape[-1], -1).astype(np.float64)
        noise = rng.standard_normal(rows.shape)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        tangent = noise - rows * (rows * noise).sum(1, keepdims=True) / norms**2
        unit = tangent / np.linalg.norm(tangent, axis=1, keepdims=True)
        if kind == "channel":
            g = tangent
        elif kind == "layer":
            signs = np.array([(-1.0) ** i for i in range(len(rows))])
            if len(rows) % 2:
                signs[-1] = 0.0
            g = (unit + signs[:, None] * rows / norms) / norms
        else:
            g = rows + norms * unit
        return np.moveaxis(g.reshape(np.moveaxis(w, -1, 0).shape), 0, -1).astype(np.float32)

    mesh = jax.make_mesh((2,), ("x",))
    def spec(a):
        return NamedSharding(mesh, P(*([None] * (a.ndim - 1)), "x"))

    test_flags = jax.jit(lambda w, g, channel_axis: invariance_flags(
        w, g, scale_invariant="auto", channel_axis=channel_axis, delta=0.1, eps=1e-8),
        static_argnames="channel_axis")
    expected_views = {"channel": (True, False), "layer": (False, True), "none": (False, False)}
    for name, tx in [("adamp", sio.adamp(1e-2, weight_decay=0.1, nesterov=True)),
                     ("sgdp", sio.sgdp(1e-2, momentum=0.9, weight_decay=0.1,
                                       project_momentum=True))]:
        single = {k: jnp.asarray(v) for k, v in params.items()}
        sharded = {k: jax.device_put(v, spec(v)) for k, v in params.items()}
        update = jax.jit(tx.update)
        states = [tx.init(single), tx.init(sharded)]
        for step in range(4):
            current = {k: np.asarray(v) for k, v in single.items()}
            grads = {k: grad(current[k], kinds[k]) for k in shapes}
            for k, kind in kinds.items():
                if kind in expected_views:
                    flags = test_flags(jnp.asarray(current[k]), jnp.asarray(grads[k]),
                                       channel_axis=current[k].ndim - 1)
                    assert tuple(bool(f) for f in flags) == expected_views[kind], (k, flags)
            out = []
            for i, p in enumerate((single, sharded)):
                g = {k: jnp.asarray(v) for k, v in grads.items()} if i == 0 else {
                    k: jax.device_put(v, spec(v)) for k, v in grads.items()}
                u, states[i] = update(g, states[i], p)
                out.append(optax.apply_updates(p, u))
            single, sharded = out
        for k in shapes:
            assert sharded[k].sharding.spec == spec(params[k]).spec, (k, sharded[k].sharding)
            assert len(sharded[k].addressable_shards) == 2
            np.testing.assert_allclose(np.asarray(sharded[k]), np.asarray(single[k]),
                                       rtol=1e-6, atol=1e-6)
            assert not np.allclose(np.asarray(single[k]), params[k])
        print(name, "sharded: ok")
"""


@pytest.mark.slow  # 4 compilations in a fresh interpreter: ~10 s on a small machine
def test_sharded_channels_equal_one_device() -> None:
    out = run_python(SHARDED, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                     JAX_PLATFORMS="cpu")
    assert "adamp sharded: ok" in out and "sgdp sharded: ok" in out
