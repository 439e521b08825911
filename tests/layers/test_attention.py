"""Self-attention against a loop-free fp64 multi-head attention built from separate q/k/v weights.

Covers MHA / GQA / MQA, both core backends (SDPA and reference), causal, padding and sliding-window
masks, qkv bias, QK-norm, rotary, bf16, and the grouped fused-QKV row layout.
"""

import pytest
import torch

from megacore.config import TransformerConfig
from megacore.layers.attention import (
    ATTENTION_BACKENDS,
    CoreAttention,
    SelfAttention,
    build_attention_mask,
)
from megacore.layers.rotary import RotaryEmbedding
from tests.layers import reference as ref

B, S, D = 2, 12, 8
N = 4
H = 24  # hidden size different from N*D, so the projections are not square
FP32_TOL = dict(rtol=2e-5, atol=2e-5)

HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def _config(n_kv: int, backend: str = "sdpa", **kw) -> TransformerConfig:
    return TransformerConfig(hidden_size=H, num_attention_heads=N, num_query_groups=n_kv, kv_channels=D,
                             attention_backend=backend, seq_length=S, **kw).validate()


def _weights(n_kv: int, seed: int = 0, bias: bool = False, out_bias: bool = False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.3):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    w = dict(w_q=rnd(N * D, H), w_k=rnd(n_kv * D, H), w_v=rnd(n_kv * D, H), w_o=rnd(H, N * D))
    if bias:
        w.update(b_q=rnd(N * D), b_k=rnd(n_kv * D), b_v=rnd(n_kv * D))
    if out_bias:
        w.update(b_o=rnd(H))
    return w


def _build(cfg: TransformerConfig, w: dict) -> SelfAttention:
    """A SelfAttention whose fused linear_qkv holds the separate q/k/v matrices in grouped layout."""
    attn = SelfAttention(cfg)
    n_kv = cfg.num_kv_heads
    with torch.no_grad():
        attn.linear_qkv.weight.copy_(ref.pack_qkv(w["w_q"], w["w_k"], w["w_v"], N, n_kv, D))
        if "b_q" in w:
            attn.linear_qkv.bias.copy_(ref.pack_qkv(w["b_q"], w["b_k"], w["b_v"], N, n_kv, D))
        attn.linear_proj.weight.copy_(w["w_o"])
        if "b_o" in w:
            attn.linear_proj.bias.copy_(w["b_o"])
    return attn


def _x(seed: int = 1, dtype=torch.float32):
    return torch.randn(B, S, H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _naive(x, w, n_kv, allowed, **kw):
    return ref.self_attention(x, w["w_q"], w["w_k"], w["w_v"], w["w_o"], N, n_kv, D, allowed,
                              b_q=w.get("b_q"), b_k=w.get("b_k"), b_v=w.get("b_v"), b_o=w.get("b_o"), **kw)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_causal_attention_matches_naive(kind, backend):
    n_kv = HEADS[kind]
    w = _weights(n_kv)
    attn = _build(_config(n_kv, backend), w)
    x = _x()
    out = attn(x)  # mask=None means plain causal
    torch.testing.assert_close(out.double(), _naive(x, w, n_kv, ref.allowed_mask(S, batch=B)), **FP32_TOL)


def test_fused_qkv_layout_rows_are_grouped_per_kv_head():
    """The split recovers q/k/v exactly as packed: for GQA, q heads 2g, 2g+1 sit right before k_g, v_g."""
    n_kv = 2
    w = _weights(n_kv)
    attn = _build(_config(n_kv), w)
    x = _x()
    q, k, v = attn.split_qkv(attn.linear_qkv(x))
    assert q.shape == (B, S, N, D) and k.shape == v.shape == (B, S, n_kv, D)
    for name, t, heads in (("w_q", q, N), ("w_k", k, n_kv), ("w_v", v, n_kv)):
        expected = (x.double() @ w[name].T).view(B, S, heads, D)
        torch.testing.assert_close(t.double(), expected, **FP32_TOL)
    # Row offsets of the packed weight, written out by hand for group 1: q heads 2, 3 then k_1, v_1.
    W = attn.linear_qkv.weight.double()
    per_group = (N // n_kv + 2) * D
    torch.testing.assert_close(W[per_group:per_group + 2 * D], w["w_q"][2 * D:4 * D].float().double())
    torch.testing.assert_close(W[per_group + 2 * D:per_group + 3 * D], w["w_k"][D:2 * D].float().double())
    torch.testing.assert_close(W[per_group + 3 * D:2 * per_group], w["w_v"][D:2 * D].float().double())


def test_split_qkv_works_on_a_shard_of_whole_groups():
    """A TP shard holding groups [1] of a GQA layer infers one local group from the width."""
    n_kv = 2
    w = _weights(n_kv)
    attn = _build(_config(n_kv), w)
    per_group = (N // n_kv + 2) * D
    x = _x()
    full_q, full_k, full_v = attn.split_qkv(attn.linear_qkv(x))
    shard = x @ attn.linear_qkv.weight[per_group:].T
    q, k, v = attn.split_qkv(shard)
    assert q.shape == (B, S, N // n_kv, D)
    torch.testing.assert_close(q, full_q[:, :, N // n_kv:], **FP32_TOL)
    torch.testing.assert_close(k, full_k[:, :, 1:], **FP32_TOL)
    torch.testing.assert_close(v, full_v[:, :, 1:], **FP32_TOL)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_sdpa_and_reference_backends_agree(kind):
    n_kv = HEADS[kind]
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, S, N, D, generator=g)
    k = torch.randn(B, S, n_kv, D, generator=g)
    v = torch.randn(B, S, n_kv, D, generator=g)
    pad = torch.ones(B, S, dtype=torch.long)
    pad[0, -3:] = 0
    masks = [None, build_attention_mask(B, S, "cpu", padding_mask_BS=pad),
             build_attention_mask(B, S, "cpu", sliding_window=4)]
    for mask in masks:
        outs = [ATTENTION_BACKENDS[name](q, k, v, mask, 0.3) for name in ("sdpa", "reference")]
        torch.testing.assert_close(outs[0], outs[1], **FP32_TOL)
        allowed = ref.allowed_mask(S, batch=B) if mask is None else mask[:, 0]
        torch.testing.assert_close(outs[0].double(), ref.attention(q, k, v, allowed, scale=0.3), **FP32_TOL)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_padding_mask(backend):
    n_kv = 2
    w = _weights(n_kv)
    attn = _build(_config(n_kv, backend), w)
    pad = torch.ones(B, S, dtype=torch.long)
    pad[0, -4:] = 0  # right padding
    pad[1, :3] = 0   # left padding
    mask = build_attention_mask(B, S, "cpu", padding_mask_BS=pad)
    x = _x()
    out = attn(x, mask=mask)
    assert torch.isfinite(out).all()
    expected = _naive(x, w, n_kv, ref.allowed_mask(S, padding_BS=pad))
    real = pad.bool()
    torch.testing.assert_close(out.double()[real], expected[real], **FP32_TOL)
    # Padded keys have no influence on real queries: change the padded tokens, real outputs stay.
    x2 = x.clone()
    x2[~real] = torch.randn(int((~real).sum()), H)
    torch.testing.assert_close(attn(x2, mask=mask)[real], out[real], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_sliding_window_matches_naive_and_ignores_far_tokens(backend):
    n_kv, window = 2, 4
    w = _weights(n_kv)
    attn = _build(_config(n_kv, backend, sliding_window=window), w)
    mask = build_attention_mask(B, S, "cpu", sliding_window=window)
    x = _x()
    out = attn(x, mask=mask)
    torch.testing.assert_close(out.double(), _naive(x, w, n_kv, ref.allowed_mask(S, window=window, batch=B)),
                               **FP32_TOL)
    # Perturb token p: only queries p .. p+window-1 may change (one layer sees window keys, self included).
    p = 3
    x2 = x.clone()
    x2[:, p] += 5.0
    out2 = attn(x2, mask=mask)
    changed = (out2 - out).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [p <= t < p + window for t in range(S)]


@pytest.mark.parametrize("kind", ["gqa", "mqa"])
def test_qkv_bias_and_output_bias(kind):
    n_kv = HEADS[kind]
    w = _weights(n_kv, bias=True, out_bias=True)
    cfg = _config(n_kv, add_qkv_bias=True, add_bias_linear=True)
    attn = _build(cfg, w)
    assert attn.linear_qkv.bias is not None and attn.linear_proj.bias is not None
    x = _x()
    torch.testing.assert_close(attn(x).double(), _naive(x, w, n_kv, ref.allowed_mask(S, batch=B)), **FP32_TOL)


def test_qk_norm_with_rotary():
    """Per-head RMSNorm of q and k, then rotary, as in Qwen3 / OLMo2-style QK-norm."""
    n_kv = 2
    w = _weights(n_kv)
    cfg = _config(n_kv, qk_norm=True, rotary_base=100.0)
    attn = _build(cfg, w)
    g = torch.Generator().manual_seed(9)
    q_gamma = 1 + 0.3 * torch.randn(D, generator=g, dtype=torch.float64)
    k_gamma = 1 + 0.3 * torch.randn(D, generator=g, dtype=torch.float64)
    with torch.no_grad():
        attn.q_norm.weight.copy_(q_gamma)
        attn.k_norm.weight.copy_(k_gamma)
    rotary = RotaryEmbedding(cfg)(S, "cpu", torch.float32)
    x = _x()
    out = attn(x, rotary=rotary)
    inv = ref.rope_inv_freq(D, 100.0)
    expected = _naive(x, w, n_kv, ref.allowed_mask(S, batch=B), q_gamma=q_gamma, k_gamma=k_gamma,
                      eps=cfg.norm_epsilon, rope=lambda t: ref.rope_complex(t, torch.arange(S), inv))
    torch.testing.assert_close(out.double(), expected, **FP32_TOL)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_bf16_within_tolerance(backend):
    n_kv = 2
    w = _weights(n_kv)
    attn = _build(_config(n_kv, backend), w).to(torch.bfloat16)
    x = _x(dtype=torch.bfloat16)
    out = attn(x)
    assert out.dtype == torch.bfloat16
    # Reference uses the bf16-rounded weights, so the gap is only bf16 arithmetic: |out| reaches ~6.5
    # here after three bf16 matmuls of width <= 32 and a softmax, and the observed max error is
    # ~2.6e-2 (about 1 bf16 ulp at 4..8); 2% relative + 4e-2 absolute leaves a 2-3x margin.
    wb = {k: v.to(torch.bfloat16).double() for k, v in w.items()}
    expected = _naive(x, wb, n_kv, ref.allowed_mask(S, batch=B))
    assert expected.abs().max() > 0.5  # the tolerance is meaningful relative to the output scale
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=4e-2)


def test_softmax_scale_override():
    n_kv = 4
    w = _weights(n_kv)
    attn = _build(_config(n_kv, attention_softmax_scale=0.05), w)
    x = _x()
    q, k, v = (x.double() @ w[n].T for n in ("w_q", "w_k", "w_v"))
    heads = [t.view(B, S, -1, D) for t in (q, k, v)]
    o = ref.attention(*heads, ref.allowed_mask(S, batch=B), scale=0.05).reshape(B, S, N * D) @ w["w_o"].T
    torch.testing.assert_close(attn(x).double(), o, **FP32_TOL)


def test_attention_gradients_match_fp64_autograd():
    n_kv = 2
    w = _weights(n_kv)
    attn = _build(_config(n_kv, "reference"), w)
    x = _x().requires_grad_(True)
    attn(x).square().sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    w64 = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    _naive(x64, w64, n_kv, ref.allowed_mask(S, batch=B)).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    packed = ref.pack_qkv(w64["w_q"].grad, w64["w_k"].grad, w64["w_v"].grad, N, n_kv, D)
    torch.testing.assert_close(attn.linear_qkv.weight.grad.double(), packed, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attn.linear_proj.weight.grad.double(), w64["w_o"].grad, rtol=1e-4, atol=1e-4)


def test_core_attention_backend_choice():
    assert CoreAttention(_config(2, "auto")).backend == "sdpa"
    assert CoreAttention(_config(2, "reference")).backend == "reference"
