"""The ``profile`` section at run time: the PyTorch profiler over a step range, and CUDA memory history.

- ``profile.start_step``/``end_step`` (1-based, inclusive): ``torch.profiler`` (CPU, plus CUDA on a
  GPU) records those steps; each selected rank (``profile.ranks``, null: all) writes a Chrome trace
  ``<log.dir>/profile/trace_rank<r>_steps<a>-<b>.json`` (open it in https://ui.perfetto.dev or
  chrome://tracing). Each step's host work sits under a ``megacore/step_<n>`` label.
- ``profile.memory_snapshot``: CUDA memory history (``torch.cuda.memory._record_memory_history``,
  at most ``memory_snapshot_max_entries`` events) from before the model is built, dumped to
  ``<log.dir>/profile/memory_snapshot_rank<r>.pickle`` at the end, or to ``..._oom.pickle`` when
  the run fails out of memory (the error is raised again); view it at https://pytorch.org/memory_viz.
  It needs CUDA: on another device the run stops at the start with a ConfigError rather than
  producing nothing.

Where the step boundaries are: the trainer queues step ``k + 1`` before it reads step ``k``, and on
a GPU the host returns from queueing long before the device finishes. So the profiler starts
before step ``start_step`` is queued and stops after step ``end_step`` is queued, and at both
boundaries the host waits for the device (one sync each, only in the profiled run): the trace then
holds exactly the device work of the requested steps, not a tail of the step before or the head of
the step after. A run that ends earlier (``train.iters``, a stop signal, an error) stops the profiler
and writes the trace of the steps it covered.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch

from megacore.config import ConfigError


class Profiler:
    """One per rank. ``with profiler:`` around the run; ``with profiler.step(n):`` around the
    queueing of step ``n`` (1-based)."""

    def __init__(self, cfg, log_dir: str, rank: int, device: torch.device, info: Callable[[str], None] = print):
        self.cfg = cfg
        self.rank = rank
        self.device = device
        self.info = info
        self.dir = os.path.join(log_dir, "profile")
        selected = cfg.ranks is None or rank in cfg.ranks
        self.steps = None
        if cfg.start_step is not None and selected:
            self.steps = (cfg.start_step, cfg.end_step if cfg.end_step is not None else cfg.start_step)
        self.snapshots = bool(cfg.memory_snapshot) and selected
        self._prof = None
        self._first = self._last = None  # steps the running profiler covers
        self._traced = False
        self._recording = False
        self.written: list[str] = []

    @property
    def output_dir(self) -> Optional[str]:
        """``<log.dir>/profile`` when the run profiles anything (on any rank), else None."""
        used = self.cfg.start_step is not None or self.cfg.memory_snapshot
        return os.path.abspath(self.dir) if used else None

    # ------------------------------------------------------------------------------- the run
    def __enter__(self) -> "Profiler":
        if self.cfg.memory_snapshot and self.device.type != "cuda":
            raise ConfigError(
                f"profile.memory_snapshot=True records CUDA memory history, but this run's device is "
                f"{self.device.type}; set profile.memory_snapshot=false, or run on a GPU (device=cuda)")
        if self.snapshots:
            torch.cuda.memory._record_memory_history(max_entries=self.cfg.memory_snapshot_max_entries)
            self._recording = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        failing = exc is not None
        try:
            self._stop_trace(ended_early=True)
            if self._recording:
                oom = isinstance(exc, torch.cuda.OutOfMemoryError)
                self._dump_memory("_oom" if oom else "")
        except Exception as e:
            if not failing:
                raise
            # The run's own error is the one to report; say what was lost.
            self.info(f"profiler: could not write its files while the run failed ({type(e).__name__}: {e})")
        finally:
            if self._recording:
                self._recording = False
                torch.cuda.memory._record_memory_history(enabled=None)
        if self.steps is not None and not self._traced and not failing:
            self.info(f"profiler: profile.start_step={self.steps[0]} was never reached; no trace written")
        return False

    # ------------------------------------------------------------------------------- steps
    @contextlib.contextmanager
    def step(self, n: int):
        """Around the queueing of step ``n``: starts the profiler before step ``start_step`` (or
        the first step inside the range, after a resume), labels the step, stops after
        ``end_step``."""
        if self.steps is None:
            yield
            return
        first, last = self.steps
        if self._prof is None and not self._traced and first <= n <= last:
            self._start(n)
        if self._prof is None:
            yield
            return
        with torch.profiler.record_function(f"megacore/step_{n}"):
            yield
        self._last = n
        if n >= last:
            self._stop_trace(ended_early=False)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, n: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._sync()  # the device work of earlier steps stays out of the trace
        self._prof = torch.profiler.profile(activities=activities, record_shapes=self.cfg.record_shapes,
                                            with_stack=self.cfg.with_stack)
        self._prof.start()
        self._first, self._last = n, None

    def _stop_trace(self, ended_early: bool) -> None:
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        self._traced = True
        self._sync()  # the device work of the last traced step lands in the trace
        prof.stop()
        if self._last is None:  # stopped while its first step was being queued (an error)
            return
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"trace_rank{self.rank}_steps{self._first}-{self._last}.json")
        tmp = path + ".tmp"
        prof.export_chrome_trace(tmp)
        os.replace(tmp, path)
        self.written.append(path)
        note = (f" (the run ended before profile.end_step={self.steps[1]})"
                if ended_early and self._last < self.steps[1] else "")
        self.info(f"profiler: steps {self._first}-{self._last} traced to {os.path.abspath(path)}{note}")

    def _dump_memory(self, suffix: str) -> None:
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"memory_snapshot_rank{self.rank}{suffix}.pickle")
        tmp = path + ".tmp"
        torch.cuda.memory._dump_snapshot(tmp)
        os.replace(tmp, path)
        self.written.append(path)
        self.info(f"profiler: CUDA memory snapshot written to {os.path.abspath(path)} (view it at "
                  "https://pytorch.org/memory_viz)")
