"""Rotary position embedding (half-rotation, GPT-NeoX / HF Llama layout): Triton kernel + reference.

For each head vector x of size D, with r = rotary_dim (even, ≤ D) and halves of the rotated part
x1 = x[:r/2], x2 = x[r/2:r], and cos/sin rows c = [c1 ; c2], s = [s1 ; s2] of size r:

    y1 = x1·c1 − x2·s1
    y2 = x2·c2 + x1·s2          (y = x·c + rotate_half(x)·s, rotate_half(x) = [−x2 ; x1])
    y[r:] = x[r:]               (partial rotary: the rest passes through)

The backward is the transpose of that linear map:

    dx1 = dy1·c1 + dy2·s2
    dx2 = dy2·c2 − dy1·s1       (with the usual c1 = c2, s1 = s2: the rotation by −angle)

Shapes: x [B, S, H, D]; cos/sin [S, r] (shared by the batch), [B, S, r] (per sample), or a table
[P, r] indexed by ``position_ids`` [B, S] (packed sequences). cos/sin get no gradient. Math in fp32,
output in x's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from megacore.kernels._dispatch import next_power_of_2, triton_available, use_triton


def _gather_cos_sin(x_BSHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    position_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcastable [B|1, S, 1, r] cos/sin for the reference."""
    if position_ids is not None:
        return cos[position_ids][:, :, None, :], sin[position_ids][:, :, None, :]
    if cos.dim() == 2:
        return cos[None, :, None, :], sin[None, :, None, :]
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rotary_reference(x_BSHD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor,
                           rotary_dim: Optional[int] = None,
                           position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-torch half rotation of the first ``rotary_dim`` channels of every head (math in ≥fp32)."""
    r = _check(x_BSHD, cos_SD, sin_SD, rotary_dim, position_ids)
    acc = torch.promote_types(x_BSHD.dtype, torch.float32)
    cos, sin = _gather_cos_sin(x_BSHD, cos_SD.to(acc), sin_SD.to(acc), position_ids)
    x = x_BSHD.to(acc)
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    out = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([out, x_pass], dim=-1).to(x_BSHD.dtype)


def _check(x, cos, sin, rotary_dim, position_ids) -> int:
    if x.dim() != 4:
        raise ValueError(f"apply_rotary: x must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
    b, s, _, d = x.shape
    r = cos.shape[-1] if rotary_dim is None else rotary_dim
    if r % 2 or r <= 0 or r > d:
        raise ValueError(f"apply_rotary: rotary_dim={r} must be even and in [2, head_dim={d}]")
    if cos.shape != sin.shape or cos.shape[-1] != r:
        raise ValueError(f"apply_rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must match and end in "
                         f"rotary_dim={r}; slice the tables to [..., :{r}] built for rotary_dim={r}")
    if position_ids is not None:
        if cos.dim() != 2 or tuple(position_ids.shape) != (b, s):
            raise ValueError(f"apply_rotary: with position_ids {tuple(position_ids.shape)} pass cos/sin tables "
                             f"[max_positions, {r}] and position_ids [batch={b}, seq={s}]")
    elif cos.dim() == 2 and cos.shape[0] != s:
        raise ValueError(f"apply_rotary: cos has {cos.shape[0]} rows but seq={s}; slice the table to the sequence "
                         f"length or pass position_ids")
    elif cos.dim() == 3 and tuple(cos.shape[:2]) != (b, s):
        raise ValueError(f"apply_rotary: per-sample cos {tuple(cos.shape)} must be [batch={b}, seq={s}, {r}]")
    elif cos.dim() not in (2, 3):
        raise ValueError(f"apply_rotary: cos/sin must be [S, r] or [B, S, r], got {tuple(cos.shape)}")
    return r


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(X, COS, SIN, POS, Y, S, H, stride_xb, stride_xs, stride_xh, stride_yb, stride_ys, stride_yh,
                     stride_cos_row, HALF: tl.constexpr, PASS: tl.constexpr, COS_MODE: tl.constexpr,
                     BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     BLOCK_PASS: tl.constexpr):
        # One program per (token, block of heads). COS_MODE: 0 = [S, r] rows by position in the
        # sequence, 1 = [B, S, r] rows by token, 2 = table rows gathered through POS [B, S].
        tok = tl.program_id(0).to(tl.int64)
        b = tok // S
        s = tok % S
        if COS_MODE == 0:
            cos_row = s
        elif COS_MODE == 1:
            cos_row = tok
        else:
            cos_row = tl.load(POS + tok).to(tl.int64)
        d = tl.arange(0, BLOCK_HALF)
        dmask = d < HALF
        c1 = tl.load(COS + cos_row * stride_cos_row + d, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + cos_row * stride_cos_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + cos_row * stride_cos_row + d, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + cos_row * stride_cos_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)
        if BACKWARD:
            # The transpose: the same formulas with (s1, s2) -> (−s2, −s1).
            s1, s2 = -s2, -s1
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = h < H
        x_base = X + b * stride_xb + s * stride_xs + h[:, None] * stride_xh
        y_base = Y + b * stride_yb + s * stride_ys + h[:, None] * stride_yh
        m2 = hmask[:, None] & dmask[None, :]
        x1 = tl.load(x_base + d[None, :], mask=m2, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + HALF + d[None, :], mask=m2, other=0.0).to(tl.float32)
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(y_base + d[None, :], y1.to(Y.dtype.element_ty), mask=m2)
        tl.store(y_base + HALF + d[None, :], y2.to(Y.dtype.element_ty), mask=m2)
        if PASS > 0:
            p = tl.arange(0, BLOCK_PASS)
            mp = hmask[:, None] & (p < PASS)[None, :]
            xp = tl.load(x_base + 2 * HALF + p[None, :], mask=mp, other=0.0)
            tl.store(y_base + 2 * HALF + p[None, :], xp, mask=mp)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: Optional[torch.Tensor], r: int,
            backward: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, s, h, d = x.shape
    y = torch.empty(b, s, h, d, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    cos = cos.contiguous()
    sin = sin.contiguous()
    cos_mode = 2 if pos is not None else (0 if cos.dim() == 2 else 1)
    pos_arg = pos.contiguous() if pos is not None else cos  # unused unless COS_MODE == 2
    half, pass_ = r // 2, d - r
    block_half = next_power_of_2(half)
    # ~4K elements per program: enough work per program without spilling registers.
    block_h = min(next_power_of_2(h), max(1, 4096 // (2 * block_half)))
    grid = (b * s, triton.cdiv(h, block_h))
    _rope_kernel[grid](x, cos, sin, pos_arg, y, s, h, x.stride(0), x.stride(1), x.stride(2), y.stride(0),
                       y.stride(1), y.stride(2), cos.stride(-2), HALF=half, PASS=pass_, COS_MODE=cos_mode,
                       BACKWARD=backward, BLOCK_H=block_h, BLOCK_HALF=block_half,
                       BLOCK_PASS=next_power_of_2(max(pass_, 1)), num_warps=4)
    return y


# A custom op (opaque to torch.compile: no graph break); its backward is the same op with BACKWARD on.
@torch.library.custom_op("megacore::rotary", mutates_args=())
def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: Optional[torch.Tensor], r: int,
               backward: bool) -> torch.Tensor:
    return _launch(x, cos, sin, pos, r, backward)


@_rotary_op.register_fake
def _(x, cos, sin, pos, r, backward):
    return x.new_empty(x.shape)


def _rotary_setup(ctx, inputs, output):
    _x, cos, sin, pos, r, backward = inputs
    ctx.save_for_backward(cos, sin, pos)
    ctx.r, ctx.backward = r, backward


def _rotary_autograd(ctx, dy):
    cos, sin, pos = ctx.saved_tensors
    return _rotary_op(dy, cos, sin, pos, ctx.r, not ctx.backward), None, None, None, None, None


_rotary_op.register_autograd(_rotary_autograd, setup_context=_rotary_setup)


def apply_rotary(x_BSHD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor, rotary_dim: Optional[int] = None,
                 position_ids: Optional[torch.Tensor] = None, force_triton: bool = False) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` (default cos.shape[-1]) channels of every head of x [B, S, H, D].

    cos/sin: [S, r], [B, S, r], or a [P, r] table with ``position_ids`` [B, S]. x may be a strided
    view (e.g. q sliced out of a fused qkv) as long as its last dim is contiguous. Triton on CUDA (or
    interpreter + ``force_triton``), else ``apply_rotary_reference``; fp64 uses the reference.
    """
    r = _check(x_BSHD, cos_SD, sin_SD, rotary_dim, position_ids)
    if x_BSHD.dtype == torch.float64 or not use_triton(x_BSHD, force_triton, "apply_rotary"):
        return apply_rotary_reference(x_BSHD, cos_SD, sin_SD, r, position_ids)
    # cos/sin are constants of the position: detach so autograd never asks for their gradient.
    return _rotary_op(x_BSHD, cos_SD.detach(), sin_SD.detach(), position_ids, r, False)
