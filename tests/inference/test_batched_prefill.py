"""Packed (batched, chunked) prefill and prefix caching in the engine.

References: the model's uncached full forward (logits; greedy tokens as the argmax of a full forward
per step) and each request run alone through an engine of one slot."""

import pytest
import torch

from megacore.inference.cache import KVStore, probe_cache_shapes
from megacore.inference.engine import Engine, SamplingParams
from megacore.inference.sampling import generate
from megacore.inference.packed import PackedView, PrefillChunk, pack_chunks, segments
from tests.inference.test_engine import alone, prompts, tiny

PACKABLE = {"gqa": {}, "mla": {}, "swa": dict(sliding_window=5), "learned": dict(position_embedding="learned")}


def model_for(name):
    return tiny(name) if name in ("gqa", "mla") else tiny("gqa", **PACKABLE[name])


@pytest.mark.parametrize("name", list(PACKABLE))
def test_packed_chunks_give_the_full_forward_logits(name):
    """Three sequences in shuffled blocks of 3: a first call packs one whole prompt, the head of a second
    and the head of a third; a second call packs the rest of the second and third (keys read back from
    the blocks). Every position's logits equal the uncached forward's."""
    model = model_for(name)
    ids = torch.randint(0, 64, (3, 13), generator=torch.Generator().manual_seed(5))
    store = KVStore(probe_cache_shapes(model), num_blocks=16, block_size=3, num_slots=3, device="cpu")
    tables = [[7, 2, 9, 4, 11], [3, 10, 1, 6, 8], [15, 5, 12, 14, 13]]
    lengths = (9, 13, 11)
    calls = [[(0, 0, 9), (1, 0, 5), (2, 0, 2)], [(1, 5, 13), (2, 2, 11)]]
    with torch.no_grad():
        full = model(ids)
        for call in calls:
            chunks = [PrefillChunk(ids[r, a:b].tolist(), a, tables[r]) for r, a, b in call]
            inp = pack_chunks(chunks, 3)
            view = PackedView(store, inp, segments(inp))
            view.logits_at = None                                   # every position's logits, to compare
            got = model(inp.ids, kv_cache=view)[0]
            # What the runner gets: the logits at each chunk's last token only ([R, V], no [T, V]).
            lasts = model(inp.ids, kv_cache=PackedView(store, inp, segments(inp)))[0]
            assert lasts.shape == (len(call), full.shape[-1])
            torch.testing.assert_close(lasts, got[inp.last], rtol=1e-5, atol=1e-5)
            at = 0
            for r, a, b in call:
                assert b <= lengths[r]
                assert (got[at:at + b - a] - full[r, a:b]).abs().max() < 1e-5, (name, r, a)
                at += b - a


def _params(i):
    if i % 3 == 1:
        return SamplingParams(max_new_tokens=7 + i, temperature=0.9, top_k=8 * (i % 2), top_p=0.9, seed=10 + i)
    return SamplingParams(max_new_tokens=7 + i)


def _run_staggered(engine, ps):
    """Requests arriving in three waves; the engine steps between waves."""
    reqs = []
    for wave in (ps[:3], ps[3:5], ps[5:]):
        reqs += [engine.add_request(p, _params(len(reqs) + j)) for j, p in enumerate(wave)]
        engine.step()
    engine.run_until_done()
    return reqs


@pytest.mark.parametrize("name,budget,caching", [("gqa", 64, False), ("gqa", 5, False), ("mla", 7, False),
                                                 ("swa", 64, False), ("learned", 64, False), ("gqa", 64, True)])
def test_mixed_batch_each_request_gets_its_tokens_alone(name, budget, caching):
    """Mixed prompt lengths, staggered arrivals, greedy and seeded sampling, a pool small enough to
    preempt; the prefill budget packs several prompts per forward (64) or splits one prompt over
    several (5, 7 tokens: smaller than most prompts). With prefix caching, preempted requests resume
    on the blocks they had computed."""
    model = model_for(name)
    ps = prompts((3, 11, 6, 14, 2, 9, 5), seed=7)
    engine = Engine(model, max_batch=4, max_length=32, block_size=4, num_blocks=14, decode_steps=3,
                    max_prefill_tokens=budget, prefix_caching=caching)
    assert engine.packed
    reqs = _run_staggered(engine, ps)
    for i, (r, p) in enumerate(zip(reqs, ps)):
        sp = _params(i)
        want = (alone(model, p, sp.max_new_tokens) if sp.temperature == 0 else
                Engine(model, max_batch=1, block_size=8).generate([p], sp)[0])
        assert r.token_ids == want, (name, budget, i)
    if budget == 64:   # the first wave (3 prompts) took one forward
        assert engine.prefill_calls < len(ps) + engine.preemptions
    else:              # a prompt longer than the budget took several
        assert engine.prefill_calls > len(ps)
    assert sorted(engine.free_blocks) == list(range(1, 14)) and sorted(engine.free_slots) == [0, 1, 2, 3]
    if caching:
        assert engine.preemptions > 0 and engine.blocks.hits > 0


def test_hybrid_mamba_prefills_one_request_at_a_time_and_still_equals_alone():
    model = tiny("hybrid_mamba")
    ps = prompts((3, 11, 6, 14, 2, 9, 5), seed=8)
    engine = Engine(model, max_batch=4, max_length=32, block_size=4, decode_steps=3, max_prefill_tokens=4,
                    prefix_caching=True)
    assert not engine.packed and not engine.blocks.prefix_caching
    reqs = _run_staggered(engine, ps)
    assert engine.prefill_calls == len(ps)   # one whole prompt per forward, whatever the budget
    for i, (r, p) in enumerate(zip(reqs, ps)):
        sp = _params(i)
        if sp.temperature == 0:
            assert r.token_ids == alone(model, p, sp.max_new_tokens), i


@pytest.mark.parametrize("name", ["gqa", "mla"])
def test_prefix_cache_reuses_blocks_and_gives_the_same_tokens(name):
    """Two requests sharing a 21-token prefix (5 full blocks of 4): the second computes only its suffix,
    and both get the tokens they get without caching."""
    model = model_for(name)
    shared, (a, b) = prompts((21,), seed=9)[0], prompts((3, 5), seed=10)
    p1, p2 = shared + a, shared + b
    engine = Engine(model, max_batch=2, max_length=40, block_size=4, decode_steps=4, prefix_caching=True)
    r1 = engine.add_request(p1, SamplingParams(max_new_tokens=6))
    engine.run_until_done()
    assert engine.prefill_tokens == len(p1)
    r2 = engine.add_request(p2, SamplingParams(max_new_tokens=6, temperature=0.8, seed=3))
    engine.run_until_done()
    assert engine.prefill_tokens - len(p1) == len(p2) - 20 and engine.blocks.hits == 5
    assert r1.token_ids == alone(model, p1, 6)
    plain = Engine(model, max_batch=1, block_size=4)
    assert r2.token_ids == plain.generate([p2], SamplingParams(max_new_tokens=6, temperature=0.8, seed=3))[0]
    assert plain.prefill_tokens == len(p2)
    # the same prompt again, while a request holding the prefix still runs: shared blocks, refcounted
    r3 = engine.add_request(p1, SamplingParams(max_new_tokens=6))
    r4 = engine.add_request(p1, SamplingParams(max_new_tokens=6))
    engine.run_until_done()
    assert r3.token_ids == r4.token_ids == r1.token_ids
    assert sorted(engine.free_blocks) == list(range(1, engine.store.num_blocks))


def test_prefix_cache_under_memory_pressure_evicts_and_stays_exact():
    """Many requests over a few shared prefixes through a pool that cannot keep them all: cached
    blocks are evicted (least recently used) and every request still gets its tokens alone."""
    model = tiny("gqa")
    heads = prompts((9, 13, 6), seed=11)
    tails = prompts((2, 4, 3, 1, 5, 2, 3, 4), seed=12)
    ps = [heads[i % 3] + t for i, t in enumerate(tails)]
    engine = Engine(model, max_batch=3, max_length=32, block_size=4, num_blocks=12, decode_steps=3,
                    max_prefill_tokens=16, prefix_caching=True)
    reqs = []
    for i in range(0, len(ps), 2):
        reqs += [engine.add_request(p, SamplingParams(max_new_tokens=6)) for p in ps[i:i + 2]]
        engine.step()
    engine.run_until_done()
    assert engine.blocks.hits > 0 and engine.blocks.evictions > 0
    for r, p in zip(reqs, ps):
        assert r.token_ids == alone(model, p, 6)
    assert sorted(engine.free_blocks) == list(range(1, 12)) and not engine.blocks.refs


def test_bad_prefill_options_are_refused():
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        Engine(tiny("gqa"), max_prefill_tokens=0)
    with pytest.raises(ValueError, match="packed_prefill=True needs"):
        Engine(tiny("hybrid_mamba"), packed_prefill=True)


def test_a_pack_longer_than_the_learned_position_table_is_fine():
    """Four prompts of 14 tokens packed into one 56-token row of a model with 40 learned positions:
    only each sequence's own positions must fit."""
    model = tiny("gqa", position_embedding="learned")
    ps = prompts((14, 14, 14, 14), seed=13)
    engine = Engine(model, max_batch=4, block_size=4, decode_steps=4)
    assert engine.generate(ps, SamplingParams(max_new_tokens=5)) == [alone(model, p, 5) for p in ps]
    assert engine.prefill_calls == 1


def test_prefix_cache_keeps_a_finished_requests_generated_tokens_for_the_next_turn():
    """A chat's next turn repeats the previous prompt and answer: the blocks holding the answer's
    tokens are reused too (not only the prompt's)."""
    model = tiny("gqa")
    p1 = prompts((10,), seed=14)[0]
    engine = Engine(model, max_batch=2, block_size=4, decode_steps=4, prefix_caching=True)
    answer = engine.generate([p1], SamplingParams(max_new_tokens=9))[0]
    p2 = p1 + answer + [5, 6, 7]
    before = engine.prefill_tokens
    again = engine.generate([p2], SamplingParams(max_new_tokens=5))[0]
    cached = len(p1) + len(answer) - 1          # the last answer token was never fed back
    assert engine.prefill_tokens - before == len(p2) - cached // 4 * 4
    assert again == alone(model, p2, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gqa", "mla"])
def test_packed_and_chunked_prefill_on_cuda_equal_the_full_forward(name):
    model = tiny(name).float().cuda()
    ps = prompts((3, 11, 6, 14, 2, 9, 5), seed=15)
    for budget in (64, 5):
        engine = Engine(model, max_batch=4, max_length=32, block_size=4, decode_steps=3, max_prefill_tokens=budget,
                        prefix_caching=True)
        got = engine.generate(ps + ps[:2], SamplingParams(max_new_tokens=8))
        want = [generate(model, torch.tensor(p, device="cuda"), 8, use_cache=False)[len(p):].tolist() for p in ps + ps[:2]]
        assert got == want, (name, budget)
