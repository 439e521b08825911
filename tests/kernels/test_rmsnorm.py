"""Fused residual add + RMSNorm: Triton kernel vs the torch reference vs an fp64 formula (tiny shapes)."""

import pytest
import torch

from megacore.kernels import rms_norm, rms_norm_reference
from megacore.layers.norm import RMSNorm
from tests.kernels.helpers import DEVICE, TOL, assert_close, needs_triton

EPS = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _fp64_formula(x, weight, residual, zero_centered):
    """Independent fp64 math: h = x + r, y = h / sqrt(mean h² + eps) · gamma."""
    h = x.double() + (residual.double() if residual is not None else 0)
    gamma = weight.double() + 1 if zero_centered else weight.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * gamma, h


def _run(fn, x, w, r, zc, gy, gh):
    """Forward, then backward of <y, gy> + <new_residual, gh>; returns outputs and grads."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    r = r.clone().requires_grad_() if r is not None else None
    y, h = fn(x, w, r, zc)
    loss = (y.double() * gy).sum()
    if r is not None:
        loss = loss + (h.double() * gh).sum()
    loss.backward()
    return y, h, x.grad, w.grad, (r.grad if r is not None else None)


def _inputs(dtype, with_residual, residual_dtype=None, shape=(4, 8, 48)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    r = torch.randn(*shape, generator=g).to(DEVICE, residual_dtype or dtype) if with_residual else None
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(DEVICE)
    gy = torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)
    gh = torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)
    return x, w, r, gy, gh


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_rmsnorm_triton_matches_reference_and_fp64(dtype, with_residual, zero_centered):
    x, w, r, gy, gh = _inputs(dtype, with_residual)
    if zero_centered:
        w = w - 1
    tri = _run(lambda *a: rms_norm(*a[:2], EPS, a[2], a[3], force_triton=True), x, w, r, zero_centered, gy, gh)
    ref = _run(lambda *a: rms_norm_reference(*a[:2], EPS, a[2], a[3]), x, w, r, zero_centered, gy, gh)
    tol = TOL[dtype]
    names = ["y", "new_residual", "dx", "dweight", "dresidual"]
    assert tri[0].dtype == dtype and tri[1].dtype == dtype and tri[2].dtype == dtype
    for name, a, b in zip(names, tri, ref):
        if b is not None:
            assert_close(a, b, tol, f"{name} vs reference")
    # fp64 autograd of the independent formula, fed the same (rounded) inputs
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    r64 = r.double().requires_grad_() if r is not None else None
    y64, h64 = _fp64_formula(x64, w64, r64, zero_centered)
    ((y64 * gy).sum() + ((h64 * gh).sum() if r is not None else 0)).backward()
    for name, a, b in zip(names, tri, [y64, h64, x64.grad, w64.grad, r64.grad if r is not None else None]):
        if b is not None:
            assert_close(a, b, 2 * tol, f"{name} vs fp64")


@needs_triton
def test_rmsnorm_fp32_residual_stream_with_bf16_input():
    """residual kept in fp32 (new_residual fp32), x and y bf16: dx is bf16, dresidual fp32."""
    x, w, r, gy, gh = _inputs(torch.bfloat16, True, residual_dtype=torch.float32)
    tri = _run(lambda *a: rms_norm(*a[:2], EPS, a[2], a[3], force_triton=True), x, w, r, False, gy, gh)
    ref = _run(lambda *a: rms_norm_reference(*a[:2], EPS, a[2], a[3]), x, w, r, False, gy, gh)
    assert tri[1].dtype == torch.float32 and tri[2].dtype == torch.bfloat16 and tri[4].dtype == torch.float32
    for name, a, b in zip(["y", "new_residual", "dx", "dweight", "dresidual"], tri, ref):
        assert_close(a, b, TOL[torch.bfloat16], name)


@needs_triton
def test_rmsnorm_kernel_matches_model_rmsnorm_and_wide_rows():
    """Same numbers as the model's RMSNorm module (fp32); a row wider than one warp's worth of lanes."""
    x, w, _, _, _ = _inputs(torch.float32, False, shape=(3, 1100))
    norm = RMSNorm(1100, eps=EPS).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(w)
    y, h = rms_norm(x, w, EPS, force_triton=True)
    assert h is x
    assert_close(y, norm(x), TOL[torch.float32], "y vs layers.norm.RMSNorm")


def test_rmsnorm_dispatch_cpu_uses_reference_and_validates():
    x = torch.randn(2, 8)
    y, h = rms_norm(x, torch.ones(8), EPS)
    assert y.grad_fn is None and h is x
    assert_close(y, _fp64_formula(x, torch.ones(8), None, False)[0], TOL[torch.float32], "cpu reference")
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, torch.ones(7), EPS)
    with pytest.raises(ValueError, match="residual shape"):
        rms_norm(x, torch.ones(8), EPS, residual=torch.randn(2, 7))
