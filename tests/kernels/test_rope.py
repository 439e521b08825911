"""Rotary embedding: Triton kernel vs the torch reference vs fp64 complex rotation (tiny shapes)."""

import pytest
import torch

from megacore.kernels import apply_rotary, apply_rotary_reference
from megacore.layers.rotary import apply_rotary_reference as layer_apply_rotary
from tests.kernels.helpers import DEVICE, TOL, assert_close, needs_triton

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

B, S, H, D, P = 2, 8, 3, 24, 20


def _tables(rows, r, gen):
    """HF-style cos/sin tables [rows, r] = cos/sin of [θ ; θ]."""
    theta = torch.rand(rows, r // 2, generator=gen, dtype=torch.float64) * 6.0
    emb = torch.cat([theta, theta], dim=-1)
    return emb.cos(), emb.sin(), theta


def _complex_rotation_fp64(x, theta_BS, r):
    """Independent fp64: (x1 + i·x2)·e^{iθ} on the first r channels, the rest unchanged."""
    x = x.double()
    rotation = torch.polar(torch.ones_like(theta_BS), theta_BS)[:, :, None]  # [B, S, 1, r/2]
    z = torch.complex(x[..., : r // 2], x[..., r // 2: r]) * rotation
    return torch.cat([z.real, z.imag, x[..., r:]], dim=-1)


def _case(mode, r, gen):
    """cos/sin in the layout ``mode`` plus the per-token angles θ [B, S, r/2] they encode."""
    if mode == "seq":
        cos, sin, theta = _tables(S, r, gen)
        return cos, sin, None, theta[None].expand(B, S, r // 2)
    if mode == "batch":
        cos, sin, theta = _tables(B * S, r, gen)
        return cos.view(B, S, r), sin.view(B, S, r), None, theta.view(B, S, r // 2)
    cos, sin, theta = _tables(P, r, gen)
    pos = torch.randint(0, P, (B, S), generator=gen)
    return cos, sin, pos, theta[pos]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [D, 16])
@pytest.mark.parametrize("mode", ["seq", "batch", "position_ids"])
def test_rope_triton_matches_reference_and_fp64(dtype, rotary_dim, mode):
    gen = torch.Generator().manual_seed(1)
    cos, sin, pos, theta = _case(mode, rotary_dim, gen)
    x = torch.randn(B, S, H, D, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64)
    cos_d, sin_d = cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)
    pos_d = pos.to(DEVICE) if pos is not None else None
    outs = {}
    for name, fn in [("triton", lambda *a: apply_rotary(*a, force_triton=True)), ("reference", apply_rotary_reference)]:
        xi = x.clone().requires_grad_()
        y = fn(xi, cos_d, sin_d, rotary_dim, pos_d)
        (y.double() * dy.to(DEVICE)).sum().backward()
        outs[name] = (y, xi.grad)
    tol = TOL[dtype]
    assert outs["triton"][0].dtype == dtype and outs["triton"][1].dtype == dtype
    assert_close(outs["triton"][0], outs["reference"][0], tol, "y vs reference")
    assert_close(outs["triton"][1], outs["reference"][1], tol, "dx vs reference")
    # fp64: forward is the complex rotation; backward of a rotation is the rotation by −θ
    assert_close(outs["triton"][0], _complex_rotation_fp64(x.cpu(), theta, rotary_dim), 2 * tol, "y vs fp64")
    assert_close(outs["triton"][1], _complex_rotation_fp64(dy, -theta, rotary_dim), 2 * tol, "dx vs fp64")


@needs_triton
def test_rope_strided_view_and_layer_reference():
    """q sliced out of a fused [.., H+2, D] tensor (non-contiguous heads) matches the layer's reference."""
    gen = torch.Generator().manual_seed(2)
    cos, sin, _ = _tables(S, D, gen)
    qkv = torch.randn(B, S, H + 2, D, generator=gen).to(DEVICE)
    q = qkv[:, :, :H]
    assert not q.is_contiguous()
    y = apply_rotary(q, cos.float().to(DEVICE), sin.float().to(DEVICE), force_triton=True)
    expected = layer_apply_rotary(q.double(), cos.to(DEVICE), sin.to(DEVICE))
    assert_close(y, expected, TOL[torch.float32], "strided q vs layers.rotary reference")


def test_rope_validation_errors():
    x = torch.randn(B, S, H, D)
    cos, sin, _ = _tables(S, D, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary(x, cos, sin, rotary_dim=7)
    with pytest.raises(ValueError, match="rows but seq"):
        apply_rotary(x, cos[:-1], sin[:-1])
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        apply_rotary(x[0], cos, sin)
    with pytest.raises(ValueError, match="position_ids"):
        apply_rotary(x, cos, sin, position_ids=torch.zeros(B, S + 1, dtype=torch.long))
