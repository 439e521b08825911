"""The paged decode-attention kernel (Triton; its interpreter on the CPU) against its plain-torch
definition, and the engine decoding through it against the full forward."""

import pytest
import torch

from megacore.inference.engine import Engine, SamplingParams, build_runner
from megacore.inference.paged_attention import paged_decode_attention, paged_decode_attention_reference
from megacore.kernels._dispatch import interpreter_enabled, triton_available

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy, inside Triton's interpreter
needs_triton = pytest.mark.skipif(not triton_available() or not (torch.cuda.is_available() or interpreter_enabled()),
                                  reason="needs triton (CUDA, or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize("window", [None, 3, 6])
@pytest.mark.parametrize("heads, groups", [(4, 2), (4, 4), (4, 1)])
def test_kernel_equals_the_reference(window, heads, groups):
    g = torch.Generator().manual_seed(0)
    b, d, dv, bs, n = 3, 8, 6, 4, 12
    q = torch.randn(b, heads, d, generator=g)
    k_pool, v_pool = torch.randn(n, bs, groups, d, generator=g), torch.randn(n, bs, groups, dv, generator=g)
    table = torch.tensor([[7, 2, 9, 4], [3, 10, 1, 6], [5, 0, 0, 0]])
    lengths = torch.tensor([13, 5, 0])  # the query's own position; keys 0..lengths[b]
    args = [t.to(DEVICE) for t in (q, k_pool, v_pool, table, lengths)]
    got = paged_decode_attention(*args, 0.3, window, force_triton=True)
    want = paged_decode_attention_reference(q.double(), k_pool.double(), v_pool.double(), table, lengths, 0.3, window)
    assert (got.cpu().double() - want).abs().max() < 1e-5


@needs_triton
@pytest.mark.parametrize("extra", [dict(num_query_groups=2, sliding_window=5)])
def test_engine_through_the_kernel_equals_the_full_forward(extra):
    from tests.inference.test_engine import alone, prompts, tiny

    model = tiny("gqa", **extra).float().to(DEVICE)
    runner = build_runner(model, max_batch=3, max_length=24, block_size=4, use_graphs=False, paged_kernel="force")
    engine = Engine(model, max_batch=3, max_length=24, block_size=4, decode_steps=4, runner=runner)
    ps, news = prompts((3, 9, 6), seed=3), [7, 5, 9]
    got = engine.generate(ps, [SamplingParams(max_new_tokens=n) for n in news])
    assert got == [alone(model, p, n) for p, n in zip(ps, news)]


@pytest.mark.gpu
def test_graphed_engine_with_the_kernel_equals_the_full_forward_on_cuda():
    from megacore.config import TransformerConfig
    from megacore.inference.sampling import generate
    from megacore.models import GPTModel

    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=64,
                            seq_length=128, ffn_hidden_size=96)
    model = GPTModel(cfg, seed=3).cuda().eval()
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 40, 17, 9)]
    news = [30, 12, 50, 25]
    engine = Engine(model, max_batch=4, block_size=16, decode_steps=8)
    assert engine.runner.paged_kernel and engine.runner.use_graphs
    got = engine.generate(ps, [SamplingParams(max_new_tokens=n) for n in news])
    want = [generate(model, torch.tensor(p).cuda(), n, use_cache=False)[len(p):].tolist() for p, n in zip(ps, news)]
    assert got == want
    assert any(d.graph is not None for d in engine.runner._decoders.values())
    from megacore.inference.cache import CacheBatch

    assert not CacheBatch.kernel_failed
