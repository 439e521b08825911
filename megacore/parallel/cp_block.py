"""One block of ring attention: attention of a query block against one key/value block that also
returns the log-sum-exp of the scores, the merge of such partial results, and the block's share of
the backward given the merged output.

Shapes are [B, H, S, D] (heads before the sequence: what the aten kernels take); keys and values may
have fewer heads (GQA: query head h reads key head h // (H / Hkv)), and values their own head dim
(multi-latent attention). ``lse`` is fp32 [B, H, Sq].

Forward of one block (scores s_ij = scale · q_i·k_j, -inf where masked):

    lse_i = log Σ_j exp(s_ij),        o_i = Σ_j exp(s_ij - lse_i) · v_j

(a row with no visible key: lse = -inf, o = 0).

Merge of the results over two disjoint key sets a and b (``merge``; fp32):

    lse = log(e^lse_a + e^lse_b),     o = e^(lse_a - lse) · o_a + e^(lse_b - lse) · o_b

which is the softmax over the union: merging every key block of a query in any order gives the
attention over all its keys.

Backward. With the merged output O and log-sum-exp L of the whole attention and the output grad dO,
the gradient splits over key blocks (``block_backward``):

    P_ij = exp(s_ij - L_i)            (the final probabilities, restricted to the block)
    D_i = Σ_d dO_id · O_id
    dV_j = Σ_i P_ij dO_i,  dS_ij = P_ij (dO_i·v_j - D_i),
    dQ_i = scale Σ_j dS_ij k_j,  dK_j = scale Σ_i dS_ij q_i

That is what a flash-attention backward kernel computes from (q, k, v, out, lse); called with the
merged O and L in place of the block's own, it returns the block's share of dQ and exactly dK, dV of
the block's keys. So nothing of size Sq x Sk is kept between forward and backward.

Kernels (``fast=True``): on CPU ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ its
backward; additive float mask; equal head dims, so a narrower v is zero-padded); on CUDA
``aten._scaled_dot_product_flash_attention`` without a mask (fp16/bf16) and
``aten._scaled_dot_product_efficient_attention`` with an additive bias otherwise. ``fast=False`` is
the plain-torch reference of the same functions (scores of the block materialized, fp32 or fp64
math), used by the ``reference`` attention backend and by the tests.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

aten = torch.ops.aten

# On CUDA, blocks that need a mask (windows, documents) or run in fp32 go through the memory-efficient
# kernel, forward and backward. Its backward reads the merged output with the token stride of a
# [B, S, H, D]-contiguous tensor, so ``_kernel_backward`` hands it that layout ([B, H, S, D]-contiguous
# gave NaN gradients). False sends those blocks' backward through the plain-torch block math instead
# (slower, more memory: a debugging switch; tests/parallel/test_cp_modes.py checks both on a GPU).
EFFICIENT_BACKWARD = True


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Merge two partial attentions over disjoint key sets (module doc); returns (out, lse) in fp32
    (fp64 stays fp64). out [..., S, D], lse [..., S]."""
    dt = _acc(out_a.dtype)
    lse_a, lse_b = lse_a.to(dt), lse_b.to(dt)
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # both -inf: weights 0, not nan
    w_a, w_b = torch.exp(lse_a - safe).unsqueeze(-1), torch.exp(lse_b - safe).unsqueeze(-1)
    return w_a * out_a.to(dt) + w_b * out_b.to(dt), lse


def block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, lo: Optional[torch.Tensor]) -> torch.Tensor:
    """Boolean [B or 1, 1, Sq, Sk], True = may attend: key position <= query position and >= the query's
    lowest visible position ``lo`` [B, Sq] (document start, sliding window) when given."""
    mask = k_pos[None, None, :] <= q_pos[None, :, None]
    if lo is not None:
        mask = mask & (k_pos[None, None, :] >= lo[:, :, None])
    return mask[:, None]


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sum_groups(g: torch.Tensor, groups: int) -> torch.Tensor:
    return g if groups == 1 else g.unflatten(1, (-1, groups)).sum(2)


# -------------------------------------------------------------------------------------- reference
SCORE_ELEMENTS = 1 << 27  # the reference materializes at most this many scores at once (rows in chunks)


def _row_chunks(q, k):
    rows = max(1, SCORE_ELEMENTS // (q.shape[0] * q.shape[1] * k.shape[-2]))
    return [(r, min(r + rows, q.shape[-2])) for r in range(0, q.shape[-2], rows)]


def _rows_mask(mask, causal, r0, r1, sk, device):
    if causal:
        return (torch.arange(r0, r1, device=device)[:, None] >= torch.arange(sk, device=device)[None, :])[None, None]
    return None if mask is None else mask[..., r0:r1, :]


def _scores(q, k, scale, mask):
    groups = q.shape[1] // k.shape[1]
    dt = _acc(q.dtype)
    qg = q.to(dt).unflatten(1, (k.shape[1], groups))                    # [B, Hkv, g, Sq, D]
    s = (qg @ k.to(dt).unsqueeze(2).transpose(-1, -2)) * scale            # [B, Hkv, g, Sq, Sk]
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
    return s, groups


def _reference_forward(q, k, v, scale, causal, mask):
    outs, lses = [], []
    for r0, r1 in _row_chunks(q, k):
        s, groups = _scores(q[:, :, r0:r1], k, scale, _rows_mask(mask, causal, r0, r1, k.shape[-2], q.device))
        lse = torch.logsumexp(s, dim=-1)
        safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        p = torch.exp(s - safe.unsqueeze(-1))
        outs.append((p @ v.to(p.dtype).unsqueeze(2)).flatten(1, 2))
        lses.append(lse.flatten(1, 2))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _reference_backward(dout, q, k, v, out, lse, scale, causal, mask):
    dt = _acc(q.dtype)
    hkv = k.shape[1]
    dq = torch.empty(q.shape, dtype=dt, device=q.device)
    dk, dv = torch.zeros(k.shape, dtype=dt, device=q.device), torch.zeros(v.shape, dtype=dt, device=q.device)
    for r0, r1 in _row_chunks(q, k):
        rows = slice(r0, r1)
        s, groups = _scores(q[:, :, rows], k, scale, _rows_mask(mask, causal, r0, r1, k.shape[-2], q.device))
        p = torch.exp(s - lse[:, :, rows].to(dt).unflatten(1, (hkv, groups)).unsqueeze(-1))  # masked: 0
        do = dout[:, :, rows].to(dt).unflatten(1, (hkv, groups))
        o = out[:, :, rows].to(dt).unflatten(1, (hkv, groups))
        dv += (p.transpose(-1, -2) @ do).sum(2)
        dp = do @ v.to(dt).unsqueeze(2).transpose(-1, -2)
        ds = p * (dp - (do * o).sum(-1, keepdim=True))
        dq[:, :, rows] = ((ds @ k.to(dt).unsqueeze(2)) * scale).flatten(1, 2)
        dk += (ds.transpose(-1, -2) @ q[:, :, rows].to(dt).unflatten(1, (hkv, groups))).sum(2) * scale
    return dq, dk, dv


# ---------------------------------------------------------------------------------------- kernels
def _bias(mask: torch.Tensor, dtype, heads: int = 1, align: int = 1) -> torch.Tensor:
    """Additive bias (0 / -inf) [B, heads, Sq, Sk] from a boolean mask [B, 1, Sq, Sk]: one copy broadcast
    over the heads; the rows' storage padded to ``align`` elements (the CUDA memory-efficient kernel
    wants aligned rows)."""
    sk = mask.shape[-1]
    bias = torch.zeros(*mask.shape[:-1], sk + (-sk) % align, dtype=dtype, device=mask.device)[..., :sk]
    bias.masked_fill_(~mask, float("-inf"))
    return bias.expand(mask.shape[0], heads, *mask.shape[2:])


def _cuda_flash(q, causal, mask) -> bool:
    return mask is None and q.dtype in (torch.float16, torch.bfloat16)


def _kernel_forward(q, k, v, scale, causal, mask):
    if q.device.type == "cpu":
        bias = None if mask is None else _bias(mask, q.dtype)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse
    if _cuda_flash(q, causal, mask):
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse
    bias = None if mask is None else _bias(mask, q.dtype, q.shape[1], 16)
    out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., : q.shape[-2]]


def _kernel_backward(dout, q, k, v, out, lse, scale, causal, mask):
    if q.device.type == "cpu":
        bias = None if mask is None else _bias(mask, q.dtype)
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale)
    sq, sk = q.shape[-2], k.shape[-2]
    # No dropout: the random-number state is not read; None = not variable-length (dense batches).
    empty = torch.empty(0, dtype=torch.int64, device=q.device)
    if _cuda_flash(q, causal, mask):
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, sq, sk, 0.0, causal, empty, empty, scale=scale)
    bias = None if mask is None else _bias(mask, q.dtype, q.shape[1], 16)
    lse = F.pad(lse, (0, (-sq) % 32))  # the kernel's log-sum-exp rows are padded to 32
    # The kernel reads ``out`` with the token stride of a [B, S, H, D]-contiguous tensor (the layout its
    # forward returns; it takes only the batch and head strides), so give it that layout.
    out = out.transpose(1, 2).contiguous().transpose(1, 2)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, bias, out, lse, empty, empty, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------ entry
def block_forward(q, k, v, scale: float, causal: bool = False, mask: Optional[torch.Tensor] = None,
                  fast: bool = True):
    """(out [B, H, Sq, Dv] in q's dtype, lse [B, H, Sq] fp32) of q against one key block. ``causal``:
    key j visible to query i iff j <= i (square blocks); ``mask`` boolean [B or 1, 1, Sq, Sk]."""
    if not fast:
        out, lse = _reference_forward(q, k, v, scale, causal, mask)
        return out.to(q.dtype), lse.to(_acc(lse.dtype))
    groups = q.shape[1] // k.shape[1]
    dv = v.shape[-1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    if dv != q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    out, lse = _kernel_forward(q, k, v, scale, causal, mask)
    out, lse = out[..., :dv], lse.float()
    if mask is not None:  # a row that sees no key of this block contributes nothing to the merge
        seen = mask.any(-1)
        lse = lse.masked_fill(~seen, float("-inf"))
        out = out.masked_fill(~seen.unsqueeze(-1), 0.0)
    return out, lse


def block_backward(dout, q, k, v, out, lse, scale: float, causal: bool = False, mask: Optional[torch.Tensor] = None,
                   fast: bool = True):
    """(dq, dk, dv) of one block given the MERGED output ``out`` and ``lse`` of the whole attention
    (module doc); dk, dv have k's and v's heads. Returned in fp32 for the reference, else q's dtype."""
    if not fast or (q.device.type == "cuda" and not _cuda_flash(q, causal, mask) and not EFFICIENT_BACKWARD):
        return _reference_backward(dout, q, k, v, out, lse, scale, causal, mask)
    groups = q.shape[1] // k.shape[1]
    d, dv = q.shape[-1], v.shape[-1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    if dv != d:
        v, out, dout = (F.pad(t, (0, d - dv)) for t in (v, out, dout))
    if q.device.type == "cpu":
        out = out.contiguous()
    dq, dk, dvv = _kernel_backward(dout.contiguous(), q, k, v, out, lse.contiguous(), scale, causal, mask)
    return dq, _sum_groups(dk, groups), _sum_groups(dvv[..., :dv], groups)
