"""Multi-latent attention (DeepSeek-V2/V3): queries through an optional low-rank bottleneck, keys and
values rebuilt per head from one small joint latent, plus a decoupled rotary part shared by all heads.

Shapes: h hidden, H heads, dn ``qk_nope_head_dim``, dr ``qk_rope_head_dim``, dv ``v_head_dim``,
r ``kv_lora_rank``, rq ``q_lora_rank``. Per token x [h]::

    q      = W_uq · norm_q(W_dq · x)                 [H·(dn+dr)]  (q = W_q · x when q_lora_rank is null)
    q_h    = [q_nope_h (dn) | q_rope_h (dr)]         per head, in that order
    c, kr  = split(W_dkv · x, [r, dr])               the latent and the rotary key, shared by the heads
    kv     = W_ukv · norm_kv(c)                      [H·(dn+dv)]
    kv_h   = [k_nope_h (dn) | v_h (dv)]              per head, in that order
    q_h    = [q_nope_h | rope(q_rope_h)],  k_h = [k_nope_h | rope(kr)]
    o_h    = softmax(q_h·k_hᵀ · scale) · v_h         causal
    y      = W_o · [o_1 ... o_H]

``scale`` = 1/√(dn+dr), times yarn_mscale(factor, rotary_mscale_all_dim)² under ``rotary_scaling=yarn``
with a non-zero ``rotary_mscale_all_dim`` (``megacore.layers.attention.default_softmax_scale``); the
rotary tables themselves carry YaRN's cos/sin factor (``megacore.layers.rotary``), of rotary dim dr.

Parameters and their Hugging Face DeepseekV3 (``DeepseekV3Attention``) names; the row layouts are the
same, so the tensors map one to one, except for the rotary rows noted below:

=============================  ==========================  ===========================
megacore                       HF DeepseekV3               shape [out, in]
=============================  ==========================  ===========================
``linear_q_proj``              ``q_proj``                  [H·(dn+dr), h]  (no q_lora_rank)
``linear_q_down_proj``         ``q_a_proj``                [rq, h]
``q_layernorm``                ``q_a_layernorm``           [rq]
``linear_q_up_proj``           ``q_b_proj``                [H·(dn+dr), rq]
``linear_kv_down_proj``        ``kv_a_proj_with_mqa``      [r+dr, h]
``kv_layernorm``               ``kv_a_layernorm``          [r]
``linear_kv_up_proj``          ``kv_b_proj``               [H·(dn+dv), r]
``linear_proj``                ``o_proj``                  [h, H·dv]
=============================  ==========================  ===========================

Rotary layout. megacore rotates halves (x1 = first dr/2 channels, x2 = last dr/2, frequency i on
channels i and dr/2+i). DeepSeek's checkpoints (HF ``rope_interleave=True``, the default) pair
adjacent channels (2i, 2i+1) and emit the rotated result de-interleaved (evens then odds). Both give
the identical rotated vector once the input channels are de-interleaved, so an interleaved checkpoint
maps by permuting the rotary rows: within each head's q rows ``[dn, dn+dr)`` of ``q_b_proj`` /
``q_proj`` and within the rows ``[r, r+dr)`` of ``kv_a_proj_with_mqa``, megacore row j takes HF row
``rope_deinterleave_index(dr)[j]`` (no permutation when ``rope_interleave=False``).

Attention kernels. Queries and keys have dn+dr channels, values dv: both ``CoreAttention`` backends
take different q/k and v head dims (the reference directly; SDPA too: on CPU its math kernel, on an
H200 with torch 2.11 cuDNN attention, 0.57 ms forward+backward for B2·H16·S2048 with dqk=192,
dv=128, where padding v to 192 so that the flash kernel accepts it took 0.80 ms). So v is not padded
by default; ``pad_v_to_qk = True`` pads v with zeros to the q/k head dim and slices the output, for
builds whose only fast kernel needs equal head dims.

Decoding with a KV cache stores, per position, the normed latent norm_kv(c) [r] and the rotated key
rope(kr) [dr] instead of the H·(dn+dv) channels of full keys and values. Plain decode rebuilds k and
v from the cached latents with W_ukv. Absorbed decode (``absorb = True``) never rebuilds them: with
W_uk_h [dn, r] and W_uv_h [dv, r] the head-h blocks of W_ukv, q_nope_h·k_nope_h = (W_uk_hᵀ·q_nope_h)·c,
and Σ p·v_h = W_uv_h·(Σ p·c): the query moves into latent space ([W_uk_hᵀ q_nope_h | rope(q_rope_h)],
r+dr channels), attention runs over the cached [c | rope(kr)] as one shared key head (MQA) with the
same scale, values c, and W_uv_h maps each head's latent output back to dv.

Tensor parallelism (``megacore.parallel.parallelize.tp_plan``). Heads split, latents replicated:
``linear_q_proj`` / ``linear_q_up_proj`` and ``linear_kv_up_proj`` are column-parallel by whole heads
(their rows are per head [q_nope_h; q_rope_h] and [k_nope_h; v_h], contiguous, so an even contiguous
split of the rows is a split of the heads), ``linear_proj`` is row-parallel over the heads' dv
columns. The down-projections ``linear_q_down_proj`` / ``linear_kv_down_proj`` and the norms
``q_layernorm`` / ``kv_layernorm`` are replicated: the latents are small (rq, r+dr a token) and every
rank's heads read all of them. The number of local heads follows from the (sharded) up-projections'
rows. The rotary key kr joins every local head without passing through a split linear, so the plan
sets ``rope_key_to_heads``: without SP ``copy_to_tp`` (forward identity, backward all-reduce of the
per-head-partial gradient; the latents' gradients are all-reduced by the column-parallel
up-projections' own input ``copy_to_tp``), so every replicated parameter's gradient is whole on every
rank. Under sequence parallelism the down-projections and norms run on this rank's token shard (only
the small latents are gathered, by the column-parallel up-projections, and kr by
``rope_key_to_heads`` = ``gather_from_sp``; backward reduce-scatter), so their gradients are partial
sums over the token shards, summed over TP (``SequenceParallelReplicated``). Without ``q_lora_rank``
``linear_q_proj`` gathers the hidden states itself. The KV cache and decoding stay one-device.

Context parallelism (``megacore.parallel.context_parallel``) wraps ``core_attention`` as for
``SelfAttention``: the per-head keys (after rotary) and values built here are all-gathered over the
CP group. Gathering the normed latent and rotated key (r+dr channels a token instead of H·(dn+dr+dv))
and up-projecting after the gather would move less data; the per-head gather is the simpler form.

Recomputation: ``core_attention.recompute`` (``recompute.modules: [core_attn]``) recomputes the
attention alone; ``recompute_up_proj`` (``[mla_up_proj]``) keeps only the low-rank latents and
recomputes norms, up-projections, rotary and attention in backward, so the per-head q, k and v
(H·(2·(dn+dr)+dv) channels a token) are not kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megacore.config import TransformerConfig
from megacore.layers.attention import CoreAttention
from megacore.layers.norm import build_norm
from megacore.layers.rng import checkpoint
from megacore.layers.rotary import apply_rotary
from megacore.sharding import mark_init


def rope_deinterleave_index(rope_dim: int) -> torch.Tensor:
    """[rope_dim] source channel of each half-rotation channel: [0, 2, 4, ..., 1, 3, 5, ...] (the even
    channels of an interleaved-pair layout, then the odd ones)."""
    return torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])


class MultiLatentAttention(nn.Module):
    """Multi-latent attention with ``SelfAttention``'s interface: ``forward(hidden_BSH, rotary, mask,
    kv_cache=None)`` -> [B, S, hidden]; ``rotary`` are (cos, sin) tables of rotary dim qk_rope_head_dim.

    Attributes a caller may set: ``absorb`` (decode with the absorbed up-projections; with a KV cache
    only; ``set_absorbed_decode(model)`` sets it on every layer), ``recompute_up_proj`` (selective recomputation ``mla_up_proj``), ``pad_v_to_qk``.
    The number of heads is read from ``linear_kv_up_proj``'s rows, so a head-split shard runs as is;
    ``rope_key_to_heads`` (set by the tensor-parallel plan, see the module doc) maps the shared rotary
    key [B, S, 1, dr] before it joins the local heads.
    """

    def __init__(self, config: TransformerConfig, core_attention_cls=CoreAttention):
        super().__init__()
        self.config = config
        h, heads = config.hidden_size, config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.qk_head_dim = self.nope_dim + self.rope_dim
        q_out = heads * self.qk_head_dim
        self.linear_q_proj = self.linear_q_down_proj = self.q_layernorm = self.linear_q_up_proj = None
        if config.q_lora_rank is None:
            self.linear_q_proj = nn.Linear(h, q_out, bias=False)
        else:
            self.linear_q_down_proj = nn.Linear(h, config.q_lora_rank, bias=False)
            self.q_layernorm = build_norm(config, config.q_lora_rank)
            self.linear_q_up_proj = nn.Linear(config.q_lora_rank, q_out, bias=False)
        self.linear_kv_down_proj = nn.Linear(h, self.kv_rank + self.rope_dim, bias=False)
        self.kv_layernorm = build_norm(config, self.kv_rank)
        self.linear_kv_up_proj = nn.Linear(self.kv_rank, heads * (self.nope_dim + self.v_dim), bias=False)
        self.linear_proj = nn.Linear(heads * self.v_dim, h, bias=config.add_bias_linear)
        for lin in (self.linear_q_proj, self.linear_q_down_proj, self.linear_q_up_proj, self.linear_kv_down_proj,
                    self.linear_kv_up_proj):
            if lin is not None:
                mark_init(lin.weight, "normal")
        mark_init(self.linear_proj.weight, "scaled_normal")
        if self.linear_proj.bias is not None:
            mark_init(self.linear_proj.bias, "zeros")
        self.core_attention = core_attention_cls(config)
        self.apply_rotary = apply_rotary  # Triton kernel on CUDA, plain torch elsewhere
        self.absorb = False
        self.recompute_up_proj = False
        self.pad_v_to_qk = False
        self.rope_key_to_heads = None

    # ------------------------------------------------------------------------------ pieces
    def _query_input(self, hidden_BSH: torch.Tensor) -> torch.Tensor:
        """What the query up-projection reads: the q latent (before its norm), or x without q_lora_rank."""
        return hidden_BSH if self.linear_q_proj is not None else self.linear_q_down_proj(hidden_BSH)

    def _query(self, q_in: torch.Tensor, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_nope [B,S,H,dn], rope(q_rope) [B,S,H,dr]) from ``_query_input``'s output."""
        if self.linear_q_proj is not None:
            q = self.linear_q_proj(q_in)
        else:
            q = self.linear_q_up_proj(self.q_layernorm(q_in))
        q = q.view(*q.shape[:2], -1, self.qk_head_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, self._rotate(q_rope, rotary)

    def _rotate(self, x_BSHD: torch.Tensor, rotary) -> torch.Tensor:
        if rotary is None:
            return x_BSHD
        cos, sin = rotary
        return self.apply_rotary(x_BSHD, cos, sin)

    def _latents(self, hidden_BSH: torch.Tensor):
        """(c [B,S,r] before its norm, kr [B,S,1,dr] before rotary): the output of W_dkv."""
        c, k_rope = self.linear_kv_down_proj(hidden_BSH).split([self.kv_rank, self.rope_dim], dim=-1)
        return c, k_rope.unsqueeze(2)

    def _expand_kv(self, c_normed: torch.Tensor, k_rope_BS1D: torch.Tensor):
        """Per-head keys [B,T,H,dn+dr] and values [B,T,H,dv] from normed latents and rotated keys."""
        kv = self.linear_kv_up_proj(c_normed)
        kv = kv.view(*kv.shape[:2], -1, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope_BS1D.expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
        return k, v

    def _attend(self, q, k, v, mask):
        dv, dqk = v.shape[-1], q.shape[-1]
        if self.pad_v_to_qk and dv < dqk:
            return self.core_attention(q, k, F.pad(v, (0, dqk - dv)), mask)[..., :dv]
        return self.core_attention(q, k, v, mask)

    def _up_and_attend(self, q_in, c, k_rope, rotary, mask):
        """Everything between the down-projections and the output projection (the region
        ``recompute_up_proj`` recomputes): norms, up-projections, rotary, attention -> [B,S,H,dv]."""
        q_nope, q_rope = self._query(q_in, rotary)
        k, v = self._expand_kv(self.kv_layernorm(c), self._rotate(k_rope, rotary))
        return self._attend(torch.cat([q_nope, q_rope], dim=-1), k, v, mask)

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_uk [H, dn, r], W_uv [H, dv, r]): the per-head key and value blocks of ``linear_kv_up_proj``."""
        w = self.linear_kv_up_proj.weight
        w = w.view(-1, self.nope_dim + self.v_dim, w.shape[-1])
        return w[:, : self.nope_dim], w[:, self.nope_dim:]

    # ------------------------------------------------------------------------------ forward
    def forward(self, hidden_BSH: torch.Tensor, rotary=None, mask=None, kv_cache=None) -> torch.Tensor:
        q_in = self._query_input(hidden_BSH)
        c, k_rope = self._latents(hidden_BSH)
        if self.rope_key_to_heads is not None:
            k_rope = self.rope_key_to_heads(k_rope)
        if kv_cache is not None:
            out_BSHD = self._forward_cached(q_in, c, k_rope, rotary, mask, kv_cache)
        elif self.recompute_up_proj and self.training and torch.is_grad_enabled():
            out_BSHD = checkpoint(self._up_and_attend, q_in, c, k_rope, rotary, mask)
        else:
            out_BSHD = self._up_and_attend(q_in, c, k_rope, rotary, mask)
        return self.linear_proj(out_BSHD.reshape(*out_BSHD.shape[:2], -1))

    def _forward_cached(self, q_in, c, k_rope, rotary, mask, kv_cache):
        """Append the new positions' normed latent and rotated key to the cache; attend over all of them."""
        c_all, k_rope_all = kv_cache.update(self.kv_layernorm(c).unsqueeze(2), self._rotate(k_rope, rotary))
        q_nope, q_rope = self._query(q_in, rotary)
        if not self.absorb:
            k, v = self._expand_kv(c_all.squeeze(2), k_rope_all)
            return self._attend(torch.cat([q_nope, q_rope], dim=-1), k, v, mask)
        w_uk, w_uv = self.up_weights()
        q_latent = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)
        q = torch.cat([q_latent, q_rope], dim=-1)                   # [B, S, H, r+dr]
        k = torch.cat([c_all, k_rope_all], dim=-1)                   # [B, T, 1, r+dr], one shared head
        out_latent = self.core_attention(q, k, c_all, mask)          # [B, S, H, r]
        return torch.einsum("bshr,hvr->bshv", out_latent, w_uv)


def set_absorbed_decode(model: nn.Module, absorb: bool = True) -> int:
    """Make every multi-latent attention module of ``model`` decode with the absorbed up-projections
    (``absorb=True``) or rebuild keys and values from the cached latents (``False``, the default of a
    new module); returns how many modules it set. Only forwards with a KV cache are affected."""
    modules = [m for m in model.modules() if isinstance(m, MultiLatentAttention)]
    for m in modules:
        m.absorb = absorb
    return len(modules)
