"""The fused vocab-parallel loss head under TP (Triton ``fused_linear_cross_entropy`` with ``tp_group``,
run here by Triton's interpreter): loss and every gradient equal the one-device model on the torch
path (fp32, 1e-5), with and without sequence parallelism, tied or not, with a loss mask and a
vocabulary that needs padding; and the fused kernel is really what ran."""

import importlib

import torch

import megacore.parallel as P
from megacore.compose import build_parallel_gpt
from megacore.config import TransformerConfig
from megacore.kernels import kernel_backend
from megacore.models import GPTModel
from tests.dist.harness import run_distributed

# The module, not the function that megacore.kernels re-exports under the same name.
flce = importlib.import_module("megacore.parallel.vocab_parallel")  # where the loss head looks the kernel up

BASE = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=50,
            vocab_padding_multiple=4, seq_length=8, ffn_hidden_size=24)


def _case(rank, world):
    P.initialize(tensor=world)
    P.model_parallel_seed(1)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, BASE["vocab_size"], (2, 8), generator=g)
    labels = torch.randint(0, BASE["vocab_size"], (2, 8), generator=g)
    labels[0, :2] = -100
    mask = (torch.rand(2, 8, generator=g) > 0.2).float()
    calls = []
    real = flce.fused_linear_cross_entropy

    def spy(*args, **kwargs):
        calls.append(kwargs.get("tp_group") is not None)
        return real(*args, **kwargs)

    flce.fused_linear_cross_entropy = spy
    errors = {}
    try:
        for sp in (False, True):
            for tied in (False, True):
                cfg = TransformerConfig(**BASE, tie_embeddings=tied)
                ref = GPTModel(cfg, seed=4)
                with kernel_backend("torch"):
                    ref_loss = ref(ids, labels=labels, loss_mask=mask)
                    ref_loss.backward()
                model = build_parallel_gpt(cfg, 4, sequence_parallel=sp)
                with kernel_backend("triton"):
                    loss = model(ids, labels=labels, loss_mask=mask)
                    loss.backward()
                tag = f"sp={sp} tied={tied}"
                errors[f"{tag} loss"] = (loss - ref_loss).abs().item()
                grads = P.gather_full_state_dict(model, grads=True)
                for name, p in ref.named_parameters():
                    errors[f"{tag} {name}"] = (grads[name] - p.grad).abs().max().item()
    finally:
        flce.fused_linear_cross_entropy = real
        P.destroy()
    return {"errors": errors, "calls": calls}


def test_fused_vocab_parallel_loss_head_matches_single_device():
    for r in run_distributed(_case, world_size=2):
        assert r["calls"] == [True] * 4, r["calls"]  # one fused vocab-parallel call per case
        bad = {k: v for k, v in r["errors"].items() if not v <= 1e-5}
        assert not bad, bad
