"""Optimizers over megacore's gradient buffers: AdamW on fp32 master weights with global-norm
clipping and loss scaling (``MixedPrecisionOptimizer``), and its ZeRO-1/2 form that shards the
master weights and moments over data parallelism (``DistributedOptimizer``).

They sit on top of ``megacore.distributed`` (they read the DDP gradient buffers and the global
grad norm); ``megacore.compose.build_optimizer`` picks one for a run."""

from megacore.optim.distributed_optimizer import DistributedOptimizer
from megacore.optim.optimizer import MixedPrecisionOptimizer, weight_decay_groups
from megacore.optim.step_info import StepInfo, read_scalars

__all__ = ["DistributedOptimizer", "MixedPrecisionOptimizer", "StepInfo", "read_scalars", "weight_decay_groups"]
