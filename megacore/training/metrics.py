"""Training metrics: ``metrics.jsonl`` (one JSON object per optimizer step), a live console line,
and TensorBoard when it is installed and enabled.

Only the rank that owns the last pipeline stage of data-parallel rank 0 writes (``enabled``).

``read_scalars`` is how the training step turns device values (loss, grad norm, flags) into
numbers: every read of a CUDA tensor waits for the GPU, so the step batches them into one copy.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time




def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    def __init__(self, log_dir: str, enabled: bool = True, tensorboard: bool = False, total_iters: int = 0,
                 stream=None, resume: bool = False):
        self.enabled = enabled
        self.total_iters = total_iters
        self.stream = stream or sys.stdout
        self._file = None
        self._tb = None
        self._start = time.time()
        self._start_step = 0
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self._file = open(self.path, "a" if resume else "w", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir)
            except Exception as e:  # tensorboard is optional
                print(f"[megacore] TensorBoard disabled ({e}); pip install tensorboard to enable it", file=self.stream)

    def log_step(self, record: dict, print_line: bool = True) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"train/{k}", v, record["step"])
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
        done = step - self._start_step
        elapsed = time.time() - self._start
        remaining = self.total_iters - step
        parts.append(f"eta {_fmt_eta(elapsed / max(done, 1) * remaining) if done else '?'}")
        return " | ".join(parts)

    def log_eval(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        self._file.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            self._tb.add_scalar("eval/loss", loss, step)
        self.stream.write(f"[eval] step {step} | loss {loss:.4f} | ppl {rec['eval_ppl']:.2f}\n")
        self.stream.flush()

    def info(self, msg: str) -> None:
        if self.enabled:
            self.stream.write(f"[megacore] {msg}\n")
            self.stream.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def reset_timer(self, steps_done: int = 0) -> None:
        self._start = time.time()
        self._start_step = steps_done
