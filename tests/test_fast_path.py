"""The fast paths: the sync-free multi-tensor body under ``torch.compile``, and ``fused=True``.

* ``torch.compile(opt.step, fullgraph=True)`` traces the ``foreach=True`` body of AdamP and
  SGDP without a graph break (the CPU-checkable proof that a step never reads a number back
  from the device), compiles once, and agrees with the eager single-tensor body (bitwise
  ``adamp`` 0.3.0) to round-off: every branch of the cosine test, nesterov, annotated groups,
  ``capturable``.
* ``fused=True`` agrees with the single-tensor body to round-off, through both CPU backends:
  the C kernels (``"native"``) and the per-tensor bodies of the compiled backend run eagerly
  (``"eager"``). Layouts cover channels_last weights with contiguous gradients, weights whose
  rows are not contiguous (left to the multi-tensor body), rows longer than the kernels' row
  buffer, float64 and complex weights, ``maximize`` and every annotation.
* The compiled backend through inductor is checked in a ``slow`` test (it compiles for about a
  minute on a small CPU).
"""

from __future__ import annotations

import importlib
import warnings

import adamp as official
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from reference import (
    EXPECTED_VIEW,
    ReferenceAdamP,
    ReferenceSGDP,
    assert_round_off_close,
    copy_params,
    initial_params,
    make_grad,
)
from scaleinv import SGDP, AdamP

FUSED = importlib.import_module("scaleinv.fused")
FUSED_CPU = importlib.import_module("scaleinv._fused_cpu")
STEPS = 6
needs_c_compiler = pytest.mark.skipif(FUSED_CPU.load() is None,
                                      reason="the fused CPU kernels need a C compiler")

# ---------------------------------------------------------------------------------------------
# torch.compile over the multi-tensor body

COMPILE_SHAPES = [(6,), (4, 5), (3, 2, 3), (5, 2, 3, 3), (4, 6), (6, 4), (4, 3, 2, 2), (5,),
                  (3, 4)]
COMPILE_KINDS = ["random", "channel", "layer", "none", "channel", "layer", "channel", "random",
                 "layer"]


def annotated_groups(params: list[torch.Tensor], optimizer: str) -> list[dict]:
    """The cosine test, nesterov, each annotation, and hyperparameters that differ by group."""
    if optimizer == "adamp":
        return [
            {"params": params[:4]},
            {"params": params[4:6], "nesterov": True, "weight_decay": 0.1,
             "scale_invariant": "channel"},
            {"params": [params[6]], "scale_invariant": "layer", "betas": (0.5, 0.99)},
            {"params": params[7:], "scale_invariant": False, "weight_decay": 0.2},
        ]
    return [
        {"params": params[:4]},
        {"params": params[4:6], "nesterov": True, "scale_invariant": "channel"},
        {"params": [params[6]], "scale_invariant": "layer", "project_momentum": True,
         "dampening": 0.3},
        {"params": params[7:], "scale_invariant": False, "project_momentum": True},
    ]


def build(optimizer: str, groups: list[dict], **kwargs) -> torch.optim.Optimizer:
    if optimizer == "adamp":
        return AdamP(groups, lr=1e-2, weight_decay=0.05, **kwargs)
    return SGDP(groups, lr=1e-2, momentum=0.9, weight_decay=0.05, **kwargs)


@pytest.mark.parametrize(("optimizer", "options"), [
    ("adamp", {}), ("adamp", {"capturable": True}), ("sgdp", {}),
])
def test_compiled_foreach_step_has_no_graph_break(optimizer: str, options: dict) -> None:
    torch._dynamo.reset()
    init = initial_params(COMPILE_SHAPES, seed=3)
    eager_params, compiled_params = copy_params(init), copy_params(init)
    eager = build(optimizer, annotated_groups(eager_params, optimizer), foreach=False)
    ours = build(optimizer, annotated_groups(compiled_params, optimizer), foreach=True,
                 **options)
    counter = CompileCounter()
    compiled_step = torch.compile(ours.step, backend=counter, fullgraph=True)
    generator = torch.Generator().manual_seed(3)
    for step in range(STEPS):
        grads = [make_grad(w.detach(), kind, generator)
                 for w, kind in zip(eager_params, COMPILE_KINDS, strict=True)]
        for w_eager, w_compiled, g in zip(eager_params, compiled_params, grads, strict=True):
            w_eager.grad, w_compiled.grad = g.clone(), g.clone()
        eager.step()
        # The first step creates the state, which changes what the graph guards on.
        ours.step() if step == 0 else compiled_step()
    assert counter.frame_count == 1  # one graph (fullgraph: no break), never recompiled
    for w_compiled, w_eager in zip(compiled_params, eager_params, strict=True):
        assert_round_off_close(w_compiled, w_eager, STEPS)


# ---------------------------------------------------------------------------------------------
# fused=True against the single-tensor body


def fused_layout() -> tuple[list[torch.Tensor], list[str]]:
    """Weights (with their gradient kinds) and the groups they go in; see the module doc."""
    generator = torch.Generator().manual_seed(11)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype)

    column_major = randn(6, 4).t()  # rows of the (4, 6) weight are not contiguous blocks
    weights = [
        randn(6), randn(4, 5), randn(3, 2, 3), randn(5, 2, 3, 3),
        randn(6, 3, 2, 2).contiguous(memory_format=torch.channels_last),
        randn(3, 8200), randn(3, 4, dtype=torch.complex64),
        column_major, randn(4, 3, dtype=torch.float64), randn(2, 9000), randn(5),
        randn(4, 5), randn(3, 2, 2), randn(5, 3), randn(4, 4), randn(7),
    ]
    kinds = ["random", "channel", "layer", "none", "channel", "channel", "complex",
             "channel", "layer", "layer", "random",
             "none", "random", "random", "channel", "random"]
    params = [torch.nn.Parameter(w.clone(memory_format=torch.preserve_format))
              for w in weights]
    return params, kinds


def fused_groups(params: list[torch.Tensor], optimizer: str) -> list[dict]:
    if optimizer == "adamp":
        specials: list[dict] = [
            {"nesterov": True, "maximize": True, "weight_decay": 0.1},
            {"scale_invariant": "channel", "weight_decay": 0.05},
            {"scale_invariant": "layer", "betas": (0.5, 0.9)},
            {"scale_invariant": False, "weight_decay": 0.2},
        ]
    else:
        specials = [
            {"nesterov": True, "maximize": True, "weight_decay": 0.1},
            {"scale_invariant": "channel", "project_momentum": True, "dampening": 0.3},
            {"scale_invariant": "layer", "project_momentum": True},
            {"scale_invariant": False, "weight_decay": 0.2, "momentum": 0.5},
        ]
    bounds = [0, 7, 11, 13, 14, 16]
    groups = [{"params": params[bounds[0]:bounds[1]]}]
    for special, start, stop in zip(specials, bounds[1:-1], bounds[2:], strict=True):
        groups.append({"params": params[start:stop], **special})
    return groups


def gradient(w: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "complex":
        return torch.randn(w.shape, generator=generator, dtype=w.dtype)
    real = make_grad(w.detach().contiguous(), kind, generator)
    return real.to(w.dtype)


def run_fused_against_single(optimizer: str) -> None:
    params, kinds = fused_layout()
    single_params = [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format))
                     for p in params]
    fused = build(optimizer, fused_groups(params, optimizer), fused=True)
    single = build(optimizer, fused_groups(single_params, optimizer), foreach=False)
    generator = torch.Generator().manual_seed(12)
    for _ in range(STEPS):
        grads = [gradient(w, kind, generator)
                 for w, kind in zip(single_params, kinds, strict=True)]
        for w_fused, w_single, g in zip(params, single_params, grads, strict=True):
            w_single.grad = torch.empty_like(w_single).copy_(g)
            w_fused.grad = g.contiguous()  # unlike the channels_last weight: copied
        single.step()
        fused.step()
    for w_fused, w_single in zip(params, single_params, strict=True):
        assert w_fused.stride() == w_single.stride()
        assert_round_off_close(w_fused, w_single, STEPS)
    for w_fused, w_single in zip(params, single_params, strict=True):
        for key, value in single.state[w_single].items():
            assert_round_off_close(fused.state[w_fused][key], value, STEPS)


@needs_c_compiler
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_fused_native_matches_single_tensor(optimizer: str) -> None:
    assert FUSED.default_backend(torch.device("cpu"), torch.float32) == "native"
    run_fused_against_single(optimizer)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_fused_tensorwise_bodies_match_single_tensor(optimizer: str, monkeypatch) -> None:
    """The compiled backend's per-tensor bodies, run without compiling them."""
    monkeypatch.setenv("SCALEINV_BACKEND", "eager")
    run_fused_against_single(optimizer)


@needs_c_compiler
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_fused_matches_official(optimizer: str) -> None:
    shapes = [(5,), (4, 5), (3, 2, 3), (5, 2, 3, 3), (4, 3, 2, 2), (3, 8200)]
    kinds = ["random", "channel", "layer", "none", "random", "channel"]
    init = initial_params(shapes, seed=21)
    theirs_params, ours_params = copy_params(init), copy_params(init)
    if optimizer == "adamp":
        theirs = official.AdamP(theirs_params, lr=1e-2, weight_decay=0.1, nesterov=True)
        ours: torch.optim.Optimizer = AdamP(ours_params, lr=1e-2, weight_decay=0.1,
                                            nesterov=True, fused=True)
    else:
        theirs = official.SGDP(theirs_params, lr=1e-2, momentum=0.9, weight_decay=0.1)
        ours = SGDP(ours_params, lr=1e-2, momentum=0.9, weight_decay=0.1,
                    project_momentum=True, fused=True)
    generator = torch.Generator().manual_seed(21)
    for _ in range(STEPS):
        for w_theirs, w_ours, kind in zip(theirs_params, ours_params, kinds, strict=True):
            w_theirs.grad = make_grad(w_theirs.detach(), kind, generator)
            w_ours.grad = w_theirs.grad.clone()
        theirs.step()
        ours.step()
    for w_ours, w_theirs in zip(ours_params, theirs_params, strict=True):
        assert_round_off_close(w_ours, w_theirs, STEPS)


# ---------------------------------------------------------------------------------------------
# The C kernels themselves: the branch taken, and the float64 maths


KERNEL_SHAPES = [(7,), (5, 4, 3, 3), (6, 20), (4, 3, 2), (3, 9000), (2, 9000), (4, 9000)]
KERNEL_KINDS = ["random", "channel", "layer", "none", "channel", "layer", "none"]


TEST_MODES = ["AUTO", "AUTO_TWO_PASS"]  # test first, or its sums gathered in the first pass


@needs_c_compiler
@pytest.mark.parametrize("test_mode", TEST_MODES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_native_adamp_kernel_branches_and_maths(nesterov: bool, test_mode: str) -> None:
    params = initial_params(KERNEL_SHAPES, seed=31)
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, delta=0.1, wd_ratio=0.1)
    reference = ReferenceAdamP(params, nesterov=nesterov, **hp)
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    auto = getattr(FUSED_CPU, f"MODE_{test_mode}")
    modes = [auto if p.dim() >= 2 else FUSED_CPU.MODE_PLAIN for p in params]
    generator = torch.Generator().manual_seed(31)
    for _ in range(STEPS):
        grads = [make_grad(w, kind, generator) for w, kind in zip(params, KERNEL_KINDS,
                                                                    strict=True)]
        reference.step(grads)
        views = FUSED_CPU.adamp_step(
            params, grads, exp_avgs, exp_avg_sqs, steps, modes, lr=hp["lr"], beta1=0.9,
            beta2=0.999, eps=hp["eps"], decay_plain=1 - 1e-2 * 0.1,
            decay_projected=1 - 1e-2 * 0.1 * 0.1, delta=0.1, nesterov=nesterov,
            maximize=False,
        )
        assert views == reference.views[-1]
        assert views[1:] == [EXPECTED_VIEW[k] for k in KERNEL_KINDS[1:]]
    assert [s.item() for s in steps] == [STEPS] * len(params)
    for w, w_reference in zip(params, reference.params, strict=True):
        assert_round_off_close(w, w_reference, STEPS)


@needs_c_compiler
@pytest.mark.parametrize("test_mode", TEST_MODES)
@pytest.mark.parametrize(("nesterov", "project_buffer"), [(False, False), (True, False),
                                                           (False, True)])
def test_native_sgdp_kernel_branches_and_maths(nesterov: bool, project_buffer: bool,
                                               test_mode: str) -> None:
    params = initial_params(KERNEL_SHAPES, seed=33)
    hp = dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.1, eps=1e-8, delta=0.1,
              wd_ratio=0.1)
    reference = ReferenceSGDP(params, nesterov=nesterov, project_momentum=project_buffer, **hp)
    buffers = [torch.zeros_like(p) for p in params]
    auto = getattr(FUSED_CPU, f"MODE_{test_mode}")
    modes = [auto if p.dim() >= 2 else FUSED_CPU.MODE_PLAIN for p in params]
    generator = torch.Generator().manual_seed(33)
    for _ in range(STEPS):
        grads = [make_grad(w, kind, generator) for w, kind in zip(params, KERNEL_KINDS,
                                                                    strict=True)]
        reference.step(grads)
        views = FUSED_CPU.sgdp_step(
            params, grads, buffers, modes, lr=1e-2, momentum=0.9, dampening=0.0, eps=1e-8,
            decay_plain=1 - 1e-2 * 0.1 / 0.1, decay_projected=1 - 1e-2 * 0.1 * 0.1 / 0.1,
            delta=0.1, nesterov=nesterov, project_buffer=project_buffer, maximize=False,
        )
        assert views == reference.views[-1]
    for w, w_reference in zip(params, reference.params, strict=True):
        assert_round_off_close(w, w_reference, STEPS)
    for b, b_reference in zip(buffers, reference.buffers, strict=True):
        assert_round_off_close(b, b_reference, STEPS)


# ---------------------------------------------------------------------------------------------
# Options and fallbacks


def test_fused_and_foreach_together_are_refused() -> None:
    w = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        AdamP([w], fused=True, foreach=True)
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        SGDP([w], lr=0.1, fused=True, foreach=True)


@needs_c_compiler
def test_unknown_backend_and_native_off_cpu_are_refused() -> None:
    w, g, m, v = (torch.randn(3, 4) for _ in range(4))
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              delta=0.1, wd_ratio=0.1, nesterov=False, maximize=False, scale_invariant="auto")
    with pytest.raises(ValueError, match="Invalid fused backend"):
        FUSED.fused_adamp([w], [g], [m], [v], [torch.zeros(())], backend="cuda", **hp)
    meta = [t.to("meta") for t in (w, g, m, v)]
    with pytest.raises(ValueError, match="native fused backend cannot step"):
        FUSED.fused_adamp(*([t] for t in meta), [torch.zeros(())], backend="native", **hp)


def test_without_a_compiler_the_cpu_falls_back_to_foreach(monkeypatch) -> None:
    monkeypatch.setattr(FUSED_CPU, "_library", None)
    monkeypatch.setattr(FUSED_CPU, "_load_failed", False)
    monkeypatch.setattr(importlib.import_module("scaleinv._cbuild"), "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="C compiler"):
        assert FUSED_CPU.load() is None
    assert FUSED.default_backend(torch.device("cpu"), torch.float32) == "foreach"
    init = initial_params([(4, 5), (5,)], seed=41)
    fused_params, single_params = copy_params(init), copy_params(init)
    fused, single = AdamP(fused_params, fused=True), AdamP(single_params, foreach=False)
    for w_fused, w_single in zip(fused_params, single_params, strict=True):
        w_fused.grad = w_single.grad = torch.ones_like(w_single)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every step
        fused.step()
    single.step()
    for w_fused, w_single in zip(fused_params, single_params, strict=True):
        assert_round_off_close(w_fused, w_single, 1)


def test_the_cpu_default_for_half_precision_is_foreach() -> None:
    assert FUSED.default_backend(torch.device("cpu"), torch.bfloat16) == "foreach"


# ---------------------------------------------------------------------------------------------
# The compiled backend through inductor (C++ on CPU, Triton on CUDA)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_fused_compiled_backend_matches_single_tensor(optimizer: str, monkeypatch) -> None:
    monkeypatch.setenv("SCALEINV_BACKEND", "compiled")
    run_fused_against_single(optimizer)


@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_c_compiler), "eager"])
def test_fused_with_tensor_lr_and_capturable(backend: str, monkeypatch) -> None:
    """A tensor ``lr`` and step counters kept like ``capturable=True`` wants them: the
    per-tensor bodies then take the bias corrections and decay factors as tensors (the path
    that keeps a CUDA step free of host reads)."""
    monkeypatch.setenv("SCALEINV_BACKEND", backend)
    init = initial_params(COMPILE_SHAPES, seed=51)
    fused_params, single_params = copy_params(init), copy_params(init)
    fused = AdamP(fused_params, lr=torch.tensor(1e-2), weight_decay=0.1, fused=True,
                  capturable=True)
    single = AdamP(single_params, lr=1e-2, weight_decay=0.1, foreach=False)
    generator = torch.Generator().manual_seed(51)
    for _ in range(STEPS):
        for w_fused, w_single, kind in zip(fused_params, single_params, COMPILE_KINDS,
                                           strict=True):
            w_single.grad = make_grad(w_single.detach(), kind, generator)
            w_fused.grad = w_single.grad.clone()
        fused.step()
        single.step()
    for w_fused, w_single in zip(fused_params, single_params, strict=True):
        assert_round_off_close(w_fused, w_single, STEPS)
