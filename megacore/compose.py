"""The composition root: what one rank runs, built from a ``RunConfig`` in one fixed order.

The model code (``megacore.models``, ``megacore.layers``) describes ONE device and imports nothing
from the parallel side. This module alone turns it into the run; the trainer, the benchmarks and
``megacore generate`` all build through it. Read top to bottom, ``build_run_model`` does:

1. **pipeline split**: this rank's stage, ``virtual_pipeline`` GPTModel chunks on the meta device
   (``megacore.pipeline.partition.build_stage_modules``);
2. **TP / SP**: the declared plan swaps the linears, embeddings and the loss head for their
   tensor-parallel versions (``megacore.parallel.parallelize``);
3. **EP**: each rank keeps its slice of every MoE layer's experts and is handed the exchange
   (all-to-all or all-gather: ``parallel.expert_dispatcher``); **ETP** splits each expert's hidden
   units over the expert-tensor-parallel group (``megacore.parallel.expert_parallel``);
   then every local shard is materialized as the slice of the one-device model's tensor (``seed``,
   or with ``model.from_hf`` the Hugging Face weights: ``megacore.interop.hf_finetune``);
4. **CP**: core attention wrapped for ``parallel.context_mode`` (all-gather, ring, all-to-all or
   all-to-all + ring), the context-parallel mask (``megacore.parallel.context_parallel``), MoE layers routing the whole micro-batch
   (``megacore.parallel.moe_parallel``); TP batch chunks; LLaVA around the language model;
5. **FP8 / comm overlap**: GEMM strategies handed to the linears (``megacore.precision.fp8``,
   ``megacore.parallel.sp_overlap``);
6. **recompute** (``model.configure_recompute``);
7. **compile** (``megacore.training.compile``);
8. **data parallelism**: megacore's DDP (gradient buffers; the distributed optimizer shards over
   it) or FSDP2.

``build_optimizer`` then builds the optimizer over those chunks, as the trainer uses it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from megacore.config import ConfigError, RunConfig
from megacore.distributed import DistributedDataParallel
from megacore.distributed.fsdp import apply_fsdp
from megacore.models import GPTModel
from megacore.models.init import materialize
from megacore.models.llava import LlavaConfig, LlavaLanguageStage, LlavaModel
from megacore.optim import DistributedOptimizer, MixedPrecisionOptimizer, weight_decay_groups
from megacore.parallel import parallelize, parallelize_llava, sp_overlap
from megacore.parallel.batch_chunks import apply_batch_chunks
from megacore.parallel.context_parallel import apply_context_parallel
from megacore.parallel.expert_parallel import apply_expert_parallel, apply_expert_tensor_parallel
from megacore.parallel.moe_parallel import apply_moe_context_parallel
from megacore.parallel.topology import AXIS_GROUPS, ParallelState, get_state, layout_mismatches
from megacore.pipeline.partition import build_stage_modules
from megacore.precision.fp8 import apply_fp8
from megacore.precision.loss_scaler import build_loss_scaler
from megacore.precision.mixed import DTYPES
from megacore.training.compile import compile_model, enable_tp_comm_overlap


def _say_nothing(_: str) -> None:
    pass


def build_inference_model(config, dtype: torch.dtype, device) -> torch.nn.Module:
    """The one-device model ``megacore generate`` runs (no parallel plan applies), in eval mode and
    with storage allocated but not initialized: a checkpoint is loaded into it next."""
    with torch.device("meta"):
        model = GPTModel(config)
    model.to(dtype)  # free on meta
    materialize(model, config, seed=0, device=device, fill=False)
    return model.eval()


def build_model_chunks(cfg: RunConfig, state: Optional[ParallelState] = None, device=None,
                       dtype: Optional[torch.dtype] = None, tp_grad_sync: str = "hook") -> list:
    """Steps 1-4 and 6: this rank's language-model chunks, parallel, filled from ``train.seed``,
    recompute configured, in training mode; not wrapped for data parallelism. ``state`` defaults to
    ``megacore.parallel.get_state()``. (Dropout under TP needs
    ``megacore.parallel.model_parallel_seed(seed)`` first.)

    ``tp_grad_sync`` is ``parallelize``'s ``grad_sync``: ``"hook"`` (nothing to call) or
    ``"finalize"`` (one coalesced TP all-reduce per step, run by megacore's
    ``DistributedDataParallel.finish_grad_sync``; what the trainer uses).
    """
    chunks = _parallel_chunks(cfg, state or get_state(), device, dtype, tp_grad_sync)
    for chunk in chunks:
        chunk.configure_recompute(cfg.recompute)
    return chunks


def _parallel_chunks(cfg: RunConfig, state: ParallelState, device, dtype, tp_grad_sync: str) -> list:
    """Steps 1-4 (see the module doc)."""
    p = cfg.parallel
    if layout_mismatches(state, p.mesh_sizes()):
        sizes = {axis: p.mesh_sizes()[axis] for axis in ("pipeline", "tensor", "context", "expert", "expert_tensor")}
        asked = ", ".join(f"parallel.{axis}={size}" for axis, size in sizes.items())
        got = ", ".join(f"{axis}={state.size(AXIS_GROUPS[axis])}" for axis in sizes)
        raise ConfigError(f"{asked} but the process groups have {got}; build the groups from the same section: "
                          "megacore.parallel.initialize(**parallel.mesh_sizes())")
    chunks = build_stage_modules(cfg.model, state.pp_rank, state.pp_size, p.virtual_pipeline or 1, cfg.train.seed,
                                 pipeline_layers=p.pipeline_layers, materialize=False)        # 1. pipeline split
    for chunk in chunks:
        if state.tp_size > 1:                                                                   # 2. TP / SP
            parallelize(chunk, state, sequence_parallel=p.sequence_parallel, grad_sync=tp_grad_sync)
        if state.ep_size > 1:                                                                   # 3. EP
            apply_expert_parallel(chunk, state.ep_group, state.ep_rank, state.ep_size, p.expert_dispatcher)
        if state.etp_size > 1:                                                                  # 3. ETP
            apply_expert_tensor_parallel(chunk, state.etp_group, state.etp_rank, state.etp_size)
        hf_dir = cfg.model.from_hf
        materialize(chunk, cfg.model, cfg.train.seed, device=device, dtype=dtype, fill=hf_dir is None)
        if hf_dir is not None:                                                                  # 4. or HF weights
            from megacore.interop.hf_finetune import load_weights

            load_weights(chunk, hf_dir)
        if state.cp_size > 1:                                                                   # 4. CP
            apply_context_parallel(chunk, state.cp_group, p.context_mode, p.context_a2a_size)
            apply_moe_context_parallel(chunk, state.cp_group, state.cp_rank, state.cp_size)
        if p.tp_batch_chunks > 1:
            apply_batch_chunks(chunk, p.tp_batch_chunks)
        chunk.train()
    return chunks


def build_parallel_gpt(config, seed: int, state: Optional[ParallelState] = None, sequence_parallel: bool = False,
                       device=None, dtype: Optional[torch.dtype] = None, grad_sync: str = "hook", **gpt_kwargs):
    """``GPTModel(config, **gpt_kwargs)`` sharded over ``state.tp_group`` (steps 2-3 for one chunk,
    without a RunConfig): built on meta, parallelized, filled from ``seed``. Each rank then holds its
    shards of exactly the model ``GPTModel(config, seed=seed)`` builds on one device.

    ``gpt_kwargs`` go to GPTModel (``layer_spec``, ``pre_process``, ``post_process``,
    ``layer_numbers`` for a pipeline stage). ``device`` defaults to CPU."""
    with torch.device("meta"):
        model = GPTModel(config, seed=seed, **gpt_kwargs)
    parallelize(model, state or get_state(), sequence_parallel=sequence_parallel, grad_sync=grad_sync)
    materialize(model, config, seed, device=device, dtype=dtype)
    return model


def build_run_model(cfg: RunConfig, state: Optional[ParallelState] = None, device=None,
                    dtype: Optional[torch.dtype] = None, info: Callable[[str], None] = _say_nothing) -> list:
    """All eight steps: this rank's model chunks for ``cfg``, wrapped for data parallelism. ``info``
    receives one line per optional feature switched on."""
    state = state or get_state()
    p = cfg.parallel
    dtype = dtype or DTYPES[cfg.precision.dtype]
    # TP gradient sums in finalize mode: DDP.finish_grad_sync runs them once per step (FSDP
    # excludes TP, so every TP run is DDP-wrapped).
    chunks = _parallel_chunks(cfg, state, device, torch.float32 if p.fsdp else dtype, "finalize")  # 1-4
    if cfg.vision.enabled:
        chunks = [llava_chunk(cfg, c, device, dtype) for c in chunks]
    if cfg.precision.fp8 is not None:                                                           # 5. FP8
        n_fp8 = sum(apply_fp8(c, recipe=cfg.precision.fp8) for c in chunks)
        info(f"fp8 ({cfg.precision.fp8}): {n_fp8} linear layers run their GEMMs in float8 on this rank; "
             f"the output layer and embeddings stay {cfg.precision.dtype}")
    if p.tp_comm_overlap == "copy_engine" and state.tp_size > 1:                                # 5. comm overlap
        m = cfg.model  # the largest transfer: one micro-batch's tokens x hidden
        workspace = cfg.train.micro_batch_size * m.seq_length * m.hidden_size * dtype.itemsize
        results = [sp_overlap.apply(c, state.tp_group, workspace) for c in chunks]
        on = all(copy_engine for _, copy_engine in results)
        info(f"tp_comm_overlap=copy_engine: {sum(n for n, _ in results)} sequence-parallel linears move "
             + ("their tokens by peer-to-peer copies beside their matmuls" if on else
                "their tokens with the plain collectives (no symmetric memory on this backend)"))
    for chunk in chunks:                                                                         # 6. recompute
        chunk.configure_recompute(cfg.recompute)
    if cfg.compile:                                                                              # 7. compile
        if p.tp_comm_overlap not in ("off", "copy_engine") and state.tp_size > 1:
            what = enable_tp_comm_overlap(state.tp_group, p.tp_comm_overlap)
            info(f"tp_comm_overlap={p.tp_comm_overlap}: {what}"
                 + (f", {p.tp_batch_chunks} sequence groups per layer" if p.tp_batch_chunks > 1 else ""))
        chunks = [compile_model(c, mode=cfg.compile_mode) for c in chunks]
    return [_wrap_data_parallel(cfg, state, c, dtype) for c in chunks]                          # 8. DP


def llava_chunk(cfg: RunConfig, chunk: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """LLaVA around a (possibly tensor-parallel) language-model chunk: the vision tower and the
    projector live with the embedding, on the first pipeline stage; later stages keep LLaVA's
    parameter names (``language_model.*``) so checkpoints reshard across layouts."""
    if not chunk.pre_process:
        return LlavaLanguageStage(chunk)
    llava = LlavaModel(LlavaConfig(cfg.model, cfg.vision), seed=cfg.train.seed, language_model=chunk)
    parallelize_llava(llava, sequence_parallel=cfg.parallel.sequence_parallel, grad_sync="finalize")
    llava.to(device, torch.float32 if cfg.parallel.fsdp else dtype)  # FSDP casts for compute itself
    if cfg.vision.freeze_tower:
        llava.vision_tower.requires_grad_(False)
    return llava.train()


def _route_over_data_parallel(cfg: RunConfig, state: ParallelState, chunk: torch.nn.Module) -> None:
    """``model.moe_aux_loss_type="global_batch"``: hand each router the sum of its expert counts
    over the data-parallel (and context-parallel) ranks (``TopKRouter.reduce_counts``)."""
    if cfg.model.num_experts is None or cfg.model.moe_aux_loss_type != "global_batch" or state.dp_cp_size == 1:
        return
    from megacore.distributed.comm import comm_device
    from megacore.layers.moe import TopKRouter

    group = state.dp_cp_group

    def reduce_counts(counts: torch.Tensor) -> torch.Tensor:
        summed = counts.to(comm_device(counts.device), copy=True)
        dist.all_reduce(summed, group=group)
        return summed.to(counts.device)

    for module in chunk.modules():
        if isinstance(module, TopKRouter):
            module.reduce_counts = reduce_counts


def _wrap_data_parallel(cfg: RunConfig, state: ParallelState, chunk: torch.nn.Module, dtype: torch.dtype):
    p = cfg.parallel
    _route_over_data_parallel(cfg, state, chunk)
    if p.fsdp:
        if not dist.is_initialized():
            raise ConfigError("parallel.fsdp=true needs torch.distributed; launch with --nproc N or torchrun")
        return apply_fsdp(chunk, mp_policy=None if dtype == torch.float32 else dtype)
    # Expert weights split over EP are replicated only over the expert-data-parallel ranks.
    return DistributedDataParallel(chunk, state.dp_cp_group, bucket_size_mb=p.ddp_bucket_size_mb,
                                   expert_dp_group=state.edp_group if state.ep_size > 1 else None,
                                   overlap_grad_reduce=p.overlap_grad_reduce,
                                   use_distributed_optimizer=p.distributed_optimizer,
                                   overlap_param_gather=p.overlap_param_gather and p.distributed_optimizer,
                                   grad_reduce_dtype=DTYPES[p.grad_reduce_dtype])


def build_optimizer(cfg: RunConfig, chunks: list, state: Optional[ParallelState] = None,
                    dtype: Optional[torch.dtype] = None):
    """(optimizer, loss scaler or None) over ``build_run_model``'s chunks: AdamW on fp32 master
    weights (``MixedPrecisionOptimizer``, or the ``DistributedOptimizer`` sharding its state over
    DP), or plain AdamW under FSDP2."""
    state = state or get_state()
    t, pr = cfg.train, cfg.precision
    scaler = build_loss_scaler(dtype or DTYPES[pr.dtype], initial_scale=pr.initial_loss_scale,
                               window=pr.loss_scale_window, min_scale=pr.min_loss_scale, hysteresis=pr.hysteresis)
    if cfg.parallel.fsdp:  # FSDP2 x fp16 (no loss scaler there) is refused by the support table
        opt = torch.optim.AdamW(weight_decay_groups(chunks[0], t.weight_decay), lr=t.lr,
                                betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
        return opt, None
    groups = tuple(g for g in (state.tp_group, state.pp_group) if g is not None)
    kind = DistributedOptimizer if cfg.parallel.distributed_optimizer else MixedPrecisionOptimizer
    opt = kind(chunks, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
               weight_decay=t.weight_decay, clip_grad=t.clip_grad, loss_scaler=scaler,
               master_weights=pr.master_weights, model_parallel_groups=groups, tp_group=state.tp_group,
               expert_parallel_group=state.ep_group if state.ep_size > 1 else None,
               expert_tp_group=state.etp_group if state.ep_size > 1 and state.etp_size > 1 else None)
    return opt, scaler
