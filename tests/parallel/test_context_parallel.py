"""Context parallelism: each CP rank runs its two sequence chunks (load-balanced split) with keys and
values all-gathered over CP. Its logits equal the one-device model's at its positions; the CP ranks'
loss shares sum to the one-device loss; their gradients, summed over CP (what DDP over dp_cp does),
equal the one-device gradients (fp32, 1e-5). CP=2 alone and CP=2 x TP=2 with sequence parallelism;
GQA with rope, learned positions, and a sliding window."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

import megacore.parallel as P
from megacore.compose import build_parallel_gpt
from megacore.config import TransformerConfig
from megacore.models import GPTModel
from megacore.parallel.context_parallel import apply_context_parallel, cp_token_index, split_sample_for_cp
from tests.dist.harness import run_distributed

TOL = 1e-5
BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=50,
            vocab_padding_multiple=4, seq_length=16, ffn_hidden_size=24)
VARIANTS = [
    ("rope_gqa", dict()),
    ("learned_layernorm", dict(position_embedding="learned", normalization="LayerNorm", add_bias_linear=True)),
    ("sliding_window", dict(sliding_window=5)),
]


def _case(rank, world, tensor):
    state = P.initialize(tensor=tensor, context=world // tensor)
    P.model_parallel_seed(1)
    c, r = state.cp_size, state.cp_rank
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, BASE["vocab_size"], (2, 16), generator=g)
    labels = torch.randint(0, BASE["vocab_size"], (2, 16), generator=g)
    loss_mask = (torch.rand(2, 16, generator=g) > 0.25).float()
    count = float(loss_mask.sum())
    index = torch.from_numpy(cp_token_index(16, c, r))
    errors = {}
    for name, extra in VARIANTS:
        cfg = TransformerConfig(**BASE, **extra)
        ref = GPTModel(cfg, seed=5)
        ref_loss = ref(ids, labels=labels, loss_mask=loss_mask, reduction="sum") / count
        ref_loss.backward()
        if tensor > 1:
            model = build_parallel_gpt(cfg, 5, sequence_parallel=True)
        else:
            model = GPTModel(cfg, seed=5)
        apply_context_parallel(model, state.cp_group)
        local = [split_sample_for_cp({"tokens": ids[b].numpy(), "labels": labels[b].numpy(),
                                      "loss_mask": loss_mask[b].numpy()}, c, r) for b in range(2)]
        batch = {k: torch.from_numpy(np.stack([s[k] for s in local])) for k in local[0]}
        logits = model(batch["tokens"], position_ids=batch["position_ids"])
        errors[f"{name} logits"] = (logits - ref(ids)[:, index]).abs().max().item()
        share = model(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"],
                      position_ids=batch["position_ids"], reduction="sum") / count
        share.backward()
        total = share.detach().clone()
        dist.all_reduce(total, group=state.cp_group)
        errors[f"{name} loss"] = (total - ref_loss.detach()).abs().item()
        for p in model.parameters():
            dist.all_reduce(p.grad, group=state.cp_group)
        if tensor > 1:
            P.finalize_grads_tp(model)
        grads = P.gather_full_state_dict(model, grads=True)
        for pname, p in ref.named_parameters():
            errors[f"{name} {pname}"] = (grads[pname] - p.grad).abs().max().item()
    P.destroy()
    return errors


@pytest.mark.parametrize("world,tensor", [(2, 1), (4, 2)], ids=["cp2", "cp2_tp2_sp"])
def test_context_parallel_matches_single_device(world, tensor):
    for errors in run_distributed(_case, world_size=world, args=(tensor,)):
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, bad


def test_token_index_pairs_early_and_late_chunks():
    assert cp_token_index(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_token_index(8, 2, 1).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="2\\*context=4"):
        cp_token_index(6, 2, 0)
