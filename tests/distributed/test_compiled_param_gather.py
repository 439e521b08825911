"""The distributed optimizer's overlapped parameter all-gather with compiled layers (``compile=true``):
each compiled TransformerLayer waits for its parameters in one pre-hook outside its graph, so the layer
still compiles as one graph, and training gives the same parameters as the uncompiled run (DP=2, fp32,
gloo; the ``aot_eager`` backend traces like inductor without generating code)."""

import torch

import megacore.parallel as P
from megacore.config import TransformerConfig
from megacore.distributed import DistributedDataParallel
from megacore.optim import DistributedOptimizer
from megacore.models import GPTModel
from megacore.training.compile import compile_model
from tests.dist.harness import run_distributed

CFG = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=8, ffn_hidden_size=48)


def _train(compiled: bool, rank: int) -> tuple[dict, int, int]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = GPTModel(TransformerConfig(**CFG), seed=7)
    if compiled:
        compile_model(model, backend="aot_eager")
    ddp = DistributedDataParallel(model, P.get_state().dp_group, bucket_size_mb=0.01, use_distributed_optimizer=True,
                                  overlap_param_gather=True)
    opt = DistributedOptimizer(ddp, lr=1e-2, clip_grad=1.0)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        ids = torch.randint(0, CFG["vocab_size"], (2, 8), generator=g)
        opt.zero_grad()
        ddp(ids, labels=ids.roll(-1, dims=1)).backward()
        opt.step()
    ddp.finish_param_sync()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return params, sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def _case(rank, world):
    P.initialize()
    eager, _, _ = _train(False, rank)
    compiled, breaks, graphs = _train(True, rank)
    P.destroy()
    err = max((compiled[n] - eager[n]).abs().max().item() for n in eager)
    return {"err": err, "breaks": breaks, "graphs": graphs}


def test_compiled_layers_with_overlapped_param_gather_match_eager():
    for r in run_distributed(_case, world_size=2):
        assert r["err"] <= 1e-5, r
        # One break per compiled frame: the disabled wait hook at the top of the layer (the layer's
        # body is one graph after it); a hook per linear would add breaks inside the layer.
        assert r["breaks"] <= 2, r
        assert r["graphs"] <= 3, r
