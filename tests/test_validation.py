"""Bad and unusual input: argument checks, annotations, sparse and complex gradients, zeros."""

from __future__ import annotations

import math

import pytest
import torch

from scaleinv import SGDP, AdamP
from scaleinv import adamp as scaleinv_adamp


def params():
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))]


BAD_ADAMP = [
    (dict(lr=-1e-3), "lr", r"[0, inf)"),
    (dict(lr=math.nan), "lr", r"[0, inf)"),
    (dict(eps=-1e-8), "eps", r"[0, inf)"),
    (dict(weight_decay=-0.1), "weight_decay", r"[0, inf)"),
    (dict(delta=0.0), "delta", r"(0, inf)"),
    (dict(delta=-0.1), "delta", r"(0, inf)"),
    (dict(wd_ratio=-0.1), "wd_ratio", r"[0, 1]"),
    (dict(wd_ratio=1.5), "wd_ratio", r"[0, 1]"),
    (dict(betas=(1.0, 0.999)), "betas[0]", r"[0, 1)"),
    (dict(betas=(-0.1, 0.999)), "betas[0]", r"[0, 1)"),
    (dict(betas=(0.9, 1.0)), "betas[1]", r"[0, 1)"),
    (dict(betas=(0.9,)), "betas", "pair"),
]
BAD_SGDP = [
    (dict(lr=-0.1), "lr", r"[0, inf)"),
    (dict(momentum=-0.5), "momentum", r"[0, 1)"),
    (dict(momentum=1.0), "momentum", r"[0, 1)"),
    (dict(dampening=-0.1), "dampening", r"[0, 1]"),
    (dict(weight_decay=-1e-4), "weight_decay", r"[0, inf)"),
    (dict(eps=-1.0), "eps", r"[0, inf)"),
    (dict(delta=0.0), "delta", r"(0, inf)"),
    (dict(wd_ratio=2.0), "wd_ratio", r"[0, 1]"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov", "dampening"),
]


@pytest.mark.parametrize(("kwargs", "name", "allowed"), BAD_ADAMP)
def test_adamp_rejects_bad_hyperparameters(kwargs, name, allowed) -> None:
    with pytest.raises(ValueError) as error:
        AdamP(params(), **kwargs)
    assert name in str(error.value) and allowed in str(error.value)


@pytest.mark.parametrize(("kwargs", "name", "allowed"), BAD_SGDP)
def test_sgdp_rejects_bad_hyperparameters(kwargs, name, allowed) -> None:
    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError) as error:
        SGDP(params(), **kwargs)
    assert name in str(error.value) and allowed in str(error.value)


@pytest.mark.parametrize(
    ("cls", "kwargs", "name", "allowed"),
    [(AdamP, *case) for case in BAD_ADAMP] + [(SGDP, *case) for case in BAD_SGDP],
)
def test_param_group_hyperparameters_are_checked_too(cls, kwargs, name, allowed) -> None:
    """A bad value given in a param group, at construction or via add_param_group, is refused
    like the constructor's, and a refused group is not kept."""
    defaults = {"lr": 0.1} if cls is SGDP else {}
    weight, bias = params()
    with pytest.raises(ValueError) as error:
        cls([{"params": [weight], **kwargs}], **defaults)
    assert name in str(error.value) and allowed in str(error.value)
    optimizer = cls([weight], **defaults)
    with pytest.raises(ValueError):
        optimizer.add_param_group({"params": [bias], **kwargs})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": [bias]})
    assert len(optimizer.param_groups) == 2


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_non_numbers_are_type_errors(cls) -> None:
    with pytest.raises(TypeError, match="lr"):
        cls(params(), lr="0.1")


@pytest.mark.parametrize("cls", [AdamP, SGDP])
@pytest.mark.parametrize("annotation", ["foo", True, 1, None, "Channel"])
def test_invalid_scale_invariant(cls, annotation) -> None:
    with pytest.raises(ValueError, match="scale_invariant"):
        cls(params(), lr=0.1, scale_invariant=annotation)
    with pytest.raises(ValueError, match="scale_invariant"):
        cls([{"params": params(), "scale_invariant": annotation}], lr=0.1)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
@pytest.mark.parametrize("annotation", ["channel", "layer"])
def test_view_annotation_refuses_one_dim_params(cls, annotation) -> None:
    weight, bias = params()
    with pytest.raises(ValueError, match=r"scale_invariant.*shape \(4,\)"):
        cls([weight, bias], lr=0.1, scale_invariant=annotation)
    opt = cls([weight], lr=0.1, scale_invariant=annotation)  # fine without the bias
    with pytest.raises(ValueError, match="scale_invariant"):
        opt.add_param_group({"params": [bias]})
    opt.add_param_group({"params": [bias], "scale_invariant": "auto"})
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))],
                         "scale_invariant": False})


@pytest.mark.parametrize("cls", [AdamP, SGDP])
@pytest.mark.parametrize("foreach", [False, True])
def test_sparse_gradients_are_refused(cls, foreach) -> None:
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2, 3])).sum().backward()
    assert embedding.weight.grad.is_sparse
    opt = cls(embedding.parameters(), lr=0.1, foreach=foreach)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def make(cls, params, foreach):
    if cls is AdamP:
        return AdamP(params, lr=1e-2, weight_decay=0.1, nesterov=True, foreach=foreach)
    return SGDP(params, lr=1e-2, momentum=0.9, weight_decay=1e-2, foreach=foreach)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
@pytest.mark.parametrize("foreach", [False, True])
def test_complex_params_step_as_their_real_views(cls, foreach) -> None:
    """A complex parameter moves exactly as ``torch.view_as_real`` of it would (projection
    and cosine test included: the real view has one more dimension)."""
    generator = torch.Generator().manual_seed(51)
    shapes = [(4, 5), (6,), (3, 2, 2)]
    init = [torch.randn(s, dtype=torch.complex64, generator=generator) for s in shapes]
    complex_params = [torch.nn.Parameter(t.clone()) for t in init]
    real_params = [torch.nn.Parameter(torch.view_as_real(t).clone()) for t in init]
    complex_opt, real_opt = make(cls, complex_params, foreach), make(cls, real_params, foreach)
    for _ in range(10):
        for p_complex, p_real in zip(complex_params, real_params, strict=True):
            grad = torch.randn(p_complex.shape, dtype=torch.complex64, generator=generator)
            p_complex.grad = grad
            p_real.grad = torch.view_as_real(grad).clone()
        complex_opt.step()
        real_opt.step()
    for p_complex, p_real, p0 in zip(complex_params, real_params, init, strict=True):
        assert p_complex.dtype == torch.complex64
        assert torch.equal(torch.view_as_real(p_complex), p_real)
        assert not torch.equal(p_complex, p0)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_complex_vector_takes_view_annotations_like_its_real_view(cls) -> None:
    """A complex vector is stepped as its ``[n, 2]`` real view, so an annotation accepted for
    that view is accepted for it, and both move alike; a real vector is still refused."""
    init = torch.randn(6, dtype=torch.complex64, generator=torch.Generator().manual_seed(3))
    complex_param = torch.nn.Parameter(init.clone())
    real_param = torch.nn.Parameter(torch.view_as_real(init).clone())
    defaults = {"lr": 0.1, "momentum": 0.9} if cls is SGDP else {"lr": 0.1}
    complex_opt = cls([complex_param], scale_invariant="channel", **defaults)
    real_opt = cls([real_param], scale_invariant="channel", **defaults)
    for _ in range(3):
        grad = torch.randn(6, dtype=torch.complex64)
        complex_param.grad, real_param.grad = grad, torch.view_as_real(grad).clone()
        complex_opt.step()
        real_opt.step()
    assert torch.equal(torch.view_as_real(complex_param), real_param)
    with pytest.raises(ValueError, match="dim"):
        cls([torch.nn.Parameter(torch.randn(6))], scale_invariant="channel", **defaults)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("case", ["zero weight", "zero grad", "both zero"])
def test_zeros_give_finite_results(cls, foreach, case) -> None:
    """Zero weights (all norms 0: the projection divides by ``|w| + eps``) and zero
    gradients (cosines 0/eps) leave weights and state finite."""
    generator = torch.Generator().manual_seed(53)
    shapes = [(5,), (4, 3), (3, 2, 3, 3)]
    params_ = [
        torch.nn.Parameter(
            torch.zeros(s) if case != "zero grad" else torch.randn(s, generator=generator)
        )
        for s in shapes
    ]
    opt = make(cls, params_, foreach)
    for _ in range(3):
        for p in params_:
            p.grad = (
                torch.zeros_like(p) if case != "zero weight"
                else torch.randn(p.shape, generator=generator)
            )
        opt.step()
    for p in params_:
        assert torch.isfinite(p).all()
        for value in opt.state[p].values():
            assert torch.isfinite(value).all()


def test_caution_options_are_checked() -> None:
    w = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(TypeError, match="caution"):
        AdamP([w], caution="yes")
    with pytest.raises(ValueError, match="caution=True cannot be combined with project_momentum"):
        SGDP([w], lr=0.1, caution=True, project_momentum=True)
    w.grad = torch.randn(3, 4)
    optimizer = AdamP([w], caution=True)
    with pytest.raises(ValueError, match="caution=True runs on the single-tensor body"):
        scaleinv_adamp.adamp([w], [w.grad], [torch.zeros_like(w)], [torch.zeros_like(w)],
                             [torch.zeros(())], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                             weight_decay=0.0, delta=0.1, wd_ratio=0.1, nesterov=False,
                             maximize=False, caution=True, foreach=True)
    optimizer.step()  # the class picks the single-tensor body itself
