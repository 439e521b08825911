"""Pipeline-parallel inference: a model too large for one device, its layers split over stages.

    loaded = load_pp_model(CKPT_DIR, pp=2, device="cuda:0")     # this rank's stage; collective
    runner = build_pipeline_runner(loaded.model, max_batch=8, max_length=2048)
    # rank 0: Engine(loaded.model, ..., runner=BroadcastRunner(runner)); the others: follow(runner)

Each rank holds one stage (``megacore.pipeline.partition.build_stage_modules``: stage 0 embeds,
the last stage holds the final norm and output layer) filled from a megacore checkpoint saved at
any layout (``megacore.checkpoint`` reshards on load), and its own paged KV store for its layers
-- same blocks, slots and tables as every other stage, so one engine's block tables serve all.

Rank 0 runs the engine and broadcasts each prefill / packed prefill / decode call's inputs
(``megacore.inference.parallel.BroadcastRunner``); every stage runs the same call: receive the
previous stage's hidden states (stage 0: embed the tokens), run its layers with its cache, send its
output on; the last stage samples and broadcasts the tokens to every stage, which all advance the
same lengths, budgets and done flags. A packed prefill (``megacore.inference.packed``: several
requests' chunks in one row) passes the whole row's hidden states between stages; the last stage
computes logits at each chunk's last token only. One micro-batch at a time: the stages take turns (this splits
memory, not time), and decoding is eager (no CUDA graphs across stages). Tensor parallelism and
pipeline parallelism together are not supported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist

from megacore.inference.cache import CacheBatch, KVStore, probe_cache_shapes
from megacore.inference.device_sampling import sample_tokens
from megacore.inference.packed import PackedInputs, PackedView, segments
from megacore.inference.runner import DecodeInputs, PrefillInputs, advance_rows


def load_pp_model(path: str, pp: int, dtype: Optional[torch.dtype] = None, device=None):
    """A ``LoadedModel`` holding this rank's pipeline stage of the checkpoint at ``path`` (collective
    over the default group, whose size must be ``pp``)."""
    from megacore import parallel
    from megacore.inference.generate import GenerateError, load_megacore
    from megacore.inference.parallel import check_serving_world
    from megacore.pipeline.partition import build_stage_modules

    check_serving_world(path, "--pp", pp, "stage", "pipeline")
    state = parallel.get_state() if parallel.is_initialized() else parallel.initialize(pipeline=pp)

    def build(config, dtype, device):
        if config.num_layers < pp:
            raise GenerateError(f"--pp {pp} needs at least {pp} layers; the model has {config.num_layers}")
        return build_stage_modules(config, state.pp_rank, pp, 1, seed=0, device=device, dtype=dtype)[0].eval()

    return load_megacore(path, dtype, torch.device(device or "cpu"), build=build)


def build_pipeline_runner(stage: torch.nn.Module, max_batch: int, max_length: int, block_size: int = 16,
                          num_blocks: Optional[int] = None) -> "PipelineRunner":
    """The stage's store (the same block count on every stage) and runner."""
    per_seq = math.ceil(max_length / block_size)
    num_blocks = num_blocks or max_batch * per_seq + 1
    device = next(stage.parameters()).device
    return PipelineRunner(stage, KVStore(probe_cache_shapes(stage, device), num_blocks, block_size, max_batch, device))


class PipelineRunner:
    """``ModelRunner``'s ``prefill`` / ``decode`` for one stage (see the module docstring)."""

    use_graphs = False

    def __init__(self, stage: torch.nn.Module, store: KVStore, group=None):
        self.model, self.store, self.group = stage, store, group
        self.device = store.device
        self.first, self.last = stage.pre_process, stage.post_process
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.prev = dist.get_global_rank(group, rank - 1) if group is not None and rank > 0 else rank - 1
        self.next = dist.get_global_rank(group, rank + 1) if group is not None and rank < world - 1 else rank + 1
        self.last_rank = dist.get_global_rank(group, world - 1) if group is not None else world - 1
        self.hidden, self.dtype = stage.config.hidden_size, next(stage.parameters()).dtype

    def _stage(self, ids: torch.Tensor, view, packed: bool = False) -> Optional[torch.Tensor]:
        """This stage's part of one forward; the last stage's logits of the last position (``packed``:
        of each chunk's last token, [R, V]), else None."""
        if self.first:
            out = self.model(ids, kv_cache=view)
        else:
            hidden = torch.empty(*ids.shape, self.hidden, dtype=self.dtype, device=self.device)
            dist.recv(hidden, src=self.prev, group=self.group)
            out = self.model(ids, hidden_states=hidden, kv_cache=view)
        if not self.last:
            dist.send(out.contiguous(), dst=self.next, group=self.group)
            return None
        return out[0] if packed else out[:, -1]

    def _tokens(self, logits, inp, position: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        """The last stage samples; every stage gets the tokens."""
        if self.last:
            nxt = sample_tokens(logits, inp.temperature, inp.top_k, inp.top_p, inp.seed, position, greedy_only=greedy)
        else:
            nxt = torch.empty(position.shape[0], dtype=torch.int64, device=self.device)
        dist.broadcast(nxt, src=self.last_rank, group=self.group)
        return nxt

    @torch.no_grad()
    def prefill(self, inp: PrefillInputs) -> Optional[torch.Tensor]:
        sample = bool(inp.sample[0])
        inp = PrefillInputs(**{f.name: getattr(inp, f.name).to(self.device) for f in dataclasses.fields(inp)})
        view = CacheBatch(self.store, inp.slot, inp.table, torch.zeros_like(inp.slot), fresh=True,
                          logits_at=slice(-1, None))
        logits = self._stage(inp.ids, view)
        if not sample:
            return None
        return self._tokens(logits, inp, torch.full_like(inp.slot, inp.ids.shape[1]))

    @torch.no_grad()
    def prefill_packed(self, inp: PackedInputs) -> Optional[torch.Tensor]:
        """``ModelRunner.prefill_packed`` for this stage: the next token of each chunk [R] (every stage
        gets them), or None when none samples."""
        sample = bool(inp.sample.any())
        segs = segments(inp)
        inp = PackedInputs(**{f.name: getattr(inp, f.name).to(self.device) for f in dataclasses.fields(inp)})
        logits = self._stage(inp.ids, PackedView(self.store, inp, segs), packed=True)
        if not sample:
            return None
        return self._tokens(logits, inp, inp.pos[inp.last] + 1)

    @torch.no_grad()
    def decode(self, inp: DecodeInputs, steps: int, key_len: Optional[int] = None) -> torch.Tensor:
        st = DecodeInputs(**{f.name: getattr(inp, f.name).to(self.device, copy=True) for f in dataclasses.fields(inp)})
        key_len = key_len or st.table.shape[1] * self.store.block_size
        greedy = bool((inp.temperature <= 0).all())
        out = torch.empty_like(st.tokens)
        ring = torch.empty(st.tokens.shape[0], steps, dtype=torch.int64, device=self.device)
        for i in range(steps):
            view = CacheBatch(self.store, st.slots, st.table, st.lengths, key_len=key_len)
            logits = self._stage(st.tokens[:, None], view)
            advance_rows(st, self._tokens(logits, st, st.lengths + 1, greedy), out)
            ring[:, i].copy_(out)
        return ring.cpu()
