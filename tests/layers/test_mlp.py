"""MLP (plain and gated activations) against fp64 formulas from the weights."""

import pytest
import torch

from megacore.config import TransformerConfig
from megacore.layers.mlp import MLP
from megacore.sharding import peek_meta
from tests.layers import reference as ref

B, S, H, F = 2, 5, 16, 24

PLAIN = ref.PLAIN_ACTIVATIONS
GATED = ref.GATED_ACTIVATIONS


def _mlp(activation: str, bias: bool, seed: int = 0):
    cfg = TransformerConfig(hidden_size=H, num_attention_heads=2, ffn_hidden_size=F, activation=activation,
                            add_bias_linear=bias).validate()
    mlp = MLP(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return mlp


def _reference(mlp: MLP, x: torch.Tensor, activation: str) -> torch.Tensor:
    """y = act(x W1^T + b1) W2^T + b2 (gated: act(gate) * up), in fp64 from the module's weights."""
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    return ref.mlp(x, fc1.weight, fc2.weight, activation, fc1.bias, fc2.bias)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", sorted(PLAIN) + sorted(GATED))
def test_mlp_matches_formula(activation, bias):
    mlp = _mlp(activation, bias)
    gated = activation in GATED
    assert mlp.linear_fc1.weight.shape == ((2 * F if gated else F), H)
    assert mlp.linear_fc2.weight.shape == (H, F)
    assert (mlp.linear_fc1.bias is not None) == bias
    x = torch.randn(B, S, H, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mlp(x).double(), _reference(mlp, x, activation), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_mlp_gradients_match_fp64_autograd(activation):
    mlp = _mlp(activation, bias=True)
    x = torch.randn(B, S, H, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mlp(x).square().sum().backward()
    mlp64 = _mlp(activation, bias=True).double()
    x64 = x.detach().double().requires_grad_(True)
    _reference(mlp64, x64, activation).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    for (name, p), p64 in zip(mlp.named_parameters(), mlp64.parameters()):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
def test_mlp_bf16_within_tolerance(activation):
    mlp = _mlp(activation, bias=False).to(torch.bfloat16)
    x = torch.randn(B, S, H, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = mlp(x)
    assert out.dtype == torch.bfloat16
    expected = _reference(mlp, x, activation)  # same bf16 weights and input, fp64 arithmetic
    # Two bf16 matmuls (width 16 and 24) and an activation: outputs reach ~17 and the observed max
    # error is ~0.12 (under 1% of the largest output, ~2 bf16 ulps); 2% relative + 5e-2 absolute.
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=5e-2)


def test_swiglu_gate_and_up_halves_are_not_interchangeable():
    """Guards the [gate; up] row order: swapping the halves changes the output."""
    mlp = _mlp("swiglu", bias=False)
    x = torch.randn(B, S, H, generator=torch.Generator().manual_seed(1))
    out = mlp(x)
    with torch.no_grad():
        w = mlp.linear_fc1.weight.clone()
        mlp.linear_fc1.weight.copy_(torch.cat([w[F:], w[:F]]))
    assert not torch.allclose(mlp(x), out, atol=1e-3)


def test_mlp_init_marks():
    mlp = _mlp("swiglu", bias=True)
    assert peek_meta(mlp.linear_fc1.weight).init == "normal"
    assert peek_meta(mlp.linear_fc2.weight).init == "scaled_normal"
    assert peek_meta(mlp.linear_fc1.bias).init == "zeros" and peek_meta(mlp.linear_fc2.bias).init == "zeros"
