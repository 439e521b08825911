"""Global save plan: which rank writes which box, and the tensor index built from it.

Every rank sends the boxes it holds (key, global shape, offsets, shape, dtype). Data held by several
ranks (data-parallel replicas, replicated norms, KV heads replicated over TP, a tied embedding's copy
on the last stage) is written once, by the lowest rank holding it: identical boxes are skipped, and
a box that partly overlaps boxes already assigned contributes only the remainder (box
subtraction). The accepted boxes of a tensor are disjoint by construction, so checking that their
volumes add up to the tensor's size proves the ranks tile it completely: a wrong shard description
fails the save instead of producing a checkpoint with holes.
"""

from __future__ import annotations

from dataclasses import dataclass

from megacore.checkpoint.boxes import intersect, numel, subtract
from megacore.checkpoint.directory import rank_file
from megacore.checkpoint.errors import CheckpointError
from megacore.checkpoint.serialize import dtype_name
from megacore.checkpoint.sharded import ShardedPiece


def chunk_name(key: str, offsets) -> str:
    return f"{key}@{','.join(str(o) for o in offsets)}"


def piece_meta(p: ShardedPiece) -> tuple:
    return (p.key, tuple(p.global_shape), tuple(p.offsets), p.shape, dtype_name(p.tensor.dtype))


@dataclass
class Write:
    piece: int       # index into this rank's pieces
    offsets: tuple   # global offsets of the written box (inside the piece)
    shape: tuple


@dataclass
class SavePlan:
    writes: list[Write]        # what this rank writes
    tensors: dict[str, dict]   # the index's "tensors" section (identical on every rank)


def make_plan(all_meta: list[list[tuple]], my_rank: int) -> SavePlan:
    """Deterministic: every rank computes the same plan from the same gathered ``all_meta``."""
    tensors: dict[str, dict] = {}
    seen: set[tuple] = set()
    accepted: dict[str, list[tuple]] = {}
    writes: list[Write] = []
    for r, metas in enumerate(all_meta):
        for i, (key, gshape, offsets, shape, dtype) in enumerate(metas):
            entry = tensors.get(key)
            if entry is None:
                entry = tensors[key] = {"shape": list(gshape), "dtype": dtype, "chunks": []}
                accepted[key] = []
            elif tuple(entry["shape"]) != tuple(gshape):
                raise CheckpointError(f"ranks disagree on the global shape of {key}: {tuple(entry['shape'])} vs "
                                      f"{tuple(gshape)} (rank {r}); the shard descriptions are inconsistent")
            for o, s, g in zip(offsets, shape, gshape):
                if o < 0 or o + s > g:
                    raise CheckpointError(f"{key}: rank {r} holds a box at {offsets} of shape {shape} outside {tuple(gshape)}")
            box = (key, tuple(offsets), tuple(shape))
            if box in seen:
                continue
            seen.add(box)
            remaining = [(tuple(offsets), tuple(shape))]
            for a_off, a_shape in accepted[key]:
                if intersect(offsets, shape, a_off, a_shape) is None:
                    continue
                remaining = [part for off, shp in remaining for part in subtract(off, shp, a_off, a_shape)]
                if not remaining:
                    break
            for off, shp in remaining:
                accepted[key].append((off, shp))
                if r == my_rank:
                    writes.append(Write(i, off, shp))
                entry["chunks"].append({"file": rank_file(r), "name": chunk_name(key, off), "offsets": list(off),
                                        "shape": list(shp), "dtype": dtype})
    for key, entry in tensors.items():
        total = sum(numel(c["shape"]) for c in entry["chunks"])
        if total != numel(entry["shape"]):
            raise CheckpointError(f"{key}: the ranks' pieces cover {total} of the {numel(entry['shape'])} elements of "
                                  f"shape {tuple(entry['shape'])}; part of the tensor is held by no rank - the shard "
                                  "descriptions (ParamMeta: shard / ckpt_view) are wrong")
    return SavePlan(writes, tensors)
