"""Multi-latent attention in the parallel layouts, each against the one-process model of the same seed
on the same global batch (gloo, fp32). The model is DeepSeek-shaped and tiny: MLA (q_lora_rank 16,
kv_lora_rank 16, qk_nope 8, qk_rope 4, v 8, 4 heads) in both layers, a top-2-of-4 MoE with a gated
shared expert, and one multi-token-prediction depth (not under CP, which refuses MTP). Every layout is
built the trainer's way (``compose.build_run_model``, then ``build_optimizer``), runs one
forward/backward of its share of the batch and one optimizer step. Checked against one device:

- the loss (the ranks' shares summed over DP, CP and PP, counted once per TP group);
- every gradient this rank holds (``main_grad`` after the DP/CP reductions and the TP sums) equals its
  slice (``ParamMeta.shard``) of the one-device gradient: the head-split q/kv up-projections and output
  projection, and the replicated down-projections and latent norms (whole without SP; TP-summed
  partial sums under SP);
- the optimizer's global grad norm (every parameter element counted once, wherever it lives).

Tolerance: 1e-5 relative for the loss and the norm, 1e-5 absolute relative to the largest element for
gradients. CP2 x TP2+SP runs on four ranks. The full-rank query projection (no q_lora_rank) and the recomputed up-projections
(``recompute.modules: [mla_up_proj]``, whose recomputed region holds the latents' gathers) run under
TP2(+SP) too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megacore.config import ParallelConfig, RecomputeConfig, RunConfig, TrainConfig, TransformerConfig
from tests.dist.harness import run_distributed
from tests.parallel.rank_batch import rank_batch

TOL = 1e-5
MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, vocab_padding_multiple=4,
             seq_length=16, ffn_hidden_size=32, multi_latent_attention=True, q_lora_rank=16, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_experts=4, moe_top_k=2,
             moe_ffn_hidden_size=16, moe_aux_loss_coeff=0.1, moe_shared_expert_hidden_size=16,
             moe_shared_expert_gate=True, mtp_num_layers=1)
BATCH = 4  # sequences in the global batch


def _data():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 64, (BATCH, 16), generator=g)
    return ids, torch.randint(0, 64, (BATCH, 16), generator=g)


def _reference(dp: int, extra: dict):
    """One-device gradients, loss and grad norm for DP slices of the batch."""
    from megacore.layers.moe import set_aux_loss_scale
    from megacore.models import GPTModel

    ref = GPTModel(TransformerConfig(**{**MODEL, **extra}), seed=7).train()
    set_aux_loss_scale(ref, 1.0 / dp)
    ids, labels = _data()
    per = BATCH // dp
    loss = sum(ref(ids[d * per:(d + 1) * per], labels=labels[d * per:(d + 1) * per], reduction="sum")
               for d in range(dp)) / labels.numel()
    loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    return loss.item(), grads, norm


def _layout(rank, world, parallel: dict, extra: dict, run: dict | None = None) -> dict:
    import megacore.parallel as P
    from megacore.compose import build_optimizer, build_run_model
    from megacore.layers.moe import set_aux_loss_scale
    from megacore.sharding import peek_meta

    cfg = RunConfig(model=TransformerConfig(**{**MODEL, **extra}), parallel=ParallelConfig(**parallel),
                    train=TrainConfig(seed=7, lr=1e-3, clip_grad=0.0, global_batch_size=BATCH, micro_batch_size=1),
                    **(run or {}))
    cfg.validate(world_size=world)
    state = P.initialize(**cfg.parallel.mesh_sizes())
    P.model_parallel_seed(1)
    try:
        chunks = build_run_model(cfg, state, device="cpu", dtype=torch.float32)
        opt, _ = build_optimizer(cfg, chunks, state)
        dp, pp = state.dp_size, state.pp_size
        for chunk in chunks:
            set_aux_loss_scale(chunk, 1.0 / dp)
        ids, labels = _data()
        ids, labels, kwargs = rank_batch(ids, labels, state)
        if pp > 1:
            from megacore.pipeline import allreduce_tied_embedding_grads

            share = _pipeline_share(chunks[0], state, ids, labels)
            allreduce_tied_embedding_grads(chunks, state.embedding_group)  # the MTP depth's copy of the table
        else:
            share = chunks[0](ids, labels=labels, reduction="sum", **kwargs) / (BATCH * 16)
            share.backward()
        info = opt.step()
        want_loss, want_grads, want_norm = _reference(dp, extra)
        counted = share.detach().double() if state.tp_rank == 0 else torch.zeros((), dtype=torch.float64)
        dist.all_reduce(counted)
        errors = {"loss": abs(counted.item() - want_loss) / want_loss,
                  "grad_norm": abs(float(info.grad_norm) - want_norm) / want_norm}
        for chunk in chunks:
            for name, p in chunk.module.named_parameters():
                global_name = peek_meta(p).global_name or name
                want = peek_meta(p).shard(want_grads[global_name])
                errors[f"grad {global_name}"] = ((p.main_grad - want).abs().max()
                                                 / want.abs().max().clamp(min=1e-6)).item()
        return {k: v for k, v in errors.items() if not v <= TOL}
    finally:
        P.destroy()


def _pipeline_share(stage, state, ids, labels):
    """Two pipeline stages, the whole local batch as one micro-batch: stage 0 sends its hidden states,
    the last stage returns the loss share and sends back the gradient. Returns this stage's loss share
    (0 on the first stage)."""
    first = state.pp_rank == 0
    peer = dist.get_global_rank(state.pp_group, 1 - state.pp_rank)
    if first:
        hidden = stage(ids)
        dist.send(hidden.detach().contiguous(), peer)
        grad = torch.empty_like(hidden)
        dist.recv(grad, peer)
        hidden.backward(grad)
        return torch.zeros(())
    hidden = torch.empty(ids.shape[0], ids.shape[1], MODEL["hidden_size"])
    dist.recv(hidden, peer)
    hidden.requires_grad_(True)
    share = stage(ids, hidden_states=hidden, labels=labels, reduction="sum") / (BATCH * 16)
    share.backward()
    dist.send(hidden.grad.contiguous(), peer)
    return share


def _layouts(rank, world, layouts):
    return {name: _layout(rank, world, *settings) for name, *settings in layouts}


TWO = [
    ("tp2", dict(tensor=2), {}),
    ("tp2_sp", dict(tensor=2, sequence_parallel=True), {}),
    ("tp2_sp_full_rank_q", dict(tensor=2, sequence_parallel=True), dict(q_lora_rank=None)),
    ("tp2_full_rank_q", dict(tensor=2), dict(q_lora_rank=None)),
    ("tp2_sp_recompute_up_proj", dict(tensor=2, sequence_parallel=True), {},
     dict(recompute=RecomputeConfig(granularity="selective", modules=["core_attn", "mla_up_proj"]))),
    ("cp2", dict(context=2), dict(mtp_num_layers=0)),
    ("pp2", dict(pipeline=2), {}),
]


def test_mla_two_rank_layouts_match_one_device():
    results = run_distributed(_layouts, world_size=2, args=(TWO,), timeout_s=400)
    assert results == [{name: {} for name, *_ in TWO}] * 2, results


FOUR = [("cp2_tp2_sp", dict(tensor=2, context=2, sequence_parallel=True), dict(mtp_num_layers=0))]


def test_mla_context_and_tensor_sequence_parallel_match_one_device():
    results = run_distributed(_layouts, world_size=4, args=(FOUR,), timeout_s=400)
    assert results == [{name: {} for name, *_ in FOUR}] * 4, results
