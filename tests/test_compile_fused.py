"""The fused kernels as custom operators: ``torch.compile(opt.step, fullgraph=True)`` with the
fused path traces (no graph break) and equals the eager fused step; the operators pass
``torch.library.opcheck``; meta tensors are refused with a clear error."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from scaleinv import SGDP, AdamP

FUSED_CPU = importlib.import_module("scaleinv._fused_cpu")
OPS = importlib.import_module("scaleinv._ops")

SHAPES = [(6, 3, 3, 3), (6,), (8, 5), (4, 3, 2), (5, 12)]
needs_c_compiler = pytest.mark.skipif(FUSED_CPU.load() is None, reason="no C compiler")
BACKENDS = [pytest.param("native", marks=needs_c_compiler),
            pytest.param("triton", marks=pytest.mark.skipif(
                os.environ.get("TRITON_INTERPRET") != "1" or
                importlib.util.find_spec("triton") is None,
                reason="Triton on CPU needs its interpreter"))]
OPTIMIZERS = {
    "adamp": (AdamP, dict(lr=1e-2, weight_decay=0.1, nesterov=True)),
    "sgdp": (SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
}


def make_params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in SHAPES]


def run_compiled_against_eager(name: str, compile_backend: str, steps: int = 3) -> None:
    cls, options = OPTIMIZERS[name]
    eager_params, compiled_params = make_params(3), make_params(3)
    eager = cls(eager_params, fused=True, **options)
    compiled = cls(compiled_params, fused=True, **options)
    step = torch.compile(compiled.step, fullgraph=True, backend=compile_backend)
    generator = torch.Generator().manual_seed(4)
    for _ in range(steps):
        for p, q in zip(eager_params, compiled_params, strict=True):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        eager.step()
        step()
    for p, q in zip(eager_params, compiled_params, strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
        for key, value in eager.state[p].items():
            torch.testing.assert_close(compiled.state[q][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_traced_fused_step_equals_eager(name: str, backend: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo traces the whole step with the kernels as graph nodes (fullgraph), run by the
    ``eager`` compile backend: the same numbers, bit for bit."""
    monkeypatch.setenv("SCALEINV_BACKEND", backend)
    torch._dynamo.reset()
    run_compiled_against_eager(name, "eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@needs_c_compiler
def test_inductor_compiled_fused_step_equals_eager(name: str) -> None:
    torch._dynamo.reset()
    run_compiled_against_eager(name, "inductor")


def test_the_graph_holds_the_kernel_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    if FUSED_CPU.load() is None:
        pytest.skip("no C compiler")
    graphs: list[torch.fx.GraphModule] = []

    def keep(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    params = make_params(5)
    optimizer = AdamP(params, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    torch._dynamo.reset()
    torch.compile(optimizer.step, fullgraph=True, backend=keep)()
    targets = {str(node.target) for g in graphs for node in g.graph.nodes}
    assert any("scaleinv.native_adamp_" in t for t in targets), targets


@needs_c_compiler
@pytest.mark.parametrize("name", ["native_adamp_", "native_sgdp_"])
def test_operators_pass_opcheck(name: str) -> None:
    generator = torch.Generator().manual_seed(6)
    params = [torch.randn(4, 3, generator=generator), torch.randn(5, generator=generator)]
    grads = [torch.randn_like(p) for p in params]
    common = dict(eps=1e-8, weight_decay=0.1, delta=0.1, wd_ratio=0.1, nesterov=False,
                  maximize=False)
    if name == "native_adamp_":
        args = (params, grads, [torch.zeros_like(p) for p in params],
                [torch.zeros_like(p) for p in params], [torch.zeros(()) for _ in params],
                [1, 0], 1e-3, None, 0.9, 0.999)
    else:
        args = (params, grads, [torch.zeros_like(p) for p in params], [1, 0], 0.1, None, 0.9,
                0.0)
        common["project_buffer"] = False
    torch.library.opcheck(getattr(torch.ops.scaleinv, name).default, args, common,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_meta_tensors_are_refused_with_a_clear_error() -> None:
    p = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    p.grad = torch.empty(4, 3, device="meta")
    for optimizer in (AdamP([p]), SGDP([p], lr=0.1), AdamP([p], fused=True)):
        with pytest.raises(ValueError, match="cannot step meta tensors"):
            optimizer.step()
