"""One call runs a training step's forward and backward, for every layout: ``forward_backward``.

    loss_sum = forward_backward(chunks, micro_batches, num_tokens_global, pp_group, schedule="1f1b")

``chunks`` are this rank's model chunks (``build_stage_modules``; one chunk without virtual stages,
optionally wrapped in ``megacore.distributed.DistributedDataParallel``). ``micro_batches`` is this
rank's list of dicts with ``tokens``/``labels`` ``[B, S]`` and optional ``loss_mask`` ``[B, S]``,
``position_ids``, ``attention_mask`` (every pipeline rank passes the same list: later stages need
positions and masks, the last one labels and loss masks). Equal micro-batch shapes are required.

Loss contract (``megacore.training.contract``): micro-batch ``m`` contributes
``sum_t(token_loss[m, t] * loss_mask[m, t]) / num_tokens_global`` where ``num_tokens_global`` counts
the labelled tokens of the whole GLOBAL batch (all micro-batches, all data-parallel ranks); its
gradient is accumulated (summed) into the parameters. The return value is the sum of these
contributions over this rank's micro-batches -- the step's loss share of this data-parallel rank --
on the last pipeline stage, and 0 on the other stages (all-reduce over PP/DP to log it).

Schedules (``pp > 1``) are torch.distributed.pipelining's, driven through its public ``step()``:

=============  ============================================  ====================================
name           torch class (vp = 1 / vp > 1)                 micro-batches in flight (stage 0)
=============  ============================================  ====================================
1f1b           Schedule1F1B / ScheduleInterleaved1F1B        pp (bounded)
interleaved    ScheduleInterleaved1F1B (needs vp > 1)        about pp*vp chunk-sized ones
gpipe          ScheduleGPipe / ScheduleLoopedBFS             all of them
zero_bubble    ScheduleInterleavedZeroBubble                 like 1f1b, weight grads deferred
=============  ============================================  ====================================

With ``pp == 1`` it is plain gradient accumulation (``forward_backward_no_pipelining``).

After the schedule: tied-embedding gradients are summed between the first and last stage
(``megacore.pipeline.tied``). Data-parallel reduction is NOT done here: with DDP-wrapped chunks the
whole pipelined step runs under ``no_sync()`` and the caller runs ``ddp.finish_grad_sync()`` once,
then clips (``megacore.distributed.clip_grad_norm(params, max_norm, groups=(tp_group, pp_group))``
counts every parameter once across stages) and steps the optimizer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megacore.config import ConfigError
from megacore.pipeline.inflight import InFlightTracker
from megacore.pipeline.partition import check_num_microbatches, resolve_schedule
from megacore.pipeline.stage_module import PipelineChunk
from megacore.distributed.grad_buffer import add_to_main_grad
from megacore.pipeline.tied import allreduce_tied_embedding_grads, tied_embedding_params, unwrap

_AUTO: Any = object()  # "take it from megacore.parallel.get_state()"
MODEL_KEYS = ("position_ids", "attention_mask", "pixel_values")  # pixel_values: LLaVA only


def masked_loss_sum(token_loss_BS: torch.Tensor, loss_mask_BS: torch.Tensor, num_tokens) -> torch.Tensor:
    """``sum(token_loss_BS * loss_mask_BS) / num_tokens`` as an fp32 scalar.

    ``num_tokens`` is a number or a one-element tensor (e.g. a token count still being all-reduced
    on the GPU, so the host need not read it); both give the same bits: the count is rounded to
    fp32 and, on CUDA, applied as a multiplication by its fp32 reciprocal, which is what torch
    itself does when a CUDA tensor is divided by a Python number.
    """
    if token_loss_BS.shape != loss_mask_BS.shape:
        raise ValueError(f"the last stage returned per-token losses of shape {tuple(token_loss_BS.shape)} but the "
                         f"loss mask has shape {tuple(loss_mask_BS.shape)}; the last chunk must return [B, S]")
    total = (token_loss_BS.float() * loss_mask_BS.float()).sum()
    if not isinstance(num_tokens, torch.Tensor):
        return total / num_tokens
    denom = num_tokens.detach().reshape(()).to(device=total.device, dtype=torch.float32)
    return total * torch.reciprocal(denom) if total.device.type == "cuda" else total / denom


class MaskedLossSum:
    """The schedules' ``loss_fn(output, target)``: ``masked_loss_sum`` with a per-step token count."""

    def __init__(self):
        self.num_tokens = 1.0   # a number or a one-element tensor (see masked_loss_sum)

    def __call__(self, token_loss_BS: torch.Tensor, loss_mask_BS: torch.Tensor) -> torch.Tensor:
        return masked_loss_sum(token_loss_BS, loss_mask_BS, self.num_tokens)


# ---------------------------------------------------------------------------------------------- inputs
def _loss_mask(mb: dict) -> torch.Tensor:
    mask = mb.get("loss_mask")
    if mask is None:  # no mask: every labelled token counts
        mask = (mb["labels"] != -100).float()
    return mask


def _check_micro_batches(micro_batches: Sequence[dict], num_tokens_global) -> None:
    if not micro_batches:
        raise ValueError("micro_batches is empty; pass at least one dict with 'tokens' and 'labels'")
    for i, mb in enumerate(micro_batches):
        missing = [k for k in ("tokens", "labels") if mb.get(k) is None]
        if missing:
            raise ValueError(f"micro-batch {i} lacks {missing}; every micro-batch needs 'tokens' and 'labels' [B, S]")
        if mb["tokens"].shape != micro_batches[0]["tokens"].shape:
            raise ValueError(f"micro-batch {i} has tokens of shape {tuple(mb['tokens'].shape)}, micro-batch 0 "
                             f"{tuple(micro_batches[0]['tokens'].shape)}: pipeline schedules need equal micro-batches")
    # A tensor count is not checked here: reading it would wait for the device (the caller checks
    # when it reads the count anyway, e.g. the Trainer one step later).
    if not isinstance(num_tokens_global, torch.Tensor) and float(num_tokens_global) <= 0:
        raise ValueError(f"num_tokens_global={num_tokens_global} must be > 0: it is the number of labelled tokens "
                         "in the global batch (sum of loss_mask over all micro-batches and data-parallel ranks)")


def _denominator(num_tokens_global):
    """The loss denominator as given: a tensor stays on its device (never read), a number becomes a float."""
    return num_tokens_global if isinstance(num_tokens_global, torch.Tensor) else float(num_tokens_global)


def _accumulation_contexts(chunks: Sequence[nn.Module]) -> contextlib.ExitStack:
    """Suspend data-parallel gradient reduction on every chunk (``no_sync()`` of megacore's DDP, or
    FSDP2's ``set_requires_gradient_sync(False)``): gradients only accumulate until the caller syncs."""
    from megacore.distributed.fsdp import fsdp_no_sync

    stack = contextlib.ExitStack()
    for c in chunks:
        if callable(getattr(c, "no_sync", None)):
            stack.enter_context(c.no_sync())
        elif callable(getattr(c, "set_requires_gradient_sync", None)):
            stack.enter_context(fsdp_no_sync(c))
    return stack


def _flush_grads_into_main_grad(chunks: Sequence[nn.Module]) -> None:
    """Zero-bubble weight passes write ``param.grad`` directly (no accumulate-grad hook fires), so
    move any such gradient into DDP's ``main_grad`` like DDP's own hook would."""
    for c in chunks:
        for p in c.parameters():
            if p.grad is not None and getattr(p, "main_grad", None) is not None:
                add_to_main_grad(p, p.grad)
                p.grad = None


def _default_groups(pp_group, embedding_group):
    from megacore.parallel import get_state

    state = get_state()
    if pp_group is _AUTO:
        pp_group = state.pp_group
    if embedding_group is _AUTO:
        embedding_group = state.embedding_group if state.initialized else None
    return pp_group, embedding_group


# ---------------------------------------------------------------------------------------------- pp = 1
def forward_backward_no_pipelining(chunks: Sequence[nn.Module], micro_batches: Sequence[dict], num_tokens_global,
                                   pp_group=None, schedule: str = "1f1b", *, embedding_group=None,
                                   forward_only: bool = False, tracker: Optional[InFlightTracker] = None
                                   ) -> torch.Tensor:
    """Gradient accumulation on one stage: forward+backward each micro-batch in turn (same contract).

    ``pp_group``/``schedule``/``embedding_group`` are accepted for a uniform signature and ignored.
    A DDP-wrapped model runs every micro-batch but the last under ``no_sync()`` so the last one's
    backward overlaps the gradient reduction.
    """
    _check_micro_batches(micro_batches, num_tokens_global)
    if len(chunks) != 1:
        raise ValueError(f"without pipelining the model is one chunk, got {len(chunks)}; virtual stages need pp > 1")
    model, inner = chunks[0], unwrap(chunks[0])
    device = next(inner.parameters()).device
    total = torch.zeros((), device=device, dtype=torch.float32)
    n = len(micro_batches)
    for i, mb in enumerate(micro_batches):
        kwargs = {k: mb[k] for k in MODEL_KEYS if mb.get(k) is not None}
        sync = contextlib.nullcontext() if (forward_only or i == n - 1) else _accumulation_contexts([model])
        track = tracker.forward((0, i)) if tracker is not None and not forward_only else contextlib.nullcontext()
        with sync, track, torch.set_grad_enabled(not forward_only and torch.is_grad_enabled()):
            token_loss = model(mb["tokens"], labels=mb["labels"], reduction="none", **kwargs)
            loss = masked_loss_sum(token_loss, _loss_mask(mb), _denominator(num_tokens_global))
            if not forward_only:
                loss.backward()
        total += loss.detach()
    return total


# ---------------------------------------------------------------------------------------------- pp > 1
@dataclass
class _Runner:
    schedule: Any
    stages: list
    adapters: list
    loss_fn: MaskedLossSum
    has_last: bool


_CLASSES = {  # name -> (single-chunk class, multi-chunk class) in torch.distributed.pipelining
    "1f1b": ("Schedule1F1B", "ScheduleInterleaved1F1B"),
    "interleaved": ("ScheduleInterleaved1F1B", "ScheduleInterleaved1F1B"),
    "gpipe": ("ScheduleGPipe", "ScheduleLoopedBFS"),
    "zero_bubble": ("ScheduleInterleavedZeroBubble", "ScheduleInterleavedZeroBubble"),
}


def _build_runner(chunks, pp_group, name: str, n_mb: int) -> _Runner:
    import torch.distributed.pipelining as pipelining

    pp_size, pp_rank, vp = dist.get_world_size(pp_group), dist.get_rank(pp_group), len(chunks)
    num_stages = pp_size * vp
    device = next(unwrap(chunks[0]).parameters()).device
    adapters, stages = [], []
    for c, chunk in enumerate(chunks):
        index = c * pp_size + pp_rank
        model = unwrap(chunk)
        if model.pre_process != (index == 0) or model.post_process != (index == num_stages - 1):
            raise ValueError(
                f"chunk {c} on pipeline rank {pp_rank} is pipeline stage {index} of {num_stages} but was built with "
                f"pre_process={model.pre_process}, post_process={model.post_process}; build the chunks with "
                f"build_stage_modules(config, pp_rank={pp_rank}, pp_size={pp_size}, vp_size={vp}, ...)")
        adapter = PipelineChunk(chunk, c)
        adapters.append(adapter)
        stages.append(pipelining.PipelineStage(adapter, index, num_stages, device, group=pp_group))
    loss_fn = MaskedLossSum()
    single, multi = _CLASSES[name]
    if vp == 1 and single in ("Schedule1F1B", "ScheduleGPipe"):
        schedule = getattr(pipelining, single)(stages[0], n_mb, loss_fn=loss_fn, scale_grads=False)
    else:
        schedule = getattr(pipelining, multi)(stages, n_mb, loss_fn=loss_fn, scale_grads=False)
    return _Runner(schedule, stages, adapters, loss_fn, any(s.is_last for s in stages))


def _runner_for(chunks, pp_group, name, micro_batches, forward_only, tracked) -> _Runner:
    mb = micro_batches[0]
    key = (name, len(micro_batches), tuple(mb["tokens"].shape), tuple(k for k in MODEL_KEYS if mb.get(k) is not None),
           forward_only, tracked, id(pp_group), len(chunks))
    # Cached on the chunk itself (not in a global table) so a discarded model frees its stages too.
    per_model = chunks[0].__dict__.setdefault("_megacore_pipeline_runners", {})
    if key not in per_model:
        per_model[key] = _build_runner(chunks, pp_group, name, len(micro_batches))
    return per_model[key]


def forward_backward(chunks: Sequence[nn.Module], micro_batches: Sequence[dict], num_tokens_global,
                     pp_group=_AUTO, schedule: str = "1f1b", *, embedding_group=_AUTO, forward_only: bool = False,
                     tracker: Optional[InFlightTracker] = None) -> torch.Tensor:
    """Run every micro-batch forward and backward through this rank's ``chunks`` (see the module doc).

    Args:
        chunks: this rank's model chunks, in chunk order (chunk c = pipeline stage c*pp + pp_rank).
        micro_batches: dicts of ``tokens``, ``labels`` [B, S] and optional ``loss_mask``,
            ``position_ids``, ``attention_mask``; the same list on every pipeline rank.
        num_tokens_global: labelled tokens in the global batch (the loss denominator): a number, or a
            one-element tensor on the device, which is used without being read (no host sync).
        pp_group: the pipeline group (default: ``megacore.parallel.get_state().pp_group``; ``None`` or a
            one-rank group means no pipelining).
        schedule: ``1f1b`` | ``interleaved`` | ``gpipe`` | ``zero_bubble``.
        embedding_group: group of the first and last stage, for tied embeddings (default: from
            ``megacore.parallel.get_state()``).
        forward_only: evaluation: no backward, no gradient changes.
        tracker: an ``InFlightTracker`` to measure how many micro-batches' activations are alive.

    Returns the fp32 scalar ``sum over this rank's micro-batches of masked token-loss sum / num_tokens_global``
    (non-zero only on the last pipeline stage).
    """
    pp_group, embedding_group = _default_groups(pp_group, embedding_group)
    pp_size = dist.get_world_size(pp_group) if (pp_group is not None and dist.is_initialized()) else 1
    if pp_size == 1:
        return forward_backward_no_pipelining(chunks, micro_batches, num_tokens_global, forward_only=forward_only,
                                              tracker=tracker)
    _check_micro_batches(micro_batches, num_tokens_global)
    vp = len(chunks)
    name = resolve_schedule(schedule, vp)
    check_num_microbatches(schedule, len(micro_batches), pp_size, vp)
    tied = tied_embedding_params(chunks)
    if tied and embedding_group is None and not forward_only:
        raise ConfigError("tied embeddings across pipeline stages need the embedding group (first + last stage) to "
                          "sum their gradients; call megacore.parallel.initialize(pipeline=...) first or pass "
                          "embedding_group=")
    runner = _runner_for(chunks, pp_group, name, micro_batches, forward_only, tracker is not None)
    runner.loss_fn.num_tokens = _denominator(num_tokens_global)
    for a in runner.adapters:
        a.tracker = tracker

    cat = lambda key: torch.cat([mb[key] for mb in micro_batches], dim=0)  # noqa: E731 - step() re-splits dim 0
    kwargs = {k: cat(k) for k in MODEL_KEYS if micro_batches[0].get(k) is not None}
    kwargs["labels"] = cat("labels")
    if tracker is not None:
        kwargs["microbatch_index"] = torch.arange(len(micro_batches), device=kwargs["labels"].device)
    target = torch.cat([_loss_mask(mb) for mb in micro_batches], dim=0)
    tokens = cat("tokens")
    if any(getattr(unwrap(c), "mtp", None) is not None for c in chunks):  # the MTP depths embed the tokens
        kwargs["input_ids"] = tokens
    losses: list[torch.Tensor] = []
    first = any(s.is_first for s in runner.stages)
    args = (tokens,) if first else ()
    try:
        if forward_only:
            with torch.no_grad():
                runner.schedule.eval(*args, target=target, losses=losses, **kwargs)
        else:
            with _accumulation_contexts(chunks):
                runner.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
    finally:
        for a in runner.adapters:
            a.tracker = None
    device = tokens.device
    total = torch.zeros((), device=device, dtype=torch.float32)
    if runner.has_last:
        for loss in losses:
            total += loss.detach().float()
    if not forward_only:
        _flush_grads_into_main_grad(chunks)
        allreduce_tied_embedding_grads(chunks, embedding_group)
    return total
