"""Tensor and sequence parallelism for a GPTModel, applied from a declared plan.

The plan (``tp_plan``) maps module-path patterns (``*`` = one path component) to styles, each one
way of splitting a module over the tensor-parallel ranks. ``parallelize`` applies it to a model built on the meta device (or a
materialized one, whose values are then sharded), before ``megacore.models.init.materialize``
fills each local shard as the slice of the same full tensor the one-device model would get.

(``megacore.parallel.tp_styles`` defines them, one table there.)

Multi-latent attention (``megacore.layers.mla``): heads split, latents replicated. The query
up-projection (or the full-rank ``linear_q_proj``) and ``linear_kv_up_proj`` are column-parallel by
whole heads (contiguous per-head rows), ``linear_proj`` row-parallel; the down-projections and the
latent norms are replicated (the latents are small and every rank's heads need all of them). Without
SP they see the whole sequence and get whole gradients (the up-projections all-reduce the latents'
gradients, ``MLASharedKey`` the rotary key's); under SP they run on the token shard, the
up-projections gather the latents, and their gradients are TP-summed (``SequenceParallelReplicated``).

The loss head: the model's ``output_head`` becomes a ``VocabParallelOutputHead``
(``megacore.parallel.vocab_parallel``): the vocab-parallel cross entropy over this rank's vocab
shard, the fused vocab-parallel kernel where the Triton kernels run, and ``full_logits`` (a forward
without labels) gathering the shards. ``model.sequence_parallel_size`` tells the model the residual
stream is split. A LlavaModel around a parallelized language model also needs ``parallelize_llava``.

Gradient sums of TP-split gradients use hooks by default (``grad_sync="hook"``, nothing to call);
``grad_sync="finalize"`` leaves them to ``finalize_grads_tp(model)`` after backward.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Optional

import torch
from torch import nn

from megacore.config import ConfigError, TransformerConfig
from megacore.config.support import Facts, check
from megacore.parallel.grad_sync import ALL, mark_tp_grad_sum
from megacore.parallel.rng import TP_STREAM, get_rng_tracker
from megacore.parallel.topology import ParallelState, get_state
from megacore.parallel.vocab_parallel import VocabParallelOutputHead
from megacore.parallel.tp_styles import (Colwise, ColwiseGated, ColwiseQKV, ForkedDropout, MambaSplit, MLASharedKey,
                                         MoERouted, Replicate, ReplicatedPartialGrad, Rowwise, SequenceParallelNorm,
                                         SequenceParallelPositions, SequenceParallelReplicated, Style, TPContext,
                                         TPRandom, VocabEmbedding, VocabOutput)


def tp_plan(config: TransformerConfig, sequence_parallel: bool = False) -> dict[str, Style]:
    """The declared tensor(/sequence)-parallel plan of a GPTModel (patterns that match nothing, e.g.
    ``q_norm`` without QK-norm, are skipped)."""
    # The decoder's layers, and each multi-token-prediction depth's layer (megacore.layers.mtp).
    layers = ("decoder.layers.*", "mtp.layers.*.layer")
    plan: dict[str, Style] = {"embedding.word_embeddings": VocabEmbedding(), "output_layer": VocabOutput()}
    for layer in layers:
        plan.update({
            f"{layer}.self_attention.linear_qkv": ColwiseQKV(),
            f"{layer}.self_attention.q_norm": ReplicatedPartialGrad(),
            f"{layer}.self_attention.k_norm": ReplicatedPartialGrad(),
            f"{layer}.self_attention.core_attention": TPRandom(),
            f"{layer}.self_attention.linear_proj": Rowwise(),
            # multi-latent attention: heads split, down-projections and latent norms replicated
            f"{layer}.self_attention": MLASharedKey(),
            f"{layer}.self_attention.linear_q_proj": Colwise(),
            f"{layer}.self_attention.linear_q_up_proj": Colwise(),
            f"{layer}.self_attention.linear_kv_up_proj": Colwise(),
            **{f"{layer}.self_attention.{latent}": SequenceParallelReplicated() if sequence_parallel else Replicate()
               for latent in ("linear_q_down_proj", "linear_kv_down_proj", "q_layernorm", "kv_layernorm")},
            f"{layer}.mlp.linear_fc1": ColwiseGated() if config.gated_mlp else Colwise(),
            f"{layer}.mlp.linear_fc2": Rowwise(),
            f"{layer}.mixer": MambaSplit(),  # hybrid stacks' Mamba layers
            f"{layer}.mlp": MoERouted(),  # MoE layers (dense MLPs: the two entries above)
            f"{layer}.mlp.shared_expert.linear_fc1": ColwiseGated() if config.gated_mlp else Colwise(),
            f"{layer}.mlp.shared_expert.linear_fc2": Rowwise(),
            f"{layer}.mlp.shared_expert_gate": SequenceParallelReplicated() if sequence_parallel else Replicate(),
        })
    # MTP: a last stage's copy of the table is split like the embedding; each depth's eh_proj is
    # replicated (without SP every rank computes it whole; under SP on its token shard, so its
    # gradient is a partial sum over TP).
    plan["mtp.embedding"] = VocabEmbedding()
    plan["mtp.layers.*.eh_proj"] = ReplicatedPartialGrad() if sequence_parallel else Replicate()
    if sequence_parallel:
        plan.update({
            "embedding.position_embeddings": SequenceParallelPositions(),
            "embedding.dropout": ForkedDropout(),
            "decoder.final_norm": SequenceParallelNorm(),
        })
        for layer in layers:
            plan.update({
                f"{layer}.input_norm": SequenceParallelNorm(),
                f"{layer}.pre_mlp_norm": SequenceParallelNorm(),
                f"{layer}.hidden_dropout": ForkedDropout(),
            })
        for norm in ("enorm", "hnorm", "final_norm"):
            plan[f"mtp.layers.*.{norm}"] = SequenceParallelNorm()
    else:
        plan["embedding.position_embeddings"] = Replicate()
    return plan


def _pattern(p: str) -> re.Pattern:
    return re.compile("^" + re.escape(p).replace(r"\*", r"[^.]+") + "$")


def check_tp_config(config: TransformerConfig, tensor: int, sequence_parallel: bool) -> None:
    """Raise ConfigError naming the field, value and fix if ``config`` cannot be split ``tensor`` ways:
    the support table's rules that read only the model and the tensor-parallel settings
    (``megacore.config.support``; a RunConfig runs all of them in ``validate``)."""
    check(Facts(model=config, tensor=tensor, sequence_parallel=sequence_parallel))


# --------------------------------------------------------------------------------------------- apply
def parallelize(model: nn.Module, state: Optional[ParallelState] = None, sequence_parallel: bool = False,
                plan: Optional[dict[str, Style]] = None, grad_sync: str = "hook") -> nn.Module:
    """Apply tensor (and sequence) parallelism over ``state.tp_group`` to ``model`` in place; returns it.

    ``model`` is a GPTModel (any pipeline stage), ideally on the meta device; call
    ``megacore.models.init.materialize(model, config, seed)`` afterwards. ``plan`` defaults to
    ``tp_plan(config, sequence_parallel)``. Dropout in TP-split regions needs the RNG tracker:
    call ``megacore.parallel.model_parallel_seed(seed)`` first (checked when dropout is on).
    Apply it before wrapping the model for data parallelism (DDP / FSDP), which must see the
    local shards.
    """
    state = state or get_state()
    if isinstance(getattr(model, "output_head", None), VocabParallelOutputHead):
        raise ConfigError("this model is already tensor-parallel (parallelize was applied before); build a fresh "
                          "model on the meta device and parallelize it once")
    config: TransformerConfig = model.config
    t = state.tp_size
    check_tp_config(config, t, sequence_parallel)
    if t == 1:
        return model
    if grad_sync not in ("hook", "finalize"):
        raise ValueError(f"grad_sync={grad_sync!r} is not known; use 'hook' or 'finalize'")
    needs_stream = config.attention_dropout > 0 or (sequence_parallel and config.hidden_dropout > 0)
    if needs_stream and TP_STREAM not in get_rng_tracker().names():
        raise ConfigError("dropout in tensor-parallel regions needs the RNG tracker: call "
                          "megacore.parallel.model_parallel_seed(seed) before parallelize()")
    ctx = TPContext(config, state.tp_group, t, state.tp_rank, sequence_parallel, grad_sync, state.ep_size,
                    state.etp_size)
    plan = tp_plan(config, sequence_parallel) if plan is None else plan
    covered: set[str] = set()
    for pattern, style in plan.items():
        regex = _pattern(pattern)
        for name in [n for n, _ in model.named_modules() if n and regex.match(n)]:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            new = style.apply(name, getattr(parent, child), parent, ctx)
            if new is not None:
                setattr(parent, child, new)
            covered.add(name)
    _check_coverage(model, covered)
    model.output_head = VocabParallelOutputHead(config.vocab_size, config.padded_vocab_size, ctx.group, ctx.rank, t,
                                                sequence_parallel)
    model.sequence_parallel_size = t if sequence_parallel else 1
    return model


def parallelize_llava(llava: nn.Module, state: Optional[ParallelState] = None, sequence_parallel: bool = False,
                      grad_sync: str = "hook") -> nn.Module:
    """The TP plan of a LlavaModel whose ``language_model`` was parallelized (``parallelize``) with
    the same ``sequence_parallel`` and ``grad_sync``: the vision tower and projector stay replicated
    on every TP rank. Without SP every rank embeds the whole sequence, so nothing more is needed.
    Under SP each rank holds a chunk of the flattened tokens and inserts only that chunk's image
    embeddings (``llava.local_tokens`` picks it), so the tower's and projector's gradients are
    partial sums: declared for a TP sum."""
    state = state or get_state()
    t = state.tp_size
    if t == 1 or not sequence_parallel:
        return llava
    for part in (llava.vision_tower, llava.projector):
        for module in part.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    mark_tp_grad_sum(module, name, ALL, state.tp_group, grad_sync)
    llava.local_tokens = partial(_sequence_chunk, rank=state.tp_rank, size=t)
    return llava


def _sequence_chunk(flat: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This SP rank's chunk of a flattened per-token tensor (``megacore.parallel.collectives``)."""
    n = flat.numel() // size
    return flat[rank * n:(rank + 1) * n]


def _check_coverage(model: nn.Module, covered: set[str]) -> None:
    """Every linear/embedding must have been given a style: a silently replicated projection would
    compute the wrong thing under TP."""
    missing = [n for n, m in model.named_modules()
               if type(m) in (nn.Linear, nn.Embedding) and n not in covered]
    if missing:
        raise ConfigError(f"modules {missing} have no tensor-parallel style in the plan; add plan entries for them "
                          "(e.g. Colwise/Rowwise, or Replicate if they are meant to be replicated)")
