"""Jitted optax step time of ``scaleinv.optax`` on real model shapes, as ratios to optax.

For each shape set (ResNet-50: 161 arrays, 25.6M parameters; GPT-2 small: 148 arrays, 124M)
in Flax layout, this times one jitted ``update`` + ``apply_updates`` (params and state donated)
of

* ``scaleinv.optax.adamp`` against ``optax.adamw``;
* ``scaleinv.optax.sgdp`` (momentum 0.9) against ``optax.sgd`` (momentum 0.9).

The branch of the cosine test does not change the work (both views are computed and the choice
is a ``jnp.where`` on the device), so the gradients are plain Gaussians. Every figure is a median
over interleaved rounds (each optimizer in turn) and is reported as a ratio to its baseline
measured in the same process. Runs without torch.

Flax layout: the torch shapes of ``shapes.py`` with the output channel (axis 0) moved last,
except GPT-2's token and position embeddings, which ``flax.linen.Embed`` stores as
``[vocab, features]`` like torch: they keep their shape and get ``channel_axis=0``
(``--transpose-embeddings`` moves their axis too).

    python benchmarks/optax_step.py                              # both shape sets, CPU
    python benchmarks/optax_step.py --shapes resnet50 --steps 20 --rounds 5 --out r.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scaleinv.optax as sio
from shapes import SHAPE_SETS

EMBEDDINGS = {"gpt2": (0, 1)}  # indices in shapes.py of the embedding tables


def pairs(axes: list[int]) -> dict[str, tuple[Callable, Callable]]:
    """name: (ours, baseline)."""
    return {
        "adamp": (lambda: sio.adamp(1e-3, weight_decay=1e-2, channel_axis=axes),
                  lambda: optax.adamw(1e-3, weight_decay=1e-2)),
        "sgdp": (lambda: sio.sgdp(1e-3, momentum=0.9, weight_decay=1e-4, channel_axis=axes),
                 lambda: optax.sgd(1e-3, momentum=0.9)),
    }


def flax_layout(shape: tuple[int, ...], keep: bool) -> tuple[int, ...]:
    """A torch shape with its output channel (axis 0) moved last, unless ``keep``."""
    return shape[1:] + shape[:1] if len(shape) >= 2 and not keep else shape


def make_arrays(shapes: list[tuple[int, ...]], seed: int) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes]


class Timed:
    """One optimizer's jitted step over its own copy of the params (donated each step)."""

    def __init__(self, tx: optax.GradientTransformation, params: list[jax.Array]) -> None:
        self.params = [jnp.copy(p) for p in params]
        self.state = tx.init(self.params)

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.step_fn: Callable = jax.jit(step, donate_argnums=(0, 1))

    def run(self, grads: list[jax.Array], steps: int) -> float:
        """Seconds per step over ``steps`` steps."""
        start = time.perf_counter()
        for _ in range(steps):
            self.params, self.state = self.step_fn(self.params, self.state, grads)
        jax.block_until_ready((self.params, self.state))
        return (time.perf_counter() - start) / steps


def bench(shape_set: str, steps: int, rounds: int, transpose_embeddings: bool
          ) -> dict[str, object]:
    keep = [] if transpose_embeddings else EMBEDDINGS.get(shape_set, ())
    shapes = [flax_layout(s, i in keep) for i, s in enumerate(SHAPE_SETS[shape_set]())]
    axes = [0 if i in keep else -1 for i in range(len(shapes))]
    params = make_arrays(shapes, seed=0)
    grads = make_arrays(shapes, seed=1)
    result: dict[str, object] = {
        "shapes": shape_set, "arrays": len(shapes),
        "parameters": int(sum(np.prod(s) for s in shapes)),
        "embeddings_transposed": bool(transpose_embeddings and shape_set in EMBEDDINGS),
    }
    for name, (ours, baseline) in pairs(axes).items():
        timed = {name: Timed(ours(), params), f"optax-{name}-baseline": Timed(baseline(), params)}
        for t in timed.values():  # compile and warm up
            t.run(grads, 1)
        times: dict[str, list[float]] = {k: [] for k in timed}
        for _ in range(rounds):
            for key, t in timed.items():
                times[key].append(t.run(grads, steps))
        medians = {k: statistics.median(v) for k, v in times.items()}
        ours_s, base_s = medians.values()
        result[name] = {"ours_ms": 1e3 * ours_s, "baseline_ms": 1e3 * base_s,
                        "ratio": ours_s / base_s}
        del timed
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="resnet50,gpt2")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--transpose-embeddings", action="store_true",
                        help="store GPT-2's embeddings as [features, vocab], channel axis last")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform} "
          f"({platform.processor() or platform.machine()}), {jax.device_count()} device(s)")
    results = []
    for shape_set in args.shapes.split(","):
        r = bench(shape_set, args.steps, args.rounds, args.transpose_embeddings)
        results.append(r)
        print(f"{shape_set}: {r['arrays']} arrays, {r['parameters']:,} parameters")
        for name, baseline in (("adamp", "optax.adamw"), ("sgdp", "optax.sgd(momentum=0.9)")):
            m = r[name]
            print(f"  {name:6s} {m['ours_ms']:9.2f} ms   {baseline:24s} {m['baseline_ms']:9.2f} "
                  f"ms   ratio {m['ratio']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"jax": jax.__version__, "optax": optax.__version__,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
