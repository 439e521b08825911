"""A run's model, as one rank holds it: its language-model chunks (pipeline stages, tensor-,
expert- and context-parallel), LLaVA around them when ``vision.enabled``, FP8 linears, copy-engine
sequence-parallel linears, ``torch.compile``, and the data-parallel wrapper (DDP with megacore's
gradient buffers, or FSDP2). The order matters: each step expects the modules the previous one
left (FP8 and the SP linears before compile; compile before the DDP/FSDP wrap)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from megacore.config import ConfigError, RunConfig
from megacore.training.loop import DTYPES


def build_run_model(cfg: RunConfig, state, device: torch.device, dtype: torch.dtype,
                    info: Callable[[str], None]) -> list[torch.nn.Module]:
    """This rank's model chunks for ``cfg`` on the process groups of ``state``, wrapped for data
    parallelism; ``info`` receives one line per optional feature switched on."""
    from megacore.distributed import DistributedDataParallel
    from megacore.pipeline.partition import build_model_chunks

    p = cfg.parallel
    # TP gradient sums in finalize mode: DDP.finish_grad_sync runs them once per step (FSDP
    # excludes TP, so every TP run is DDP-wrapped).
    chunks = build_model_chunks(cfg, state, device=device, dtype=torch.float32 if p.fsdp else dtype,
                                tp_grad_sync="finalize")
    if cfg.vision.enabled:
        chunks = [llava_chunk(cfg, c, device, dtype) for c in chunks]
    if cfg.precision.fp8 is not None:  # before compile / DDP / FSDP wrap the chunks
        from megacore.precision.fp8 import apply_fp8

        n_fp8 = sum(apply_fp8(c, recipe=cfg.precision.fp8) for c in chunks)
        info(f"fp8 ({cfg.precision.fp8}): {n_fp8} linear layers run their GEMMs in float8 on this rank; "
             f"the output layer and embeddings stay {cfg.precision.dtype}")
    if p.tp_comm_overlap == "copy_engine" and state.tp_size > 1:
        from megacore.parallel import sp_overlap

        m = cfg.model  # the largest transfer: one micro-batch's tokens x hidden
        workspace = cfg.train.micro_batch_size * m.seq_length * m.hidden_size * dtype.itemsize
        results = [sp_overlap.apply(c, state.tp_group, workspace) for c in chunks]
        on = all(copy_engine for _, copy_engine in results)
        info(f"tp_comm_overlap=copy_engine: {sum(n for n, _ in results)} sequence-parallel linears move "
             + ("their tokens by peer-to-peer copies beside their matmuls" if on else
                "their tokens with the plain collectives (no symmetric memory on this backend)"))
    if cfg.compile:
        from megacore.training.compile import compile_model, enable_tp_comm_overlap

        if p.tp_comm_overlap not in ("off", "copy_engine") and state.tp_size > 1:
            what = enable_tp_comm_overlap(state.tp_group, p.tp_comm_overlap)
            info(f"tp_comm_overlap={p.tp_comm_overlap}: {what}"
                 + (f", {p.tp_batch_chunks} sequence groups per layer" if p.tp_batch_chunks > 1 else ""))
        chunks = [compile_model(c, mode=cfg.compile_mode) for c in chunks]
    if p.fsdp:
        from megacore.distributed.fsdp import apply_fsdp

        if not dist.is_initialized():
            raise ConfigError("parallel.fsdp=true needs torch.distributed; launch with --nproc N or torchrun")
        policy = None if dtype == torch.float32 else dtype
        return [apply_fsdp(c, mp_policy=policy) for c in chunks]
    # Expert weights split over EP are replicated only over the expert-data-parallel ranks.
    expert_dp = state.edp_group if state.ep_size > 1 else None
    return [DistributedDataParallel(c, state.dp_cp_group, bucket_size_mb=p.ddp_bucket_size_mb,
                                    expert_dp_group=expert_dp,
                                    overlap_grad_reduce=p.overlap_grad_reduce,
                                    use_distributed_optimizer=p.distributed_optimizer,
                                    overlap_param_gather=p.overlap_param_gather and p.distributed_optimizer,
                                    grad_reduce_dtype=DTYPES[p.grad_reduce_dtype])
            for c in chunks]


def llava_chunk(cfg: RunConfig, chunk: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """LLaVA around a (possibly tensor-parallel) language-model chunk: the vision tower and the
    projector live with the embedding, on the first pipeline stage; later stages keep LLaVA's
    parameter names (``language_model.*``) so checkpoints reshard across layouts."""
    from megacore.models.llava import LlavaConfig, LlavaLanguageStage, LlavaModel

    if not chunk.pre_process:
        return LlavaLanguageStage(chunk)
    llava = LlavaModel(LlavaConfig(cfg.model, cfg.vision), seed=cfg.train.seed, language_model=chunk)
    llava.to(device, torch.float32 if cfg.parallel.fsdp else dtype)  # FSDP casts for compute itself
    if cfg.vision.freeze_tower:
        llava.vision_tower.requires_grad_(False)
    return llava.train()
