"""The training contract, and the small types the trainer's step is made of (``TrainingError``,
``resolve_device``, ``collate``, ``StepResult``, ``StopFlag``).

Loss normalization (layout-invariant): every micro-batch contributes the SUM of its per-token
losses divided by the number of labelled tokens in the whole GLOBAL batch. Summed over micro-batches
and data-parallel ranks (gradients are summed, not averaged), this is exactly the mean over all
labelled tokens of the global batch, whatever the micro-batch count or the parallel layout.

Samples are addressed by global index: step ``k`` consumes samples ``[k·G, (k+1)·G)`` of the
training set (G = global batch size); data-parallel rank ``r`` takes the ``r``-th contiguous slice
of G/DP samples, split into micro-batches. The data position is therefore just the step number.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megacore.config import ConfigError, RunConfig


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, bad data); the message says why and what to try."""


class PeerFailed(RuntimeError):
    """This rank stops because another rank failed (that rank reports the reason)."""




def check_device(cfg: RunConfig, device: torch.device) -> None:
    """What ``RunConfig.validate`` cannot know: the device ``device=auto`` resolved to, and whether it
    runs FP8 GEMMs (the support table refuses ``precision.fp8`` with ``device=cpu`` already)."""
    if cfg.precision.fp8 is not None:
        from megacore.precision.fp8 import fp8_device_problem

        problem = fp8_device_problem(device)
        if problem is not None:
            raise ConfigError(problem)


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA GPU is visible; use device=cpu (or device=auto)")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def collate(samples: list[dict], device: torch.device) -> dict:
    """Stack a list of sample dicts (numpy arrays) into tensors on ``device``."""
    out = {}
    for key in samples[0]:
        arr = np.stack([s[key] for s in samples])
        out[key] = torch.from_numpy(arr).to(device, non_blocking=True)
    return out


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    skipped: bool = False
    loss_scale: Optional[float] = None
    moe_aux_loss: Optional[float] = None  # MoE load-balancing loss, mean over layers and micro-batches
    loss_spike: bool = False  # the loss-spike check vetoed the step (see megacore.training.divergence)
    moe_metrics: Optional[dict] = None  # expert load and z-loss keys (megacore.training.moe.end_moe_step)
    # Multi-token prediction: each depth's unweighted term of the objective (megacore.layers.mtp)
    mtp_losses: Optional[list] = None


class StopFlag:
    """Set by SIGTERM / SIGINT; the loop finishes the current step, saves if configured, and exits."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, world_size: int, device: torch.device, votes: Optional[float] = None) -> bool:
        """Whether the run stops here, the same answer on every rank. ``votes``: the number of ranks
        that asked to stop, from the all-reduce a step's loss travelled in (already the same on every
        rank); None: agree now (MAX of the flags over the world, a collective and a host sync)."""
        if votes is not None:
            return votes > 0
        if world_size == 1:
            return self.requested
        import torch.distributed as dist

        from megacore.distributed.comm import comm_device

        flag = torch.tensor([1.0 if self.requested else 0.0], device=comm_device(device))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
