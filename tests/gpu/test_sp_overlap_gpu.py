"""The copy-engine path of megacore.parallel.sp_overlap on two GPUs (NCCL + symmetric memory): each
op's output and gradients against the same op's reference path (NCCL collectives, then the matmul),
eagerly and replayed from a CUDA graph, at shapes of the 1B config's TP2 layers.

Tolerances: the copy-engine path multiplies per token chunk and, for the row-parallel weight
gradient, accumulates the chunks' products in the parameter dtype, so it rounds differently from
one big matmul: fp32 within 1e-5 relative to the largest value, bf16 within 2e-2.
"""

import pytest
import torch

from tests.dist.harness import run_distributed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two GPUs")]


def _cases(rank, world, dtype_name, tokens, hidden, local):
    import torch.distributed as dist

    from megacore.parallel import sp_overlap

    dtype = getattr(torch, dtype_name)
    group = dist.group.WORLD
    assert sp_overlap.enable(group), "symmetric memory is not available"
    g = torch.Generator(device="cuda").manual_seed(rank)
    randn = lambda *shape: torch.randn(*shape, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    b = 2
    x = randn(b, tokens // (b * world), hidden)         # SP shard entering a column-parallel linear
    w_col, w_row = randn(local, hidden) / hidden**0.5, randn(hidden, local) / local**0.5
    z = randn(b, tokens // b, local)                     # row-parallel input
    up_col, up_row = randn(b, tokens // b, local), randn(b, tokens // (b * world), hidden)

    def step(fused_inputs):
        """Both ops, forward and backward; returns outputs and all gradients."""
        xs, wc, zs, wr = fused_inputs
        y1 = sp_overlap.all_gather_linear(xs, wc, group)
        y2 = sp_overlap.linear_reduce_scatter(zs, wr, group)
        ((y1.float() * up_col.float()).sum() + (y2.float() * up_row.float()).sum()).backward()
        return [y1.detach(), y2.detach(), xs.grad, wc.grad, zs.grad, wr.grad]

    def leaves():
        return [t.detach().clone().requires_grad_(True) for t in (x, w_col, z, w_row)]

    sp_overlap._COPY_ENGINE_GROUPS.discard(group.group_name)
    reference = step(leaves())
    sp_overlap._COPY_ENGINE_GROUPS.add(group.group_name)
    eager = step(leaves())
    # The same ops captured in a CUDA graph (as compile_mode=reduce-overhead runs them), replayed.
    static = leaves()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(leaves())  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(static)
    for t in static:
        t.grad.zero_()
    graph.replay()
    graph.replay()  # a second replay: the barriers and buffers must be reusable
    torch.cuda.synchronize()
    names = ["ag_linear out", "linear_rs out", "d x", "d w_col", "d z", "d w_row"]
    errors = {}
    for tag, got in (("eager", eager), ("graph", captured)):
        for name, a, ref in zip(names, got, reference):
            errors[f"{tag} {name}"] = ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    return errors


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_copy_engine_ops_match_reference_collectives(dtype, tol):
    # 1B config at TP2: 8192 tokens a micro-batch, hidden 2048, a local QKV width of 3072.
    results = run_distributed(_cases, world_size=2, args=(dtype, 8192, 2048, 3072), backend="nccl", timeout_s=120)
    for errors in results:
        bad = {k: v for k, v in errors.items() if not v <= tol}
        assert not bad, errors
