"""Tied input/output embeddings across the first and last pipeline stage.

With ``tie_embeddings`` and pp > 1 the table is used twice, on different ranks: as the input
embedding on stage 0 (chunk 0) and as the output projection on stage pp-1 (last chunk), which holds
its own copy (``output_layer.weight`` with ``ParamMeta.global_name ==
"embedding.word_embeddings.weight"``). Both copies start equal (same global name -> same init).
The gradient of the shared table is the SUM of both uses, so after backward the two copies'
gradients are all-reduced (SUM) over the embedding group (first + last rank of each pipeline
group); identical gradients and identical optimizer states keep the copies identical forever.

Multi-token prediction (``model.mtp_num_layers``) uses the table on the last stage too, tied or not:
there the MTP block holds the copy (``mtp.embedding``, same global name; with tied embeddings it is
also the output weight and no ``output_layer`` copy exists), summed with the first stage's the same way.

Under TP both copies are sharded the same way over the vocab, and the embedding group pairs ranks
with the same TP coordinate, so the shards line up element for element.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megacore.sharding import peek_meta

TIED_NAME = "embedding.word_embeddings.weight"


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DDP-style wrappers (anything exposing ``.module``)."""
    while not hasattr(module, "pre_process") and isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    return module


def tied_embedding_params(chunks: Iterable[nn.Module]) -> list[nn.Parameter]:
    """This rank's copies of the tied table: the input embedding (if it is on this rank and the
    model is tied) and/or the last stage's output copy. Empty when nothing is tied across ranks."""
    out = []
    for chunk in chunks:
        model = unwrap(chunk)
        config = model.config
        # The last stage's multi-token-prediction depths embed tokens too (megacore.layers.mtp).
        if not (getattr(config, "tie_embeddings", False) or getattr(config, "mtp_num_layers", 0)):
            continue
        if model.pre_process and model.embedding is not None:
            out.append(model.embedding.word_embeddings.weight)
        mtp = getattr(model, "mtp", None)
        for copy in (model.output_layer, getattr(mtp, "embedding", None)):
            if copy is not None and peek_meta(copy.weight).global_name == TIED_NAME:
                out.append(copy.weight)
    return out


def _grad_of(p: torch.Tensor) -> Optional[torch.Tensor]:
    if getattr(p, "main_grad", None) is not None:  # megacore DDP accumulates into main_grad
        from megacore.distributed.grad_buffer import settled_main_grad

        return settled_main_grad(p)
    return p.grad


def allreduce_tied_embedding_grads(chunks: Iterable[nn.Module], group=None) -> None:
    """Sum the tied-embedding gradients of the first and last stage (call after backward, on every rank).

    ``group`` is the embedding group (``megacore.parallel.get_state().embedding_group``). Ranks outside
    it, a group of one rank (pp = 1) and untied models do nothing. A rank whose copy got no gradient
    contributes zeros, so the collective always matches up.
    """
    if group is None or not dist.is_initialized() or dist.get_world_size(group) <= 1:
        return
    params = tied_embedding_params(chunks)
    if not params:
        return
    if len(params) > 1:
        raise RuntimeError("one rank holds both ends of a pipeline with tied embeddings; the copies should be one "
                           "parameter there (pp=1) -- check the stage layout")
    p = params[0]
    g = _grad_of(p)
    if g is None:
        p.grad = g = torch.zeros_like(p)
    dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group)
