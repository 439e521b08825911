"""The loss head under tensor parallelism: the output layer split over the vocabulary, and the cross
entropy over that split without gathering the logits.

Rank r holds the logit columns ``[vocab_start, vocab_start + V_local)`` of the padded vocabulary;
columns ``>= vocab_valid`` are padding and get no probability mass. Per token, with z the logits
over the C = ``vocab_valid`` real classes, target y and smoothing ε::

    m      = max_c z_c                       (all-reduce MAX)
    Z      = Σ_c exp(z_c - m)                (all-reduce SUM)
    z_y    = the target logit                (all-reduce SUM; only the owning rank contributes)
    S      = Σ_c (z_c - m)                   (all-reduce SUM; only when ε > 0)
    nll    = log Z - (z_y - m)
    smooth = log Z - S / C                   (= -mean_c log p_c)
    loss   = (1 - ε) · nll + ε · smooth      (0 where y == ignore_index)

The three sums travel in one all-reduce. Backward, per local column c:
``dloss/dz_c = p_c - (1 - ε)·[c == y] - ε / C`` (0 for padding columns and ignored tokens), with
p recomputed from the saved logits, m and log Z instead of stored (saves a [B, S, V_local] fp32
buffer). Labels must lie in ``[0, vocab_valid)`` or equal ``ignore_index``; they are not checked
here because a check would synchronize the device.

Math runs in fp32 (fp64 for fp64 logits) whatever the logits dtype; the loss comes back in that
type. Fed already-gathered full logits with a TP group, the function would count every column t
times (adding log t to the loss): pass the local shard.

``VocabParallelOutputHead`` is what the TP plan puts in place of the one-device ``OutputHead``:
the hidden states enter the TP region (``copy_to_tp``, or ``gather_from_sp`` of the final-norm
output under SP), multiply this rank's vocab rows (the embedding shard when tied), and the loss is
the vocab-parallel cross entropy above, or, where the Triton kernels run, the fused
``fused_linear_cross_entropy`` with ``tp_group`` (never materializing the logit shard).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from megacore.layers.output_head import IGNORE_INDEX, OutputHead, upcast as _upcast
from megacore.parallel import collectives as C
from megacore.parallel.collectives import all_reduce, group_size


def _column_masks(v_local: int, vocab_start: int, vocab_valid: int, device):
    cols = torch.arange(vocab_start, vocab_start + v_local, device=device)
    return cols < vocab_valid  # [V_local] real (non-padding) columns


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, vocab_start, vocab_valid, ignore_index, smoothing):
        v_local = logits.shape[-1]
        x = _upcast(logits)
        valid_col = _column_masks(v_local, vocab_start, vocab_valid, logits.device)
        # Decided from the sizes, not from valid_col: reading a device tensor would sync the GPU
        # and break torch.compile graphs.
        has_padding = vocab_start + v_local > vocab_valid
        if has_padding:
            x = x.masked_fill(~valid_col, float("-inf"))
        local_max = x.max(dim=-1).values
        m = all_reduce(local_max, group, op="max")
        shifted = x - m.unsqueeze(-1)
        local_label = labels - vocab_start
        owns = (local_label >= 0) & (local_label < v_local) & (labels != ignore_index)
        idx = torch.where(owns, local_label, torch.zeros_like(local_label)).unsqueeze(-1)
        target = torch.where(owns, shifted.gather(-1, idx).squeeze(-1), torch.zeros_like(m))
        sums = [shifted.exp().sum(dim=-1), target]
        if smoothing > 0:
            sums.append(torch.where(valid_col, shifted, torch.zeros_like(shifted)).sum(dim=-1))
        summed = all_reduce(torch.stack(sums, dim=-1), group)
        log_z = summed[..., 0].log()
        loss = log_z - summed[..., 1]
        if smoothing > 0:
            loss = (1.0 - smoothing) * loss + smoothing * (log_z - summed[..., 2] / vocab_valid)
        keep = labels != ignore_index
        loss = torch.where(keep, loss, torch.zeros_like(loss))
        ctx.save_for_backward(logits, m, log_z, idx, owns, keep)
        ctx.vocab = (vocab_start, vocab_valid)
        ctx.smoothing = smoothing
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, m, log_z, idx, owns, keep = ctx.saved_tensors
        vocab_start, vocab_valid = ctx.vocab
        valid_col = _column_masks(logits.shape[-1], vocab_start, vocab_valid, logits.device)
        probs = (_upcast(logits) - (m + log_z).unsqueeze(-1)).exp()
        probs = torch.where(valid_col, probs, torch.zeros_like(probs))
        eps = ctx.smoothing
        if eps > 0:
            probs = probs - valid_col.to(probs.dtype) * (eps / vocab_valid)
        onehot = torch.zeros_like(probs).scatter_(-1, idx, owns.unsqueeze(-1).to(probs.dtype))
        grad = (probs - (1.0 - eps) * onehot) * (grad_loss * keep).unsqueeze(-1)
        return grad.to(logits.dtype), None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits_local_BSV: torch.Tensor, labels_BS: torch.Tensor,
                                 tp_group: Optional[dist.ProcessGroup], vocab_start: int, vocab_valid: int,
                                 ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token loss [B, S] (fp32, or fp64 for fp64 logits; 0 where ignored) from this rank's logit
    shard [B, S, V_local].

    ``vocab_start``: global index of the shard's first column; ``vocab_valid``: the real vocabulary
    size (columns at or past it are padding). ``tp_group=None`` (or one rank): the shard is the
    whole padded vocabulary and this is plain cross entropy.
    """
    if logits_local_BSV.shape[:-1] != labels_BS.shape:
        raise ValueError(f"logits {tuple(logits_local_BSV.shape)} and labels {tuple(labels_BS.shape)} disagree; "
                         "logits must be labels.shape + [vocab shard]")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    if vocab_valid <= 0:
        raise ValueError(f"vocab_valid={vocab_valid} must be positive (the real vocabulary size)")
    if group_size(tp_group) == 1 and vocab_start != 0:
        raise ValueError(f"vocab_start={vocab_start} with no tensor-parallel group: a single rank holds the "
                         "whole vocabulary, so vocab_start must be 0")
    return _VocabParallelCE.apply(logits_local_BSV, labels_BS, tp_group, int(vocab_start), int(vocab_valid),
                                  ignore_index, float(label_smoothing))


class VocabParallelOutputHead(OutputHead):
    """The loss head over this rank's vocabulary rows ``[vocab_start, vocab_start + V_pad/t)`` of the
    TP group (see the module docstring). hidden [B, S, H] (replicated) or [B, S/t, H] (SP)."""

    whole_vocab = False

    def __init__(self, vocab_size: int, padded_vocab_size: int, group, rank: int, size: int,
                 sequence_parallel: bool):
        super().__init__(vocab_size)
        self.group, self.rank, self.size, self.sequence_parallel = group, rank, size, sequence_parallel
        self.vocab_start = rank * (padded_vocab_size // size)

    def _enter(self, hidden_BSH: torch.Tensor) -> torch.Tensor:
        """Into the TP region: every rank needs every token (backward: the hidden gradient, a partial
        sum over the vocab shards, is summed over TP: reduce-scatter under SP, all-reduce otherwise)."""
        if self.sequence_parallel:
            return C.gather_from_sp(hidden_BSH, self.group)
        return C.copy_to_tp(hidden_BSH, self.group)

    def logits(self, hidden_BSH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
        """This rank's logit columns [B, S, V_pad/t]."""
        return F.linear(self._enter(hidden_BSH), weight_VH)

    def full_logits(self, hidden_BSH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
        """Full logits [B, S, vocab_size] on every TP rank (vocab shards gathered, padding dropped)."""
        return C.gather_from_tp_last_dim(self.logits(hidden_BSH, weight_VH), self.group)[..., : self.vocab_size]

    def token_loss(self, hidden_BSH: torch.Tensor, weight_VH: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(self.logits(hidden_BSH, weight_VH), labels_BS, self.group,
                                            self.vocab_start, self.vocab_size)

    def fused_loss(self, hidden_BSH, weight_VH, labels_BS, token_weights_BS, reduction: str) -> torch.Tensor:
        # No label range check: it would synchronize the device every step.
        return fused_linear_cross_entropy(self._enter(hidden_BSH), weight_VH, labels_BS, ignore_index=IGNORE_INDEX,
                                          vocab_valid=self.vocab_size, tp_group=self.group,
                                          vocab_start=self.vocab_start, reduction=reduction,
                                          token_weights=token_weights_BS, check_labels=False)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, rows from {self.vocab_start}, tensor={self.size}, sp={self.sequence_parallel}"
