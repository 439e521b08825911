"""Reading and writing Hugging Face weight files, without ever unpickling arbitrary objects.

Reading: ``model.safetensors``, or shards listed in ``model.safetensors.index.json``; as a fallback a
``pytorch_model.bin`` (or its sharded index), loaded with ``torch.load(weights_only=True)`` which
only rebuilds tensors and plain containers. Tensors are read lazily, one at a time.

Writing: safetensors shards of at most ``max_shard_size`` bytes (a tensor larger than that gets a
shard of its own), an index json when there is more than one, all in a temporary directory that
replaces the target in one rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megacore.file_modes import current_umask

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# safetensors dtype names (as ``get_slice(name).get_dtype()`` spells them) -> torch dtypes
SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
               "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_DAMAGED = "the file is damaged or incomplete: download or save it again"


def read_json_file(path: Path, what: str = "JSON file") -> object:
    """The parsed JSON of ``path``; ValueError naming the file for text that is not JSON or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                         f"the {what} is damaged or was not written completely") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); the {what} is damaged") from None


class CheckpointReader:
    """Name -> tensor access over a HF model directory (single file or shards)."""

    def __init__(self, hf_dir: Union[str, Path]):
        self.dir = Path(hf_dir)
        self._stack = contextlib.ExitStack()
        self._where: dict[str, object] = {}  # name -> open safetensors handle or loaded bin dict
        self._files: dict[str, Path] = {}    # name -> the file holding it (for errors)
        d = self.dir
        if (d / SAFE_INDEX).exists():
            self._open_sharded(d / SAFE_INDEX, self._open_safetensors)
        elif (d / SAFE_SINGLE).exists():
            self._open_safetensors(d / SAFE_SINGLE)
        elif (d / BIN_INDEX).exists() or (d / BIN_SINGLE).exists():
            warnings.warn(f"{d} holds only PyTorch pickle weights ({BIN_SINGLE}); loading them with "
                          "torch.load(weights_only=True), which rebuilds tensors only. Prefer safetensors.",
                          stacklevel=3)
            if (d / BIN_INDEX).exists():
                self._open_sharded(d / BIN_INDEX, self._open_bin)
            else:
                self._open_bin(d / BIN_SINGLE)
        else:
            raise FileNotFoundError(f"no weights in {d}: expected {SAFE_SINGLE}, {SAFE_INDEX} (sharded) "
                                    f"or {BIN_SINGLE}; is this a Hugging Face model directory?")

    def _open_sharded(self, index_path: Path, open_one) -> None:
        index = read_json_file(index_path, "shard index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path} has no 'weight_map' object; the index file is corrupt")
        for shard in sorted(set(weight_map.values())):
            path = self.dir / shard
            if not path.exists():
                raise FileNotFoundError(f"shard {shard} listed in {index_path.name} is missing from {self.dir}")
            open_one(path)
        missing = [n for n in weight_map if n not in self._where]
        if missing:
            raise ValueError(f"{index_path.name} lists tensors its shards do not hold: {missing[:5]}")

    def _open_safetensors(self, path: Path) -> None:
        try:
            handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}); {_DAMAGED}") from None
        for name in handle.keys():
            self._where[name] = handle
            self._files[name] = path

    def _open_bin(self, path: Path) -> None:
        try:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # also what weights_only raises for objects it refuses to build
            raise pickle.UnpicklingError(f"{path}: {e}") from None
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            raise ValueError(f"{path} is not a readable PyTorch weights file ({e}); {_DAMAGED}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
        for name, t in state.items():
            if isinstance(t, torch.Tensor):
                self._where[name] = state
                self._files[name] = path

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        src = self._where[name]
        if isinstance(src, dict):
            return tuple(src[name].shape)
        return tuple(src.get_slice(name).get_shape())

    def dtype(self, name: str) -> Optional[torch.dtype]:
        """The stored dtype of tensor ``name``, read from the header (None: a dtype torch lacks)."""
        src = self._where[name]
        if isinstance(src, dict):
            return src[name].dtype
        return SAFE_DTYPES.get(src.get_slice(name).get_dtype())

    def file_of(self, name: str) -> Path:
        return self._files[name]

    def get(self, name: str) -> torch.Tensor:
        src = self._where[name]
        if isinstance(src, dict):
            return src[name]
        try:
            return src.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"tensor {name!r} of {self._files[name]} cannot be read ({e}); {_DAMAGED}") from None

    def close(self) -> None:
        self._stack.close()
        self._where.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(size: Union[int, str]) -> int:
    """``5GB`` -> 5·10⁹ bytes, ``2GiB`` -> 2·2³⁰, an int is bytes."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size={size} must be positive")
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"max_shard_size={size!r} is not a size; use bytes or e.g. '5GB', '500MB', '2GiB'")
    return max(1, int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy in insertion order: start a new shard when the next tensor would overflow this one."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(t)
    return shards


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning its storage (safetensors refuses views sharing memory)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != _nbytes(t) or t.storage_offset() != 0:
        t = t.clone()
    return t


def write_safetensors(out_dir: Path, tensors: dict[str, torch.Tensor], max_shard_size: Union[int, str]) -> list[str]:
    """Write ``tensors`` into ``out_dir`` as one file or shards + index; returns the file names."""
    shards = plan_shards(tensors, parse_size(max_shard_size))
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file({n: _standalone(tensors[n]) for n in shards[0]}, str(out_dir / SAFE_SINGLE), metadata=meta)
        return [SAFE_SINGLE]
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: _standalone(tensors[n]) for n in names}, str(out_dir / fname), metadata=meta)
        files.append(fname)
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())}, "weight_map": weight_map}
    with open(out_dir / SAFE_INDEX, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return files + [SAFE_INDEX]


def _is_replaced(name: str) -> bool:
    """Files a fresh save supersedes (weights and config); anything else in the target dir is kept."""
    return (name in ("config.json", SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX)
            or re.fullmatch(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)", name) is not None)


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src``'s bytes to ``dst`` as a new file with the umask's mode (0644 under umask 022),
    whatever mode the source had (a download cache may hold 0600 files)."""
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o666 & ~current_umask())


def _normal_modes(root: Path) -> None:
    """Folders 0777 and files 0666 less the umask under ``root`` (0755 / 0644 under umask 022): the
    temporary directory is private (0700) and safetensors writes its files 0600."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_directory(out_dir: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out_dir`` by rename.

    Files already in ``out_dir`` that the save does not supersede (tokenizer files, generation
    config, ...) are copied over first, so saving into an existing model directory keeps them.
    On error the temporary directory is removed and ``out_dir`` is untouched. The directory gets
    the umask's mode (0755 under umask 022), not the 0700 of a private temporary directory.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _normal_modes(tmp)
        if out.exists():
            if not out.is_dir():
                raise NotADirectoryError(f"{out} exists and is not a directory; choose another output path")
            for entry in out.iterdir():
                if _is_replaced(entry.name) or (tmp / entry.name).exists():
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, tmp / entry.name)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
