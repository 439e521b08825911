"""Validation loss during training: ``train.eval_iters`` batches of the validation split, forward
only through the same pipeline schedule as training, the numbers read once at the end."""

from __future__ import annotations

from typing import Callable

import torch

from megacore.optim.step_info import read_scalars


def evaluate(chunks, data, cfg, state, step: int, sum_over_layout: Callable, count_over_dp: Callable) -> float:
    """Mean loss over ``train.eval_iters`` validation batches at ``step`` (each evaluation reads its
    own batches: ``(step // eval_interval - 1) * eval_iters`` onward). ``sum_over_layout(local)``:
    the loss summed over the ranks (``megacore.training.layout_sums``); ``count_over_dp(n)``: the
    labelled tokens summed over data parallelism."""
    from megacore.pipeline.schedules import forward_backward

    t = cfg.train
    for c in chunks:
        c.eval()
    sums, counts = [], []
    base = (step // t.eval_interval - 1) * t.eval_iters if t.eval_interval else 0
    for k in range(t.eval_iters):
        micro, local_tokens = data.micro_batches(data.valid_ds, base + k)
        n = count_over_dp(local_tokens)
        if isinstance(n, torch.Tensor):
            # An empty batch (n == 0) contributes 0 / 1 * 0: what skipping it did, without reading n.
            denominator = n.clamp(min=1.0)
        elif n == 0:
            continue
        else:
            denominator = n
        local = forward_backward(chunks, micro, denominator, pp_group=state.pp_group,
                                 schedule=cfg.parallel.pipeline_schedule,
                                 embedding_group=state.embedding_group, forward_only=True)
        sums.append(sum_over_layout(local)[0])
        counts.append(n)
    for c in chunks:
        c.train()
    values = read_scalars(sums + counts)
    loss_sum, tokens = 0.0, 0.0
    for value, n in zip(values[:len(sums)], values[len(sums):]):
        loss_sum += value * n
        tokens += n
    return loss_sum / max(tokens, 1.0)
