"""Fixed-batch generation with a static KV cache and CUDA-graph decode steps.

    ids_BT = generate_static(model, prompt_ids_BS, max_new_tokens=128)          # greedy
    ids_BT = generate_static(model, prompt_ids_BS, 64, temperature=0.8, top_p=0.9, seed=1, eos_ids=[2])

The cache is preallocated once: per layer ``[B, max_length, *per_position]`` keys and values (GQA
heads, or MLA's latent and rotary key; Mamba layers their per-sequence state), i.e. a
``megacore.inference.cache.KVStore`` with one block of ``max_length`` positions per row, read as a
slice (no gather). The prompts (all of one length) are prefilled in one forward with SDPA's causal
kernel; then ``megacore.inference.runner.ModelRunner`` decodes ``steps_per_sync`` tokens per host
synchronization, each step a replay of a CUDA graph captured for (batch, key-length bucket) on CUDA
(eager on the CPU). Rows stop on an ``eos_ids`` token (on the device) and are padded with it, like
``megacore.inference.sampling.generate``; sampling uses ``megacore.inference.device_sampling`` (a
seed's tokens differ from ``sampling.generate``'s CPU-generator draws, greedy tokens do not).
Positions never pass ``max_length`` (default ``model.config.seq_length``): ``prompt +
max_new_tokens`` beyond it is refused, there is no sliding re-feed as in ``sampling.generate``.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from megacore.inference.cache import KVStore, probe_cache_shapes
from megacore.inference.runner import DecodeInputs, ModelRunner, PrefillInputs, bucket
from megacore.inference.sampling import check_sampling_args


class StaticGenerator:
    """A static cache and runner for ``batch`` rows of up to ``max_length`` positions, reusable
    across calls (the captured graphs are kept)."""

    def __init__(self, model: torch.nn.Module, batch: int, max_length: Optional[int] = None,
                 use_graphs: Optional[bool] = None, steps_per_sync: int = 16, min_key_bucket: int = 256,
                 compile_step: bool = False):
        if not getattr(model, "supports_kv_cache", False):
            raise ValueError("static-cache generation needs a whole GPTModel that decodes with a KV cache (not a "
                             "pipeline stage, nor a context- or sequence-parallel model)")
        self.model, self.batch = model, batch
        self.max_length = max_length or model.config.seq_length
        self.steps_per_sync, self.min_key_bucket = steps_per_sync, min_key_bucket
        p = next(model.parameters())
        self.store = KVStore(probe_cache_shapes(model, p.device), num_blocks=batch + 1, block_size=self.max_length,
                             num_slots=batch, device=p.device)
        self.runner = ModelRunner(model, self.store, use_graphs=use_graphs, contiguous=True, compile_step=compile_step)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, eos_ids: Iterable[int] = ()) -> torch.Tensor:
        check_sampling_args(max_new_tokens, temperature, top_k, top_p)
        squeeze = prompt_ids.dim() == 1
        ids = (prompt_ids.unsqueeze(0) if squeeze else prompt_ids).cpu().long()
        b, s = ids.shape
        if b != self.batch or s == 0:
            raise ValueError(f"prompt_ids must be [{self.batch}, S>0] for this generator, got {tuple(ids.shape)}")
        if s + max_new_tokens > self.max_length:
            raise ValueError(f"the prompt ({s} tokens) + max_new_tokens={max_new_tokens} exceeds the static cache's "
                             f"max_length={self.max_length}; lower max_new_tokens or raise max_length")
        if max_new_tokens == 0:
            return prompt_ids
        rows = torch.arange(b)

        def full(v, dtype):
            return torch.full((b,), v, dtype=dtype)

        params = dict(temperature=full(temperature, torch.float32), top_k=full(top_k, torch.int64),
                      top_p=full(top_p, torch.float32), seed=full(seed, torch.int64))
        first = self.runner.prefill(PrefillInputs(ids=ids, slot=rows, table=rows[:, None],
                                                  sample=torch.ones(1, dtype=torch.int64), **params)).cpu()
        eos = sorted({int(e) for e in eos_ids}) or [-1]
        stop_ids = torch.tensor(eos, dtype=torch.int64)[None, :].expand(b, -1).contiguous()
        done = torch.isin(first, stop_ids[0]) if eos != [-1] else torch.zeros(b, dtype=torch.bool)
        out = [first[:, None]]
        generated, length = 1, s
        while generated < max_new_tokens and not bool(done.all()):
            steps = min(self.steps_per_sync, max_new_tokens - generated)
            key_len = min(self.max_length, bucket(length + steps, self.min_key_bucket))
            inp = DecodeInputs(tokens=out[-1][:, -1].clamp(min=0), lengths=full(length, torch.int64), slots=rows.clone(),
                               table=rows[:, None].clone(), remaining=full(max_new_tokens - generated, torch.int64),
                               stop_ids=stop_ids, done=done.clone(), **params)
            ring = self.runner.decode(inp, steps, key_len=key_len)
            out.append(ring)
            done = done | ((ring[:, :, None] == stop_ids[:, None, :]).any(-1) | (ring < 0)).any(-1)
            generated, length = generated + steps, length + steps
        new = torch.cat(out, dim=1)
        # Rows that stopped repeat their stop token (sampling.generate's padding).
        for r in range(b):
            row = new[r]
            hit = torch.nonzero(torch.isin(row, stop_ids[0]) if eos != [-1] else torch.zeros_like(row, dtype=torch.bool))
            if hit.numel():
                row[int(hit[0]):] = row[int(hit[0])]
        if eos != [-1]:  # every row stopped: end where the last one did (sampling.generate's length)
            hits = torch.isin(new, stop_ids[0])
            if bool(hits.any(1).all()):
                new = new[:, : int(hits.int().argmax(1).max()) + 1]
        result = torch.cat([ids, new], dim=1).to(prompt_ids.device)
        return result[0] if squeeze else result


def generate_static(model: torch.nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_ids: Iterable[int] = (),
                    max_length: Optional[int] = None, use_graphs: Optional[bool] = None) -> torch.Tensor:
    """Continue ``prompt_ids`` [B, S] (or [S]) by ``max_new_tokens`` tokens (see the module docstring)."""
    batch = 1 if prompt_ids.dim() == 1 else prompt_ids.shape[0]
    gen = StaticGenerator(model, batch, max_length, use_graphs)
    return gen.generate(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_ids)
