"""Tensor and sequence parallelism for a GPTModel, applied from a declared plan.

The plan (``tp_plan``) maps module-path patterns (``*`` = one path component) to styles from the
small table below. ``parallelize`` applies it to a model built on the meta device (or a
materialized one, whose values are then sharded), before ``megacore.models.init.materialize``
fills each local shard as the slice of the same full tensor the one-device model would get.

=====================  ==========================================================================
style                  effect
=====================  ==========================================================================
ColwiseQKV             fused grouped QKV, column-parallel: whole KV groups per rank, or (TP > KV
                       groups) each group replicated on t/num_kv ranks with its query heads
                       split among them; the replicated k/v rows' gradients are summed over
                       those ranks (``grad_sync`` kind "replicas")
Colwise / ColwiseGated column-parallel linear; gated fc1 splits gate and up separately so rank r
                       holds [gate_r; up_r]
Rowwise                row-parallel linear (all-reduce, or reduce-scatter of the tokens under SP)
VocabEmbedding         vocab-parallel embedding over config.padded_vocab_size rows
VocabOutput            column-parallel output layer over the padded vocab, logits stay sharded
ReplicatedPartialGrad  replicated params whose gradient is split across TP (QK-norm): TP sum
SequenceParallelNorm   norm running on sequence shards: params replicated, gradients TP-summed
SequenceParallelPositions  learned positions scattered over the tokens like the word embeddings
TPForkedDropout        dropout on sequence shards draws from the tensor-parallel RNG stream
TPRandom               core attention dropout (local heads) draws from the tensor-parallel stream
MambaSplit             a Mamba-2 mixer split by heads and B/C groups (in_proj column-parallel by its
                       five parts, conv and per-head parameters split, out_proj row-parallel)
Replicate              declared replicated, nothing to do (silences the coverage check)
=====================  ==========================================================================

Model edges (set on the instance): ``cross_entropy`` becomes ``vocab_parallel_cross_entropy``;
``output_logits`` enters the TP region (``copy_to_tp``, or ``gather_from_sp`` of the final-norm
output under SP) and multiplies by the local vocab shard (the embedding shard when tied); where
the Triton kernels run (CUDA, eager), the loss head is instead the fused vocab-parallel
``fused_linear_cross_entropy``, which never materializes the logit shard;
``full_logits`` (``model(input_ids)`` without labels) gathers the vocab shards into full
[B, S, vocab_size] logits; ``sequence_parallel_size`` tells the model the residual stream is split.

Gradient sums of TP-split gradients use hooks by default (``grad_sync="hook"``, nothing to call);
``grad_sync="finalize"`` leaves them to ``finalize_grads_tp(model)`` after backward.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megacore.config import ConfigError, TransformerConfig
# Module-object imports: megacore.layers.tensor_parallel and megacore.losses import megacore.parallel,
# which imports this file, so their names are looked up at call time (works whichever loads first).
import megacore.layers.tensor_parallel as TPL
import megacore.losses as losses
from megacore.parallel import collectives as C
from megacore.parallel.grad_sync import ALL, REPLICAS, mark_tp_grad_sum
from megacore.parallel.rng import TP_STREAM, fork, get_rng_tracker
from megacore.parallel.topology import ParallelState, get_state

_SHARD_ATTRS = ("_megacore_global_shape", "_megacore_shard_fn", "_megacore_tp_dim", "_megacore_tp_layout",
                "_megacore_tp_rank", "_megacore_init")


@dataclass
class TPContext:
    config: TransformerConfig
    group: object
    size: int
    rank: int
    sequence_parallel: bool
    grad_sync: str


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Carry requires_grad, other ``_megacore_*`` attributes (e.g. ``_megacore_global_name``) and, if
    ``old`` holds real values, the values (sharded) from ``old``'s params to ``new``'s."""
    for name, p_new in new.named_parameters(recurse=False):
        p_old = getattr(old, name, None)
        if p_old is None:
            continue
        p_new.requires_grad_(p_old.requires_grad)
        if getattr(p_new, "_megacore_init", None) is None and getattr(p_old, "_megacore_init", None):
            p_new._megacore_init = p_old._megacore_init
        for k, v in vars(p_old).items():
            if k.startswith("_megacore") and k not in _SHARD_ATTRS:
                setattr(p_new, k, v)
        if not p_old.is_meta:
            shard_fn = getattr(p_new, "_megacore_shard_fn", None)
            with torch.no_grad():
                p_new.copy_(shard_fn(p_old.detach()) if shard_fn is not None else p_old.detach())
    new.train(old.training)
    return new


def _init_kind(p: Optional[torch.Tensor], default: str) -> str:
    if p is None:
        return default
    return getattr(p, "_megacore_init", None) or default


def _where(ctx: TPContext, like: torch.Tensor) -> dict:
    """Constructor kwargs: the TP group, and the device/dtype of the parameter being replaced (meta
    for a meta-built model)."""
    return dict(tp_group=ctx.group, device=like.device, dtype=like.dtype)


def _expect(module: nn.Module, cls, name: str, style: str) -> None:
    if not isinstance(module, cls):
        raise ConfigError(f"{name} is a {type(module).__name__}, but the plan gives it style {style} which expects "
                          f"{cls.__name__}; change the plan entry for {name!r}")


# ---------------------------------------------------------------------------------------------- styles
class Style:
    """``apply(name, module, parent, ctx)`` returns a replacement module, or None if done in place."""

    def apply(self, name: str, module: nn.Module, parent: nn.Module, ctx: TPContext) -> Optional[nn.Module]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


class Colwise(Style):
    def layout(self, module: nn.Linear, ctx: TPContext, parent: nn.Module, name: str) -> Optional[TPL.TPLayout]:
        return None

    def apply(self, name, module, parent, ctx):
        _expect(module, nn.Linear, name, repr(self))
        w = module.weight
        new = TPL.ColumnParallelLinear(module.in_features, module.out_features, module.bias is not None,
                                       layout=self.layout(module, ctx, parent, name), **_where(ctx, w),
                                       sequence_parallel=ctx.sequence_parallel, init_weight=_init_kind(w, "normal"),
                                       init_bias=_init_kind(module.bias, "zeros"))
        return _adopt(new, module)


class ColwiseGated(Colwise):
    def layout(self, module, ctx, parent, name):
        if module.out_features % 2 != 0:
            raise ConfigError(f"{name}: gated fc1 has an odd number of rows {module.out_features}")
        half = module.out_features // 2
        if half % ctx.size != 0:
            raise ConfigError(f"model.ffn_hidden_size={half} is not divisible by parallel.tensor={ctx.size}; "
                              "choose an ffn size that is a multiple of the tensor-parallel size")
        return TPL.TPLayout.fused(0, [half, half], ctx.size)


class ColwiseParts(Colwise):
    """Column-parallel over rows that concatenate ``parts``, each split evenly: rank r holds
    [part_0 chunk r; part_1 chunk r; ...] (a fused projection whose outputs are used apart)."""

    def __init__(self, parts: list[int]):
        self.parts = parts

    def layout(self, module, ctx, parent, name):
        return TPL.TPLayout.fused(0, self.parts, ctx.size)


class ColwiseQKV(Colwise):
    def layout(self, module, ctx, parent, name):
        cfg = ctx.config
        nq, nkv, hd = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
        if module.out_features != (nq + 2 * nkv) * hd:
            raise ConfigError(f"{name} has {module.out_features} rows, expected (heads {nq} + 2 x kv {nkv}) x head_dim "
                              f"{hd}; a custom attention needs its own plan entry")
        try:
            layout = TPL.TPLayout.grouped_qkv(nq, nkv, hd, ctx.size)
        except ValueError as e:
            raise ConfigError(f"model.num_query_groups={nkv}: {e}") from None
        if ctx.size > nkv:
            parent.q_per_group = (nq // nkv) // (ctx.size // nkv)
        return layout

    def apply(self, name, module, parent, ctx):
        new = super().apply(name, module, parent, ctx)
        if new.layout.replicated:
            for pname in ("weight", "bias"):
                if getattr(new, pname) is not None:
                    p = getattr(new, pname)
                    mark_tp_grad_sum(new, pname, REPLICAS, ctx.group, ctx.grad_sync, p._megacore_tp_layout, ctx.rank)
        return new


class Rowwise(Style):
    def apply(self, name, module, parent, ctx):
        _expect(module, nn.Linear, name, repr(self))
        if module.in_features % ctx.size != 0:
            raise ConfigError(f"{name}: in_features={module.in_features} is not divisible by "
                              f"parallel.tensor={ctx.size}")
        w = module.weight
        new = TPL.RowParallelLinear(module.in_features, module.out_features, module.bias is not None,
                                    sequence_parallel=ctx.sequence_parallel, **_where(ctx, w),
                                    init_weight=_init_kind(w, "scaled_normal"),
                                    init_bias=_init_kind(module.bias, "zeros"))
        return _adopt(new, module)


class VocabEmbedding(Style):
    def apply(self, name, module, parent, ctx):
        _expect(module, nn.Embedding, name, repr(self))
        w = module.weight
        new = TPL.VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, **_where(ctx, w),
                                         sequence_parallel=ctx.sequence_parallel, init=_init_kind(w, "normal"))
        return _adopt(new, module)


class VocabOutput(Style):
    def apply(self, name, module, parent, ctx):
        _expect(module, nn.Linear, name, repr(self))
        w = module.weight
        # Under SP the model's output_logits gathers the sequence itself; the module is a weight holder.
        new = TPL.ColumnParallelLinear(module.in_features, module.out_features, module.bias is not None,
                                       sequence_parallel=ctx.sequence_parallel, **_where(ctx, w),
                                       init_weight=_init_kind(w, "normal"))
        return _adopt(new, module)


class ReplicatedPartialGrad(Style):
    def apply(self, name, module, parent, ctx):
        for pname, _ in list(module.named_parameters(recurse=False)):
            mark_tp_grad_sum(module, pname, ALL, ctx.group, ctx.grad_sync)
        return None


class SequenceParallelNorm(ReplicatedPartialGrad):
    def apply(self, name, module, parent, ctx):
        for _, p in module.named_parameters(recurse=False):
            p._megacore_sequence_parallel = True
        return super().apply(name, module, parent, ctx)


class SequenceParallelPositions(Style):
    def apply(self, name, module, parent, ctx):
        _expect(module, nn.Embedding, name, repr(self))
        w = module.weight
        new = TPL.SequenceParallelPositionEmbedding(module.num_embeddings, module.embedding_dim, **_where(ctx, w),
                                                    init=_init_kind(w, "normal"))
        return _adopt(new, module)


class ForkedDropout(Style):
    def apply(self, name, module, parent, ctx):
        _expect(module, nn.Dropout, name, repr(self))
        new = TPL.TPForkedDropout(module.p, module.inplace)
        new.train(module.training)
        return new


class TPRandom(Style):
    def apply(self, name, module, parent, ctx):
        if not hasattr(module, "rng_context"):
            raise ConfigError(f"{name} ({type(module).__name__}) has no rng_context attribute for TPRandom")
        module.rng_context = partial(fork, TP_STREAM)
        return None


class MambaSplit(Style):
    """A Mamba-2 mixer split by heads: rank r keeps heads r·H/t .. (r+1)·H/t and B/C groups
    r·G/t .. (r+1)·G/t (a group's heads stay with it, so the scan and the group-wise gated norm
    run locally).
    - ``in_proj``: column-parallel, each of its five parts [z | x | B | C | dt] split evenly.
    - ``conv1d``: depthwise over [x | B | C], split the same way.
    - The per-head ``dt_bias``, ``A_log`` and ``D``, and ``norm_weight`` (over z/x channels): split.
    - ``out_proj``: row-parallel, so its output is summed over TP (reduce-scattered under SP).
    Under SP ``in_proj`` first gathers the tokens, so each rank scans whole sequences."""

    def apply(self, name, module, parent, ctx):
        from megacore.layers.mamba import MambaMixer

        _expect(module, MambaMixer, name, repr(self))
        m, t, r = module, ctx.size, ctx.rank  # heads and groups divide by t: check_tp_config checked
        inner, bc, heads = m.inner, m.num_groups * m.state_dim, m.num_heads
        m.in_proj = ColwiseParts([inner, inner, bc, bc, heads]).apply(f"{name}.in_proj", m.in_proj, m, ctx)
        m.out_proj = Rowwise().apply(f"{name}.out_proj", m.out_proj, m, ctx)
        conv_layout = TPL.TPLayout.fused(0, [inner, bc, bc], t)
        local_conv, kernel = conv_layout.local_size, m.conv1d.kernel_size[0]
        old_conv = m.conv1d
        m.conv1d = nn.Conv1d(local_conv, local_conv, kernel, groups=local_conv, padding=kernel - 1, bias=True,
                             device=old_conv.weight.device, dtype=old_conv.weight.dtype)
        for pname in ("weight", "bias"):
            _split_param(m.conv1d, pname, getattr(old_conv, pname), conv_layout, r)
        for pname, size in (("dt_bias", heads), ("A_log", heads), ("D", heads), ("norm_weight", inner)):
            _split_param(m, pname, getattr(m, pname), TPL.TPLayout.contiguous(0, size, t), r)
        m.num_heads, m.num_groups, m.inner, m.conv_dim = heads // t, m.num_groups // t, inner // t, local_conv
        return None


def _split_param(module: nn.Module, pname: str, old: nn.Parameter, layout, rank: int) -> None:
    """Replace ``module.<pname>`` by this rank's shard of ``old`` (values copied unless on meta)."""
    local_shape = list(old.shape)
    local_shape[layout.dim] = layout.local_size
    new = nn.Parameter(torch.empty(local_shape, device=old.device, dtype=old.dtype), requires_grad=old.requires_grad)
    TPL.describe_shard(new, layout, rank, old.shape, getattr(old, "_megacore_init", None))
    if not old.is_meta:
        with torch.no_grad():
            new.copy_(layout.shard(old.detach(), rank))
    setattr(module, pname, new)


class Replicate(Style):
    def apply(self, name, module, parent, ctx):
        module._megacore_tp_replicated = True
        return None


# ------------------------------------------------------------------------------------------------ plan
def tp_plan(config: TransformerConfig, sequence_parallel: bool = False) -> dict[str, Style]:
    """The declared tensor(/sequence)-parallel plan of a GPTModel (patterns that match nothing, e.g.
    ``q_norm`` without QK-norm, are skipped)."""
    layer = "decoder.layers.*"
    plan: dict[str, Style] = {
        "embedding.word_embeddings": VocabEmbedding(),
        f"{layer}.self_attention.linear_qkv": ColwiseQKV(),
        f"{layer}.self_attention.q_norm": ReplicatedPartialGrad(),
        f"{layer}.self_attention.k_norm": ReplicatedPartialGrad(),
        f"{layer}.self_attention.core_attention": TPRandom(),
        f"{layer}.self_attention.linear_proj": Rowwise(),
        f"{layer}.mlp.linear_fc1": ColwiseGated() if config.gated_mlp else Colwise(),
        f"{layer}.mlp.linear_fc2": Rowwise(),
        f"{layer}.mixer": MambaSplit(),  # hybrid stacks' Mamba layers
        "output_layer": VocabOutput(),
    }
    if sequence_parallel:
        plan.update({
            "embedding.position_embeddings": SequenceParallelPositions(),
            "embedding.dropout": ForkedDropout(),
            f"{layer}.input_norm": SequenceParallelNorm(),
            f"{layer}.pre_mlp_norm": SequenceParallelNorm(),
            f"{layer}.hidden_dropout": ForkedDropout(),
            "decoder.final_norm": SequenceParallelNorm(),
        })
    else:
        plan["embedding.position_embeddings"] = Replicate()
    return plan


def _pattern(p: str) -> re.Pattern:
    return re.compile("^" + re.escape(p).replace(r"\*", r"[^.]+") + "$")


def check_tp_config(config: TransformerConfig, tensor: int, sequence_parallel: bool) -> None:
    """Raise ConfigError naming the field, value and fix if ``config`` cannot be split ``tensor`` ways:
    the support table's rules that read only the model and the tensor-parallel settings
    (``megacore.config_support``; a RunConfig runs all of them in ``validate``)."""
    from megacore.config_support import Facts, check

    check(Facts(model=config, tensor=tensor, sequence_parallel=sequence_parallel))


# -------------------------------------------------------------------------------------- model edges
class VocabParallelLoss:
    """``model.cross_entropy`` under TP: (logits shard [B, S, V/t], labels [B, S]) -> loss [B, S]."""

    def __init__(self, group, vocab_start: int, vocab_valid: int):
        self.group, self.vocab_start, self.vocab_valid = group, vocab_start, vocab_valid

    def __call__(self, logits_local_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        return losses.vocab_parallel_cross_entropy(logits_local_BSV, labels_BS, self.group, self.vocab_start,
                                                   self.vocab_valid)


def _tp_output_logits(model, hidden_BSH: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H] (replicated) or [B, S/t, H] (SP) -> this rank's logits [B, S, V_pad/t]."""
    ctx: TPContext = model._megacore_tp
    if ctx.sequence_parallel:
        hidden_BSH = C.gather_from_sp(hidden_BSH, ctx.group)
    else:
        hidden_BSH = C.copy_to_tp(hidden_BSH, ctx.group)
    return F.linear(hidden_BSH, model.output_weight())


def _tp_loss_head_is_fusable(model) -> bool:
    """The fused vocab-parallel loss head (``_tp_fused_loss``) computes the loss parallelize
    installed; the other conditions are ``GPTModel.use_fused_loss``'s (Triton for this tensor,
    matching dtypes, no autocast)."""
    return isinstance(model.cross_entropy, VocabParallelLoss)


def _tp_fused_loss(model, hidden_BSH: torch.Tensor, labels_BS: torch.Tensor, weights_BS, reduction: str):
    """Output GEMM + cross entropy over this rank's vocab shard without materializing the logits
    (``fused_linear_cross_entropy`` with ``tp_group``). Its hidden gradient is a partial sum over
    the vocab shards; the entering collective's backward sums it over TP (``gather_from_sp``'s
    reduce-scatter under SP, ``copy_to_tp``'s all-reduce otherwise)."""
    from megacore.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    from megacore.losses import IGNORE_INDEX

    ctx: TPContext = model._megacore_tp
    if ctx.sequence_parallel:
        hidden_BSH = C.gather_from_sp(hidden_BSH, ctx.group)
    else:
        hidden_BSH = C.copy_to_tp(hidden_BSH, ctx.group)
    loss = model.cross_entropy
    # No label range check: it would synchronize the device every step.
    return fused_linear_cross_entropy(hidden_BSH, model.output_weight(), labels_BS, ignore_index=IGNORE_INDEX,
                                      vocab_valid=loss.vocab_valid, tp_group=ctx.group, vocab_start=loss.vocab_start,
                                      reduction=reduction, token_weights=weights_BS, check_labels=False)


def _tp_full_logits(model, hidden_BSH: torch.Tensor) -> torch.Tensor:
    """Full logits [B, S, vocab_size] on every TP rank (vocab shards gathered, padding dropped)."""
    ctx: TPContext = model._megacore_tp
    logits = C.gather_from_tp_last_dim(model.output_logits(hidden_BSH), ctx.group)
    return logits[..., : ctx.config.vocab_size]


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
    if getattr(model, "_megacore_tp", None) is not None:
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
    ctx = TPContext(config, state.tp_group, t, state.tp_rank, sequence_parallel, grad_sync)
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
    vocab_local = config.padded_vocab_size // t
    model._megacore_tp = ctx
    model.sequence_parallel_size = t if sequence_parallel else 1
    model.cross_entropy = VocabParallelLoss(ctx.group, ctx.rank * vocab_local, config.vocab_size)
    model.output_logits = types.MethodType(_tp_output_logits, model)
    model.full_logits = types.MethodType(_tp_full_logits, model)
    model._loss_head_is_fusable = types.MethodType(_tp_loss_head_is_fusable, model)
    model._fused_loss = types.MethodType(_tp_fused_loss, model)
    return model


def _check_coverage(model: nn.Module, covered: set[str]) -> None:
    """Every linear/embedding must have been given a style: a silently replicated projection would
    compute the wrong thing under TP."""
    missing = [n for n, m in model.named_modules()
               if type(m) in (nn.Linear, nn.Embedding) and n not in covered]
    if missing:
        raise ConfigError(f"modules {missing} have no tensor-parallel style in the plan; add plan entries for them "
                          "(e.g. Colwise/Rowwise, or Replicate if they are meant to be replicated)")
