"""parallel.tp_batch_chunks: a layer run on independent groups of whole sequences computes the same
function. Checked on one device and at TP2 with sequence parallelism (eager, and compiled with the
functional collectives), against the unsplit one-device model: logits, loss and every gradient in
fp32 within 1e-5, with per-sample position ids and a packed-document mask (the per-sample
attention inputs each group must pick in its gathered order)."""

import pytest
import torch

import megacore.parallel as P
from megacore.compose import build_parallel_gpt
from megacore.config import TransformerConfig
from megacore.models import GPTModel
from megacore.parallel.batch_chunks import apply_batch_chunks, chunk_items
from tests.dist.harness import run_distributed

TOL = 1e-5
BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=50,
            seq_length=8, vocab_padding_multiple=4, ffn_hidden_size=24)


def test_chunk_items_are_whole_sequences_in_gathered_order():
    # 8 sequences over 2 SP ranks (rank 0: 0-3, rank 1: 4-7), 2 groups: each group takes the first or
    # second half of every rank's sequences.
    assert chunk_items(8, 2, 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert chunk_items(4, 2, 1) == [[0, 1], [2, 3]]
    assert chunk_items(4, 4, 1) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="multiple of 4"):
        chunk_items(6, 2, 2)


CUTS = (3, 5, 8, 2, 6, 1, 4, 7)


def _batch(batch=8):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, BASE["vocab_size"], (batch, 8), generator=g)
    labels = torch.randint(0, BASE["vocab_size"], (batch, 8), generator=g)
    labels[1, :3] = -100
    # Packed documents: every sample restarts its positions at a different place.
    positions = torch.stack([torch.cat([torch.arange(c), torch.arange(8 - c)]) for c in CUTS[:batch]])
    doc = torch.stack([torch.cat([torch.zeros(c), torch.ones(8 - c)]) for c in CUTS[:batch]])
    mask = (doc[:, None, :, None] == doc[:, None, None, :])  # [B, 1, S, S]: same document only
    return ids, labels, positions, mask


def _errors(model, ref, ids, labels, positions, mask, grads_of):
    errors = {}
    for tag, kw in (("plain", {}), ("packed", dict(position_ids=positions, attention_mask=mask))):
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
        errors[f"{tag} logits"] = (model(ids, **kw) - ref(ids, **kw)).abs().max().item()
        loss, ref_loss = model(ids, labels=labels, **kw), ref(ids, labels=labels, **kw)
        errors[f"{tag} loss"] = (loss - ref_loss).abs().item()
        loss.backward()
        ref_loss.backward()
        grads = grads_of(model)
        for name, p in ref.named_parameters():
            errors[f"{tag} grad {name}"] = (grads[name] - p.grad).abs().max().item()
    return errors


def test_one_device_batch_chunks_match_unsplit_model():
    cfg = TransformerConfig(**BASE)
    ref, model = GPTModel(cfg, seed=3), GPTModel(cfg, seed=3)
    apply_batch_chunks(model, 2)
    errors = _errors(model, ref, *_batch(), lambda m: {n: p.grad for n, p in m.named_parameters()})
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, bad


def _tp_cases(rank, world):
    from megacore.parallel import collectives
    from megacore.training.compile import compile_model

    P.initialize(tensor=world)
    P.model_parallel_seed(1)
    cfg = TransformerConfig(**BASE)
    ref = GPTModel(cfg, seed=3)
    out = {}
    for compiled in (False, True):
        collectives.FORCE_FLAT_COLLECTIVES = compiled  # the functional collectives inductor sees
        torch._dynamo.reset()
        model = build_parallel_gpt(cfg, 3, sequence_parallel=True)
        apply_batch_chunks(model, 2)
        if compiled:
            model = compile_model(model, backend="aot_eager")
        errors = _errors(model, ref, *_batch(), lambda m: P.gather_full_state_dict(m, grads=True))
        out[compiled] = {k: v for k, v in errors.items() if not v <= TOL}
    collectives.FORCE_FLAT_COLLECTIVES = False
    P.destroy()
    return out


def test_tp2_sp_batch_chunks_match_single_device():
    results = run_distributed(_tp_cases, world_size=2)
    assert results == [{False: {}, True: {}}] * 2, results
