"""One full training step (forward, backward, optimizer step) of a small ResNet, AdamP vs AdamW.

The model is a CIFAR-style ResNet (3 stages of basic blocks, BatchNorm after every conv, so
the cosine test fires on every conv weight) on random 32x32 images with random labels. Every
optimizer trains its own copy of the model on the same batches, in interleaved rounds; the
figures are median step times and their ratios to ``torch.optim.AdamW(fused=True)`` measured
in the same process.

    python benchmarks/train_step.py                          # CPU, ResNet-20 width 16
    python benchmarks/train_step.py --threads 1 --batch 32 --out train.json
    python benchmarks/train_step.py --device cuda --width 64 --batch 256 --steps 50
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import scaleinv

try:
    import adamp as official
except ImportError:  # the official package is optional here
    official = None


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(width: int, blocks: int, classes: int = 10) -> nn.Module:
    """ResNet-(6 * blocks + 2) for 32x32 inputs with ``width``, 2x, 4x channels per stage."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU()]
    in_ch = width
    for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
        for b in range(blocks):
            layers.append(BasicBlock(in_ch, out_ch, 2 if stage > 0 and b == 0 else 1))
            in_ch = out_ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, classes)]
    return nn.Sequential(*layers)


def optimizers() -> dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]]:
    hp = dict(lr=1e-3, weight_decay=1e-2)
    makers: dict[str, Callable] = {
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True, **hp),
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **hp),
        "AdamP fused": lambda ps: scaleinv.AdamP(ps, fused=True, **hp),
        "AdamP foreach": lambda ps: scaleinv.AdamP(ps, foreach=True, **hp),
        "AdamP single": lambda ps: scaleinv.AdamP(ps, foreach=False, **hp),
    }
    if official is not None:
        makers["adamp 0.3.0"] = lambda ps: official.AdamP(ps, **hp)
    return makers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=3, help="blocks per stage (3: ResNet-20)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    base = resnet(args.width, args.blocks).to(device)
    params_count = sum(p.numel() for p in base.parameters())
    images = torch.randn(args.batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    runs = {}
    for name, make in optimizers().items():
        model = copy.deepcopy(base)
        runs[name] = (model, make(list(model.parameters())))

    def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = {name: train_step(*run) * 1e3 for name, run in runs.items()}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            samples[name].extend(train_step(*run) for _ in range(args.steps))
    medians = {name: statistics.median(times) for name, times in samples.items()}
    reference = medians["AdamW fused"]
    print(f"ResNet-{6 * args.blocks + 2} width {args.width} ({params_count:,} parameters), "
          f"batch {args.batch} of 32x32, {device}, {torch.get_num_threads()} threads")
    print(f"{'optimizer':16s} {'ms/step':>9s} {'x AdamW fused':>14s} {'1st ms':>9s}")
    for name, seconds in medians.items():
        print(f"{name:16s} {seconds * 1e3:9.2f} {seconds / reference:14.3f} {first[name]:9.1f}")
    if args.out:
        report = {"args": vars(args), "torch": torch.__version__, "parameters": params_count,
                  "ms": {k: v * 1e3 for k, v in medians.items()},
                  "ratio_to_adamw_fused": {k: v / reference for k, v in medians.items()},
                  "first_step_ms": first}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
