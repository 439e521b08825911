"""Multi-latent attention (``megacore.layers.mla``) against an fp64 reference written here from the
formulas (outputs and the gradients of the input and of every parameter), with and without the
query's low-rank bottleneck, with plain and YaRN rotary; parity with Hugging Face's DeepseekV3Attention
(interleaved and half-rotation rope checkpoints); the softmax scale; v padding; recomputation of the
up-projections; and inside GPTModel: deterministic init, a few training steps, the FLOPs formula."""

from __future__ import annotations

import math

import pytest
import torch

from megacore.config import RecomputeConfig, TransformerConfig
from megacore.layers.attention import default_softmax_scale
from megacore.layers.mla import MultiLatentAttention, rope_deinterleave_index
from megacore.layers.rotary import RotaryEmbedding
from megacore.models import GPTModel
from tests.layers import reference as ref

B, S, HID, N = 2, 10, 24, 3          # batch, sequence, hidden, heads
DN, DR, DV, R, RQ = 8, 4, 6, 10, 12  # nope / rope / value head dims, kv and q latent ranks
EPS = 1e-5
YARN = dict(rotary_scaling="yarn", rotary_scaling_factor=4.0, rotary_original_max_positions=4, rotary_mscale=0.7,
            rotary_mscale_all_dim=0.9)


def _config(q_lora_rank=None, yarn=False, backend="sdpa", **kw) -> TransformerConfig:
    return TransformerConfig(hidden_size=HID, num_attention_heads=N, seq_length=16, norm_epsilon=EPS,
                             multi_latent_attention=True, q_lora_rank=q_lora_rank, kv_lora_rank=R,
                             qk_nope_head_dim=DN, qk_rope_head_dim=DR, v_head_dim=DV, attention_backend=backend,
                             **(YARN if yarn else {}), **kw).validate()


def _weights(q_lora: bool, seed: int = 0) -> dict:
    """fp64 weights, named by the formulas (W_q or W_dq/g_q/W_uq; W_dkv, g_kv, W_ukv, W_o)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.3, mean=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean).requires_grad_()

    w = dict(w_dkv=rnd(R + DR, HID), g_kv=rnd(R, std=0.1, mean=1.0), w_ukv=rnd(N * (DN + DV), R),
             w_o=rnd(HID, N * DV))
    if q_lora:
        w.update(w_dq=rnd(RQ, HID), g_q=rnd(RQ, std=0.1, mean=1.0), w_uq=rnd(N * (DN + DR), RQ))
    else:
        w.update(w_q=rnd(N * (DN + DR), HID))
    return w


# Which megacore parameter holds which reference weight.
PARAM_OF = {"w_q": "linear_q_proj.weight", "w_dq": "linear_q_down_proj.weight", "g_q": "q_layernorm.weight",
            "w_uq": "linear_q_up_proj.weight", "w_dkv": "linear_kv_down_proj.weight", "g_kv": "kv_layernorm.weight",
            "w_ukv": "linear_kv_up_proj.weight", "w_o": "linear_proj.weight"}


def _build(cfg: TransformerConfig, w: dict, dtype=torch.float32) -> MultiLatentAttention:
    attn = MultiLatentAttention(cfg).to(dtype)
    params = dict(attn.named_parameters())
    assert set(params) == {PARAM_OF[k] for k in w}, sorted(params)
    with torch.no_grad():
        for key, tensor in w.items():
            params[PARAM_OF[key]].copy_(tensor)
    return attn


def _rope(x, cos, sin):
    """Half rotation of the last dim: (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin), one angle per pair."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :half], sin[:, None, :half]  # [S, 1, dr/2], broadcast over heads
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _reference(x, w, cos, sin, scale):
    """MLA from the formulas, in fp64, causal."""
    x = x.double()
    b, s, _ = x.shape
    if "w_q" in w:
        q = x @ w["w_q"].T
    else:
        q = ref.rmsnorm(x @ w["w_dq"].T, w["g_q"], EPS) @ w["w_uq"].T
    q = q.view(b, s, N, DN + DR)
    q_nope, q_rope = q[..., :DN], _rope(q[..., DN:], cos, sin)
    down = x @ w["w_dkv"].T
    c, k_rope = down[..., :R], _rope(down[..., None, R:], cos, sin)          # k_rope [b, s, 1, dr]
    kv = (ref.rmsnorm(c, w["g_kv"], EPS) @ w["w_ukv"].T).view(b, s, N, DN + DV)
    k_nope, v = kv[..., :DN], kv[..., DN:]
    # score(t, u) = scale · (q_nope_t · k_nope_u + q_rope_t · k_rope_u), the rotary key shared by all heads
    scores = (torch.einsum("bthd,buhd->bhtu", q_nope, k_nope)
              + torch.einsum("bthd,bud->bhtu", q_rope, k_rope[:, :, 0])) * scale
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    out = torch.einsum("bhtu,buhd->bthd", probs, v).reshape(b, s, N * DV)
    return out @ w["w_o"].T


def _expected_scale(yarn: bool) -> float:
    scale = 1.0 / math.sqrt(DN + DR)
    if yarn:
        m = 0.1 * YARN["rotary_mscale_all_dim"] * math.log(YARN["rotary_scaling_factor"]) + 1.0
        scale *= m * m
    return scale


def _tables(cfg):
    cos, sin = RotaryEmbedding(cfg)(S, "cpu", torch.float64)
    assert cos.shape == (S, DR)  # the rotary table has qk_rope_head_dim channels
    return cos, sin


def _x(dtype=torch.float32):
    return torch.randn(B, S, HID, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)


def _check(attn, w, cfg, dtype, tol):
    cos, sin = _tables(cfg)
    x = _x(dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    grad_out = torch.randn(B, S, HID, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = attn(x, (cos.to(dtype), sin.to(dtype)))
    want = _reference(x64, w, cos, sin, _expected_scale(cfg.rotary_scaling == "yarn"))
    torch.testing.assert_close(got.double(), want, **tol)
    (got.double() * grad_out).sum().backward()
    (want * grad_out).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    params = dict(attn.named_parameters())
    for key, tensor in w.items():
        torch.testing.assert_close(params[PARAM_OF[key]].grad.double(), tensor.grad, **tol, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("yarn", [False, True], ids=["rope", "yarn"])
@pytest.mark.parametrize("q_lora", [False, True], ids=["q_full", "q_lora"])
def test_mla_matches_fp64_reference(q_lora, yarn, backend):
    cfg = _config(RQ if q_lora else None, yarn, backend)
    w = _weights(q_lora)
    _check(_build(cfg, w), w, cfg, torch.float32, dict(rtol=5e-5, atol=5e-5))


@pytest.mark.parametrize("q_lora", [False, True], ids=["q_full", "q_lora"])
def test_mla_in_fp64_matches_the_reference_exactly(q_lora):
    """The module in fp64 (SDPA's fp64 kernel) against the formulas: everything runs in fp64 but the
    latent norms' statistics, which megacore's RMSNorm takes in fp32 by design, hence 5e-6."""
    cfg = _config(RQ if q_lora else None, yarn=True)
    w = _weights(q_lora, seed=1)
    _check(_build(cfg, w, torch.float64), w, cfg, torch.float64, dict(rtol=5e-6, atol=5e-6))


def test_softmax_scale():
    assert default_softmax_scale(_config()) == pytest.approx(1 / math.sqrt(DN + DR))
    m = 0.1 * 0.9 * math.log(4.0) + 1.0
    assert default_softmax_scale(_config(yarn=True)) == pytest.approx(m * m / math.sqrt(DN + DR))
    # no mscale_all_dim: DeepSeek leaves the scale alone (the rotary tables still carry yarn's factor)
    no_all = _config(**{**YARN, "rotary_mscale_all_dim": 0.0})
    assert default_softmax_scale(no_all) == pytest.approx(1 / math.sqrt(DN + DR))
    assert default_softmax_scale(_config(attention_softmax_scale=0.5)) == 0.5
    assert MultiLatentAttention(_config(yarn=True)).core_attention.scale == default_softmax_scale(_config(yarn=True))
    # the yarn rotary table of qk_rope_head_dim channels, scaled by mscale(f, 0.7) / mscale(f, 0.9)
    cos, _ = _tables(_config(yarn=True))
    factor = (0.1 * 0.7 * math.log(4.0) + 1) / (0.1 * 0.9 * math.log(4.0) + 1)
    torch.testing.assert_close(cos[0], torch.full((DR,), factor, dtype=torch.float64), rtol=1e-6, atol=0)
    # a model without MLA keeps 1/sqrt(head_dim) and its own rotary dim
    plain = TransformerConfig(hidden_size=HID, num_attention_heads=N).validate()
    assert default_softmax_scale(plain) == pytest.approx(1 / math.sqrt(HID // N))
    assert RotaryEmbedding(plain).rotary_dim == HID // N


def test_padding_v_to_the_qk_head_dim_changes_nothing():
    cfg = _config(RQ)
    attn = _build(cfg, _weights(True))
    rot = RotaryEmbedding(cfg)(S, "cpu", torch.float32)
    want = attn(_x(), rot)
    attn.pad_v_to_qk = True
    torch.testing.assert_close(attn(_x(), rot), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("interleave", [True, False], ids=["rope_interleave", "rope_halves"])
@pytest.mark.parametrize("q_lora", [False, True], ids=["q_full", "q_lora"])
def test_matches_hugging_face_deepseek_v3_attention(q_lora, interleave):
    """HF's DeepseekV3Attention (eager, YaRN with mscale_all_dim) and ours agree once its weights are
    copied by the documented correspondence, the rotary rows de-interleaved for rope_interleave=True.
    Both softmaxes run in fp32 (HF's eager and our reference backend), hence the tolerance."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4,
            "mscale": 0.7, "mscale_all_dim": 0.9, "beta_fast": 32.0, "beta_slow": 1.0}
    hc = transformers.DeepseekV3Config(hidden_size=HID, num_attention_heads=N, num_key_value_heads=N,
                                       q_lora_rank=RQ if q_lora else None, kv_lora_rank=R, qk_nope_head_dim=DN,
                                       qk_rope_head_dim=DR, v_head_dim=DV, rope_parameters=rope,
                                       rope_interleave=interleave, rms_norm_eps=EPS, max_position_embeddings=16)
    hc._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = DeepseekV3Attention(hc, layer_idx=0).double()
    for p in hf.parameters():
        torch.nn.init.normal_(p, mean=1.0 if p.dim() == 1 else 0.0, std=0.3)
    cfg = _config(RQ if q_lora else None, yarn=True, backend="reference")
    ours = MultiLatentAttention(cfg).double()
    perm = rope_deinterleave_index(DR) if interleave else torch.arange(DR)
    q_rows = torch.cat([torch.cat([torch.arange(DN), DN + perm]) + h * (DN + DR) for h in range(N)])
    kv_rows = torch.cat([torch.arange(R), R + perm])
    hf_sd, names = hf.state_dict(), {"q_proj": "linear_q_proj", "q_a_proj": "linear_q_down_proj",
                                     "q_a_layernorm": "q_layernorm", "q_b_proj": "linear_q_up_proj",
                                     "kv_a_proj_with_mqa": "linear_kv_down_proj", "kv_a_layernorm": "kv_layernorm",
                                     "kv_b_proj": "linear_kv_up_proj", "o_proj": "linear_proj"}
    rows = {"q_proj": q_rows, "q_b_proj": q_rows, "kv_a_proj_with_mqa": kv_rows}
    ours_sd = {}
    for key, tensor in hf_sd.items():
        module, leaf = key.rsplit(".", 1)
        ours_sd[f"{names[module]}.{leaf}"] = tensor[rows[module]] if module in rows else tensor
    ours.load_state_dict(ours_sd, strict=True)
    x = _x(torch.float64)
    positions = torch.arange(S)[None].expand(B, S)
    hf_mask = torch.full((S, S), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    want, _ = hf(x, DeepseekV3RotaryEmbedding(hc)(x, positions), hf_mask)
    got = ours(x, RotaryEmbedding(cfg)(S, "cpu", torch.float64))
    assert ours.core_attention.scale == pytest.approx(hf.scaling, rel=1e-12)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_recomputing_the_up_projections():
    """recompute.modules [mla_up_proj] (and [core_attn]) reach MLA through configure_recompute; with
    the up-projections recomputed they run again in backward and the gradients are unchanged."""
    cfg = TransformerConfig(num_layers=2, hidden_size=HID, num_attention_heads=N, vocab_size=64, seq_length=16,
                            ffn_hidden_size=32, multi_latent_attention=True, q_lora_rank=RQ, kv_lora_rank=R,
                            qk_nope_head_dim=DN, qk_rope_head_dim=DR, v_head_dim=DV)
    ids = torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(0))

    def grads(modules):
        model = GPTModel(cfg, seed=4).train()
        model.configure_recompute(RecomputeConfig(granularity="selective", modules=modules).validate())
        attn = model.decoder.layers["0"].self_attention
        assert attn.recompute_up_proj == ("mla_up_proj" in modules)
        assert attn.core_attention.recompute == ("core_attn" in modules)
        calls = []
        attn.linear_kv_up_proj.register_forward_hook(lambda *a: calls.append(1))
        model(ids, labels=ids).backward()
        return {n: p.grad for n, p in model.named_parameters()}, len(calls)

    want, calls = grads([])
    assert calls == 1
    for modules in (["mla_up_proj"], ["core_attn"], ["core_attn", "mla_up_proj"]):
        got, calls = grads(modules)
        assert calls == (2 if "mla_up_proj" in modules else 1), modules
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------ in GPTModel
def _model_config(**kw) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, vocab_padding_multiple=1,
                seq_length=16, ffn_hidden_size=48, multi_latent_attention=True, q_lora_rank=16, kv_lora_rank=12,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    return TransformerConfig(**{**base, **kw})


def test_deterministic_init():
    cfg = _model_config()
    a, b, other = GPTModel(cfg, seed=7), GPTModel(cfg, seed=7), GPTModel(cfg, seed=8)
    sa, sb, so = a.state_dict(), b.state_dict(), other.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    attn = "decoder.layers.1.self_attention."
    assert not torch.equal(sa[attn + "linear_kv_up_proj.weight"], so[attn + "linear_kv_up_proj.weight"])
    for norm in ("q_layernorm", "kv_layernorm"):
        assert torch.equal(sa[f"{attn}{norm}.weight"], torch.ones_like(sa[f"{attn}{norm}.weight"]))
    # projections N(0, init_std); the output projection the scaled init of residual branches
    std = {k: sa[attn + k + ".weight"].std().item() for k in ("linear_kv_down_proj", "linear_proj")}
    assert 0.01 < std["linear_kv_down_proj"] < 0.03
    assert std["linear_proj"] < 0.6 * std["linear_kv_down_proj"]


def test_gpt_with_mla_trains():
    torch.manual_seed(0)
    model = GPTModel(_model_config(), seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_flops_count_mla(q_lora_rank):
    """N of the FLOPs formula equals the model's matmul parameters (all but the input embedding), and
    6·N + the MLA attention term equals torch's FLOP count of a forward and backward, whose plain
    attention computes every (query, key) pair: twice the causal attention the formula counts."""
    from torch.utils.flop_counter import FlopCounterMode

    from megacore.training.flops import flops_per_token, matmul_params

    cfg = _model_config(q_lora_rank=q_lora_rank, attention_backend="reference")
    model = GPTModel(cfg, seed=0)
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "word_embeddings" not in name)
    assert matmul_params(cfg) == n
    s = cfg.seq_length
    attention = 3.0 * s * cfg.num_attention_heads * (8 + 4 + 6)   # per token and layer
    assert flops_per_token(cfg) == 6.0 * n + cfg.num_layers * attention
    ids = torch.randint(0, 64, (2, s))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).backward()
    tokens = ids.numel()
    assert counter.get_total_flops() == (6.0 * n + 2 * cfg.num_layers * attention) * tokens
