"""Optimizer step time on real model shapes, as ratios to ``torch.optim`` in the same process.

For each shape set (ResNet-50: 161 tensors, 25.6M parameters; GPT-2 small: 148 tensors,
124M) and each kind of gradient (one that makes the cosine test pick the channel view for
every tensor with ``dim() >= 2``, one that makes it pick the layer view, one that makes it
pick neither), this times one ``step()`` of

* AdamP (ours, single-tensor / foreach / fused, and fused with ``scale_invariant`` given),
  against ``torch.optim.AdamW`` (foreach and fused) and the official ``adamp`` 0.3.0;
* SGDP likewise, against ``torch.optim.SGD(momentum=0.9)`` (foreach and fused);
* ``torch.compile(opt.step)`` with default options of the fused and foreach steps (rows
  "... compiled"; the first step pays the compilation, shown in the ``1st ms`` column; leave
  them out with ``--no-compiled``).

Every figure is a median over interleaved rounds (each optimizer in turn, so slow drifts of
the machine hit all of them alike) and is reported as a ratio to the baselines measured in the
same process. ``GB/s`` is the traffic an ideal kernel needs (AdamW: 7 arrays of 4 bytes per
element, SGD with momentum: 5) divided by the step time, next to a measured reference: a large
tensor copy (read + write). The branch each tensor took is checked with the reference test
(:func:`scaleinv.projection.select_view`) before and after timing.

    python benchmarks/step.py                                  # ResNet-50 shapes, CPU
    python benchmarks/step.py --shapes resnet50,gpt2 --threads 1 --out results.json
    python benchmarks/step.py --device cuda --steps 50 --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

import scaleinv
from scaleinv.projection import channel_view, select_view
from shapes import SHAPE_SETS

try:
    import adamp as official
except ImportError:  # the official package is optional here
    official = None

GRADIENT_KINDS = ("channel", "layer", "none")
LR = 1e-7  # tiny, so the weights (and hence the branches) barely move while timing
ADAM_ARRAYS, SGD_ARRAYS = 7, 5


# ---------------------------------------------------------------------------------------------
# Gradients whose branch is known


def _tangent_rows(w_rows: Tensor, noise_rows: Tensor) -> Tensor:
    """Unit rows orthogonal to the rows of ``w_rows``."""
    coef = (w_rows * noise_rows).sum(1, keepdim=True) / (w_rows * w_rows).sum(1, keepdim=True)
    tangent = noise_rows - coef * w_rows
    return tangent / tangent.norm(dim=1, keepdim=True)


def make_gradient(w: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """A gradient for ``w`` that makes the cosine test pick ``kind`` (1-D: random).

    * ``"channel"``: every row orthogonal to the same row of ``w``;
    * ``"layer"``: rows at 45 degrees to ``w``'s rows with alternating signs, so that the
      whole tensor is orthogonal to ``w``;
    * ``"none"``: every row at 45 degrees to ``w``'s row, all on the same side.
    """
    noise = torch.randn(w.shape, generator=generator, device="cpu").to(w.device)
    if w.dim() < 2:
        return noise
    w_rows = channel_view(w.detach()).double()
    tangent = _tangent_rows(w_rows, channel_view(noise).double())
    w_norms = w_rows.norm(dim=1, keepdim=True)
    if kind == "channel":
        rows = tangent
    elif kind == "layer":
        n = w_rows.shape[0]
        signs = torch.tensor([(-1.0) ** i for i in range(n)], dtype=torch.float64,
                             device=w.device)
        if n % 2:
            signs[-1] = 0.0
        rows = (tangent + signs[:, None] * w_rows / w_norms) / w_norms
    elif kind == "none":
        rows = w_rows / w_norms + tangent
    else:
        raise ValueError(f"unknown gradient kind {kind!r}; allowed: {GRADIENT_KINDS}")
    return rows.to(w.dtype).reshape(w.shape)


def branches(params: list[Tensor], delta: float = 0.1, eps: float = 1e-8) -> Counter:
    """How many tensors the reference cosine test sends to each view."""
    return Counter(
        str(select_view(p.detach(), p.grad, "auto", delta, eps)) for p in params if p.dim() >= 2
    )


# ---------------------------------------------------------------------------------------------
# Optimizers


class Compiled:
    """``optimizer`` whose ``step`` is ``torch.compile(optimizer.step)`` (default options)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.step = torch.compile(optimizer.step)


COMPILED = True  # set by --no-compiled


def _with_compiled(makers: dict[str, Callable], names: list[str]) -> dict[str, Callable]:
    if COMPILED:
        for name in names:
            makers[f"{name} compiled"] = lambda ps, make=makers[name]: Compiled(make(ps))
    return makers


def _annotated_groups(params: list[Tensor]) -> list[dict]:
    return [{"params": [p for p in params if p.dim() >= 2], "scale_invariant": "channel"},
            {"params": [p for p in params if p.dim() < 2], "scale_invariant": False}]


def adam_family(kind: str) -> dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]]:
    hp = dict(lr=LR, weight_decay=1e-2)
    makers: dict[str, Callable] = {
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **hp),
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True, **hp),
    }
    if official is not None:
        makers["adamp 0.3.0"] = lambda ps: official.AdamP(ps, **hp)
    makers["AdamP single"] = lambda ps: scaleinv.AdamP(ps, foreach=False, **hp)
    makers["AdamP foreach"] = lambda ps: scaleinv.AdamP(ps, foreach=True, **hp)
    makers["AdamP fused"] = lambda ps: scaleinv.AdamP(ps, fused=True, **hp)
    if kind == "channel":
        makers["AdamP fused, channel given"] = lambda ps: scaleinv.AdamP(
            _annotated_groups(ps), fused=True, **hp)
    return _with_compiled(makers, ["AdamW fused", "AdamP fused", "AdamP foreach"])


def sgd_family(kind: str) -> dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]]:
    hp = dict(lr=LR, momentum=0.9, weight_decay=1e-4)
    makers: dict[str, Callable] = {
        "SGD foreach": lambda ps: torch.optim.SGD(ps, foreach=True, **hp),
        "SGD fused": lambda ps: torch.optim.SGD(ps, fused=True, **hp),
    }
    if official is not None:
        makers["sgdp 0.3.0"] = lambda ps: official.SGDP(ps, **hp)
    makers["SGDP single"] = lambda ps: scaleinv.SGDP(ps, foreach=False, **hp)
    makers["SGDP foreach"] = lambda ps: scaleinv.SGDP(ps, foreach=True, **hp)
    makers["SGDP fused"] = lambda ps: scaleinv.SGDP(ps, fused=True, **hp)
    if kind == "channel":
        makers["SGDP fused, channel given"] = lambda ps: scaleinv.SGDP(
            _annotated_groups(ps), fused=True, **hp)
    return _with_compiled(makers, ["SGD fused", "SGDP fused", "SGDP foreach"])


FAMILIES = {
    "adamp": (adam_family, ("AdamW fused", "AdamW foreach", "adamp 0.3.0"), ADAM_ARRAYS),
    "sgdp": (sgd_family, ("SGD fused", "SGD foreach", "sgdp 0.3.0"), SGD_ARRAYS),
}


# ---------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device, numel: int = 64 * 2**20, repeats: int = 10) -> float:
    """GB/s of ``dst.copy_(src)`` on float32 tensors of ``numel`` elements (read + write)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = [time_call(lambda: dst.copy_(src), device) for _ in range(repeats)]
    return 2 * numel * 4 / statistics.median(times) / 1e9


@dataclass
class Result:
    shapes: str
    family: str
    grads: str
    optimizer: str
    ms: float
    first_step_ms: float
    samples: int
    gbps: float
    ratios: dict[str, float] = field(default_factory=dict)


def run_case(shape_set: str, family: str, kind: str, device: torch.device, steps: int,
             rounds: int, seed: int) -> tuple[list[Result], dict[str, Counter]]:
    """Time every optimizer of ``family`` on ``shape_set`` with ``kind`` gradients."""
    make_family, baselines, arrays = FAMILIES[family]
    generator = torch.Generator().manual_seed(seed)
    shapes = SHAPE_SETS[shape_set]()
    params = [torch.randn(s, generator=generator).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = make_gradient(p, kind, generator)
    numel = sum(p.numel() for p in params)
    checks = {"before": branches(params)}
    samples: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    failed: dict[str, str] = {}
    for _ in range(rounds):
        for name, make in make_family(kind).items():
            if name in failed:
                continue
            try:
                optimizer = make(params)
                first.setdefault(name, time_call(optimizer.step, device) * 1e3)  # state, compiles
                optimizer.step()
                times = [time_call(optimizer.step, device) for _ in range(steps)]
            except Exception as error:  # one broken path must not hide the others' figures
                failed[name] = f"{type(error).__name__}: {error}"
                print(f"{name} failed: {failed[name]}", flush=True)
                samples.pop(name, None)
                continue
            samples.setdefault(name, []).extend(times)
            del optimizer
            gc.collect()
    checks["after"] = branches(params)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    results = []
    for name, seconds in medians.items():
        results.append(Result(
            shapes=shape_set, family=family, grads=kind, optimizer=name, ms=seconds * 1e3,
            first_step_ms=first[name], samples=len(samples[name]),
            gbps=arrays * 4 * numel / seconds / 1e9,
            ratios={base: seconds / medians[base] for base in baselines if base in medians},
        ))
    return results, checks


def print_table(results: list[Result], checks: dict[str, Counter], copy_gbps: float) -> None:
    head = results[0]
    print(f"\n{head.shapes} shapes, {head.family}, '{head.grads}' gradients; branches taken "
          f"(dim >= 2) before {dict(checks['before'])}, after {dict(checks['after'])}")
    names = list(results[0].ratios)
    header = f"{'optimizer':28s} {'ms':>9s} " + " ".join(f"{'x ' + n:>16s}" for n in names)
    print(header + f" {'GB/s':>7s} {'% copy':>7s} {'1st ms':>9s}")
    for r in results:
        ratios = " ".join(f"{r.ratios[n]:16.2f}" for n in names)
        print(f"{r.optimizer:28s} {r.ms:9.2f} {ratios} {r.gbps:7.1f} "
              f"{100 * r.gbps / copy_gbps:6.0f}% {r.first_step_ms:9.1f}")


def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "device": str(device), "adamp": getattr(official, "__version__", None),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = os.getloadavg()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="resnet50", help="comma list of: resnet50, gpt2")
    parser.add_argument("--families", default="adamp,sgdp", help="comma list of: adamp, sgdp")
    parser.add_argument("--grads", default=",".join(GRADIENT_KINDS),
                        help="comma list of: channel, layer, none")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--no-compiled", action="store_true",
                        help="leave out the torch.compile(opt.step) rows")
    args = parser.parse_args()
    global COMPILED
    COMPILED = not args.no_compiled
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    copy_gbps = copy_bandwidth(device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; "
          f"copy bandwidth {copy_gbps:.1f} GB/s")
    report: dict[str, object] = {"machine": machine(device), "copy_gbps": copy_gbps,
                                 "args": vars(args), "results": [], "branches": []}
    for shape_set in args.shapes.split(","):
        for family in args.families.split(","):
            for kind in args.grads.split(","):
                results, checks = run_case(shape_set, family, kind, device, args.steps,
                                           args.rounds, args.seed)
                print_table(results, checks, copy_gbps)
                report["results"].extend(asdict(r) for r in results)  # type: ignore[union-attr]
                report["branches"].append(  # type: ignore[union-attr]
                    {"shapes": shape_set, "family": family, "grads": kind,
                     **{k: dict(v) for k, v in checks.items()}})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
