"""One step's record in ``metrics.jsonl`` (and the other sinks): what the trainer read from the
step, with its throughput. The fields are listed in docs/tracking.md."""

from __future__ import annotations

from typing import Optional

from megacore.training.contract import StepResult


def step_record(r: StepResult, dt: float, step: int, *, lr: float, consumed_samples: int, tokens_per_step: int,
                skip_reason: Optional[str] = None, host_s: Optional[float] = None, mem_gb: Optional[float] = None,
                flops_per_token: Optional[float] = None, world_size: int = 1,
                peak_tflops: Optional[float] = None) -> dict:
    """The record of step ``step`` (1-based) that took ``dt`` seconds.

    ``tokens_per_step``: global batch x sequence length. ``host_s``: the host time spent queueing
    the step; on a GPU, a ``host_queue_s`` close to ``step_time_s`` means the host, not the GPU,
    sets the pace. ``skipped`` says whether the update was applied, ``skip_reason`` why not
    (``DivergenceGuard``); ``consumed_samples``: training samples consumed once this step is done.
    On a GPU (``flops_per_token`` given): ``tflops_per_gpu``, ``mfu`` against ``peak_tflops``, and
    ``mem_gb``, the step's peak allocated memory.
    """
    tps = tokens_per_step / dt
    record = {"step": step, "loss": r.loss, "grad_norm": r.grad_norm, "lr": lr, "tokens_per_s": tps,
              "step_time_s": dt, "labelled_tokens": r.tokens, "skipped": r.skipped,
              "consumed_samples": consumed_samples}
    if r.skipped:
        record["skip_reason"] = skip_reason or "skipped"
    if flops_per_token is not None:
        achieved = tps * flops_per_token / world_size / 1e12
        record["tflops_per_gpu"] = achieved
        record["mfu"] = achieved / peak_tflops if peak_tflops else None
        record["mem_gb"] = mem_gb
    if host_s is not None:
        record["host_queue_s"] = host_s
    if r.moe_aux_loss is not None:
        record["moe_aux_loss"] = r.moe_aux_loss
    if r.mtp_losses:  # megacore.layers.mtp: loss + mtp_loss_weight * mtp_loss is the objective
        record["mtp_loss"] = sum(r.mtp_losses) / len(r.mtp_losses)
        if len(r.mtp_losses) > 1:
            record.update({f"mtp_loss_{k}": v for k, v in enumerate(r.mtp_losses, start=1)})
    record.update(r.moe_metrics or {})  # expert load (and z-loss): megacore.training.moe.end_moe_step
    if r.loss_scale is not None:
        record["loss_scale"] = r.loss_scale
    return record
