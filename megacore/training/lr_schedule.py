"""Learning-rate schedules: linear warmup, then cosine, linear, WSD (warmup-stable-decay) or constant.

``lr(step)`` for step = 0, 1, ... (the step about to be taken). Warmup rises linearly from lr/warmup
to lr over ``warmup_iters`` steps; decay runs from the end of warmup to ``lr_decay_iters`` (default
``iters``) down to ``min_lr`` and stays there. WSD holds ``lr`` and decays (linearly) only over the
last ``wsd_decay_fraction`` of the decay span.
"""

from __future__ import annotations

import math

from megacore.config import TrainConfig


class LRSchedule:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.decay_iters = cfg.lr_decay_iters or cfg.iters

    def __call__(self, step: int) -> float:
        c = self.cfg
        if c.warmup_iters > 0 and step < c.warmup_iters:
            return c.lr * (step + 1) / c.warmup_iters
        if c.lr_decay_style == "constant":
            return c.lr
        span = max(self.decay_iters - c.warmup_iters, 1)
        progress = min(max(step - c.warmup_iters, 0) / span, 1.0)
        if c.lr_decay_style == "cosine":
            coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif c.lr_decay_style == "linear":
            coeff = 1.0 - progress
        elif c.lr_decay_style == "wsd":
            decay_start = 1.0 - c.wsd_decay_fraction
            coeff = 1.0 if progress <= decay_start else 1.0 - (progress - decay_start) / max(c.wsd_decay_fraction, 1e-12)
        else:
            raise ValueError(f"unknown lr_decay_style {c.lr_decay_style!r}")
        return c.min_lr + (c.lr - c.min_lr) * coeff

    def apply(self, optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
