"""The divergence policy: which training steps are skipped, why, and when the run gives up.

A step is *skipped* -- the optimizer leaves the weights, the Adam moments and its step counter as
they were -- when

* its loss is not finite, or its global grad norm is not finite;
* ``train.loss_spike_factor`` is set and its loss exceeds that factor times the mean loss of the
  last ``train.loss_spike_window`` applied steps up to the one before the previous step (the host
  reads each step one step late, see ``PendingStep``: when it queues step ``k`` it knows steps
  ``<= k - 2``; taking exactly those keeps the decision independent of when steps were read);
* fp16: a gradient overflowed (the dynamic loss scaler lowers its scale: normal at the start).

The first two are decided on the device, before the optimizer step (:meth:`DivergenceGuard.veto`
returns a 0-dim tensor the optimizer folds into its own non-finite check), so they cost no host
sync; the host learns the outcome when it reads the step with its other numbers.

Every skipped step is logged in ``metrics.jsonl`` with ``skipped: true`` and a ``skip_reason``
(:meth:`DivergenceGuard.observe`). ``train.max_skipped_steps`` skips in a row stop the run with a
``TrainingError`` (exit 1); an fp16 overflow counts only once the loss scale cannot go lower
(before that, lowering the scale is the cure). An applied step resets the count.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch

from megacore.training.contract import StepResult, TrainingError


class DivergenceGuard:
    """Decides and records skipped steps (see the module docstring).

    ``max_skipped``: stop after this many consecutive counted skips (None: never stop).
    ``spike_factor``/``spike_window``: the loss-spike check (factor None: off).
    ``min_loss_scale``: below this an fp16 loss scale cannot back off (None without fp16).
    """

    def __init__(self, max_skipped: Optional[int], spike_factor: Optional[float] = None, spike_window: int = 20,
                 min_loss_scale: Optional[float] = None):
        self.max_skipped = max_skipped
        self.spike_factor = spike_factor
        self.spike_window = spike_window
        self.min_loss_scale = min_loss_scale
        self._applied: deque = deque(maxlen=spike_window + 1)  # (step index, loss) of applied steps
        self.streak: list[tuple[int, str]] = []                # (1-based step, reason) of the current run of skips

    # ------------------------------------------------------------------------- on the device
    def spike_threshold(self, index: int) -> Optional[float]:
        """Loss above which step ``index`` (0-based) is a spike: factor x the mean loss of the last
        ``spike_window`` applied steps with index ``<= index - 2``; None when the check is off or
        fewer such steps were applied (at the start, and after a resume)."""
        if self.spike_factor is None:
            return None
        known = [loss for i, loss in self._applied if i <= index - 2][-self.spike_window:]
        if len(known) < self.spike_window:
            return None
        return self.spike_factor * sum(known) / len(known)

    @staticmethod
    def veto(loss: torch.Tensor, threshold: Optional[float]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(skip, spike) for a step whose global mean loss is the device scalar ``loss``: ``skip`` is
        1.0 when the loss is not finite or above ``threshold``, else 0.0; ``spike`` (None without a
        threshold) is the second condition alone, for the log. Nothing is read on the host."""
        skip = ~torch.isfinite(loss)
        spike = None
        if threshold is not None:
            spike = loss > threshold  # NaN compares False: a NaN loss is "non-finite", not a spike
            skip = skip | spike
        return skip.float(), spike

    # ------------------------------------------------------------------------- on the host
    def reason(self, r: StepResult) -> Optional[str]:
        """Why step result ``r`` was skipped (None: it was applied)."""
        if not r.skipped:
            return None
        if not math.isfinite(r.loss):
            return f"non-finite loss ({r.loss})"
        if r.loss_spike:
            return "loss spike"
        if r.loss_scale is not None and not math.isfinite(r.grad_norm):
            return f"fp16 gradient overflow (loss scale now {r.loss_scale:g})"
        if not math.isfinite(r.grad_norm):
            return f"non-finite grad norm ({r.grad_norm})"
        return "skipped by the optimizer"

    def counts(self, r: StepResult, reason: str) -> bool:
        """Whether skip ``reason`` of ``r`` counts toward ``max_skipped_steps``: all do, except an
        fp16 overflow while the loss scale can still back off."""
        if reason.startswith("fp16 gradient overflow"):
            floor = self.min_loss_scale if self.min_loss_scale is not None else 0.0
            return r.loss_scale is not None and r.loss_scale <= floor
        return True

    def observe(self, index: int, r: StepResult, threshold: Optional[float] = None) -> Optional[str]:
        """Record step ``index`` (0-based) with result ``r``; returns its skip reason (None when applied).
        ``threshold``: the spike threshold the step was checked against (for the reason's text)."""
        reason = self.reason(r)
        if reason is None:
            self._applied.append((index, r.loss))
            self.streak = []
            return None
        if r.loss_spike and threshold is not None:
            reason = (f"loss spike ({r.loss:.4g} > {threshold:.4g} = {self.spike_factor:g} x the mean of the last "
                      f"{self.spike_window} applied steps)")
        if self.counts(r, reason):
            self.streak.append((index + 1, reason))
        return reason

    def check(self, lr: float, last_checkpoint: Optional[int]) -> None:
        """Raise ``TrainingError`` when the current run of skips reached ``max_skipped_steps``."""
        if self.max_skipped is None or len(self.streak) < self.max_skipped:
            return
        first, last = self.streak[0][0], self.streak[-1][0]
        kept = (f"the newest checkpoint is the one of step {last_checkpoint}"
                if last_checkpoint else "no checkpoint was written")
        raise TrainingError(
            f"{len(self.streak)} steps in a row were skipped (steps {first}-{last}; the last one: "
            f"{self.streak[-1][1]}), reaching train.max_skipped_steps={self.max_skipped}: the run diverged "
            f"(lr {lr:.3e}) and stopped without saving; {kept}. Try a lower train.lr, a longer "
            "train.warmup_iters, train.clip_grad=1.0, or precision.dtype=bf16 instead of fp16 "
            "(train.max_skipped_steps=null only logs skipped steps)")
