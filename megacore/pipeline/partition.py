"""Pipeline stage partitioning: which layers (and which ends of the model) each stage holds.

Vocabulary
----------
``pp`` physical stages (pipeline ranks) each hold ``vp`` model *chunks* (virtual stages;
``vp = parallel.virtual_pipeline or 1``). The model is cut into ``pp * vp`` consecutive *blocks*
of layers, numbered in model order ``k = 0 .. pp*vp - 1``. Block ``k`` is chunk ``c = k // pp`` of
stage ``s = k % pp`` (Megatron's interleaved assignment), so chunk ``c`` of stage ``s`` holds block
``c * pp + s``. Activations therefore flow stage 0 -> 1 -> ... -> pp-1 -> 0 (next chunk) -> ...

Layer counts per block
----------------------
* Even split (default): every block gets ``L // (pp*vp)`` layers and the first ``L % (pp*vp)``
  blocks *in model order* get one more. Example: L=10, pp=4 -> [3, 3, 2, 2].
* Explicit split (``parallel.pipeline_layers``): a list of ``pp*vp`` positive counts, in model
  (block) order, summing to ``num_layers``. Example: pp=2, vp=2, [1, 3, 3, 1] puts blocks 0 and 2
  (layers 0 and 4-6) on stage 0 and blocks 1 and 3 (layers 1-3 and 7) on stage 1.

Ends of the model: the embedding lives in block 0 (stage 0, chunk 0); the final norm, the output
layer and the loss live in the last block (stage pp-1, chunk vp-1). With tied embeddings and
pp > 1 the last block holds its own copy of the embedding table (see ``megacore.pipeline.tied``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from megacore.config import ConfigError, TransformerConfig
from megacore.config.support import Facts, check
from megacore.sharding import param_meta, peek_meta

SCHEDULES = ("1f1b", "interleaved", "gpipe", "zero_bubble")


def layer_counts(num_layers: int, pp_size: int, vp_size: int = 1,
                 pipeline_layers: Optional[Sequence[int]] = None) -> list[int]:
    """Number of layers in each of the ``pp_size * vp_size`` blocks, in model order (see module doc)."""
    # The support table's pipeline rules (stage sizes, virtual stages, the split itself).
    check(Facts(num_layers=num_layers, pipeline=pp_size, virtual_pipeline=vp_size,
                pipeline_layers=None if pipeline_layers is None else list(pipeline_layers)))
    if pipeline_layers is not None:
        return list(pipeline_layers)
    n_blocks = pp_size * vp_size
    base, extra = divmod(num_layers, n_blocks)
    return [base + (1 if k < extra else 0) for k in range(n_blocks)]


def block_layers(num_layers: int, pp_size: int, vp_size: int = 1,
                 pipeline_layers: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Global layer indices of every block, in model order."""
    out, start = [], 0
    for n in layer_counts(num_layers, pp_size, vp_size, pipeline_layers):
        out.append(list(range(start, start + n)))
        start += n
    return out


def stage_layers(num_layers: int, pp_rank: int, pp_size: int, vp_size: int = 1,
                 pipeline_layers: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Global layer indices held by each chunk ``c = 0..vp-1`` of stage ``pp_rank`` (block c*pp + pp_rank)."""
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} is outside [0, {pp_size}); pass this rank's pipeline rank")
    blocks = block_layers(num_layers, pp_size, vp_size, pipeline_layers)
    return [blocks[c * pp_size + pp_rank] for c in range(vp_size)]


def chunk_stage_index(pp_rank: int, chunk: int, pp_size: int) -> int:
    """Position in the model-order pipeline of chunk ``chunk`` of stage ``pp_rank``."""
    return chunk * pp_size + pp_rank


def resolve_schedule(schedule: str, vp_size: int) -> str:
    """The schedule that actually runs: 1f1b with virtual stages runs interleaved 1F1B."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"parallel.pipeline_schedule={schedule!r} is not known; use one of {list(SCHEDULES)}")
    if schedule == "1f1b" and vp_size > 1:
        return "interleaved"
    if schedule == "interleaved" and vp_size == 1:
        raise ConfigError("parallel.pipeline_schedule='interleaved' needs parallel.virtual_pipeline >= 2 (model "
                          "chunks per stage); set virtual_pipeline or use pipeline_schedule='1f1b'")
    return schedule


def check_num_microbatches(schedule: str, num_microbatches: int, pp_size: int, vp_size: int = 1) -> None:
    """Raise a ConfigError when ``num_microbatches`` does not fit ``schedule`` (the rules of torch's schedules).

    * 1f1b (torch ``Schedule1F1B``): at least ``pp`` micro-batches, else the pipeline never fills.
    * interleaved / zero_bubble (torch ``ScheduleInterleaved1F1B`` / ``ScheduleInterleavedZeroBubble``):
      micro-batches run in rounds of ``n // rounds`` with ``rounds = max(1, n // pp)``, so ``n`` must be
      a multiple of ``rounds`` (any multiple of ``pp`` works; so does any ``n < 2*pp``).
    * gpipe: any count >= 1.
    """
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ConfigError(f"the number of micro-batches ({num_microbatches!r}) must be >= 1; "
                          "check train.global_batch_size / (train.micro_batch_size * data-parallel size)")
    name = resolve_schedule(schedule, vp_size)
    if pp_size == 1:
        return
    if name == "1f1b" and num_microbatches < pp_size:
        raise ConfigError(
            f"the 1F1B pipeline schedule needs at least pipeline={pp_size} micro-batches per step, got "
            f"{num_microbatches}; raise train.global_batch_size or lower train.micro_batch_size so that "
            f"global_batch / (micro_batch * data_parallel) >= {pp_size}, or use pipeline_schedule='gpipe'")
    if name in ("interleaved", "zero_bubble"):
        rounds = max(1, num_microbatches // pp_size)
        if num_microbatches % rounds != 0:
            raise ConfigError(
                f"the {name} pipeline schedule runs micro-batches in rounds: {num_microbatches} micro-batches "
                f"with pipeline={pp_size} make {rounds} rounds, and {num_microbatches} is not a multiple of "
                f"{rounds}; use a multiple of {pp_size} micro-batches (e.g. "
                f"{max(pp_size, num_microbatches - num_microbatches % pp_size)})")


def _mark_tied_duplicate(model) -> None:
    """Flag the last stage's copy of the embedding table (tied output, or the MTP depths' copy) so
    grad-norm code and the parameter count see the table once."""
    mtp = getattr(model, "mtp", None)
    for copy in (model.output_layer, getattr(mtp, "embedding", None)):
        if copy is not None and peek_meta(copy.weight).global_name:
            param_meta(copy.weight).shared_duplicate = True


def build_stage_modules(config: TransformerConfig, pp_rank: int, pp_size: int, vp_size: int = 1, seed: int = 0,
                        device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None,
                        pipeline_layers: Optional[Sequence[int]] = None,
                        parallelize_fn: Optional[Callable] = None, materialize: bool = True) -> list:
    """The ``vp_size`` GPTModel chunks of stage ``pp_rank``, built on meta then materialized.

    Chunk ``c`` holds block ``c * pp_size + pp_rank`` (global layer names); chunk 0 of stage 0 has the
    embedding; chunk vp-1 of stage pp-1 has the final norm, output layer and loss. Every parameter is
    filled from ``(seed, global name)`` exactly like the one-device model, so a pipeline of these
    chunks *is* ``GPTModel(config, seed=seed)`` cut into pieces.

    ``parallelize_fn(chunk)`` runs on each meta chunk before materializing, e.g.
    ``lambda m: megacore.parallel.parallelize(m, state, sequence_parallel=True)`` for TP x PP: each
    rank then holds its TP shard of its stage's layers. ``materialize=False`` leaves the chunks on
    meta (call ``megacore.models.init.materialize(chunk, config, seed, device, dtype)`` later).
    """
    from megacore.models.gpt import GPTModel
    from megacore.models.init import materialize as fill

    config.validate()
    chunks = []
    for c, layers in enumerate(stage_layers(config.num_layers, pp_rank, pp_size, vp_size, pipeline_layers)):
        pre = pp_rank == 0 and c == 0
        post = pp_rank == pp_size - 1 and c == vp_size - 1
        with torch.device("meta"):
            model = GPTModel(config, seed=seed, pre_process=pre, post_process=post, layer_numbers=layers)
        _mark_tied_duplicate(model)
        if parallelize_fn is not None:
            model = parallelize_fn(model) or model
        if materialize:
            fill(model, config, seed, device=device, dtype=dtype)
        model.pipeline_stage_index = chunk_stage_index(pp_rank, c, pp_size)
        model.pipeline_num_stages = pp_size * vp_size
        chunks.append(model)
    return chunks
