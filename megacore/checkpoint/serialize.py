"""Bytes on disk: a streaming safetensors writer with a running sha256, verified reads, and JSON
that may contain tensors. Nothing here ever unpickles.

Files are standard safetensors (8-byte little-endian header length, JSON header, raw little-endian
data), readable by ``safetensors.safe_open``; this writer streams each tensor straight from its
CPU snapshot into the file and the hash (no second in-memory copy of the payload), releasing the
GIL in ``write`` and ``update`` so a background writer thread barely slows training.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Iterable

import torch

from megacore.checkpoint.errors import CheckpointError

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        ST_DTYPES[getattr(torch, _name)] = _code

HASH_BLOCK = 1 << 24


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in the checkpoint index; the index is damaged or from a newer version")
    return dt


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _write_chunk(f, hasher, data) -> None:
    """One write + hash update (a seam tests use to slow the writer down)."""
    f.write(data)
    hasher.update(data)


def write_safetensors(path: str, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> dict:
    """Write CPU ``tensors`` to ``path`` (fsynced); returns ``{"sha256", "size"}`` of the file."""
    items = list(tensors)
    header: dict[str, Any] = {}
    offset = 0
    for name, t in items:
        if t.device.type != "cpu":
            raise CheckpointError(f"tensor {name} is on {t.device}; snapshot to CPU before writing")
        if t.dtype not in ST_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    hasher = hashlib.sha256()
    with open(path, "wb") as f:
        _write_chunk(f, hasher, struct.pack("<Q", len(head)) + head)
        for _, t in items:
            data = _tensor_bytes(t)
            for start in range(0, len(data), HASH_BLOCK):
                _write_chunk(f, hasher, data[start:start + HASH_BLOCK])
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hasher.hexdigest(), "size": 8 + len(head) + offset}


def file_digest(path: str) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(HASH_BLOCK)
            if not block:
                break
            hasher.update(block)
            size += len(block)
    return hasher.hexdigest(), size


def verify_file(path: str, expected: dict, checkpoint: str) -> None:
    """Raise a clear CheckpointError when ``path`` is missing, truncated or corrupted."""
    name = os.path.basename(path)
    hint = "the checkpoint is damaged; load an earlier checkpoint (pass its iter_* directory) or re-save it"
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {checkpoint}: file {name} listed in index.json is missing; {hint}")
    size = os.path.getsize(path)
    if size != expected["size"]:
        raise CheckpointError(f"checkpoint {checkpoint}: file {name} is truncated or padded: {size} bytes on disk, "
                              f"index.json says {expected['size']}; {hint}")
    digest, _ = file_digest(path)
    if digest != expected["sha256"]:
        raise CheckpointError(f"checkpoint {checkpoint}: file {name} is corrupted (sha256 {digest[:16]}... does not "
                              f"match index.json {expected['sha256'][:16]}...); {hint}")


# --------------------------------------------------------------------------------------- JSON

def to_json_tree(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Plain JSON tree of ``obj``; tensors become ``{"__tensor__": name}`` and are added to ``tensors``.

    Tuples are kept as ``{"__tuple__": [...]}`` so they round-trip (betas=(0.9, 0.95)).
    """
    if torch.is_tensor(obj):
        name = f"{prefix}#{len(tensors)}"
        tensors[name] = obj.detach().to("cpu", copy=True)
        return {"__tensor__": name}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(f"state key {k!r} under {prefix!r} is not a string; only string keys can be saved")
            out[k] = to_json_tree(v, prefix, tensors)
        return out
    if isinstance(obj, tuple):
        return {"__tuple__": [to_json_tree(v, prefix, tensors) for v in obj]}
    if isinstance(obj, list):
        return [to_json_tree(v, prefix, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise CheckpointError(f"cannot save a {type(obj).__name__} under {prefix!r}: checkpoint state must be JSON-like "
                          "(dict, list, tuple, str, number, bool, None) or tensors")


def from_json_tree(obj: Any, read_tensor) -> Any:
    """Inverse of :func:`to_json_tree`; ``read_tensor(name)`` returns a stored tensor."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return read_tensor(obj["__tensor__"])
        if set(obj) == {"__tuple__"}:
            return tuple(from_json_tree(v, read_tensor) for v in obj["__tuple__"])
        return {k: from_json_tree(v, read_tensor) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json_tree(v, read_tensor) for v in obj]
    return obj


def write_json(path: str, obj: Any) -> None:
    """Write JSON durably: to ``path.tmp``, fsync, then ``os.replace`` (atomic on POSIX)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_verified_json(path: str, expected: dict, checkpoint: str, listed_in: str) -> Any:
    """JSON of ``path``, parsed from the very bytes checked against ``expected`` (``{"sha256", "size"}``
    from ``listed_in``); a clear CheckpointError when the file is missing, truncated or corrupted."""
    name = os.path.basename(path)
    hint = "the checkpoint is damaged; load an earlier checkpoint (pass its iter_* directory) or re-save it"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {checkpoint}: file {name} listed in {listed_in} is missing; {hint}") from None
    if len(data) != expected["size"]:
        raise CheckpointError(f"checkpoint {checkpoint}: file {name} is truncated or padded: {len(data)} bytes on disk, "
                              f"{listed_in} says {expected['size']}; {hint}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected["sha256"]:
        raise CheckpointError(f"checkpoint {checkpoint}: file {name} is corrupted (sha256 {digest[:16]}... does not "
                              f"match {listed_in} {expected['sha256'][:16]}...); {hint}")
    try:
        return json.loads(data)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {checkpoint}: {name} is not valid JSON ({e}); {hint}") from None


def read_json(path: str, checkpoint: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {checkpoint}: {os.path.basename(path)} is missing; it is not a complete "
                              "megacore checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {checkpoint}: {os.path.basename(path)} is not valid JSON ({e}); the file is "
                              "damaged, load an earlier checkpoint") from None
