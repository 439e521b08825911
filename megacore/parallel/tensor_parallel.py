"""Tensor-parallel layers: column-, row- and vocab-parallel, holding LOCAL weight shards.

Every sharded parameter describes itself (``megacore.sharding.ParamMeta``: the full shape, the
:class:`TPLayout` of which global rows of one dim each TP rank holds, this rank, the init kind), so
init, checkpointing and HF export can rebuild the full tensor without knowing the module;
``full_tensor`` / ``gather_full_state_dict`` reassemble with it.

Shapes: activations [B, S, H]; under sequence parallelism (SP) the residual stream is split over
the batch's tokens, [B, S/t, H] per rank (``megacore.parallel.collectives``: rank r holds token
chunk r of the flattened B·S tokens), and the layers gather/scatter at their edges.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megacore.parallel import collectives as C
from megacore.parallel.rng import TP_STREAM, fork
from megacore.parallel.topology import get_state
from megacore.sharding import TPLayout, param_meta, peek_meta


def describe_shard(param: nn.Parameter, layout: TPLayout, rank: int, global_shape: Sequence[int],
                   init: Optional[str] = None) -> nn.Parameter:
    """Describe ``param`` as rank ``rank``'s shard under ``layout`` of a ``global_shape`` tensor
    (its ``megacore.sharding.ParamMeta``)."""
    param_meta(param).global_shape = tuple(int(s) for s in global_shape)
    param_meta(param).tp_layout = layout
    param_meta(param).tp_rank = rank
    if init is not None:
        param_meta(param).init = init
    return param


def _new_param(shape, device, dtype, requires_grad=True) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=requires_grad)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's output rows split across TP: weight [out_local, in].

    Input: [B, S, in] replicated (``copy_to_tp``: backward all-reduces dx), or [B, S/t, in] under
    SP (``gather_from_sp``: all-gather of the tokens, backward reduce-scatter). Output: [B, S, out_local],
    or [B, S, out] with ``gather_output`` (contiguous layouts only). ``layout`` (dim 0) defaults to
    an even contiguous split.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, tp_group=None,
                 layout: Optional[TPLayout] = None, sequence_parallel: bool = False, gather_output: bool = False,
                 device=None, dtype=None, init_weight: str = "normal", init_bias: str = "zeros"):
        super().__init__()
        self.tp_group = tp_group
        t, r = C.group_size(tp_group), C.group_rank(tp_group)
        self.layout = layout or TPLayout.contiguous(0, out_features, t)
        if self.layout.global_size != out_features or self.layout.tp_size != t or self.layout.dim != 0:
            raise ValueError(f"layout (dim {self.layout.dim}, size {self.layout.global_size}, {self.layout.tp_size} "
                             f"ranks) does not fit out_features={out_features} over tensor={t}")
        if gather_output and len(self.layout.per_rank[0]) != 1:
            raise ValueError("gather_output needs a contiguous layout (one segment per rank)")
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel, self.gather_output = sequence_parallel, gather_output
        # Strategies the composition root hands in: the local GEMM ``matmul(x, weight, bias)`` (an FP8
        # recipe's, megacore.precision.fp8.apply_fp8), and under SP a collective fused with the GEMM
        # ``fused_comm_matmul(x, weight, group)`` (copy-engine overlap, megacore.parallel.sp_overlap.apply).
        self.matmul: Callable = F.linear
        self.fused_comm_matmul: Optional[Callable] = None
        local = self.layout.local_size
        self.weight = describe_shard(_new_param((local, in_features), device, dtype), self.layout, r,
                                     (out_features, in_features), init_weight)
        self.bias = None
        if bias:
            bias_layout = TPLayout(0, out_features, self.layout.per_rank)
            self.bias = describe_shard(_new_param((local,), device, dtype), bias_layout, r, (out_features,), init_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_comm_matmul is not None:  # all-gather of the tokens and the GEMM in one op
            y = self.fused_comm_matmul(x, self.weight, self.tp_group)
            return y if self.bias is None else y + self.bias
        x = C.gather_from_sp(x, self.tp_group) if self.sequence_parallel else C.copy_to_tp(x, self.tp_group)
        y = self.matmul(x, self.weight, self.bias)
        return C.gather_from_tp_last_dim(y, self.tp_group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (local {self.layout.local_size}), "
                f"bias={self.bias is not None}, sp={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """y = Σ_r x_r W_rᵀ + b with W's input columns split across TP: weight [out, in_local].

    Input: [B, S, in_local] (already split, ``input_is_parallel``) or [B, S, in] (scattered here).
    Output: [B, S, out] after an all-reduce, or [B, S/t, out] after a reduce-scatter of the tokens under
    SP. The bias is replicated and added after the reduction; under SP each rank sees only its
    sequence shard, so the bias enters through ``copy_to_tp`` and its gradient is summed over TP
    by autograd itself.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, tp_group=None,
                 layout: Optional[TPLayout] = None, sequence_parallel: bool = False, input_is_parallel: bool = True,
                 device=None, dtype=None, init_weight: str = "scaled_normal", init_bias: str = "zeros"):
        super().__init__()
        self.tp_group = tp_group
        t, r = C.group_size(tp_group), C.group_rank(tp_group)
        self.layout = layout or TPLayout.contiguous(1, in_features, t)
        if self.layout.global_size != in_features or self.layout.tp_size != t or self.layout.dim != 1:
            raise ValueError(f"layout (dim {self.layout.dim}, size {self.layout.global_size}, {self.layout.tp_size} "
                             f"ranks) does not fit in_features={in_features} over tensor={t}")
        if not input_is_parallel and len(self.layout.per_rank[0]) != 1:
            raise ValueError("input_is_parallel=False needs a contiguous layout (one segment per rank)")
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel, self.input_is_parallel = sequence_parallel, input_is_parallel
        # Strategies the composition root hands in: the local GEMM ``matmul(x, weight, bias)`` (an FP8
        # recipe's, megacore.precision.fp8.apply_fp8), and under SP a collective fused with the GEMM
        # ``fused_comm_matmul(x, weight, group)`` (copy-engine overlap, megacore.parallel.sp_overlap.apply).
        self.matmul: Callable = F.linear
        self.fused_comm_matmul: Optional[Callable] = None
        self.weight = describe_shard(_new_param((out_features, self.layout.local_size), device, dtype), self.layout,
                                     r, (out_features, in_features), init_weight)
        self.bias = None
        if bias:
            self.bias = _new_param((out_features,), device, dtype)
            param_meta(self.bias).init = init_bias
            param_meta(self.bias).sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = C.scatter_to_tp_last_dim(x, self.tp_group)
        if self.fused_comm_matmul is not None:  # the GEMM and the reduce-scatter of the tokens in one op
            y = self.fused_comm_matmul(x, self.weight, self.tp_group)
        else:
            y = self.matmul(x, self.weight)
            y = C.reduce_scatter_to_sp(y, self.tp_group) if self.sequence_parallel else C.reduce_from_tp(y, self.tp_group)
        if self.bias is None:
            return y
        return y + (C.copy_to_tp(self.bias, self.tp_group) if self.sequence_parallel else self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.layout.local_size}), out={self.out_features}, "
                f"bias={self.bias is not None}, sp={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the padded vocabulary) are split evenly across TP: weight [V/t, H].

    ids [B, S] (replicated) -> [B, S, H] (all-reduce) or [B, S/t, H] (reduce-scatter under SP).
    Each rank looks up the ids in its range ``[vocab_start, vocab_end)`` and contributes zeros for
    the others, so the reduction yields every id's row exactly once.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group=None, sequence_parallel: bool = False,
                 device=None, dtype=None, init: str = "normal"):
        super().__init__()
        self.tp_group = tp_group
        t, r = C.group_size(tp_group), C.group_rank(tp_group)
        if num_embeddings % t != 0:
            raise ValueError(f"padded vocabulary {num_embeddings} is not divisible by tensor={t}; "
                             "make model.vocab_padding_multiple a multiple of the tensor-parallel size")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sequence_parallel = sequence_parallel
        self.layout = TPLayout.contiguous(0, num_embeddings, t)
        self.vocab_start = r * (num_embeddings // t)
        self.vocab_end = self.vocab_start + num_embeddings // t
        self.weight = describe_shard(_new_param((num_embeddings // t, embedding_dim), device, dtype), self.layout, r,
                                     (num_embeddings, embedding_dim), init)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if C.group_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = torch.where(outside, torch.zeros_like(ids), ids - self.vocab_start)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return C.reduce_scatter_to_sp(out, self.tp_group)
        return C.reduce_from_tp(out, self.tp_group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} (rows {self.vocab_start}..{self.vocab_end}), {self.embedding_dim}"


class SequenceParallelPositionEmbedding(nn.Module):
    """Learned absolute positions under SP: the full table (replicated), output scattered like the
    word embeddings (token chunk r of the batch).

    position ids [B, S] -> [B, S/t, H]; the backward all-gathers the tokens, so every rank's table
    gradient is already complete (no TP sum needed).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group=None, device=None, dtype=None,
                 init: str = "normal"):
        super().__init__()
        self.tp_group = tp_group
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = _new_param((num_embeddings, embedding_dim), device, dtype)
        param_meta(self.weight).init = init

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return C.scatter_to_sp(F.embedding(position_ids, self.weight), self.tp_group)


class TPForkedDropout(nn.Dropout):
    """Dropout drawing from the RNG tracker's tensor-parallel stream (masks differ across TP ranks):
    for activations that are split across TP, e.g. sequence-parallel shards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        with fork(TP_STREAM):
            return super().forward(x)


# ------------------------------------------------------------------------------------ full tensors
def full_tensor(param: torch.Tensor, tensor: Optional[torch.Tensor] = None, group=None) -> torch.Tensor:
    """The full (unsharded) value of ``tensor`` (default: ``param`` itself, detached), a TP shard laid
    out like ``param``. Collective over the TP group (default ``get_state().tp_group``): every TP rank
    must call it for the same parameters in the same order. Replicated params are returned as is."""
    value = (param if tensor is None else tensor).detach()
    layout: Optional[TPLayout] = peek_meta(param).tp_layout
    if layout is None or layout.tp_size == 1:
        return value
    if group is None:
        group = get_state().tp_group
    if C.group_size(group) != layout.tp_size:
        raise ValueError(f"parameter is sharded over {layout.tp_size} ranks but the group has {C.group_size(group)}")
    gathered = C.all_gather(value.contiguous(), layout.dim, group)
    return layout.assemble(gathered.chunk(layout.tp_size, dim=layout.dim))


def gather_full_state_dict(model: nn.Module, grads: bool = False, group=None) -> dict[str, torch.Tensor]:
    """``{name: full tensor}`` for every parameter of ``model`` (``grads=True``: of its gradients,
    ``main_grad`` if present, else ``.grad``; None stays None). Collective over the TP group."""
    out: dict[str, Optional[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        value = p
        if grads:
            value = getattr(p, "main_grad", None)
            buffer = getattr(p, "_megacore_grad_buffer", None)
            if value is not None and buffer is not None:
                buffer.settle([p])  # zeros, not an earlier step's values, if none arrived
                value = p.main_grad
            value = p.grad if value is None else value
            if value is None:
                out[name] = None
                continue
        out[name] = full_tensor(p, value, group)
    return out
