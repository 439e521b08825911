"""Self-attention: fused grouped QKV projection, optional QK-norm and rotary, a pluggable core.

Fused QKV layout (rows of ``linear_qkv.weight``), grouped by key/value head so that a tensor-
parallel split of whole groups keeps each rank's q, k and v together::

    for g in range(num_query_groups):
        [ q rows of the q_per_group heads of group g ][ k_g: head_dim rows ][ v_g: head_dim rows ]

The forward infers how many groups this module holds from ``linear_qkv.out_features``, so the same
code runs on the full weight and on a TP shard.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from megacore.layers.rng import checkpoint

from megacore.config import TransformerConfig
from megacore.layers.norm import RMSNorm
from megacore.sharding import mark_init
from megacore.layers.rotary import apply_rotary, yarn_mscale


def causal_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, sliding_window=None) -> torch.Tensor:
    """Boolean [..., Sq, Sk] (True = may attend) from the positions of queries [..., Sq] and keys
    [..., Sk]: a key at or before the query, and within the last ``sliding_window`` positions (the
    query's own included) when given. One rule for the full forward, KV-cache decoding (queries
    after the cached keys) and context parallelism (positions of gathered keys)."""
    q, k = q_positions[..., :, None], k_positions[..., None, :]
    mask = k <= q
    if sliding_window is not None:
        mask = mask & (k > q - sliding_window)
    return mask


def build_attention_mask(batch: int, seq: int, device, padding_mask_BS=None, sliding_window=None,
                         full_mask=None) -> torch.Tensor | None:
    """Boolean mask [B, 1, S, S] (True = may attend), or None when plain causal suffices.

    Causal always; ``padding_mask_BS`` (1 = real token) hides padded keys; ``sliding_window`` W keeps
    the last W keys (self included); ``full_mask`` [B, 1, S, S] (e.g. packed-document masks) is
    and-ed in. Every query keeps at least its own position so no softmax row is empty.
    """
    if padding_mask_BS is None and sliding_window is None and full_mask is None:
        return None
    positions = torch.arange(seq, device=device)
    mask = causal_mask(positions, positions, sliding_window)[None, None]
    if padding_mask_BS is not None:
        mask = mask & padding_mask_BS.bool()[:, None, None, :]
    if full_mask is not None:
        mask = mask & full_mask.bool()
    return mask | torch.eye(seq, dtype=torch.bool, device=device)[None, None]


class AttentionMask(nn.Module):
    """The mask of one forward, shared by every attention layer: ``forward(batch, seq, device,
    position_ids, attention_mask)`` -> boolean [B, 1, S, S] or None (plain causal).

    ``attention_mask``: a [B, S] padding mask (1 = real token) or a boolean [B, 1, S, S] mask (True =
    may attend), and-ed with causality and the sliding window. Positions are the local ones: a
    parallel plan that splits the sequence swaps this module (``megacore.parallel.context_parallel``).
    """

    whole_sequence = True  # the queries and keys of a forward are the same, whole, sequence

    def __init__(self, sliding_window=None):
        super().__init__()
        self.sliding_window = sliding_window

    def forward(self, batch: int, seq: int, device, position_ids=None, attention_mask=None):
        padding, full = None, None
        if attention_mask is not None:
            padding, full = (attention_mask, None) if attention_mask.dim() == 2 else (None, attention_mask)
        return build_attention_mask(batch, seq, device, padding, self.sliding_window, full)


def attention_reference(q_BSHD, k_BSGD, v_BSGD, mask, scale, dropout_p=0.0, training=False):
    """Plain softmax(q·kᵀ·scale + mask)·v with K/V heads repeated for GQA; fp32 softmax."""
    groups = q_BSHD.shape[2] // k_BSGD.shape[2]
    q = q_BSHD.transpose(1, 2)
    k = k_BSGD.transpose(1, 2).repeat_interleave(groups, dim=1)
    v = v_BSGD.transpose(1, 2).repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is None:
        s = q.shape[2]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()[None, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0 and training:
        probs = F.dropout(probs, dropout_p)
    return (probs.to(v.dtype) @ v).transpose(1, 2)


def attention_sdpa(q_BSHD, k_BSGD, v_BSGD, mask, scale, dropout_p=0.0, training=False):
    """PyTorch SDPA (flash / cuDNN / efficient kernels on GPU); GQA without repeating K/V."""
    q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSGD, v_BSGD))
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0,
        is_causal=mask is None, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


ATTENTION_BACKENDS = {"reference": attention_reference, "sdpa": attention_sdpa}


def default_softmax_scale(config: TransformerConfig) -> float:
    """The softmax scale of the attention scores: ``attention_softmax_scale`` when set, else 1/√head_dim,
    and under multi-latent attention 1/√(qk_nope_head_dim + qk_rope_head_dim) multiplied, with YaRN
    scaling and a non-zero ``rotary_mscale_all_dim``, by yarn_mscale(factor, mscale_all_dim)² (as
    DeepSeek-V2/V3 compute it; ``megacore.layers.mla``)."""
    if config.attention_softmax_scale:
        return config.attention_softmax_scale
    if not config.multi_latent_attention:
        return 1.0 / math.sqrt(config.head_dim)
    scale = 1.0 / math.sqrt(config.qk_nope_head_dim + config.qk_rope_head_dim)
    if config.rotary_scaling == "yarn" and config.rotary_mscale_all_dim:
        m = yarn_mscale(config.rotary_scaling_factor, config.rotary_mscale_all_dim)
        scale *= m * m
    return scale


class CoreAttention(nn.Module):
    """softmax(QKᵀ·scale)V over local heads. q [B,S,Hq,Dqk], k [B,S,Hkv,Dqk], v [B,S,Hkv,Dv] ->
    [B,S,Hq,Dv]; Dv may differ from Dqk (multi-latent attention), in both backends."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        backend = config.attention_backend
        self.backend = "sdpa" if backend == "auto" else backend
        self.dropout_p = config.attention_dropout
        self.scale = default_softmax_scale(config)
        # Dropout inside a TP-split region must differ across TP ranks; parallelize() swaps this for
        # the RNG tracker's tensor-parallel fork.
        self.rng_context = contextlib.nullcontext
        # Selective recomputation: keep only q, k, v and recompute the attention in backward.
        self.recompute = False

    def _attend(self, q, k, v, mask):
        attend = ATTENTION_BACKENDS[self.backend]
        if not (self.training and self.dropout_p > 0):
            # No random draw: skip the RNG fork (its generator-state swaps cost host time and break
            # torch.compile graphs).
            return attend(q, k, v, mask, self.scale, self.dropout_p, self.training)
        with self.rng_context():
            return attend(q, k, v, mask, self.scale, self.dropout_p, self.training)

    def forward(self, q, k, v, mask=None):
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(self._attend, q, k, v, mask)
        return self._attend(q, k, v, mask)


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig, core_attention_cls=CoreAttention):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.q_per_group = config.num_attention_heads // config.num_kv_heads
        qkv_out = (config.num_attention_heads + 2 * config.num_kv_heads) * self.head_dim
        self.linear_qkv = nn.Linear(config.hidden_size, qkv_out, bias=config.add_qkv_bias)
        self.linear_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                     bias=config.add_bias_linear)
        mark_init(self.linear_qkv.weight, "normal")
        mark_init(self.linear_proj.weight, "scaled_normal")
        for lin in (self.linear_qkv, self.linear_proj):
            if lin.bias is not None:
                mark_init(lin.bias, "zeros")
        self.q_norm = self.k_norm = None
        # qk_norm_scope "projection" (OLMoE): one RMS over all of a token's query (key) channels.
        self.qk_norm_per_head = config.qk_norm_scope == "head"
        if config.qk_norm:
            q_width, k_width = (self.head_dim, self.head_dim) if self.qk_norm_per_head else (
                config.num_attention_heads * self.head_dim, config.num_kv_heads * self.head_dim)
            self.q_norm = RMSNorm(q_width, config.norm_epsilon)
            self.k_norm = RMSNorm(k_width, config.norm_epsilon)
        self.core_attention = core_attention_cls(config)
        self.apply_rotary = apply_rotary  # Triton kernel on CUDA, plain torch elsewhere

    def split_qkv(self, qkv_BSX: torch.Tensor):
        """[B, S, G·(q_per_group+2)·D] -> q [B,S,G·q_per_group,D], k [B,S,G,D], v [B,S,G,D]."""
        b, s, width = qkv_BSX.shape
        per_group = (self.q_per_group + 2) * self.head_dim
        groups = width // per_group
        qkv = qkv_BSX.view(b, s, groups, self.q_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_group].reshape(b, s, groups * self.q_per_group, self.head_dim)
        return q, qkv[:, :, :, self.q_per_group], qkv[:, :, :, self.q_per_group + 1]

    def forward(self, hidden_BSH: torch.Tensor, rotary=None, mask=None, kv_cache=None) -> torch.Tensor:
        q, k, v = self.split_qkv(self.linear_qkv(hidden_BSH))
        if self.q_norm is not None and self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.q_norm is not None:  # heads are in q's (k's) projection order, so flattening them is it
            q, k = self.q_norm(q.flatten(-2)).view_as(q), self.k_norm(k.flatten(-2)).view_as(k)
        if rotary is not None:
            cos, sin = rotary
            q, k = self.apply_rotary(q, cos, sin), self.apply_rotary(k, cos, sin)
        out_BSHD = None
        if kv_cache is not None:  # append the new positions; attend over every cached one
            attend = getattr(kv_cache, "attend", None)  # a cache that attends by itself (paged decode
            if attend is not None:                      # kernel) returns the output, else None
                out_BSHD = attend(q, k, v, self.core_attention.scale)
            if out_BSHD is None:
                k, v = kv_cache.update(k, v)
        if out_BSHD is None:
            out_BSHD = self.core_attention(q, k, v, mask)
        return self.linear_proj(out_BSHD.reshape(*out_BSHD.shape[:2], -1))
