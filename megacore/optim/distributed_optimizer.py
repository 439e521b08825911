"""Distributed optimizer (ZeRO-1/2): master weights and AdamW moments sharded over data parallelism.

Sharding follows the flat gradient buffer of ``DistributedDataParallel(use_distributed_optimizer=True)``:
every bucket of ``B`` elements (padded to a multiple of the DP size) splits into ``DP`` equal
contiguous ranges and DP rank ``r`` owns range ``r`` of every bucket. For each parameter piece in
its ranges, a rank keeps

* an fp32 master (bf16/fp16 params) or a view of the flat weight buffer (fp32 params),
* the AdamW moments ``exp_avg``/``exp_avg_sq`` of that piece only,

so optimizer memory per rank is ``(4 + 4 + 4) · N / DP`` bytes with fp32 masters (``8 · N / DP``
for fp32 params) instead of ``12 · N``.

One step: DDP reduce-scatters gradients bucket by bucket into the local ranges (the summed
gradient of this rank's pieces is then in ``main_grad``); this rank unscales/clips/steps its pieces
(found_inf and the grad norm are reduced over DP too, because each rank sees a different shard;
a shard ``[start, end)`` of a parameter with rows replicated over TP counts only its overlap with
the rows this TP rank owns, ``grad_clip.counted_grads``: the DP shards of a TP rank cover its
owned elements once, and each global element has one owner, so it is counted once);
the updated pieces are written into the flat weight buffer and every bucket is all-gathered
(``ddp.start_param_sync()``), asynchronously when ``overlap_param_gather`` so the gather overlaps
with the next forward (per-module forward pre-hooks wait for their own buckets).

``state_dict()`` describes each piece by ``(name, start, end)``: its flat element range in the
parameter, so a checkpoint saved at one DP size loads at another (or into the replicated
``MixedPrecisionOptimizer``) by overlapping ranges.
"""

from __future__ import annotations

from torch import nn

from megacore.distributed.comm import ProcessGroup
from megacore.optim.optimizer import Fragment, MixedPrecisionOptimizer, make_master


class DistributedOptimizer(MixedPrecisionOptimizer):
    """AdamW with state sharded across data parallelism; same arguments as ``MixedPrecisionOptimizer``
    except that ``model`` must be a ``DistributedDataParallel(..., use_distributed_optimizer=True)``
    (or a list of them, one per virtual-pipeline chunk)."""

    shards_over_dp = True

    def __init__(self, model: nn.Module, **kwargs):
        from megacore.distributed.ddp import DistributedDataParallel

        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        if not chunks or not all(isinstance(m, DistributedDataParallel) and m.use_distributed_optimizer for m in chunks):
            raise ValueError("DistributedOptimizer needs the model wrapped as "
                             "DistributedDataParallel(module, dp_group, use_distributed_optimizer=True): its "
                             "gradient buffer defines the shards; or use MixedPrecisionOptimizer for a replicated optimizer")
        super().__init__(model, **kwargs)

    def _build_fragments(self) -> list[Fragment]:
        out = []
        for ddp, buf in self._buffers():
            for p, start, end, _bucket in buf.local_ranges():
                name = ddp.param_names[id(p)]
                view = p.data.view(-1)[start:end]   # a view into the flat weight buffer
                master, copy = make_master(view, self.master_weights)
                out.append(Fragment(name, p, start, end, master, copy, int(self.no_weight_decay(name, p))))
        return out

    def _norm_sets(self) -> list[tuple[list[Fragment], list[ProcessGroup]]]:
        # Shards are disjoint across DP: sum over each buffer's DP group as well. Sets come from the
        # buffers (identical on every rank), so every rank joins every reduction even with no pieces.
        # Split experts (a buffer of expert params, reduced over expert-DP) also sum over EP.
        from megacore.distributed.ddp import is_expert_param

        def key(buf):
            return id(buf.dp_group), bool(self.expert_parallel_group is not None and is_expert_param(buf.params[0]))

        sets: dict[tuple, tuple[list[Fragment], list[ProcessGroup]]] = {}
        owner = {id(p): buf for _, buf in self._buffers() for p in buf.params}
        for _, buf in self._buffers():
            model_parallel = self._expert_norm_groups() if key(buf)[1] else list(self.model_parallel_groups)
            sets.setdefault(key(buf), ([], model_parallel + [buf.dp_group]))
        for f in self.fragments:
            sets[key(owner[id(f.param)])][0].append(f)
        return list(sets.values())

    def _buffers(self):
        return [(ddp, buf) for ddp in self.ddps for buf in ddp.grad_buffers]

    def _after_step(self) -> None:
        for ddp in self.ddps:
            ddp.start_param_sync()
