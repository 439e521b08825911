"""Measure how many micro-batches' activations a pipeline stage holds at once.

A micro-batch is *in flight* on a stage from the moment its forward saves its first activation for
backward until autograd has released the last of them (during that micro-batch's backward). The
tracker sees this directly through ``torch.autograd.graph.saved_tensors_hooks``: every tensor
autograd saves is wrapped in a small handle whose lifetime is the saved tensor's lifetime, so the
count is what memory actually holds, not what a schedule claims.

The bound that makes 1F1B worth using: stage ``s`` of ``pp`` holds at most ``pp - s`` micro-batches
(stage 0 holds ``pp``), whatever the number of micro-batches; GPipe holds all of them.
Interleaved 1F1B holds more micro-batch *chunks* per rank, each a ``1/vp`` slice of the stage's layers.

Tracking wraps every saved tensor in a Python object, so it is for tests and diagnostics only.
"""

from __future__ import annotations

import contextlib
from typing import Hashable, Iterator

import torch


class _SavedHandle:
    """Holds one saved tensor; its destruction is the tensor leaving the autograd graph."""

    __slots__ = ("tensor", "tracker", "key")

    def __init__(self, tensor: torch.Tensor, tracker: "InFlightTracker", key: Hashable):
        # Detached: a tensor saved by the op that produced it would otherwise hold its own grad_fn,
        # a reference cycle through the autograd graph that no garbage collector can see.
        self.tensor, self.tracker, self.key = tensor.detach(), tracker, key
        tracker._acquire(key)

    def __del__(self):
        self.tracker._release(self.key)


class InFlightTracker:
    """Counts micro-batches (or micro-batch chunks) whose forward activations are still alive.

    ``max_in_flight`` is the peak number of distinct keys alive at once since ``reset()``;
    ``timeline`` records the count after every change, for debugging a schedule.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._live: dict[Hashable, int] = {}
        self.max_in_flight = 0
        self.forwards = 0
        self.timeline: list[int] = []

    @property
    def in_flight(self) -> int:
        return len(self._live)

    def _acquire(self, key: Hashable) -> None:
        new = key not in self._live
        self._live[key] = self._live.get(key, 0) + 1
        if new:
            self.max_in_flight = max(self.max_in_flight, len(self._live))
            self.timeline.append(len(self._live))

    def _release(self, key: Hashable) -> None:
        n = self._live.get(key, 0) - 1
        if n <= 0:
            self._live.pop(key, None)
            self.timeline.append(len(self._live))
        else:
            self._live[key] = n

    @contextlib.contextmanager
    def forward(self, key: Hashable) -> Iterator[None]:
        """Attribute every tensor autograd saves inside this block to micro-batch ``key``."""
        self.forwards += 1

        def pack(t: torch.Tensor):
            return _SavedHandle(t, self, key)

        def unpack(h):
            return h.tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
