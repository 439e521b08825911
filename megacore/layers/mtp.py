"""Multi-token prediction (DeepSeek-V3 MTP): ``model.mtp_num_layers`` = D extra depths after the decoder.

Depth k (1..D), for position i::

    h'_i^k = M_k · [enorm(Emb(t_{i+k})) ; hnorm(h_i^{k-1})]        (eh_proj: a linear 2H -> H)
    h_i^k  = TransformerLayer_k(h'^k)_i                            (causal, same rotary and mask)
    P_k(i) = softmax(OutputHead(final_norm_k(h_i^k)))              predicts t_{i+1+k}

* ``Emb`` and ``OutputHead`` are the main model's (shared, not copied, on one device).
* ``h^0`` is the main model's decoder output AFTER its final norm, the hidden state its own output
  head reads. That is Megatron-Core's choice (its decoder applies the final layernorm, then hands
  the result to the MTP block); DeepSeek-V3's paper only says "the representation given by the
  main model". Each depth normalizes it again (``hnorm``) before the projection.
* The concatenation puts the embedding first, as Megatron-Core and DeepSeek-V3's released weights
  (``eh_proj``, ``enorm``, ``hnorm``) do; the paper writes the other order, which is the same
  model with ``eh_proj``'s two column blocks swapped.
* Only the word embedding enters (no learned absolute positions): the position reaches depth k
  through ``h^{k-1}`` and the layer's rotary tables.
* The transformer layer is built from the model's ``LayerSpec`` with the GLOBAL layer number
  ``num_layers + k - 1``, so an MoE model gets an MoE layer where ``is_moe_layer`` says so (as
  DeepSeek-V3's MTP layer is); parameters are named ``mtp.layers.<k-1>.…``, unique, so the
  deterministic init (``megacore.models.init``, keyed by names) and checkpoints see them like any
  other. Hybrid stacks (``layer_pattern``) are refused by the support table.

Labels (megacore's convention: ``labels[:, t]`` is the target of position t, i.e. token t+1):
depth k's target at position i is ``labels[:, i + k]`` (``t_{i+1+k}``) and its embedded token is
``input_ids[:, i + k]`` (``t_{i+k}``; equal to ``labels[:, i + k - 1]`` for unmasked data, but the
ids are used so that a masked label never has to be embedded). Positions with ``i + k >= S``, or
whose shifted label is ``IGNORE_INDEX``, have no target; their embedded token is id 0 (causal
attention never lets a position with a target see them).

The objective (``attach``): the main per-token loss is returned UNCHANGED (the reported loss is
the main LM loss) and the MTP loss is attached to it for backward only (``AttachMTPLoss``).
Depth k's per-token cross entropy CE_k(i) is attached at the position of its target, j = i + k,
so it is weighted exactly like the main loss of token j: by ``loss_mask[:, j]`` and the loss
denominator N (the labelled tokens of the global batch, ``megacore.training.contract``). The
gradient is therefore that of

    L = L_main + (mtp_loss_weight / D) · Σ_k Σ_{i: target kept} CE_k(i) · loss_mask[:, i+k] / N,

Megatron-Core's per-token normalization of the MTP loss: each depth's sum over its kept targets
divided by the main loss's token count N (not by depth k's own count N_k = N minus the masked
tail, a relative difference of at most k / S per sequence), which keeps every micro-batch's and
rank's share additive exactly like the main loss, whatever the layout.

Logging: the backward of ``AttachMTPLoss`` receives each position's weight (``loss_mask / N``
times any loss scale) and adds Σ_j weight_j · CE_k(j - k) to ``loss_accumulator[k - 1]``; the
trainer pops it (``pop_losses``) after the step's backward: entry k-1 is then depth k's term
S_k / N, so ``mtp_loss`` = mean over depths = L_MTP / mtp_loss_weight, and
``loss + mtp_loss_weight * mtp_loss`` is the objective that was backpropagated. Forwards without
a backward (evaluation) record nothing, nor does a pipeline schedule's shape-inference pass
(``record_loss`` off: ``megacore.pipeline.stage_module``).

Generation never runs the depths (``GPTModel`` only calls ``attach`` when a loss with gradients
is computed).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megacore.config import TransformerConfig
from megacore.layers.output_head import IGNORE_INDEX
from megacore.layers.spec import LayerSpec
from megacore.layers.transformer import TransformerLayer
from megacore.sharding import mark_init, param_meta

EMBEDDING_NAME = "embedding.word_embeddings.weight"  # the table a pipeline's last stage copies


def shift_left(x_BS: torch.Tensor, k: int, fill) -> torch.Tensor:
    """``out[:, i] = x[:, i + k]``, ``fill`` for the last k positions."""
    if k == 0:
        return x_BS
    tail = torch.full_like(x_BS[:, :k], fill)
    return torch.cat([x_BS[:, k:], tail], dim=1)


def shift_right(x_BS: torch.Tensor, k: int) -> torch.Tensor:
    """``out[:, j] = x[:, j - k]``, 0 for the first k positions."""
    if k == 0:
        return x_BS
    return torch.cat([torch.zeros_like(x_BS[:, :k]), x_BS[:, :-k]], dim=1)


class MTPDepth(nn.Module):
    """One prediction depth: ``enorm``/``hnorm``, ``eh_proj``, one transformer layer, ``final_norm``."""

    def __init__(self, config: TransformerConfig, depth: int, spec: LayerSpec):
        super().__init__()
        hidden = config.hidden_size
        self.depth = depth
        self.enorm = spec.final_norm(config, hidden)
        self.hnorm = spec.final_norm(config, hidden)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        mark_init(self.eh_proj.weight, "normal")
        self.layer = TransformerLayer(config, config.num_layers + depth - 1, spec)
        self.final_norm = spec.final_norm(config, hidden)

    def forward(self, hidden_BSH: torch.Tensor, embedded_BSH: torch.Tensor, rotary=None, mask=None) -> torch.Tensor:
        """(h^k before the final norm, final_norm(h^k)) from h^{k-1} and Emb(t_{i+k})."""
        x = self.eh_proj(torch.cat([self.enorm(embedded_BSH), self.hnorm(hidden_BSH)], dim=-1))
        out = self.layer(x, rotary, mask)
        return out, self.final_norm(out)


class AttachMTPLoss(torch.autograd.Function):
    """forward(token_loss, ce_DBS, weight, accumulator) = token_loss (the same values).

    backward(g): d token_loss = g; d ce_DBS[k] = weight · g (each depth's per-token loss, already
    placed at its target's position, gets the gradient its target's main loss gets, times
    ``weight`` = mtp_loss_weight / D); and ``accumulator[k] += Σ g · ce_DBS[k]`` (the depth's
    term of the objective, for logging)."""

    @staticmethod
    def forward(ctx, token_loss_BS, ce_DBS, weight: float, accumulator):
        ctx.weight = weight
        ctx.accumulator = accumulator
        ctx.save_for_backward(ce_DBS.detach())
        return token_loss_BS.view_as(token_loss_BS)

    @staticmethod
    def backward(ctx, grad_BS):
        (ce_DBS,) = ctx.saved_tensors
        g = grad_BS.unsqueeze(0).to(ce_DBS.dtype)
        if ctx.accumulator is not None:
            acc = ctx.accumulator
            acc.add_((g * ce_DBS).sum(dim=(1, 2)).to(acc.dtype))
        return grad_BS, (ctx.weight * g).expand_as(ce_DBS), None, None


class MultiTokenPrediction(nn.Module):
    """The D depths (``layers``, named ``mtp.layers.<k-1>``) and, on a pipeline's last stage without
    the input embedding, ``embedding``: this stage's copy of the word-embedding table (global name
    ``embedding.word_embeddings.weight``, its gradient summed with the first stage's by
    ``megacore.pipeline.tied``; with tied embeddings it is also the output weight)."""

    def __init__(self, config: TransformerConfig, spec: Optional[LayerSpec] = None, own_embedding: bool = False):
        super().__init__()
        spec = spec or LayerSpec()
        self.num_depths = config.mtp_num_layers
        self.loss_weight = config.mtp_loss_weight
        self.layers = nn.ModuleList([MTPDepth(config, k, spec) for k in range(1, self.num_depths + 1)])
        self.embedding = None
        if own_embedding:
            self.embedding = nn.Embedding(config.padded_vocab_size, config.hidden_size)
            mark_init(self.embedding.weight, "normal")
            param_meta(self.embedding.weight).global_name = EMBEDDING_NAME
        # Σ over the backwards since the last pop of each depth's objective term (see the module doc).
        self.register_buffer("loss_accumulator", torch.zeros(self.num_depths), persistent=False)
        self.record_loss = True  # False while a forward's loss must not be logged (a schedule's dry run)

    def depth_losses(self, model, hidden_BSH: torch.Tensor, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor,
                     word_embeddings: nn.Module, rotary=None, mask=None) -> torch.Tensor:
        """Per-token cross entropy of every depth [D, B, S], each placed at its TARGET's position
        (entry [k-1, :, j] is CE_k of position j - k, predicting ``labels[:, j]``; 0 where none)."""
        if input_ids_BS is None:
            raise ValueError("multi-token prediction embeds the input tokens shifted by each depth: pass input_ids "
                             "(a pipeline's last stage receives them from the schedule)")
        hidden = hidden_BSH
        out = []
        for k, depth in enumerate(self.layers, start=1):
            ids_k = shift_left(input_ids_BS, k, 0)
            labels_k = shift_left(labels_BS, k, IGNORE_INDEX)
            hidden, normed = depth(hidden, word_embeddings(ids_k), rotary, mask)
            ce_k = model.compute_token_loss(normed, labels_k)
            out.append(shift_right(ce_k, k))
        return torch.stack(out)

    def attach(self, model, token_loss_BS: torch.Tensor, hidden_BSH, input_ids_BS, labels_BS, word_embeddings,
               rotary=None, mask=None) -> torch.Tensor:
        """``token_loss_BS`` (the main per-token loss, returned unchanged) carrying the MTP loss's
        gradient (``AttachMTPLoss``)."""
        ce = self.depth_losses(model, hidden_BSH, input_ids_BS, labels_BS, word_embeddings, rotary, mask)
        acc = self.loss_accumulator if self.training and self.record_loss else None
        return AttachMTPLoss.apply(token_loss_BS, ce, self.loss_weight / self.num_depths, acc)

    def pop_losses(self) -> torch.Tensor:
        """Each depth's objective term accumulated since the last call ([D], a device tensor, not
        read), and start over."""
        out = self.loss_accumulator.clone()
        self.loss_accumulator.zero_()
        return out

    def reset_buffers(self) -> None:
        with torch.no_grad():
            self.loss_accumulator.zero_()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # model.to(bf16) casts buffers: the accumulator stays fp32
        self._buffers["loss_accumulator"] = self._buffers["loss_accumulator"].float()
        return self


def pop_mtp_losses(model: nn.Module) -> Optional[torch.Tensor]:
    """The [D] MTP terms of ``model``'s (or a wrapper's) MTP block, popped; None if it has none."""
    for module in model.modules():
        if isinstance(module, MultiTokenPrediction):
            return module.pop_losses()
    return None
