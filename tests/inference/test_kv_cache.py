"""KV-cache decoding against the model's own full forward (fp32): the new tokens' logits, fed in
pieces through a KVCache, equal the logits of one forward over the whole sequence, for each
attention variant the model supports; cached and uncached greedy generation give the same tokens
(also past seq_length, where the window slides). Hugging Face parity of generation itself is in
test_generate.py (which decodes with the cache by default)."""

import pytest
import torch

from megacore.config import TransformerConfig
from megacore.inference import KVCache
from megacore.inference.sampling import generate
from megacore.models import GPTModel

BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=24, ffn_hidden_size=48)
VARIANTS = {
    "llama_gqa": dict(num_query_groups=2),
    "mqa_qk_norm": dict(num_query_groups=1, qk_norm=True),
    "gpt2_learned_layernorm": dict(position_embedding="learned", normalization="LayerNorm", activation="gelu",
                                   add_bias_linear=True, add_qkv_bias=True),
    "sliding_window": dict(num_query_groups=2, sliding_window=5),
    "llama3_rope_scaling": dict(num_query_groups=2, rotary_scaling="llama3", rotary_scaling_factor=8.0,
                                rotary_original_max_positions=8),
}


def _model(**extra):
    return GPTModel(TransformerConfig(**BASE, **extra), seed=3).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_logits_equal_the_full_forward(variant):
    model = _model(**VARIANTS[variant])
    ids = torch.randint(0, BASE["vocab_size"], (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch=2)
        pieces = [(0, 6), (6, 7), (7, 10), (10, 11), (11, 14)]  # prefill, single tokens and a chunk
        for start, end in pieces:
            got = model(ids[:, start:end], kv_cache=cache)
            assert cache.length == end
            err = (got - full[:, start:end]).abs().max().item()
            assert err < 1e-5, (variant, start, end, err)


def test_cached_and_uncached_greedy_generation_agree_past_the_window():
    model = _model(num_query_groups=2)
    prompt = torch.randint(0, BASE["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(2))
    n = 30  # 7 + 30 > seq_length=24: the window slides
    cached = generate(model, prompt, n, use_cache=True)
    uncached = generate(model, prompt, n, use_cache=False)
    assert cached.shape == (2, 7 + n)
    assert torch.equal(cached, uncached)


def test_sampling_with_the_cache_matches_sampling_without():
    model = _model(num_query_groups=2)
    prompt = torch.randint(0, BASE["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, seed=7)
    assert torch.equal(generate(model, prompt, 12, use_cache=True, **kw), generate(model, prompt, 12, use_cache=False, **kw))


def test_cache_errors_name_the_problem():
    model = _model()
    cache = KVCache.for_model(model, batch=1, max_length=8)
    ids = torch.zeros(1, 6, dtype=torch.long)
    with torch.no_grad():
        model(ids, kv_cache=cache)
        with pytest.raises(ValueError, match="cannot take 3 more"):
            model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="batch 2"):
            model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="labels"):
            model(ids[:, :1], labels=ids[:, :1], kv_cache=cache)
    cache.reset()
    assert cache.length == 0
