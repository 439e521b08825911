"""The model side of the engine: prefill sequences, decode a batch for a few steps, on the device.

    runner = ModelRunner(model, store, use_graphs=None)        # graphs on CUDA
    first = runner.prefill(PrefillInputs(...))                 # [1] first new token (or nothing)
    firsts = runner.prefill_packed(pack_chunks(chunks, bs))    # [R]: several sequences in one forward
    ring = runner.decode(DecodeInputs(...), steps=8)           # [B, 8] tokens, -1 once a row is done

**Prefill** runs the prompt through the model at once (``CacheBatch(fresh=True)``: SDPA's causal
kernel over the new keys), writes every position's keys/values (or latents, or the Mamba state)
into the sequence's blocks and samples the first token from the last position. ``prefill_packed``
does the same for several sequences (or later chunks of them) packed into one row, each attending
only to its own positions (``megacore.inference.packed``); not for Mamba layers.

**Decode** advances every row of a batch by one token per step. A step is pure device work on
tensors that live across steps (``DecodeInputs`` on the device): embed the rows' last tokens at
their positions ``lengths``, attend over their cached blocks, sample the next token
(``megacore.inference.device_sampling``: per-row temperature / top-k / top-p and seed), then in
place: ``lengths += 1``, ``remaining -= 1`` and ``done`` set on a stop token or when ``remaining``
reaches 0 for the rows that were live. A done row keeps computing (its slot is simply not read)
until the host looks: the host reads the ring of tokens once per call (``steps`` tokens per row),
the only synchronization.

Attention layers read the paged cache through ``megacore.inference.paged_attention``'s kernel on
CUDA (``paged_kernel``), or through a gather of each row's blocks (``megacore.inference.cache``).

``compile_step=True`` runs the step through ``torch.compile`` (inductor fuses the norms, rotary,
residual adds, activations and sampling into far fewer kernels; at batch 1 a step's time is mostly
per-kernel cost, not weight reads). Each shape compiles once (tens of seconds for a 1B model) before
it is captured; the step's values are those of the eager step up to the fused kernels' rounding.

On CUDA the step is captured once per shape -- (batch bucket, key-length bucket, stop-table
width, greedy or sampling) -- in a ``torch.cuda.CUDAGraph`` and replayed; the inputs are copied
into the graph's tensors before the first step of a call. A model whose forward cannot be captured
(for instance one that reads sizes back to the host, as MoE routing does) is decoded eagerly, with
one warning. On the CPU the same step runs eagerly.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from megacore.inference.cache import CacheBatch, KVStore
from megacore.inference.device_sampling import sample_tokens
from megacore.inference.packed import PackedInputs, PackedView, segments


@dataclass
class PrefillInputs:
    """One sequence's prompt and sampling parameters; every field a tensor (so that a tensor-
    parallel leader can broadcast them)."""
    ids: torch.Tensor          # [B, S] int64 (rows of one length; the engine prefills one at a time)
    slot: torch.Tensor         # [B] int64
    table: torch.Tensor        # [B, N] int64, covering positions 0..S-1
    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor        # [B] int64
    top_p: torch.Tensor        # [B] float32
    seed: torch.Tensor         # [B] int64
    sample: torch.Tensor       # [1] int64: 1 = sample the next token, 0 = only fill the cache


@dataclass
class DecodeInputs:
    """A decode batch, one row per sequence (padding rows: scratch slot, table of zeros, done)."""
    tokens: torch.Tensor       # [B] int64: each row's last token (not yet in the cache)
    lengths: torch.Tensor      # [B] int64: positions cached; the last token goes at lengths[b]
    slots: torch.Tensor        # [B] int64
    table: torch.Tensor        # [B, N] int64
    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor        # [B] int64
    top_p: torch.Tensor        # [B] float32
    seed: torch.Tensor         # [B] int64
    remaining: torch.Tensor    # [B] int64: tokens the row may still produce
    stop_ids: torch.Tensor     # [B, K] int64, -1 padded
    done: torch.Tensor         # [B] bool


def _to(inputs, device):
    return type(inputs)(**{f.name: getattr(inputs, f.name).to(device, non_blocking=True)
                           for f in dataclasses.fields(inputs)})


class _Decoder:
    """The device tensors of one decode shape, and its captured graph (or None: eager)."""

    def __init__(self, state: DecodeInputs, out: torch.Tensor):
        self.state, self.out, self.graph = state, out, None


class ModelRunner:
    """Prefill and batched decode of ``model`` over ``store`` (see the module docstring).

    ``use_graphs``: capture decode steps in CUDA graphs (default: the store is on CUDA).
    ``paged_kernel``: attention layers read the block pools with the Triton decode kernel (default:
    CUDA and Triton). ``compile_step``: run the step through ``torch.compile`` (module docstring).
    ``contiguous``: the store is a static cache (one block per row, rows = slots 0..B-1).
    """

    def __init__(self, model: torch.nn.Module, store: KVStore, use_graphs: Optional[bool] = None,
                 contiguous: bool = False, paged_kernel=None, compile_step: bool = False):
        self.model, self.store, self.contiguous = model, store, contiguous
        self.device = store.device
        on_gpu = self.device.type == "cuda"
        self.use_graphs = on_gpu if use_graphs is None else use_graphs
        if paged_kernel is None:  # attention layers decode from the block pools directly on CUDA
            from megacore.kernels._dispatch import triton_available

            paged_kernel = on_gpu and triton_available()
        self.paged_kernel = paged_kernel
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and cache on a CUDA device; pass use_graphs=False")
        self._decoders: dict = {}
        self._step_fn = self._step
        if compile_step:
            # One compiled variant per decode shape (batch, key-length bucket, stop width, greedy):
            # more than dynamo's default recompile limit allows one function in a long serving run.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._step_fn = torch.compile(self._step, dynamic=False)
        self._pool = None
        self._warned = False

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, inp: PrefillInputs) -> Optional[torch.Tensor]:
        """Fill the sequences' caches with ``inp.ids``; the next tokens [B] (on the device) when ``sample``."""
        sample = bool(inp.sample[0])
        inp = _to(inp, self.device)
        s = inp.ids.shape[1]
        view = CacheBatch(self.store, inp.slot, inp.table, torch.zeros_like(inp.slot), fresh=True, host_length=0,
                          contiguous=self.contiguous, logits_at=slice(-1, None))
        logits = self.model(inp.ids, kv_cache=view)[:, -1]
        if not sample:
            return None
        position = torch.full_like(inp.slot, s)
        return sample_tokens(logits, inp.temperature, inp.top_k, inp.top_p, inp.seed, position)

    @torch.no_grad()
    def prefill_packed(self, inp: PackedInputs) -> Optional[torch.Tensor]:
        """Several sequences' next chunks in one forward (``megacore.inference.packed``); the next token
        of each [R] (on the device; meaningful where ``sample``), or None when none samples."""
        sample = bool(inp.sample.any())
        segs = segments(inp)
        inp = _to(inp, self.device)
        logits = self.model(inp.ids, kv_cache=PackedView(self.store, inp, segs))[0]  # [R, V]: at inp.last only
        if not sample:
            return None
        position = inp.pos[inp.last] + 1
        return sample_tokens(logits, inp.temperature, inp.top_k, inp.top_p, inp.seed, position)

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode(self, inp: DecodeInputs, steps: int, key_len: Optional[int] = None) -> torch.Tensor:
        """Run ``steps`` decode steps; [B, steps] int64 on the host: row b's token of each step, -1
        where the row was already done. ``key_len``: keys a row reads (default: the whole block
        table, ``table columns * block_size``; a static cache passes its bucket)."""
        batch, stops = inp.tokens.shape[0], inp.stop_ids.shape[1]
        key_len = key_len or inp.table.shape[1] * self.store.block_size
        greedy = bool((inp.temperature <= 0).all())
        key = (batch, inp.table.shape[1], key_len, stops, greedy)
        dec = self._decoders.get(key)
        if dec is None:
            dec = self._decoders[key] = self._build(inp, greedy, key_len)
        for f in dataclasses.fields(DecodeInputs):
            getattr(dec.state, f.name).copy_(getattr(inp, f.name), non_blocking=True)
        ring = torch.empty(batch, steps, dtype=torch.int64, device=self.device)
        for i in range(steps):
            if dec.graph is not None:
                dec.graph.replay()
            else:
                self._step_fn(dec.state, dec.out, greedy, key_len)
            ring[:, i].copy_(dec.out)
        return ring.cpu()

    def _step(self, st: DecodeInputs, out: torch.Tensor, greedy: bool, key_len: int) -> None:
        view = CacheBatch(self.store, st.slots, st.table, st.lengths, key_len=key_len, contiguous=self.contiguous,
                          paged_kernel=self.paged_kernel)
        logits = self.model(st.tokens[:, None], kv_cache=view)[:, -1]
        nxt = sample_tokens(logits, st.temperature, st.top_k, st.top_p, st.seed, st.lengths + 1, greedy_only=greedy)
        advance_rows(st, nxt, out)

    def _build(self, inp: DecodeInputs, greedy: bool, key_len: int) -> _Decoder:
        state = DecodeInputs(**{f.name: getattr(inp, f.name).to(self.device, copy=True)
                                for f in dataclasses.fields(inp)})
        # Scratch contents while warming up and capturing: every row a done row of the scratch slot
        # (Mamba states), writing keys at position 0 of the scratch block or, in a static cache, at
        # its own next position (not yet holding anything: every position is written before it is read).
        state.done.fill_(True)
        state.slots.fill_(self.store.scratch_slot)
        if not self.contiguous:
            state.table.zero_()
            state.lengths.zero_()
        dec = _Decoder(state, torch.zeros(inp.tokens.shape[0], dtype=torch.int64, device=self.device))
        if not self.use_graphs:
            return dec
        try:
            with torch.cuda.device(self.device):  # graph capture uses the current device's streams
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):  # first calls: compilation, autotuning, cuBLAS handles, lazy buffers
                        self._step_fn(state, dec.out, greedy, key_len)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    self._step_fn(state, dec.out, greedy, key_len)
            self._pool = graph.pool()
            dec.graph = graph
        except Exception as e:  # a forward that cannot be captured: decode eagerly
            if not self._warned:
                warnings.warn(f"decode steps run without CUDA graphs: capturing failed ({type(e).__name__}: {e})")
                self._warned = True
            self.use_graphs = False
            torch.cuda.synchronize(self.device)
        return dec


def advance_rows(st: DecodeInputs, nxt: torch.Tensor, out: torch.Tensor) -> None:
    """After a step sampled ``nxt``: for the live rows, emit it (``out``; -1 for done rows), advance
    ``lengths``, spend ``remaining``, mark ``done`` on a stop token or an empty budget, and make it
    the row's last token."""
    live = ~st.done
    out.copy_(torch.where(live, nxt, torch.full_like(nxt, -1)))
    st.lengths.add_(live.to(torch.int64))
    st.remaining.sub_(live.to(torch.int64))
    stop = (nxt[:, None] == st.stop_ids).any(dim=-1) | (st.remaining <= 0)
    st.done.logical_or_(live & stop)
    st.tokens.copy_(torch.where(live, nxt, st.tokens))


def bucket(n: int, floor: int = 1) -> int:
    """The smallest ``floor * 2**i`` that is at least ``n`` (the shapes graphs are captured for)."""
    b = max(floor, 1)
    while b < n:
        b *= 2
    return b
