"""Mixed precision: ``torch.amp.GradScaler`` hands AdamP and SGDP the scale and the inf
check (``_step_supports_amp_scaling``): the step unscales the gradients itself (``p.grad`` keeps
its scaled values), skips the update where an inf or NaN was found, and equals an unscaled
step otherwise, on every backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scaleinv import SGDP, AdamP
from scaleinv.backends import available_backends

OPTIMIZERS = {
    "adamp": (AdamP, dict(lr=1e-2, weight_decay=0.1, eps=1e-3)),  # eps: scale-sensitive
    "sgdp": (SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
}
# triton: through its interpreter on a CPU, where the kernels skip and unscale on the device
BACKENDS = [b for b in available_backends("cpu", torch.float32) if b != "compiled"]


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 6 * 6, 5))


def loss_of(net: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    y = torch.randint(0, 5, (4,), generator=generator)
    return nn.functional.cross_entropy(net(x), y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_scaler_step_equals_an_unscaled_step(name: str, backend: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEINV_BACKEND", backend)
    cls, options = OPTIMIZERS[name]
    scaled_net, plain_net = model(0), model(0)
    scaled_opt, plain_opt = cls(scaled_net.parameters(), **options), cls(
        plain_net.parameters(), **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(4):
        scaled_opt.zero_grad()
        scaler.scale(loss_of(scaled_net, step)).backward()
        scaled_grads = [p.grad.clone() for p in scaled_net.parameters()]
        scaler.step(scaled_opt)
        scaler.update()
        # p.grad is left scaled, as torch.optim.Adam(fused=True) leaves it
        for p, g in zip(scaled_net.parameters(), scaled_grads, strict=True):
            assert torch.equal(p.grad, g)
        plain_opt.zero_grad()
        loss_of(plain_net, step).backward()
        plain_opt.step()
    assert not hasattr(scaled_opt, "grad_scale") and not hasattr(scaled_opt, "found_inf")
    for p, q in zip(scaled_net.parameters(), plain_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_inf_gradient_skips_the_step(name: str, backend: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEINV_BACKEND", backend)
    cls, options = OPTIMIZERS[name]
    net = model(1)
    optimizer = cls(net.parameters(), **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_of(net, 0)).backward()
    scaler.step(optimizer)
    scaler.update()
    before = [p.detach().clone() for p in net.parameters()]
    state = {k: v.clone() for s in optimizer.state.values() for k, v in s.items()}
    optimizer.zero_grad()
    scaler.scale(loss_of(net, 1)).backward()
    next(net.parameters()).grad[0, 0, 0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**9  # the scaler saw the inf and backed off
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
    after = {k: v for s in optimizer.state.values() for k, v in s.items()}
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_unscale_first_then_step() -> None:
    """``scaler.unscale_(optimizer)`` before the step (to clip gradients): the step is then
    given no scale and must not divide again."""
    net, reference = model(2), model(2)
    optimizer, plain = AdamP(net.parameters(), lr=1e-2), AdamP(reference.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(loss_of(net, 0)).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    loss_of(reference, 0).backward()
    plain.step()
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (its interpreter on a CPU)")
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_triton_kernels_read_nothing_on_the_host(name: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """On the Triton path the skip and the unscaling happen inside the kernels: the step never
    asks the host whether an inf was found (``skip_step``), so a CUDA step does not wait."""
    import scaleinv._common
    import scaleinv.fused

    def no_host_read(found_inf: object) -> bool:
        raise AssertionError("found_inf was read on the host")

    for module in (scaleinv._common, scaleinv.fused):
        monkeypatch.setattr(module, "skip_step", no_host_read)
    monkeypatch.setenv("SCALEINV_BACKEND", "triton")
    cls, options = OPTIMIZERS[name]
    net = model(3)
    optimizer = cls(net.parameters(), **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(2):
        optimizer.zero_grad()
        scaler.scale(loss_of(net, step)).backward()
        if step == 1:
            next(net.parameters()).grad[0, 0, 0, 0] = float("nan")
        scaler.step(optimizer)
        scaler.update()
    assert all(bool(p.isfinite().all()) for p in net.parameters())
