"""Per-chunk softmax statistics and logit gradients for the fused linear cross entropy.

A chunk is C token rows of logits over this rank's vocab shard, [C, V_local], of which the first
``n_valid`` columns are real tokens (the rest is vocab padding and gets no probability mass). Two
operations, each in plain torch and in Triton (the Triton ones read the logits once each and write
the gradient in place, so a bf16 chunk never gets an fp32 copy):

``chunk_stats`` -> per row, over the valid local columns, in fp32:
    m      = max_j z_j                    (−3e38 when the shard has no valid column)
    s      = Σ_j exp(z_j − m)
    z_y    = z[label − vocab_start] if the label falls in this shard, else 0
    Σz     = Σ_j z_j                      (only needed for label smoothing)

``chunk_grad`` -> dL/dz for L = lse − (1−ε)·z_y − (ε/K)·Σ_{j<K} z_j, times a per-row scale:
    dz_j = scale · (exp(z_j − lse) − ε/K − (1−ε)·[j = y])   for valid j, 0 for padding columns.
"""

from __future__ import annotations

import torch

from megacore.kernels._dispatch import next_power_of_2, triton_available

NEG_BIG = -3.0e38  # finite "minus infinity": keeps exp(m_local − m_global) at 0 instead of NaN


def _local_labels(labels: torch.Tensor, vocab_start: int, n_valid: int, ignore_index: int):
    local = labels - vocab_start
    in_shard = (labels != ignore_index) & (local >= 0) & (local < n_valid)
    return local, in_shard


def chunk_stats_torch(logits: torch.Tensor, labels: torch.Tensor, n_valid: int, vocab_start: int,
                      ignore_index: int, with_sum: bool) -> torch.Tensor:
    """Stats [4, C] fp32 (m, s, z_y, Σz) of a logits chunk [C, V_local]; Σz is 0 unless ``with_sum``."""
    c = logits.shape[0]
    out = torch.zeros(4, c, device=logits.device, dtype=torch.float32)
    if n_valid == 0:
        out[0].fill_(NEG_BIG)
        return out
    z = logits[:, :n_valid].float()
    out[0] = z.amax(dim=-1)
    out[1] = torch.exp(z - out[0, :, None]).sum(dim=-1)
    local, in_shard = _local_labels(labels, vocab_start, n_valid, ignore_index)
    picked = z.gather(1, local.clamp(0, n_valid - 1)[:, None]).squeeze(1)
    out[2] = torch.where(in_shard, picked, torch.zeros_like(picked))
    if with_sum:
        out[3] = z.sum(dim=-1)
    return out


def chunk_grad_torch(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                     n_valid: int, vocab_start: int, ignore_index: int, smooth_per_class: float,
                     target_weight: float) -> torch.Tensor:
    """dL/dz [C, V_local] in the logits' dtype (a new tensor)."""
    grad = torch.zeros_like(logits)
    if n_valid == 0:
        return grad
    g = torch.exp(logits[:, :n_valid].float() - lse[:, None]) - smooth_per_class
    local, in_shard = _local_labels(labels, vocab_start, n_valid, ignore_index)
    rows = torch.nonzero(in_shard).squeeze(1)
    g[rows, local[rows]] -= target_weight
    grad[:, :n_valid] = (g * scale[:, None]).to(logits.dtype)
    return grad


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _ce_stats_kernel(LOGITS, LABELS, OUT, stride_row, C, n_valid, vocab_start, ignore_index,
                         WITH_SUM: tl.constexpr, BLOCK_V: tl.constexpr):
        # One program per row: online max / rescaled sum-exp over the valid columns only.
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride_row
        m = -3.0e38  # NEG_BIG, written out: a jit kernel reads only constexpr globals
        s = 0.0
        zsum = 0.0
        for v0 in range(0, n_valid, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < n_valid
            z = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            if WITH_SUM:
                zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        label = tl.load(LABELS + row).to(tl.int64)
        local = label - vocab_start
        in_shard = (label != ignore_index) & (local >= 0) & (local < n_valid)
        z_y = tl.load(base + tl.where(in_shard, local, 0), mask=in_shard, other=0.0).to(tl.float32)
        tl.store(OUT + row, m)
        tl.store(OUT + C + row, s)
        tl.store(OUT + 2 * C + row, z_y)
        tl.store(OUT + 3 * C + row, zsum)

    @triton.jit
    def _ce_grad_kernel(LOGITS, LABELS, LSE, SCALE, stride_row, V, n_valid, vocab_start, ignore_index,
                        smooth_per_class, target_weight, BLOCK_V: tl.constexpr):
        # One program per row; overwrites the logits with their gradient (same dtype).
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride_row
        lse = tl.load(LSE + row)
        scale = tl.load(SCALE + row)
        label = tl.load(LABELS + row).to(tl.int64)
        local = label - vocab_start
        in_shard = (label != ignore_index) & (local >= 0) & (local < n_valid)
        local = tl.where(in_shard, local, -1)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - smooth_per_class - tl.where(cols == local, target_weight, 0.0)
            g = tl.where(cols < n_valid, g * scale, 0.0)
            tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


def _block_v(v: int) -> int:
    return max(16, min(4096, next_power_of_2(v)))


def chunk_stats_triton(logits: torch.Tensor, labels: torch.Tensor, n_valid: int, vocab_start: int,
                       ignore_index: int, with_sum: bool) -> torch.Tensor:
    """Triton twin of ``chunk_stats_torch`` (logits must have a contiguous last dim)."""
    c = logits.shape[0]
    out = torch.empty(4, c, device=logits.device, dtype=torch.float32)
    if c:
        _ce_stats_kernel[(c,)](logits, labels.contiguous(), out, logits.stride(0), c, n_valid, vocab_start,
                               ignore_index, WITH_SUM=with_sum, BLOCK_V=_block_v(logits.shape[1]), num_warps=8)
    return out


def chunk_grad_triton_(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                       n_valid: int, vocab_start: int, ignore_index: int, smooth_per_class: float,
                       target_weight: float) -> torch.Tensor:
    """Triton twin of ``chunk_grad_torch`` that overwrites ``logits`` in place and returns it."""
    c, v = logits.shape
    if c:
        _ce_grad_kernel[(c,)](logits, labels.contiguous(), lse.contiguous(), scale.contiguous(), logits.stride(0),
                              v, n_valid, vocab_start, ignore_index, float(smooth_per_class), float(target_weight),
                              BLOCK_V=_block_v(v), num_warps=8)
    return logits
