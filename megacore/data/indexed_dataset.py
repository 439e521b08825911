"""Megatron-LM memory-mapped indexed dataset: ``PREFIX.bin`` (tokens) + ``PREFIX.idx`` (index).

``.bin`` is the raw token ids of every sequence, back to back, in one numpy dtype.

``.idx`` layout (all little-endian), byte for byte what Megatron-LM reads and writes:

=========  ======================  ============================================================
offset     field                   meaning
=========  ======================  ============================================================
0          ``b"MMIDIDX\\x00\\x00"``   9-byte magic
9          ``<Q`` version           always 1
17         ``<B`` dtype code        1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                                   7 float32, 8 uint16
18         ``<Q`` sequence count    N
26         ``<Q`` document count    D + 1 = length of the document-index array below
34         int32[N]                sequence lengths (in tokens)
34+4N      int64[N]                sequence pointers (byte offset of each sequence in ``.bin``)
34+12N     int64[D+1]              document indices: document d is sequences
                                   ``[doc_idx[d], doc_idx[d+1])``; starts at 0, ends at N
=========  ======================  ============================================================

A GPT corpus usually stores one sequence per document; other preprocessors split documents into
sentences (several sequences per document). ``document_lengths`` / ``get_document`` give the
token view of whole documents, which is what the GPT sample builder consumes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from megacore.data.cache import temp_path_for

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count

DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in _CODE_OF:
        raise ValueError(f"dtype {dt} has no Megatron index code; use one of "
                         f"{[np.dtype(v).name for v in DTYPE_CODES.values()]}")
    return _CODE_OF[dt]


def optimal_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (vocab <= 65536), else int32."""
    return np.uint16 if vocab_size <= 65536 else np.int32


def index_file_path(prefix: Union[str, Path]) -> Path:
    return Path(f"{prefix}.idx")


def data_file_path(prefix: Union[str, Path]) -> Path:
    return Path(f"{prefix}.bin")


def data_prefix(path: Union[str, Path]) -> str:
    """The path prefix of a ``.bin``/``.idx`` pair from either spelling: ``x``, ``x.bin`` and ``x.idx``
    all name ``x`` (so ``data.paths``, ``--output-prefix`` and blended lists accept any of them)."""
    p = str(Path(path).expanduser()) if str(path).startswith("~") else str(path)
    return p[:-4] if p.endswith((".bin", ".idx")) else p


_strip_suffix = data_prefix


class IndexedDataset:
    """Read-only, memory-mapped view of ``PREFIX.bin`` / ``PREFIX.idx``.

    ``len(ds)`` is the number of sequences, ``ds[i]`` sequence i as a numpy array (a slice gives a
    list), ``ds.get(i, offset, length)`` part of it. Nothing is copied until a sequence is read.
    """

    def __init__(self, path_prefix: Union[str, Path]):
        self.path_prefix = _strip_suffix(path_prefix)
        idx_path, bin_path = index_file_path(self.path_prefix), data_file_path(self.path_prefix)
        for path, what in ((idx_path, "index"), (bin_path, "data")):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{what} file {str(path)!r} does not exist; pass the path prefix of a .bin/.idx pair "
                    f"(without the suffix) written by `megacore preprocess` or Megatron-LM")
        self._read_index(idx_path)
        self._map_data(bin_path)

    # ----------------------------------------------------------------------------- loading
    def _read_index(self, idx_path: Path) -> None:
        size = idx_path.stat().st_size
        if size < HEADER_SIZE:
            raise ValueError(f"index file {str(idx_path)!r} is truncated ({size} bytes, the header alone is "
                             f"{HEADER_SIZE}); rebuild it with `megacore preprocess`")
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        magic = header[:9]
        if magic != INDEX_MAGIC:
            raise ValueError(f"index file {str(idx_path)!r} has magic {magic!r}, expected {INDEX_MAGIC!r}: it is not "
                             "a Megatron memory-mapped index (old 'TNTIDX' lazy/cached formats are not supported); "
                             "rebuild it with `megacore preprocess`")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != INDEX_VERSION:
            raise ValueError(f"index file {str(idx_path)!r} has version {version}; only version {INDEX_VERSION} is supported")
        (code,) = struct.unpack("<B", header[17:18])
        if code not in DTYPE_CODES:
            raise ValueError(f"index file {str(idx_path)!r} has unknown dtype code {code}; known codes: {sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n_seq, n_doc = struct.unpack("<QQ", header[18:34])
        expected = HEADER_SIZE + 12 * n_seq + 8 * n_doc
        if size != expected:
            raise ValueError(f"index file {str(idx_path)!r} is {size} bytes but its header ({n_seq} sequences, "
                             f"{n_doc} document indices) implies {expected}; the file is truncated or corrupt, "
                             "rebuild it with `megacore preprocess`")
        buf = np.memmap(idx_path, dtype=np.uint8, mode="r") if size > 0 else np.zeros(0, np.uint8)
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=n_seq, offset=off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=n_seq, offset=off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=n_doc, offset=off)
        docs = self.document_indices
        if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or (n_doc > 1 and np.any(np.diff(docs) < 0)):
            raise ValueError(f"index file {str(idx_path)!r} has inconsistent document indices (must start at 0, "
                             f"never decrease and end at the sequence count {n_seq}); rebuild it")
        if n_seq and (np.any(self.sequence_lengths < 0) or np.any(self.sequence_pointers < 0)):
            raise ValueError(f"index file {str(idx_path)!r} has negative lengths or pointers; it is corrupt, rebuild it")

    def _map_data(self, bin_path: Path) -> None:
        itemsize = self.dtype.itemsize
        n = len(self.sequence_lengths)
        expected = 0
        if n:
            ends = self.sequence_pointers + self.sequence_lengths.astype(np.int64) * itemsize
            expected = int(ends.max())
        size = bin_path.stat().st_size
        if size < expected:
            raise ValueError(f"data file {str(bin_path)!r} is truncated: {size} bytes, but its index needs {expected} "
                             f"({n} sequences of {self.dtype.name}); re-run `megacore preprocess` to rebuild it")
        if size > expected:
            raise ValueError(f"data file {str(bin_path)!r} is {size} bytes but its index describes only {expected}; "
                             ".bin and .idx come from different runs, rebuild them together")
        self._bin = np.memmap(bin_path, dtype=np.uint8, mode="r") if size > 0 else np.zeros(0, np.uint8)
        # Documents are usually contiguous in .bin (always, when written by the builder): read them in one slice.
        if n:
            contiguous = self.sequence_pointers[1:] == self.sequence_pointers[:-1] + self.sequence_lengths[:-1].astype(np.int64) * itemsize
            self._contiguous = bool(np.all(contiguous))
        else:
            self._contiguous = True
        first = self.document_indices[:-1]
        cum = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        self.document_lengths = cum[self.document_indices[1:]] - cum[first]

    # ----------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of sequence ``idx`` (to its end when length is None)."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences in {self.path_prefix!r}")
        idx %= n
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"offset={offset}, length={length} exceed sequence {idx} of length {seq_len}")
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, idx: Union[int, slice]) -> Union[np.ndarray, list[np.ndarray]]:
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        return self.get(int(idx))

    def get_document(self, doc: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of document ``doc`` (all its sequences concatenated)."""
        doc_len = int(self.document_lengths[doc])
        if length is None:
            length = doc_len - offset
        if offset < 0 or length < 0 or offset + length > doc_len:
            raise IndexError(f"offset={offset}, length={length} exceed document {doc} of length {doc_len}")
        first, last = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if self._contiguous or last - first == 1:
            if first == last:
                return np.zeros(0, dtype=self.dtype)
            start = int(self.sequence_pointers[first]) + offset * self.dtype.itemsize
            return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)
        tokens = np.concatenate([self.get(i) for i in range(first, last)])
        return tokens[offset:offset + length]

    def all_tokens(self) -> np.ndarray:
        """Every token of the ``.bin`` file as one memory-mapped 1-D array (nothing is read until used)."""
        return np.frombuffer(self._bin, dtype=self.dtype, count=self._bin.size // self.dtype.itemsize)

    # Pickle by path (DataLoader workers, spawn): re-map the files instead of copying their contents.
    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path_prefix"])

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.path_prefix!r}: {len(self)} sequences, {self.num_documents} documents, "
                f"{self.num_tokens} tokens, {self.dtype.name})")


class IndexedDatasetBuilder:
    """Write a ``.bin``/``.idx`` pair. Tokens stream to a temporary file next to ``bin_path``;
    ``finalize(idx_path)`` moves it into place and then writes the index (both atomically), so a
    reader that finds the ``.idx`` always finds the complete ``.bin``.

        builder = IndexedDatasetBuilder("out/data.bin", dtype=np.uint16)
        builder.add_document(tokens, [len(tokens)])      # or add_item(...) per sequence + end_document()
        builder.finalize("out/data.idx")
    """

    def __init__(self, bin_path: Union[str, Path], dtype=np.int32):
        self.bin_path = Path(bin_path)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        if not self.bin_path.parent.is_dir():
            raise FileNotFoundError(f"output folder {str(self.bin_path.parent)!r} does not exist; create it first")
        self._tmp = temp_path_for(self.bin_path)
        self._file = open(self._tmp, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None

    def _write(self, tokens) -> int:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {arr.shape}")
        if self._info is not None and arr.size and arr.dtype != self.dtype:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                raise ValueError(f"token ids in [{lo}, {hi}] do not fit dtype {self.dtype.name}; "
                                 "use dtype=np.int32 for vocabularies above 65536")
        self._file.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes(order="C"))
        return int(arr.size)

    def add_item(self, tokens) -> None:
        """Append one sequence to the current document."""
        self.sequence_lengths.append(self._write(tokens))

    def end_document(self) -> None:
        """Close the current document (the sequences added since the previous one)."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths: Sequence[int]) -> None:
        """Append a document: ``tokens`` (1-D) holds its sequences back to back, ``lengths`` their sizes."""
        arr = np.asarray(tokens)
        lengths = [int(n) for n in lengths]
        if any(n < 0 for n in lengths) or sum(lengths) != arr.size:
            raise ValueError(f"sequence lengths {lengths[:8]}{'...' if len(lengths) > 8 else ''} sum to "
                             f"{sum(lengths)} but the document has {arr.size} tokens")
        self._write(arr)
        self.sequence_lengths.extend(lengths)
        self.end_document()

    def finalize(self, idx_path: Union[str, Path]) -> None:
        if self._file is None:
            raise RuntimeError("finalize() was already called (or the builder was discarded)")
        if self.document_indices[-1] != len(self.sequence_lengths):
            self.end_document()  # sequences added with add_item and no closing end_document()
        self._file.close()
        self._file = None
        lengths = np.asarray(self.sequence_lengths, dtype=np.int64)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a sequence longer than 2**31-1 tokens cannot be indexed (int32 lengths)")
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            pointers[1:] = np.cumsum(lengths[:-1] * self.dtype.itemsize)
        docs = np.asarray(self.document_indices, dtype=np.int64)
        header = INDEX_MAGIC + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", self._code)
        header += struct.pack("<QQ", len(lengths), len(docs))
        idx_path = Path(idx_path)
        idx_tmp = temp_path_for(idx_path)
        try:
            with open(idx_tmp, "wb") as f:
                f.write(header)
                f.write(lengths.astype(np.int32).tobytes())
                f.write(pointers.tobytes())
                f.write(docs.tobytes())
            os.replace(self._tmp, self.bin_path)
            os.replace(idx_tmp, idx_path)
        except BaseException:
            idx_tmp.unlink(missing_ok=True)
            self._tmp.unlink(missing_ok=True)
            raise

    def discard(self) -> None:
        """Drop everything written so far (e.g. after an error); the final paths are never touched."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._file is not None:
            self.discard()
