"""Pipeline parallelism: stage partitioning, tied embeddings across stages, and the schedules.

    chunks = build_stage_modules(config, pp_rank, pp_size, vp_size, seed, device, dtype)
    # from a RunConfig (TP/EP/CP, recompute): megacore.compose.build_model_chunks(cfg, state, device, dtype)
    loss_sum = forward_backward(chunks, micro_batches, num_tokens_global, pp_group, schedule="1f1b")

See docs/pipeline.md for the partition rule, the schedules and how to choose.
"""

from megacore.pipeline.inflight import InFlightTracker
from megacore.pipeline.partition import (SCHEDULES, block_layers, build_stage_modules,
                                         check_num_microbatches, chunk_stage_index, layer_counts, resolve_schedule,
                                         stage_layers)
from megacore.pipeline.schedules import (MaskedLossSum, forward_backward, forward_backward_no_pipelining,
                                         masked_loss_sum)
from megacore.pipeline.stage_module import PipelineChunk
from megacore.pipeline.tied import TIED_NAME, allreduce_tied_embedding_grads, tied_embedding_params, unwrap

__all__ = [
    "InFlightTracker", "MaskedLossSum", "PipelineChunk", "SCHEDULES", "TIED_NAME", "allreduce_tied_embedding_grads",
    "block_layers", "build_stage_modules", "check_num_microbatches", "chunk_stage_index",
    "forward_backward", "forward_backward_no_pipelining", "layer_counts", "masked_loss_sum", "resolve_schedule",
    "stage_layers", "tied_embedding_params", "unwrap",
]
