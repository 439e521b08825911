"""KV-cache decoding of a multi-latent-attention GPTModel: the cache holds each position's normed latent
[kv_lora_rank] and rotary key [qk_rope_head_dim] (not per-head keys and values); decoding token by
token (and in chunks) gives the full forward's logits, with the plain decode (keys and values rebuilt
from the latents) and the absorbed one (W_uk folded into the query, W_uv after attention); both agree,
and cached greedy generation equals uncached."""

import pytest
import torch

from megacore.config import TransformerConfig
from megacore.inference import KVCache
from megacore.inference.sampling import generate
from megacore.layers.mla import set_absorbed_decode
from megacore.models import GPTModel

BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=24, ffn_hidden_size=48,
            multi_latent_attention=True, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
VARIANTS = {
    "q_full": dict(),
    "q_lora": dict(q_lora_rank=16),
    "q_lora_yarn": dict(q_lora_rank=16, rotary_scaling="yarn", rotary_scaling_factor=4.0,
                        rotary_original_max_positions=8, rotary_mscale=1.0, rotary_mscale_all_dim=1.0),
    "reference_backend": dict(q_lora_rank=16, attention_backend="reference"),
}


def _model(absorb: bool, **extra):
    model = GPTModel(TransformerConfig(**BASE, **extra), seed=3).eval()
    assert set_absorbed_decode(model, absorb) == BASE["num_layers"]
    return model


def _ids(seq=14, seed=1):
    return torch.randint(0, BASE["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(seed))


def _decode(model, ids, pieces):
    cache = KVCache.for_model(model, batch=ids.shape[0])
    out = []
    for start, end in pieces:
        out.append(model(ids[:, start:end], kv_cache=cache))
        assert cache.length == end
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("absorb", [False, True], ids=["plain", "absorbed"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_logits_equal_the_full_forward(variant, absorb):
    model = _model(absorb, **VARIANTS[variant])
    ids = _ids()
    pieces = [(0, 5)] + [(t, t + 1) for t in range(5, 11)] + [(11, 14)]  # prefill, tokens one by one, a chunk
    with torch.no_grad():
        full = model(ids)
        got, cache = _decode(model, ids, pieces)
    err = (got - full).abs().max().item()
    assert err < 1e-5, (variant, absorb, err)
    # what is cached: the latent and the rotary key, one "head" each
    latent, rope_key = cache._k[0], cache._v[0]
    assert latent.shape == (2, BASE["seq_length"], 1, BASE["kv_lora_rank"])
    assert rope_key.shape == (2, BASE["seq_length"], 1, BASE["qk_rope_head_dim"])


def test_absorbed_decode_equals_plain_decode():
    ids = _ids(seq=12, seed=4)
    pieces = [(0, 3)] + [(t, t + 1) for t in range(3, 12)]
    with torch.no_grad():
        plain, _ = _decode(_model(False, q_lora_rank=16), ids, pieces)
        absorbed, _ = _decode(_model(True, q_lora_rank=16), ids, pieces)
    torch.testing.assert_close(absorbed, plain, rtol=1e-5, atol=1e-5)


def test_cached_greedy_generation_equals_uncached():
    prompt = _ids(seq=5, seed=2)
    model = _model(True, q_lora_rank=16)
    n = 25  # past seq_length=24: the uncached window slides, the cache is reset and refilled
    assert torch.equal(generate(model, prompt, n, use_cache=True), generate(model, prompt, n, use_cache=False))
