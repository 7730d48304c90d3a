"""The Triton backend of the fused path (``scaleinv._fused_triton``), checked on a CPU through
Triton's interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``) and on
CUDA as they are. Skipped where Triton is not installed (an optional dependency; ``.ci/run``
installs it).

* The whole optimizer with the ``"triton"`` backend agrees with the single-tensor body (bitwise
  ``adamp`` 0.3.0) to round-off over the layouts of ``test_fast_path``: channels_last, rows
  that are not blocks of memory (left to the multi-tensor body), rows too long for registers,
  complex weights, ``maximize``, nesterov and every annotation.
* The kernels alone, against the float64-formula reference, with gradients that make each
  branch of the cosine test fire (a wrong branch moves the weights by far more than round-off).
* The step sizes as a device array: a tensor ``lr``, and step counters that differ in a group.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from reference import (
    ReferenceAdamP,
    ReferenceSGDP,
    assert_round_off_close,
    copy_params,
    initial_params,
    make_grad,
)
from scaleinv import SGDP, AdamP
from test_fast_path import run_fused_against_single

pytest.importorskip("triton")

FUSED = importlib.import_module("scaleinv.fused")
KERNELS = importlib.import_module("scaleinv._fused_triton")
CONSTANTS = importlib.import_module("scaleinv._constants")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEPS = 4
SHAPES = [(7,), (5, 4, 3, 3), (6, 20), (4, 3, 2), (3, 9000), (2, 9000), (4, 9000), (12000,)]
KINDS = ["random", "channel", "layer", "none", "channel", "layer", "none", "random"]
HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def interpreter_chunks(monkeypatch) -> None:
    """Under the interpreter, whose cost grows with the number of chunks, rows are read in
    chunks of 1024 (still several per row of 9000) instead of the GPU's default."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        monkeypatch.setattr(KERNELS, "BLOCK", 1024)


TRITON_WHERE_IT_CAN = "triton,eager"  # SCALEINV_BACKEND: the first that runs per dtype


@pytest.mark.slow  # 75 s in the interpreter; tests/test_matrix.py covers Triton by default
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU layouts, for the interpreter; on CUDA see tests/test_gpu.py")
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_triton_backend_matches_single_tensor(optimizer: str, monkeypatch) -> None:
    monkeypatch.setenv("SCALEINV_BACKEND", TRITON_WHERE_IT_CAN)
    run_fused_against_single(optimizer)


def kernel_params(seed: int) -> list[torch.Tensor]:
    return initial_params(SHAPES, seed)


def to_device(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.to(DEVICE, copy=True) for t in tensors]


def kernel_modes(weights: list[torch.Tensor], annotation: str) -> list[int]:
    mode = getattr(CONSTANTS, f"MODE_{annotation.upper()}")
    return [mode if w.dim() >= 2 else CONSTANTS.MODE_PLAIN for w in weights]


def kernel_step_inputs(weights: list[torch.Tensor], generator: torch.Generator,
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of each kind built from the current weights (on the CPU, for the reference),
    the same on the device, and the weights as the kernels' ``[n, d]`` rows."""
    grads = [make_grad(w.cpu(), kind, generator) for w, kind in zip(weights, KINDS, strict=True)]
    rows = [w.view(w.shape[0] if w.dim() >= 2 else 1, -1) for w in weights]
    return grads, to_device(grads), rows


@pytest.mark.slow  # Triton interpreter: ~1 min each on a busy 2-core machine
@pytest.mark.parametrize("annotation", ["auto", "channel", "layer"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_kernels_branches_and_maths(nesterov: bool, annotation: str) -> None:
    params = kernel_params(seed=31)
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, delta=0.1, wd_ratio=0.1)
    reference = ReferenceAdamP(params, nesterov=nesterov, scale_invariant=annotation, **hp)
    weights = to_device(params)
    exp_avgs = [torch.zeros_like(w) for w in weights]
    exp_avg_sqs = [torch.zeros_like(w) for w in weights]
    steps = [torch.zeros(()) for _ in weights]
    modes = kernel_modes(weights, annotation)
    generator = torch.Generator().manual_seed(31)
    for _ in range(STEPS):
        grads, device_grads, rows = kernel_step_inputs(weights, generator)
        reference.step(grads)
        KERNELS.adamp_step(
            rows, device_grads, exp_avgs, exp_avg_sqs, steps, modes, lr=hp["lr"], beta1=0.9,
            beta2=0.999, eps=hp["eps"], weight_decay=0.1, wd_ratio=0.1, delta=0.1,
            nesterov=nesterov, maximize=False,
        )
    if annotation == "auto":
        assert reference.views[-1][1:7] == ["channel", "layer", None, "channel", "layer", None]
    assert [s.item() for s in steps] == [STEPS] * len(params)
    for w, w_reference in zip(weights, reference.params, strict=True):
        assert_round_off_close(w.cpu(), w_reference, STEPS)


@pytest.mark.slow  # Triton interpreter: ~1 min each on a busy 2-core machine
@pytest.mark.parametrize("annotation", ["auto", "channel"])
@pytest.mark.parametrize(("nesterov", "project_buffer"), [(False, False), (True, False),
                                                           (False, True)])
def test_sgdp_kernels_branches_and_maths(nesterov: bool, project_buffer: bool,
                                         annotation: str) -> None:
    params = kernel_params(seed=33)
    hp = dict(lr=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.1, eps=1e-8, delta=0.1,
              wd_ratio=0.1)
    reference = ReferenceSGDP(params, nesterov=nesterov, project_momentum=project_buffer,
                              scale_invariant=annotation, **hp)
    weights = to_device(params)
    buffers = [torch.zeros_like(w) for w in weights]
    modes = kernel_modes(weights, annotation)
    generator = torch.Generator().manual_seed(33)
    for _ in range(STEPS):
        grads, device_grads, rows = kernel_step_inputs(weights, generator)
        reference.step(grads)
        KERNELS.sgdp_step(
            rows, device_grads, buffers, modes, lr=1e-2, momentum=0.9, dampening=0.2, eps=1e-8,
            decay_plain=1 - 1e-2 * 0.1 / 0.1, decay_projected=1 - 1e-2 * 0.1 * 0.1 / 0.1,
            delta=0.1, nesterov=nesterov, maximize=False, project_buffer=project_buffer,
        )
    for w, w_reference in zip(weights, reference.params, strict=True):
        assert_round_off_close(w.cpu(), w_reference, STEPS)
    for b, b_reference in zip(buffers, reference.buffers, strict=True):
        assert_round_off_close(b.cpu(), b_reference, STEPS)


def lockstep(fused: torch.optim.Optimizer, single: torch.optim.Optimizer,
             fused_params: list[torch.Tensor], single_params: list[torch.Tensor],
             kinds: list[str], steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for w_fused, w_single, kind in zip(fused_params, single_params, kinds, strict=True):
            w_single.grad = make_grad(w_single.detach(), kind, generator)
            w_fused.grad = w_single.grad.to(w_fused.device, w_fused.dtype)
        fused.step()
        single.step()


def test_tensor_lr_gives_device_step_sizes(monkeypatch) -> None:
    monkeypatch.setenv("SCALEINV_BACKEND", TRITON_WHERE_IT_CAN)
    init = kernel_params(seed=51)
    fused_params = [torch.nn.Parameter(w.to(DEVICE)) for w in init]
    single_params = copy_params(init)
    lr = torch.tensor(1e-2, device=DEVICE)
    fused = AdamP(fused_params, lr=lr, weight_decay=0.1, fused=True,
                  capturable=DEVICE.type == "cuda")
    single = AdamP(single_params, lr=1e-2, weight_decay=0.1, foreach=False)
    lockstep(fused, single, fused_params, single_params, KINDS, STEPS, seed=51)
    for w_fused, w_single in zip(fused_params, single_params, strict=True):
        assert_round_off_close(w_fused.cpu(), w_single, STEPS)


def test_step_counters_that_differ_within_a_group(monkeypatch) -> None:
    """A tensor that had no gradient for a while has fewer steps: its bias corrections differ,
    and the kernels take the step sizes per tensor."""
    monkeypatch.setenv("SCALEINV_BACKEND", TRITON_WHERE_IT_CAN)
    init = kernel_params(seed=61)
    fused_params = [torch.nn.Parameter(w.to(DEVICE)) for w in init]
    single_params = copy_params(init)
    fused = AdamP(fused_params, lr=1e-2, weight_decay=0.1, fused=True)
    single = AdamP(single_params, lr=1e-2, weight_decay=0.1, foreach=False)
    lockstep(fused, single, fused_params[:3], single_params[:3], KINDS[:3], 2, seed=61)
    lockstep(fused, single, fused_params, single_params, KINDS, STEPS, seed=62)
    counts = [fused.state[p]["step"].item() for p in fused_params]
    assert counts == [STEPS + 2] * 3 + [STEPS] * (len(SHAPES) - 3)
    for w_fused, w_single in zip(fused_params, single_params, strict=True):
        assert_round_off_close(w_fused.cpu(), w_single, STEPS + 2)


@pytest.mark.slow  # Triton interpreter: ~1 min each on a busy 2-core machine
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_half_precision_follows_float32(optimizer: str, dtype: torch.dtype,
                                        monkeypatch) -> None:
    """Weights and states stored in 16 bits, maths in float32: within a few 16-bit roundings of
    a float32 run from the same (representable) start, over steps that move the weights far
    more than that. The views are given (single pass and, for rows of 9000, two passes), and
    every gradient entry is of size 0.5 to 4, so that Adam's ``v`` stays in float16's range
    (below it, float16 Adam fails in ``torch.optim`` too)."""
    monkeypatch.setenv("SCALEINV_BACKEND", TRITON_WHERE_IT_CAN)
    init = [(w / 4).to(dtype).float() for w in kernel_params(seed=71)]  # 16-bit values
    half_params = [torch.nn.Parameter(w.to(DEVICE, dtype)) for w in init]
    float_params = copy_params(init)

    def groups(params: list[torch.Tensor]) -> list[dict]:
        return [{"params": params[1:3] + params[4:6], "scale_invariant": "channel"},
                {"params": [params[3], params[6]], "scale_invariant": "layer"},
                {"params": [params[0], params[7]]}]

    if optimizer == "adamp":
        half: torch.optim.Optimizer = AdamP(groups(half_params), lr=0.05, fused=True)
        full: torch.optim.Optimizer = AdamP(groups(float_params), lr=0.05, foreach=False)
    else:
        half = SGDP(groups(half_params), lr=0.01, momentum=0.9, fused=True)
        full = SGDP(groups(float_params), lr=0.01, momentum=0.9, foreach=False)
    generator = torch.Generator().manual_seed(71)
    for _ in range(STEPS):
        for w_half, w_float in zip(half_params, float_params, strict=True):
            g = torch.randn(w_float.shape, generator=generator)
            g = (g.sign() * (0.5 + g.abs())).to(dtype)
            w_float.grad = g.float()
            w_half.grad = g.to(DEVICE)
        half.step()
        full.step()
    resolution = torch.finfo(dtype).eps
    for w_half, w_float, w_init in zip(half_params, float_params, init, strict=True):
        error = (w_half.float().cpu() - w_float.detach()).abs().max().item()
        assert error <= 4 * STEPS * resolution * w_float.abs().max().item()
        moved = (w_float.detach() - w_init).abs().max().item()
        assert moved > 3 * error  # the comparison sees the steps, not only the rounding


def test_default_backend_and_refusals(monkeypatch) -> None:
    assert FUSED.default_backend(torch.device("cuda"), torch.float32) == "triton"
    assert FUSED.default_backend(torch.device("cuda"), torch.bfloat16) == "triton"
    assert FUSED.default_backend(torch.device("cuda"), torch.float64) == "compiled"
    w, g, m, v = (torch.randn(3, 4, dtype=torch.float64) for _ in range(4))
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              delta=0.1, wd_ratio=0.1, nesterov=False, maximize=False, scale_invariant="auto")
    with pytest.raises(ValueError, match="triton fused backend cannot step"):
        FUSED.fused_adamp([w], [g], [m], [v], [torch.zeros(())], backend="triton", **hp)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = [t.float() for t in (w, g, m, v)]
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        FUSED.fused_adamp(*([t] for t in cpu), [torch.zeros(())], backend="triton", **hp)


def test_fused_none_takes_the_triton_path_where_it_runs(monkeypatch) -> None:
    """``fused=None`` (the default): fused where the Triton kernels run (CUDA; stood in for
    here by the interpreter on the CPU), unless ``foreach`` is given or the step is compiled;
    the result equals an explicit ``fused=True``, and the step counters live on the device."""
    backends = importlib.import_module("scaleinv.backends")
    adamp_module = importlib.import_module("scaleinv.adamp")
    calls: list[str] = []
    fused_adamp = adamp_module.fused_adamp

    def recording(*args, **kwargs) -> list[int]:
        calls.append("fused")
        return fused_adamp(*args, **kwargs)

    monkeypatch.setattr(adamp_module, "fused_adamp", recording)
    monkeypatch.setattr(FUSED, "default_backend", lambda device, dtype: (
        "triton" if KERNELS.supports(dtype) else "eager"))
    monkeypatch.setattr(backends, "fused_by_default", lambda p: p.device.type == DEVICE.type)
    init = kernel_params(seed=81)
    default_params = [torch.nn.Parameter(w.to(DEVICE)) for w in init]
    explicit_params = [torch.nn.Parameter(w.to(DEVICE)) for w in init]
    default = AdamP(default_params, lr=1e-2, weight_decay=0.1)
    explicit = AdamP(explicit_params, lr=1e-2, weight_decay=0.1, fused=True)
    lockstep(default, explicit, default_params, explicit_params, KINDS, 2, seed=81)
    assert calls == ["fused"] * 4
    assert all(default.state[p]["step"].device == DEVICE for p in default_params)
    assert default.param_groups[0]["fused"] is None  # the option itself is left as given
    for w_default, w_explicit in zip(default_params, explicit_params, strict=True):
        assert torch.equal(w_default, w_explicit)
    assert not backends.resolve_fused(None, True, default_params)
    assert not backends.resolve_fused(False, None, default_params)
    assert not backends.resolve_fused(None, None, [])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # custom ops: traceable
    assert backends.resolve_fused(None, None, default_params)


def test_fused_by_default_only_on_cuda() -> None:
    backends = importlib.import_module("scaleinv.backends")
    assert not backends.fused_by_default(torch.zeros(2, 3))
    if torch.cuda.is_available():
        assert backends.fused_by_default(torch.zeros(2, 3, device="cuda"))
        assert not backends.fused_by_default(
            torch.zeros(2, 3, device="cuda", dtype=torch.float64))
