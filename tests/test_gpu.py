"""CUDA checks, skipped without a GPU: no host synchronisation in a step, CUDA graph capture,
and the fused path's two CUDA backends: the Triton kernels (the default) and the compiled one
(inductor generates Triton kernels there).

Run on a CUDA machine with ``pytest -m gpu`` (the compiled-backend tests are also marked
``slow``: they compile for a minute or two the first time).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch

from reference import assert_round_off_close, initial_params, make_grad
from scaleinv import SGDP, AdamP

FUSED = importlib.import_module("scaleinv.fused")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPES = [(6,), (8, 5), (4, 2, 3), (6, 3, 3, 3), (8, 4, 1, 1), (16,), (5, 4, 3, 3)]
KINDS = ["random", "channel", "layer", "none", "channel", "random", "layer"]
STEPS = 6


def cuda_params(seed: int) -> list[torch.Tensor]:
    return [torch.nn.Parameter(p.cuda()) for p in initial_params(SHAPES, seed)]


def copies(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def gradient_stream(params: list[torch.Tensor], steps: int,
                    seed: int) -> list[list[torch.Tensor]]:
    """Gradients of known branches, built on the CPU from the initial weights (the weights
    move little over a few steps), then moved to the GPU before any timing or checking."""
    generator = torch.Generator().manual_seed(seed)
    weights = [p.detach().cpu() for p in params]
    return [
        [make_grad(w, kind, generator).cuda() for w, kind in zip(weights, KINDS, strict=True)]
        for _ in range(steps)
    ]


def install(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamp": lambda params, **kw: AdamP(params, lr=1e-2, weight_decay=0.1, **kw),
    "sgdp": lambda params, **kw: SGDP(params, lr=1e-2, momentum=0.9, weight_decay=0.1, **kw),
}
# SGDP keeps no step counter, so its multi-tensor body is capturable as it is.
SYNC_FREE = {"adamp": dict(foreach=True, capturable=True), "sgdp": dict(foreach=True)}


def assert_no_sync(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                   stream: list[list[torch.Tensor]]) -> None:
    """The first step (state, compilation) runs freely; the others must not synchronise."""
    install(params, stream[0])
    optimizer.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for grads in stream[1:]:
            install(params, grads)
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_multi_tensor_step_has_no_host_sync(name: str) -> None:
    params = cuda_params(seed=1)
    assert_no_sync(OPTIMIZERS[name](params, **SYNC_FREE[name]), params,
                   gradient_stream(params, 4, seed=1))


def run_graphed(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                stream: list[list[torch.Tensor]], warmup: int = 3) -> None:
    """``warmup`` eager steps on a side stream, then the step captured once and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for grads in stream[:warmup]:
            install(params, grads)
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    for grads in stream[warmup:]:
        install(params, grads)
        graph.replay()
    torch.cuda.synchronize()


def run_eager(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
              stream: list[list[torch.Tensor]]) -> None:
    for grads in stream:
        install(params, grads)
        optimizer.step()
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_multi_tensor_step_replays_in_a_cuda_graph(name: str) -> None:
    graphed_params = cuda_params(seed=2)
    eager_params = copies(graphed_params)
    stream = gradient_stream(graphed_params, STEPS, seed=2)
    run_graphed(OPTIMIZERS[name](graphed_params, **SYNC_FREE[name]), graphed_params, stream)
    run_eager(OPTIMIZERS[name](eager_params, foreach=False), eager_params, stream)
    for w_graphed, w_eager in zip(graphed_params, eager_params, strict=True):
        assert_round_off_close(w_graphed, w_eager, STEPS)


BACKENDS = ["triton", pytest.param("compiled", marks=pytest.mark.slow)]


def use_backend(backend: str, monkeypatch) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("SCALEINV_BACKEND", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_fused_cuda_matches_single_tensor(name: str, backend: str, monkeypatch) -> None:
    use_backend(backend, monkeypatch)
    fused_params = cuda_params(seed=3)
    single_params = copies(fused_params)
    stream = gradient_stream(fused_params, STEPS, seed=3)
    run_eager(OPTIMIZERS[name](fused_params, fused=True), fused_params, stream)
    run_eager(OPTIMIZERS[name](single_params, foreach=False), single_params, stream)
    for w_fused, w_single in zip(fused_params, single_params, strict=True):
        assert_round_off_close(w_fused, w_single, STEPS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_fused_cuda_step_has_no_host_sync(name: str, backend: str, monkeypatch) -> None:
    use_backend(backend, monkeypatch)
    params = cuda_params(seed=4)
    assert_no_sync(OPTIMIZERS[name](params, fused=True), params,
                   gradient_stream(params, 4, seed=4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_fused_capturable_step_replays_in_a_cuda_graph(name: str, backend: str,
                                                       monkeypatch) -> None:
    use_backend(backend, monkeypatch)
    graphed_params = cuda_params(seed=5)
    eager_params = copies(graphed_params)
    stream = gradient_stream(graphed_params, STEPS, seed=5)
    capturable = {"capturable": True} if name == "adamp" else {}
    run_graphed(OPTIMIZERS[name](graphed_params, fused=True, **capturable), graphed_params,
                stream)
    run_eager(OPTIMIZERS[name](eager_params, foreach=False), eager_params, stream)
    for w_graphed, w_eager in zip(graphed_params, eager_params, strict=True):
        assert_round_off_close(w_graphed, w_eager, STEPS)
