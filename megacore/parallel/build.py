"""One call from config to a tensor-parallel GPTModel: build on meta, parallelize, materialize.

    megacore.parallel.initialize(tensor=2)
    megacore.parallel.model_parallel_seed(seed)
    model = megacore.parallel.build_parallel_gpt(config, seed, sequence_parallel=True, device="cuda")

Each rank then holds its shards of exactly the model ``GPTModel(config, seed=seed)`` builds on one
device (same seed, same global weights, whatever the layout).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megacore.config import TransformerConfig
from megacore.parallel.parallelize import parallelize
from megacore.parallel.topology import ParallelState


def build_parallel_gpt(config: TransformerConfig, seed: int, state: Optional[ParallelState] = None,
                       sequence_parallel: bool = False, device=None, dtype: Optional[torch.dtype] = None,
                       grad_sync: str = "hook", **gpt_kwargs) -> nn.Module:
    """GPTModel(config, **gpt_kwargs) sharded over ``state.tp_group`` and filled from ``seed``.

    ``gpt_kwargs`` go to GPTModel (``layer_spec``, ``pre_process``, ``post_process``,
    ``layer_numbers`` for a pipeline stage). ``device`` defaults to CPU.
    """
    from megacore.models import GPTModel
    from megacore.models.init import materialize

    with torch.device("meta"):
        model = GPTModel(config, seed=seed, **gpt_kwargs)
    parallelize(model, state, sequence_parallel=sequence_parallel, grad_sync=grad_sync)
    materialize(model, config, seed, device=device, dtype=dtype)
    return model
