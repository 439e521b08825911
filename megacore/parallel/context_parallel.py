"""Context parallelism (CP): each rank of the CP group holds part of every sequence.

Split. The sequence of length S is cut into ``2·c`` equal chunks (c = CP size); rank r holds chunks
``r`` and ``2c-1-r`` (``cp_token_index``). Under causal attention the early chunks are cheap and
the late ones expensive, so pairing them balances the work across ranks. Each rank runs the whole
model on its S/c tokens. Every mode below keeps this layout, so the data feed and checkpoints do not
depend on the mode.

Attention (``parallel.context_mode``). The plan wraps every core attention from outside; queries,
keys and values arrive after rotary, so each already carries its own rotary position:

- ``allgather`` (``ContextParallelAttention``): keys and values are all-gathered over the CP group
  (``gather_kv``) before the wrapped core attends::

      forward   K = [K_0 | ... | K_{c-1}]  along the sequence (all-gather)
      backward  dK_r = Σ_j dK^{(j)} restricted to rank r's tokens  (reduce-scatter)

  K/V memory is O(S) per rank; one all-gather per layer per direction, not overlapped.
- ``ring`` (``megacore.parallel.cp_ring``): K/V blocks travel around the ring by point-to-point
  transfers overlapped with the attention of the block in hand; partial results merged by their
  log-sum-exp; the backward is a ring too. K/V memory O(S/c).
- ``a2a`` (``megacore.parallel.cp_a2a``): all-to-all scatters the heads and gathers the sequence, the
  wrapped core attends over the whole sequence for H/c heads, and the inverse all-to-all follows.
- ``a2a+ring``: all-to-all inside groups of ``parallel.context_a2a_size`` ranks, ring across the
  groups (groups from ``megacore.parallel.topology.context_subgroups``).

The mask (``ContextParallelMask``, built once per forward, replaces the model's ``attention_mask``
module) compares global positions, which it derives from the split itself (``cp_token_index`` of
its CP rank), never from ``position_ids``: query at position t may attend key at p iff p <= t, within the
sliding window if the model has one, and in the same packed document when ``attention_mask`` gives
the document starts (``split_sample_for_cp`` turns a ``[1, S, S]`` packed-document mask into them).
Window and documents together give each query a lowest visible position ``lo`` (``lowest_visible``),
which is all the ring needs; the all-gather and a2a forms build boolean masks from it.

Multi-latent attention (``megacore.layers.mla``) is wrapped the same way: its per-head keys (the
shared rotary key already joined to each head) and values are what moves (gathering the small latents
and up-projecting after the gather would move less).

Mamba-2 mixers (hybrid stacks) scan along the sequence: ``apply_context_parallel`` hands each one
the state-passing strategy of ``megacore.parallel.mamba_context_parallel`` (conv halo and chunk
states exchanged over the CP group; exact), whatever the attention mode. Everything else is
token-wise, so it needs nothing. The loss is each rank's share of the global mean: its tokens' loss
sum divided by the labelled tokens of the whole global batch, which the trainer sums over DP×CP.
Gradients are summed over DP×CP by DDP, whose group is ``dp_cp``. RoPE and learned positions use
``position_ids``, which ``split_sample_for_cp`` sets for the local tokens: their global positions, or
with ``data.reset_position_ids`` the sample's own (each token's offset within its document). So the
rotary position and the mask's position of a token are separate: the first is whatever the data says,
the second always the token's place in the global sequence.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from megacore.layers.attention import AttentionMask, SelfAttention, causal_mask
from megacore.layers.mla import MultiLatentAttention
from megacore.parallel import collectives as C
from megacore.parallel.cp_a2a import AllToAllAttention, to_sorted
from megacore.parallel.cp_block import block_mask
from megacore.parallel.cp_ring import RingAttention
from megacore.parallel.mamba_context_parallel import apply_mamba_context_parallel


def cp_token_index(seq_len: int, cp_size: int, cp_rank: int) -> np.ndarray:
    """Global positions held by CP rank ``cp_rank``: chunks ``r`` and ``2c-1-r`` of ``2c``."""
    if seq_len % (2 * cp_size) != 0:
        raise ValueError(f"sequence length {seq_len} is not divisible by 2*context={2 * cp_size}; choose a "
                         "sequence length that is a multiple of twice the context-parallel size")
    chunk = seq_len // (2 * cp_size)
    first = np.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    last_chunk = 2 * cp_size - 1 - cp_rank
    second = np.arange(last_chunk * chunk, (last_chunk + 1) * chunk)
    return np.concatenate([first, second])


def document_starts(mask_SS: np.ndarray) -> np.ndarray:
    """[S] int64: for each query of a packed-document mask (True = may attend; causal within documents,
    as ``megacore.data.gpt_dataset.make_sample`` builds it), the position of its document's first token
    (the first key it may attend)."""
    mask_SS = np.asarray(mask_SS, dtype=bool)
    return np.argmax(mask_SS, axis=-1).astype(np.int64)


def split_sample_for_cp(sample: dict, cp_size: int, cp_rank: int) -> dict:
    """This CP rank's tokens of one sample (arrays of length S: tokens, labels, loss_mask, ...), with
    ``position_ids``: the sample's own for those tokens when it has them (e.g. restarting per document,
    ``data.reset_position_ids``), else their global positions. A packed-document ``attention_mask`` [1, S, S]
    becomes the document start of each of the rank's tokens ([S/c] int64, ``document_starts``), the
    form a context-parallel model takes (``ContextParallelMask``)."""
    seq_len = len(sample["tokens"])
    index = cp_token_index(seq_len, cp_size, cp_rank)
    out = {k: np.asarray(v)[index] for k, v in sample.items() if k != "attention_mask"}
    if "attention_mask" in sample:
        mask = np.asarray(sample["attention_mask"])
        if mask.shape != (1, seq_len, seq_len):
            raise ValueError(f"a context-parallel sample's attention_mask must be the [1, S, S] packed-document mask "
                             f"(data.reset_attention_mask), got shape {mask.shape}")
        out["attention_mask"] = document_starts(mask[0])[index]
    if "position_ids" not in out:
        out["position_ids"] = index.astype(np.int64)
    return out


def gather_kv(x_BSGD: torch.Tensor, group) -> torch.Tensor:
    """All-gather keys or values over CP along the sequence; backward: reduce-scatter (see module doc)."""
    return C.gather_along_dim(x_BSGD, 1, group, grad_is_partial=True)


def _gather_tokens(x_BS: torch.Tensor, group) -> torch.Tensor:
    return C.gather_along_dim(x_BS.contiguous(), 1, group, grad_is_partial=False)


def global_positions(local_len: int, group, device) -> tuple[torch.Tensor, torch.Tensor]:
    """([S_local] the global positions of this CP rank's tokens, [S] those of the keys gathered over
    ``group`` in rank order), from the split (``cp_token_index``): the mask's positions, which the
    rotary ``position_ids`` need not be (``data.reset_position_ids``)."""
    c, r = C.group_size(group), C.group_rank(group)
    seq = local_len * c
    keys = np.concatenate([cp_token_index(seq, c, j) for j in range(c)])
    return (torch.from_numpy(cp_token_index(seq, c, r)).to(device), torch.from_numpy(keys).to(device))


def lowest_visible(positions_BS: torch.Tensor, doc_starts_BS: Optional[torch.Tensor],
                   sliding_window: Optional[int]) -> Optional[torch.Tensor]:
    """[B, S] the lowest key position each query (at global position ``positions_BS``, [B or 1, S])
    may attend (its document's start, and the first position of its sliding window), or None when
    only causality applies."""
    lo = doc_starts_BS
    if sliding_window is not None:
        first = positions_BS - (sliding_window - 1)
        lo = first if lo is None else torch.maximum(lo, first)
    return lo


def cp_attention_mask(q_pos_S: torch.Tensor, k_pos_S: torch.Tensor, sliding_window: Optional[int] = None,
                      doc_starts_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean [B or 1, 1, S_local, S] mask (True = may attend) of the local queries (global positions
    ``q_pos_S``) against the gathered keys (``k_pos_S``)."""
    mask = causal_mask(q_pos_S[None], k_pos_S[None], sliding_window)
    if doc_starts_BS is not None:
        mask = mask & (k_pos_S[None, None, :] >= doc_starts_BS[:, :, None])
    return mask[:, None]


class ContextParallelAttention(nn.Module):
    """A core attention whose keys and values are gathered over the CP group first (see the module
    doc). q [B, S/c, Hq, D], k/v [B, S/c, Hkv, D] -> [B, S/c, Hq, D]; ``mask`` is the CP mask."""

    def __init__(self, core: nn.Module, group):
        super().__init__()
        self.core, self.group = core, group

    @property
    def recompute(self) -> bool:  # selective recomputation is the wrapped core's
        return self.core.recompute

    @recompute.setter
    def recompute(self, value: bool) -> None:
        self.core.recompute = value

    def forward(self, q, k, v, mask=None):
        return self.core(q, gather_kv(k, self.group), gather_kv(v, self.group), mask)


class ContextParallelMask(nn.Module):
    """In place of the model's ``AttentionMask``: what the context-parallel attention of ``mode`` needs,
    built once per forward from the global positions of the local tokens (``global_positions``: from
    the split, not from ``position_ids``, which feed rotary and may restart per document; a
    context-parallel model must still be given them) and, for packed documents, ``attention_mask`` =
    the document start of each local token ([B, S_local], from ``split_sample_for_cp``):

    - ``allgather``: boolean [B, 1, S_local, S], the local queries against the gathered keys;
    - ``a2a``: boolean [B, 1, S, S] over the whole sequence in position order, or None (plain causal);
    - ``ring``: the lowest visible key position of each local query, [B, S_local], or None;
    - ``a2a+ring``: the same for the all-to-all group's tokens in position order, [B, a·S_local], or None.
    """

    whole_sequence = False

    def __init__(self, group, sliding_window: Optional[int] = None, mode: str = "allgather", a2a_group=None):
        super().__init__()
        self.group, self.sliding_window, self.mode, self.a2a_group = group, sliding_window, mode, a2a_group

    def forward(self, batch: int, seq: int, device, position_ids=None, attention_mask=None):
        if position_ids is None:
            raise ValueError("a context-parallel model needs position_ids (the rotary positions of this rank's "
                             "tokens, from megacore.parallel.context_parallel.split_sample_for_cp)")
        doc_starts = None
        if attention_mask is not None:
            if (attention_mask.shape != position_ids.shape or attention_mask.is_floating_point()
                    or attention_mask.dtype == torch.bool):
                raise ValueError("a context-parallel model takes attention_mask only as the document start of each "
                                 f"local token ([B, S_local] integers, shape {tuple(position_ids.shape)}), as "
                                 "split_sample_for_cp makes of a packed-document mask; padding masks are not "
                                 f"supported; got {attention_mask.dtype} {tuple(attention_mask.shape)}")
            doc_starts = attention_mask.to(torch.int64)
        q_pos, k_pos = global_positions(position_ids.shape[-1], self.group, position_ids.device)
        if self.mode == "allgather":
            return cp_attention_mask(q_pos, k_pos, self.sliding_window, doc_starts).expand(batch, -1, -1, -1)
        lo = lowest_visible(q_pos[None].expand(batch, -1), doc_starts, self.sliding_window)
        if lo is None or self.mode == "ring":
            return lo
        a = C.group_size(self.a2a_group)
        lo = to_sorted(_gather_tokens(lo, self.a2a_group), a)
        if self.mode == "a2a+ring":
            return lo
        positions = torch.arange(lo.shape[1], device=lo.device)  # the whole sequence, in position order
        return block_mask(positions, positions, lo)


MODES = ("allgather", "ring", "a2a", "a2a+ring")


def _wrap(core: nn.Module, mode: str, group, a2a_group, ring_group, window: Optional[int]) -> nn.Module:
    if mode == "allgather":
        return ContextParallelAttention(core, group)
    if mode == "ring":
        return RingAttention(core, group, window)
    if mode == "a2a":
        return AllToAllAttention(core, group)
    return AllToAllAttention(RingAttention(core, ring_group, window), a2a_group)


def apply_context_parallel(model: nn.Module, group, mode: str = "allgather", a2a_size: Optional[int] = None) -> nn.Module:
    """Make ``model`` (a GPTModel or pipeline stage; TP may already be applied) context-parallel over
    ``group`` (the CP group of ``megacore.parallel.get_state()``): every core attention is wrapped for
    ``mode`` (``parallel.context_mode``: allgather, ring, a2a, or a2a+ring with all-to-all groups of
    ``a2a_size`` ranks), the attention mask becomes the CP mask, and every Mamba mixer passes its state
    between the ranks' chunks. The model must then be called with ``position_ids`` (its tokens'
    rotary positions: global, or per document; ``split_sample_for_cp``)."""
    if mode not in MODES:
        raise ValueError(f"context-parallel mode {mode!r} is not known; use one of {list(MODES)}")
    if C.group_size(group) == 1:
        return model
    a2a_group = ring_group = None
    if mode == "a2a":
        a2a_group = group
    elif mode == "a2a+ring":
        from megacore.parallel.topology import context_subgroups

        a2a_group, ring_group = context_subgroups(a2a_size, group)
    windows = {m.sliding_window for m in model.modules() if isinstance(m, (AttentionMask, ContextParallelMask))}
    window = next(iter(windows)) if len(windows) == 1 else None
    wrapped = (ContextParallelAttention, RingAttention, AllToAllAttention)
    for name, module in list(model.named_modules()):
        if isinstance(module, (SelfAttention, MultiLatentAttention)) and not isinstance(module.core_attention, wrapped):
            module.core_attention = _wrap(module.core_attention, mode, group, a2a_group, ring_group, window)
        elif isinstance(module, AttentionMask):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ContextParallelMask(group, module.sliding_window, mode, a2a_group))
    apply_mamba_context_parallel(model, group)
    return model
