"""Context-parallel attention modes (``parallel.context_mode``: allgather, ring, a2a, a2a+ring), each
against the one-device model of the same seed on the same global batch (gloo, fp32).

Every layout is built by the composition root (``compose.build_model_chunks``: CP applied with the
mode), runs one forward/backward of its share of the batch (its load-balanced sequence chunks with
their global positions and, for packed documents, the document starts of its tokens), and is
checked against one device: its logits at its positions, the loss (the ranks' shares summed), and
every gradient it holds (summed over CP, as DDP over dp_cp does) against its slice of the one-device
gradient; 1e-5 absolute.

Variants: packed documents whose boundaries fall inside the CP chunks (odd boundaries, different per
sequence; GQA, rope), the same with a sliding window (blocks outside the window skipped by the
ring), multi-latent attention (different q/k and v head dims), the ring's plain-torch block path
(``attention_backend=reference``), a hybrid stack whose Mamba layers pass their state between
the chunks, and ``reset_*``: the same with ``data.reset_position_ids`` (rotary positions restart in
each document, the mask keeps the global order). Layouts: CP2 and CP4 in every mode (a2a+ring at CP2
with all-to-all groups of 1 and at CP4 with groups of 2; a2a at CP4 repeats the 2 KV heads over 4
ranks), CP2 x TP2 with sequence parallelism and CP2 x PP2.

Unit tests (one process): the log-sum-exp merge and the per-block forward/backward against an fp64
softmax over all keys, both block paths (kernel and reference), the a2a reordering, the a2a+ring
groups, document starts, and the support table's refusals. Through ``megacore train``: each mode's
loss and grad-norm curve equals the all-gather run's, and a ring checkpoint resumes on one process.
On a GPU (``gpu`` marker): the CUDA block kernels in a simulated ring against the fp32 reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megacore.config import ParallelConfig, RunConfig, TrainConfig, TransformerConfig
from tests.dist.harness import run_distributed

TOL = 1e-5
S = 16
BATCH = 2
BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64,
            vocab_padding_multiple=4, seq_length=S, ffn_hidden_size=32)
VARIANTS = {
    "docs": dict(),
    "window_docs": dict(sliding_window=5),
    "window": dict(sliding_window=3),
    "mla": dict(num_query_groups=None, multi_latent_attention=True, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=6),
    "reference_backend": dict(attention_backend="reference", sliding_window=6),
    "hybrid": dict(num_layers=3, layer_pattern="M*-", mamba_head_dim=8, mamba_state_dim=8, mamba_num_groups=2,
                   mamba_chunk_size=4, activation="squared_relu"),
}
# data.reset_position_ids: rotary positions restart in every document while the mask keeps the global
# order: with document masks, with only a sliding window (over global positions), and in a hybrid stack
# (Mamba layers refuse document masks, not restarted positions).
VARIANTS.update(reset_docs=VARIANTS["docs"], reset_window_docs=VARIANTS["window_docs"],
                reset_window=VARIANTS["window"], reset_hybrid=VARIANTS["hybrid"])
# Document ends (eod positions) per sequence: most boundaries fall inside the chunks of CP2 (4 tokens)
# and CP4 (2 tokens).
EODS = [(4, 9), (2, 7, 8, 12)]


def _uses_docs(variant: str) -> bool:
    return variant in ("docs", "window_docs", "reference_backend", "reset_docs", "reset_window_docs")


def _resets_positions(variant: str) -> bool:
    return variant.startswith("reset_")


def _data():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 64, (BATCH, S), generator=g)
    labels = torch.randint(0, 64, (BATCH, S), generator=g)
    loss_mask = (torch.rand(BATCH, S, generator=g) > 0.2).float()
    doc = torch.zeros(BATCH, S, dtype=torch.long)
    for b, ends in enumerate(EODS):
        for e in ends:
            doc[b, e + 1:] += 1  # an eod belongs to the document it ends
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    same_doc = doc[:, :, None] == doc[:, None, :]
    mask = (causal & same_doc)[:, None]  # [B, 1, S, S], as make_sample builds
    doc_positions = torch.arange(S) - same_doc.int().argmax(-1)  # offset within the document (reset_position_ids)
    return ids, labels, loss_mask, mask, doc_positions


def _reference(variant: str):
    from megacore.models import GPTModel

    ref = GPTModel(TransformerConfig(**{**BASE, **VARIANTS[variant]}), seed=7).train()
    ids, labels, loss_mask, mask, doc_positions = _data()
    kwargs = {"attention_mask": mask} if _uses_docs(variant) else {}
    if _resets_positions(variant):
        kwargs["position_ids"] = doc_positions
    logits = ref(ids, **kwargs).detach()
    loss = ref(ids, labels=labels, loss_mask=loss_mask, reduction="sum", **kwargs) / loss_mask.sum()
    loss.backward()
    return logits, loss.item(), {n: p.grad for n, p in ref.named_parameters()}


def _local_batch(state, variant: str):
    from megacore.parallel.context_parallel import split_sample_for_cp

    ids, labels, loss_mask, mask, doc_positions = _data()
    samples = []
    for b in range(BATCH):
        sample = {"tokens": ids[b].numpy(), "labels": labels[b].numpy(), "loss_mask": loss_mask[b].numpy()}
        if _uses_docs(variant):
            sample["attention_mask"] = mask[b].numpy()
        if _resets_positions(variant):
            sample["position_ids"] = doc_positions[b].numpy()
        samples.append(split_sample_for_cp(sample, state.cp_size, state.cp_rank))
    batch = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}
    kwargs = {"position_ids": batch["position_ids"]}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    return batch, kwargs, loss_mask.sum()


def _pipeline_share(stage, state, batch, kwargs, count):
    """Two stages, one micro-batch: stage 0 sends its hidden states and receives their gradient."""
    peer = dist.get_global_rank(state.pp_group, 1 - state.pp_rank)
    if state.pp_rank == 0:
        hidden = stage(batch["tokens"], **kwargs)
        dist.send(hidden.detach().contiguous(), peer)
        grad = torch.empty_like(hidden)
        dist.recv(grad, peer)
        hidden.backward(grad)
        return torch.zeros(())
    hidden = torch.empty(*batch["tokens"].shape, BASE["hidden_size"])
    dist.recv(hidden, peer)
    hidden.requires_grad_(True)
    share = stage(batch["tokens"], hidden_states=hidden, labels=batch["labels"], loss_mask=batch["loss_mask"],
                  reduction="sum", **kwargs) / count
    share.backward()
    dist.send(hidden.grad.contiguous(), peer)
    return share


def _variant(state, parallel: dict, variant: str, refs: dict) -> dict:
    from megacore.compose import build_model_chunks
    from megacore.parallel.context_parallel import cp_token_index
    from megacore.sharding import peek_meta

    cfg = RunConfig(model=TransformerConfig(**{**BASE, **VARIANTS[variant]}), parallel=ParallelConfig(**parallel),
                    train=TrainConfig(seed=7, global_batch_size=BATCH, micro_batch_size=BATCH))
    cfg.validate(world_size=state.world_size)
    (model,) = build_model_chunks(cfg, state, device="cpu", dtype=torch.float32)
    if variant not in refs:
        refs[variant] = _reference(variant)
    want_logits, want_loss, want_grads = refs[variant]
    batch, kwargs, count = _local_batch(state, variant)
    errors = {}
    if state.pp_size > 1:
        share = _pipeline_share(model, state, batch, kwargs, count)
    else:
        with torch.no_grad():
            logits = model(batch["tokens"], **kwargs)
        want = want_logits[:, torch.from_numpy(cp_token_index(S, state.cp_size, state.cp_rank))]
        if logits.shape[-1] != want.shape[-1]:  # vocab-parallel logits: this rank's columns
            want = want.chunk(state.tp_size, dim=-1)[state.tp_rank]
        errors["logits"] = (logits - want).abs().max().item()
        share = model(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"], reduction="sum",
                      **kwargs) / count
        share.backward()
    counted = share.detach().double() if state.tp_rank == 0 else torch.zeros((), dtype=torch.float64)
    dist.all_reduce(counted)
    errors["loss"] = abs(counted.item() - want_loss)
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, group=state.dp_cp_group)
        meta = peek_meta(p)
        errors[f"grad {name}"] = (p.grad - meta.shard(want_grads[meta.global_name or name])).abs().max().item()
    return {k: v for k, v in errors.items() if not v <= TOL}


def _cases(rank, world, cases):
    import megacore.parallel as P

    refs: dict = {}
    out = {}
    for name, parallel, variants in cases:  # one set of process groups per layout
        state = P.initialize(**ParallelConfig(**parallel).mesh_sizes())
        P.model_parallel_seed(1)
        try:
            for variant in variants:
                out[f"{name} {variant}"] = _variant(state, parallel, variant, refs)
        finally:
            P.destroy()
    return out


def _check(results, cases, world):
    assert len(results) == world
    for res in results:
        for name, _, variants in cases:
            for variant in variants:
                assert res[f"{name} {variant}"] == {}, (name, variant, res[f"{name} {variant}"])


TWO = [
    ("cp2_allgather", dict(context=2), ("docs", "window", "mla", "reset_docs", "reset_window")),
    ("cp2_ring", dict(context=2, context_mode="ring"), ("docs", "window_docs", "mla", "reference_backend", "hybrid",
                                                        "reset_docs", "reset_window", "reset_hybrid")),
    ("cp2_a2a", dict(context=2, context_mode="a2a"), ("docs", "window_docs", "mla", "reset_window_docs")),
    ("cp2_a2a1_ring", dict(context=2, context_mode="a2a+ring", context_a2a_size=1), ("reset_window_docs",)),
]
FOUR = [
    ("cp4_allgather", dict(context=4), ("window_docs",)),
    ("cp4_ring", dict(context=4, context_mode="ring"), ("window_docs", "window", "mla", "reset_docs")),
    ("cp4_a2a", dict(context=4, context_mode="a2a"), ("window_docs",)),
    ("cp4_a2a2_ring", dict(context=4, context_mode="a2a+ring", context_a2a_size=2),
     ("window_docs", "docs", "reset_window_docs")),
    ("cp2_tp2_sp_ring", dict(context=2, tensor=2, sequence_parallel=True, context_mode="ring"), ("window_docs",)),
    ("cp2_tp2_sp_a2a", dict(context=2, tensor=2, sequence_parallel=True, context_mode="a2a"), ("docs",)),
    ("cp2_pp2_ring", dict(context=2, pipeline=2, context_mode="ring"), ("window_docs",)),
]


def test_cp2_modes_match_one_device():
    _check(run_distributed(_cases, world_size=2, args=(TWO,), timeout_s=400), TWO, 2)


def test_cp4_and_composed_modes_match_one_device():
    _check(run_distributed(_cases, world_size=4, args=(FOUR,), timeout_s=400), FOUR, 4)


# ------------------------------------------------------------------------------- one process
def _fp64_attention(q, k, v, mask, scale):
    """softmax over all keys in fp64 (GQA by repeating key/value heads); q [B, H, S, D]."""
    g = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.double().repeat_interleave(g, 1)


@pytest.mark.parametrize("fast", [True, False], ids=["kernel", "reference"])
@pytest.mark.parametrize("dv", [8, 6], ids=["same_dims", "mla_dims"])
def test_lse_merge_and_block_backward_match_fp64(fast, dv, monkeypatch):
    """Key blocks attended one by one (kernel or plain-torch block path, the latter in row chunks),
    merged by log-sum-exp in a shuffled order, equal the fp64 softmax over all keys; each block's
    backward from the merged output and log-sum-exp gives exactly its share of the fp64 gradients.
    Documents and a window leave some rows with no visible key in some blocks."""
    from megacore.parallel import cp_block
    from megacore.parallel.cp_block import block_backward, block_forward, block_mask, merge

    monkeypatch.setattr(cp_block, "SCORE_ELEMENTS", 100)  # the reference path: rows of 3 or 4 at a time

    g = torch.Generator().manual_seed(3)
    b, h, hkv, s, d = 2, 4, 2, 12, 8
    q, k = torch.randn(b, h, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, dv, generator=g)
    pos = torch.arange(s)
    lo = torch.maximum(torch.tensor([[0] * 5 + [5] * 7, [0] * 3 + [3] * 9]), pos - 4)  # documents + window 5
    mask = block_mask(pos, pos, lo)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = _fp64_attention(q64, k64, v64, mask, 0.3)
    dout = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want.backward(dout)
    blocks = [slice(9, 12), slice(0, 4), slice(4, 9)]
    out = lse = None
    for blk in blocks:
        o, l_ = block_forward(q, k[:, :, blk], v[:, :, blk], 0.3, False, mask[..., blk], fast)
        out, lse = (o.float(), l_) if out is None else merge(out, lse, o, l_)
    assert (out.double() - want.detach()).abs().max() < 1e-5
    dq = torch.zeros(q.shape, dtype=torch.float64)
    dk, dvv = torch.zeros(k.shape, dtype=torch.float64), torch.zeros(v.shape, dtype=torch.float64)
    for blk in blocks:
        gq, gk, gv = block_backward(dout.float(), q, k[:, :, blk], v[:, :, blk], out, lse, 0.3, False, mask[..., blk],
                                    fast)
        dq += gq.double()
        dk[:, :, blk], dvv[:, :, blk] = gk.double(), gv.double()
    for got, ref in ((dq, q64.grad), (dk, k64.grad), (dvv, v64.grad)):
        assert (got - ref).abs().max() < 1e-5


def test_merge_is_exact_in_fp64_and_keeps_empty_rows_empty():
    from megacore.parallel.cp_block import merge

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 10, generator=g, dtype=torch.float64) * 4
    values = torch.randn(10, 5, generator=g, dtype=torch.float64)
    want = torch.softmax(scores, -1) @ values
    parts = [(torch.softmax(scores[:, i:j], -1) @ values[i:j], torch.logsumexp(scores[:, i:j], -1))
             for i, j in ((0, 3), (3, 4), (4, 10))]
    out, lse = parts[0]
    for o, l_ in parts[1:]:
        out, lse = merge(out, lse, o, l_)
    assert (out - want).abs().max() < 1e-14 and (lse - torch.logsumexp(scores, -1)).abs().max() < 1e-14
    empty = torch.full((3,), float("-inf"), dtype=torch.float64)
    out, lse = merge(torch.zeros(3, 5, dtype=torch.float64), empty, torch.zeros(3, 5, dtype=torch.float64), empty)
    assert torch.isfinite(out).all() and (out == 0).all() and torch.isinf(lse).all()


def test_a2a_reorder_puts_a_group_in_position_order():
    """The all-to-all gathers a group's tokens rank by rank; ``to_sorted`` puts them in position order,
    which under a2a+ring is the ring's load-balanced layout of super-chunks (g, 2c'-1-g)."""
    from megacore.parallel.context_parallel import cp_token_index
    from megacore.parallel.cp_a2a import from_sorted, to_sorted

    c, a = 4, 2
    for g in range(c // a):
        gathered = np.concatenate([cp_token_index(32, c, g * a + j) for j in range(a)])
        x = torch.from_numpy(gathered)[None, :, None]
        assert to_sorted(x, a).flatten().tolist() == cp_token_index(32, c // a, g).tolist()
        assert torch.equal(from_sorted(to_sorted(x, a), a), x)


def test_context_subgroups_cut_each_cp_group():
    from megacore.config import ConfigError
    from megacore.parallel.topology import context_subgroup_ranks, rank_groups

    cp = rank_groups(8, tensor=2, context=4)["cp"]
    assert cp == [[0, 2, 4, 6], [1, 3, 5, 7]]
    a2a, ring = context_subgroup_ranks(cp, 2)
    assert a2a == [[0, 2], [4, 6], [1, 3], [5, 7]] and ring == [[0, 4], [2, 6], [1, 5], [3, 7]]
    with pytest.raises(ConfigError, match="context_a2a_size=3"):
        context_subgroup_ranks(cp, 3)


def test_document_starts_of_a_packed_mask():
    from megacore.data.gpt_dataset import make_sample
    from megacore.parallel.context_parallel import split_sample_for_cp

    window = np.array([5, 1, 2, 0, 3, 4, 0, 6, 7, 8, 0, 9, 1, 2, 3, 4, 5])  # eod id 0
    sample = make_sample(window, eod=0, reset_attention_mask=True)
    local = split_sample_for_cp(sample, 2, 1)  # positions 4..11
    assert local["position_ids"].tolist() == list(range(4, 12))
    assert local["attention_mask"].tolist() == [4, 4, 4, 7, 7, 7, 7, 11]


CP_REFUSED = [
    (["parallel.context=2", "parallel.context_mode=ring", "model.attention_dropout=0.1"], 2,
     ["parallel.context_mode='ring'", "model.attention_dropout=0.1", "allgather or a2a"]),
    (["parallel.context=4", "parallel.context_mode=a2a+ring"], 4, ["context_a2a_size", "None", "e.g. 2"]),
    (["parallel.context=4", "parallel.context_mode=a2a+ring", "parallel.context_a2a_size=3"], 4, ["got 3"]),
    (["parallel.context_a2a_size=2"], 1, ["parallel.context_a2a_size=2 needs parallel.context_mode=a2a+ring"]),
    (["parallel.context=8", "parallel.context_mode=a2a"], 8, ["4 attention heads", "parallel.context=8"]),
    (["model.hidden_size=96", "model.num_attention_heads=12", "model.num_query_groups=3", "parallel.context=4", "parallel.context_mode=a2a"],
     4, ["3 key/value heads", "parallel.context=4"]),
    (["parallel.tensor=2", "parallel.context=4", "parallel.context_mode=a2a+ring", "parallel.context_a2a_size=4"], 8,
     ["2 attention heads per tensor-parallel rank", "parallel.context_a2a_size=4"]),
]
CP_ACCEPTED = [
    (["parallel.context=4", "parallel.context_mode=a2a"], 4),  # 2 KV heads repeated over 4 ranks
    (["parallel.context=4", "parallel.context_mode=a2a+ring", "parallel.context_a2a_size=2"], 4),
    (["parallel.context=2", "parallel.context_mode=ring", "data.reset_attention_mask=true"], 2),
    (["parallel.context=2", "parallel.context_mode=a2a", "data.reset_position_ids=true"], 2),
]


def _run_config(overrides):
    from megacore.config import apply_override

    cfg = RunConfig(model=TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                            vocab_size=256, seq_length=32))
    for item in overrides:
        apply_override(cfg, *item.split("=", 1))
    return cfg


def test_support_table_refuses_what_a_mode_cannot_run_and_names_the_fix():
    from megacore.config import ConfigError

    for overrides, world, needles in CP_REFUSED:
        with pytest.raises(ConfigError) as err:
            _run_config(overrides).validate(world_size=world)
        assert all(n in str(err.value) for n in needles), (overrides, str(err.value))
    for overrides, world in CP_ACCEPTED:
        _run_config(overrides).validate(world_size=world)


# ---------------------------------------------------------------------------------------- the CLI
# Packed documents (mock data: documents of random length with eod tokens) and a sliding window.
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=64", "model.seq_length=32", "model.vocab_size=128", "model.sliding_window=12",
        "data.source=mock", "data.reset_attention_mask=true", "train.global_batch_size=2", "train.micro_batch_size=2",
        "train.iters=3", "train.warmup_iters=0", "train.eval_interval=0", "log.interval=1"]


def test_cli_curves_of_every_mode_equal_allgather_and_a_ring_checkpoint_resumes_on_one_process(tmp_path):
    """``megacore train`` in each mode follows the all-gather CP2 run (loss and grad norm, 1e-5
    relative); the ring run's step-2 checkpoint, resumed on one process (CP sizes reshard: nothing is
    split over CP), continues with the all-gather run's step-3 loss."""
    from megacore.cli import main
    from tests.training.test_train_cli import grad_norms, losses, train_tiny

    ckpt = tmp_path / "ckpt_ring"
    want = train_tiny(tmp_path, "allgather", [*TINY, "parallel.context=2", "checkpoint.dir=null"], nproc=2)
    runs = {"ring": (["parallel.context=2", "parallel.context_mode=ring", f"checkpoint.dir={ckpt}",
                      "checkpoint.interval=2"], 2),
            "a2a": (["parallel.context=2", "parallel.context_mode=a2a", "checkpoint.dir=null"], 2),
            "a2a+ring": (["parallel.context=4", "parallel.context_mode=a2a+ring", "parallel.context_a2a_size=2",
                          "checkpoint.dir=null"], 4)}
    for name, (overrides, nproc) in runs.items():
        got = train_tiny(tmp_path, name, [*TINY, *overrides], nproc=nproc)
        for a, b in ((losses(got), losses(want)), (grad_norms(got), grad_norms(want))):
            assert len(a) == len(b) == 3 and max(abs(x - y) / abs(y) for x, y in zip(a, b)) < 1e-5, (name, a, b)
    resumed = tmp_path / "resumed"
    assert main(["train", "configs/tiny_cpu.yaml", *TINY, f"checkpoint.load={ckpt}/iter_0000002",
                 "checkpoint.dir=null", f"log.dir={resumed}"]) == 0
    (last,) = losses(str(resumed))
    assert abs(last - losses(want)[2]) / abs(losses(want)[2]) < 1e-5


# ----------------------------------------------------------------------------------------- GPU
def _simulated_ring(q, k, v, lo, window, c, fast, dout):
    """Every rank of a c-rank ring on one device: each rank's steps (``cp_ring._Plan``), its blocks
    attended by ``block_forward`` and merged, then each block's backward from the merged result, the
    dK/dV of a block summed over the ranks that attended it (what travels around the ring)."""
    from megacore.parallel.context_parallel import cp_token_index
    from megacore.parallel.cp_block import block_backward, block_forward, merge
    from megacore.parallel.cp_ring import Ring, _Plan

    s = q.shape[2]
    index = [torch.from_numpy(cp_token_index(s, c, r)).to(q.device) for r in range(c)]
    out, dq = torch.zeros(q.shape[:3] + v.shape[-1:], device=q.device), torch.zeros_like(q, dtype=torch.float32)
    dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    for r in range(c):
        plan = _Plan(Ring(None, c, r, 0, 0), s // c, None if lo is None else lo[:, index[r]], window, q.device)
        qr = q[:, :, index[r]]
        o_r = torch.zeros(qr.shape[:3] + v.shape[-1:], device=q.device)
        lse_r = torch.full(qr.shape[:3], float("-inf"), device=q.device)
        for src, qs, ks, causal, run in plan.steps:
            if run:
                kb, vb = k[:, :, index[src]][:, :, ks], v[:, :, index[src]][:, :, ks]
                mask = plan.mask(src, qs, ks, q.device)
                o, lse = block_forward(qr[:, :, qs], kb, vb, 0.125, causal and mask is None, mask, fast)
                o_r[:, :, qs], lse_r[:, :, qs] = merge(o_r[:, :, qs], lse_r[:, :, qs], o, lse)
        o_r = o_r.to(q.dtype)
        out[:, :, index[r]] = o_r.float()
        for src, qs, ks, causal, run in plan.steps:
            if run:
                kb, vb = k[:, :, index[src]][:, :, ks], v[:, :, index[src]][:, :, ks]
                mask = plan.mask(src, qs, ks, q.device)
                gq, gk, gv = block_backward(dout[:, :, index[r]][:, :, qs], qr[:, :, qs], kb, vb, o_r[:, :, qs],
                                            lse_r[:, :, qs], 0.125, causal and mask is None, mask, fast)
                dq[:, :, index[r][qs]] += gq.float()
                dk[:, :, index[src][ks]] += gk.float()
                dv[:, :, index[src][ks]] += gv.float()
    return out, dq, dk, dv


@pytest.mark.gpu
@pytest.mark.parametrize("efficient_backward", [False, True],
                         ids=["plain_masked_backward", "efficient_backward"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "docs_window"])
def test_ring_kernels_on_cuda_match_the_reference(dtype, masked, efficient_backward, monkeypatch):
    """The CUDA block kernels (flash without a mask, memory-efficient with one, both returning the
    log-sum-exp; their backwards fed the merged output) in a simulated 4-rank ring equal the plain
    fp32 attention over the whole sequence (GQA 8:2 heads)."""
    from megacore.parallel import cp_block
    from megacore.parallel.cp_block import block_mask

    monkeypatch.setattr(cp_block, "EFFICIENT_BACKWARD", efficient_backward)

    torch.manual_seed(0)
    b, h, hkv, s, d, c, window = 2, 8, 2, 1024, 64, 4, 300
    q, k, v, dout = (torch.randn(b, n, s, d, device="cuda", dtype=dtype) for n in (h, hkv, hkv, h))
    pos = torch.arange(s, device="cuda")
    lo = None
    if masked:
        starts = torch.tensor([[0, 77, 500, 901], [0, 333, 334, 700]], device="cuda")  # documents
        doc = torch.searchsorted(starts, pos.expand(b, -1).contiguous(), right=True) - 1
        lo = torch.maximum(starts.gather(1, doc), pos - (window - 1))
    q32, k32, v32 = (t.detach().float().clone().requires_grad_() for t in (q, k, v))
    mask = block_mask(pos, pos, lo)
    ref = _fp64_attention(q32, k32, v32, mask, 0.125)
    ref.backward(dout.double())
    out, dq, dk, dv = _simulated_ring(q, k, v, lo, window if masked else None, c, True, dout)
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    for got, want in ((out, ref.detach()), (dq, q32.grad), (dk, k32.grad), (dv, v32.grad)):
        err = (got.double() - want.double()).abs().max().item() / want.abs().max().item()
        assert err < tol, (dtype, masked, err)


def test_a_cp_model_refuses_padding_masks():
    from megacore.parallel.context_parallel import ContextParallelMask

    positions = torch.arange(4)[None]
    for mode in ("allgather", "ring"):
        with pytest.raises(ValueError, match="padding masks are not supported"):
            ContextParallelMask(None, mode=mode)(1, 4, "cpu", positions, torch.ones(1, 4, dtype=torch.bool))
        with pytest.raises(ValueError, match="needs position_ids"):
            ContextParallelMask(None, mode=mode)(1, 4, "cpu")
