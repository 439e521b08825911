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
- reads (``update``): when no chunk has cached positions, the new keys as they are (``T`` keys); otherwise every
  chunk's sequence gathered from its blocks, positions ``0 .. start + len - 1`` each (``K`` keys);
- the mask: a query sees a key of the same sequence at or before its position (and within the
  sliding window) -- block-diagonal causal, so no sequence reads another's tokens.

Grouped-query attention layers offer their query to the view (``attend``), which runs one SDPA per
chunk over that chunk's own keys (the causal fast path for a chunk from position 0); multi-latent
attention layers read ``update`` and attend over the whole row with the block-diagonal mask. A Mamba layer's scan has no per-token reset, so hybrid Mamba stacks do not pack: the engine
prefills them one sequence at a time (``CacheBatch(fresh=True)``).

Every field of ``PackedInputs`` is a tensor, built on the host once per call, so the forward itself
reads nothing back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megacore.inference.cache import _LayerView
from megacore.layers.attention import attention_sdpa, causal_mask


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
        sample=t([1 if c.sample else 0 for c in chunks]))


class _PackedLayer(_LayerView):
    """One layer's view of a packed prefill: the paged view's ``update``/``attend``, no Mamba state."""

    def mamba_state(self, kernel: int):
        raise ValueError("a Mamba layer cannot prefill packed sequences (its scan does not restart per sequence); "
                         "prefill hybrid Mamba models one sequence at a time (ModelRunner.prefill)")


def segments(inp: PackedInputs) -> list:
    """Per chunk, on the host: (first token index, end token index, start position, first key index)."""
    last, pos = inp.last.tolist(), inp.pos.tolist()
    out, a, ka = [], 0, 0
    for b in (x + 1 for x in last):
        start = pos[a]
        out.append((a, b, start, ka))
        ka += start + b - a
        a = b
    return out


class PackedView:
    """The cache interface (``megacore.inference.cache``) over a ``PackedInputs`` (device tensors);
    ``segs``: ``segments(inp)`` of the host copy (so that the forward reads nothing back)."""

    def __init__(self, store, inp: PackedInputs, segs: list):
        self.store, self.inp, self.segs = store, inp, segs
        self.new = inp.ids.shape[1]
        # GPTModel checks ``length + new`` against seq_length for learned positions: the packed row is
        # not one sequence, its furthest position is what must fit.
        self.length = max(start + b - a for a, b, start, _ in segs) - self.new
        self._gather = inp.key_block.numel() > 0
        self._window = None
        self.logits_at = inp.last  # logits only where a chunk ends (what the runner samples from)

    def check_room(self, new_tokens: int, batch: int) -> None:
        if batch != 1 or new_tokens != self.new:
            raise ValueError(f"a packed prefill takes its [1, {self.new}] ids, got [{batch}, {new_tokens}]")

    def positions(self, new_tokens: int, batch: int, device) -> torch.Tensor:
        return self.inp.pos[None, :]

    def attention_mask(self, new_tokens: int, device, sliding_window=None) -> torch.Tensor:
        self._window = sliding_window
        inp = self.inp
        kseq, kpos = (inp.key_seq, inp.key_pos) if self._gather else (inp.seq, inp.pos)
        mask = (inp.seq[:, None] == kseq[None, :]) & causal_mask(inp.pos, kpos, sliding_window)
        return mask[None, None]

    def layer(self, layer_number: int) -> _PackedLayer:
        return _PackedLayer(self, layer_number)

    def advance(self, new_tokens: int) -> None:
        pass

    def _write(self, layer: int, k_BS: torch.Tensor, v_BS: torch.Tensor) -> None:
        k_pool, v_pool = self.store.k[layer], self.store.v[layer]
        k_pool[self.inp.block, self.inp.offset] = k_BS[0].to(k_pool.dtype)
        v_pool[self.inp.block, self.inp.offset] = v_BS[0].to(v_pool.dtype)

    def attend(self, layer: int, q_BSHD: torch.Tensor, k_BS: torch.Tensor, v_BS: torch.Tensor, scale: float):
        """Grouped-query attention, one SDPA per chunk over its own keys: the causal fast path for a
        chunk from position 0, its gathered blocks and a mask otherwise. (The one masked SDPA over
        the whole row that ``update`` + the mask give would cost T x K scores instead of the sum of
        each chunk's.)"""
        self._write(layer, k_BS, v_BS)
        k_pool, v_pool = self.store.k[layer], self.store.v[layer]
        outs = []
        for a, b, start, ka in self.segs:
            q = q_BSHD[:, a:b]
            if start == 0:
                k, v = k_BS[:, a:b], v_BS[:, a:b]
                mask = None
                if self._window is not None:
                    p = torch.arange(b - a, device=q.device)
                    mask = causal_mask(p, p, self._window)[None, None]
            else:
                kb, ko = self.inp.key_block[ka:ka + start + b - a], self.inp.key_offset[ka:ka + start + b - a]
                k, v = k_pool[kb, ko][None].to(k_BS.dtype), v_pool[kb, ko][None].to(v_BS.dtype)
                mask = causal_mask(self.inp.pos[a:b], torch.arange(start + b - a, device=q.device), self._window)[None, None]
            outs.append(attention_sdpa(q, k, v, mask, scale))
        return torch.cat(outs, dim=1)

    def update(self, layer: int, k_BS: torch.Tensor, v_BS: torch.Tensor):
        self._write(layer, k_BS, v_BS)
        k_pool, v_pool = self.store.k[layer], self.store.v[layer]
        if not self._gather:
            return k_BS, v_BS
        return k_pool[self.inp.key_block, self.inp.key_offset][None], v_pool[self.inp.key_block, self.inp.key_offset][None]
