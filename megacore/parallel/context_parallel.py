"""Context parallelism (CP): each rank of the CP group holds part of every sequence.

Split. The sequence of length S is cut into ``2·c`` equal chunks (c = CP size); rank r holds chunks
``r`` and ``2c-1-r`` (``cp_token_index``). Under causal attention the early chunks are cheap and
the late ones expensive, so pairing them balances the work across ranks. Each rank runs the whole
model on its S/c tokens.

Attention. The plan wraps every core attention from outside (``ContextParallelAttention``): queries
stay local; keys and values (after rotary, so each key carries its own global position) are
all-gathered over the CP group (``gather_kv``) before the wrapped core attends:

    forward   K = [K_0 | ... | K_{c-1}]  along the sequence (all-gather)
    backward  dK_r = Σ_j dK^{(j)} restricted to rank r's tokens  (reduce-scatter: every rank's
              queries contributed to the gradient of rank r's keys)

and the causal mask compares global positions: query i (position p_i) may attend to key j
(position q_j) iff q_j <= p_i, and within the sliding window if the model has one
(``cp_attention_mask``, built once per forward by ``ContextParallelMask``, which replaces the
model's ``attention_mask`` module). This is the all-gather form of CP: K/V memory is O(S) per rank (the
activations of the rest of the layer are O(S/c)), and one all-gather per layer per direction; ring
attention, which streams K/V blocks instead, is not implemented.

Multi-latent attention (``megacore.layers.mla``) is wrapped the same way: the per-head keys (the
shared rotary key already rotated and joined to each head) and values it builds from its latents are
gathered (the simplest correct form; gathering the small latents and up-projecting after the gather
would move less).

Mamba-2 mixers (hybrid stacks) scan along the sequence: ``apply_context_parallel`` hands each one
the state-passing strategy of ``megacore.parallel.mamba_context_parallel`` (conv halo and chunk
states exchanged over the CP group; exact). Everything else is token-wise, so it needs nothing. The loss is each rank's share of the global
mean: its tokens' loss sum divided by the labelled tokens of the whole global batch, which the
trainer sums over DP×CP. Gradients are summed over DP×CP by DDP, whose group is ``dp_cp``. RoPE
and learned positions use ``position_ids``: the global positions of the local tokens, set by
``split_for_cp``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from megacore.layers.attention import AttentionMask, SelfAttention, causal_mask
from megacore.layers.mla import MultiLatentAttention
from megacore.parallel import collectives as C
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


def split_sample_for_cp(sample: dict, cp_size: int, cp_rank: int) -> dict:
    """This CP rank's tokens of one sample (arrays of length S: tokens, labels, loss_mask, ...), with
    ``position_ids`` set to their global positions."""
    seq_len = len(sample["tokens"])
    index = cp_token_index(seq_len, cp_size, cp_rank)
    out = {k: np.asarray(v)[index] for k, v in sample.items()}
    if "position_ids" not in out:
        out["position_ids"] = index.astype(np.int64)
    return out


def gather_kv(x_BSGD: torch.Tensor, group) -> torch.Tensor:
    """All-gather keys or values over CP along the sequence; backward: reduce-scatter (see module doc)."""
    return C.gather_along_dim(x_BSGD, 1, group, grad_is_partial=True)


def cp_attention_mask(position_ids_BS: torch.Tensor, group, sliding_window: Optional[int] = None) -> torch.Tensor:
    """Boolean [B, 1, S_local, S] mask (True = may attend) of the local queries against the gathered keys."""
    keys_BS = C.gather_along_dim(position_ids_BS.contiguous(), 1, group, grad_is_partial=False)
    return causal_mask(position_ids_BS, keys_BS, sliding_window)[:, None]


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
    """In place of the model's ``AttentionMask``: the local queries against the gathered keys, causal
    by global position (``position_ids``, which a context-parallel model must be given)."""

    whole_sequence = False

    def __init__(self, group, sliding_window: Optional[int] = None):
        super().__init__()
        self.group, self.sliding_window = group, sliding_window

    def forward(self, batch: int, seq: int, device, position_ids=None, attention_mask=None):
        if position_ids is None or attention_mask is not None:
            raise ValueError("a context-parallel model needs position_ids (the global positions of this rank's "
                             "tokens, from megacore.parallel.context_parallel.split_sample_for_cp) and takes no "
                             "attention_mask")
        return cp_attention_mask(position_ids, self.group, self.sliding_window)


def apply_context_parallel(model: nn.Module, group) -> nn.Module:
    """Make ``model`` (a GPTModel or pipeline stage; TP may already be applied) context-parallel over
    ``group``: every core attention is wrapped to gather K/V over it, the attention mask becomes the
    CP mask, and every Mamba mixer passes its state between the ranks' chunks. The model must then be
    called with ``position_ids`` (the global positions of its tokens)."""
    if C.group_size(group) == 1:
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, (SelfAttention, MultiLatentAttention)) and not isinstance(module.core_attention, ContextParallelAttention):
            module.core_attention = ContextParallelAttention(module.core_attention, group)
        elif isinstance(module, AttentionMask):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ContextParallelMask(group, module.sliding_window))
    apply_mamba_context_parallel(model, group)
    return model
