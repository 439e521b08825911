"""A queued training step whose numbers may still be on the device (what ``Trainer.train_step``
returns; the trainer reads it one step late)."""

from __future__ import annotations

import time
from typing import Optional

import torch

from megacore.training.contract import StepResult
from megacore.optim.step_info import read_scalars


class PendingStep:
    """A training step as ``Trainer.train_step`` queued it: its numbers may still be on the device.

    Reading a CUDA value makes the host wait until the GPU has computed it, and then the GPU idles
    while the host prepares the next step. So the trainer reads step ``k`` only after step
    ``k + 1`` is queued (``Trainer._loop``), with one device->host copy (:meth:`resolve`) of
    everything the step produced: the loss and the ranks' stop votes (one all-reduce), the
    labelled-token count (a device tensor when it was all-reduced over data parallelism), the
    optimizer's grad norm and skip flag (``StepInfo``), with the loss-spike check on its verdict
    (``spike``), and for an MoE model the expert-load metrics (``moe_metrics``), and with multi-token prediction each depth's loss term. A step made from an already-read ``StepResult`` (:meth:`of`) is ``ready``.
    """

    def __init__(self, index: int, loss_votes=None, tokens=None, info=None, scale: float = 1.0,
                 result: Optional[StepResult] = None):
        self.index = index              # 0-based; logs and checkpoints call it step index + 1
        self.loss_votes = loss_votes    # [global loss sum * scale, stop votes]: 2-element tensor
        self.tokens = tokens            # labelled tokens of the global batch: number or tensor
        self.info = info                # the optimizer's StepInfo
        self.scale = scale              # the loss scale the loss sum still carries
        self.result = result            # the StepResult, once read
        self.votes: Optional[float] = None  # ranks that asked to stop (None: not collected)
        self.mem_gb: Optional[float] = None  # peak GPU memory allocated while the step was queued
        self.start_mark = self.end_mark = None  # when the step began/ended (timing_mark)
        self.host_s: Optional[float] = None  # host seconds spent queueing the step (train_step)
        self.aux_denominator: Optional[int] = None  # loss_votes[2] / this = the MoE balance loss
        self.spike = None               # loss above the spike threshold: 0-dim tensor (unread) or None
        self.spike_threshold: Optional[float] = None  # that threshold (a host number), for the log
        self.moe_metrics: Optional[dict] = None  # name -> device scalar (megacore.training.moe.end_moe_step)
        self.mtp_depths = 0  # the last this many entries of loss_votes: each MTP depth's term x scale

    @classmethod
    def of(cls, index: int, result: StepResult) -> "PendingStep":
        return cls(index, result=result)

    @property
    def ready(self) -> bool:
        """True when the step's numbers are on the host already."""
        return self.result is not None

    def resolve(self) -> StepResult:
        """Read the step's numbers (one device->host copy; waits for the GPU to finish the step)."""
        if self.result is None:
            info = self.info
            aux = [self.loss_votes[2]] if self.aux_denominator else []
            moe = self.moe_metrics or {}
            mtp = list(self.loss_votes[len(self.loss_votes) - self.mtp_depths:].unbind()) if self.mtp_depths else []
            values = read_scalars([self.loss_votes[0], self.loss_votes[1], self.tokens,
                                   0.0 if self.spike is None else self.spike, *aux, *moe.values(),
                                   *info.pending(), *mtp])
            mtp_losses = [v / self.scale for v in values[len(values) - len(mtp):]] if mtp else None
            values = values[:len(values) - len(mtp)]
            loss_sum, self.votes, tokens, spike = values[:4]
            moe_aux = values[4] / self.aux_denominator if aux else None
            start = 4 + len(aux)
            moe_metrics = dict(zip(moe, values[start:start + len(moe)])) or None
            info.resolve(values[start + len(moe):])
            self.result = StepResult(loss=loss_sum / self.scale,
                                     grad_norm=float("nan") if info.grad_norm is None else float(info.grad_norm),
                                     tokens=int(tokens), skipped=info.skipped, loss_scale=info.loss_scale,
                                     moe_aux_loss=moe_aux, loss_spike=bool(spike),
                                     moe_metrics=moe_metrics, mtp_losses=mtp_losses)
        return self.result


def timing_mark(device: torch.device):
    """Now, on the timeline that runs the steps: a CUDA event recorded on the current stream (it
    completes when the GPU gets there), or the host clock on CPU."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def seconds_between(start, end) -> float:
    """Seconds between two marks. Called once the step's values were read, so the events are
    complete and ``synchronize`` returns at once (it only waits for a step read early)."""
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3
