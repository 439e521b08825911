"""Cross entropy over a vocabulary split across tensor-parallel ranks, without gathering the logits.

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
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore.parallel.collectives import all_reduce, group_size

IGNORE_INDEX = -100


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half types and fp32; fp64 stays fp64."""
    return x if x.dtype == torch.float64 else x.float()


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


def cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, vocab_valid: Optional[int] = None,
                  ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0) -> torch.Tensor:
    """Single-device per-token loss [B, S] (fp32; 0 where ignored) over the first ``vocab_valid``
    columns (default: all); the same semantics as ``vocab_parallel_cross_entropy``."""
    v = logits_BSV.shape[-1] if vocab_valid is None else vocab_valid
    loss = F.cross_entropy(_upcast(logits_BSV[..., :v]).reshape(-1, v), labels_BS.reshape(-1),
                           ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    return loss.view(labels_BS.shape)
