"""FP8 grouped GEMM of the routed experts (megacore.precision.fp8_grouped): the per-expert reference
against the recipe written out in fp64, and ``apply_fp8`` handing the experts their fp8 strategy.
The fused kernel itself needs Hopper: tests/gpu/test_moe_gpu.py compares it with this reference."""

import torch

from megacore.config import TransformerConfig
from megacore.layers.moe import MoELayer
from megacore.precision.fp8 import apply_fp8
from megacore.precision.fp8_grouped import Fp8GroupedMatmul, grouped_linear_fp8_reference

FMAX = 448.0


def _qdq(t: torch.Tensor) -> torch.Tensor:
    """Rowwise e4m3 quantize-dequantize written from the formula, in fp64 (the cast is the only fp8 op)."""
    t = t.double()
    scale = FMAX / t.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return (t * scale).clamp(-FMAX, FMAX).float().to(torch.float8_e4m3fn).double() / scale


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = [5, 0, 11, 3]
    x = torch.randn(sum(counts) + 2, 32, generator=g) * torch.logspace(-2, 1, sum(counts) + 2).unsqueeze(1)
    w = torch.randn(4, 48, 32, generator=g) * 0.1
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    return x, w, ends, counts


def test_reference_forward_and_gradients_follow_the_recipe():
    x, w, ends, counts = _case()
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = grouped_linear_fp8_reference(x, w, ends)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)

    bounds = [0, *ends.tolist()]
    want_y = torch.zeros(y.shape, dtype=torch.float64)
    want_dx = torch.zeros(x.shape, dtype=torch.float64)
    want_dw = torch.zeros(w.shape, dtype=torch.float64)
    for e in range(4):
        rows = slice(bounds[e], bounds[e + 1])
        xe, ge = x.detach()[rows], g[rows]
        if xe.shape[0] == 0:
            continue
        want_y[rows] = _qdq(xe) @ _qdq(w.detach()[e]).T          # W scaled per output row
        want_dx[rows] = _qdq(ge) @ _qdq(w.detach()[e].T).T       # W scaled per input column
        want_dw[e] = ge.double().T @ xe.double()                 # weight gradient unquantized
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx.double(), want_dx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw.double(), want_dw, rtol=1e-5, atol=1e-6)
    assert (y[sum(counts):] == 0).all()                           # rows past the last group
    # ... and the recipe is close to the exact product (rowwise e4m3: a few percent at most).
    exact = torch.cat([x.detach()[bounds[e]:bounds[e + 1]] @ w.detach()[e].T for e in range(4)])
    rel = (y[:sum(counts)] - exact).norm() / exact.norm()
    assert 1e-4 < rel < 0.05, rel


def test_apply_fp8_hands_the_experts_the_grouped_strategy_and_cpu_falls_back():
    cfg = TransformerConfig(hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, num_experts=4,
                            moe_top_k=2).validate()
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 8, 32)
    before = layer(x)
    assert apply_fp8(layer) >= 1
    assert isinstance(layer.experts.grouped_matmul, Fp8GroupedMatmul)
    after = layer(x)
    # No fp8 grouped kernel on CPU: the strategy declines and the experts' own GEMM runs unchanged.
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert apply_fp8(layer) == 0   # applying twice converts nothing
