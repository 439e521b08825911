"""The loss head: logits and cross entropy from the final hidden states and the output weight.

Labels follow the Megatron convention: ``labels[:, t]`` is the target for position t (already
shifted); ``IGNORE_INDEX`` (-100) marks positions without a target. The padded vocabulary's extra
columns (``config.padded_vocab_size`` > ``vocab_size``) never receive probability mass.

``OutputHead`` is the one-device head. It holds no parameters (the weight, the output layer's or
the tied embedding table, is passed in), so a parallel plan can swap it for another head without
touching the checkpoint: ``megacore.parallel.vocab_parallel.VocabParallelOutputHead`` under tensor
parallelism. Where the kernel backend says so (CUDA by default, ``megacore.kernels._dispatch``) the
loss runs fused (``fused_linear_cross_entropy``, chunked so the [B, S, V] logits never exist).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megacore.kernels._dispatch import use_triton
from megacore.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

IGNORE_INDEX = -100


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half types and fp32; fp64 stays fp64 (the precision losses are computed in)."""
    return x if x.dtype == torch.float64 else x.float()


def cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, vocab_valid: Optional[int] = None,
                  ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token loss [B, S] (fp32, fp64 for fp64 logits; 0 where ignored) over the first
    ``vocab_valid`` columns (default: all)."""
    v = logits_BSV.shape[-1] if vocab_valid is None else vocab_valid
    loss = F.cross_entropy(upcast(logits_BSV[..., :v]).reshape(-1, v), labels_BS.reshape(-1),
                           ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    return loss.view(labels_BS.shape)


def reduce_token_loss(token_loss_BS: torch.Tensor, labels_BS: torch.Tensor, loss_mask_BS=None,
                      reduction: str = "mean") -> torch.Tensor:
    """Weights each token by (label kept) × ``loss_mask``; ``mean`` divides by the weights' sum."""
    weights = (labels_BS != IGNORE_INDEX).to(token_loss_BS.dtype)
    if loss_mask_BS is not None:
        weights = weights * loss_mask_BS.to(token_loss_BS.dtype)
    token_loss_BS = token_loss_BS * weights
    if reduction == "none":
        return token_loss_BS
    if reduction == "sum":
        return token_loss_BS.sum()
    if reduction == "mean":
        return token_loss_BS.sum() / weights.sum().clamp(min=1.0)
    raise ValueError(f"reduction={reduction!r} is not known; use 'mean', 'sum' or 'none'")


class OutputHead(nn.Module):
    """One device: logits = hidden · Wᵀ over the padded vocabulary, cross entropy over the first
    ``vocab_size`` columns, or both fused."""

    whole_vocab = True  # every logit column lives on this device

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def logits(self, hidden_BSH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
        """Logits over the padded vocabulary [B, S, V_pad]."""
        return F.linear(hidden_BSH, weight_VH)

    def full_logits(self, hidden_BSH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, vocab_size], padding columns dropped."""
        return self.logits(hidden_BSH, weight_VH)[..., : self.vocab_size]

    def token_loss(self, hidden_BSH: torch.Tensor, weight_VH: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [B, S] (0 where ignored) through the materialized logits."""
        return cross_entropy(self.logits(hidden_BSH, weight_VH), labels_BS, self.vocab_size)

    def fuses(self, hidden_BSH: torch.Tensor, weight_VH: torch.Tensor) -> bool:
        """Whether ``fused_loss`` runs: the kernel backend picks Triton for this tensor and no autocast
        is active (the fused head multiplies hidden and weight in their own, equal, dtype)."""
        return (hidden_BSH.dtype == weight_VH.dtype and not torch.is_autocast_enabled(hidden_BSH.device.type)
                and use_triton(hidden_BSH, kernel="fused_linear_cross_entropy"))

    def fused_loss(self, hidden_BSH, weight_VH, labels_BS, token_weights_BS, reduction: str) -> torch.Tensor:
        """The output GEMM and the cross entropy in one chunked kernel; the reduction is computed
        directly (its gradients come out of the forward)."""
        # No label range check: it would synchronize the device every step.
        return fused_linear_cross_entropy(hidden_BSH, weight_VH, labels_BS, ignore_index=IGNORE_INDEX,
                                          vocab_valid=self.vocab_size, reduction=reduction,
                                          token_weights=token_weights_BS, check_labels=False)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}"
