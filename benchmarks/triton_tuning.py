"""Where the time of a Triton fused step goes, and which chunk size suits a card (CUDA only).

For each shape set and kind of gradient this prints, for ``torch.optim.AdamW(fused=True)`` and
AdamP with the Triton backend at several chunk sizes and warps per program
(``scaleinv._fused_triton.BLOCK``, ``NUM_WARPS``):

* ``step ms``: one ``step()`` with the device drained before and after (what
  ``benchmarks/step.py`` reports);
* ``host ms``: the time until ``step()`` returns, the queue kept non-empty (Python, checks and
  launches);
* ``queued ms``: per step over many steps queued back to back, then drained (the device time,
  where the host keeps ahead).

    python benchmarks/triton_tuning.py --shapes resnet50,gpt2 --configs 256x4,512x2 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import statistics
import time
from collections.abc import Callable

import torch

import scaleinv
from scaleinv import _fused_triton
from shapes import SHAPE_SETS
from step import make_gradient


def measure(optimizer: torch.optim.Optimizer, steps: int) -> dict[str, float]:
    optimizer.step()
    optimizer.step()
    torch.cuda.synchronize()
    drained, host = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        torch.cuda.synchronize()
        drained.append(time.perf_counter() - start)
    torch.cuda._sleep(50_000_000)  # keep the device busy so that only the host is timed
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        host.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    torch.cuda.synchronize()
    queued = (time.perf_counter() - start) / steps
    return {"step ms": 1e3 * statistics.median(drained), "host ms": 1e3 * statistics.median(host),
            "queued ms": 1e3 * queued}


def profile_host(params: list[torch.Tensor], steps: int) -> None:
    """The 15 functions with the most host time over ``steps`` default fused AdamP steps."""
    optimizer = scaleinv.AdamP(params, lr=1e-7, fused=True)
    optimizer.step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        optimizer.step()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def optimizers(params: list[torch.Tensor], kind: str,
               configs: list[tuple[int, int]]) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    def at(block: int, warps: int) -> torch.optim.Optimizer:
        _fused_triton.BLOCK, _fused_triton.NUM_WARPS = block, warps
        return scaleinv.AdamP(params, lr=1e-7, fused=True)

    makers: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "AdamW fused": lambda: torch.optim.AdamW(params, lr=1e-7, fused=True)}
    for block, warps in configs:
        makers[f"AdamP triton {block}x{warps}"] = functools.partial(at, block, warps)
    if kind == "channel":
        makers["AdamP triton, channel given"] = lambda: scaleinv.AdamP(
            [{"params": [p for p in params if p.dim() >= 2], "scale_invariant": "channel"},
             {"params": [p for p in params if p.dim() < 2], "scale_invariant": False}],
            lr=1e-7, fused=True)
    return makers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="resnet50,gpt2")
    parser.add_argument("--grads", default="none,channel")
    parser.add_argument("--configs", default="256x4,256x2,256x1,512x4,512x2,128x1",
                        help="BLOCKxNUM_WARPS of the looped passes")
    parser.add_argument("--profile", action="store_true",
                        help="also print where the host time of a default step goes (cProfile)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    defaults = _fused_triton.BLOCK, _fused_triton.NUM_WARPS
    rows = []
    for shape_set in args.shapes.split(","):
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=generator).to(device).requires_grad_()
                  for s in SHAPE_SETS[shape_set]()]
        for kind in args.grads.split(","):
            for p in params:
                p.grad = make_gradient(p, kind, generator)
            baseline = None
            for name, make in optimizers(params, kind, configs).items():  # type: ignore[arg-type]
                result = measure(make(), args.steps)
                _fused_triton.BLOCK, _fused_triton.NUM_WARPS = defaults
                baseline = baseline or result["step ms"]
                rows.append({"shapes": shape_set, "grads": kind, "optimizer": name, **result,
                             "x AdamW fused": result["step ms"] / baseline})
                print(f"{shape_set:9s} {kind:8s} {name:30s} " + " ".join(
                    f"{k} {v:7.3f}" for k, v in rows[-1].items() if isinstance(v, float)),
                    flush=True)
        if args.profile:
            profile_host(params, args.steps)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
