"""Context parallelism for Mamba-2 mixers: the exact recurrence, by passing states between chunks.

Under context parallelism (``megacore.parallel.context_parallel``) a sequence of length S is cut into
``2c`` chunks of L = S/(2c) positions (c = CP size) and rank r holds chunks ``r`` and ``2c-1-r``, in
that order, as its local sequence of 2L positions. A Mamba mixer on a chunk must compute what one
device computes on the whole sequence. Two parts of the mixer look back along the sequence:

Causal conv1d (kernel K). Output position t reads the inputs [x B C] of positions t-K+1 .. t. Each
chunk therefore needs the last K-1 inputs of the chunk before it in sequence order (the "halo"):
every rank contributes the last K-1 conv inputs of both its chunks, those tails are all-gathered over
CP ([2c, B, conv_dim, K-1], tiny), and each chunk is convolved with its predecessor's tail in front
(zeros before chunk 0, exactly the one-device zero padding). Backward: the gathered tails' gradients
are summed over the ranks and each rank keeps its own (a reduce-scatter), so a tail's gradient
collects the contribution of the chunk that used it. Needs L >= K-1.

SSD scan. Per head, with a_t = exp(dt_t·A) and state S_t [P, N] (module doc of
``megacore.layers.mamba``)::

    S_t = a_t S_{t-1} + dt_t x_t ⊗ B_t,    y_t = S_t C_t + D x_t

is linear in the state. For a chunk starting after position t0 with incoming state H = S_{t0},
write Λ_t = Σ_{t0<u<=t} dt_u·A (so e^{Λ_t} = Π a_u). Unrolling,

    S_t = e^{Λ_t} H + S⁰_t                  (S⁰: the same recurrence started from zero)
    y_t = y⁰_t + e^{Λ_t} H C_t              (y⁰: the chunk's output started from zero)

and at the chunk's end (position t1): S_{t1} = e^{Λ_{t1}} H + F, F = S⁰_{t1}. So each rank

1. scans each of its chunks from a zero state (``ssd_scan``): y⁰ and the summary (F, g = e^{Λ_{t1}});
2. all-gathers the 2c summaries ([2c, B, heads, P·N + 1], tiny) and runs the chunk-level recurrence
   in sequence order on every rank: H_0 = 0, H_{k+1} = g_k H_k + F_k (``incoming_states``);
3. adds the incoming state's part e^{Λ_t} H_k C_t to its chunks' outputs (``add_incoming_state``).

The result is the one-device recurrence up to rounding (the float sums are regrouped, as
``ssd_chunked``'s own chunking already does). Gradients: every step is differentiable; the summary
all-gather's backward is a reduce-scatter (each rank's H depend on other ranks' summaries, so the
gradient of a summary is the sum of what every rank's chunks sent back to it). Cost per Mamba layer
and direction: two tiny all-gathers (conv tails and summaries) and an O(2c) loop over states of
[B, heads, P, N]; the scan work stays O(S/c) per rank.

TP and SP compose: the CP group joins ranks of equal TP rank (the same heads), and under SP the
mixer's ``in_proj`` has already gathered the TP group's tokens, so the mixer sees its whole local
(CP) sequence. The strategy (``MambaContextParallel``) is handed into ``MambaMixer.context_parallel``
by ``apply_context_parallel``; the model itself imports nothing from here. Incremental decoding under
CP is not supported (a KV cache decodes with a whole one-device model).

Kernels: each chunk's conv (with its halo as ``initial``) and zero-state scan go through
``megacore.kernels`` (``causal_conv1d_silu``, ``ssd_scan``): the Triton kernels where selected (CUDA,
``MEGACORE_KERNELS`` auto or triton), else the torch references; the chunk-level recurrence and the
incoming-state term stay in torch (small).
"""

from __future__ import annotations

import torch

from megacore.kernels.causal_conv1d import causal_conv1d_silu
from megacore.kernels.ssd_scan import ssd_scan
from megacore.parallel import collectives as C


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def chunk_log_decay(dt, A):
    """Λ_t = Σ_{u<=t} dt_u·A over the positions of one piece of sequence: dt [b, s, h], A [h] ->
    [b, s, h] (at least fp32)."""
    acc = _acc(dt.dtype)
    return (dt.to(acc) * A.to(acc)).cumsum(dim=1)


def incoming_states(finals, decays):
    """The chunk-level recurrence in sequence order: finals [k, b, h, p, n] (each chunk's final
    state from a zero start), decays [k, b, h] (each chunk's total decay e^{Λ_end}) -> the state
    entering each chunk, [k, b, h, p, n] (zeros for the first)."""
    state = torch.zeros_like(finals[0])
    entering = []
    for k in range(finals.shape[0]):
        entering.append(state)
        state = state * decays[k][..., None, None] + finals[k]
    return torch.stack(entering)


def add_incoming_state(y, C_, log_decay, state):
    """y [b, s, h, p] (from a zero start) + e^{Λ_t} C_t · H: the output with the incoming state
    ``state`` [b, h, p, n]. C_ [b, s, g, n]; log_decay [b, s, h] (``chunk_log_decay``)."""
    h = y.shape[2]
    Ch = C_.to(state.dtype).repeat_interleave(h // C_.shape[2], dim=2)
    extra = torch.einsum("bshn,bhpn->bshp", Ch, state) * torch.exp(log_decay)[..., None]
    return (y.to(state.dtype) + extra).to(y.dtype)


class MambaContextParallel:
    """A Mamba mixer's sequence strategy under context parallelism over ``group`` (module doc). The
    local sequence is this rank's two chunks, ``r`` then ``2c-1-r``."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = C.group_size(group), C.group_rank(group)
        c, r = self.size, self.rank
        self.chunk_ids = (r, 2 * c - 1 - r)  # global chunk index of each local half

    def _gathered_index(self, chunk: int) -> int:
        """Where global chunk ``chunk`` lies in a [2c, ...] gather of every rank's (first, second) halves."""
        c = self.size
        return 2 * chunk if chunk < c else 2 * (2 * c - 1 - chunk) + 1

    def _halves(self, t: torch.Tensor, dim: int):
        n = t.shape[dim]
        if n % 2:
            raise ValueError(f"the local sequence under context parallelism holds two equal chunks, got {n} positions")
        return t.split(n // 2, dim=dim)

    def conv_silu(self, xbc_BSC: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        """silu(causal depthwise conv) of the local [B, 2L, conv_dim] inputs, each chunk continued from
        its predecessor's last K-1 inputs (module doc) -> [B, 2L, conv_dim]."""
        keep = weight.shape[-1] - 1
        halves = self._halves(xbc_BSC, 1)
        if keep == 0:
            return causal_conv1d_silu(xbc_BSC, weight, bias)
        if halves[0].shape[1] < keep:
            raise ValueError(f"a context-parallel chunk of {halves[0].shape[1]} positions is shorter than the Mamba "
                             f"conv's look-back of {keep}; use a longer sequence or a smaller parallel.context")
        tails = torch.stack([h[:, h.shape[1] - keep:].transpose(1, 2) for h in halves])  # [2, B, C, K-1]
        tails = C.gather_along_dim(tails, 0, self.group, grad_is_partial=True)            # [2c, B, C, K-1]
        outs = []
        for half, chunk in zip(halves, self.chunk_ids):
            before = tails[self._gathered_index(chunk - 1)] if chunk > 0 else torch.zeros_like(tails[0])
            outs.append(causal_conv1d_silu(half, weight, bias, initial=before.contiguous()))
        return torch.cat(outs, dim=1)

    def scan(self, x, dt, A, B, C_, chunk_size: int, D=None) -> torch.Tensor:
        """``ssd_scan``'s y for this rank's two chunks of the whole sequence (module doc). Shapes as
        there, with s = 2L local positions."""
        b, _, h, p = x.shape
        n = B.shape[-1]
        parts = list(zip(*(self._halves(t, 1) for t in (x, dt, B, C_))))
        ys, summaries, log_decays = [], [], []
        for xs, dts, Bs, Cs in parts:
            y, final = ssd_scan(xs, dts, A, Bs, Cs, chunk_size, D=D)
            lam = chunk_log_decay(dts, A)
            ys.append(y)
            log_decays.append(lam)
            summaries.append(torch.cat([final.reshape(b, h, p * n), torch.exp(lam[:, -1])[..., None]], dim=-1))
        gathered = C.gather_along_dim(torch.stack(summaries), 0, self.group, grad_is_partial=True)  # [2c, b, h, pn+1]
        order = [self._gathered_index(k) for k in range(2 * self.size)]
        in_order = gathered[order]
        entering = incoming_states(in_order[..., :-1].reshape(-1, b, h, p, n), in_order[..., -1])
        outs = [add_incoming_state(y, Cs, lam, entering[chunk])
                for y, (_, _, _, Cs), lam, chunk in zip(ys, parts, log_decays, self.chunk_ids)]
        return torch.cat(outs, dim=1)


def apply_mamba_context_parallel(model, group):
    """Hand every Mamba mixer of ``model`` the CP strategy over ``group`` (no-op for one rank)."""
    from megacore.layers.mamba import MambaMixer

    if C.group_size(group) == 1:
        return model
    for module in model.modules():
        if isinstance(module, MambaMixer):
            module.context_parallel = MambaContextParallel(group)
    return model
