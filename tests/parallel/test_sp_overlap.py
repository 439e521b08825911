"""``parallel.tp_comm_overlap=copy_engine`` (megacore.parallel.sp_overlap) on CPU/gloo, where the ops
run their reference collectives: the custom ops and their autograd formulas compute what the
unfused sequence-parallel layers compute.

- Each op against ``gather_from_sp`` / ``reduce_scatter_to_sp`` around ``F.linear``: output, input
  gradient and weight gradient in fp32 within 1e-6, eager and compiled (the ops stay opaque in the
  graph).
- A TP2+SP GPT with every SP linear switched to the ops against the one-device model: logits,
  loss and every gathered gradient within 1e-5 (the tolerance of the other TP tests).

The copy-engine path itself needs CUDA with symmetric memory: tests/gpu/test_sp_overlap_gpu.py.
"""

import pytest
import torch
import torch.nn.functional as F

import megacore.parallel as P
from megacore.compose import build_parallel_gpt
from megacore.config import TransformerConfig
from megacore.models import GPTModel
from megacore.parallel import collectives as C
from megacore.parallel import sp_overlap
from tests.dist.equivalence import errors_against_reference
from tests.dist.harness import run_distributed

TOL = 1e-5


def _op_errors(rank, world, compiled):
    group = torch.distributed.group.WORLD
    g = torch.Generator().manual_seed(0)
    b, s, k, n = 2, 8, 8, 10
    x_full = torch.randn(b, s, k, generator=g)
    w_col = torch.randn(n, k, generator=g)  # this test's "local" column shard, same on every rank
    w_row = torch.randn(k, n, generator=g) + rank  # a different row-parallel shard per rank
    z = torch.randn(b, s, n, generator=g) * (rank + 1)  # row-parallel input differs per rank
    up = torch.randn(b, s, n, generator=g)  # upstream gradients
    up_rs = torch.randn(b, s // world, k, generator=g) + rank
    x_shard = C.chunk(x_full.reshape(b * s, k), 0, group).view(b, s // world, k)
    ag, rs = sp_overlap.all_gather_linear, sp_overlap.linear_reduce_scatter
    if compiled:
        ag, rs = torch.compile(ag, backend="aot_eager", fullgraph=True), torch.compile(rs, backend="aot_eager",
                                                                                         fullgraph=True)
    errors = {}

    def compare(tag, fused, plain, inputs, upstream):
        outs = []
        for fn in (fused, plain):
            leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
            y = fn(*leaves)
            (y * upstream).sum().backward()
            outs.append([y.detach(), *[t.grad for t in leaves]])
        for what, a, c in zip(("out", "d_input", "d_weight"), *outs):
            errors[f"{tag} {what}"] = (a - c).abs().max().item() / max(1.0, c.abs().max().item())
            errors[f"{tag} {what} shape"] = tuple(a.shape) == tuple(c.shape)

    compare("ag_linear", lambda x, w: ag(x, w, group), lambda x, w: F.linear(C.gather_from_sp(x, group), w),
            [x_shard, w_col], up)
    compare("linear_rs", lambda z, w: rs(z, w, group), lambda z, w: C.reduce_scatter_to_sp(F.linear(z, w), group),
            [z, w_row], up_rs)
    return errors


def _check(results):
    for errors in results:
        shapes = {k: v for k, v in errors.items() if k.endswith("shape")}
        assert all(shapes.values()), shapes
        bad = {k: v for k, v in errors.items() if not k.endswith("shape") and not v <= 1e-6}
        assert not bad, bad


@pytest.mark.parametrize("world", [2, 4])
def test_ops_equal_unfused_collectives_and_linear(world):
    _check(run_distributed(_op_errors, world_size=world, args=(False,)))


def test_ops_equal_unfused_under_compile():
    _check(run_distributed(_op_errors, world_size=2, args=(True,)))


BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=50,
            seq_length=8, vocab_padding_multiple=4, ffn_hidden_size=24)


def _model_errors(rank, world):
    P.initialize(tensor=world)
    P.model_parallel_seed(1)
    cfg = TransformerConfig(**BASE)
    ref = GPTModel(cfg, seed=3)
    model = build_parallel_gpt(cfg, 3, sequence_parallel=True)
    switched, copy_engine = sp_overlap.apply(model, P.get_state().tp_group)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (4, 8), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (4, 8), generator=g)
    errors = errors_against_reference(model, ref, (ids,), labels,
                                      lambda m: P.gather_full_state_dict(m, grads=True), TOL)
    P.destroy()
    return switched, copy_engine, errors


def test_tp2_sp_model_with_overlapped_linears_matches_single_device():
    results = run_distributed(_model_errors, world_size=2)
    # 2 layers x (qkv, proj, fc1, fc2) + the output layer; gloo has no symmetric memory, so the
    # reference path runs.
    assert results == [(9, False, {})] * 2, results
