"""Sharded state description: every rank lists its pieces of every global tensor.

A :class:`ShardedPiece` is ``(key, global_shape, offsets, tensor)``: ``tensor`` is a *view* of live
storage (a parameter, an optimizer moment, a slice of a flat distributed-optimizer shard) holding
``global[offsets : offsets + tensor.shape]`` of the global tensor ``key``. Saving snapshots the views;
loading copies into them. Because keys, shapes and offsets are global, a checkpoint written at one
layout loads at any other: each rank just asks for the boxes it holds now.

Keys: ``model/<global param name>``, ``optim/<state name>/<global param name>`` (``exp_avg``,
``exp_avg_sq``, ``step``, and ``master`` for fp32 master weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from megacore.checkpoint.boxes import Segment, Shape, flat_range_boxes, intersect, numel, slices, tensor_segments
from megacore.checkpoint.errors import CheckpointError
from megacore.sharding import peek_meta

MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"
MASTER_STATE = "master"


@dataclass
class ShardedPiece:
    """``tensor`` (a view of live storage) == ``global[offsets : offsets + tensor.shape]`` of ``key``."""

    key: str
    global_shape: Shape
    offsets: Shape
    tensor: torch.Tensor

    @property
    def shape(self) -> Shape:
        return tuple(self.tensor.shape)


@dataclass
class TensorLayout:
    """Where one local tensor sits in its global tensor (see ``megacore.checkpoint.boxes``)."""

    name: str
    global_shape: Shape
    segments: list[Segment]


def optim_key(state_name: str, param_name: str) -> str:
    return f"{OPTIM_PREFIX}{state_name}/{param_name}"


def unwrap(module: nn.Module) -> nn.Module:
    """Strip wrappers that hold the real model as ``.module`` (DDP and similar) or ``._orig_mod``
    (torch.compile), so parameter names are the model's own."""
    for _ in range(8):
        inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module


def finish_param_sync(model_chunks) -> None:
    """Wait for in-flight parameter all-gathers (distributed optimizer with overlapped param gather),
    so the weights read or written are final."""
    chunks = [model_chunks] if isinstance(model_chunks, nn.Module) else list(model_chunks)
    for chunk in chunks:
        fn = getattr(chunk, "finish_param_sync", None)
        if callable(fn):
            fn()


def as_chunks(model_chunks) -> list[nn.Module]:
    """A module or a list of modules (virtual pipeline chunks) -> list of unwrapped modules."""
    chunks = [model_chunks] if isinstance(model_chunks, nn.Module) else list(model_chunks)
    if not chunks or not all(isinstance(c, nn.Module) for c in chunks):
        raise CheckpointError("model_chunks must be an nn.Module or a non-empty list of nn.Modules "
                              "(one per virtual pipeline stage)")
    return [unwrap(c) for c in chunks]


def _persistent_buffers(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    for mod_name, mod in module.named_modules():
        for buf_name, buf in mod.named_buffers(recurse=False):
            if buf is not None and buf_name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{buf_name}" if mod_name else buf_name), buf


def model_tensors(model_chunks) -> list[tuple[TensorLayout, torch.Tensor]]:
    """Every parameter and persistent buffer of the chunks once, under its GLOBAL name.

    A parameter's global name is ``peek_meta(param).global_name`` when set (e.g. the last stage's
    copy of a tied embedding) else its module path; layer names are global by construction.
    """
    out: list[tuple[TensorLayout, torch.Tensor]] = []
    seen_ids: set[int] = set()
    for chunk in as_chunks(model_chunks):
        items = list(chunk.named_parameters()) + list(_persistent_buffers(chunk))
        for name, t in items:
            if id(t) in seen_ids:
                continue
            seen_ids.add(id(t))
            gname = (peek_meta(t).global_name or name)
            gshape, segments = tensor_segments(t, what=gname)
            # A second local copy of a global tensor (tied weights) is listed too: loading must fill
            # it; saving writes identical boxes once (see megacore.checkpoint.plan).
            out.append((TensorLayout(gname, gshape, segments), t))
    return out


def pieces_of_tensor(key: str, layout: TensorLayout, tensor: torch.Tensor) -> list[ShardedPiece]:
    """Pieces of a local tensor that has the layout of the parameter described by ``layout``."""
    data = tensor.detach()
    return [ShardedPiece(key, layout.global_shape, s.global_offsets, data[slices(s.local_offsets, s.shape)])
            for s in layout.segments]


def pieces_of_flat_shard(key: str, layout: TensorLayout, local_shape: Sequence[int], flat: torch.Tensor,
                         start: int) -> list[ShardedPiece]:
    """Pieces of ``flat`` = elements ``[start, start + flat.numel())`` of the flattened local tensor.

    This is how a distributed-optimizer shard (a flat range of a parameter's local, possibly TP-
    sharded, tensor) becomes global boxes: split the flat range into boxes of the local tensor,
    intersect each with the local tensor's segments, and move the result to global offsets.
    """
    local_shape = tuple(local_shape)
    data = flat.detach().reshape(-1)
    stop = start + data.numel()
    out = []
    pos = 0
    for box_off, box_shape in flat_range_boxes(local_shape, start, stop):
        n = numel(box_shape)
        box = data[pos:pos + n].view(box_shape)
        pos += n
        for s in layout.segments:
            inter = intersect(box_off, box_shape, s.local_offsets, s.shape)
            if inter is None:
                continue
            i_off, i_shape = inter
            view = box[slices([a - b for a, b in zip(i_off, box_off)], i_shape)]
            g_off = tuple(g + (a - b) for g, a, b in zip(s.global_offsets, i_off, s.local_offsets))
            out.append(ShardedPiece(key, layout.global_shape, g_off, view))
    return out


def describe_model(model_chunks) -> list[ShardedPiece]:
    """All model pieces of this rank (``model/<global name>``)."""
    pieces: list[ShardedPiece] = []
    for layout, t in model_tensors(model_chunks):
        pieces += pieces_of_tensor(MODEL_PREFIX + layout.name, layout, t)
    return pieces


def param_layouts(model_chunks) -> dict[int, tuple[TensorLayout, torch.Tensor]]:
    """id(parameter) -> (layout, parameter), including second copies of tied weights."""
    out = {}
    for chunk in as_chunks(model_chunks):
        for name, p in chunk.named_parameters(remove_duplicate=False):
            gname = (peek_meta(p).global_name or name)
            gshape, segments = tensor_segments(p, what=gname)
            out.setdefault(id(p), (TensorLayout(gname, gshape, segments), p))
    return out
