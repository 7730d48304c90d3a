"""AdamP on FSDP2-sharded parameters: a small CNN with BatchNorm on scikit-learn's digits.

    torchrun --nproc-per-node 2 examples/torchrun_fsdp2.py

Runs on CPU (gloo) or with one GPU per process (nccl). ``fully_shard`` turns every parameter
into a DTensor sharded along dim 0; AdamP works on the shards: each rank tests its own rows,
the per-tensor reductions of the cosine test are all-reduced (one number each), so every rank
takes the same branch and no parameter is gathered for the optimizer. Needs scikit-learn for the
data (``pip install scikit-learn``; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from scaleinv import AdamP
from scaleinv.projection import select_view


class DigitsNet(nn.Module):
    """Two conv + BatchNorm blocks (scale-invariant conv weights) and a linear classifier."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)),
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                          nn.BatchNorm2d(width)),
        ])
        self.classifier = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = F.relu(block(x))
        return self.classifier(x.mean(dim=(2, 3)))


def load_digits_split(device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """1,797 8x8 images: the first 1,500 to train on, the rest to test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    images, labels = images.to(device), labels.to(device)
    return images[:1500], labels[:1500], images[1500:], labels[1500:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)
    model = DigitsNet().to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # Parameters are DTensors now; AdamP takes them as they are.
    optimizer = AdamP(model.parameters(), lr=args.lr, weight_decay=1e-4)

    x_train, y_train, x_test, y_test = load_digits_split(device)
    per_rank = args.batch_size // world
    started = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
        model.train()
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            mine = order[start + rank * per_rank : start + (rank + 1) * per_rank].to(device)
            loss = F.cross_entropy(model(x_train[mine]), y_train[mine])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            shard = slice(rank, None, world)  # every rank scores its slice of the test set
            correct = (model(x_test[shard]).argmax(1) == y_test[shard]).sum()
        dist.all_reduce(correct)
        if rank == 0:
            print(f"epoch {epoch}  last loss {loss.item():.3f}  "
                  f"test accuracy {correct.item() / len(x_test):.3f}", flush=True)

    # What the cosine test decides for one more batch: run on the shards (all ranks take part),
    # with the gradient and the weights it was computed at, as the optimizer sees them.
    model.train()
    mine = torch.arange(rank * per_rank, (rank + 1) * per_rank, device=device)
    optimizer.zero_grad()
    F.cross_entropy(model(x_train[mine]), y_train[mine]).backward()
    decisions = {
        name: select_view(p.detach(), p.grad, "auto", 0.1, 1e-8)
        for name, p in model.named_parameters() if p.dim() >= 2
    }
    if rank == 0:
        print(f"{world} ranks, {time.perf_counter() - started:.1f} s; the cosine test chooses:")
        for name, view in decisions.items():
            print(f"  {name:28s} {view or 'not projected'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
