"""What ``scaleinv.project`` costs: peak extra memory and step time against the bare optimizer.

A generic base optimizer changes the weights in place, so the wrapper keeps, for the length of
one step, a copy of every candidate tensor (``dim() >= 2``). This script measures, in one
process and on one set of parameters, for ``torch.optim.AdamW`` and ``torch.optim.RAdam``:

* the peak memory allocated during one step, wrapped minus unwrapped, against the parameter
  bytes and against the candidate bytes (the expected cost);
* the median step time, wrapped over unwrapped (and ``scaleinv.AdamP`` over ``AdamW`` as a
  yardstick for what a built-in projection costs).

CPU peaks come from the profiler's allocation events, CUDA peaks from the caching allocator.

    python benchmarks/wrap_memory.py                      # ResNet-50 shapes, CPU, 1 thread
    python benchmarks/wrap_memory.py --shapes gpt2 --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import scaleinv
from shapes import SHAPE_SETS

MiB = 2**20


def make_params(shapes: list[tuple[int, ...]], device: str) -> list[torch.nn.Parameter]:
    """Seeded parameters with gradients of the given shapes."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=gen))
        p.grad = torch.randn(shape, device=device, generator=gen)
        params.append(p)
    return params


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(step: Callable[[], object], device: str) -> int:
    """Peak bytes allocated during one call of ``step`` above what was allocated before it."""
    if device == "cuda":
        synchronize(device)
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        pending.extend(node.children)
    current = peak = 0
    for _, size in sorted(allocations):
        current += size
        peak = max(peak, current)
    return peak


def median_ms(step: Callable[[], object], steps: int, device: str) -> float:
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="resnet50")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--foreach", choices=["default", "true", "false"], default="default")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    foreach = {"default": None, "true": True, "false": False}[args.foreach]

    shapes = SHAPE_SETS[args.shapes]()
    params = make_params(shapes, args.device)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    candidate_bytes = sum(p.numel() * p.element_size() for p in params if p.dim() >= 2)
    print(f"{args.shapes} shapes on {args.device} ({torch.get_num_threads()} threads), "
          f"foreach={args.foreach}: {len(params)} tensors, params {param_bytes / MiB:.1f} MiB, "
          f"candidates (dim >= 2) {candidate_bytes / MiB:.1f} MiB")

    factories = {
        "AdamW": lambda: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=foreach),
        "RAdam": lambda: torch.optim.RAdam(params, lr=1e-3, foreach=foreach),
    }
    header = (f"{'optimizer':<10} {'extra peak MiB':>15} {'/ params':>9} {'/ candidates':>13} "
              f"{'bare ms':>9} {'wrapped ms':>11} {'ratio':>6}")
    print(header)
    for name, make in factories.items():
        bare, wrapped = make(), scaleinv.project(make())
        for _ in range(args.warmup):  # state allocated, kernels warm
            bare.step()
            wrapped.step()
        extra = peak_bytes(wrapped.step, args.device) - peak_bytes(bare.step, args.device)
        bare_ms = median_ms(bare.step, args.steps, args.device)
        wrapped_ms = median_ms(wrapped.step, args.steps, args.device)
        print(f"{name:<10} {extra / MiB:>15.1f} {extra / param_bytes:>9.2f} "
              f"{extra / candidate_bytes:>13.2f} {bare_ms:>9.1f} {wrapped_ms:>11.1f} "
              f"{wrapped_ms / bare_ms:>6.2f}")
        del bare, wrapped

    adamw = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=foreach)
    adamp = scaleinv.AdamP(params, lr=1e-3, weight_decay=0.01, foreach=foreach)
    for _ in range(args.warmup):
        adamw.step()
        adamp.step()
    adamw_ms = median_ms(adamw.step, args.steps, args.device)
    adamp_ms = median_ms(adamp.step, args.steps, args.device)
    print(f"yardstick: scaleinv.AdamP {adamp_ms:.1f} ms / AdamW {adamw_ms:.1f} ms = "
          f"{adamp_ms / adamw_ms:.2f}")


if __name__ == "__main__":
    main()
