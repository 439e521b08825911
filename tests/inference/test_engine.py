"""The dynamic-batching engine and its paged KV cache.

References: the model's uncached full forward (logits, and greedy tokens as the argmax of a full
forward per step), each request run alone, and a static contiguous cache."""

import pytest
import torch

from megacore.config import TransformerConfig
from megacore.inference.cache import CacheBatch, KVStore, probe_cache_shapes
from megacore.inference.engine import Engine, QueueFull, SamplingParams
from megacore.inference.sampling import generate
from megacore.inference.static import StaticGenerator
from megacore.inference.text import TextStream
from megacore.models import GPTModel

BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=40, ffn_hidden_size=48)
VARIANTS = {
    "gqa": (dict(num_query_groups=2), torch.float64),
    "mla": (dict(multi_latent_attention=True, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
            torch.float64),
    "hybrid_mamba": (dict(num_layers=4, layer_pattern="M*M-", mamba_head_dim=8, mamba_state_dim=4, mamba_num_groups=2,
                          mamba_chunk_size=4, num_query_groups=2), torch.float32),
}


def tiny(name="gqa", **extra):
    cfg, dtype = VARIANTS[name]
    return GPTModel(TransformerConfig(**{**BASE, **cfg, **extra}), seed=3).to(dtype).eval()


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, n):
    """Greedy tokens by the full forward's argmax, token after token."""
    return generate(model, torch.tensor(prompt), n, use_cache=False)[len(prompt):].tolist()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_paged_cache_logits_equal_the_full_forward(name):
    """Two sequences of different lengths in shuffled, interleaved blocks of 3 positions: prefill, then
    single tokens and a chunk, every new position's logits equal the uncached forward's."""
    model = tiny(name)
    ids = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(1))
    store = KVStore(probe_cache_shapes(model), num_blocks=12, block_size=3, num_slots=2, device="cpu")
    table = torch.tensor([[7, 2, 9, 4, 11], [3, 10, 1, 6, 8]])
    with torch.no_grad():
        full = model(ids)
        for row, start in ((0, 6), (1, 4)):  # prefill each row alone (fresh), different lengths
            view = CacheBatch(store, torch.tensor([row]), table[row:row + 1], torch.zeros(1, dtype=torch.long), fresh=True)
            got = model(ids[row:row + 1, :start], kv_cache=view)
            assert (got[0] - full[row, :start]).abs().max() < 1e-5
        lengths = torch.tensor([6, 4])
        for new in (1, 1, 3, 1):
            feed = torch.stack([ids[r, int(lengths[r]):int(lengths[r]) + new] for r in range(2)])
            view = CacheBatch(store, torch.tensor([0, 1]), table, lengths, key_len=15)
            got = model(feed, kv_cache=view)
            for r in range(2):
                want = full[r, int(lengths[r]):int(lengths[r]) + new]
                assert (got[r] - want).abs().max() < 1e-5, (name, r, new)
            lengths = lengths + new


@pytest.mark.parametrize("name", ["gqa", "hybrid_mamba"])
def test_staggered_mixed_requests_each_get_their_tokens_alone(name):
    """Six requests of mixed prompt lengths and max_new_tokens, arriving in three waves, through 3 slots
    and a pool too small for all of them at once (preemption and recompute happen)."""
    model = tiny(name)
    ps, news = prompts((3, 9, 5, 14, 2, 7)), [10, 4, 17, 6, 12, 9]
    engine = Engine(model, max_batch=3, max_length=24, block_size=4, num_blocks=8, decode_steps=3)
    reqs = [engine.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(ps[:2], news[:2])]
    engine.step()
    reqs += [engine.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(ps[2:4], news[2:4])]
    engine.step()
    engine.step()
    reqs += [engine.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(ps[4:], news[4:])]
    engine.run_until_done()
    assert engine.preemptions > 0
    for r, p, n in zip(reqs, ps, news):
        assert r.finish_reason == "length"
        assert r.token_ids == alone(model, p, n), r.id
    assert sorted(engine.free_blocks) == list(range(1, 8)) and sorted(engine.free_slots) == [0, 1, 2]


def test_paged_engine_equals_the_static_contiguous_cache():
    model = tiny("mla")
    ps = prompts((6, 6, 6), seed=4)
    static = StaticGenerator(model, batch=3).generate(torch.tensor(ps), 12)[:, 6:].tolist()
    engine = Engine(model, max_batch=2, block_size=5, decode_steps=4)
    assert engine.generate(ps, SamplingParams(max_new_tokens=12)) == static


def test_sampled_requests_do_not_depend_on_their_batch():
    model = tiny("gqa", num_layers=1)
    ps = prompts((4, 8, 3, 6), seed=2)
    params = [SamplingParams(max_new_tokens=8, temperature=t, top_k=k, top_p=p, seed=s)
              for t, k, p, s in ((0.9, 0, 1.0, 1), (1.2, 10, 1.0, 2), (0.7, 0, 0.8, 3), (0.0, 0, 1.0, 4))]
    together = Engine(model, max_batch=4, block_size=4, decode_steps=3).generate(ps, params)
    for p, sp, got in zip(ps, params, together):
        assert Engine(model, max_batch=1, block_size=8, decode_steps=5).generate([p], sp)[0] == got
    assert together[3] == alone(model, ps[3], 8)


def test_stop_tokens_eos_and_streamed_outputs():
    model = tiny("gqa")
    p = prompts((5,), seed=6)[0]
    free = alone(model, p, 12)
    stop_at = free[6]
    engine = Engine(model, max_batch=2, block_size=4, decode_steps=4, eos_ids=[free[9]])
    seen = []
    r1 = engine.add_request(p, SamplingParams(max_new_tokens=12, stop_token_ids=[stop_at]), on_output=seen.append)
    r2 = engine.add_request(p, SamplingParams(max_new_tokens=12))                     # stops at eos
    r3 = engine.add_request(p, SamplingParams(max_new_tokens=12, ignore_eos=True))
    engine.run_until_done()
    first = free.index(stop_at)
    assert r1.token_ids == free[:first + 1] and r1.finish_reason == "stop"
    assert r2.token_ids == free[:free.index(free[9]) + 1] and r2.finish_reason == "stop"
    assert r3.token_ids == free and r3.finish_reason == "length"
    assert [t for o in seen for t in o.new_token_ids] == r1.token_ids
    assert [o.finished for o in seen] == [False] * (len(seen) - 1) + [True]


def test_cancel_queue_bound_and_bad_requests():
    model = tiny("gqa")
    engine = Engine(model, max_batch=1, block_size=4, max_queue=2)
    a = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=30))
    engine.add_request([4, 5], SamplingParams(max_new_tokens=3))
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.add_request([6], SamplingParams(max_new_tokens=3))
    engine.step()                       # a is admitted and decoding, the other waits
    assert engine.num_queued == 1 and len(engine.running) == 1
    engine.cancel(a.id)
    engine.step()
    assert a.finish_reason == "cancelled" and len(a.token_ids) < 30
    engine.run_until_done()
    assert sorted(engine.free_blocks) == list(range(1, engine.store.num_blocks)) and engine.free_slots == [0]
    with pytest.raises(ValueError, match="at most 40 positions"):
        engine.add_request(list(range(40)), SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request([1], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request([64], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request([1], SamplingParams(stop=["x"]))


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    class Bytes:  # a byte-level tokenizer: token i is byte i
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    text = "héllo wörld. STOP here"
    ids = list(text.encode())
    stream = TextStream(Bytes(), ids[:2], stop=["STOP", "xyz"])
    out, stopped = "", False
    for t in ids[2:]:
        delta, stopped = stream.push(t)
        assert "\ufffd" not in delta
        out += delta
        if stopped:
            break
    assert stopped and out == text[2:text.index("STOP")]
    plain = TextStream(Bytes(), [], stop=["zz"])
    got = "".join(plain.push(t)[0] for t in "abz".encode()) + plain.finish()
    assert got == "abz"


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("greedy", [True, False])
def test_a_decode_step_reads_nothing_back_to_the_host(name, greedy, monkeypatch):
    """What a CUDA graph cannot hold: a decode step (forward, sampling, stop bookkeeping) never turns
    a tensor into a Python value. Checked on the CPU by making every such conversion raise."""
    from megacore.inference.runner import DecodeInputs, ModelRunner

    model = tiny(name)
    store = KVStore(probe_cache_shapes(model), num_blocks=9, block_size=4, num_slots=3, device="cpu")
    runner = ModelRunner(model, store, use_graphs=False)
    b = 3
    st = DecodeInputs(tokens=torch.tensor([5, 6, 0]), lengths=torch.tensor([7, 3, 0]), slots=torch.tensor([0, 1, 3]),
                      table=torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0], [0, 0, 0, 0]]),
                      temperature=torch.full((b,), 0.0 if greedy else 0.8), top_k=torch.tensor([0, 5, 0]),
                      top_p=torch.tensor([1.0, 0.9, 1.0]), seed=torch.tensor([1, 2, 0]),
                      remaining=torch.tensor([4, 4, 0]), stop_ids=torch.full((b, 4), -1),
                      done=torch.tensor([False, False, True]))
    out = torch.zeros(b, dtype=torch.long)

    def no_sync(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host inside a decode step")

    for method in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, no_sync)
    with torch.no_grad():
        runner._step(st, out, greedy, key_len=16)
        runner._step(st, out, greedy, key_len=16)
    monkeypatch.undo()
    assert st.lengths.tolist() == [9, 5, 0] and st.remaining.tolist() == [2, 2, 0] and out[2].item() == -1
