"""Loading with resharding: each rank reads exactly the boxes it holds now, from whichever saved
chunks overlap them, whatever layout wrote them.

All checks run before anything is modified, and every rank agrees on the outcome before any copy,
so a bad checkpoint (another model, missing or unexpected tensors, wrong shapes, a truncated or
corrupted file, no COMPLETE marker) raises on every rank and leaves the model, optimizer and RNG
state as they were. Every file a rank reads is verified against a digest first: ``index.json``
against the one in ``COMPLETE``, the safetensors and rank json files (RNG state) against
``index.json``; the RNG state is parsed before the agreement too, and only applied after it. Files
are read with ``safetensors.safe_open`` (slices, no full-file load) and JSON; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from safetensors import safe_open

from megacore.checkpoint import comm
from megacore.checkpoint.boxes import intersect, numel, slices
from megacore.checkpoint.directory import COMPLETE, INDEX, rank_file, rank_meta, resolve_load_path
from megacore.checkpoint.errors import CheckpointError
from megacore.checkpoint.optim_state import check_param_groups, finish_optimizer_load, plan_optimizer_load
from megacore.checkpoint.rng import check_rng_state, current_layout, restore_rng
from megacore.checkpoint.save import FORMAT, VERSION
from megacore.checkpoint.serialize import from_json_tree, read_json, read_verified_json, verify_file
from megacore.checkpoint.sharded import (MASTER_STATE, MODEL_PREFIX, OPTIM_PREFIX, ShardedPiece, as_chunks, describe_model,
                                         finish_param_sync)

# Config fields that change nothing stored in a checkpoint: they may differ between save and load.
RUNTIME_CONFIG_FIELDS = frozenset({"attention_dropout", "hidden_dropout", "attention_backend", "from_hf"})
MAX_LISTED = 8


@dataclass
class LoadResult:
    path: str                       # the iter_N directory loaded
    step: int                       # the step saved (training resumes at this step)
    extra: Any                      # what the saver passed as ``extra``
    scheduler_state: Any            # what the saver passed as ``scheduler_state``
    rng_restored: bool
    rng_note: str = ""              # why RNG state was not restored, when it was not
    loaded_optimizer: bool = False


@dataclass
class _Read:
    file: str
    name: str
    src: tuple        # slices into the saved chunk
    dst: torch.Tensor  # view of the destination
    whole: bool


def _listing(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def compare_configs(saved: Optional[dict], current: Any, path: str) -> None:
    """Raise naming every differing model field when the checkpoint is of another model."""
    if saved is None or current is None or not dataclasses.is_dataclass(current):
        return
    now = dataclasses.asdict(current)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, model {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if k not in RUNTIME_CONFIG_FIELDS and saved.get(k) != now.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was saved from a different model config ({'; '.join(diffs)}); "
                              "build the model with the checkpoint's config, or pass check_config=False to load "
                              "matching tensors anyway")


def _plan_reads(pieces: list[ShardedPiece], tensors: dict, path: str, strict: bool) -> tuple[list[_Read], set]:
    """For each destination piece, the intersections with saved chunks; checks keys, shapes, coverage."""
    reads, missing, wrong_shape = [], set(), {}
    for p in pieces:
        entry = tensors.get(p.key)
        if entry is None:
            missing.add(p.key)
            continue
        if tuple(entry["shape"]) != tuple(p.global_shape):
            wrong_shape[p.key] = f"{p.key}: checkpoint {tuple(entry['shape'])}, model {tuple(p.global_shape)}"
            continue
        covered = 0
        for c in entry["chunks"]:
            inter = intersect(p.offsets, p.shape, c["offsets"], c["shape"])
            if inter is None:
                continue
            i_off, i_shape = inter
            src = slices([a - b for a, b in zip(i_off, c["offsets"])], i_shape)
            dst = p.tensor[slices([a - b for a, b in zip(i_off, p.offsets)], i_shape)]
            reads.append(_Read(c["file"], c["name"], src, dst, tuple(i_shape) == tuple(c["shape"])))
            covered += numel(i_shape)
        if covered != numel(p.shape):
            raise CheckpointError(f"checkpoint {path}: the saved chunks of {p.key} cover {covered} of the "
                                  f"{numel(p.shape)} elements this rank needs; index.json is damaged")
    if wrong_shape:
        listed = [wrong_shape[k] for k in sorted(wrong_shape)[:MAX_LISTED]]
        more = f" ... and {len(wrong_shape) - MAX_LISTED} more" if len(wrong_shape) > MAX_LISTED else ""
        raise CheckpointError(f"checkpoint {path}: {len(wrong_shape)} tensor(s) have a different global shape "
                              f"({'; '.join(listed)}{more}); the checkpoint is of a different model size")
    if missing and strict:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensor(s) this model needs: {_listing(missing)}; "
                              "it was saved from a different model, or pass strict=False to keep their current values")
    return reads, missing


_PRECISION = {"float64": 3, "float32": 2, "bfloat16": 1, "float16": 1}


def _prefer_masters(pieces: list[ShardedPiece], tensors: dict) -> list[ShardedPiece]:
    """Read a weight from its fp32 master (``optim/master/<name>``) when the checkpoint's model copy is
    lower precision than the parameter being loaded (bf16 training resumed or exported in fp32)."""
    out = []
    for p in pieces:
        name = p.key[len(MODEL_PREFIX):]
        master = tensors.get(f"{OPTIM_PREFIX}{MASTER_STATE}/{name}")
        saved = tensors.get(p.key)
        want = str(p.tensor.dtype).replace("torch.", "")
        if (master is not None and saved is not None and tuple(master["shape"]) == tuple(saved["shape"])
                and _PRECISION.get(saved["dtype"], 0) < _PRECISION.get(want, 0)):
            p = ShardedPiece(f"{OPTIM_PREFIX}{MASTER_STATE}/{name}", p.global_shape, p.offsets, p.tensor)
        out.append(p)
    return out


def _execute(reads: list[_Read], root: str) -> None:
    by_file: dict[str, list[_Read]] = {}
    for r in reads:
        by_file.setdefault(r.file, []).append(r)
    with torch.no_grad():
        for fname, items in by_file.items():
            with safe_open(os.path.join(root, fname), framework="pt") as f:
                for r in items:
                    src = f.get_tensor(r.name) if r.whole else f.get_slice(r.name)[r.src]
                    r.dst.copy_(src.reshape(r.dst.shape))


def read_index(ckpt: str, verify: bool = True) -> dict:
    """``ckpt/index.json``, checked against the digest ``COMPLETE`` holds (checkpoints written before
    ``COMPLETE`` held one are read unchecked)."""
    marker = read_json(os.path.join(ckpt, COMPLETE), ckpt)
    expected = marker.get("index") if verify and isinstance(marker, dict) else None
    if expected is None:
        return read_json(os.path.join(ckpt, INDEX), ckpt)
    return read_verified_json(os.path.join(ckpt, INDEX), expected, ckpt, "COMPLETE")


def load_checkpoint(path: str, model_chunks, optimizer=None, scaler=None, *, strict: bool = True,
                    load_optimizer: bool = True, load_rng: bool = True, verify_checksums: bool = True,
                    check_config: bool = True, group=None) -> LoadResult:
    """Load ``path`` (a checkpoint root - its ``latest`` is followed - or an ``iter_N`` directory) into
    this rank's model chunks, optimizer and loss scaler; collective. Returns step, extra, scheduler state.
    """
    rank = comm.rank(group)
    error, needed_model_keys, ctx, cause, ckpt = None, set(), {}, None, None
    try:
        ckpt = resolve_load_path(path, "latest") if path is not None else None
        if ckpt is None:
            raise CheckpointError(f"{path} holds no checkpoint yet (no 'latest' file); save one first or "
                                  "point checkpoint.load at an iter_* directory")
        ctx = _prepare(ckpt, model_chunks, optimizer, strict, load_optimizer, load_rng, verify_checksums,
                       check_config, rank, comm.world_size(group))
        needed_model_keys = ctx["model_keys"]
    except CheckpointError as e:
        error, cause = str(e), e
    except Exception as e:  # a damaged index (missing fields) or a bug: still fail on every rank together
        error, cause = f"checkpoint {path} could not be read ({type(e).__name__}: {e})", e
    gathered = comm.all_gather_object((error, sorted(needed_model_keys), ckpt and os.path.realpath(ckpt)), group)
    errors = [(r, e) for r, (e, _, _) in enumerate(gathered) if e]
    if not errors and len({c for _, _, c in gathered}) > 1:  # e.g. 'latest' changed while the ranks read it
        errors = [(0, f"the ranks resolved {path} to different checkpoints "
                      f"({sorted({os.path.basename(c) for _, _, c in gathered})}); another process is writing there, "
                      "or the ranks do not see the same filesystem; load an iter_* directory explicitly")]
    if not errors and strict:
        needed = set().union(*(set(k) for _, k, _ in gathered))
        unexpected = {k for k in ctx["index"]["tensors"] if k.startswith(MODEL_PREFIX)} - needed
        if unexpected:
            errors = [(0, f"checkpoint {ctx['path']} holds {len(unexpected)} model tensor(s) no rank of this model has: "
                          f"{_listing(unexpected)}; it was saved from a different (larger?) model, or pass strict=False")]
    if errors:
        r, e = errors[0]
        where = f" (rank {r})" if comm.world_size(group) > 1 else ""
        raise CheckpointError(e + where) from (cause if r == rank else None)
    # Nothing below can fail on checkpoint content: everything was read and validated on every rank.
    _execute(ctx["reads"], ctx["path"])
    index = ctx["index"]
    common = from_json_tree(index.get("common") or {}, ctx["read_common"])
    if ctx["optim_plan"] is not None:
        finish_optimizer_load(optimizer, ctx["optim_plan"], common.get("optimizer") or {})
    if scaler is not None and common.get("scaler") is not None:
        scaler.load_state_dict(common["scaler"])
    rng_state, note = ctx["rng"]
    if rng_state is not None:
        restore_rng(rng_state)
    return LoadResult(path=ctx["path"], step=int(index["step"]), extra=common.get("extra"),
                      scheduler_state=common.get("scheduler"), rng_restored=rng_state is not None, rng_note=note,
                      loaded_optimizer=ctx["optim_plan"] is not None)


def _prepare(ckpt, model_chunks, optimizer, strict, load_optimizer, load_rng, verify_checksums, check_config, rank,
             world: int) -> dict:
    index = read_index(ckpt, verify_checksums)
    if index.get("format") != FORMAT or int(index.get("version", 0)) > VERSION:
        raise CheckpointError(f"checkpoint {ckpt}: index.json is format {index.get('format')!r} version "
                              f"{index.get('version')!r}; this megacore reads {FORMAT!r} up to version {VERSION}")
    finish_param_sync(model_chunks)
    chunks = as_chunks(model_chunks)
    if check_config:
        compare_configs(index.get("model_config"), getattr(chunks[0], "config", None), ckpt)
    tensors = index["tensors"]
    model_pieces = describe_model(chunks)
    reads, missing = _plan_reads(_prefer_masters(model_pieces, tensors), tensors, ckpt, strict)
    optim_plan = None
    if optimizer is not None and load_optimizer:
        if not any(k.startswith(OPTIM_PREFIX) for k in tensors):
            raise CheckpointError(f"checkpoint {ckpt} holds no optimizer state (it was saved without an optimizer); "
                                  "pass load_optimizer=False to load only the model")
        common_optim = (index.get("common") or {}).get("optimizer") or {}
        problem = check_param_groups(optimizer, common_optim)
        if problem:
            raise CheckpointError(f"checkpoint {ckpt}: {problem}")
        optim_plan = plan_optimizer_load(optimizer, chunks, tensors, common_optim)
        optim_reads, _ = _plan_reads(optim_plan.pieces, tensors, ckpt, strict=True)
        reads += optim_reads
    common_file = index.get("common_file", rank_file(0))
    files = {r.file for r in reads} | {common_file}
    rng_problem = _rng_problem(index, world) if load_rng else "load_rng=False"
    if rng_problem is None:
        files.add(rank_file(rank))
    if verify_checksums:
        for fname in sorted(files):
            if fname not in index["files"]:
                raise CheckpointError(f"checkpoint {ckpt}: {fname} is not listed in index.json; the index is damaged")
            verify_file(os.path.join(ckpt, fname), index["files"][fname], ckpt)
    rng = (None, rng_problem) if rng_problem is not None else (_read_rng(ckpt, index, rank, verify_checksums), "")

    def read_common(name: str) -> torch.Tensor:
        with safe_open(os.path.join(ckpt, common_file), framework="pt") as f:
            return f.get_tensor(name)

    return {"path": ckpt, "index": index, "reads": reads, "optim_plan": optim_plan, "read_common": read_common,
            "model_keys": {p.key for p in model_pieces} | set(missing), "rng": rng}


def _rng_problem(index: dict, world: int) -> Optional[str]:
    """Why this rank's saved RNG state does not apply here (None when it does)."""
    if int(index["world_size"]) != world:
        return f"checkpoint world size {index['world_size']} != current {world}; RNG streams not restored"
    if index.get("layout") != current_layout():
        return f"checkpoint layout {index.get('layout')} != current {current_layout()}; RNG streams not restored"
    return None


def _read_rng(ckpt: str, index: dict, rank: int, verify: bool) -> dict:
    """This rank's RNG state, read (json verified against index.json, tensors from the verified
    rank file) and checked now, applied only after every rank agreed to load."""
    name = rank_meta(rank)
    expected = index["files"].get(name) if verify else None
    if expected is None and verify and any(f.endswith(".json") for f in index["files"]):
        raise CheckpointError(f"checkpoint {ckpt}: {name} is not listed in index.json; the index is damaged")
    path = os.path.join(ckpt, name)
    # Checkpoints written before rank json files were listed are read unverified.
    meta = read_json(path, ckpt) if expected is None else read_verified_json(path, expected, ckpt, "index.json")
    try:
        with safe_open(os.path.join(ckpt, rank_file(rank)), framework="pt") as f:
            state = from_json_tree(meta["rng"], f.get_tensor)
        check_rng_state(state)
    except Exception as e:  # a key or tensor the file should have: damaged, or written by something else
        raise CheckpointError(f"checkpoint {ckpt}: the RNG state in {name} cannot be used ({type(e).__name__}: {e}); "
                              "the file is damaged: load an earlier checkpoint, or pass load_rng=False") from None
    return state
