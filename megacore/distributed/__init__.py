"""Data parallelism: contiguous grad buffers, DDP with overlapped reduction, global
grad-norm clipping and the FSDP2 bridge. The optimizers that read these buffers are in
``megacore.optim``.

Gradients are summed (not averaged) over data parallelism; see ``megacore.distributed.ddp`` for the
loss-normalization contract that makes this layout-invariant.
"""

from megacore.distributed.comm import all_reduce_over, group_rank, group_size
from megacore.distributed.grad_clip import (clip_grad_norm, counts_for_norm, default_is_tp_replicated,
                                            global_grad_norm, is_shared_duplicate)
from megacore.distributed.grad_buffer import Bucket, GradBuffer
from megacore.distributed.ddp import DistributedDataParallel, is_expert_param
from megacore.distributed.groups import parallel_groups
from megacore.distributed.fsdp import apply_fsdp, fsdp_no_sync, mixed_precision_policy, transformer_layers


__all__ = [
    "Bucket", "DistributedDataParallel", "GradBuffer", "all_reduce_over", "apply_fsdp",
    "clip_grad_norm", "counts_for_norm", "default_is_tp_replicated", "fsdp_no_sync", "global_grad_norm",
    "group_rank", "group_size", "is_expert_param", "is_shared_duplicate", "mixed_precision_policy",
    "parallel_groups", "transformer_layers",
]
