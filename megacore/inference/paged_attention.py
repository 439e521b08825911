"""Decode attention straight from the paged KV pools: one query per sequence, no gather.

    out_BHD = paged_decode_attention(q_BHD, k_pool, v_pool, table_BN, lengths_B, scale, window=None)

``k_pool`` / ``v_pool`` are a layer's pools ``[num_blocks, block_size, G, D]`` (``KVStore``),
``table`` the sequences' block tables, ``lengths[b]`` the position of row b's query (its own key is
already written there), so row b attends to keys ``0..lengths[b]`` -- or to the last ``window`` of
them. Grouped-query attention: query head h reads key/value head ``h // (H / G)``.

The gather path (``CacheBatch`` reading ``k_pool[table]``) copies every row's whole block table
(``key_len`` positions) per layer and step before SDPA reads it again; this kernel reads only the
blocks a row holds, once: one program per (row, head) walks the row's blocks with an online
softmax (fp32 statistics and accumulator), like FlashAttention's decode. Triton on CUDA (or under
``TRITON_INTERPRET=1`` with ``force_triton``); ``paged_decode_attention_reference`` is the
plain-torch definition it is tested against.
"""

from __future__ import annotations

from typing import Optional

import torch

from megacore.kernels._dispatch import next_power_of_2, triton_available, use_triton


def paged_decode_attention_reference(q_BHD, k_pool, v_pool, table, lengths, scale: float,
                                     window: Optional[int] = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale) v over each row's keys 0..lengths[b] (fp32 math, q's dtype out)."""
    b, h, _ = q_BHD.shape
    g = k_pool.shape[2]
    k = k_pool[table].flatten(1, 2).float()                 # [B, T, G, D]
    v = v_pool[table].flatten(1, 2).float()
    k = k.repeat_interleave(h // g, dim=2)
    v = v.repeat_interleave(h // g, dim=2)
    scores = torch.einsum("bhd,bthd->bht", q_BHD.float(), k) * scale
    pos = torch.arange(k.shape[1], device=q_BHD.device)
    keep = pos[None, :] <= lengths[:, None]
    if window is not None:
        keep = keep & (pos[None, :] > lengths[:, None] - window)
    scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    return torch.einsum("bht,bthd->bhd", torch.softmax(scores, -1), v).to(q_BHD.dtype)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_decode_kernel(Q, K, V, O, TABLE, LENS, scale, window,
                             stride_qb, stride_qh, stride_kn, stride_ks, stride_kg,
                             stride_vn, stride_vs, stride_vg, stride_ob, stride_oh, stride_tb,
                             Q_PER_G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, USE_WINDOW: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        group = head // Q_PER_G
        last = tl.load(LENS + row)                       # the query's position; keys 0..last
        first = 0
        if USE_WINDOW:
            first = tl.maximum(last - window + 1, 0)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        s = tl.arange(0, BS)
        q = tl.load(Q + row * stride_qb + head * stride_qh + d, mask=d < D, other=0.0).to(tl.float32) * scale
        m = tl.max(tl.full([BS], float("-inf"), tl.float32), 0)
        denom = tl.sum(tl.zeros([BS], tl.float32), 0)
        acc = tl.zeros([BLOCK_DV], tl.float32)
        for blk in range(first // BS, last // BS + 1):
            block = tl.load(TABLE + row * stride_tb + blk).to(tl.int64)
            pos = blk * BS + s
            valid = (pos <= last) & (pos >= first)
            k = tl.load(K + block * stride_kn + s[:, None] * stride_ks + group * stride_kg + d[None, :],
                        mask=valid[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
            scores = tl.where(valid, tl.sum(k * q[None, :], 1), float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 0))
            p = tl.exp(scores - m_new)
            alpha = tl.exp(m - m_new)
            v = tl.load(V + block * stride_vn + s[:, None] * stride_vs + group * stride_vg + dv[None, :],
                        mask=valid[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)
            denom = denom * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m = m_new
        out = acc / denom
        tl.store(O + row * stride_ob + head * stride_oh + dv, out.to(O.dtype.element_ty), mask=dv < DV)


def kernel_supports(k_pool: torch.Tensor, block_size: int) -> bool:
    """The kernel's layout: pools [N, bs, G, D] with contiguous heads and a power-of-two block size."""
    return k_pool.dim() == 4 and block_size == next_power_of_2(block_size) and k_pool.stride(-1) == 1


def paged_decode_attention(q_BHD: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                           lengths: torch.Tensor, scale: float, window: Optional[int] = None,
                           force_triton: bool = False) -> torch.Tensor:
    """Attention of each row's one query over its paged keys (see the module docstring); [B, H, Dv]."""
    if not use_triton(q_BHD, force_triton, kernel="paged_decode_attention"):
        return paged_decode_attention_reference(q_BHD, k_pool, v_pool, table, lengths, scale, window)
    b, h, d = q_BHD.shape
    _, bs, g, _ = k_pool.shape
    dv = v_pool.shape[-1]
    q = q_BHD if q_BHD.stride(-1) == 1 else q_BHD.contiguous()
    out = torch.empty(b, h, dv, dtype=q.dtype, device=q.device)
    _paged_decode_kernel[(b, h)](
        q, k_pool, v_pool, out, table, lengths, float(scale), int(window or 0),
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), out.stride(0), out.stride(1), table.stride(0),
        Q_PER_G=h // g, BS=bs, D=d, DV=dv, BLOCK_D=next_power_of_2(d), BLOCK_DV=next_power_of_2(dv),
        USE_WINDOW=window is not None)
    return out
