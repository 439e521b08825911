"""RMSNorm and LayerNorm (plain and zero-centred gamma) against fp64 formulas and torch.nn.LayerNorm."""

import pytest
import torch

from megacore.config import TransformerConfig
from megacore.layers.norm import LayerNorm, RMSNorm, build_norm
from megacore.sharding import peek_meta
from tests.layers import reference as ref

H = 48
EPS = 1e-5
# bf16 keeps 8 significant bits (unit roundoff 2^-9). The module rounds the input, the normalized
# value and the product with gamma: a few roundings of relative size 2^-9 each, so 2^-6 relative
# (plus a small absolute floor for values near zero) is a tight but safe bound.
BF16_TOL = dict(rtol=2 ** -6, atol=2 ** -6)
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Non-zero mean and a wide scale so mean subtraction and eps both matter.
    x = torch.randn(3, 5, H, generator=g, dtype=torch.float64) * 3.0 + 0.7
    gamma = 1.0 + 0.5 * torch.randn(H, generator=g, dtype=torch.float64)
    beta = 0.3 * torch.randn(H, generator=g, dtype=torch.float64)
    return x.to(dtype), gamma, beta


def _set(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value)


@pytest.mark.parametrize("zero_centered", [False, True])
def test_rmsnorm_matches_fp64_formula(zero_centered):
    x, gamma, _ = _inputs()
    norm = RMSNorm(H, EPS, zero_centered_gamma=zero_centered)
    _set(norm.weight, gamma - 1.0 if zero_centered else gamma)  # zero-centred stores gamma - 1
    torch.testing.assert_close(norm(x).double(), ref.rmsnorm(x, gamma, EPS), **FP32_TOL)


@pytest.mark.parametrize("zero_centered", [False, True])
def test_layernorm_matches_fp64_formula_and_torch(zero_centered):
    x, gamma, beta = _inputs()
    norm = LayerNorm(H, EPS, zero_centered_gamma=zero_centered)
    _set(norm.weight, gamma - 1.0 if zero_centered else gamma)
    _set(norm.bias, beta)
    out = norm(x)
    torch.testing.assert_close(out.double(), ref.layernorm(x, gamma, beta, EPS), **FP32_TOL)

    torch_ln = torch.nn.LayerNorm(H, eps=EPS)
    _set(torch_ln.weight, gamma)
    _set(torch_ln.bias, beta)
    torch.testing.assert_close(out, torch_ln(x), rtol=1e-6, atol=1e-6)


def test_norm_gradients_match_fp64_autograd():
    """Backward of both norms equals autograd through the fp64 formulas (weights and input)."""
    x, gamma, beta = _inputs()
    for norm in (RMSNorm(H, EPS), LayerNorm(H, EPS)):
        _set(norm.weight, gamma)
        if isinstance(norm, LayerNorm):
            _set(norm.bias, beta)
        x32 = x.clone().requires_grad_(True)
        x64 = x.double().clone().requires_grad_(True)
        g64 = gamma.clone().requires_grad_(True)
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (norm(x32).double() * upstream).sum().backward()
        if isinstance(norm, LayerNorm):
            b64 = beta.clone().requires_grad_(True)
            (ref.layernorm(x64, g64, b64, EPS) * upstream).sum().backward()
            torch.testing.assert_close(norm.bias.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)
        else:
            (ref.rmsnorm(x64, g64, EPS) * upstream).sum().backward()
        torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.weight.grad.double(), g64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [RMSNorm, LayerNorm])
def test_bf16_inputs_within_tolerance_and_keep_dtype(cls):
    x, gamma, beta = _inputs(torch.bfloat16)
    norm = cls(H, EPS)
    _set(norm.weight, gamma)
    expected = ref.rmsnorm(x, gamma, EPS) if cls is RMSNorm else None
    if cls is LayerNorm:
        _set(norm.bias, beta)
        expected = ref.layernorm(x, gamma, beta, EPS)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    # Reference takes the same bf16-rounded input (x.double() is exact), so only the module's
    # internal roundings count against the tolerance.
    torch.testing.assert_close(out.double(), expected, **BF16_TOL)


def test_rmsnorm_statistics_in_fp32_for_large_bf16_values():
    """mean(x^2) of bf16 values around 300 overflows nothing and loses nothing when done in fp32."""
    x, gamma, _ = _inputs(torch.float64)
    x = (x * 100.0).to(torch.bfloat16)
    norm = RMSNorm(H, EPS)
    _set(norm.weight, gamma)
    torch.testing.assert_close(norm(x).double(), ref.rmsnorm(x, gamma, EPS), **BF16_TOL)


@pytest.mark.parametrize("normalization,cls", [("RMSNorm", RMSNorm), ("LayerNorm", LayerNorm)])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_build_norm_from_config(normalization, cls, zero_centered):
    cfg = TransformerConfig(hidden_size=H, num_attention_heads=4, normalization=normalization, norm_epsilon=1e-6,
                            layernorm_zero_centered_gamma=zero_centered)
    norm = build_norm(cfg)
    assert isinstance(norm, cls) and norm.eps == 1e-6 and norm.weight.shape == (H,)
    # Fresh norms are the identity scale: gamma = 1 either way.
    assert torch.equal(norm.weight, torch.zeros(H) if zero_centered else torch.ones(H))
    assert peek_meta(norm.weight).init == ("zeros" if zero_centered else "ones")
    x, _, _ = _inputs()
    ones, zeros = torch.ones(H, dtype=torch.float64), torch.zeros(H, dtype=torch.float64)
    expected = ref.rmsnorm(x, ones, 1e-6) if cls is RMSNorm else ref.layernorm(x, ones, zeros, 1e-6)
    torch.testing.assert_close(norm(x).double(), expected, **FP32_TOL)
    assert build_norm(cfg, dim=8).weight.shape == (8,)
