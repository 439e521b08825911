"""The snapshot: copying the pieces a rank writes to host memory, the only part of a save that stalls.

On GPU, one pass issues a ``non_blocking`` copy of every piece into a pinned (page-locked) host
buffer, with no synchronization in between, then waits once on each source device's current
stream (an event recorded after the last copy). When :func:`take_snapshot` returns every copy has
completed, so training may modify the tensors; everything else (hashing, serialization, writes,
fsync, commit) runs later from the host copies.

Pinned buffers live in a :class:`PinnedPool` and are reused by the next save when it copies the
same pieces (same chunk names, shapes and dtypes): from the second save on nothing is allocated.
They are views into a few large pinned *slabs* rather than one allocation per tensor, because
torch's caching host allocator rounds every request up to a power of two and each fresh
``cudaHostAlloc`` is slow (it faults in and page-locks every page): a thousand per-tensor buffers
cost up to twice the memory and seconds of page locking on the first save. Slabs are powers of
two themselves (so no rounding waste, and a slab freed on a layout change is recycled by the
allocator), and tensors are packed into them first-fit. Copies into a slab are issued as soon as
it exists, so allocating the next slab overlaps the transfers already queued.

A buffer is never written while a background writer may still read it: the pool remembers the
thread that reads its buffers and joins it before reusing them (``save_checkpoint`` has already
waited for the previous save at that point; the join is a second line of defence).

On CPU (no CUDA tensor among the pieces) the snapshot is a plain clone for async saves (nothing is
pinned), and the tensors themselves (made contiguous) for synchronous ones.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

SLAB_BYTES = 1 << 28   # 256 MiB: the largest slab, unless one tensor needs more
ALIGN = 256            # byte alignment of each buffer inside a slab

Key = tuple  # (chunk name, shape, dtype)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def _aligned(n: int) -> int:
    return -(-int(n) // ALIGN) * ALIGN


def _nbytes(key: Key) -> int:
    _, shape, dtype = key
    n = 1
    for s in shape:
        n *= int(s)
    return n * dtype.itemsize


@dataclass
class SnapshotStats:
    """What one snapshot did: ``bytes`` copied, wall ``seconds`` (allocation + issue + the wait),
    ``alloc_s``/``alloc_bytes`` spent on new pinned slabs (0 when the buffers were reused) and
    ``d2h_s``, the GPU time of the copy pass (CUDA events; None on CPU). ``pooled``: the buffers
    come from a :class:`PinnedPool` (``pinned``: page-locked, unless pinning failed)."""

    bytes: int = 0
    seconds: float = 0.0
    alloc_s: float = 0.0
    alloc_bytes: int = 0
    d2h_s: Optional[float] = None
    pooled: bool = False
    pinned: bool = False


class PinnedPool:
    """Host buffers for snapshots, keyed by ``(chunk name, shape, dtype)`` and reused across saves.

    ``pin=False`` allocates ordinary (pageable) slabs: tests use it to exercise the packing and
    reuse logic without a GPU.
    """

    def __init__(self, slab_bytes: int = SLAB_BYTES, pin: bool = True):
        self.slab_bytes = _pow2_ceil(slab_bytes)
        self.pin = pin
        self.buffers: dict[Key, torch.Tensor] = {}
        self.pageable: set[Key] = set()    # buffers outside the slabs (empty, or pinning failed)
        self.slabs: list[list] = []        # [slab tensor, bytes used]
        self.reader: Optional[threading.Thread] = None
        self._pinning_failed = False

    @property
    def reserved_bytes(self) -> int:
        return sum(s.numel() for s, _ in self.slabs)

    def wait_reader(self) -> None:
        """Join the writer thread that reads these buffers, if it still runs."""
        reader, self.reader = self.reader, None
        if reader is not None and reader.is_alive() and reader is not threading.current_thread():
            reader.join()

    def holds_exactly(self, keys: Sequence[Key]) -> bool:
        return len(self.buffers) == len(set(keys)) and all(k in self.buffers for k in keys)

    def reset(self) -> None:
        """Drop every buffer (the slabs return to torch's host allocator, which recycles them)."""
        self.buffers.clear()
        self.pageable.clear()
        self.slabs.clear()

    def prepare(self, keys: Sequence[Key]) -> None:
        """Make the pool hold buffers for exactly ``keys``: keep it when it already does, else start over."""
        self.wait_reader()
        if not self.holds_exactly(keys):
            self.reset()

    def reserve(self, keys: Sequence[Key]) -> SnapshotStats:
        """Allocate buffers for ``keys`` now (no copy), so a later snapshot of them allocates nothing."""
        stats = SnapshotStats(pooled=True)
        self.prepare(keys)
        remaining = sum(_aligned(_nbytes(k)) for k in keys if k not in self.buffers)
        for key in keys:
            if key not in self.buffers:
                remaining -= _aligned(_nbytes(key))
                self.buffer(key, remaining, stats)
        stats.pinned = self.pin and not self._pinning_failed
        return stats

    def buffer(self, key: Key, remaining_after: int, stats: SnapshotStats) -> torch.Tensor:
        """The buffer of ``key``, allocated (first-fit into a slab) when new. ``remaining_after``: bytes
        still to allocate after this one, so a new slab is no larger than what the save needs."""
        buf = self.buffers.get(key)
        if buf is not None:
            return buf
        _, shape, dtype = key
        nbytes = _nbytes(key)
        if nbytes == 0:
            buf = torch.empty(shape, dtype=dtype)
            self.pageable.add(key)
        else:
            slab = next((s for s in self.slabs if s[0].numel() - s[1] >= nbytes), None)
            if slab is None:
                # the largest power of two the rest of the save fills (little waste at the end)
                size = max(_pow2_ceil(nbytes), min(self.slab_bytes, _pow2_floor(nbytes + remaining_after)))
                slab = self._new_slab(size, stats)
            if slab is None:  # pinning failed: a pageable buffer of its own (copies are then synchronous)
                buf = torch.empty(shape, dtype=dtype)
                self.pageable.add(key)
            else:
                start = slab[1]
                buf = slab[0][start:start + nbytes].view(dtype).view(shape)
                slab[1] = min(slab[0].numel(), _aligned(start + nbytes))
        self.buffers[key] = buf
        return buf

    def _new_slab(self, size: int, stats: SnapshotStats) -> Optional[list]:
        if self.pin and self._pinning_failed:
            return None
        t0 = time.perf_counter()
        try:
            tensor = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        except RuntimeError as e:
            if not self.pin:
                raise
            self._pinning_failed = True
            warnings.warn(f"megacore.checkpoint: could not allocate {size / 2**20:.0f} MiB of pinned host memory "
                          f"({e}); snapshotting the rest into pageable memory, which is slower (raise the "
                          "memlock limit or free host memory)", RuntimeWarning, stacklevel=3)
            return None
        stats.alloc_s += time.perf_counter() - t0
        stats.alloc_bytes += size
        slab = [tensor, 0]
        self.slabs.append(slab)
        return slab


_POOL = PinnedPool()


def default_pool() -> PinnedPool:
    return _POOL


def snapshot_keys(items: Sequence[tuple[str, torch.Tensor]]) -> list[Key]:
    return [(name, tuple(t.shape), t.dtype) for name, t in items]


def uses_pool(items: Sequence[tuple[str, torch.Tensor]]) -> bool:
    """Pinned buffers are used only when CUDA is available and some piece lives on a GPU."""
    return torch.cuda.is_available() and any(t.is_cuda for _, t in items)


def take_snapshot(items: Sequence[tuple[str, torch.Tensor]], async_save: bool, pool: Optional[PinnedPool] = None,
                  use_pool: Optional[bool] = None) -> tuple[list[torch.Tensor], SnapshotStats]:
    """Host copies of ``items`` (``(chunk name, tensor view)``), complete on return; see the module doc."""
    t0 = time.perf_counter()
    pool = _POOL if pool is None else pool
    if not (uses_pool(items) if use_pool is None else use_pool):
        out = [t.clone(memory_format=torch.contiguous_format) if async_save else t.contiguous() for _, t in items]
        stats = SnapshotStats(bytes=sum(t.numel() * t.element_size() for t in out))
        stats.seconds = time.perf_counter() - t0
        return out, stats
    keys = snapshot_keys(items)
    stats = SnapshotStats(pooled=True)
    pool.prepare(keys)  # joins a writer still reading the buffers; starts over when the pieces changed
    remaining = sum(_aligned(_nbytes(k)) for k in keys if k not in pool.buffers)
    devices = sorted({t.device for _, t in items if t.is_cuda}, key=str)
    timers = {}
    for d in devices:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(d))
        timers[d] = (start, end)
    out: list[torch.Tensor] = []
    failed = True
    try:
        for key, (_, t) in zip(keys, items):
            if key not in pool.buffers:
                remaining -= _aligned(_nbytes(key))
            buf = pool.buffer(key, remaining, stats)
            # GPU -> pinned: queued on the source device's current stream, waited for below
            buf.copy_(t, non_blocking=t.is_cuda and pool.pin and key not in pool.pageable)
            out.append(buf)
            stats.bytes += buf.numel() * buf.element_size()
        failed = False
    finally:
        for d, (_, end) in timers.items():
            end.record(torch.cuda.current_stream(d))
        for _, end in timers.values():
            end.synchronize()  # the one wait: every copy has completed after this
        if failed:
            pool.reset()  # possibly half-filled: the next save starts over
    stats.pinned = pool.pin and not pool._pinning_failed
    if timers:
        stats.d2h_s = max(start.elapsed_time(end) for start, end in timers.values()) / 1000.0
    stats.seconds = time.perf_counter() - t0
    return out, stats
