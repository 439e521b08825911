"""Autoregressive decoding: greedy and temperature / top-k / top-p sampling, with a KV cache.

    ids_BT = generate(model, prompt_ids_BS, max_new_tokens=32)                              # greedy
    ids_BT = generate(model, prompt_ids_BS, 32, temperature=0.8, top_k=50, top_p=0.95, seed=1)

A one-device ``GPTModel`` decodes with a ``megacore.inference.KVCache``: the prompt is fed once
(prefill), then each step feeds only the newest token, whose attention reads the cached keys and
values. Any other causal LM (``model(ids)`` -> logits), or ``use_cache=False``, re-runs the full
forward over the whole sequence for every token (O(T²)); both give the same tokens.

The model never sees more than ``config.seq_length`` positions: once the sequence grows past it,
only the last window is fed (uncached), or, with the cache, the cache is reset and refilled with
the last window at every further step, which is the same computation.

Next-token choice from the logits ``z`` of the last position (fp32), in Hugging Face's order:

* ``temperature == 0``: greedy, ``argmax z`` (ties to the lowest id, as ``torch.argmax``).
* otherwise ``z / temperature``; then top-k keeps the ``k`` largest logits (``top_k > 0``); then
  top-p keeps the smallest set of most likely tokens whose probability mass reaches ``top_p``
  (``top_p < 1``; the most likely token always stays); then one draw from ``softmax`` of what is
  left, using a CPU ``torch.Generator`` seeded with ``seed``, so a seed gives the same tokens on
  any device.

Stopping: a row stops after it emits one of ``eos_ids``; finished rows are padded with their eos id
until every row has stopped or ``max_new_tokens`` is reached.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch


def filter_logits(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set every logit outside the top-k / top-p set to -inf (``logits_BV`` [B, V] fp32, not modified)."""
    out = logits_BV.clone()
    vocab = out.shape[-1]
    if top_k and 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs       # mass of the more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False                             # keep at least the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def next_token(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Token ids [B] chosen from the last-position logits [B, V] (see the module docstring)."""
    logits = logits_BV.float()
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits_BV.device)


def _new_cache(model, batch: int, window: Optional[int]):
    """A KVCache for a whole one-device GPTModel, else None (decode without a cache)."""
    from megacore.models.gpt import GPTModel

    if not isinstance(model, GPTModel) or not model.supports_kv_cache or not window:
        return None
    from megacore.inference.kv_cache import KVCache

    return KVCache.for_model(model, batch, max_length=window)


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = no top-k filter)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = no top-p filter)")


class Continuation:
    """Prompts [B, S] growing by one token per row per step. A row that has produced one of
    ``eos_ids`` is finished: it repeats that token from then on."""

    def __init__(self, ids: torch.Tensor, eos_ids: Iterable[int] = ()):
        self.ids = ids
        self.eos = torch.tensor(sorted({int(e) for e in eos_ids}), dtype=ids.dtype, device=ids.device)
        self.finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        self.pad = torch.zeros_like(self.finished, dtype=ids.dtype)

    def append(self, token_B: torch.Tensor) -> bool:
        """Add each row's next token; True once every row has finished (which reads the device)."""
        token_B = torch.where(self.finished, self.pad, token_B)
        self.ids = torch.cat([self.ids, token_B[:, None]], dim=1)
        if not self.eos.numel():
            return False
        hit = torch.isin(token_B, self.eos)
        self.pad = torch.where(hit & ~self.finished, token_B, self.pad)
        self.finished |= hit
        return bool(self.finished.all())


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
             eos_ids: Iterable[int] = (), use_cache: bool = True) -> torch.Tensor:
    """Continue ``input_ids`` [B, S] (or [S]) by up to ``max_new_tokens`` tokens; returns [B, S + n].

    ``model(ids)`` must return logits [B, S, V] (a one-device ``GPTModel``, or any causal LM with
    that signature). The model is switched to eval mode for the call and restored afterwards.
    ``use_cache``: decode with a KV cache when the model supports one (see the module docstring).
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    squeeze = input_ids.dim() == 1
    ids = input_ids.unsqueeze(0) if squeeze else input_ids
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}")
    window = getattr(getattr(model, "config", None), "seq_length", None)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = Continuation(ids, eos_ids)
    was_training = model.training
    model.eval()
    cache = _new_cache(model, ids.shape[0], window) if use_cache else None
    try:
        for _ in range(max_new_tokens):
            ids = out.ids
            context = ids[:, -window:] if window else ids
            if cache is None:
                logits_BV = model(context)[:, -1, :]
            else:
                if cache.length == 0 or cache.length + 1 > cache.max_length:
                    cache.reset()          # first step, or the window is full: (re)fill it
                    feed = context
                else:
                    feed = ids[:, -1:]     # only the newest token; the rest is cached
                logits_BV = model(feed, kv_cache=cache)[:, -1, :]
            if out.append(next_token(logits_BV, temperature, top_k, top_p, generator)):
                break
    finally:
        model.train(was_training)
    return out.ids[0] if squeeze else out.ids
