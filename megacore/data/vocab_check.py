"""Is every token id of an indexed dataset inside the model's vocabulary? Checked when a run starts.

A ``.bin`` tokenized with another tokenizer than the model's holds ids ``>= model.vocab_size``;
the embedding lookup would fail on the first such sample, deep inside the step (or, for an id
below the padded vocabulary, train silently on garbage). ``check_vocab`` finds the largest id of
each file before training and names the file, the id and the fix.

The largest id comes from, in order:

1. ``PREFIX.meta.json``, the sidecar ``megacore preprocess`` writes beside ``.bin``/``.idx``
   (largest and smallest id, the counts it was computed over, the tokenizer and its vocab size).
   It is trusted only while the counts still match the index (a file rebuilt by another tool
   without its sidecar is scanned instead). The ``.idx`` layout itself stays Megatron's.
2. A scan of the ``.bin`` (files from Megatron-LM or older megacore): the max over the memory-
   mapped tokens in chunks of ``SCAN_CHUNK`` ids, a few seconds per GB, done once and cached under
   ``<cache_dir>/token_stats/`` keyed by the files' paths, sizes and modification times.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Union


from megacore.data.cache import atomic_write_bytes, ensure_dir, stable_hash
from megacore.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path

META_SUFFIX = ".meta.json"
META_FORMAT = "megacore-indexed-meta"
META_VERSION = 1
SCAN_CHUNK = 1 << 24  # ids per chunk of the scan (32 MB of uint16)

Log = Optional[Callable[[str], None]]


def meta_path(prefix: Union[str, Path]) -> Path:
    return Path(f"{prefix}{META_SUFFIX}")


def _counts(ds: IndexedDataset) -> dict:
    return {"num_sequences": len(ds), "num_documents": ds.num_documents, "num_tokens": ds.num_tokens,
            "dtype": ds.dtype.name, "bin_bytes": int(data_file_path(ds.path_prefix).stat().st_size)}


def write_meta(prefix: Union[str, Path], min_id: int, max_id: int, tokenizer=None) -> Path:
    """Write ``PREFIX.meta.json`` for the finished pair at ``prefix`` (``megacore preprocess``)."""
    ds = IndexedDataset(prefix)
    meta = {"format": META_FORMAT, "version": META_VERSION, "min_token_id": int(min_id), "max_token_id": int(max_id),
            **_counts(ds)}
    if tokenizer is not None:
        meta.update(tokenizer=str(tokenizer.name), tokenizer_vocab_size=int(tokenizer.vocab_size),
                    eod=int(tokenizer.eod))
    path = meta_path(prefix)
    atomic_write_bytes(path, (json.dumps(meta, indent=1) + "\n").encode("utf-8"))
    return path


def read_meta(ds: IndexedDataset) -> Optional[dict]:
    """The sidecar of ``ds`` when it exists and still describes these files, else None."""
    path = meta_path(ds.path_prefix)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
        return None
    if any(meta.get(k) != v for k, v in _counts(ds).items()):
        return None
    if not all(isinstance(meta.get(k), int) for k in ("min_token_id", "max_token_id")):
        return None
    return meta


def scan_token_range(ds: IndexedDataset, chunk: int = SCAN_CHUNK) -> tuple[int, int]:
    """(smallest, largest) id of the ``.bin``, read chunk by chunk; (0, -1) for an empty file."""
    tokens = ds.all_tokens()
    lo, hi = None, None
    for start in range(0, tokens.size, chunk):
        part = tokens[start:start + chunk]
        a, b = int(part.min()), int(part.max())
        lo = a if lo is None else min(lo, a)
        hi = b if hi is None else max(hi, b)
    return (0, -1) if hi is None else (lo, hi)


def _stat_key(ds: IndexedDataset) -> str:
    parts = []
    for path in (data_file_path(ds.path_prefix), index_file_path(ds.path_prefix)):
        st = path.stat()
        parts += [str(path.resolve()), st.st_size, st.st_mtime_ns]
    return stable_hash("token-range-v1", *parts)


def token_range(ds: IndexedDataset, cache_dir: Optional[Union[str, Path]] = None, log: Log = None) -> tuple[int, int, Optional[dict]]:
    """(smallest id, largest id, the sidecar or None): from the sidecar, the scan cache, or a scan."""
    meta = read_meta(ds)
    if meta is not None:
        return meta["min_token_id"], meta["max_token_id"], meta
    cached = Path(cache_dir) / "token_stats" / f"{_stat_key(ds)}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            got = json.loads(cached.read_text())
            return int(got["min_token_id"]), int(got["max_token_id"]), None
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable entry: scan again and overwrite it
    start = time.perf_counter()
    lo, hi = scan_token_range(ds)
    if log:
        log(f"data: scanned {ds.num_tokens} token ids of {data_file_path(ds.path_prefix)} for the largest "
            f"({hi}) in {time.perf_counter() - start:.1f}s (no {META_SUFFIX} sidecar; cached for next time)")
    if cached is not None:
        try:
            ensure_dir(cached.parent)
            atomic_write_bytes(cached, json.dumps({"min_token_id": lo, "max_token_id": hi}).encode())
        except OSError:
            pass  # a read-only cache costs a rescan next time, nothing else
    return lo, hi, meta


def vocab_problem(ds: IndexedDataset, vocab_size: int, cache_dir=None, log: Log = None,
                  tokenizer: Optional[str] = None) -> Optional[str]:
    """None when every id of ``ds`` is in ``[0, vocab_size)``, else the message saying which file,
    which id and what to do. ``tokenizer``: the run's tokenizer, when ``model.vocab_size`` follows it."""
    lo, hi, meta = token_range(ds, cache_dir, log)
    where = str(data_file_path(ds.path_prefix))
    if lo < 0:
        return (f"{where} holds the negative token id {lo}; it is damaged or was not written as token ids: rebuild it "
                "with `megacore preprocess`")
    if hi < vocab_size:
        return None
    made = ""
    if meta is not None and meta.get("tokenizer"):
        made = f"; it was preprocessed with the tokenizer {meta['tokenizer']} (vocab {meta.get('tokenizer_vocab_size')})"
    if tokenizer is not None:
        return (f"{where} holds token id {hi}, outside model.vocab_size={vocab_size}, the vocabulary of the run's "
                f"tokenizer {tokenizer}{made}: the data was made with another tokenizer. Set data.tokenizer to the "
                f"one the data was preprocessed with (and model.vocab_size >= {hi + 1} follows it), or preprocess "
                f"the text again with {tokenizer}")
    return (f"{where} holds token id {hi}, outside model.vocab_size={vocab_size} (ids must be < vocab_size){made}. "
            f"Set model.vocab_size >= {hi + 1} (or data.tokenizer to the tokenizer the data was made with), or "
            "preprocess the text again with the model's tokenizer (`megacore preprocess --tokenizer`)")
