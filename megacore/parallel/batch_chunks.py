"""Run a transformer layer on independent groups of whole sequences (``parallel.tp_batch_chunks``).

Under tensor parallelism with sequence parallelism every layer is a chain
``all-gather -> matmuls -> reduce-scatter -> norm -> all-gather -> ...`` in which each collective
feeds the very next matmul, so nothing can run while it is on the wire. Sequences of a micro-batch
never mix inside a layer (attention only looks within a sequence), so splitting the micro-batch
into ``k`` groups gives ``k`` independent chains in the same compiled graph: inductor's overlap
scheduler (``parallel.tp_comm_overlap=schedule``) can then run group 2's all-gather while group 1
multiplies, and so on. The result is the same function of the input: each token meets the same
weights and the same sequence-mates.

Which tokens form a group. A sequence-parallel rank holds token chunk ``r`` of the flattened
``B·S`` tokens (``B/t`` whole sequences when ``t`` divides ``B``). Group ``j`` takes the ``j``-th
``1/k`` of every rank's chunk, so its all-gather yields whole sequences, in the order::

    items(j) = [r·B/t + j·B/(t·k) + i  for r in range(t)  for i in range(B/(t·k))]

Per-sample attention inputs (rotary tables built from position ids, boolean masks) are picked in
that order; shared ones (cos/sin of shape [S, d], no mask) pass through unchanged.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch


def chunk_items(batch: int, chunks: int, sp_size: int) -> list[list[int]]:
    """The micro-batch items each group holds, in the order its gathered tensor lists them."""
    if batch % (chunks * sp_size) != 0:
        raise ValueError(f"a micro-batch of {batch} sequences cannot form {chunks} groups of whole sequences "
                         f"over {sp_size} sequence-parallel ranks; make the micro-batch a multiple of "
                         f"{chunks * sp_size}")
    per_rank, per_group = batch // sp_size, batch // (sp_size * chunks)
    return [[r * per_rank + j * per_group + i for r in range(sp_size) for i in range(per_group)]
            for j in range(chunks)]


def _pick(t: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """Rows of ``t`` (dim 0) in the contiguous runs ``[a, b)``, as slices (no index tensor)."""
    if len(runs) == 1:
        return t[runs[0][0]:runs[0][1]]
    return torch.cat([t[a:b] for a, b in runs])


def _runs(items: list[int]) -> list[tuple[int, int]]:
    """[0, 1, 4, 5] -> [(0, 2), (4, 6)]."""
    runs: list[list[int]] = []
    for i in items:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


def forward_in_batch_chunks(layer_forward: Callable, hidden_BSH: torch.Tensor, rotary, mask, chunks: int,
                            sp_size: int) -> torch.Tensor:
    """``layer_forward(hidden, rotary, mask)`` applied group by group; the output has the layout of
    ``hidden_BSH`` (the full [B, S, H] stream, or a sequence-parallel rank's [B, S/t, H] token
    chunk)."""
    batch, seq_local, hidden = hidden_BSH.shape
    groups = chunk_items(batch, chunks, sp_size)
    flat = hidden_BSH.reshape(batch * seq_local, hidden)
    rows = flat.shape[0] // chunks
    outs = []
    for j, items in enumerate(groups):
        runs = _runs(items)
        part = flat[j * rows:(j + 1) * rows].view(batch // chunks, seq_local, hidden)
        part_rotary = rotary
        if rotary is not None and rotary[0].dim() == 3:  # per-sample tables [B, S, d]
            part_rotary = tuple(_pick(t, runs) for t in rotary)
        part_mask = _pick(mask, runs) if mask is not None and mask.shape[0] == batch else mask
        outs.append(layer_forward(part, part_rotary, part_mask).reshape(rows, hidden))
    return torch.cat(outs).view(batch, seq_local, hidden)


def apply_batch_chunks(model: torch.nn.Module, chunks: int) -> None:
    """Make every transformer layer of a (TP-parallelized) GPTModel or stage run in ``chunks``
    groups of whole sequences (hands each layer ``chunked_forward``). Call before compiling the layers."""
    sp_size = getattr(model, "sequence_parallel_size", 1)
    for layer in model.decoder.layers.values():
        if hasattr(layer, "chunked_forward"):
            layer.chunked_forward = partial(forward_in_batch_chunks, chunks=chunks, sp_size=sp_size)
