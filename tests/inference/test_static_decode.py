"""Static-cache decoding (``megacore.inference.static``) and the on-device sampler.

References: the model's own uncached forward (greedy: argmax of a full forward over the whole
sequence at every step, ``sampling.generate(use_cache=False)``), and for the sampler the CPU
reference filter ``sampling.filter_logits`` and exact softmax probabilities."""

import pytest
import torch

from megacore.config import TransformerConfig
from megacore.inference.device_sampling import filter_logits_rows, hash_uniform, sample_tokens
from megacore.inference.sampling import filter_logits, generate
from megacore.inference.static import StaticGenerator, generate_static
from megacore.models import GPTModel

BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=40, ffn_hidden_size=48)
MODELS = {
    "gqa": (dict(num_query_groups=2), torch.float64),
    "gqa_sliding_window": (dict(num_query_groups=2, sliding_window=6), torch.float64),
    "mla_latent_cache": (dict(multi_latent_attention=True, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                              v_head_dim=6, q_lora_rank=16), torch.float64),
    "hybrid_mamba": (dict(num_layers=4, layer_pattern="M*M-", mamba_head_dim=8, mamba_state_dim=4, mamba_num_groups=2,
                          mamba_chunk_size=4, num_query_groups=2), torch.float32),
}


def tiny(name):
    extra, dtype = MODELS[name]
    return GPTModel(TransformerConfig(**{**BASE, **extra}), seed=3).to(dtype).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_static_cache_greedy_equals_the_full_forward(name):
    model = tiny(name)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    want = generate(model, prompt, 13, use_cache=False)        # argmax of a full forward per token
    gen = StaticGenerator(model, batch=2, steps_per_sync=4)   # 4 tokens per host sync: chunks + a remainder
    assert torch.equal(gen.generate(prompt, 13), want)
    assert torch.equal(gen.generate(prompt, 13), want)        # reused cache and decoders


def test_compiled_decode_step_equals_the_full_forward():
    """``compile_step=True`` (the step through torch.compile) decodes the same greedy tokens; fp64 keeps
    the fused kernels' rounding out of the argmax."""
    model = tiny("gqa")
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    want = generate(model, prompt, 9, use_cache=False)
    gen = StaticGenerator(model, batch=2, steps_per_sync=4, compile_step=True)
    assert torch.equal(gen.generate(prompt, 9), want)
    assert gen.runner._step_fn is not gen.runner._step   # the compiled step ran, not the eager one


def test_static_cache_stops_at_eos_like_generate():
    model = tiny("gqa")
    prompt = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(2))
    free = generate(model, prompt, 16, use_cache=False)
    eos = [int(free[0, 7]), int(free[2, 9])]                 # tokens rows 0 and 2 will produce
    want = generate(model, prompt, 16, eos_ids=eos)
    assert torch.equal(generate_static(model, prompt, 16, eos_ids=eos), want)


def test_static_cache_refuses_to_run_past_its_length():
    model = tiny("gqa")
    with pytest.raises(ValueError, match="max_length=40"):
        generate_static(model, torch.zeros(1, 30, dtype=torch.long), 11)


def test_row_filter_equals_the_reference_filter():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    logits[1, :10] = 2.0  # ties at the k-th value
    top_k = torch.tensor([0, 10, 5, 0, 50, 3])
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.9, 0.3, 0.7])
    got = filter_logits_rows(logits, top_k, top_p)
    for r in range(6):
        want = filter_logits(logits[r:r + 1], int(top_k[r]), float(top_p[r]))
        assert torch.equal(torch.isinf(got[r:r + 1]), torch.isinf(want)), r
        assert torch.equal(got[r:r + 1][~torch.isinf(want)], want[~torch.isinf(want)])


def test_hashed_draws_are_uniform_and_the_sampler_matches_softmax():
    n = 4000
    u = hash_uniform(torch.arange(n) % 7, torch.arange(n), 16)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    # One row's logits repeated over n positions: the token frequencies follow softmax(z / T) restricted
    # to the top-k / top-p set, renormalized (4 sigma of a binomial).
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, 0.7, 1.9, -0.3]]).expand(n, -1)
    ones = torch.ones(n)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8)):
        tokens = sample_tokens(logits, ones * temperature, ones.long() * top_k, ones * top_p,
                               torch.full((n,), 11), torch.arange(n))
        probs = torch.softmax(filter_logits(logits[:1] / temperature, top_k, top_p), -1)[0].double()
        freq = torch.bincount(tokens, minlength=8).double() / n
        assert torch.all((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 1e-9), (freq, probs)


def test_sampling_is_a_function_of_seed_and_position_only():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(5))
    t, k, p = torch.full((4,), 0.9), torch.tensor([0, 5, 0, 0]), torch.tensor([1.0, 1.0, 0.8, 1.0])
    seed, pos = torch.tensor([1, 2, 3, 1]), torch.tensor([10, 11, 12, 13])
    whole = sample_tokens(logits, t, k, p, seed, pos)
    for r in range(4):  # alone, and in another batch order
        assert int(sample_tokens(logits[r:r + 1], t[r:r + 1], k[r:r + 1], p[r:r + 1], seed[r:r + 1], pos[r:r + 1])) == int(whole[r])
    flip = torch.tensor([3, 2, 1, 0])
    assert torch.equal(sample_tokens(logits[flip], t[flip], k[flip], p[flip], seed[flip], pos[flip]), whole[flip])
    greedy = sample_tokens(logits, torch.zeros(4), k, p, seed, pos)
    assert torch.equal(greedy, logits.argmax(-1))


@pytest.mark.gpu
def test_graphed_decode_equals_eager_decode_on_cuda():
    model = GPTModel(TransformerConfig(**{**BASE, "num_query_groups": 2, "seq_length": 128}), seed=3).cuda().eval()
    prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1)).cuda()
    graphed = StaticGenerator(model, 2, use_graphs=True)
    eager = StaticGenerator(model, 2, use_graphs=False)
    want = generate(model, prompt, 40, use_cache=False)
    assert torch.equal(eager.generate(prompt, 40), want)
    assert torch.equal(graphed.generate(prompt, 40), want)
    assert any(d.graph is not None for d in graphed.runner._decoders.values())
    kw = dict(temperature=0.8, top_p=0.9, seed=4)
    assert torch.equal(graphed.generate(prompt, 40, **kw), eager.generate(prompt, 40, **kw))
    compiled = StaticGenerator(model, 2, use_graphs=True, compile_step=True)
    assert torch.equal(compiled.generate(prompt, 40), want)
    assert any(d.graph is not None for d in compiled.runner._decoders.values())
