"""Ring attention: context-parallel attention that passes key/value blocks around the CP ring.

Layout. The c ranks of the ring hold the load-balanced split of ``megacore.parallel.context_parallel``:
with the sequence cut into 2c chunks of m positions, ring rank r holds chunks r and 2c-1-r, in that
order, as its local sequence of n = 2m tokens (its positions ascend, so causality inside the
rank's own tokens is the plain lower triangle of local indices).

Forward. At step i = 0 .. c-1 rank r holds the K/V block of rank src = (r - i) mod c; it sends the
block on to rank r+1 and receives the next one from r-1 while it attends to the one in hand
(``torch.distributed.batch_isend_irecv``: on NCCL the transfer runs on NCCL's stream beside the
compute; on gloo, in gloo's threads). Which part of the block its queries can see, by causality:

    i = 0      (own block)  all queries x all keys, causal
    src < r                 all queries x the first half of the block (chunk src: before both of
                            rank r's chunks; chunk 2c-1-src is after both)
    src > r                 the second half of the queries (chunk 2c-1-r) x all keys (chunks src
                            and 2c-1-src both lie between rank r's two chunks)

so every step after the first costs m x 2m scores on every rank (the balance the split is for).
Each step runs one block of ``megacore.parallel.cp_block`` (flash kernels returning the log-sum-exp)
and merges it into fp32 accumulators by the log-sum-exp rule (``cp_block.merge``).

Masks. Sliding windows and packed documents give each query a lowest visible key position ``lo``
(``ContextParallelMask``): a key at position p is visible to a query at position t iff lo_t <= p <= t.
With ``lo`` a step builds the block's boolean mask from the positions (the static positions of the
split, plus ``lo``); with a window alone, steps whose blocks lie wholly outside the window are
skipped (decided from the static positions, no device sync). The K/V still travel the whole ring.

Backward, also a ring (``_RingAttention.backward``). The forward keeps only q, k, v, the merged output O
and its log-sum-exp L. Each step recomputes its block's share of the gradient from (q, k, v, O, L, dO)
(``cp_block.block_backward``); dQ accumulates locally; the block's dK/dV accumulator travels with
the K/V: at step i rank r adds its share to the accumulator of block src (received from r-1, which
added its share at step i-1) and sends it to r+1; after step c-1 one more hop brings every
accumulator home, holding the sum of every rank's contribution. Accumulators are fp32.

No dropout (``attention_dropout`` > 0 is refused by the support table for the ring modes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megacore.parallel.cp_block import block_backward, block_forward, block_mask, merge

KV_TAG, GRAD_TAG = 7310, 7311  # gloo matches point-to-point messages by tag (NCCL by issue order)


@dataclass(frozen=True)
class Ring:
    """A CP ring: its group, size, this rank's index and its neighbours' global ranks."""

    group: object
    size: int
    rank: int
    next_rank: int
    prev_rank: int

    @staticmethod
    def of(group) -> "Ring":
        ranks = dist.get_process_group_ranks(group)
        r = ranks.index(dist.get_rank())
        return Ring(group, len(ranks), r, ranks[(r + 1) % len(ranks)], ranks[(r - 1) % len(ranks)])


def _exchange(send: torch.Tensor, ring: Ring, tag: int):
    """Post: send ``send`` to the next rank, receive a buffer of the same shape from the previous one."""
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, ring.next_rank, ring.group, tag),
           dist.P2POp(dist.irecv, recv, ring.prev_rank, ring.group, tag)]
    return recv, dist.batch_isend_irecv(ops), send  # the send buffer stays referenced until the wait


def _arrived(pending) -> torch.Tensor:
    recv, works, _ = pending
    for w in works:
        w.wait()
    return recv


def _chunk_ranges(rank: int, c: int, m: int) -> list:
    """[(first, last)] inclusive global positions of ring rank ``rank``'s two chunks."""
    return [(rank * m, rank * m + m - 1), ((2 * c - 1 - rank) * m, (2 * c - rank) * m - 1)]


def _positions(rank: int, c: int, m: int, device) -> torch.Tensor:
    a, b = _chunk_ranges(rank, c, m)
    return torch.cat([torch.arange(a[0], a[1] + 1, device=device), torch.arange(b[0], b[1] + 1, device=device)])


def step_plan(i: int, r: int, c: int):
    """(src, the query chunks, the key chunks, causal) of step ``i`` on ring rank ``r``: chunks are
    0 (the first of a rank's two chunks) and 1 (the second); see the module doc."""
    src = (r - i) % c
    if i == 0:
        return src, (0, 1), (0, 1), True
    if src < r:
        return src, (0, 1), (0,), False
    return src, (1,), (0, 1), False


def _window_sees(r: int, src: int, q_chunks, k_chunks, c: int, m: int, window: int) -> bool:
    """Whether any query of the step sees a key within ``window`` (static positions; causal)."""
    q_ranges, k_ranges = _chunk_ranges(r, c, m), _chunk_ranges(src, c, m)
    return any(k_ranges[kc][0] <= q_ranges[qc][1] and k_ranges[kc][1] > q_ranges[qc][0] - window
               for qc in q_chunks for kc in k_chunks)


class _Plan:
    """The static part of one ring call: sizes, positions and which steps run (module doc)."""

    def __init__(self, ring: Ring, n: int, lo, window: Optional[int], device):
        if n % 2:
            raise ValueError(f"ring attention needs an even local sequence (two chunks), got {n}")
        self.c, self.r, self.m = ring.size, ring.rank, n // 2
        self.lo = lo
        self.q_pos = _positions(self.r, self.c, self.m, device) if lo is not None else None
        tokens = {(0, 1): slice(None), (0,): slice(0, self.m), (1,): slice(self.m, n)}
        self.steps = []
        for i in range(self.c):
            src, q_chunks, k_chunks, causal = step_plan(i, self.r, self.c)
            run = window is None or _window_sees(self.r, src, q_chunks, k_chunks, self.c, self.m, window)
            self.steps.append((src, tokens[q_chunks], tokens[k_chunks], causal, run))

    def mask(self, src: int, qs: slice, ks: slice, device):
        if self.lo is None:
            return None
        k_pos = _positions(src, self.c, self.m, device)
        return block_mask(self.q_pos[qs], k_pos[ks], self.lo[:, qs])


def _pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _unpack(buf: torch.Tensor, k_shape, v_shape):
    nk = int(np.prod(k_shape))
    return buf[:nk].view(k_shape), buf[nk:].view(v_shape)


def _heads_first(x: torch.Tensor) -> torch.Tensor:  # [B, S, H, D] -> [B, H, S, D] (a view)
    return x.transpose(1, 2)


def ring_forward(q, k, v, plan: _Plan, ring: Ring, scale: float, fast: bool):
    """(out [B, n, H, Dv] in q's dtype, lse [B, H, n] fp32) of the local queries against every key of
    the ring (inputs [B, n, H|Hkv, D])."""
    b, n, h, _ = q.shape
    dv = v.shape[-1]
    acc_dt = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(b, h, n, dv, dtype=acc_dt, device=q.device)
    lse = torch.full((b, h, n), float("-inf"), dtype=acc_dt, device=q.device)
    qh = _heads_first(q)
    kv = _pack(k, v)
    for i, (src, qs, ks, causal, run) in enumerate(plan.steps):
        pending = _exchange(kv, ring, KV_TAG) if i < plan.c - 1 else None
        if run:
            kb, vb = (_heads_first(t)[:, :, ks] for t in _unpack(kv, k.shape, v.shape))
            mask = plan.mask(src, qs, ks, q.device)
            o, s = block_forward(qh[:, :, qs], kb, vb, scale, causal and mask is None, mask, fast)
            out[:, :, qs], lse[:, :, qs] = merge(out[:, :, qs], lse[:, :, qs], o, s)
        if pending is not None:
            kv = _arrived(pending)
    return out.to(q.dtype).transpose(1, 2).contiguous(), lse


def ring_backward(dout, q, k, v, out, lse, plan: _Plan, ring: Ring, scale: float, fast: bool):
    """(dq, dk, dv) of ``ring_forward`` (module doc: the dK/dV accumulators travel with the blocks)."""
    acc_dt = torch.promote_types(q.dtype, torch.float32)
    qh, oh, doh = _heads_first(q), _heads_first(out), _heads_first(dout)
    dq = torch.zeros(qh.shape, dtype=acc_dt, device=q.device)
    kv = _pack(k, v)
    grad_pending = None
    for i, (src, qs, ks, causal, run) in enumerate(plan.steps):
        pending = _exchange(kv, ring, KV_TAG) if i < plan.c - 1 else None
        grads = torch.zeros(k.numel() + v.numel(), dtype=acc_dt, device=k.device)  # this step's dK | dV
        dk_blk, dv_blk = _unpack(grads, k.shape, v.shape)
        if run:
            kb, vb = (_heads_first(t)[:, :, ks] for t in _unpack(kv, k.shape, v.shape))
            mask = plan.mask(src, qs, ks, q.device)
            gq, gk, gv = block_backward(doh[:, :, qs], qh[:, :, qs], kb, vb, oh[:, :, qs], lse[:, :, qs], scale,
                                        causal and mask is None, mask, fast)
            dq[:, :, qs] += gq
            _heads_first(dk_blk)[:, :, ks] += gk
            _heads_first(dv_blk)[:, :, ks] += gv
        if grad_pending is not None:  # the accumulator of this block, from the previous rank
            grads += _arrived(grad_pending)
        grad_pending = _exchange(grads, ring, GRAD_TAG) if plan.c > 1 else (grads, [], None)
        if pending is not None:
            kv = _arrived(pending)
    dk, dv = _unpack(_arrived(grad_pending), k.shape, v.shape)  # every block's accumulator, home
    return dq.transpose(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lo, ring: Ring, window, scale: float, fast: bool):
        plan = _Plan(ring, q.shape[1], lo, window, q.device)
        out, lse = ring_forward(q, k, v, plan, ring, scale, fast)
        ctx.save_for_backward(q, k, v, out, lse, lo)
        ctx.ring, ctx.window, ctx.scale, ctx.fast = ring, window, scale, fast
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, lo = ctx.saved_tensors
        plan = _Plan(ctx.ring, q.shape[1], lo, ctx.window, q.device)
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, plan, ctx.ring, ctx.scale, ctx.fast)
        return dq, dk, dv, None, None, None, None, None


@torch.compiler.disable  # point-to-point transfers inside: runs eagerly between compiled regions
def ring_attention(q, k, v, lo: Optional[torch.Tensor], ring: Ring, scale: float, window: Optional[int] = None,
                   fast: bool = True) -> torch.Tensor:
    """Attention of the local queries [B, n, H, D] over the keys/values [B, n, Hkv, D|Dv] of every
    rank of ``ring`` (load-balanced layout, module doc) -> [B, n, H, Dv]. ``lo`` [B, n]: each query's
    lowest visible key position (None: plain causal); ``window``: the sliding window that ``lo``
    includes, used only to skip blocks outside it."""
    return _RingAttention.apply(q, k, v, lo, ring, window, scale, fast)


class RingAttention(nn.Module):
    """In place of a core attention: ring attention over ``group`` (module doc). ``mask`` is what
    ``ContextParallelMask`` gives in the ring modes: ``lo`` [B, n] or None. The wrapped core lends its
    softmax scale and backend choice (``reference``: the plain-torch block math; else the kernels)."""

    def __init__(self, core: nn.Module, group, window: Optional[int] = None):
        super().__init__()
        self.core, self.window = core, window
        self.ring = Ring.of(group)

    @property
    def recompute(self) -> bool:  # the ring recomputes its blocks in backward anyway
        return self.core.recompute

    @recompute.setter
    def recompute(self, value: bool) -> None:
        self.core.recompute = value

    def forward(self, q, k, v, mask=None):
        core = self.core
        if core.training and core.dropout_p > 0:
            raise ValueError("ring attention has no attention dropout; set model.attention_dropout=0 or "
                             "parallel.context_mode=allgather or a2a")
        return ring_attention(q, k, v, mask, self.ring, core.scale, self.window, fast=core.backend != "reference")
