"""The styles of the tensor(/sequence)-parallel plan (``megacore.parallel.parallelize.tp_plan``):
each one way of splitting (or keeping) a module over the tensor-parallel ranks.

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
MoERouted              an MoE layer's router and routed experts, replicated over TP; under SP the
                       layer routes the gathered micro-batch and their gradients are TP-summed
                       (``megacore.parallel.moe_parallel``); a dense MLP at that path is left alone
SequenceParallelReplicated  a replicated module running on sequence shards (the shared-expert gate)
Replicate              declared replicated, nothing to do (silences the coverage check)
MLASharedKey           a multi-latent attention's shared rotary key entering its local heads:
                       ``copy_to_tp`` (all-reduce of its gradient), or under SP gathered over the
                       tokens like the latents (``megacore.layers.mla``); other attentions: nothing
=====================  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from torch import nn

from megacore.config import ConfigError, TransformerConfig
import megacore.parallel.tensor_parallel as TPL
from megacore.parallel import collectives as C
from megacore.layers.mamba import MambaMixer
from megacore.layers.mla import MultiLatentAttention
from megacore.layers.moe import MoELayer
from megacore.parallel.grad_sync import ALL, REPLICAS, mark_tp_grad_sum
from megacore.parallel.moe_parallel import moe_sequence_parallel
from megacore.parallel.rng import TP_STREAM, fork
from megacore.sharding import param_meta, peek_meta


@dataclass
class TPContext:
    config: TransformerConfig
    group: object
    size: int
    rank: int
    sequence_parallel: bool
    grad_sync: str
    expert: int = 1  # the expert-parallel size (its own plan runs after this one)
    expert_tensor: int = 1  # the expert-tensor-parallel size (1, or the TP size)


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Carry requires_grad, what ``old``'s params declare about themselves beyond their shape (init
    kind, global name, duplicate flag: ``ParamMeta.local_copy``) and, if ``old`` holds real values,
    the values (sharded) from ``old``'s params to ``new``'s."""
    for name, p_new in new.named_parameters(recurse=False):
        p_old = getattr(old, name, None)
        if p_old is None:
            continue
        p_new.requires_grad_(p_old.requires_grad)
        kept, meta = peek_meta(p_old).local_copy(), param_meta(p_new)
        meta.init = meta.init or kept.init
        meta.global_name, meta.shared_duplicate = kept.global_name, kept.shared_duplicate
        if not p_old.is_meta:
            with torch.no_grad():
                p_new.copy_(meta.shard(p_old.detach()))
    new.train(old.training)
    return new


def _init_kind(p: Optional[torch.Tensor], default: str) -> str:
    if p is None:
        return default
    return peek_meta(p).init or default


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
            field = "moe_shared_expert_hidden_size" if ".shared_expert." in name else "ffn_hidden_size"
            raise ConfigError(f"model.{field}={half} is not divisible by parallel.tensor={ctx.size}; "
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
                    mark_tp_grad_sum(new, pname, REPLICAS, ctx.group, ctx.grad_sync, peek_meta(p).tp_layout, ctx.rank)
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
            param_meta(p).sequence_parallel = True
        return super().apply(name, module, parent, ctx)


class SequenceParallelReplicated(SequenceParallelNorm):
    """Any replicated module that runs on sequence shards (the MoE shared-expert gate)."""


class MoERouted(Style):
    """The router and routed experts of an MoE layer (expert-tensor-parallel size 1): replicated
    over TP. Without SP every TP rank routes the same tokens and runs the whole layer: nothing to
    do but report ``1/t`` of the balance loss. With expert tensor parallelism (the experts split
    over TP by ``apply_expert_tensor_parallel``) the experts run the TP group's tokens, gathered
    under SP, and routing stays replicated. Under SP the layer routes the micro-batch gathered
    over TP and runs its own tokens through the experts (``megacore.parallel.moe_parallel``), so the
    router's gradient, and the experts' when expert parallelism does not split them (their
    expert-data-parallel reduction spans TP otherwise), are sequence-parallel partial sums."""

    def apply(self, name, module, parent, ctx):
        if not isinstance(module, MoELayer):
            return None  # a dense MLP: its linears have plan entries of their own
        module.aux_log_share /= ctx.size
        if ctx.sequence_parallel:
            split = ctx.expert_tensor > 1  # the experts run the TP group's tokens: routing is replicated
            moe_sequence_parallel(module, ctx.group, ctx.size, experts_split=split)
            partial_sums = [] if split else [(module.router, "weight")]
            if ctx.expert == 1 and not split:
                partial_sums += [(module.experts, "linear_fc1"), (module.experts, "linear_fc2")]
            for owner, pname in partial_sums:
                param_meta(getattr(owner, pname)).sequence_parallel = True
                mark_tp_grad_sum(owner, pname, ALL, ctx.group, ctx.grad_sync)
        return None


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
    TPL.describe_shard(new, layout, rank, old.shape, peek_meta(old).init)
    if not old.is_meta:
        with torch.no_grad():
            new.copy_(layout.shard(old.detach(), rank))
    setattr(module, pname, new)


class MLASharedKey(Style):
    """On a ``MultiLatentAttention``: set ``rope_key_to_heads`` (see the plan's doc); a
    ``SelfAttention`` at the same path is left alone."""

    def apply(self, name, module, parent, ctx):
        if not isinstance(module, MultiLatentAttention):
            return None
        if ctx.sequence_parallel:
            module.rope_key_to_heads = partial(C.gather_from_sp, group=ctx.group)
        else:
            module.rope_key_to_heads = partial(C.copy_to_tp, group=ctx.group)
        return None


class Replicate(Style):
    def apply(self, name, module, parent, ctx):
        return None


# ------------------------------------------------------------------------------------------------ plan
