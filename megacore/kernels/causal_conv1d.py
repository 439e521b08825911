"""Mamba's causal depthwise conv1d + SiLU, forward and backward: Triton kernels + the torch reference.

Over channels-last input x [B, S, C] with a per-channel kernel w [C, K] and bias [C]::

    pre[t, c] = bias[c] + Σ_k w[c, k] · x[t - (K-1) + k, c]       y = silu(pre)

where positions before 0 read ``initial`` [B, C, K-1] (the last K-1 inputs of the positions before
this piece of sequence: a decoding cache or a context-parallel halo; zeros when None). Backward, with
dpre = dy · silu'(pre) (recomputed from x)::

    dx[t]      = Σ_k w[k] · dpre[t + K-1-k]        (t >= 0; t < 0 gives d initial)
    dw[c, k]   = Σ_{b,t} dpre[t, c] · x[t - (K-1) + k, c]        dbias = Σ_{b,t} dpre

The reference is the layer's own ``nn.Conv1d`` math (``F.conv1d`` with left zero padding or the
prepended ``initial``). Math in fp32; y and dx in x's dtype. Packed documents (``seq_idx`` [B, S],
each position's document number): a tap counts only when its source position is in the same
document as the output (forward, dw) and, in dx, the output it feeds is in the source's document;
``causal_conv1d_silu_documents`` is the torch reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megacore.kernels._dispatch import triton_available, use_triton


def causal_conv1d_silu_reference(x_BSC, weight, bias=None, initial=None):
    """silu(causal depthwise conv) in plain torch: x [B, S, C], weight [C, K] (or [C, 1, K]), bias [C]
    or None, initial [B, C, K-1] or None -> [B, S, C] (math in >= fp32)."""
    w = weight.reshape(weight.shape[0], -1)
    kk = w.shape[1]
    acc = torch.promote_types(x_BSC.dtype, torch.float32)
    xt = x_BSC.transpose(1, 2).to(acc)
    before = (initial.to(acc) if initial is not None else xt.new_zeros(xt.shape[0], xt.shape[1], kk - 1))
    out = F.conv1d(torch.cat([before, xt], dim=-1), w[:, None].to(acc), None if bias is None else bias.to(acc),
                   groups=w.shape[0])
    return F.silu(out).transpose(1, 2).to(x_BSC.dtype)


def causal_conv1d_silu_documents(x_BSC, weight, bias, seq_idx):
    """``causal_conv1d_silu_reference`` over packed documents: the tap of position t - j counts only
    when ``seq_idx`` [B, S] is the same there as at t (a document starts with zeros before it, as a
    sequence of its own does). Plain torch, math in >= fp32."""
    w = weight.reshape(weight.shape[0], -1)
    kk, s = w.shape[1], x_BSC.shape[1]
    acc = torch.promote_types(x_BSC.dtype, torch.float32)
    xp = F.pad(x_BSC.to(acc), (0, 0, kk - 1, 0))                       # [B, K-1+S, C]
    docs = F.pad(seq_idx, (kk - 1, 0), value=-1)                         # no document before position 0
    pre = x_BSC.new_zeros(x_BSC.shape, dtype=acc) if bias is None else bias.to(acc).expand(x_BSC.shape).clone()
    for j in range(kk):                                                  # tap j reads position t - (K-1) + j
        same = (docs[:, j:j + s] == seq_idx).to(acc)[..., None]
        pre = pre + w[:, j].to(acc) * xp[:, j:j + s] * same
    return F.silu(pre).to(x_BSC.dtype)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _same_document(SEQ, b, offs_t, other_t, valid, S, HAS_SEQ: tl.constexpr):
        """``valid`` and, with packed documents, other_t in the same document as offs_t."""
        if HAS_SEQ:
            own = tl.load(SEQ + b * S + offs_t, mask=offs_t < S, other=-1)
            theirs = tl.load(SEQ + b * S + other_t, mask=valid, other=-2)
            valid = valid & (own == theirs)
        return valid

    @triton.jit
    def _conv_pre(X, W, BIAS, HALO, SEQ, b, offs_t, offs_c, S, sx_b, sx_s, sh_b, sh_c, sh_k,
                  K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_HALO: tl.constexpr, HAS_SEQ: tl.constexpr,
                  BT: tl.constexpr, BC: tl.constexpr):
        mt, mc = offs_t < S, offs_c[None, :] >= 0
        acc = tl.zeros((BT, BC), tl.float32)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_c).to(tl.float32)[None, :]
        for k in tl.static_range(K):
            src = offs_t - (K - 1) + k
            tap = _same_document(SEQ, b, offs_t, src, (src >= 0) & mt, S, HAS_SEQ)
            v = tl.load(X + b * sx_b + src[:, None] * sx_s + offs_c[None, :], mask=tap[:, None] & mc,
                        other=0.0).to(tl.float32)
            if HAS_HALO:
                v += tl.load(HALO + b * sh_b + offs_c[None, :] * sh_c + (src + K - 1)[:, None] * sh_k,
                             mask=((src < 0) & mt)[:, None] & mc, other=0.0).to(tl.float32)
            acc += tl.load(W + offs_c * K + k).to(tl.float32)[None, :] * v
        return acc

    @triton.jit
    def _conv_fwd_kernel(X, W, BIAS, HALO, SEQ, Y, S, sx_b, sx_s, sh_b, sh_c, sh_k, sy_b, sy_s,
                         K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_HALO: tl.constexpr, HAS_SEQ: tl.constexpr,
                         BT: tl.constexpr, BC: tl.constexpr):
        pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        offs_t = pid_t * BT + tl.arange(0, BT)
        offs_c = pid_c * BC + tl.arange(0, BC)  # the wrapper makes C a multiple of BC
        pre = _conv_pre(X, W, BIAS, HALO, SEQ, b, offs_t, offs_c, S, sx_b, sx_s, sh_b, sh_c, sh_k, K, HAS_BIAS,
                        HAS_HALO, HAS_SEQ, BT, BC)
        y = pre * tl.sigmoid(pre)
        tl.store(Y + b * sy_b + offs_t[:, None] * sy_s + offs_c[None, :], y.to(Y.dtype.element_ty),
                 mask=(offs_t < S)[:, None])

    @triton.jit
    def _conv_bwd_pre_kernel(X, W, BIAS, HALO, SEQ, DY, DPRE, DWP, DBP, S, NT, C, sx_b, sx_s, sh_b, sh_c, sh_k,
                             sd_b, sd_s, K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_HALO: tl.constexpr,
                             HAS_SEQ: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        """dpre for a tile, and the tile's partial sums of dw and dbias."""
        pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        offs_t = pid_t * BT + tl.arange(0, BT)
        offs_c = pid_c * BC + tl.arange(0, BC)
        mt = offs_t < S
        pre = _conv_pre(X, W, BIAS, HALO, SEQ, b, offs_t, offs_c, S, sx_b, sx_s, sh_b, sh_c, sh_k, K, HAS_BIAS,
                        HAS_HALO, HAS_SEQ, BT, BC)
        dy = tl.load(DY + b * sd_b + offs_t[:, None] * sd_s + offs_c[None, :], mask=mt[:, None], other=0.0)
        sg = tl.sigmoid(pre)
        dpre = tl.where(mt[:, None], dy.to(tl.float32) * sg * (1.0 + pre * (1.0 - sg)), 0.0)
        tl.store(DPRE + (b * S + offs_t[:, None]) * C + offs_c[None, :], dpre, mask=mt[:, None])
        tile = b * NT + pid_t
        tl.store(DBP + tile * C + offs_c, tl.sum(dpre, axis=0))
        for k in tl.static_range(K):
            src = offs_t - (K - 1) + k
            tap = _same_document(SEQ, b, offs_t, src, (src >= 0) & mt, S, HAS_SEQ)
            v = tl.load(X + b * sx_b + src[:, None] * sx_s + offs_c[None, :], mask=tap[:, None],
                        other=0.0).to(tl.float32)
            if HAS_HALO:
                v += tl.load(HALO + b * sh_b + offs_c[None, :] * sh_c + (src + K - 1)[:, None] * sh_k,
                             mask=((src < 0) & mt)[:, None], other=0.0).to(tl.float32)
            tl.store(DWP + (tile * C + offs_c) * K + k, tl.sum(dpre * v, axis=0))

    @triton.jit
    def _conv_bwd_dx_kernel(DPRE, W, SEQ, DX, S, C, sdx_b, sdx_s, K: tl.constexpr, HAS_SEQ: tl.constexpr,
                            BT: tl.constexpr, BC: tl.constexpr):
        pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        offs_t = pid_t * BT + tl.arange(0, BT)
        offs_c = pid_c * BC + tl.arange(0, BC)
        acc = tl.zeros((BT, BC), tl.float32)
        for k in tl.static_range(K):
            dst = offs_t + (K - 1) - k
            reach = _same_document(SEQ, b, offs_t, dst, (dst < S) & (offs_t < S), S, HAS_SEQ)
            d = tl.load(DPRE + (b * S + dst[:, None]) * C + offs_c[None, :], mask=reach[:, None], other=0.0)
            acc += tl.load(W + offs_c * K + k).to(tl.float32)[None, :] * d
        tl.store(DX + b * sdx_b + offs_t[:, None] * sdx_s + offs_c[None, :], acc.to(DX.dtype.element_ty),
                 mask=(offs_t < S)[:, None])


_BT = 64


def _bc(c: int) -> int:
    """Largest power-of-two channel block (<= 128) dividing C: no channel masks in the kernels."""
    bc = 128
    while c % bc:
        bc //= 2
    return bc


def _halo_args(initial):
    return (initial, *initial.stride()) if initial is not None else (None, 0, 0, 0)


def _fwd(x, w, bias, initial, seq_idx=None):
    bsz, s, c = x.shape
    kk = w.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(bsz, s, c, dtype=x.dtype, device=x.device)
    bc = _bc(c)
    halo, *hs = _halo_args(initial)
    seq = seq_idx.contiguous() if seq_idx is not None else w
    _conv_fwd_kernel[(triton.cdiv(s, _BT), c // bc, bsz)](
        x, w, bias if bias is not None else w, halo if halo is not None else w, seq, y, s, x.stride(0), x.stride(1),
        *hs, y.stride(0), y.stride(1), K=kk, HAS_BIAS=bias is not None, HAS_HALO=initial is not None,
        HAS_SEQ=seq_idx is not None, BT=_BT, BC=bc, num_warps=4)
    return y


def _bwd(dy, x, w, bias, initial, seq_idx=None):
    bsz, s, c = x.shape
    kk = w.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    dy = dy.contiguous()
    bc = _bc(c)
    nt = triton.cdiv(s, _BT)
    dpre = torch.empty(bsz, s, c, dtype=torch.float32, device=x.device)
    dwp = torch.empty(bsz * nt, c, kk, dtype=torch.float32, device=x.device)
    dbp = torch.empty(bsz * nt, c, dtype=torch.float32, device=x.device)
    halo, *hs = _halo_args(initial)
    grid = (nt, c // bc, bsz)
    seq = seq_idx.contiguous() if seq_idx is not None else w
    _conv_bwd_pre_kernel[grid](
        x, w, bias if bias is not None else w, halo if halo is not None else w, seq, dy, dpre, dwp, dbp, s, nt, c,
        x.stride(0), x.stride(1), *hs, dy.stride(0), dy.stride(1), K=kk, HAS_BIAS=bias is not None,
        HAS_HALO=initial is not None, HAS_SEQ=seq_idx is not None, BT=_BT, BC=bc, num_warps=4)
    dx = torch.empty(bsz, s, c, dtype=x.dtype, device=x.device)
    _conv_bwd_dx_kernel[grid](dpre, w, seq, dx, s, c, dx.stride(0), dx.stride(1), K=kk, HAS_SEQ=seq_idx is not None,
                              BT=_BT, BC=bc, num_warps=4)
    dw = dwp.sum(0).to(w.dtype)
    db = dbp.sum(0).to(bias.dtype) if bias is not None else w.new_zeros(0)
    if initial is None:
        dinit = w.new_zeros(0)
    else:  # positions -(K-1)..-1: the same sum as dx, over the outputs they reach (small: torch)
        dinit = torch.zeros(bsz, c, kk - 1, dtype=torch.float32, device=x.device)
        wf = w.float()
        for j in range(kk - 1):
            for k in range(kk):
                if 0 <= j - k < s:  # input at position j-(K-1) feeds output j-k through tap k
                    dinit[:, :, j] += wf[:, k] * dpre[:, j - k]
        dinit = dinit.to(initial.dtype)
    return dx, dw, db, dinit


@torch.library.custom_op("megacore::causal_conv1d_silu_fwd", mutates_args=())
def _conv_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 initial: Optional[torch.Tensor], seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _fwd(x, weight, bias, initial, seq_idx)


@_conv_fwd_op.register_fake
def _(x, weight, bias, initial, seq_idx=None):
    return x.new_empty(x.shape)


@torch.library.custom_op("megacore::causal_conv1d_silu_bwd", mutates_args=())
def _conv_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 initial: Optional[torch.Tensor], seq_idx: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(dy, x, weight, bias, initial, seq_idx)


@_conv_bwd_op.register_fake
def _(dy, x, weight, bias, initial, seq_idx=None):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0),
            initial.new_empty(initial.shape) if initial is not None else weight.new_empty(0))


def _conv_setup(ctx, inputs, output):
    x, weight, bias, initial, seq_idx = inputs
    ctx.save_for_backward(x, weight, bias, initial, seq_idx)


def _conv_autograd(ctx, dy):
    x, weight, bias, initial, seq_idx = ctx.saved_tensors
    dx, dw, db, dinit = _conv_bwd_op(dy, x, weight, bias, initial, seq_idx)
    return dx, dw, db if bias is not None else None, dinit if initial is not None else None, None


_conv_fwd_op.register_autograd(_conv_autograd, setup_context=_conv_setup)


def causal_conv1d_silu(x_BSC, weight, bias=None, initial=None, force_triton: bool = False, seq_idx=None):
    """silu(causal depthwise conv1d) over channels-last x [B, S, C] (module doc); weight [C, K] or the
    ``nn.Conv1d`` weight [C, 1, K]; Triton where selected (``use_triton(..., under_compile=True)``).
    ``seq_idx`` [B, S]: packed documents (no tap reaches into an earlier one); not with ``initial``."""
    w = weight.reshape(weight.shape[0], -1)
    c = x_BSC.shape[-1]
    if x_BSC.dim() != 3 or w.shape[0] != c or (bias is not None and bias.shape != (c,)):
        raise ValueError(f"causal_conv1d_silu: x {tuple(x_BSC.shape)} must be [B, S, C] with weight [C, K] and "
                         f"bias [C]; got weight {tuple(weight.shape)}")
    if initial is not None and initial.shape != (x_BSC.shape[0], c, w.shape[1] - 1):
        raise ValueError(f"causal_conv1d_silu: initial {tuple(initial.shape)} is not [B, C, K-1] = "
                         f"[{x_BSC.shape[0]}, {c}, {w.shape[1] - 1}]")
    if seq_idx is not None and (initial is not None or seq_idx.shape != x_BSC.shape[:2]):
        raise ValueError(f"causal_conv1d_silu: seq_idx must be [B, S] = {tuple(x_BSC.shape[:2])} and comes without "
                         f"initial (a document starts with zeros before it)")
    if (x_BSC.dtype == torch.float64 or c % 16 or w.shape[1] < 2
            or not use_triton(x_BSC, force_triton, "causal_conv1d_silu", under_compile=True)):
        if seq_idx is not None:
            return causal_conv1d_silu_documents(x_BSC, w, bias, seq_idx)
        return causal_conv1d_silu_reference(x_BSC, w, bias, initial)
    return _conv_fwd_op(x_BSC, w.contiguous(), bias, initial,
                        seq_idx.to(torch.int64).contiguous() if seq_idx is not None else None)
