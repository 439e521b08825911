"""Tensor parallelism under torch.compile, as the trainer runs it: each layer (collectives included)
and the vocab-parallel loss compile as whole graphs, and the compiled TP model, DDP-wrapped with its
TP gradient sums in finalize mode, gives the one-device model's loss and gradients (fp32, 1e-5).

The backend is ``aot_eager``: it traces forward and backward exactly as inductor does (so it finds
the same graph breaks), without generating C++ code, which keeps the test fast on CI.
"""

import pytest
import torch

import megacore.parallel as P
from megacore.compose import build_parallel_gpt
from megacore.config import TransformerConfig
from megacore.distributed import DistributedDataParallel
from megacore.models import GPTModel
from megacore.training.compile import compile_model
from tests.dist.harness import run_distributed

TOL = 1e-5
BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=50,
            seq_length=8, vocab_padding_multiple=4, ffn_hidden_size=24)


def _compiled_tp_cases(rank, world, flat):
    from torch._dynamo.utils import counters
    from megacore.parallel import collectives

    collectives.FORCE_FLAT_COLLECTIVES = flat  # True: the functional (NCCL-style) collectives

    P.initialize(tensor=world)
    P.model_parallel_seed(1)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, BASE["vocab_size"], (2, 8), generator=g)
    labels = torch.randint(0, BASE["vocab_size"], (2, 8), generator=g)
    labels[1, :2] = -100
    out = {}
    for sp in (False, True):
        torch._dynamo.reset()
        counters.clear()
        cfg = TransformerConfig(**BASE)
        ref = GPTModel(cfg, seed=3)
        model = compile_model(build_parallel_gpt(cfg, 3, sequence_parallel=sp, grad_sync="finalize"),
                              backend="aot_eager")
        ddp = DistributedDataParallel(model, dp_group=P.get_state().dp_group, bucket_size_mb=None)
        errors = {}
        for step in range(2):  # the second step runs the cached graphs
            ddp.zero_grad_buffer()
            for p in ref.parameters():
                p.grad = None
            loss = ddp(ids, labels=labels)
            ref_loss = ref(ids, labels=labels)
            loss.backward()
            ref_loss.backward()
            ddp.finish_grad_sync()  # runs the TP sums of the SP norm weights
            ddp.finish_grad_sync()  # a second call must not sum again
            errors[f"loss{step}"] = (loss - ref_loss).abs().item()
        grads = P.gather_full_state_dict(model, grads=True)
        for name, p in ref.named_parameters():
            errors[name] = (grads[name] - p.grad).abs().max().item()
        out[sp] = {"errors": errors, "graph_breaks": sum(counters["graph_break"].values()),
                   "graphs": counters["stats"]["unique_graphs"]}
    P.destroy()
    return out


@pytest.mark.parametrize("flat", [False, True], ids=["gloo-list", "functional"])
def test_compiled_tp_is_whole_graphs_and_matches_single_device(flat):
    results = run_distributed(_compiled_tp_cases, world_size=2, args=(flat,))
    for rank, res in enumerate(results):
        for sp, r in res.items():
            assert r["graph_breaks"] == 0, (rank, sp, r)
            assert r["graphs"] <= 3, (rank, sp, r)  # one layer graph (shared), the loss head, maybe the final norm
            bad = {k: v for k, v in r["errors"].items() if not v <= TOL}
            assert not bad, (rank, sp, bad)
