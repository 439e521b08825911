"""Everything the multi-rank data-parallel tests check, run inside ONE spawned gloo world per size.

``run_world(rank, world_size)`` returns ``{case_name: ("ok", value) | ("error", traceback)}``;
the test files assert on the entries (see tests/distributed/conftest.py).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from megacore.distributed import DistributedDataParallel, clip_grad_norm
from megacore.optim import DistributedOptimizer
from megacore.precision import DynamicLossScaler, cast_params_
from megacore.optim.optimizer import MixedPrecisionOptimizer
from megacore.sharding import TPLayout, param_meta
from tests.distributed.common import (CLIP, HP, STEPS, build_model, global_batch, global_rel_err, max_rel_err, no_decay,
                                      quiet_deprecations, reference_run, run_case, train_steps)

# (name, distributed optimizer, micro-batch size per dp size, bucket MB, overlap grad reduce, overlap param gather)
DDP_CASES = [
    ("replicated_overlap", False, {2: 2, 4: 1}, 0.004, True, False),
    ("distopt_overlap", True, {2: 1, 4: 1}, 0.004, True, True),
    ("distopt_no_overlap_one_bucket", True, {2: 2, 4: 2}, None, False, False),
]


def make_optimizer(ddp, distributed: bool, **extra):
    cls = DistributedOptimizer if distributed else MixedPrecisionOptimizer
    return cls(ddp, clip_grad=CLIP, no_weight_decay=no_decay, **HP, **extra)


class _DeferredGather:
    """Stand-in for an async all-gather that completes only at ``wait()``: until then every element
    of the output is NaN, so any parameter read before its bucket was waited for poisons the run."""

    def __init__(self, real, output, input, group):
        self.real, self.output, self.input, self.group = real, output, input.clone(), group
        output.fill_(float("nan"))

    def wait(self):
        self.real(self.output, self.input, self.group)


@contextlib.contextmanager
def deferred_param_gather():
    from megacore.distributed import grad_buffer

    real = grad_buffer.all_gather_flat

    def fake(output, input, group, async_op=False):
        if not async_op:
            return real(output, input, group)
        return _DeferredGather(real, output, input, group)

    grad_buffer.all_gather_flat = fake
    try:
        yield
    finally:
        grad_buffer.all_gather_flat = real


def case_ddp(ref, distributed, micro, bucket_mb, overlap, overlap_gather, deferred=False, fused=None):
    ref_params, ref_norms, ref_losses, _ = ref
    if deferred:
        with deferred_param_gather():
            return case_ddp(ref, distributed, micro, bucket_mb, overlap, overlap_gather, fused=fused)
    ddp = DistributedDataParallel(build_model(), bucket_size_mb=bucket_mb, overlap_grad_reduce=overlap,
                                  use_distributed_optimizer=distributed, overlap_param_gather=overlap_gather)
    opt = make_optimizer(ddp, distributed, fused=fused)
    infos, losses = train_steps(ddp, opt, STEPS, micro)
    params = {n: p.detach() for n, p in ddp.module.named_parameters()}
    norm_err = max(abs(i.grad_norm - r) / r for i, r in zip(infos, ref_norms))
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    return {"param_err": max_rel_err(params, ref_params), "global_err": global_rel_err(params, ref_params),
            "norm_err": norm_err, "loss_err": loss_err,
            "skipped": sum(i.skipped for i in infos), "num_buckets": sum(len(b.buckets) for b in ddp.grad_buffers),
            "clipped_steps": sum(r > CLIP for r in ref_norms)}


def case_state_bytes(dtype):
    """Optimizer-owned bytes per rank, replicated vs distributed, from the tensors themselves."""
    out = {}
    for distributed in (False, True):
        ddp = DistributedDataParallel(cast_params_(build_model(), dtype), bucket_size_mb=None,
                                      use_distributed_optimizer=distributed)
        out["distributed" if distributed else "replicated"] = make_optimizer(ddp, distributed).state_bytes()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out["distributed"])
    out["distributed_all_ranks"] = gathered
    out["numel"] = sum(p.numel() for p in build_model().parameters())
    return out


def case_fsdp(ref, micro, param_dtype):
    from megacore.distributed import apply_fsdp, fsdp_no_sync

    ref_params, ref_norms, _, _ = ref
    model = apply_fsdp(build_model(), mp_policy=param_dtype)
    groups = [{"params": [p for n, p in model.named_parameters() if not no_decay(n, p)]},
              {"params": [p for n, p in model.named_parameters() if no_decay(n, p)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, **HP)
    rank, world = dist.get_rank(), dist.get_world_size()
    norms = []
    per_rank = 8 // world
    for step in range(STEPS):
        tokens, labels = global_batch(step)
        n_global = int((labels != -100).sum())
        t, lab = tokens[rank * per_rank:(rank + 1) * per_rank], labels[rank * per_rank:(rank + 1) * per_rank]
        chunks = list(range(0, per_rank, micro))
        for i, s in enumerate(chunks):
            last = i == len(chunks) - 1
            with (fsdp_no_sync(model) if not last else _null()):
                (model(t[s:s + micro], labels=lab[s:s + micro], reduction="sum") / n_global).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).full_tensor()))
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    return {"param_err": max_rel_err(params, ref_params), "global_err": global_rel_err(params, ref_params),
            "norm_err": max(abs(a - b) / b for a, b in zip(norms, ref_norms)),
            "dtensor": all(type(p).__name__ == "DTensor" for p in model.parameters())}


def _null():
    import contextlib

    return contextlib.nullcontext()


def case_fp16_overflow(distributed: bool, fused=None):
    """Inject an inf into rank 0's own gradient shard at step 3: every rank must skip and back off."""
    rank = dist.get_rank()
    model = cast_params_(build_model(), torch.float16)
    ddp = DistributedDataParallel(model, bucket_size_mb=0.004, use_distributed_optimizer=distributed)
    scaler = DynamicLossScaler(initial_scale=2.0 ** 10, growth_interval=3, hysteresis=1)
    opt = make_optimizer(ddp, distributed, loss_scaler=scaler, fused=fused)
    record = {}

    def before_step(step):
        if step == 3:
            if rank == 0:  # inside rank 0's shard, so only rank 0 sees it locally
                f = opt.fragments[0]
                f.param.main_grad.view(-1)[f.start] = float("inf")

    infos, losses = train_steps(ddp, opt, 10, micro=2, scale_loss=True, before_step=before_step)
    record["skipped"] = [i.skipped for i in infos]
    record["scales"] = [i.loss_scale for i in infos]
    record["losses"] = losses
    # The ranks must still hold identical weights (a rank that stepped alone would have diverged).
    flat = torch.cat([p.detach().float().view(-1) for p in ddp.module.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    record["ranks_identical"] = all(torch.equal(gathered[0], g) for g in gathered)
    record["finite"] = bool(torch.isfinite(flat).all())
    return record


def case_fp16_skip_leaves_params(distributed: bool):
    """A skipped step must not touch the weights (checked directly, on every rank)."""
    model = cast_params_(build_model(), torch.float16)
    ddp = DistributedDataParallel(model, bucket_size_mb=0.004, use_distributed_optimizer=distributed)
    opt = make_optimizer(ddp, distributed, loss_scaler=DynamicLossScaler(initial_scale=2.0 ** 10, hysteresis=2))
    train_steps(ddp, opt, 1, micro=2, scale_loss=True)
    before = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    state_before = [s["exp_avg"].clone() for s in opt.state.values()]

    def inject(step):
        if dist.get_rank() == 0:
            f = opt.fragments[-1]
            f.param.main_grad.view(-1)[f.end - 1] = float("nan")

    infos, _ = train_steps(ddp, opt, 2, micro=2, scale_loss=True, before_step=inject)
    same = all(torch.equal(before[n], p.detach()) for n, p in ddp.module.named_parameters())
    same_state = all(torch.equal(a, s["exp_avg"]) for a, s in zip(state_before, opt.state.values()))
    return {"skipped": [i.skipped for i in infos], "scales": [i.loss_scale for i in infos],
            "params_unchanged": same, "moments_unchanged": same_state}


def case_nonfinite_norm_skip(distributed: bool, fused: bool):
    """bf16/fp32 (no loss scaler): a NaN gradient makes the global norm NaN on every rank, so every
    rank skips that step (fused: decided on the device, inside AdamW, and not read until asked) and
    the next step trains normally; the ranks keep identical weights. The distributed optimizer sums
    the norm over DP, so a NaN in rank 0's own shard suffices; replicated gradients are reduced
    before the step (a NaN there is on every rank), so it goes into every rank's copy."""
    ddp = DistributedDataParallel(build_model(), bucket_size_mb=0.004, use_distributed_optimizer=distributed)
    opt = make_optimizer(ddp, distributed, fused=fused)
    train_steps(ddp, opt, 1, micro=2)
    before = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    state_before = [(s["exp_avg"].clone(), s["step"].clone()) for s in opt.state.values()]

    def inject(step):
        if dist.get_rank() == 0 or not distributed:
            f = opt.fragments[0]
            f.param.main_grad.view(-1)[f.start] = float("nan")

    bad, _ = train_steps(ddp, opt, 1, micro=2, before_step=inject, first_step=1)
    unread = not bad[0].ready
    same = all(torch.equal(before[n], p.detach()) for n, p in ddp.module.named_parameters())
    same_state = all(torch.equal(a, s["exp_avg"]) and torch.equal(c, s["step"])
                     for (a, c), s in zip(state_before, opt.state.values()))
    good, _ = train_steps(ddp, opt, 1, micro=2, first_step=2)
    flat = torch.cat([p.detach().float().view(-1) for p in ddp.module.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return {"skipped": [i.skipped for i in bad + good], "norm_finite": [math.isfinite(i.grad_norm) for i in bad + good],
            "unread_after_step": unread, "params_unchanged": same, "state_unchanged": same_state,
            "num_steps": opt.num_steps, "ranks_identical": all(torch.equal(gathered[0], g) for g in gathered),
            "moved_after": not all(torch.equal(before[n], p.detach()) for n, p in ddp.module.named_parameters())}


def case_reshard_state(ref, steps_before: int = 3, steps_after: int = 3):
    """Save the distributed optimizer's shards, load every rank's shards into a replicated optimizer,
    keep training: the result must equal the uninterrupted single-rank reference."""
    ref_params = ref[3][steps_before + steps_after]
    ddp = DistributedDataParallel(build_model(), bucket_size_mb=0.004, use_distributed_optimizer=True)
    opt = make_optimizer(ddp, True)
    train_steps(ddp, opt, steps_before, micro=2)
    sd = opt.state_dict()
    sd["shards"] = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for s in sd["shards"]]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, sd["shards"])
    sd["shards"] = [s for shards in every for s in shards]

    fresh = build_model()
    fresh.load_state_dict({n: p.detach().clone() for n, p in ddp.module.named_parameters()})
    ddp2 = DistributedDataParallel(fresh, bucket_size_mb=0.004, use_distributed_optimizer=False)
    opt2 = make_optimizer(ddp2, False)
    opt2.load_state_dict(sd)
    train_steps(ddp2, opt2, steps_after, micro=2, first_step=steps_before)
    params = {n: p.detach() for n, p in ddp2.module.named_parameters()}
    return {"param_err": max_rel_err(params, ref_params), "global_err": global_rel_err(params, ref_params),
            "num_steps": opt2.num_steps, "num_saved_pieces": len(sd["shards"])}


def case_grad_norm_tp_dp(world: int):
    """TP=2 x DP=2 layout simulated on 4 ranks: matrices sharded over TP (a ``tp_layout`` in their ParamMeta), vectors
    replicated over TP, every local grad flat-sharded over DP (distributed optimizer). The global norm
    and the clipped pieces must equal torch's on the full single-rank gradients."""
    tp, dp = 2, world // 2
    rank = dist.get_rank()
    tp_groups = [dist.new_group([d * tp + t for t in range(tp)]) for d in range(dp)]
    dp_groups = [dist.new_group([d * tp + t for d in range(dp)]) for t in range(tp)]
    tp_rank, dp_rank = rank % tp, rank // tp
    tp_group, dp_group = tp_groups[dp_rank], dp_groups[tp_rank]

    model = build_model()
    tokens, labels = global_batch(0)
    (model(tokens, labels=labels, reduction="sum") / int((labels != -100).sum())).backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    out = {}
    for norm_type in (2.0, float("inf")):
        ref_model = build_model()
        for n, p in ref_model.named_parameters():
            p.grad = full[n].clone()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05, norm_type=norm_type))
        pieces, expected = [], []
        for n, p in ref_model.named_parameters():
            g_full = full[n]
            g_ref = p.grad
            sharded = g_full.dim() >= 2  # matrices: TP-sharded along dim 0; vectors: TP-replicated
            if sharded:
                g_full, g_ref = g_full.chunk(tp)[tp_rank], g_ref.chunk(tp)[tp_rank]
            g = g_full.reshape(-1).tensor_split(dp)[dp_rank].clone()  # this rank's DP shard
            fake = torch.nn.Parameter(torch.empty_like(g))
            if sharded:
                meta = param_meta(fake)  # its rows, split evenly over TP: no replicated rows
                meta.tp_layout, meta.tp_rank = TPLayout.contiguous(0, g.numel() * tp, tp), tp_rank
            fake.grad = g
            pieces.append(fake)
            expected.append(g_ref.reshape(-1).tensor_split(dp)[dp_rank])
        dup = torch.nn.Parameter(torch.empty(5))  # a tied copy that must not count
        dup.grad = torch.full((5,), 100.0)
        param_meta(dup).shared_duplicate = True
        norm = float(clip_grad_norm(pieces + [dup], 0.05, groups=(tp_group, dp_group), tp_group=tp_group,
                                    norm_type=norm_type))
        clip_err = max(float((a.grad - b).abs().max()) for a, b in zip(pieces, expected))
        out[str(norm_type)] = {"norm": norm, "ref": ref_norm, "clip_err": clip_err}
    return out


def case_parallel_state_groups():
    """With megacore.parallel (TP=2 x DP=2), DDP over parallel_groups()["dp_group"] sums over the DP
    ranks only: the TP pair acts as two identical replicas that see the same data."""
    import megacore.parallel as mp
    from megacore.distributed import parallel_groups

    state = mp.initialize(tensor=2)
    try:
        g = parallel_groups()
        dp_rank, dp_size = state.dp_rank, state.dp_size
        ddp = DistributedDataParallel(build_model(), g["dp_group"], bucket_size_mb=0.004)
        tokens, labels = global_batch(0)
        n = int((labels != -100).sum())
        per = 8 // dp_size
        (ddp(tokens[dp_rank * per:(dp_rank + 1) * per], labels=labels[dp_rank * per:(dp_rank + 1) * per],
             reduction="sum") / n).backward()
        ddp.finish_grad_sync()
        ref = build_model()
        (ref(tokens, labels=labels, reduction="sum") / n).backward()
        err = max(float((p.main_grad - q.grad).norm() / q.grad.norm())
                  for p, q in zip(ddp.module.parameters(), ref.parameters()))
        return {"grad_err": err, "dp_size": dp_size, "tp_size": state.tp_size}
    finally:
        mp.destroy()


def run_world(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    results = {}
    with quiet_deprecations():
        ref = reference_run(snapshots=(6,))
        # fp32 noise floor: the same single-rank math with another summation order (micro-batches of 2).
        results["noise_floor"] = run_case(lambda: max_rel_err(reference_run(micro=2)[0], ref[0]))
        for name, distributed, micro, bucket_mb, overlap, gather in DDP_CASES:
            results[f"ddp/{name}"] = run_case(case_ddp, ref, distributed, micro[world_size], bucket_mb, overlap, gather)
        # Param all-gathers that complete only when waited for: proves every read waits first.
        results["ddp/distopt_deferred_gather"] = run_case(case_ddp, ref, True, 1, 0.004, True, True, deferred=True)
        # torch's fused AdamW (the CUDA default) with clipping and skipping folded into its kernel, on CPU.
        for name, distributed, micro, bucket_mb, overlap, gather in DDP_CASES[:2]:
            results[f"ddp/{name}_fused"] = run_case(case_ddp, ref, distributed, micro[world_size], bucket_mb, overlap,
                                                    gather, fused=True)
        results["bytes/fp32"] = run_case(case_state_bytes, torch.float32)
        results["bytes/bf16"] = run_case(case_state_bytes, torch.bfloat16)
        results["reshard"] = run_case(case_reshard_state, ref)
        results["fsdp/fp32"] = run_case(case_fsdp, ref, 1 if world_size == 4 else 2, None)
        if world_size == 2:
            results["fsdp/bf16"] = run_case(case_fsdp, ref, 2, "bf16")
            for distributed in (False, True):
                key = "distopt" if distributed else "replicated"
                results[f"fp16/overflow/{key}"] = run_case(case_fp16_overflow, distributed)
                results[f"fp16/overflow/{key}_fused"] = run_case(case_fp16_overflow, distributed, True)
                results[f"fp16/skip/{key}"] = run_case(case_fp16_skip_leaves_params, distributed)
                for fused in (False, True):
                    results[f"nonfinite/{key}/{'fused' if fused else 'unfused'}"] = run_case(
                        case_nonfinite_norm_skip, distributed, fused)
        if world_size == 4:
            results["gradnorm/tp_dp"] = run_case(case_grad_norm_tp_dp, world_size)
            results["parallel_state"] = run_case(case_parallel_state_groups)  # last: it re-initializes groups
    return results
