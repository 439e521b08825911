"""Key/value cache for incremental decoding with a one-device ``GPTModel``.

    cache = KVCache.for_model(model, batch=2, max_length=256)
    logits = model(prompt_ids_BS, kv_cache=cache)        # prefill: positions 0..S-1
    logits = model(next_ids_B1, kv_cache=cache)          # decode: position S, attends to 0..S

Each attention layer stores the keys and values of every position it has seen (after QK-norm and
rotary, i.e. exactly what its attention reads) in preallocated [B, max_length, G, D] buffers, G
the layer's KV heads. A multi-latent attention layer (``megacore.layers.mla``) stores its compressed
latent (normed, [kv_lora_rank]) and rotary key ([qk_rope_head_dim]) per position instead, the same
two-tensor ``update`` with its own shapes, and rebuilds (or absorbs) the per-head keys and values
from them. A Mamba layer of a hybrid stack keeps its recurrent state instead (its last
conv inputs and the SSM state, ``megacore.layers.mamba.MambaState``), a fixed size per sequence. A forward with ``kv_cache`` feeds only the NEW tokens: their positions
continue from ``cache.length``; each layer appends their k/v and attends over everything cached
(causal, and within ``sliding_window`` when the model has one); ``cache.length`` advances by the
number of new tokens once the forward is done.

The math is the full forward's: the new tokens' queries see the same keys and values, at the same
positions, as they would in a forward over the whole sequence (``tests/inference/test_kv_cache.py``
checks logits and greedy tokens against the uncached model).
"""

from __future__ import annotations

from typing import Optional

import torch

from megacore.layers.attention import causal_mask


class LayerKVCache:
    """One layer's slice of a :class:`KVCache`: ``update(k, v)`` appends and returns all keys/values."""

    def __init__(self, cache: "KVCache", layer_number: int):
        self.cache, self.layer_number = cache, layer_number

    def update(self, k_BSGD: torch.Tensor, v_BSGD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(self.layer_number, k_BSGD, v_BSGD)

    def mamba_state(self, kernel: int):
        """This (Mamba) layer's recurrent state, created as zeros on first use."""
        return self.cache.mamba_state(self.layer_number, kernel)


class KVCache:
    """Keys and values of every layer for ``batch`` sequences of up to ``max_length`` positions."""

    def __init__(self, batch: int, max_length: int, kv_heads: int, head_dim: int, device=None,
                 dtype: torch.dtype = torch.float32):
        if batch < 1 or max_length < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_length >= 1, got batch={batch}, max_length={max_length}")
        self.batch, self.max_length = batch, max_length
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.device, self.dtype = device, dtype
        self.length = 0
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._mamba: dict = {}  # layer -> megacore.layers.mamba.MambaState (hybrid stacks)

    @classmethod
    def for_model(cls, model, batch: int, max_length: Optional[int] = None) -> "KVCache":
        """A cache shaped for ``model`` (a one-device GPTModel), on its device and in its dtype.
        ``max_length`` defaults to the model's ``seq_length``."""
        config = model.config
        p = next(model.parameters())
        length = config.seq_length if max_length is None else max_length
        return cls(batch, length, config.num_kv_heads, config.head_dim, p.device, p.dtype)

    def layer(self, layer_number: int) -> LayerKVCache:
        return LayerKVCache(self, layer_number)

    def reset(self) -> None:
        """Forget every position (the k/v buffers are kept for reuse; Mamba states start over)."""
        self.length = 0
        self._mamba.clear()

    def mamba_state(self, layer_number: int, kernel: int):
        """The recurrent state of Mamba layer ``layer_number`` (conv inputs and SSM state)."""
        from megacore.layers.mamba import MambaState

        if layer_number not in self._mamba:
            self._mamba[layer_number] = MambaState(kernel)
        return self._mamba[layer_number]

    def check_room(self, new_tokens: int, batch: int) -> None:
        if batch != self.batch:
            raise ValueError(f"the input has batch {batch} but the KV cache was made for batch {self.batch}; "
                             "make a new KVCache.for_model(model, batch=...)")
        if self.length + new_tokens > self.max_length:
            raise ValueError(f"the KV cache holds {self.length} of {self.max_length} positions and cannot take "
                             f"{new_tokens} more; make it larger (max_length) or reset() it and re-feed the "
                             "context you want to keep")

    def update(self, layer_number: int, k_BSGD: torch.Tensor, v_BSGD: torch.Tensor):
        """Write the new tokens' k/v at positions ``length..length+S`` of layer ``layer_number``;
        return the layer's keys and values for positions ``0..length+S``.

        The two tensors are whatever per-position state the layer's attention keeps, each [B, S, ...]
        with its own trailing shape (a multi-latent attention layer passes its normed latent
        [B, S, 1, kv_lora_rank] and rotary key [B, S, 1, qk_rope_head_dim]); buffers are made on first use."""
        s = k_BSGD.shape[1]
        if layer_number not in self._k:
            self._k[layer_number] = k_BSGD.new_empty((self.batch, self.max_length, *k_BSGD.shape[2:]))
            self._v[layer_number] = v_BSGD.new_empty((self.batch, self.max_length, *v_BSGD.shape[2:]))
        k_all, v_all = self._k[layer_number], self._v[layer_number]
        end = self.length + s
        k_all[:, self.length:end] = k_BSGD
        v_all[:, self.length:end] = v_BSGD
        return k_all[:, :end], v_all[:, :end]

    def positions(self, new_tokens: int, batch: int, device) -> torch.Tensor:
        """Positions [B, new_tokens] of the new tokens: every row continues from ``length``."""
        return torch.arange(self.length, self.length + new_tokens, device=device)[None, :].expand(batch, new_tokens)

    def advance(self, new_tokens: int) -> None:
        """Count ``new_tokens`` positions as cached (the model calls this after every layer appended)."""
        self.length += new_tokens

    def attention_mask(self, new_tokens: int, device, sliding_window: Optional[int] = None):
        """Boolean mask [1, 1, S_new, length + S_new] (True = may attend) for the new tokens' queries, or
        None when it is plain causal attention over a fresh cache (SDPA's causal fast path)."""
        start = self.length
        if start == 0 and sliding_window is None:
            return None
        queries = torch.arange(start, start + new_tokens, device=device)
        keys = torch.arange(start + new_tokens, device=device)
        return causal_mask(queries, keys, sliding_window)[None, None]
