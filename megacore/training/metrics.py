"""Training metrics: every record goes to the run's sinks (``megacore.training.sinks``: ``metrics.jsonl``
always, TensorBoard and Weights & Biases when asked), and a live console line with an ETA.

Only rank 0 writes (``enabled``); the other ranks hold a disabled logger.
"""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from typing import Optional


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class EtaEstimator:
    """Time left = the mean ``step_time_s`` of the last ``window`` steps x the steps left.

    The first ``warmup`` steps after a start or resume are left out: they include compilation,
    autotuning and allocator warm-up, and one of them can take longer than a whole short run (an
    ETA from the run's mean since step 1 said 20:53 for an 80 s run). Until a step past the warm-up
    is seen the ETA is unknown (None). Evals and checkpoint saves are not in ``step_time_s``, so
    the ETA counts training steps only.
    """

    def __init__(self, window: int = 20, warmup: int = 2):
        self.window, self.warmup = window, warmup
        self.reset()

    def reset(self) -> None:
        self._seen = 0
        self._times: deque = deque(maxlen=self.window)

    def observe(self, step_time_s: float) -> None:
        self._seen += 1
        if self._seen > self.warmup and math.isfinite(step_time_s):
            self._times.append(step_time_s)

    def seconds_left(self, steps_left: int) -> Optional[float]:
        if not self._times:
            return None
        return sum(self._times) / len(self._times) * max(steps_left, 0)


class MetricsLogger:
    """``sinks``: where records go (``sinks.open_sinks``); ``total_iters``: ``train.iters``, for the
    console line and the ETA; ``stream``: the console (stdout)."""

    def __init__(self, sinks: list, enabled: bool = True, total_iters: int = 0, stream=None):
        self.enabled = enabled
        self.total_iters = total_iters
        self.stream = stream or sys.stdout
        self.sinks = list(sinks) if enabled else []
        self.eta = EtaEstimator()

    def _write(self, step: int, record: dict) -> None:
        for sink in self.sinks:
            sink.write(step, record)

    def log_step(self, record: dict, print_line: bool = True) -> None:
        if not self.enabled:
            return
        self.eta.observe(record.get("step_time_s", float("nan")))
        self._write(record["step"], record)
        if print_line:
            self.stream.write(self.console_line(record) + "\n")
            self.stream.flush()

    def console_line(self, r: dict) -> str:
        step = r["step"]
        parts = [f"step {step:>6d}/{self.total_iters}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}",
                 f"gnorm {r['grad_norm']:.3f}", f"tok/s {r['tokens_per_s']:,.0f}"]
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        if r.get("mem_gb") is not None:
            parts.append(f"mem {r['mem_gb']:.1f}GB")
        if r.get("loss_scale") is not None:
            parts.append(f"scale {r['loss_scale']:.0f}")
        if r.get("skipped"):
            parts.append(f"SKIPPED: {r.get('skip_reason', 'not applied')}")
        left = self.eta.seconds_left(self.total_iters - step)
        parts.append(f"eta {_fmt_eta(left) if left is not None else '?'}")
        return " | ".join(parts)

    def log_eval(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        self._write(step, rec)
        self.stream.write(f"[eval] step {step} | loss {loss:.4f} | ppl {rec['eval_ppl']:.2f}\n")
        self.stream.flush()

    def info(self, msg: str) -> None:
        if self.enabled:
            self.stream.write(f"[megacore] {msg}\n")
            self.stream.flush()

    def outputs(self, checkpoint_dir: Optional[str] = None, profile_dir: Optional[str] = None) -> str:
        """Where this run's outputs are, as one line: the sinks, the checkpoints, the profiler's files."""
        parts = [sink.describe() for sink in self.sinks]
        parts.append(f"checkpoints {os.path.abspath(checkpoint_dir)}" if checkpoint_dir
                     else "checkpoints none (checkpoint.dir is unset)")
        if profile_dir:
            parts.append(f"profiler {profile_dir}")
        return "outputs: " + "; ".join(parts)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        errors = []
        for sink in sinks:  # every sink gets closed, even if one fails
            try:
                sink.close()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def reset_timer(self, steps_done: int = 0) -> None:
        """A (re)start at ``steps_done``: the ETA starts over, with its own warm-up."""
        self.eta.reset()
