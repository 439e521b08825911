"""Fused residual add + RMSNorm: a Triton kernel beside its plain-torch reference.

Math, per row of the last dim (N = hidden size), with statistics in fp32:

    h     = x + residual                (rounded to residual's dtype: this is the new residual stream)
    rstd  = 1 / sqrt(mean(h²) + eps)
    gamma = weight            (or 1 + weight when zero_centered_gamma)
    y     = h · rstd · gamma    (rounded once to x's dtype)

Backward, with ĥ = h·rstd and g = the gradient flowing into ``new_residual`` (0 if unused):

    dh      = rstd · (gamma·dy − ĥ · mean(gamma·dy·ĥ)) + g
    dx      = dresidual = dh
    dweight = Σ_rows dy · ĥ        (per-program partial sums, reduced in torch)

Without a residual, h = x and ``new_residual`` is x itself. Shapes: x, residual [..., N];
weight [N]; y like x; new_residual like residual (so an fp32 residual stream stays fp32).
"""

from __future__ import annotations

from typing import Optional

import torch

from megacore.kernels._dispatch import next_power_of_2, num_programs_hint, triton_available, use_triton

_MAX_FUSED_N = 65536  # one row must fit in one program's registers; wider rows use the reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None,
                       zero_centered_gamma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch fused residual add + RMSNorm; returns (y, new_residual). Computes in ≥fp32."""
    if residual is not None:
        acc = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), torch.float32)
        h = (x.to(acc) + residual.to(acc)).to(residual.dtype)
    else:
        h = x
    acc = torch.promote_types(h.dtype, torch.float32)
    h_acc = h.to(acc)
    rstd = torch.rsqrt(h_acc.pow(2).mean(-1, keepdim=True) + eps)
    gamma = weight.to(acc) + 1 if zero_centered_gamma else weight.to(acc)
    return (h_acc * rstd * gamma).to(x.dtype), h


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_fwd_kernel(X, R, W, Y, H, RSTD, stride_x, stride_r, stride_y, stride_h, N, eps,
                            HAS_RESIDUAL: tl.constexpr, ZERO_CENTERED: tl.constexpr, BLOCK_N: tl.constexpr):
        # One program per row; the whole row sits in registers (BLOCK_N >= N).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            h_store = (h + r).to(H.dtype.element_ty)
            tl.store(H + row * stride_h + cols, h_store, mask=mask)
            h = h_store.to(tl.float32)  # normalize exactly what the residual stream holds
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
        tl.store(RSTD + row, rstd)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w = w + 1.0
        tl.store(Y + row * stride_y + cols, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rmsnorm_bwd_kernel(DY, DH_EXTRA, H, W, RSTD, DX, DR, DW_PARTIAL, stride_dy, stride_dhe, stride_h,
                            stride_dx, stride_dr, M, N, rows_per_program,
                            HAS_DH_EXTRA: tl.constexpr, STORE_DR: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        # Each program walks a contiguous range of rows and keeps its dweight partial sum in fp32.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w = w + 1.0
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        row_start = pid.to(tl.int64) * rows_per_program  # int64 bounds: the loop index is int64 too
        row_end = tl.minimum(row_start + rows_per_program, M)
        for row in range(row_start, row_end):
            h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            h_hat = h * rstd
            wdy = w * dy
            c = tl.sum(h_hat * wdy, axis=0) / N
            dh = (wdy - h_hat * c) * rstd
            if HAS_DH_EXTRA:
                dh += tl.load(DH_EXTRA + row * stride_dhe + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=mask)
            if STORE_DR:
                tl.store(DR + row * stride_dr + cols, dh.to(DR.dtype.element_ty), mask=mask)
            dw_acc += dy * h_hat
        tl.store(DW_PARTIAL + pid * N + cols, dw_acc, mask=mask)


def _num_warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


def _rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], eps: float,
                     zero_centered: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: (y like x, new_residual like residual (empty without one), rstd [M] fp32)."""
    n = x.shape[-1]
    x2 = x.contiguous().view(-1, n)
    m = x2.shape[0]
    block_n = next_power_of_2(n)
    y = torch.empty_like(x2)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    if residual is not None:
        r2 = residual.contiguous().view(-1, n)
        h = torch.empty_like(r2)
    else:
        r2, h = x2, x2  # R and H are unused when HAS_RESIDUAL is off
    if m > 0:
        _rmsnorm_fwd_kernel[(m,)](x2, r2, weight, y, h, rstd, x2.stride(0), r2.stride(0), y.stride(0),
                                  h.stride(0), n, eps, HAS_RESIDUAL=residual is not None,
                                  ZERO_CENTERED=zero_centered, BLOCK_N=block_n, num_warps=_num_warps(block_n))
    new_residual = h.view(residual.shape) if residual is not None else x.new_empty(0)
    return y.view(x.shape), new_residual, rstd


def _rmsnorm_backward(dy: torch.Tensor, dh_extra: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor, zero_centered: bool, x_dtype: torch.dtype,
                      residual_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: (dx, dweight, dresidual); dresidual is empty unless its dtype differs from x's."""
    n = h.shape[-1]
    h2 = h.contiguous().view(-1, n)
    m = h2.shape[0]
    dy2 = dy.contiguous().view(-1, n)
    dhe = dh_extra.contiguous().view(-1, n) if dh_extra is not None else None
    dx = torch.empty(m, n, device=h.device, dtype=x_dtype)
    store_dr = residual_dtype is not None and residual_dtype != x_dtype
    dr = torch.empty(m, n, device=h.device, dtype=residual_dtype) if store_dr else dx
    n_prog = max(1, min(m, 2 * num_programs_hint(h.device)))
    rows_per_program = -(-m // n_prog) if m else 0
    dw_partial = torch.zeros(n_prog, n, device=h.device, dtype=torch.float32)
    block_n = next_power_of_2(n)
    if m > 0:
        dhe_arg = dhe if dhe is not None else dy2
        _rmsnorm_bwd_kernel[(n_prog,)](dy2, dhe_arg, h2, weight, rstd, dx, dr, dw_partial, dy2.stride(0),
                                       dhe_arg.stride(0), h2.stride(0), dx.stride(0), dr.stride(0), m, n,
                                       rows_per_program, HAS_DH_EXTRA=dhe is not None, STORE_DR=store_dr,
                                       ZERO_CENTERED=zero_centered, BLOCK_N=block_n, num_warps=_num_warps(block_n))
    dweight = dw_partial.sum(0).to(weight.dtype)
    dr_out = dr.view(dy.shape) if store_dr else dx.new_empty(0)
    return dx.view(dy.shape), dweight, dr_out


# Custom ops (opaque to torch.compile: no graph break, the kernel runs as is inside compiled graphs).
@torch.library.custom_op("megacore::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], eps: float,
                     zero_centered: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rmsnorm_forward(x, weight, residual, eps, zero_centered)


@_rms_norm_fwd_op.register_fake
def _(x, weight, residual, eps, zero_centered):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    # Contiguous, like the real outputs (a fake must match their strides, not just their shapes).
    new_residual = residual.new_empty(residual.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), new_residual, x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("megacore::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, dh_extra: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                     rstd: torch.Tensor, zero_centered: bool, x_dtype: torch.dtype,
                     residual_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rmsnorm_backward(dy, dh_extra, h, weight, rstd, zero_centered, x_dtype, residual_dtype)


@_rms_norm_bwd_op.register_fake
def _(dy, dh_extra, h, weight, rstd, zero_centered, x_dtype, residual_dtype):
    store_dr = residual_dtype is not None and residual_dtype != x_dtype
    dr = dy.new_empty(dy.shape, dtype=residual_dtype) if store_dr else dy.new_empty(0)
    return dy.new_empty(dy.shape, dtype=x_dtype), weight.new_empty(weight.shape), dr


def _rms_norm_setup(ctx, inputs, output):
    x, weight, residual, _eps, zero_centered = inputs
    _y, new_residual, rstd = output
    h = new_residual if residual is not None else x  # the normalized tensor
    ctx.save_for_backward(h, weight, rstd)
    ctx.has_residual = residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.zero_centered, ctx.x_dtype = zero_centered, x.dtype


def _rms_norm_autograd(ctx, dy, dnew_residual, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dh_extra = dnew_residual if ctx.has_residual else None
    dx, dweight, dr = _rms_norm_bwd_op(dy, dh_extra, h, weight, rstd, ctx.zero_centered, ctx.x_dtype,
                                       ctx.residual_dtype)
    dresidual = None
    if ctx.has_residual:
        dresidual = dr if ctx.residual_dtype != ctx.x_dtype else dx
    return dx, dweight, dresidual, None, None


_rms_norm_fwd_op.register_autograd(_rms_norm_autograd, setup_context=_rms_norm_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: Optional[torch.Tensor] = None,
             zero_centered_gamma: bool = False, force_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``new_residual = x + residual`` then RMSNorm; returns ``(y, new_residual)``.

    x, residual: [..., N] (bf16/fp16/fp32); weight: [N]. Runs the Triton kernel on CUDA (or under
    ``TRITON_INTERPRET=1`` with ``force_triton=True``), else ``rms_norm_reference``; fp64 inputs and
    rows wider than 65536 always use the reference. Without a residual, ``new_residual`` is ``x``.
    """
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)} but x's last dim is {n}; "
                         f"pass a 1-D weight of size {n}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}; "
                         f"pass a residual of the same shape as x")
    triton_ok = x.dtype != torch.float64 and (residual is None or residual.dtype != torch.float64) and n <= _MAX_FUSED_N
    if not (triton_ok and use_triton(x, force_triton, "rms_norm")):
        return rms_norm_reference(x, weight, eps, residual, zero_centered_gamma)
    y, new_residual, _ = _rms_norm_fwd_op(x, weight, residual, float(eps), bool(zero_centered_gamma))
    return y, (new_residual if residual is not None else x)
