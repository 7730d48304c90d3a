"""The checks PyTorch runs on every ``torch.optim`` optimizer, for AdamP, SGDP and ``project``.

The optimizers are described with PyTorch's own test metadata,
``torch.testing._internal.common_optimizers`` (``OptimizerInfo``: the class, a function giving
the constructor kwargs to try, ``supported_impls`` beside the for-loop, and
``ErrorOptimizerInput``: inputs that must be refused), and driven by the checks below, written
from what PyTorch's generic optimizer tests verify:

* ``state_dict`` round trips (in memory, ``torch.save``/``torch.load(weights_only=True)``,
  deterministic repeat), older state_dicts (without the newer group options, a ``step`` saved
  as a Python number) and pickles of older optimizers;
* foreach and fused vs the for-loop in float64, float32, bfloat16 and float16, and with mixed
  dtypes in one group;
* a tensor ``lr`` equals the float, also under an LR scheduler;
* complex parameters equal their ``view_as_real`` counterparts;
* ``maximize`` equals minimising ``-loss``, and leaves ``p.grad`` unchanged;
* step pre/post hooks (per optimizer and global), ``state_dict`` and ``load_state_dict`` hooks;
* ``deepcopy`` and ``pickle`` give an independent optimizer that continues identically;
* param groups with their own hyperparameters equal separate optimizers;
* ``zero_grad`` (to ``None`` and to zeros), a step without gradients is a no-op, a closure's
  loss is returned, the loss goes down on a small model, ``repr`` works;
* errors: bad hyperparameters, non-leaf and duplicate params, sparse gradients.

Not applicable here, and why:

* ``differentiable=True``: none of the three supports it (the steps run under ``no_grad``).
* capturable / CUDA graphs, ``fused`` on CUDA, multiple devices, loading CUDA state on the CPU,
  the CUDA defaulting to foreach: need a GPU (``tests/test_gpu.py`` covers the GPU paths where
  one exists).
* sparse gradients: not supported (checked as an error instead).
* ``GradScaler`` / ``grad_scale`` and ``found_inf``: part of the mixed-precision work, tested
  with it.
* foreach on tensors larger than 2**31 elements: memory of the test machines.
* ``project(AdamW)`` with a tensor ``lr`` and ``foreach=True``: torch's AdamW refuses it; fused
  vs for-loop in float16: torch's own AdamW differs by ~1e-2 there (fused computes in float32).
* float16 with ``eps=1e-8``: NaN in every implementation (eps underflows); the float16
  comparisons use ``eps=1e-4``.

float64 params on the multi-tensor paths keep float64 precision (their decay factors are
formed in float64): ``test_float64_foreach_keeps_float64_precision``.
"""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

common = pytest.importorskip(
    "torch.testing._internal.common_optimizers",
    reason="torch's test metadata needs the 'expecttest' package",
)
ErrorOptimizerInput = common.ErrorOptimizerInput
OptimizerErrorEnum = common.OptimizerErrorEnum
OptimizerInfo = common.OptimizerInfo
OptimizerInput = common.OptimizerInput

from scaleinv import SGDP, AdamP, project  # noqa: E402

DEVICE = "cpu"


# --- the optimizers under test ---------------------------------------------------------------


def _inputs(*kwargs_list: dict[str, Any]) -> list[Any]:
    return [
        OptimizerInput(params=None, kwargs=kwargs,
                       desc=", ".join(f"{k}={_show(v)}" for k, v in kwargs.items()) or "default")
        for kwargs in kwargs_list
    ]


def _show(value: Any) -> str:
    return f"tensor({value.item():g})" if torch.is_tensor(value) else str(value)


def adamp_inputs(device: str, dtype: torch.dtype | None = None) -> list[Any]:
    return _inputs(
        {}, {"lr": 0.02}, {"lr": torch.tensor(0.01, dtype=torch.float64)}, {"weight_decay": 0.1},
        {"weight_decay": 0.1, "maximize": True}, {"betas": (0.8, 0.95), "eps": 1e-6},
        {"nesterov": True, "weight_decay": 0.1}, {"delta": 0.5, "wd_ratio": 0.5,
                                                   "weight_decay": 0.1},
        {"scale_invariant": False, "weight_decay": 0.1},
    )


def sgdp_inputs(device: str, dtype: torch.dtype | None = None) -> list[Any]:
    return _inputs(
        {"lr": 0.05}, {"lr": torch.tensor(0.05, dtype=torch.float64), "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True},
        {"lr": 0.05, "momentum": 0.5, "dampening": 0.5},
        {"lr": 0.05, "momentum": 0.9, "project_momentum": True, "weight_decay": 0.1},
        {"lr": 0.05, "nesterov": True},
    )


def ProjectedAdamW(params: Any, *, delta: float = 0.1, wd_ratio: float = 0.1,  # noqa: N802
                   **kwargs: Any) -> torch.optim.Optimizer:
    """``project(torch.optim.AdamW(params, **kwargs), delta, wd_ratio)``."""
    return project(torch.optim.AdamW(params, **kwargs), delta=delta, wd_ratio=wd_ratio)


def projected_inputs(device: str, dtype: torch.dtype | None = None) -> list[Any]:
    return _inputs(
        {}, {"lr": torch.tensor(0.01, dtype=torch.float64)},
        {"weight_decay": 0.1, "maximize": True},
        {"delta": 0.5, "wd_ratio": 0.5, "weight_decay": 0.1},
    )


def adamp_errors(device: str, dtype: torch.dtype | None = None) -> list[Any]:
    return _errors([
        ({"lr": -1.0}, ValueError, "lr"), ({"betas": (1.0, 0.9)}, ValueError, r"betas\[0\]"),
        ({"betas": (0.9,)}, ValueError, "betas"), ({"eps": -1.0}, ValueError, "eps"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"), ({"delta": 0.0}, ValueError, "delta"),
        ({"wd_ratio": 2.0}, ValueError, "wd_ratio"),
        ({"scale_invariant": "row"}, ValueError, "scale_invariant"),
        ({"fused": True, "foreach": True}, ValueError, "fused"),
        ({"capturable": True, "foreach": False}, ValueError, "capturable"),
        ({"lr": "0.1"}, TypeError, "lr"),
    ])


def sgdp_errors(device: str, dtype: torch.dtype | None = None) -> list[Any]:
    return _errors([
        ({}, ValueError, "lr"), ({"lr": -1.0}, ValueError, "lr"),
        ({"lr": 0.1, "momentum": 1.0}, ValueError, "momentum"),
        ({"lr": 0.1, "dampening": 1.5}, ValueError, "dampening"),
        ({"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, ValueError,
         "dampening"),
        ({"lr": 0.1, "wd_ratio": -0.1}, ValueError, "wd_ratio"),
    ])


def projected_errors(device: str, dtype: torch.dtype | None = None) -> list[Any]:
    return _errors([
        ({"delta": 0.0}, ValueError, "delta"), ({"wd_ratio": 2.0}, ValueError, "wd_ratio"),
        ({"lr": -1.0}, ValueError, "learning rate"),
    ])


def _errors(cases: list[tuple[dict[str, Any], type, str]]) -> list[Any]:
    return [
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs=kwargs, desc=regex),
                            error_type=error, error_regex=regex)
        for kwargs, error, regex in cases
    ]


OPTIM_INFOS = [
    OptimizerInfo(AdamP, optim_inputs_func=adamp_inputs, optim_error_inputs_func=adamp_errors,
                  supported_impls=("foreach", "fused"), supports_fused_on=("cpu",),
                  has_capturable_arg=True),
    OptimizerInfo(SGDP, optim_inputs_func=sgdp_inputs, optim_error_inputs_func=sgdp_errors,
                  supported_impls=("foreach", "fused"), supports_fused_on=("cpu",)),
    OptimizerInfo(ProjectedAdamW, optim_inputs_func=projected_inputs,
                  optim_error_inputs_func=projected_errors,
                  supported_impls=("foreach", "fused"), supports_fused_on=("cpu",)),
]


def _cases(with_impl: bool = False) -> list[Any]:
    cases = []
    for info in OPTIM_INFOS:
        for optim_input in info.optim_inputs_func(DEVICE):
            impls = ("forloop", *info.supported_impls) if with_impl else ("forloop",)
            for impl in impls:
                if (info.optim_cls is ProjectedAdamW and impl == "foreach"
                        and torch.is_tensor(optim_input.kwargs.get("lr"))):
                    continue  # torch's AdamW refuses a tensor lr with foreach=True
                cases.append(pytest.param(info, optim_input, impl,
                                          id=f"{info.name}-{optim_input.desc}-{impl}"))
    return cases


def _error_cases() -> list[Any]:
    return [
        pytest.param(info, error, id=f"{info.name}-{error.optimizer_error_input.desc}")
        for info in OPTIM_INFOS for error in info.optim_error_inputs_func(DEVICE)
    ]


def _impl_kwargs(info: Any, impl: str) -> dict[str, Any]:
    if impl == "forloop":
        return {flag: False for flag in info.supported_impls}
    return {**{flag: False for flag in info.supported_impls}, impl: True}


# --- a small problem whose weights are scale-invariant --------------------------------------


def make_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    """A batch-normalised layer (its rows are scale-invariant), a conv-shaped weight, biases."""
    generator = torch.Generator().manual_seed(seed)
    real = dtype.to_real() if dtype.is_complex else dtype
    shapes = [(6, 5), (6,), (3, 6), (3,), (2, 3, 2, 2)]
    tensors = [torch.randn(shape, generator=generator, dtype=real) for shape in shapes]
    if dtype.is_complex:
        tensors = [torch.complex(t, torch.randn(t.shape, generator=generator, dtype=real))
                   for t in tensors]
    return [t.to(dtype).requires_grad_(True) for t in tensors]


def loss_of(params: list[torch.Tensor], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w1, b1, w2, b2, w3 = params
    x = torch.randn(16, 5, generator=generator, dtype=torch.float64).to(w1.dtype)
    target = torch.randn(16, 3, generator=generator, dtype=torch.float64).to(w1.dtype)
    hidden = F.batch_norm(F.linear(x, w1), None, None, training=True) + b1
    out = F.linear(torch.tanh(hidden), w2, b2)
    return F.mse_loss(out, target) + 1e-2 * (w3.float() ** 2).sum().to(w1.dtype)


def set_grads(params: list[torch.Tensor], step: int) -> None:
    """Gradients of :func:`loss_of` for real params; seeded Gaussians for complex ones."""
    if params[0].is_complex():
        generator = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        return
    for p in params:
        p.grad = None
    loss_of(params, step).backward()


def run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int,
        start: int = 0) -> None:
    for step in range(start, start + steps):
        set_grads(params, step)
        optimizer.step()


def clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(True) for p in params]


def build(info: Any, optim_input: Any, params: Any, **extra: Any) -> torch.optim.Optimizer:
    kwargs = {**copy.deepcopy(optim_input.kwargs), **extra}
    return info.optim_cls(params, **kwargs)


def assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor], **tol: Any) -> None:
    for a, e in zip(actual, expected, strict=True):
        if tol:
            torch.testing.assert_close(a.detach(), e.detach(), **tol)
        else:
            assert torch.equal(a.detach(), e.detach())


def save_load(obj: Any, weights_only: bool = True) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only)


# --- state_dict --------------------------------------------------------------------------------


@pytest.mark.parametrize(("info", "optim_input", "impl"), _cases())
def test_state_dict_round_trip(info: Any, optim_input: Any, impl: str) -> None:
    """Save mid-run (in memory and through a file), load into a fresh optimizer on copies of
    the params: it continues bit for bit like the original, and its state_dict is the same."""
    params = make_params()
    optimizer = build(info, optim_input, params)
    run(optimizer, params, 3)
    saved = optimizer.state_dict()
    for state_dict in (copy.deepcopy(saved), save_load(saved)):
        other_params = clone(params)
        other = build(info, optim_input, other_params)
        other.load_state_dict(state_dict)
        again = other.state_dict()
        assert again["param_groups"] == saved["param_groups"]
        assert save_load(again)["state"].keys() == saved["state"].keys()
        run(other, other_params, 3, start=3)
        reference_params = clone(params)
        reference = build(info, optim_input, reference_params)
        reference.load_state_dict(copy.deepcopy(saved))
        run(reference, reference_params, 3, start=3)
        assert_same(other_params, reference_params)
    run(optimizer, params, 3, start=3)
    assert_same(params, reference_params)


NEWER_KEYS = ("maximize", "foreach", "fused", "capturable", "differentiable", "scale_invariant",
              "allow_flat_params", "project_momentum")


def newer_keys(info: Any) -> tuple[str, ...]:
    """Group options an older checkpoint or pickle may lack: for AdamP/SGDP everything beyond
    ``adamp`` 0.3.0; for the wrapper, torch's newer AdamW options (its own ``delta``,
    ``wd_ratio`` and ``scale_invariant`` have been there since it exists)."""
    if info.optim_cls is ProjectedAdamW:
        return ("maximize", "foreach", "fused", "capturable", "differentiable")
    return NEWER_KEYS


@pytest.mark.parametrize(("info", "optim_input", "impl"), _cases())
def test_load_older_state_dict(info: Any, optim_input: Any, impl: str) -> None:
    """A state_dict without the newer group options (and, for AdamP, with ``step`` saved as a
    Python number, as ``adamp`` 0.3.0 does) continues like the current one; so does a pickle
    of an optimizer from before those options."""
    params = make_params()
    optimizer = build(info, optim_input, params)
    run(optimizer, params, 2)
    state_dict = copy.deepcopy(optimizer.state_dict())
    for group in state_dict["param_groups"]:
        for key in newer_keys(info):
            if group.get(key) in (False, None, "auto"):
                group.pop(key, None)
    for entry in state_dict["state"].values():
        if torch.is_tensor(entry.get("step")):
            entry["step"] = int(entry["step"].item())
    older_params = clone(params)
    older = build(info, optim_input, older_params)
    older.load_state_dict(state_dict)
    assert older.param_groups[0].keys() == optimizer.param_groups[0].keys()

    pickled = pickle.loads(pickle.dumps(optimizer))
    for group in pickled.param_groups:
        for key in newer_keys(info):
            if group.get(key) in (False, None, "auto"):
                group.pop(key, None)
    unpickled = pickle.loads(pickle.dumps(pickled))
    assert unpickled.param_groups[0].keys() == optimizer.param_groups[0].keys()

    run(older, older_params, 2, start=2)
    run(optimizer, params, 2, start=2)
    assert_same(older_params, params)


# --- implementations and dtypes ----------------------------------------------------------------


# float64 at float32 precision: the multi-tensor paths compute their per-tensor decay factors
# as float32 tensors (see test_float64_foreach_keeps_float64_precision); 16-bit: a few ulps of
# values around 1 after one step.
TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2), torch.float16: dict(rtol=5e-3, atol=1e-2),
}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize(("info", "optim_input", "impl"),
                         [c for c in _cases(with_impl=True) if c.values[2] != "forloop"])
def test_impl_matches_forloop(info: Any, optim_input: Any, impl: str,
                              dtype: torch.dtype) -> None:
    """foreach / fused steps equal the for-loop's in every floating dtype (16-bit: 1 step,
    within a few of their ulps; float32/64: 4 steps)."""
    if info.optim_cls is ProjectedAdamW and impl == "fused" and dtype == torch.float16:
        pytest.skip("torch's own fused AdamW differs from its for-loop by ~1e-2 in float16")
    steps = 1 if dtype in (torch.bfloat16, torch.float16) else 4
    extra = {}
    if dtype == torch.float16 and info.optim_cls is not SGDP and "eps" not in optim_input.kwargs:
        extra["eps"] = 1e-4  # 1e-8 underflows in float16 (NaN in every implementation)
    params = make_params(dtype)
    loop_params = clone(params)
    run(build(info, optim_input, params, **extra, **_impl_kwargs(info, impl)), params, steps)
    run(build(info, optim_input, loop_params, **extra, **_impl_kwargs(info, "forloop")),
        loop_params, steps)
    assert_same(params, loop_params, **TOLERANCE[dtype])


@pytest.mark.parametrize(("info", "optim_input", "impl"),
                         [c for c in _cases(with_impl=True) if c.values[2] == "foreach"])
def test_mixed_dtypes_in_one_group(info: Any, optim_input: Any, impl: str) -> None:
    """float32 and float64 params in one group (foreach groups them by dtype): foreach steps
    like the for-loop."""
    mixed = [p.detach().float().requires_grad_(True) if i % 2 else p
             for i, p in enumerate(make_params(torch.float64))]
    loop = clone(mixed)
    for ps, impl_ in ((mixed, impl), (loop, "forloop")):
        optimizer = build(info, optim_input, ps, **_impl_kwargs(info, impl_))
        for step in range(3):
            shadow = [p.detach().double().requires_grad_(True) for p in ps]
            set_grads(shadow, step)
            for p, q in zip(ps, shadow, strict=True):
                p.grad = q.grad.to(p.dtype)
            optimizer.step()
    for p, q in zip(mixed, loop, strict=True):
        assert p.dtype == q.dtype
        # the gradients couple all params, so float32 round-off reaches the float64 ones too
        torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("cls", [AdamP, SGDP], ids=lambda c: c.__name__)
def test_float64_foreach_keeps_float64_precision(cls: type) -> None:
    kwargs = dict(lr=0.05, weight_decay=0.1, momentum=0.9) if cls is SGDP else dict(
        weight_decay=0.1)
    params = make_params(torch.float64)
    loop_params = clone(params)
    run(cls(params, foreach=True, **kwargs), params, 4)
    run(cls(loop_params, foreach=False, fused=False, **kwargs), loop_params, 4)
    assert_same(params, loop_params, rtol=1e-12, atol=1e-13)


# --- tensor lr, complex, maximize ---------------------------------------------------------------


@pytest.mark.parametrize(("info", "optim_input", "impl"), _cases(with_impl=True))
def test_tensor_lr_equals_float_lr(info: Any, optim_input: Any, impl: str) -> None:
    """``lr=torch.tensor(x)`` steps like ``lr=x``, also when a scheduler changes it."""
    if info.optim_cls is ProjectedAdamW and impl == "foreach":
        pytest.skip("torch's AdamW refuses a tensor lr with foreach=True")
    lr = torch.tensor(float(optim_input.kwargs.get("lr", 1e-3)), dtype=torch.float64)
    params, tensor_params = make_params(), make_params()
    optimizers = [build(info, optim_input, p, lr=value, **_impl_kwargs(info, impl))
                  for p, value in ((params, lr.item()), (tensor_params, lr))]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in optimizers]
    for step in range(4):
        for optimizer, ps, scheduler in zip(optimizers, (params, tensor_params), schedulers,
                                            strict=True):
            set_grads(ps, step)
            optimizer.step()
            scheduler.step()
    assert torch.is_tensor(optimizers[1].param_groups[0]["lr"])
    assert_same(tensor_params, params, **TOLERANCE[torch.float64])


@pytest.mark.parametrize(("info", "optim_input", "impl"), _cases(with_impl=True))
def test_complex_equals_real_view(info: Any, optim_input: Any, impl: str) -> None:
    """A complex parameter steps as its ``view_as_real`` (a real tensor with a trailing 2)."""
    if impl == "fused":
        pytest.skip("fused: real floating dtypes only")  # refused, tested in tests/test_fast_path
    params = make_params(torch.complex128)
    real = [torch.view_as_real(p.detach()).clone().requires_grad_(True) for p in params]
    complex_opt = build(info, optim_input, params, **_impl_kwargs(info, impl))
    real_opt = build(info, optim_input, real, **_impl_kwargs(info, impl))
    for step in range(4):
        set_grads(params, step)
        for r, p in zip(real, params, strict=True):
            r.grad = torch.view_as_real(p.grad).clone()
        complex_opt.step()
        real_opt.step()
    for p, r in zip(params, real, strict=True):
        torch.testing.assert_close(torch.view_as_real(p.detach()), r.detach(), rtol=1e-12,
                                   atol=1e-14)


@pytest.mark.parametrize(("info", "optim_input", "impl"), _cases(with_impl=True))
def test_maximize_equals_minimizing_the_negation(info: Any, optim_input: Any,
                                                 impl: str) -> None:
    kwargs = {k: v for k, v in optim_input.kwargs.items() if k != "maximize"}
    plain = OptimizerInput(params=None, kwargs=kwargs, desc="")
    params, negated = make_params(), make_params()
    up = build(info, plain, params, maximize=True, **_impl_kwargs(info, impl))
    down = build(info, plain, negated, maximize=False, **_impl_kwargs(info, impl))
    for step in range(3):
        set_grads(params, step)
        grads = [p.grad.clone() for p in params]
        for q, g in zip(negated, grads, strict=True):
            q.grad = -g
        up.step()
        down.step()
        assert_same([p.grad for p in params], grads)  # the gradient is left alone
    assert_same(params, negated, rtol=1e-12, atol=1e-14)


# --- hooks, copies, groups -----------------------------------------------------------------------


@pytest.mark.parametrize(("info", "optim_input", "impl"), _cases())
def test_hooks(info: Any, optim_input: Any, impl: str) -> None:
    params = make_params()
    optimizer = build(info, optim_input, params)
    calls: list[str] = []
    handles = [
        optimizer.register_step_pre_hook(lambda opt, a, k: calls.append("pre")),
        optimizer.register_step_post_hook(lambda opt, a, k: calls.append("post")),
        register_optimizer_step_pre_hook(lambda opt, a, k: calls.append("global pre")),
        register_optimizer_step_post_hook(
            lambda opt, a, k: calls.append("global post")),
        optimizer.register_state_dict_pre_hook(lambda opt: calls.append("sd pre")),
        optimizer.register_state_dict_post_hook(
            lambda opt, sd: (calls.append("sd post"), sd)[1]),
        optimizer.register_load_state_dict_pre_hook(
            lambda opt, sd: (calls.append("load pre"), sd)[1]),
        optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load post")),
    ]
    try:
        run(optimizer, params, 1)
        assert calls == ["global pre", "pre", "post", "global post"]
        calls.clear()
        optimizer.load_state_dict(optimizer.state_dict())
        assert calls == ["sd pre", "sd post", "load pre", "load post"]
    finally:
        for handle in handles:
            handle.remove()
    calls.clear()
    run(optimizer, params, 1, start=1)
    assert calls == []


@pytest.mark.parametrize("duplicate", ["deepcopy", "pickle"])
@pytest.mark.parametrize(("info", "optim_input", "impl"), _cases())
def test_deepcopy_and_pickle(info: Any, optim_input: Any, impl: str, duplicate: str) -> None:
    """The copy owns copies of the params and state, and continues like the original."""
    params = make_params()
    optimizer = build(info, optim_input, params)
    run(optimizer, params, 2)
    other = copy.deepcopy(optimizer) if duplicate == "deepcopy" else pickle.loads(
        pickle.dumps(optimizer))
    other_params = other.param_groups[0]["params"] + [
        p for group in other.param_groups[1:] for p in group["params"]]
    assert all(p is not q for p, q in zip(other_params, params, strict=True))
    assert set(map(id, other.state)) == set(map(id, other_params))
    before = [p.detach().clone() for p in params]
    run(other, other_params, 2, start=2)
    assert_same(params, before)  # the original is untouched
    run(optimizer, params, 2, start=2)
    assert_same(other_params, params)


@pytest.mark.parametrize(("info", "optim_input", "impl"), _cases())
def test_param_groups_with_their_own_hyperparameters(info: Any, optim_input: Any,
                                                     impl: str) -> None:
    """Two groups, the second with its own lr and weight decay, step like two optimizers."""
    params = make_params()
    first, second = params[:2], params[2:]
    own = {"lr": 0.003, "weight_decay": 0.2}
    grouped = build(info, optim_input, [{"params": first}, {"params": second, **own}])
    assert grouped.param_groups[1]["lr"] == 0.003
    separate = make_params()
    optimizers = [build(info, optim_input, separate[:2]),
                  build(info, optim_input, separate[2:], **own)]
    for step in range(3):
        set_grads(params, step)
        set_grads(separate, step)
        grouped.step()
        for optimizer in optimizers:
            optimizer.step()
    assert_same(params, separate)


@pytest.mark.parametrize(("info", "optim_input", "impl"), _cases())
def test_zero_grad_noop_closure_direction_repr(info: Any, optim_input: Any, impl: str) -> None:
    params = make_params()
    optimizer = build(info, optim_input, params)
    assert type(optimizer).__name__ in repr(optimizer) or "base=" in repr(optimizer)

    before = [p.detach().clone() for p in params]
    optimizer.step()  # no gradients: nothing changes, no state
    assert_same(params, before) and not optimizer.state

    set_grads(params, 0)
    optimizer.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_of(params, 0)
        loss.backward()
        return loss

    first = optimizer.step(closure)
    assert torch.is_tensor(first)
    lr = float(optim_input.kwargs.get("lr", 1e-3))
    steps = max(10, int(0.5 / lr)) if not optim_input.kwargs.get("maximize") else 10
    for _ in range(min(steps, 200)):
        last = optimizer.step(closure)
    if optim_input.kwargs.get("maximize"):
        assert last > first
    else:
        assert last < first


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("info", "error_input"), _error_cases())
def test_bad_arguments_are_refused(info: Any, error_input: Any) -> None:
    assert error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
    with pytest.raises(error_input.error_type, match=error_input.error_regex):
        build(info, error_input.optimizer_error_input, make_params())


@pytest.mark.parametrize("info", OPTIM_INFOS, ids=lambda info: info.name)
def test_bad_params_are_refused(info: Any) -> None:
    base = info.optim_inputs_func(DEVICE)[0]
    params = make_params()
    with pytest.raises(ValueError, match="non-leaf"):
        build(info, base, [params[0] * 2])
    with pytest.raises(ValueError, match="more than one parameter group"):
        build(info, base, [{"params": params[:2]}, {"params": params[1:3]}])
    with pytest.raises(TypeError, match="iterable"):
        build(info, base, params[0])


@pytest.mark.parametrize("info", OPTIM_INFOS, ids=lambda info: info.name)
def test_sparse_gradients_are_refused_at_step(info: Any) -> None:
    params = make_params()
    optimizer = build(info, info.optim_inputs_func(DEVICE)[0], params)
    params[0].grad = torch.ones_like(params[0]).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


def test_every_info_has_inputs_and_errors() -> None:
    """The metadata itself: every optimizer lists inputs, errors and the impls it supports."""
    names = [info.name for info in OPTIM_INFOS]
    assert names == ["AdamP", "SGDP", "ProjectedAdamW"]
    for info in OPTIM_INFOS:
        assert info.optim_inputs_func(DEVICE) and info.optim_error_inputs_func(DEVICE)
        assert "differentiable" not in info.supported_impls
        inputs = common._get_optim_inputs_including_global_cliquey_kwargs(DEVICE, None, info)
        assert any(i.kwargs.get("fused") for i in inputs)

