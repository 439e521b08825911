"""The module torch's ``PipelineStage`` runs: one GPTModel chunk with a tensor-in / tensor-out forward.

torch.distributed.pipelining sends a stage's positional outputs to the next stage as its positional
inputs and passes the step's keyword arguments to every stage. So:

* first chunk of the pipeline:  ``forward(input_ids_BS, **kw) -> hidden_BSH``
* middle chunks:                ``forward(hidden_BSH, **kw) -> hidden_BSH``
* last chunk:                   ``forward(hidden_BSH, labels=labels_BS, **kw) -> token_loss_BS``

where ``hidden_BSH`` is ``[B, S, H]`` (``[B, S/tp, H]`` under sequence parallelism) and
``token_loss_BS`` is the per-token loss, 0 where ``labels == -100``. The schedule's ``loss_fn`` then
applies the loss mask and the global token count (see ``megacore.pipeline.schedules``). ``kw`` is
``position_ids`` / ``attention_mask`` (needed by every chunk: rotary and masks live in each layer),
for LLaVA ``pixel_values`` (used by the first chunk, a LlavaModel around the first GPT stage), for a
last chunk with multi-token prediction ``input_ids`` (the tokens, which its depths embed shifted), and,
while an ``InFlightTracker`` is attached, ``microbatch_index`` (a [1] tensor naming the micro-batch).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from megacore.pipeline.inflight import InFlightTracker
from megacore.pipeline.tied import unwrap


class PipelineChunk(nn.Module):
    """Adapter around ``chunk`` (a GPTModel chunk, possibly wrapped by DDP). Holds no parameters of its own."""

    def __init__(self, chunk: nn.Module, chunk_index: int):
        super().__init__()
        self.chunk = chunk
        object.__setattr__(self, "model", unwrap(chunk))  # same parameters; not registered twice
        self.chunk_index = chunk_index
        self.tracker: Optional[InFlightTracker] = None
        # torch's PipelineStage infers output shapes with one forward on placeholder (uninitialized)
        # inputs before the first real one; MoE layers must not log that pass's balance loss.
        self._placeholder_pass_done = False

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                microbatch_index: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = self.model
        # input_ids on a later stage: the tokens, for a last stage's multi-token prediction depths.
        input_ids, hidden = (x, None) if m.pre_process else (input_ids, x)
        kwargs = dict(position_ids=position_ids, attention_mask=attention_mask)
        if hasattr(m, "vision_tower"):  # LLaVA's first stage: the images enter here
            kwargs["pixel_values"] = pixel_values
        else:
            kwargs["hidden_states"] = hidden
        if m.post_process:
            if labels is None:
                raise ValueError("the last pipeline stage needs labels: every micro-batch dict must hold 'labels'")
            kwargs.update(labels=labels, reduction="none")
        if self.tracker is not None and microbatch_index is not None and torch.is_grad_enabled():
            ctx = self.tracker.forward((self.chunk_index, int(microbatch_index.reshape(-1)[0])))
        else:
            ctx = contextlib.nullcontext()
        if not self._placeholder_pass_done:
            self._placeholder_pass_done = True
            ctx = _moe_aux_paused(m)
        with ctx:
            return self.chunk(input_ids, **kwargs)


@contextlib.contextmanager
def _moe_aux_paused(model: nn.Module):
    """The placeholder pass logs nothing: no MoE balance loss, no multi-token-prediction loss (whose
    backward that pass runs too)."""
    from megacore.layers.moe import MoELayer
    from megacore.layers.mtp import MultiTokenPrediction

    layers = [mod for mod in model.modules() if isinstance(mod, MoELayer)]
    blocks = [mod for mod in model.modules() if isinstance(mod, MultiTokenPrediction)]
    for layer in layers:
        layer.record_aux = False
    for block in blocks:
        block.record_loss = False
    try:
        yield
    finally:
        for layer in layers:
            layer.record_aux = True
        for block in blocks:
            block.record_loss = True
