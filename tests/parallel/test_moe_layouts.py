"""MoE layers in every parallel layout, each against the one-process model of the same seed on the
same global batch (gloo, fp32). Every layout is built the trainer's way (``compose.build_run_model``:
the TP/SP plan, EP, ETP, CP, DDP, then ``build_optimizer``), runs one forward/backward of its share of
the batch and one optimizer step. Checked against the one-device model:

- the loss (the ranks' shares summed over DP and CP, counted once per TP group);
- every gradient this rank holds (``main_grad`` after the DP reduction and the TP sums) equals its
  slice (``ParamMeta.shard``) of the one-device gradient: TP shards, EP slices, ETP slices, and the
  replicated router / experts / shared-expert gate under SP or CP, whose gradients are partial sums;
- the optimizer's global grad norm (every parameter element counted once, wherever it lives);
- the logged balance loss (``pop_aux_mean`` summed over ranks and divided by DP, as the trainer does).

The model has a gated shared expert, top-2 of 4 experts and a balance-loss weight of 0.1, so the
routing, the aux-loss gradient and the shared expert's TP split are all exercised. Tolerance: 1e-5
relative for the loss and the norm, 1e-5 absolute (relative to the largest element) for gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megacore.config import ParallelConfig, RunConfig, TrainConfig, TransformerConfig
from tests.dist.harness import run_distributed
from tests.parallel.rank_batch import rank_batch

TOL = 1e-5
MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64,
             vocab_padding_multiple=4, seq_length=16, ffn_hidden_size=32, num_experts=4, moe_top_k=2,
             moe_ffn_hidden_size=16, moe_aux_loss_coeff=0.1, moe_shared_expert_hidden_size=16,
             moe_shared_expert_gate=True)
BATCH = 4  # sequences in the global batch


def _data():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 64, (BATCH, 16), generator=g)
    return ids, torch.randint(0, 64, (BATCH, 16), generator=g)


def _reference(dp: int, extra: dict):
    """One-device gradients, loss, grad norm and logged balance loss for DP slices of the batch."""
    from megacore.layers.moe import MoELayer, set_aux_loss_scale
    from megacore.models import GPTModel

    ref = GPTModel(TransformerConfig(**MODEL, **extra), seed=7).train()
    set_aux_loss_scale(ref, 1.0 / dp)
    ids, labels = _data()
    per = BATCH // dp
    loss = sum(ref(ids[d * per:(d + 1) * per], labels=labels[d * per:(d + 1) * per], reduction="sum")
               for d in range(dp)) / labels.numel()
    loss.backward()
    loss = loss.detach()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    aux = sum(m.pop_aux_mean() for m in ref.modules() if isinstance(m, MoELayer)).item()
    return loss.item(), grads, norm, aux


def _layout(rank, world, parallel: dict, extra: dict) -> dict:
    import megacore.parallel as P
    from megacore.compose import build_optimizer, build_run_model
    from megacore.layers.moe import MoELayer, set_aux_loss_scale
    from megacore.sharding import peek_meta

    cfg = RunConfig(model=TransformerConfig(**MODEL, **extra), parallel=ParallelConfig(**parallel),
                    train=TrainConfig(seed=7, lr=1e-3, clip_grad=0.0, global_batch_size=BATCH, micro_batch_size=1))
    cfg.validate(world_size=world)
    state = P.initialize(**cfg.parallel.mesh_sizes())
    P.model_parallel_seed(1)
    try:
        (model,) = build_run_model(cfg, state, device="cpu", dtype=torch.float32)
        opt, _ = build_optimizer(cfg, [model], state)
        dp = state.dp_size
        set_aux_loss_scale(model, 1.0 / dp)
        ids, labels = _data()
        ids, labels, kwargs = rank_batch(ids, labels, state)
        share = model(ids, labels=labels, reduction="sum", **kwargs) / (BATCH * 16)
        share.backward()
        info = opt.step()
        want_loss, want_grads, want_norm, want_aux = _reference(dp, extra)
        counted = share.detach().double() if state.tp_rank == 0 else torch.zeros((), dtype=torch.float64)
        aux = sum(m.pop_aux_mean() for m in model.modules() if isinstance(m, MoELayer)).double()
        sums = torch.stack([counted, aux])
        dist.all_reduce(sums)
        errors = {"loss": abs(sums[0].item() - want_loss) / want_loss,
                  "grad_norm": abs(float(info.grad_norm) - want_norm) / want_norm,
                  "moe_aux_loss": abs(sums[1].item() / dp - want_aux) / want_aux}
        for name, p in model.module.named_parameters():
            want = peek_meta(p).shard(want_grads[name])
            errors[f"grad {name}"] = ((p.main_grad - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
        return {k: v for k, v in errors.items() if not v <= TOL}
    finally:
        P.destroy()


def _layouts(rank, world, layouts):
    return {name: _layout(rank, world, *settings) for name, *settings in layouts}


def _no_count_exchange(rank, world, layouts):
    """The layouts with the count-reading all-to-all exchange made to fail: a fixed capacity must
    not need it."""
    import megacore.parallel.expert_parallel as ep

    def refuse(*args, **kwargs):
        raise AssertionError("the fixed-capacity path read the per-expert counts")

    ep.dispatch_and_compute = refuse
    return _layouts(rank, world, layouts)


TWO = [
    ("tp2", dict(tensor=2), {}),
    ("tp2_sp", dict(tensor=2, sequence_parallel=True), {}),
    ("cp2", dict(context=2), {}),
    ("ep2", dict(expert=2), {}),
    ("ep2_all_gather", dict(expert=2, expert_dispatcher="all_gather"), {}),
    ("etp2", dict(tensor=2, expert_tensor=2), {}),
    ("etp2_sp", dict(tensor=2, expert_tensor=2, sequence_parallel=True), {}),
]
FOUR = [
    ("ep2_tp2_sp", dict(tensor=2, expert=2, sequence_parallel=True), {}),
    ("cp2_tp2_sp", dict(tensor=2, context=2, sequence_parallel=True), {}),
    ("ep2_etp2", dict(tensor=2, expert=2, expert_tensor=2), {}),
    ("cp2_ep2_all_gather", dict(context=2, expert=2, expert_dispatcher="all_gather"), {}),
]
# A fixed capacity (0.75: some assignments are dropped), every expert padded to it: the exchange
# needs no counts (each rank routes its own tokens, so the one-device reference does the same per
# data-parallel slice).
PADDED = [
    ("ep2_padded", dict(expert=2), dict(moe_capacity_factor=0.75, moe_pad_to_capacity=True)),
]


def test_moe_two_rank_layouts_match_one_device():
    results = run_distributed(_layouts, world_size=2, args=(TWO,), timeout_s=400)
    assert results == [{name: {} for name, *_ in TWO}] * 2, results


def test_moe_four_rank_layouts_match_one_device():
    results = run_distributed(_layouts, world_size=4, args=(FOUR,), timeout_s=400)
    assert results == [{name: {} for name, *_ in FOUR}] * 4, results


def test_moe_fixed_capacity_expert_parallel_needs_no_count_exchange():
    results = run_distributed(_no_count_exchange, world_size=2, args=(PADDED,), timeout_s=400)
    assert results == [{name: {} for name, *_ in PADDED}] * 2, results
