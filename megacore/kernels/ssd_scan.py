"""Mamba-2 SSD chunked scan: Triton forward/backward as one torch custom op, beside the torch reference.

``ssd_scan(x, dt, A, B, C, chunk_size, D=None, initial_state=None, seq_idx=None) -> (y, final_state)`` has the
contract of ``ssd_chunked`` (the torch reference, below; ``ssd_reference`` is the step-by-step
recurrence): x [b, s, h, p], dt [b, s, h]
(softplus'ed, clamped), A [h] (< 0), B/C [b, s, g, n] (g divides h), D [h] or None, initial_state
[b, h, p, n] or None (zeros) -> y [b, s, h, p] in x's dtype and the final state in fp32. Every input
gets its gradient (the final state's gradient flows back too). The kernels and their math are in
``_ssd_triton``; this file lays the tensors out, launches, and finishes the small reductions in torch
(group sums of dB/dC, the reverse cumulative sum that turns dΛ into d(dt·A)).

Packed documents: ``seq_idx`` [b, s] (each position's document number, non-decreasing along a
row); the state is reset where it changes, so no position sees an earlier document. The references
drop the cross-document terms explicitly. The Triton scan subtracts ``DOCUMENT_RESET`` from the decay
exponent dt_t·A of every position t that starts a document: every term that reaches across t then
carries a factor e^{-DOCUMENT_RESET} (below 1e-17, under fp32 resolution) and nothing else changes;
the decay exponent at t itself only ever multiplies such terms, so its gradient is that small too.

Selection (``use_triton(..., under_compile=True)``): with ``MEGACORE_KERNELS=auto`` the kernel runs
on CUDA tensors also under ``torch.compile`` (as an opaque custom op: one graph, no break), because
inductor's fusion of the reference is far slower than the scan kernels; ``torch`` forces the
reference everywhere. fp64 inputs always take the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megacore.kernels._dispatch import next_power_of_2, triton_available, use_triton

if triton_available():
    import triton

    from megacore.kernels import _ssd_triton as K


def ssd_reference(x, dt, A, B, C, D=None, initial_state=None, seq_idx=None):
    """The Mamba-2 recurrence (``megacore.layers.mamba`` module doc), one position at a time (fp32 or better).

    x [b, s, h, p], dt [b, s, h] (already softplus'ed and clamped), A [h], B/C [b, s, g, n],
    D [h] or None, initial_state [b, h, p, n] or None (zeros) -> (y [b, s, h, p], final state).
    ``seq_idx`` [b, s] or None: where it changes from t-1 to t, the state is zeroed before step t."""
    b, s, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    B = B.repeat_interleave(h // g, dim=2)
    C = C.repeat_interleave(h // g, dim=2)
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state
    ys = []
    for t in range(s):
        decay = torch.exp(dt[:, t] * A)                                   # [b, h]
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).to(decay.dtype)[:, None]
        state = state * decay[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    return (y if D is None else y + x * D[:, None]), state


def ssd_chunked(x, dt, A, B, C, chunk_size: int, D=None, initial_state=None, seq_idx=None):
    """Same result as ``ssd_reference`` (``(y, final state)``), computed chunk by chunk (math in at
    least fp32; the state is returned in that precision).

    With a_l = dt_l·A and its running sum Λ_l inside a chunk (positions l, s of the chunk):
      y_l = Σ_{s<=l} (C_l·B_s) e^{Λ_l - Λ_s} dt_s x_s     (within the chunk)
          + e^{Λ_l} C_l · H                                (H: the state entering the chunk)
    and the state leaving the chunk is e^{Λ_L} H + Σ_s e^{Λ_L - Λ_s} dt_s x_s ⊗ B_s.

    With ``seq_idx`` (packed documents) every term whose source and target positions lie in
    different documents is dropped: the pair (l, s) unless doc(l) = doc(s); H's terms unless doc(l)
    = doc(last position before the chunk) (the first chunk: doc(0), which ``initial_state`` belongs
    to); a source s's share of the leaving state unless doc(s) = doc(L). Documents are contiguous,
    so equal numbers at two positions mean no boundary between them.
    """
    b, s, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    out_dtype = x.dtype
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 math for bf16/fp16/fp32, fp64 stays fp64
    x, dt, A, B, C = (t.to(acc) for t in (x, dt, A, B, C))
    B = B.repeat_interleave(h // g, dim=2)
    C = C.repeat_interleave(h // g, dim=2)
    pad = (-s) % chunk_size
    xd = x * dt[..., None]                                                 # dt_s x_s
    a = dt * A                                                             # [b, s, h], <= 0
    if pad:  # zero decay exponent and zero input: padded positions change nothing before them
        xd, a, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xd, a, B, C))
    k = (s + pad) // chunk_size
    L = chunk_size
    xd = xd.view(b, k, L, h, p)
    B, C = B.view(b, k, L, h, n), C.view(b, k, L, h, n)
    cum = a.view(b, k, L, h).cumsum(dim=2)                                  # Λ_l
    # Within a chunk: decay e^{Λ_l - Λ_s} for s <= l, 0 above the diagonal (masked before exp).
    diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]                    # [b, k, l, s, h]
    visible = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[None, None]
    if seq_idx is not None:
        doc = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1).view(b, k, L)
        before = torch.cat([doc[:, :1, 0], doc[:, :-1, -1]], dim=1)         # doc of the position before each chunk
        visible = visible & (doc[:, :, :, None] == doc[:, :, None, :])
    decay = torch.exp(diff.masked_fill(~visible[..., None], float("-inf")))
    scores = torch.einsum("bklhn,bkshn->bklsh", C, B) * decay
    y = torch.einsum("bklsh,bkshp->bklhp", scores, xd)
    # Each chunk's own contribution to the state at its end, then the carried state across chunks.
    to_end = torch.exp(cum[:, :, -1:, :] - cum)                             # e^{Λ_L - Λ_s}
    chunk_decay = torch.exp(cum[:, :, -1, :])                               # e^{Λ_L}, [b, k, h]
    from_entering = torch.exp(cum)                                          # e^{Λ_l}
    if seq_idx is not None:
        to_end = to_end * (doc == doc[:, :, -1:]).to(acc)[..., None]
        chunk_decay = chunk_decay * (doc[:, :, -1] == before).to(acc)[..., None]
        from_entering = from_entering * (doc == before[:, :, None]).to(acc)[..., None]
    chunk_states = torch.einsum("bklh,bklhp,bklhn->bkhpn", to_end, xd, B)
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(acc)
    entering = []
    for c in range(k):
        entering.append(state)
        state = state * chunk_decay[:, c, :, None, None] + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)                                 # [b, k, h, p, n]
    y = y + torch.einsum("bklhn,bkhpn->bklhp", C, entering) * from_entering[..., None]
    y = y.reshape(b, k * L, h, p)[:, :s]
    if D is not None:
        y = y + x * D.to(acc)[:, None]
    return y.to(out_dtype), state


def _blocks(L: int, p: int, n: int, device: torch.device) -> tuple[int, int, int]:
    bl = max(16, min(64, next_power_of_2(L)))
    return bl, max(16, next_power_of_2(p)), max(16, next_power_of_2(n))


# Subtracted from dt·A where a packed document starts (module doc): e^-40 ≈ 4e-18 cuts the state.
DOCUMENT_RESET = 40.0


def _layout(dt: torch.Tensor, A: torch.Tensor, L: int,
            starts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """dt [b, s, h] -> (dt, Λ) as [b, h, k·L] fp32, zero decay exponent past s (pads change nothing);
    ``starts`` [b, s] (1 where a document starts) lowers the exponent there by ``DOCUMENT_RESET``."""
    b, s, h = dt.shape
    k = triton.cdiv(s, L)
    dtp = dt.new_zeros(b, h, k * L, dtype=torch.float32)
    dtp[:, :, :s] = dt.transpose(1, 2)
    a = dtp * A.float()[None, :, None]
    if starts is not None:
        a[:, :, :s] -= DOCUMENT_RESET * starts.float()[:, None, :]
    cum = a.view(b, h, k, L).cumsum(-1).view(b, h, k * L)
    return dtp, cum, k


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _forward(x, dt, A, B, C, D, initial_state, chunk_size: int, starts=None):
    b, s, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    L = chunk_size
    dtp, cum, k = _layout(dt, A, L, starts)
    bl, bp, bn = _blocks(L, p, n, x.device)
    ieee = x.dtype == torch.float32
    st = x.new_empty(b, k + 1, h, p, n, dtype=torch.float32)
    bps, bns = min(bp, 64), min(bn, 64)
    K._chunk_state_kernel[(triton.cdiv(p, bps) * triton.cdiv(n, bns), k, b * h)](
        x, B, cum, dtp, st, s, h, h // g, p, n, k, k + 1, *_strides(x), *_strides(B),
        L=L, MODE=0, IEEE=ieee, BL=bl, BP=bps, BN=bns, num_warps=4)
    pn = p * n
    block = min(1024, next_power_of_2(pn))
    init = initial_state.contiguous() if initial_state is not None else st
    K._state_pass_fwd_kernel[(triton.cdiv(pn, block), b * h)](
        st, cum, init, h, k, pn, L=L, HAS_INIT=initial_state is not None, BLOCK=block, num_warps=4)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    bpf = min(bp, 64)
    K._chunk_scan_fwd_kernel[(triton.cdiv(L, bl) * triton.cdiv(p, bpf), k, b * h)](
        x, B, C, cum, dtp, st, D if D is not None else x, y, s, h, h // g, p, n, k,
        *_strides(x), *_strides(B), *_strides(C), *_strides(y),
        L=L, HAS_D=D is not None, IEEE=ieee, BL=bl, BP=bpf, BN=bn, num_warps=4)
    final = torch.empty(b, h, p, n, dtype=torch.float32, device=x.device).copy_(st[:, k])  # never a view of st
    return y, final, cum, st


def _backward(dy, dfinal, x, dt, A, B, C, D, cum, st, chunk_size: int, has_init: bool):
    b, s, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    L = chunk_size
    k = cum.shape[-1] // L
    dtp, _, _ = _layout(dt, A, L)
    bl, bp, bn = _blocks(L, p, n, x.device)
    ieee = x.dtype == torch.float32
    dy = dy.to(x.dtype)
    dst = x.new_empty(b, k, h, p, n, dtype=torch.float32)
    bps, bns = min(bp, 64), min(bn, 64)
    K._chunk_state_kernel[(triton.cdiv(p, bps) * triton.cdiv(n, bns), k, b * h)](
        dy, C, cum, dtp, dst, s, h, h // g, p, n, k, k, *_strides(dy), *_strides(C),
        L=L, MODE=1, IEEE=ieee, BL=bl, BP=bps, BN=bns, num_warps=4)
    pn = p * n
    block = min(1024, next_power_of_2(pn))
    nblk = triton.cdiv(pn, block)
    term = x.new_empty(b * h, k, nblk, dtype=torch.float32)
    dinit = x.new_empty(b, h, p, n, dtype=torch.float32)
    K._state_pass_bwd_kernel[(nblk, b * h)](
        st, dst, cum, dfinal.contiguous() if dfinal is not None else dinit, dinit, term, h, k, pn, nblk,
        L=L, HAS_DFINAL=dfinal is not None, BLOCK=block, num_warps=4)
    dx = torch.empty(b, s, h, p, dtype=x.dtype, device=x.device)
    dbh = x.new_empty(b, s, h, n, dtype=torch.float32)
    dch = x.new_empty(b, s, h, n, dtype=torch.float32)
    ddt = torch.zeros_like(dtp)
    u_state = torch.zeros_like(dtp)
    inter = torch.zeros_like(dtp)
    nlb = triton.cdiv(L, bl)
    box = torch.zeros(b * h, k, nlb, L, dtype=torch.float32, device=x.device)
    grid = (nlb, k, b * h)
    K._chunk_scan_bwd_dx_kernel[grid](
        x, B, C, dy, cum, dtp, dst, D if D is not None else x, dx, dbh, ddt, u_state, s, h, h // g, p, n, k,
        *_strides(x), *_strides(B), *_strides(C), *_strides(dy), *_strides(dx),
        L=L, HAS_D=D is not None, IEEE=ieee, BL=bl, BP=bp, BN=bn, num_warps=8)
    K._chunk_scan_bwd_dc_kernel[grid](
        x, B, C, dy, cum, dtp, st, dch, inter, box, s, h, h // g, p, n, k, nlb,
        *_strides(x), *_strides(B), *_strides(C), *_strides(dy),
        L=L, IEEE=ieee, BL=bl, BP=bp, BN=bn, num_warps=8)
    # d(dt·A) per position (_ssd_triton's docstring): four sums without cancellation.
    u_state, inter = u_state.view(b, h, k, L), inter.view(b, h, k, L)
    da = (box.sum(2).view(b, h, k, L) + (u_state.cumsum(-1) - u_state) + inter.flip(-1).cumsum(-1).flip(-1)
          + term.sum(-1).view(b, h, k, 1)).view(b, h, k * L)
    ddt = ddt + da * A.float()[None, :, None]
    dA = (da * dtp).sum((0, 2))
    dB = dbh.view(b, s, g, h // g, n).sum(3)
    dC = dch.view(b, s, g, h // g, n).sum(3)
    if D is not None:
        dD = (dy.float() * x.float()).sum((0, 1, 3)).to(D.dtype)
    else:
        dD = x.new_zeros(0)
    return (dx, ddt[:, :, :s].transpose(1, 2).to(dt.dtype).contiguous(), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD,
            dinit if has_init else x.new_zeros(0, dtype=torch.float32))


@torch.library.custom_op("megacore::ssd_scan_fwd", mutates_args=())
def _ssd_fwd_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: Optional[torch.Tensor], initial_state: Optional[torch.Tensor],
                chunk_size: int, starts: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, dt, A, B, C, D, initial_state, chunk_size, starts)


@_ssd_fwd_op.register_fake
def _(x, dt, A, B, C, D, initial_state, chunk_size, starts=None):
    b, s, h, p = x.shape
    n = B.shape[3]
    k = -(-s // chunk_size)
    f32 = torch.float32
    return (x.new_empty(b, s, h, p), x.new_empty(b, h, p, n, dtype=f32), x.new_empty(b, h, k * chunk_size, dtype=f32),
            x.new_empty(b, k + 1, h, p, n, dtype=f32))


@torch.library.custom_op("megacore::ssd_scan_bwd", mutates_args=())
def _ssd_bwd_op(dy: torch.Tensor, dfinal: Optional[torch.Tensor], x: torch.Tensor, dt: torch.Tensor,
                A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor], cum: torch.Tensor,
                st: torch.Tensor, chunk_size: int, has_init: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           torch.Tensor]:
    return _backward(dy, dfinal, x, dt, A, B, C, D, cum, st, chunk_size, has_init)


@_ssd_bwd_op.register_fake
def _(dy, dfinal, x, dt, A, B, C, D, cum, st, chunk_size, has_init):
    b, s, h, p = x.shape
    n = B.shape[3]
    return (x.new_empty(b, s, h, p), dt.new_empty(dt.shape), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), D.new_empty(D.shape) if D is not None else x.new_empty(0),
            x.new_empty(b, h, p, n, dtype=torch.float32) if has_init else x.new_empty(0, dtype=torch.float32))


def _setup(ctx, inputs, output):
    x, dt, A, B, C, D, initial_state, chunk_size, _starts = inputs
    _, _, cum, st = output
    ctx.save_for_backward(x, dt, A, B, C, D, cum, st)
    ctx.chunk_size = chunk_size
    ctx.has_init = initial_state is not None
    ctx.init_dtype = initial_state.dtype if initial_state is not None else None


def _autograd(ctx, dy, dfinal, _dcum, _dst):
    x, dt, A, B, C, D, cum, st = ctx.saved_tensors
    dx, ddt, dA, dB, dC, dD, dinit = _ssd_bwd_op(dy, dfinal, x, dt, A, B, C, D, cum, st, ctx.chunk_size,
                                                 ctx.has_init)
    return (dx, ddt, dA, dB, dC, dD if D is not None else None,
            dinit.to(ctx.init_dtype) if ctx.has_init else None, None, None)


_ssd_fwd_op.register_autograd(_autograd, setup_context=_setup)


def _check(x, dt, A, B, C, chunk_size, D, initial_state) -> None:
    if x.dim() != 4 or B.dim() != 4 or C.shape != B.shape or dt.shape != x.shape[:3] or B.shape[:2] != x.shape[:2]:
        raise ValueError(f"ssd_scan: shapes x {tuple(x.shape)}, dt {tuple(dt.shape)}, B {tuple(B.shape)}, "
                         f"C {tuple(C.shape)} do not fit x [b, s, h, p], dt [b, s, h], B = C [b, s, g, n]")
    h, g = x.shape[2], B.shape[2]
    if h % g or A.shape != (h,) or (D is not None and D.shape != (h,)):
        raise ValueError(f"ssd_scan: {g} groups must divide {h} heads and A/D have shape [{h}]")
    if chunk_size <= 0:
        raise ValueError(f"ssd_scan: chunk_size must be positive, got {chunk_size}")
    if initial_state is not None and initial_state.shape != (x.shape[0], h, x.shape[3], B.shape[3]):
        raise ValueError(f"ssd_scan: initial_state {tuple(initial_state.shape)} is not [b, h, p, n]")


def document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """[b, s] float32: 1 where ``seq_idx`` changes from the previous position (a document starts)."""
    starts = torch.zeros(seq_idx.shape, dtype=torch.float32, device=seq_idx.device)
    starts[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).float()
    return starts


def ssd_scan_triton(x, dt, A, B, C, chunk_size: int, D=None, initial_state=None, seq_idx=None):
    """The Triton op (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``) -> (y, final state fp32)."""
    _check(x, dt, A, B, C, chunk_size, D, initial_state)
    if seq_idx is not None and seq_idx.shape != x.shape[:2]:
        raise ValueError(f"ssd_scan: seq_idx {tuple(seq_idx.shape)} is not [b, s] = {tuple(x.shape[:2])}")
    B, C = B.to(x.dtype), C.to(x.dtype)
    starts = document_starts(seq_idx) if seq_idx is not None else None
    y, final, _, _ = _ssd_fwd_op(x, dt.float(), A.float(), B, C, D, initial_state, int(chunk_size), starts)
    return y, final


def ssd_scan(x, dt, A, B, C, chunk_size: int, D=None, initial_state=None, force_triton: bool = False, seq_idx=None):
    """``ssd_chunked``'s result through the Triton op where selected (module doc), else the reference."""
    if x.dtype != torch.float64 and use_triton(x, force_triton, "ssd_scan", under_compile=True):
        return ssd_scan_triton(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state, seq_idx=seq_idx)
    return ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state, seq_idx=seq_idx)
