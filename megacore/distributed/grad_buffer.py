"""Contiguous gradient (and parameter) buffers split into communication buckets.

Layout of one :class:`GradBuffer` (all parameters of one (param dtype, grad dtype, group) kind)::

    grad_data: [ bucket 0 | bucket 1 | ... ]          one flat tensor, dtype grad_dtype
    bucket b:  [ p_k | pad | p_k-1 | pad | ... | pad ] parameters in REVERSE registration order

* Each parameter's ``.main_grad`` is a view ``grad_data[start:start + numel].view(param.shape)``.
  Reverse order is (roughly) the order backward produces gradients, so bucket 0 fills first and
  its reduction can start while backward is still computing the rest.
* Parameter starts are aligned to ``ALIGN`` elements (vectorized kernels like aligned views).
* A bucket closes once it holds at least ``bucket_numel`` elements; with ``shard=True`` (the
  distributed optimizer) its length is padded to a multiple of ``dp_size * ALIGN`` so that it splits
  into ``dp_size`` equal contiguous shards: data-parallel rank ``r`` owns elements
  ``[start + r*n, start + (r+1)*n)`` of every bucket (``n = bucket_len / dp_size``). A parameter may
  straddle shard boundaries; each rank then owns a contiguous flat range of it.
* With ``shard=True`` the parameters themselves also live in a flat ``param_data`` buffer of the
  same layout (``param.data`` is rebound to a view), so the post-step all-gather writes straight
  into the weights.

Gradients are SUMMED over the data-parallel group (see ``megacore.distributed.ddp`` for why).

Zeroing is lazy: ``zero()`` marks every parameter's ``main_grad`` stale, the step's first gradient
of a parameter is written over it (``accumulate``: no zeroing pass, no read-back), and ``settle``
zeroes the parameters that got no gradient before any reduction or read. Code outside the hooks
that adds into or reads ``main_grad`` before ``finish_grad_sync`` goes through
``add_to_main_grad`` / ``settled_main_grad``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megacore.distributed.comm import ProcessGroup, all_gather_flat, group_rank, group_size, reduce_scatter_flat
from megacore.kernels.grad_accumulate import accumulate_grad_

ALIGN = 64  # elements; 128 B in bf16, 256 B in fp32


def _round_up(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)


class Bucket:
    """A contiguous slice ``[start, end)`` of a :class:`GradBuffer` reduced by one collective."""

    def __init__(self, buffer: "GradBuffer", index: int, params: list[nn.Parameter], start: int, end: int):
        self.buffer, self.index, self.params = buffer, index, params
        self.start, self.end = start, end
        self.grad_data = buffer.grad_data[start:end]
        self.param_data = buffer.param_data[start:end] if buffer.param_data is not None else None
        self.pending: set[int] = {id(p) for p in params}
        self.grad_handle = None
        self.grad_comm: Optional[torch.Tensor] = None   # reduce-dtype copy while a cast reduction is in flight
        self.grad_launched = False
        self.param_handle = None

    @property
    def numel(self) -> int:
        return self.end - self.start

    def shard_range(self, rank: int) -> tuple[int, int]:
        """Absolute buffer range ``[lo, hi)`` owned by data-parallel ``rank`` (shard mode)."""
        n = self.numel // self.buffer.dp_size
        return self.start + rank * n, self.start + (rank + 1) * n

    # ------------------------------------------------------------------ gradient reduction
    def start_grad_sync(self) -> None:
        """Launch the (async) all-reduce, or reduce-scatter in shard mode, of this bucket's grads."""
        buf = self.buffer
        buf.settle(self.params)  # parameters that got no gradient this step reduce zeros
        self.grad_launched = True
        if buf.dp_size == 1:
            return
        comm = self.grad_data
        if buf.reduce_dtype != comm.dtype:
            comm = comm.to(buf.reduce_dtype)
            self.grad_comm = comm
        if buf.shard:
            n = self.numel // buf.dp_size
            local = comm[buf.dp_rank * n:(buf.dp_rank + 1) * n]
            self.grad_handle = reduce_scatter_flat(local, comm, buf.dp_group, async_op=True)
        else:
            self.grad_handle = dist.all_reduce(comm, group=buf.dp_group, async_op=True)

    def finish_grad_sync(self) -> None:
        if not self.grad_launched:
            self.start_grad_sync()
        if self.grad_handle is not None:
            self.grad_handle.wait()
            self.grad_handle = None
        if self.grad_comm is not None:  # cast the reduced values back into the grad buffer
            if self.buffer.shard:
                lo, hi = self.shard_range(self.buffer.dp_rank)
                self.grad_data[lo - self.start:hi - self.start].copy_(self.grad_comm[lo - self.start:hi - self.start])
            else:
                self.grad_data.copy_(self.grad_comm)
            self.grad_comm = None

    def reset(self) -> None:
        self.pending = {id(p) for p in self.params}
        self.grad_launched = False
        self.grad_handle = None
        self.grad_comm = None

    # ------------------------------------------------------------------ parameter all-gather
    def start_param_sync(self, async_op: bool = True) -> None:
        """All-gather every rank's updated shard of the parameters into ``param_data``."""
        buf = self.buffer
        if buf.dp_size == 1 or self.param_data is None:
            return
        n = self.numel // buf.dp_size
        local = self.param_data[buf.dp_rank * n:(buf.dp_rank + 1) * n]
        self.param_handle = all_gather_flat(self.param_data, local, buf.dp_group, async_op=async_op)
        if not async_op:
            self.param_handle = None

    def finish_param_sync(self) -> None:
        if self.param_handle is not None:
            self.param_handle.wait()
            self.param_handle = None


class GradBuffer:
    """Flat gradient buffer (and, in shard mode, parameter buffer) for a list of parameters.

    ``params`` are given in registration (forward) order, all of one dtype. ``grad_dtype`` is the
    accumulation dtype of ``main_grad``; ``reduce_dtype`` the dtype on the wire (a cast copy of the
    bucket is reduced when they differ).
    """

    def __init__(self, params: list[nn.Parameter], *, grad_dtype: torch.dtype, bucket_numel: Optional[int],
                 dp_group: ProcessGroup = None, shard: bool = False, reduce_dtype: Optional[torch.dtype] = None):
        if not params:
            raise ValueError("GradBuffer needs at least one parameter")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"GradBuffer holds parameters of one dtype, got {sorted(map(str, dtypes))}; "
                             "build one buffer per parameter dtype")
        self.param_dtype = params[0].dtype
        self.grad_dtype = grad_dtype
        self.reduce_dtype = reduce_dtype or grad_dtype
        self.dp_group, self.shard = dp_group, shard
        self.dp_size, self.dp_rank = group_size(dp_group), group_rank(dp_group)
        device = params[0].device
        bucket_numel = bucket_numel if bucket_numel and bucket_numel > 0 else None
        pad_to = self.dp_size * ALIGN if shard else ALIGN

        # ---- layout: reverse registration order, aligned starts, padded bucket ends
        self.param_range: dict[int, tuple[int, int]] = {}
        bucket_specs: list[tuple[list[nn.Parameter], int, int]] = []
        offset, bucket_start, current = 0, 0, []
        for p in reversed(params):
            offset = _round_up(offset, ALIGN)
            self.param_range[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
            current.append(p)
            if bucket_numel is not None and offset - bucket_start >= bucket_numel:
                end = _round_up(offset, pad_to)
                bucket_specs.append((current, bucket_start, end))
                bucket_start, offset, current = end, end, []
        if current:
            end = _round_up(offset, pad_to)
            bucket_specs.append((current, bucket_start, end))
            offset = end
        self.numel = offset

        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device) if shard else None
        self.params = list(params)
        self.buckets = [Bucket(self, i, ps, s, e) for i, (ps, s, e) in enumerate(bucket_specs)]
        self.param_to_bucket: dict[int, Bucket] = {id(p): b for b in self.buckets for p in b.params}
        self._next_launch = 0
        self.synced = False  # True from finish_grad_sync() until zero(): the step's gradients are final
        # Lazy zeroing: ids of parameters whose main_grad still holds an earlier step's values. zero()
        # only marks them; the first gradient of the step overwrites instead of adding, and settle()
        # zeroes whatever got no gradient before anything reads the buffer.
        self.stale: set[int] = set()

        for p in params:
            s, e = self.param_range[id(p)]
            if self.param_data is not None:
                view = self.param_data[s:e].view(p.shape)
                view.copy_(p.data)
                p.data = view
            p.main_grad = self.grad_data[s:e].view(p.shape)
            p._megacore_grad_buffer = self

    # ------------------------------------------------------------------ accumulation
    def accumulate(self, param: nn.Parameter, grad: torch.Tensor) -> None:
        """``param.main_grad += grad`` (``=`` for the step's first gradient of ``param``)."""
        first = id(param) in self.stale
        accumulate_grad_(param.main_grad, grad, overwrite=first)
        if first:
            self.stale.discard(id(param))

    def settle(self, params) -> None:
        """Zero the ``main_grad`` of those ``params`` that got no gradient yet this step."""
        if self.stale:
            for p in params:
                if id(p) in self.stale:
                    p.main_grad.zero_()
                    self.stale.discard(id(p))

    # ------------------------------------------------------------------ hooks' side
    def mark_ready(self, param: nn.Parameter) -> None:
        """Record that ``param``'s gradient for this step is complete; launch buckets that filled.

        Buckets launch strictly in index order (a full bucket waits for earlier ones), so every
        rank issues its collectives in the same order even if readiness order differs.
        """
        bucket = self.param_to_bucket[id(param)]
        if bucket.grad_launched:
            raise RuntimeError(
                f"a gradient arrived for a parameter of shape {tuple(param.shape)} after its bucket's reduction "
                "was launched. This happens when a parameter's gradient is produced by two separate backward "
                "passes within one synchronized step (e.g. reentrant checkpointing around a shared weight); "
                "use non-reentrant activation checkpointing or DistributedDataParallel(overlap_grad_reduce=False)")
        bucket.pending.discard(id(param))
        while self._next_launch < len(self.buckets) and not self.buckets[self._next_launch].pending:
            self.buckets[self._next_launch].start_grad_sync()
            self._next_launch += 1

    def start_grad_sync(self) -> None:
        """Launch every bucket not launched yet (in index order)."""
        for b in self.buckets[self._next_launch:]:
            if not b.grad_launched:
                b.start_grad_sync()
        self._next_launch = len(self.buckets)

    def finish_grad_sync(self) -> None:
        """Launch what is left, wait for all reductions, and reset the per-step readiness state.

        Idempotent until ``zero()``: a second call in the same step does not reduce again.
        """
        if self.synced:
            return
        self.start_grad_sync()
        for b in self.buckets:
            b.finish_grad_sync()
        self.reset()
        self.synced = True

    def reset(self) -> None:
        for b in self.buckets:
            b.reset()
        self._next_launch = 0

    def zero(self) -> None:
        """Start a new step: every ``main_grad`` counts as zero (lazily: see ``stale``; padding
        between parameters is never written, so it stays zero)."""
        self.stale = {id(p) for p in self.params}
        self.reset()
        self.synced = False

    # ------------------------------------------------------------------ shard mode
    def local_ranges(self) -> list[tuple[nn.Parameter, int, int, Bucket]]:
        """For this DP rank: ``(param, flat_start, flat_end, bucket)`` of every param piece it owns.

        ``flat_start:flat_end`` index the parameter flattened; pieces are listed in buffer order.
        Without shard mode a rank owns every parameter whole.
        """
        out = []
        for b in self.buckets:
            lo, hi = b.shard_range(self.dp_rank) if self.shard else (b.start, b.end)
            for p in b.params:  # ascending buffer offset
                s, e = self.param_range[id(p)]
                a, z = max(s, lo), min(e, hi)
                if a < z:
                    out.append((p, a - s, z - s, b))
        return out

    def finish_param_sync(self) -> None:
        for b in self.buckets:
            b.finish_param_sync()


def add_to_main_grad(param: nn.Parameter, grad: torch.Tensor) -> None:
    """``param.main_grad += grad`` respecting lazy zeroing (for code outside DDP's hooks)."""
    buf = getattr(param, "_megacore_grad_buffer", None)
    if buf is None:
        param.main_grad.add_(grad)
    else:
        buf.accumulate(param, grad)


def settled_main_grad(param: nn.Parameter) -> torch.Tensor:
    """``param.main_grad`` with this step's value (zeros if no gradient arrived yet)."""
    buf = getattr(param, "_megacore_grad_buffer", None)
    if buf is not None:
        buf.settle([param])
    return param.main_grad
