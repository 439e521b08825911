"""MoE layers under tensor, sequence and context parallelism (the expert split itself is
``megacore.parallel.expert_parallel``).

An MoE layer is token-wise, so what a layout changes is which tokens a rank holds and who else
computes the same thing. Let ``g`` be the number of ranks whose tokens together make up one
micro-batch of the one-device model (``t`` sequence-parallel ranks times ``c`` context-parallel
ranks; 1 without SP and CP):

* **Routing sees the whole micro-batch.** The balance loss ``aux = E·Σ_e f_e·P_e`` is not a sum over
  tokens (``f`` and ``P`` are both means over them), so g shards' losses do not add up to the
  one-device loss. The layer's ``token_shard`` (:class:`TokenShards`) therefore all-gathers the g
  shards in one-device token order before the router (``[B, S/g, H] -> [B, S, H]``: a [T, E]
  product per rank, cheap next to the experts) and keeps this rank's rows of the decision for its
  experts. Every one of the g ranks routes identically; each attaches ``aux / g``.
  Backward of the gather: reduce-scatter. Rank r's gradient of the gathered tokens is
  ``G_r = R_r + A/g`` (``R_r``: through the routing weights of its own tokens, zero at the other
  ranks' rows; ``A``: through the balance loss, the same on every rank), so
  ``chunk_r(Σ_q G_q) = chunk_r(R_r) + chunk_r(A)``: the one-device gradient of rank r's tokens.
* **Replicated parameters whose gradient is partial.** The router weight sees the same split:
  ``Σ_q ∂(R_q + aux/g)/∂W`` is the one-device gradient, so it must be summed over the g ranks. Over
  CP, the data-parallel reduction (``dp_cp``) already sums it; over SP it is declared like a
  sequence-parallel norm (``ParamMeta.sequence_parallel``, TP sum "all"). So are the routed experts
  when they are replicated over TP (expert parallelism 1: each rank runs its tokens through them)
  and the shared-expert gate (it runs on the local tokens). With expert parallelism the experts'
  gradients are summed over the expert-data-parallel group instead, which spans TP and CP.
* **Without SP** every TP rank holds every token of the micro-batch: the whole MoE layer runs
  replicated (the router, experts and gate are plain replicated parameters, counted once in the
  grad norm). Expert parallelism then needs SP: the TP ranks would send the same tokens to the same
  experts, and the experts' gradient would count them once per TP rank (the support table refuses it).
* The shared expert is a dense MLP and takes the dense plan (column-parallel fc1, row-parallel fc2).
* **Logging.** Ranks that route the same micro-batch report the same balance loss; the trainer sums
  the reports over all ranks, so each reports ``aux_log_share = 1 / (TP size x CP size)`` of it.
"""

from __future__ import annotations

import torch
from torch import nn

from megacore.layers.moe import MoELayer
from megacore.parallel import collectives as C
from megacore.parallel.context_parallel import cp_token_index


class TokenShards:
    """This rank's tokens of a micro-batch, and the way to the whole micro-batch (see the module doc).

    Activations are ``[B, S_local, H]``. Under context parallelism (``cp_group``, c ranks) rank ``k``
    holds positions ``cp_token_index(S, c, k)`` of every sequence; under sequence parallelism on top
    (``sp_group``, t ranks) TP rank ``r`` holds the r-th contiguous 1/t of those ``B·S/c`` tokens,
    flattened batch-major (``megacore.parallel.collectives``)."""

    def __init__(self):
        self.sp_group, self.cp_group = None, None
        self.sp_size, self.cp_size, self.cp_rank = 1, 1, 0
        # "route": this rank's experts run its own SP shard (routing gathers the shards);
        # "experts": the experts are split over TP (expert tensor parallelism) and run the TP group's
        # tokens, gathered before them and scattered back after (backward: replicated gradients).
        self.sp_mode = "route"
        self._orders: dict = {}

    @property
    def size(self) -> int:
        """g: the ranks whose routing inputs make up one micro-batch, each holding different tokens."""
        return (self.sp_size if self.sp_mode == "route" else 1) * self.cp_size

    def experts_in(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tokens this rank's experts run: its own, or (``sp_mode="experts"``) the TP group's,
        all-gathered (backward: this rank's chunk of the gradient, which every TP rank holds whole)."""
        if self.sp_mode == "experts" and self.sp_size > 1:
            return C.gather_from_sp(hidden, self.sp_group, grad_is_partial=False)
        return hidden

    def experts_out(self, out: torch.Tensor) -> torch.Tensor:
        """Back to this rank's tokens (backward: all-gather), the inverse of ``experts_in``."""
        if self.sp_mode == "experts" and self.sp_size > 1:
            return C.scatter_to_sp(out, self.sp_group)
        return out

    def _order(self, seq: int, device) -> torch.Tensor:
        """Gathered column j (CP rank k's chunks, rank after rank) holds global position ``pos[j]``;
        ``order = argsort(pos)`` puts them back in position order."""
        key = (seq, str(device))
        if key not in self._orders:
            pos = torch.cat([torch.from_numpy(cp_token_index(seq, self.cp_size, k)) for k in range(self.cp_size)])
            self._orders[key] = (torch.argsort(pos).to(device),
                                 torch.from_numpy(cp_token_index(seq, self.cp_size, self.cp_rank)).to(device))
        return self._orders[key]

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, S/g, H] -> [B, S, H] in one-device order; backward: the ranks' gradients summed, this
        rank's rows kept (reduce-scatter over SP, then over CP)."""
        sharded = self.sp_size > 1 and self.sp_mode == "route"
        x = C.gather_from_sp(hidden, self.sp_group, grad_is_partial=True) if sharded else hidden
        if self.cp_size > 1:
            x = C.gather_along_dim(x.contiguous(), 1, self.cp_group, grad_is_partial=True)
            x = x.index_select(1, self._order(x.shape[1], x.device)[0])
        return x

    def local(self, per_token: torch.Tensor, batch: int) -> torch.Tensor:
        """[B·S, ...] (one-device order) -> this rank's rows [B·S/g, ...] in its own token order."""
        x = per_token.reshape(batch, -1, *per_token.shape[1:])
        if self.cp_size > 1:
            x = x.index_select(1, self._order(x.shape[1], x.device)[1])
        x = x.reshape(-1, *per_token.shape[1:])
        if self.sp_size > 1 and self.sp_mode == "route":
            n = x.shape[0] // self.sp_size
            x = x[C.group_rank(self.sp_group) * n:(C.group_rank(self.sp_group) + 1) * n]
        return x


def _shard_of(layer: MoELayer) -> TokenShards:
    if layer.token_shard is None:
        layer.token_shard = TokenShards()
    return layer.token_shard


def moe_sequence_parallel(layer: MoELayer, group, size: int, experts_split: bool = False) -> TokenShards:
    """Under SP: the layer gathers its routing input over ``group`` (the TP group, ``size`` ranks);
    with ``experts_split`` (expert tensor parallelism) its experts run the gathered tokens too."""
    shard = _shard_of(layer)
    shard.sp_group, shard.sp_size = group, size
    shard.sp_mode = "experts" if experts_split else "route"
    return shard


def apply_moe_context_parallel(model: nn.Module, group, rank: int, size: int) -> nn.Module:
    """Every MoE layer of ``model`` routes the whole micro-batch of the ``size`` CP ranks of ``group``
    (after any TP/SP plan). The router's and the replicated experts' gradients need no CP sum of
    their own: the data-parallel reduction runs over DP x CP."""
    if size == 1:
        return model
    for module in model.modules():
        if isinstance(module, MoELayer):
            shard = _shard_of(module)
            shard.cp_group, shard.cp_size, shard.cp_rank = group, size, rank
            module.aux_log_share /= size
    return model
