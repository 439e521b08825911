"""Batched prefill: several sequences' new tokens packed into one row of one forward.

    inp = pack_chunks([PrefillChunk(tokens, start, blocks, ...), ...], block_size)
    first = runner.prefill_packed(inp)        # [R]: each sequence's next token (where ``sample``)

A *chunk* is the next ``tokens`` of one sequence, at positions ``start ...``, whose first ``start``
positions are already in its blocks (0 for a new prompt; more for the later chunks of a long prompt
prefilled across several calls, or a prompt whose leading blocks came from the prefix cache). The
chunks are concatenated into one ``[1, T]`` input (varlen packing: no padding), and ``PackedView``
is the cache the model reads for that forward:

- ``positions``: each token's position in its own sequence (they restart per chunk's sequence);
- writes: each token's keys/values (or MLA latents) go to ``(its block, position % block_size)``;
- reads: when no chunk has cached positions, the new keys as they are (``T`` keys); otherwise every
  chunk's sequence gathered from its blocks, positions ``0 .. start + len - 1`` each (``K`` keys);
- the mask: a query sees a key of the same sequence at or before its position (and within the
  sliding window) -- block-diagonal causal, so no sequence reads another's tokens.

Attention layers (grouped-query and multi-latent) only see ``update`` and a boolean mask, so both
pack. A Mamba layer's scan has no per-token reset, so hybrid Mamba stacks do not pack: the engine
prefills them one sequence at a time (``CacheBatch(fresh=True)``).

Every field of ``PackedInputs`` is a tensor, built on the host once per call, so the forward itself
reads nothing back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megacore.layers.attention import causal_mask


@dataclass
class PrefillChunk:
    """The next ``tokens`` of one sequence (host lists; see the module docstring)."""
    tokens: Sequence[int]
    start: int                 # positions of the sequence already cached (its keys are read, not computed)
    blocks: Sequence[int]      # the sequence's block table, covering start + len(tokens) positions
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    sample: bool = True        # sample the next token after the last one (else only fill the cache)


@dataclass
class PackedInputs:
    """One packed prefill call; T new tokens of R sequences, K keys read (0: the new keys)."""
    ids: torch.Tensor          # [1, T] int64
    pos: torch.Tensor          # [T] int64: each token's position in its sequence
    seq: torch.Tensor          # [T] int64: which chunk (0..R-1) it belongs to
    block: torch.Tensor        # [T] int64: where its entries are written
    offset: torch.Tensor       # [T] int64
    key_block: torch.Tensor    # [K] int64: keys read (every chunk's positions 0..end-1); K = 0: the new keys
    key_offset: torch.Tensor   # [K] int64
    key_seq: torch.Tensor      # [K] int64
    key_pos: torch.Tensor      # [K] int64
    last: torch.Tensor         # [R] int64: index in T of each chunk's last token
    temperature: torch.Tensor  # [R] float32
    top_k: torch.Tensor        # [R] int64
    top_p: torch.Tensor        # [R] float32
    seed: torch.Tensor         # [R] int64
    sample: torch.Tensor       # [R] int64: 1 = sample the next token
    max_end: torch.Tensor      # [1] int64: the largest start + len (positions bound of learned embeddings)


def pack_chunks(chunks: Sequence[PrefillChunk], block_size: int) -> PackedInputs:
    if not chunks:
        raise ValueError("pack_chunks needs at least one chunk")
    ids, pos, seq, kpos, kseq, last = [], [], [], [], [], []
    block, kblock = [], []
    for i, c in enumerate(chunks):
        n, end = len(c.tokens), c.start + len(c.tokens)
        if n < 1 or len(c.blocks) * block_size < end:
            raise ValueError(f"chunk {i}: {n} tokens at position {c.start} need {end} positions of blocks, "
                             f"its table holds {len(c.blocks) * block_size}")
        ids += list(c.tokens)
        pos += range(c.start, end)
        seq += [i] * n
        block += [c.blocks[p // block_size] for p in range(c.start, end)]
        kpos += range(end)
        kseq += [i] * end
        kblock += [c.blocks[p // block_size] for p in range(end)]
        last.append(len(ids) - 1)
    gather = any(c.start > 0 for c in chunks)

    def t(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype)

    pos_t = t(pos)
    empty = torch.zeros(0, dtype=torch.int64)
    return PackedInputs(
        ids=t([ids]), pos=pos_t, seq=t(seq), block=t(block), offset=pos_t % block_size,
        key_block=t(kblock) if gather else empty, key_offset=t(kpos) % block_size if gather else empty,
        key_seq=t(kseq) if gather else empty, key_pos=t(kpos) if gather else empty, last=t(last),
        temperature=t([float(c.temperature) for c in chunks], torch.float32), top_k=t([c.top_k for c in chunks]),
        top_p=t([float(c.top_p) for c in chunks], torch.float32), seed=t([c.seed for c in chunks]),
        sample=t([1 if c.sample else 0 for c in chunks]),
        max_end=t([max(c.start + len(c.tokens) for c in chunks)]))


class _PackedLayer:
    def __init__(self, view: "PackedView", layer: int):
        self.view, self.layer = view, layer

    def update(self, k, v):
        return self.view.update(self.layer, k, v)

    def mamba_state(self, kernel: int):
        raise ValueError("a Mamba layer cannot prefill packed sequences (its scan does not restart per sequence); "
                         "prefill hybrid Mamba models one sequence at a time (ModelRunner.prefill)")


class PackedView:
    """The cache interface (``megacore.inference.cache``) over a ``PackedInputs`` (device tensors)."""

    def __init__(self, store, inp: PackedInputs, host_max_end: int):
        self.store, self.inp = store, inp
        self.new = inp.ids.shape[1]
        # GPTModel checks ``length + new`` against seq_length for learned positions: the packed row is
        # not one sequence, its furthest position is what must fit.
        self.length = host_max_end - self.new
        self._gather = inp.key_block.numel() > 0

    def check_room(self, new_tokens: int, batch: int) -> None:
        if batch != 1 or new_tokens != self.new:
            raise ValueError(f"a packed prefill takes its [1, {self.new}] ids, got [{batch}, {new_tokens}]")

    def positions(self, new_tokens: int, batch: int, device) -> torch.Tensor:
        return self.inp.pos[None, :]

    def attention_mask(self, new_tokens: int, device, sliding_window=None) -> torch.Tensor:
        inp = self.inp
        kseq, kpos = (inp.key_seq, inp.key_pos) if self._gather else (inp.seq, inp.pos)
        mask = (inp.seq[:, None] == kseq[None, :]) & causal_mask(inp.pos, kpos, sliding_window)
        return mask[None, None]

    def layer(self, layer_number: int) -> _PackedLayer:
        return _PackedLayer(self, layer_number)

    def advance(self, new_tokens: int) -> None:
        pass

    def update(self, layer: int, k_BS: torch.Tensor, v_BS: torch.Tensor):
        k_pool, v_pool = self.store.k[layer], self.store.v[layer]
        k_pool[self.inp.block, self.inp.offset] = k_BS[0].to(k_pool.dtype)
        v_pool[self.inp.block, self.inp.offset] = v_BS[0].to(v_pool.dtype)
        if not self._gather:
            return k_BS, v_BS
        return k_pool[self.inp.key_block, self.inp.key_offset][None], v_pool[self.inp.key_block, self.inp.key_offset][None]
