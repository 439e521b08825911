"""Paged (block) KV storage for batched decoding, and the per-forward view the model reads.

    shapes = probe_cache_shapes(model)                       # what each layer keeps per position
    store = KVStore(shapes, num_blocks=257, block_size=16, num_slots=8, device="cuda")
    view = CacheBatch(store, slots_B, table_BN, lengths_B, key_len=N * 16)
    logits = model(tokens_B1, kv_cache=view)                 # decode: row b at position lengths[b]

**Storage.** Every attention layer owns two pools ``[num_blocks, block_size, *per_position]``: keys
and values [G, D] for grouped-query attention (G the layer's local KV heads, so a tensor-parallel
shard keeps only its heads), the normed latent [1, kv_lora_rank] and rotated key [1,
qk_rope_head_dim] for multi-latent attention -- whatever two tensors the layer's attention hands
its cache (``probe_cache_shapes`` runs one token through the model to find out, so the store never
guesses a layer's layout). A sequence owns a list of blocks (its row of the block table, logical
block i = positions ``i*block_size ...``), taken from a free list as it grows and returned when it
finishes, so memory follows the tokens actually held, not the longest possible request. Block 0 is
never handed out: it is where padding rows and unallocated table entries point, a scratch block.

A Mamba layer of a hybrid stack keeps a fixed-size state per sequence instead (its last conv inputs
[conv_dim, kernel-1] and the SSM state [heads, head_dim, state], fp32): ``[num_slots + 1, ...]``
buffers indexed by the sequence's *slot* (the last slot is the padding rows' scratch).

**The view** (``CacheBatch``) is what ``GPTModel.forward(kv_cache=...)`` reads for one forward of a
batch: each row's slot, block-table row and cached length, as device tensors. Positions, the
attention mask and the cache reads and writes are all computed on the device from them, with no
host synchronization, so a decode step over a fixed (batch, key length) shape can be captured in a
CUDA graph and replayed with new contents. Writes scatter each new token's entries to
``(table[b, pos // block_size], pos % block_size)``; reads gather the row's blocks into
``[B, key_len, ...]`` and the mask ``key <= query position`` (and the sliding window) hides the
positions a row does not hold. ``contiguous=True`` (one block per row, rows = slots 0..B-1: the
static cache of ``megacore.inference.static.generate_static``) reads a slice instead of a gather.
``fresh=True`` is a prefill from position 0: the new keys and values are returned as they are and
the mask is plain causal (None), SDPA's fast causal path.

Decode without the gather: a grouped-query attention layer first offers the view its query
(``attend``); with ``paged_kernel`` the view writes the new keys and values and runs
``megacore.inference.paged_attention`` over the row's blocks in place, reading only the blocks a row
holds (the default on CUDA). Layers that do not offer (multi-latent attention) read the gather.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from megacore.layers.attention import causal_mask


@dataclass
class CacheShapes:
    """Per layer, what one position (attention) or one sequence (Mamba) keeps."""
    kv: dict = field(default_factory=dict)      # layer -> ((k shape, k dtype), (v shape, v dtype)), per position
    mamba: dict = field(default_factory=dict)   # layer -> ((conv shape, dtype), (ssm shape, dtype)), per sequence

    def bytes_per_block(self, block_size: int) -> int:
        total = 0
        for (ks, kd), (vs, vd) in self.kv.values():
            total += block_size * (_numel(ks) * kd.itemsize + _numel(vs) * vd.itemsize)
        return total

    def bytes_per_slot(self) -> int:
        return sum(_numel(cs) * cd.itemsize + _numel(ss) * sd.itemsize for (cs, cd), (ss, sd) in self.mamba.values())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _ProbeState:
    def __init__(self, kernel: int):
        self.kernel, self.conv, self.ssm = kernel, None, None

    def conv_inputs(self, batch: int, xbc_BSC: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            self.conv = xbc_BSC.new_zeros(batch, xbc_BSC.shape[-1], self.kernel - 1)
        return self.conv


class _ProbeLayer:
    def __init__(self, probe: "_Probe", layer: int):
        self.probe, self.layer = probe, layer

    def update(self, k, v):
        self.probe.shapes.kv[self.layer] = ((tuple(k.shape[2:]), k.dtype), (tuple(v.shape[2:]), v.dtype))
        return k, v

    def mamba_state(self, kernel: int):
        state = self.probe.states[self.layer] = _ProbeState(kernel)
        return state


class _Probe:
    """A one-token cache that records what each layer stores."""
    length = 0

    def __init__(self):
        self.shapes, self.states = CacheShapes(), {}

    def check_room(self, new_tokens: int, batch: int) -> None:
        pass

    def positions(self, new_tokens: int, batch: int, device) -> torch.Tensor:
        return torch.arange(new_tokens, device=device)[None, :].expand(batch, new_tokens)

    def attention_mask(self, new_tokens: int, device, sliding_window=None):
        return None

    def layer(self, layer_number: int) -> _ProbeLayer:
        return _ProbeLayer(self, layer_number)

    def advance(self, new_tokens: int) -> None:
        pass


@torch.no_grad()
def probe_cache_shapes(model, device=None) -> CacheShapes:
    """Run one token through ``model`` (collective under tensor parallelism) and record what each
    layer's cache holds."""
    p = next(model.parameters())
    device = device or p.device
    probe = _Probe()
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    if getattr(model, "pre_process", True):
        model(ids, kv_cache=probe)
    else:  # a later pipeline stage: what the previous stage would hand it
        model(ids, hidden_states=torch.zeros(1, 1, model.config.hidden_size, dtype=p.dtype, device=device),
              kv_cache=probe)
    for layer, st in probe.states.items():
        probe.shapes.mamba[layer] = ((tuple(st.conv.shape[1:]), st.conv.dtype), (tuple(st.ssm.shape[1:]), st.ssm.dtype))
    return probe.shapes


class KVStore:
    """The pools of every layer (see the module docstring). Block 0 and slot ``num_slots`` are scratch."""

    def __init__(self, shapes: CacheShapes, num_blocks: int, block_size: int, num_slots: int, device):
        if num_blocks < 2 or block_size < 1 or num_slots < 1:
            raise ValueError(f"KVStore needs num_blocks >= 2 (block 0 is scratch), block_size >= 1 and num_slots >= 1; "
                             f"got num_blocks={num_blocks}, block_size={block_size}, num_slots={num_slots}")
        self.shapes, self.num_blocks, self.block_size, self.num_slots = shapes, num_blocks, block_size, num_slots
        self.device = torch.device(device)
        self.k, self.v, self.conv, self.ssm = {}, {}, {}, {}
        for layer, ((ks, kd), (vs, vd)) in shapes.kv.items():
            self.k[layer] = torch.zeros((num_blocks, block_size, *ks), dtype=kd, device=self.device)
            self.v[layer] = torch.zeros((num_blocks, block_size, *vs), dtype=vd, device=self.device)
        for layer, ((cs, cd), (ss, sd)) in shapes.mamba.items():
            self.conv[layer] = torch.zeros((num_slots + 1, *cs), dtype=cd, device=self.device)
            self.ssm[layer] = torch.zeros((num_slots + 1, *ss), dtype=sd, device=self.device)

    @property
    def scratch_slot(self) -> int:
        return self.num_slots


class _MambaSlots:
    """A Mamba layer's state for the rows of a ``CacheBatch``: reads gather the rows' slots, writes
    (``state.conv = ...``) scatter back in place, so the buffers keep their addresses (graphs)."""

    def __init__(self, view: "CacheBatch", layer: int, kernel: int):
        self.view, self.layer, self.kernel = view, layer, kernel

    def _read(self, buf):
        return buf.index_select(0, self.view.slots)

    def _write(self, buf, value):
        buf.index_copy_(0, self.view.slots, value.to(buf.dtype))

    @property
    def conv(self):
        return None if self.view.fresh else self._read(self.view.store.conv[self.layer])

    @conv.setter
    def conv(self, value):
        self._write(self.view.store.conv[self.layer], value)

    @property
    def ssm(self):
        return None if self.view.fresh else self._read(self.view.store.ssm[self.layer])

    @ssm.setter
    def ssm(self, value):
        self._write(self.view.store.ssm[self.layer], value)

    def conv_inputs(self, batch: int, xbc_BSC: torch.Tensor) -> torch.Tensor:
        if self.view.fresh:  # a sequence starts: zeros, what the uncached forward assumes before position 0
            return xbc_BSC.new_zeros(batch, xbc_BSC.shape[-1], self.kernel - 1)
        return self._read(self.view.store.conv[self.layer])


class _LayerView:
    def __init__(self, view: "CacheBatch", layer: int):
        self.view, self.layer = view, layer

    def update(self, k, v):
        return self.view.update(self.layer, k, v)

    def attend(self, q, k, v, scale: float):
        return self.view.attend(self.layer, q, k, v, scale)

    def mamba_state(self, kernel: int):
        return _MambaSlots(self.view, self.layer, kernel)


class CacheBatch:
    """One forward's view of a ``KVStore`` (see the module docstring).

    ``slots`` [B], ``table`` [B, N] block ids, ``lengths`` [B] positions each row holds (the new
    tokens go at ``lengths[b] + i``), all int64 on the store's device; ``key_len``: keys a row reads
    (``N * block_size`` when paged; at most ``block_size`` when ``contiguous``). ``host_length``: the
    largest length of the batch as the host knows it (``length``, read for learned positions).
    ``paged_kernel``: decode attention layers read the pools directly (``attend``; ``"force"``: the
    Triton kernel even on the CPU, through its interpreter). ``logits_at``: the new positions the
    model computes logits for (an index or slice along the sequence; None: all); a prefill that
    samples from its last position alone passes ``slice(-1, None)``, so no [B, S, vocab] tensor is made.
    """

    kernel_failed = False  # set once the paged kernel raised: every later view gathers instead

    def __init__(self, store: KVStore, slots: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
                 key_len: int = 0, fresh: bool = False, contiguous: bool = False, host_length: int = 0,
                 paged_kernel: bool = False, logits_at=None):
        self.store, self.slots, self.table, self.lengths = store, slots, table, lengths
        self.logits_at = logits_at
        self.key_len, self.fresh, self.contiguous, self.length = key_len, fresh, contiguous, host_length
        self.paged_kernel = bool(paged_kernel) and not fresh and not contiguous
        self._force = paged_kernel == "force"  # the Triton kernel even on the CPU (its interpreter; tests)
        self._pos: Optional[torch.Tensor] = None
        self._window: Optional[int] = None

    # ------------------------------------------------------------------ what GPTModel calls
    def check_room(self, new_tokens: int, batch: int) -> None:
        if batch != self.slots.shape[0]:
            raise ValueError(f"the input has batch {batch} but the cache view has {self.slots.shape[0]} rows")

    def positions(self, new_tokens: int, batch: int, device) -> torch.Tensor:
        if self._pos is None or self._pos.shape[1] != new_tokens:
            offsets = torch.arange(new_tokens, device=device)[None, :]
            self._pos = offsets.expand(batch, new_tokens) if self.fresh else self.lengths[:, None] + offsets
        return self._pos

    def attention_mask(self, new_tokens: int, device, sliding_window: Optional[int] = None):
        self._window = sliding_window  # (the paged kernel masks by itself; layers without it read the mask)
        if self.fresh:
            if sliding_window is None:
                return None
            pos = torch.arange(new_tokens, device=device)
            return causal_mask(pos, pos, sliding_window)[None, None]
        q = self.positions(new_tokens, self.slots.shape[0], device)
        keys = torch.arange(self.key_len, device=device)
        return causal_mask(q, keys, sliding_window)[:, None]

    def layer(self, layer_number: int) -> _LayerView:
        return _LayerView(self, layer_number)

    def advance(self, new_tokens: int) -> None:
        pass  # the caller advances ``lengths`` (on the device, inside the decode step)

    # ------------------------------------------------------------------ reads and writes
    def _write(self, layer: int, k_BS: torch.Tensor, v_BS: torch.Tensor) -> None:
        k_pool, v_pool = self.store.k[layer], self.store.v[layer]
        bs = self.store.block_size
        pos = self.positions(k_BS.shape[1], k_BS.shape[0], k_BS.device)
        block = self.table.gather(1, torch.div(pos, bs, rounding_mode="floor"))
        offset = pos % bs
        k_pool[block, offset] = k_BS.to(k_pool.dtype)
        v_pool[block, offset] = v_BS.to(v_pool.dtype)

    def attend(self, layer: int, q_BSHD: torch.Tensor, k_BS: torch.Tensor, v_BS: torch.Tensor, scale: float):
        """Write the new token's keys and values and attend from the pools directly (the paged decode
        kernel, ``megacore.inference.paged_attention``); None when this forward is not one it serves
        (prefill, several new tokens, the static layout), and nothing is written then."""
        if not self.paged_kernel or q_BSHD.shape[1] != 1 or CacheBatch.kernel_failed:
            return None
        from megacore.inference.paged_attention import kernel_supports, paged_decode_attention

        k_pool, v_pool = self.store.k[layer], self.store.v[layer]
        if not kernel_supports(k_pool, self.store.block_size):
            return None
        self._write(layer, k_BS, v_BS)
        width = max(self.key_len // self.store.block_size, 1)
        try:
            out = paged_decode_attention(q_BSHD[:, 0], k_pool, v_pool, self.table[:, :width], self.lengths, scale,
                                         self._window, force_triton=self._force)
        except Exception as e:  # e.g. a Triton build that cannot compile it: the gather path from now on
            warnings.warn(f"paged decode attention kernel failed ({type(e).__name__}: {e}); decoding reads the "
                          "blocks through a gather instead")
            CacheBatch.kernel_failed = True
            self.paged_kernel = False
            return None
        return out[:, None]

    def update(self, layer: int, k_BS: torch.Tensor, v_BS: torch.Tensor):
        k_pool, v_pool = self.store.k[layer], self.store.v[layer]
        bs = self.store.block_size
        self._write(layer, k_BS, v_BS)
        if self.fresh:
            return k_BS, v_BS
        if self.contiguous:
            b = k_BS.shape[0]
            return k_pool[:b, : self.key_len], v_pool[:b, : self.key_len]
        n = self.key_len // bs
        rows = self.table[:, :n]
        k_all = k_pool[rows].flatten(1, 2)
        v_all = v_pool[rows].flatten(1, 2)
        return k_all, v_all
