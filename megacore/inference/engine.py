"""The dynamic-batching engine: many requests, one model, a paged KV cache, continuous batching.

    engine = Engine(model, max_batch=16, eos_ids=[2], tokenizer=tok)
    req = engine.add_request([5, 17, 3], SamplingParams(max_new_tokens=64, temperature=0.7, seed=1),
                             on_output=print)          # called with each RequestOutput (streaming)
    while engine.step():                               # or: engine.run_until_done()
        pass
    req.token_ids, req.finish_reason

**Requests** differ in prompt length, ``max_new_tokens``, sampling parameters (temperature / top-k
/ top-p / seed, per row on the device) and stop conditions: the model's end-of-sequence ids
(unless ``ignore_eos``), ``stop_token_ids``, and ``stop`` strings (with a tokenizer: the text is
cut before the stop string; ``megacore.inference.text``). A finished request reports why:
``"stop"``, ``"length"`` (``max_new_tokens``, or the model's maximum positions), ``"cancelled"``
or ``"error"``.

**Scheduling** (one ``step``): take in new requests and cancellations (``add_request`` / ``cancel``
may be called from any thread; ``max_queue`` bounds the requests waiting for a slot, beyond it
``add_request`` raises ``QueueFull``); admit waiting requests, oldest first, while a slot (at most
``max_batch`` sequences decode together), the blocks for the prompt and the prefill budget allow;
prefill them in one forward, packed (``megacore.inference.packed``: at most ``max_prefill_tokens``
new tokens per step, a longer prompt split into chunks over several steps, continued first at the
next step), each sampling its first token when its whole prompt is in; then decode every running
request for up to ``decode_steps`` tokens (``megacore.inference.runner``: one host synchronization
per call), stream the new tokens, and free the slot and blocks of each finished request at once, so that a waiting
request takes its place at the next step (continuous batching).

Models with Mamba layers (their cache keeps one state per sequence, which a packed forward does not
write) prefill one whole prompt per forward instead (``packed_prefill``: None = pack when possible). ``prefix_caching=True`` (packed models
only): a prompt's leading full blocks whose tokens an earlier request already computed (its prompt,
or its prompt and answer) are shared, refcounted (``megacore.inference.blocks``); the request then
prefills only the rest.
``prefill_tokens`` / ``prefill_calls`` count the tokens and forwards prefills computed.

**Memory** is a ``megacore.inference.cache.KVStore`` of ``num_blocks`` blocks of ``block_size``
positions. A request holds blocks for the positions it has written, plus the next
``decode_steps``; blocks are taken as it grows. When the free blocks cannot cover the next decode
call, the most recently admitted request is preempted: its blocks are freed and it waits at the
front of the queue, to be prefilled again with its prompt and the tokens it has produced (which
are not sent twice). Greedy tokens do not change by batching, padding or preemption; sampled ones
neither (the draws are a function of seed and position, ``megacore.inference.device_sampling``).

A request's positions are bounded by ``max_length`` (default: the model's ``seq_length``): a
prompt of ``max_length`` tokens or more is refused (``ValueError``), and ``max_new_tokens`` is cut
to what fits (the request then finishes with ``"length"``).
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from megacore.inference.blocks import BlockPool
from megacore.inference.cache import KVStore, probe_cache_shapes
from megacore.inference.packed import PrefillChunk, pack_chunks
from megacore.inference.runner import DecodeInputs, ModelRunner, PrefillInputs, bucket
from megacore.inference.text import TextStream


class QueueFull(RuntimeError):
    """``max_queue`` requests are already waiting; try again later (HTTP 429)."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: int = 0                     # sampled tokens are a function of (seed, position, prompt)
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()          # stop strings (need the engine's tokenizer)
    ignore_eos: bool = False

    def validate(self, vocab_size: Optional[int] = None) -> "SamplingParams":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1 = off)")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise ValueError(f"stop token id {t!r} is not a token id of this model (0..{vocab_size})")
        return self


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list        # tokens since the last output
    new_text: str              # their text (with a tokenizer; else "")
    finished: bool
    finish_reason: Optional[str]


@dataclass
class Request:
    id: str
    prompt: list
    params: SamplingParams
    on_output: Optional[Callable[[RequestOutput], None]] = None
    token_ids: list = field(default_factory=list)       # generated tokens
    text: str = ""                                       # their text (with a tokenizer)
    finish_reason: Optional[str] = None
    slot: Optional[int] = None
    blocks: list = field(default_factory=list)
    cached: int = 0                                      # positions in the cache
    context: list = field(default_factory=list)          # what the prefill feeds (prompt, + tokens when resumed)
    resumed: bool = False                                # preempted: refill, sample nothing
    max_new: int = 0                                     # max_new_tokens cut to max_length
    stops: frozenset = frozenset()
    stream: Optional[TextStream] = None
    order: int = 0                                       # admission order (preemption picks the latest)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def build_runner(model: torch.nn.Module, max_batch: int, max_length: int, block_size: int = 16,
                 num_blocks: Optional[int] = None, use_graphs: Optional[bool] = None, paged_kernel=None) -> ModelRunner:
    """A ``ModelRunner`` over a new ``KVStore`` for the engine (collective under tensor parallelism:
    every rank makes its own). ``num_blocks`` defaults to room for ``max_batch`` sequences of
    ``max_length`` positions (no preemption)."""
    per_seq = math.ceil(max_length / block_size)
    if num_blocks is None:
        num_blocks = max_batch * per_seq + 1
    if num_blocks - 1 < per_seq:
        raise ValueError(f"num_blocks={num_blocks} cannot hold one sequence of max_length={max_length} "
                         f"({per_seq} blocks of {block_size} + the scratch block); raise num_blocks")
    device = next(model.parameters()).device
    store = KVStore(probe_cache_shapes(model, device), num_blocks, block_size, max_batch, device)
    return ModelRunner(model, store, use_graphs=use_graphs, paged_kernel=paged_kernel)


class Engine:
    """See the module docstring. ``runner``: a prepared ``ModelRunner`` (tensor- and pipeline-parallel
    serving pass one that broadcasts its inputs; ``model`` is then this rank's part, read for its
    config); else one is made over a new store."""

    def __init__(self, model: torch.nn.Module, *, max_batch: int = 8, max_length: Optional[int] = None,
                 block_size: int = 16, num_blocks: Optional[int] = None, eos_ids: Iterable[int] = (),
                 tokenizer=None, max_queue: Optional[int] = None, decode_steps: int = 8,
                 use_graphs: Optional[bool] = None, runner: Optional[ModelRunner] = None,
                 max_prefill_tokens: int = 4096, prefix_caching: bool = False,
                 packed_prefill: Optional[bool] = None):
        if runner is None and not getattr(model, "supports_kv_cache", False):
            raise ValueError("the engine decodes with a whole GPTModel and a KV cache (not a context- or sequence-"
                             "parallel model; a pipeline stage needs the runner of megacore.inference.pipeline)")
        if max_batch < 1 or block_size < 1 or decode_steps < 1 or max_prefill_tokens < 1:
            raise ValueError(f"max_batch={max_batch}, block_size={block_size}, decode_steps={decode_steps}, "
                             f"max_prefill_tokens={max_prefill_tokens} must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = model.config.vocab_size
        self.max_batch, self.decode_steps, self.max_queue = max_batch, decode_steps, max_queue
        self.max_length = max_length or model.config.seq_length
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        per_seq = math.ceil(self.max_length / block_size)
        if runner is None:
            runner = build_runner(model, max_batch, self.max_length, block_size, num_blocks, use_graphs)
        self.runner, self.store = runner, runner.store
        if self.store.num_slots < max_batch:
            raise ValueError(f"the runner's store has {self.store.num_slots} slots, fewer than max_batch={max_batch}")
        self.block_size, self.blocks_per_seq = self.store.block_size, per_seq
        # Packed (batched, chunked) prefill needs the runner's prefill_packed and no Mamba layer (their
        # scan does not restart per sequence); otherwise each request is prefilled alone, whole.
        can_pack = callable(getattr(self.runner, "prefill_packed", None)) and not self.store.shapes.mamba
        if packed_prefill and not can_pack:
            raise ValueError("packed_prefill=True needs a runner with prefill_packed (ModelRunner, tensor- or pipeline-parallel) and a "
                             "model without Mamba layers; pass packed_prefill=None to prefill one request at a time")
        self.packed = can_pack if packed_prefill is None else bool(packed_prefill)
        self.max_prefill_tokens = max_prefill_tokens
        self.blocks = BlockPool(self.store.num_blocks, self.block_size, prefix_caching and self.packed)
        self.prefilling: list[Request] = []    # admitted, prompt not yet all in the cache (chunked prefill)
        self.prefill_tokens = 0                # stats: tokens computed by prefill forwards, and those forwards
        self.prefill_calls = 0
        self.free_slots = list(range(max_batch - 1, -1, -1))
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._inbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0                      # requests added and not yet admitted or cancelled
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._order = itertools.count()
        self.preemptions = 0

    @property
    def free_blocks(self) -> list:
        """Blocks no request holds (free, or cached prefixes nobody uses)."""
        return self.blocks.unheld()

    # ------------------------------------------------------------------ any thread
    def add_request(self, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None,
                    on_output: Optional[Callable[[RequestOutput], None]] = None,
                    request_id: Optional[str] = None) -> Request:
        """Queue a request (thread-safe); ``ValueError`` for a request that can never run, ``QueueFull``
        when ``max_queue`` requests are waiting."""
        params = (params or SamplingParams()).validate(self.vocab_size)
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the model's vocabulary (0..{self.vocab_size - 1})")
        if len(prompt) >= self.max_length:
            raise ValueError(f"the prompt has {len(prompt)} tokens but this model serves at most {self.max_length} "
                             f"positions (prompt + new tokens); shorten the prompt to at most {self.max_length - 1}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        req = Request(request_id or f"req-{next(self._ids)}", prompt, params, on_output)
        req.max_new = min(params.max_new_tokens, self.max_length - len(prompt))
        req.stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        if self.tokenizer is not None:
            req.stream = TextStream(self.tokenizer, prompt, params.stop, skip_ids=req.stops)
        with self._lock:
            if self.max_queue is not None and self._queued >= self.max_queue:
                raise QueueFull(f"{self._queued} requests are already waiting (max_queue={self.max_queue}); retry later")
            self._queued += 1
        self._inbox.put(("add", req))
        self._wake.set()
        return req

    def cancel(self, request_id: str) -> None:
        """Stop a request (thread-safe); its slot and blocks are freed at the next step."""
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    @property
    def num_queued(self) -> int:
        return self._queued

    def wait_for_work(self, timeout: float) -> None:
        self._wake.wait(timeout)

    # ------------------------------------------------------------------ the engine's thread
    def has_work(self) -> bool:
        return bool(self.running or self.prefilling or self.waiting or not self._inbox.empty())

    def step(self) -> bool:
        """Take in requests, admit, decode; True while requests remain."""
        self._wake.clear()
        self._drain_inbox()
        self._admit()
        if self.running:
            self._decode()
        return self.has_work()

    def run_until_done(self) -> None:
        while self.step():
            pass

    def generate(self, prompts: Sequence[Sequence[int]], params=None) -> list[list[int]]:
        """Run ``prompts`` (one ``SamplingParams`` or a list of them) to the end; their new token ids."""
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        self.run_until_done()
        return [r.token_ids for r in reqs]

    def cancel_all(self, reason: str = "cancelled") -> None:
        self._drain_inbox()
        for r in list(self.waiting) + list(self.prefilling) + list(self.running):
            self._finish(r, reason, [])

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.waiting.append(item)
                continue
            for r in self.waiting + self.prefilling + self.running:
                if r.id == item:
                    self._finish(r, "cancelled", [])

    def _blocks_for(self, positions: int) -> int:
        return math.ceil(positions / self.block_size)

    def _take_blocks(self, req: Request, positions: int) -> bool:
        need = min(self._blocks_for(positions), self.blocks_per_seq) - len(req.blocks)
        if need > self.blocks.available():
            return False
        for _ in range(max(need, 0)):
            req.blocks.append(self.blocks.take())
        return True

    def _release(self, req: Request) -> None:
        # With prefix caching, what the request computed stays matchable after it lets go: its prompt
        # and generated tokens (a chat's next turn starts with them; a preempted request resumes on
        # them). Positions 0..cached-1 hold those tokens' keys; full blocks only (BlockPool.register).
        if req.blocks:
            self.blocks.register((req.prompt + req.token_ids)[:req.cached], req.blocks)
        self.blocks.release(req.blocks)
        req.blocks = []
        if req.slot is not None:
            self.free_slots.append(req.slot)
            req.slot = None

    def _table(self, reqs: Sequence[Request], width: int) -> torch.Tensor:
        table = torch.zeros(len(reqs), width, dtype=torch.int64)
        for i, r in enumerate(reqs):
            table[i, : len(r.blocks)] = torch.tensor(r.blocks[:width], dtype=torch.int64)
        return table

    def _admit(self) -> None:
        """Continue chunked prefills, then admit waiting requests (oldest first) while a slot, their blocks
        and the prefill token budget allow; prefill them all in one packed forward (or one by one)."""
        budget = self.max_prefill_tokens if self.packed else None
        chunks = []
        for req in self.prefilling:
            if budget <= 0:
                break
            n = min(len(req.context) - req.cached, budget)
            chunks.append((req, n))
            budget -= n
        while self.waiting and self.free_slots and (budget is None or budget > 0):
            req = self.waiting[0]
            context = req.prompt + req.token_ids[:-1] if req.token_ids else req.prompt
            reserve = len(self.running) + len(self.prefilling)  # a block for each admitted request to grow into
            if self._blocks_for(len(context) + 1) + reserve > self.blocks.available() and (self.running or self.prefilling):
                break
            req.blocks = self.blocks.match(context, (len(context) - 1) // self.block_size)
            hit = len(req.blocks) * self.block_size   # positions whose keys a cached prefix holds
            if not self._take_blocks(req, len(context) + 1):
                self._release(req)
                break
            self.waiting.pop(0)
            req.resumed, req.context = bool(req.token_ids), context
            with self._lock:
                if not req.resumed:
                    self._queued -= 1
            req.slot, req.order, req.cached = self.free_slots.pop(), next(self._order), hit
            if budget is None:
                self._prefill_alone(req)
                continue
            self.prefilling.append(req)
            n = min(len(context) - req.cached, budget)
            chunks.append((req, n))
            budget -= n
        if chunks:
            self._prefill_packed(chunks)

    def _prefill_alone(self, req: Request) -> None:
        p = req.params
        first = self.runner.prefill(PrefillInputs(
            ids=torch.tensor([req.context], dtype=torch.int64), slot=torch.tensor([req.slot]),
            table=self._table([req], len(req.blocks)), temperature=torch.tensor([float(p.temperature)]),
            top_k=torch.tensor([p.top_k]), top_p=torch.tensor([float(p.top_p)]), seed=torch.tensor([p.seed]),
            sample=torch.tensor([0 if req.resumed else 1])))
        self.prefill_tokens += len(req.context)
        self.prefill_calls += 1
        req.cached = len(req.context)
        self.running.append(req)
        if not req.resumed:
            self._accept(req, [int(first[0])])

    def _prefill_packed(self, chunks: list) -> None:
        packed = []
        for req, n in chunks:
            p, last = req.params, req.cached + n == len(req.context)
            packed.append(PrefillChunk(req.context[req.cached:req.cached + n], req.cached, req.blocks,
                                       float(p.temperature), p.top_k, float(p.top_p), p.seed,
                                       sample=last and not req.resumed))
        first = self.runner.prefill_packed(pack_chunks(packed, self.block_size))
        first = first.tolist() if first is not None else [None] * len(chunks)
        self.prefill_tokens += sum(n for _, n in chunks)
        self.prefill_calls += 1
        for (req, n), token in zip(chunks, first):
            req.cached += n
            if req.cached < len(req.context):
                continue
            self.prefilling.remove(req)
            self.blocks.register(req.context, req.blocks)
            self.running.append(req)
            if not req.resumed:
                self._accept(req, [int(token)])

    def _preempt_latest(self) -> None:
        victim = max(self.running, key=lambda r: r.order)
        self.running.remove(victim)
        self._release(victim)
        self.waiting.insert(0, victim)
        self.preemptions += 1

    def _decode(self) -> None:
        steps = min(self.decode_steps, max(r.max_new - len(r.token_ids) for r in self.running))
        while True:  # blocks for the positions this call writes, preempting if they are not there
            short = [r for r in self.running if not self._take_blocks(r, min(r.cached + steps, len(r.prompt) + r.max_new))]
            if not short:
                break
            self._preempt_latest()
            if not self.running:
                return
        rows = sorted(self.running, key=lambda r: r.slot)
        n = len(rows)
        batch = min(bucket(n), bucket(self.max_batch))
        width = min(bucket(max(len(r.blocks) for r in rows), max(1, 256 // self.block_size)), self.blocks_per_seq)
        stop_width = bucket(max(len(r.stops) for r in rows) or 1, 4)
        pad = batch - n

        def col(values, dtype, fill):
            return torch.tensor(list(values) + [fill] * pad, dtype=dtype)

        stop_ids = torch.full((batch, stop_width), -1, dtype=torch.int64)
        for i, r in enumerate(rows):
            if r.stops:
                stop_ids[i, : len(r.stops)] = torch.tensor(sorted(r.stops), dtype=torch.int64)
        table = torch.zeros(batch, width, dtype=torch.int64)
        table[:n] = self._table(rows, width)
        inp = DecodeInputs(
            tokens=col((r.token_ids[-1] for r in rows), torch.int64, 0),
            lengths=col((r.cached for r in rows), torch.int64, 0),
            slots=col((r.slot for r in rows), torch.int64, self.store.scratch_slot),
            table=table,
            temperature=col((float(r.params.temperature) for r in rows), torch.float32, 0.0),
            top_k=col((r.params.top_k for r in rows), torch.int64, 0),
            top_p=col((float(r.params.top_p) for r in rows), torch.float32, 1.0),
            seed=col((r.params.seed for r in rows), torch.int64, 0),
            remaining=col((r.max_new - len(r.token_ids) for r in rows), torch.int64, 0),
            stop_ids=stop_ids,
            done=col([False] * n, torch.bool, True))
        ring = self.runner.decode(inp, steps).tolist()
        for r, tokens in zip(rows, ring):
            new = [t for t in tokens if t >= 0]
            r.cached += len(new)
            self._accept(r, new)

    def _accept(self, req: Request, tokens: list) -> None:
        """Record a request's new tokens, stream them, finish it when a stop condition holds."""
        taken, text, reason = [], "", None
        for t in tokens:
            taken.append(t)
            req.token_ids.append(t)
            if req.stream is not None:
                delta, stopped = req.stream.push(t)
                text += delta
                if stopped:
                    reason = "stop"
                    break
            if t in req.stops:
                reason = "stop"
                break
            if len(req.token_ids) >= req.max_new:
                reason = "length"
                break
        if reason is None:
            self._emit(req, taken, text, False)
        else:
            self._finish(req, reason, taken, text)

    def _finish(self, req: Request, reason: str, tokens: list, text: str = "") -> None:
        if req in self.running:
            self.running.remove(req)
        if req in self.prefilling:
            self.prefilling.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
            if not req.token_ids:
                with self._lock:
                    self._queued -= 1
        self._release(req)
        if req.stream is not None and reason != "stop":
            text += req.stream.finish()
        req.finish_reason = reason
        self._emit(req, tokens, text, True)

    def _emit(self, req: Request, tokens: list, text: str, finished: bool) -> None:
        req.text += text
        if req.on_output is not None and (tokens or text or finished):
            req.on_output(RequestOutput(req.id, tokens, text, finished, req.finish_reason))
