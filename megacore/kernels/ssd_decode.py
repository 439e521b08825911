"""One decoding step of a Mamba-2 mixer (a single new position): Triton kernels + the torch reference.

Given the layer's recurrent state (``megacore.layers.mamba.MambaState``: the raw conv inputs of the
last K-1 positions ``conv_state`` [B, conv_dim, K-1] and the SSM state ``ssm_state`` [B, h, p, n]
fp32) and the new position's projected conv input ``xbc`` [B, conv_dim] and time step ``dt`` [B, h]
(softplus'ed and clamped)::

    xa = silu(bias + Σ_k w[:, k] · window[:, k]),   window = [conv_state | xbc]; conv_state <- window[:, 1:]
    x, B, C = split(xa)                              (x [h, p], B/C [g, n], shared by h/g heads)
    S <- S · exp(dt·A) + dt · x ⊗ B;   y = S · C + D · x

Two kernels: the conv step (shift + dot + SiLU, in place on ``conv_state``) and the SSM step (one
program per head and block of p: read S once, update in place, reduce over n). Both states are
updated in place; y comes back as [B, h·p] fp32 (the layer applies the gated norm and ``out_proj``).
No autograd: this is the inference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megacore.kernels._dispatch import next_power_of_2, triton_available, use_triton


def mamba_decode_step_reference(conv_state, ssm_state, xbc, dt, A, conv_weight, conv_bias, D,
                                num_heads: int, head_dim: int, num_groups: int, state_dim: int) -> torch.Tensor:
    """The step of the module docstring in plain torch (states updated in place) -> y [B, h·p] fp32."""
    w = conv_weight.reshape(conv_weight.shape[0], -1).float()
    window = torch.cat([conv_state.float(), xbc.float()[..., None]], dim=-1)        # [B, C, K]
    pre = (window * w).sum(-1) + (conv_bias.float() if conv_bias is not None else 0.0)
    conv_state.copy_(window[..., 1:].to(conv_state.dtype))
    xa = F.silu(pre)
    inner, gn = num_heads * head_dim, num_groups * state_dim
    x = xa[:, :inner].view(-1, num_heads, head_dim)
    B = xa[:, inner:inner + gn].view(-1, num_groups, state_dim).repeat_interleave(num_heads // num_groups, dim=1)
    C = xa[:, inner + gn:].view(-1, num_groups, state_dim).repeat_interleave(num_heads // num_groups, dim=1)
    dt = dt.float()
    decay = torch.exp(dt * A.float())[..., None, None]
    ssm_state.copy_(ssm_state * decay + (dt[..., None] * x)[..., None] * B[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", ssm_state, C)
    if D is not None:
        y = y + x * D.float()[:, None]
    return y.reshape(-1, inner)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _conv_step_kernel(CS, XBC, W, BIAS, XA, C, scs_b, scs_c, scs_k, sx_b,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, BC: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
        m = offs_c < C
        acc = tl.zeros((BC,), tl.float32)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_c, mask=m, other=0.0).to(tl.float32)
        base = CS + b * scs_b + offs_c * scs_c
        for k in tl.static_range(K - 1):  # slot k is read before slot k is overwritten (next iteration)
            v = tl.load(base + k * scs_k, mask=m, other=0.0)
            acc += tl.load(W + offs_c * K + k, mask=m, other=0.0).to(tl.float32) * v.to(tl.float32)
            if k > 0:
                tl.store(base + (k - 1) * scs_k, v, mask=m)
        xn = tl.load(XBC + b * sx_b + offs_c, mask=m, other=0.0)
        acc += tl.load(W + offs_c * K + K - 1, mask=m, other=0.0).to(tl.float32) * xn.to(tl.float32)
        tl.store(base + (K - 2) * scs_k, xn.to(CS.dtype.element_ty), mask=m)
        tl.store(XA + b * C + offs_c, acc * tl.sigmoid(acc), mask=m)

    @triton.jit
    def _ssm_step_kernel(ST, XA, DT, A, Dp, Y, H, HPG, P, N, CD, GN,
                         HAS_D: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
        bh, pid_p = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        g = h // HPG
        offs_p = pid_p * BP + tl.arange(0, BP)
        offs_n = tl.arange(0, BN)
        mp, mn = offs_p < P, offs_n < N
        xa = XA + b.to(tl.int64) * CD
        x = tl.load(xa + h * P + offs_p, mask=mp, other=0.0)
        bv = tl.load(xa + H * P + g * N + offs_n, mask=mn, other=0.0)
        cv = tl.load(xa + H * P + GN + g * N + offs_n, mask=mn, other=0.0)
        dt = tl.load(DT + bh)
        decay = tl.exp(dt * tl.load(A + h))
        ptr = ST + bh.to(tl.int64) * P * N + offs_p[:, None] * N + offs_n[None, :]
        mask = mp[:, None] & mn[None, :]
        s = tl.load(ptr, mask=mask, other=0.0) * decay + (dt * x)[:, None] * bv[None, :]
        tl.store(ptr, s, mask=mask)
        y = tl.sum(s * cv[None, :], axis=1)
        if HAS_D:
            y += tl.load(Dp + h).to(tl.float32) * x
        tl.store(Y + bh.to(tl.int64) * P + offs_p, y, mask=mp)


def mamba_decode_step_triton(conv_state, ssm_state, xbc, dt, A, conv_weight, conv_bias, D,
                             num_heads: int, head_dim: int, num_groups: int, state_dim: int) -> torch.Tensor:
    """The Triton step (CUDA, or CPU under the interpreter); ``ssm_state`` must be contiguous fp32."""
    bsz, cd = xbc.shape
    w = conv_weight.reshape(cd, -1).contiguous()
    kk = w.shape[1]
    if kk < 2 or conv_state.shape != (bsz, cd, kk - 1):
        raise ValueError(f"mamba decode step: conv_state {tuple(conv_state.shape)} is not [B, C, K-1] with K >= 2")
    if ssm_state.dtype != torch.float32 or not ssm_state.is_contiguous():
        raise ValueError("mamba decode step: the SSM state must be a contiguous fp32 tensor")
    xbc = xbc.contiguous()
    xa = torch.empty(bsz, cd, dtype=torch.float32, device=xbc.device)
    bc = min(1024, next_power_of_2(cd))
    _conv_step_kernel[(bsz, triton.cdiv(cd, bc))](
        conv_state, xbc, w, conv_bias if conv_bias is not None else w, xa, cd, *conv_state.stride(), xbc.stride(0),
        K=kk, HAS_BIAS=conv_bias is not None, BC=bc, num_warps=4)
    y = torch.empty(bsz, num_heads * head_dim, dtype=torch.float32, device=xbc.device)
    bp = min(64, max(16, next_power_of_2(head_dim)))
    bn = max(16, next_power_of_2(state_dim))
    _ssm_step_kernel[(bsz * num_heads, triton.cdiv(head_dim, bp))](
        ssm_state, xa, dt.float().contiguous(), A.float().contiguous(), D if D is not None else xa, y,
        num_heads, num_heads // num_groups, head_dim, state_dim, cd, num_groups * state_dim,
        HAS_D=D is not None, BP=bp, BN=bn, num_warps=4)
    return y


def mamba_decode_step(conv_state, ssm_state, xbc, dt, A, conv_weight, conv_bias, D, num_heads: int,
                      head_dim: int, num_groups: int, state_dim: int, force_triton: bool = False) -> torch.Tensor:
    """One decoding step (module doc): Triton where selected, else the reference; states in place."""
    args = (conv_state, ssm_state, xbc, dt, A, conv_weight, conv_bias, D, num_heads, head_dim, num_groups, state_dim)
    if (xbc.dtype != torch.float64 and conv_state.shape[-1] >= 1 and ssm_state.is_contiguous()
            and ssm_state.dtype == torch.float32 and use_triton(xbc, force_triton, "mamba decode step")):
        return mamba_decode_step_triton(*args)
    return mamba_decode_step_reference(*args)
