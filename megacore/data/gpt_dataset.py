"""GPT training samples: fixed-length windows over a shuffled stream of documents.

Given documents (an ``IndexedDataset`` or ``InMemoryDocuments``), the document ids of one split,
``seq_length`` S, a sample count and a seed, three index arrays define the samples:

- ``document_index``: the split's documents once per epoch, each epoch in its own permutation
  (generator seeded by (seed, epoch)). Concatenated, they form one token stream.
- ``sample_index`` [N+1, 2]: row i is (position in ``document_index``, token offset) of stream
  position i·S. Sample i is the S+1 tokens at stream positions [i·S, i·S+S]; consecutive samples
  share one token (the last label of one is the first input of the next), as in Megatron.
- ``shuffle_index`` [N]: the order samples are served in. Samples are shuffled within blocks of
  ``samples_per_epoch`` = (T-1)//S (T = tokens per epoch; generator seeded by (seed, block)), so
  block b is a permutation of the samples covering stream positions [b·B·S, (b+1)·B·S]: the first
  B samples served cover each token of the first epoch exactly once except a tail of fewer than S
  tokens, and no token is seen twice before (nearly) all have been seen once.

All three depend only on (documents, split, S, seed) and the number of blocks, never on the exact
sample count, so asking for more samples (a longer run) extends the stream without changing the
samples already served. Arrays are built with numpy and cached as ``.npy`` files under
``<cache_dir>/gpt_indices/`` named by a hash of those inputs.

``ds[i]`` returns numpy arrays (Megatron semantics):

- ``tokens`` [S] int64 = window[:-1]; ``labels`` [S] int64 = window[1:] (the next tokens).
- ``loss_mask`` [S] float32: 1, and with ``eod_mask_loss`` 0 wherever ``tokens`` (the INPUT) is the
  eod id, i.e. predicting across a document boundary is not trained (predicting eod itself is).
- ``position_ids`` [S] int64: 0..S-1, and with ``reset_position_ids`` restarting at 0 on the token
  after each eod (the eod keeps the position of its own document).
- ``attention_mask`` [1, S, S] bool, only with ``reset_attention_mask``: True where query t may
  attend key k (k <= t and both in the same document; an eod belongs to the document it ends).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import numpy as np

from megacore.data.cache import atomic_save_npy, atomic_write_bytes, build_lock, ensure_dir, stable_hash

_INDEX_RECIPE = "gpt-index-v1"


class TokenDocuments(Protocol):
    """What the sample builder reads: per-document token counts and slices of a document."""

    document_lengths: np.ndarray

    def get_document(self, doc: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray: ...


class InMemoryDocuments:
    """``TokenDocuments`` over a list of 1-D token arrays (tests, small corpora)."""

    def __init__(self, documents: Sequence[Sequence[int]]):
        self.documents = [np.asarray(d, dtype=np.int64).reshape(-1) for d in documents]
        self.document_lengths = np.array([len(d) for d in self.documents], dtype=np.int64)

    def get_document(self, doc: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        d = self.documents[doc]
        return d[offset:] if length is None else d[offset:offset + length]


def build_document_index(document_ids: np.ndarray, num_epochs: int, seed: int) -> np.ndarray:
    """Each epoch: the split's document ids in a fresh permutation seeded by (seed, epoch)."""
    epochs = [np.random.default_rng([seed, 1, e]).permutation(document_ids) for e in range(num_epochs)]
    return np.concatenate(epochs).astype(np.int64) if epochs else np.zeros(0, np.int64)


def build_sample_index(doc_lengths: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_samples: int) -> np.ndarray:
    """[num_samples+1, 2]: (position in document_index, offset) of stream positions i·seq_length.

    For a position p, the document containing it is the last one whose cumulative start is <= p
    (``searchsorted(..., side='right') - 1``), which skips empty documents.
    """
    cum = np.zeros(len(document_index) + 1, dtype=np.int64)
    np.cumsum(doc_lengths[document_index], out=cum[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if num_samples and positions[-1] >= cum[-1]:
        raise ValueError(f"{num_samples} samples of {seq_length}+1 tokens need {positions[-1] + 1} tokens, "
                         f"the document index holds {cum[-1]}")
    doc_pos = np.searchsorted(cum, positions, side="right") - 1
    return np.stack([doc_pos, positions - cum[doc_pos]], axis=1).astype(np.int64)


def build_shuffle_index(num_samples: int, block: int, seed: int) -> np.ndarray:
    """Permutation of range(num_samples), shuffled within consecutive blocks of ``block`` samples."""
    if num_samples == 0:
        return np.zeros(0, np.int64)
    parts = [np.random.default_rng([seed, 2, b]).permutation(np.arange(start, min(start + block, num_samples)))
             for b, start in enumerate(range(0, num_samples, block))]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def make_sample(window: np.ndarray, eod: Optional[int], eod_mask_loss: bool = False,
                reset_position_ids: bool = False, reset_attention_mask: bool = False) -> dict:
    """The training dict of one window of S+1 tokens (see the module docstring for the semantics)."""
    window = np.asarray(window, dtype=np.int64)
    tokens, labels = window[:-1].copy(), window[1:].copy()
    seq = len(tokens)
    loss_mask = np.ones(seq, dtype=np.float32)
    position_ids = np.arange(seq, dtype=np.int64)
    out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    if not (eod_mask_loss or reset_position_ids or reset_attention_mask):
        return out
    if eod is None:
        raise ValueError("eod_mask_loss / reset_position_ids / reset_attention_mask need the end-of-document id; "
                         "use a tokenizer (data.tokenizer) or turn these options off")
    is_eod = tokens == eod
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    if reset_position_ids:
        starts = np.zeros(seq, dtype=np.int64)
        after = np.nonzero(is_eod[:-1])[0] + 1  # first token of each following document
        starts[after] = after
        position_ids -= np.maximum.accumulate(starts)
    if reset_attention_mask:
        doc_id = np.concatenate([[0], np.cumsum(is_eod[:-1])])  # an eod ends (belongs to) its document
        causal = np.tri(seq, dtype=bool)
        out["attention_mask"] = (causal & (doc_id[:, None] == doc_id[None, :]))[None]
    return out


class GPTDataset:
    """Samples of ``seq_length`` tokens (+1 for the labels) from documents ``document_ids``.

    ``len(ds) == num_samples``; ``ds[i]`` is the i-th sample in training order (a dict, see the
    module docstring). ``vocab_size``, when given, is checked on every sample so a dataset built
    with a different tokenizer fails loudly instead of indexing past the embedding table.
    """

    def __init__(self, documents: TokenDocuments, document_ids: Union[np.ndarray, Sequence[int]], seq_length: int,
                 num_samples: int, seed: int, eod: Optional[int] = None, eod_mask_loss: bool = False,
                 reset_position_ids: bool = False, reset_attention_mask: bool = False,
                 cache_dir: Optional[Union[str, Path]] = None, name: str = "train",
                 vocab_size: Optional[int] = None):
        if seq_length < 1:
            raise ValueError(f"seq_length={seq_length} must be >= 1")
        if num_samples < 0:
            raise ValueError(f"num_samples={num_samples} must be >= 0")
        self.documents = documents
        self.document_ids = np.asarray(document_ids, dtype=np.int64)
        self.seq_length, self.num_samples, self.seed, self.name = seq_length, num_samples, seed, name
        self.eod, self.vocab_size = eod, vocab_size
        self.flags = dict(eod_mask_loss=eod_mask_loss, reset_position_ids=reset_position_ids,
                          reset_attention_mask=reset_attention_mask)
        if (eod_mask_loss or reset_position_ids or reset_attention_mask) and eod is None:
            make_sample(np.zeros(2, np.int64), None, **self.flags)  # raises the explanatory error

        lengths = np.asarray(documents.document_lengths, dtype=np.int64)
        self.tokens_per_epoch = int(lengths[self.document_ids].sum()) if len(self.document_ids) else 0
        self.samples_per_epoch = max(self.tokens_per_epoch - 1, 0) // seq_length
        if num_samples > 0 and self.samples_per_epoch == 0:
            raise ValueError(f"the {name} split has {len(self.document_ids)} documents with {self.tokens_per_epoch} tokens, "
                             f"fewer than one sample of seq_length+1={seq_length + 1}; use more data, a shorter "
                             "model.seq_length, or give this split a larger share in data.split")
        # Whole blocks only, so the indices never depend on the exact sample count (see module doc).
        self.num_blocks = math.ceil(num_samples / self.samples_per_epoch) if num_samples else 0
        self._build_or_load(lengths, cache_dir)

    # ----------------------------------------------------------------------------- indices
    def _build(self, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        total = self.num_blocks * self.samples_per_epoch
        # total·S + 1 <= num_blocks·T, so num_blocks epochs of documents always suffice.
        doc_index = build_document_index(self.document_ids, self.num_blocks, self.seed)
        sample_index = build_sample_index(lengths, doc_index, self.seq_length, total)
        shuffle_index = build_shuffle_index(total, self.samples_per_epoch, self.seed)
        return doc_index, sample_index, shuffle_index

    def _build_or_load(self, lengths: np.ndarray, cache_dir) -> None:
        if cache_dir is None or self.num_blocks == 0:
            self.document_index, self.sample_index, self.shuffle_index = self._build(lengths)
            return
        key = stable_hash(_INDEX_RECIPE, lengths, self.document_ids, self.seq_length, self.seed, self.num_blocks)
        folder = ensure_dir(Path(cache_dir) / "gpt_indices")
        stem = f"{self.name}-{key}"
        paths = [folder / f"{stem}-{part}.npy" for part in ("document_index", "sample_index", "shuffle_index")]
        arrays = self._load_cached(paths)
        if arrays is None:
            with build_lock(folder / f"{stem}.lock"):
                arrays = self._load_cached(paths)  # another process may have built it while we waited
                if arrays is None:
                    if any(p.is_file() for p in paths):
                        warnings.warn(f"the cached sample index {folder / stem}-*.npy is truncated or damaged; "
                                      "rebuilding it", stacklevel=2)
                    for path, arr in zip(paths, self._build(lengths)):
                        atomic_save_npy(path, arr)
                    description = {"recipe": _INDEX_RECIPE, "name": self.name, "seq_length": self.seq_length,
                                   "seed": self.seed, "num_blocks": self.num_blocks,
                                   "samples_per_epoch": self.samples_per_epoch, "num_documents": len(self.document_ids),
                                   "tokens_per_epoch": self.tokens_per_epoch}
                    atomic_write_bytes(folder / f"{stem}-description.json", json.dumps(description, indent=1).encode())
                    arrays = self._load_cached(paths)
                    if arrays is None:
                        raise RuntimeError(f"the sample index just written to {folder / stem}-*.npy does not read "
                                           "back; is the cache folder's disk full?")
        self.document_index, self.sample_index, self.shuffle_index = arrays

    def _load_cached(self, paths: list[Path]) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The three cached index arrays (memory-mapped), or None when one is missing, unreadable
        (a truncated file) or not the shape these inputs give (so it gets rebuilt)."""
        total = self.num_blocks * self.samples_per_epoch
        shapes = [(self.num_blocks * len(self.document_ids),), (total + 1, 2), (total,)]
        arrays = []
        for path, shape in zip(paths, shapes):
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError):
                return None
            if arr.shape != shape or arr.dtype.kind not in "iu":
                return None
            arrays.append(arr)
        return tuple(arrays)

    # ----------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return self.num_samples

    def window(self, idx: int) -> np.ndarray:
        """The S+1 tokens of sample ``idx`` (in training order), int64."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range: the {self.name} dataset has {self.num_samples} samples")
        i = int(self.shuffle_index[idx])
        (d0, o0), (d1, o1) = self.sample_index[i], self.sample_index[i + 1]
        d0, o0, d1, o1 = int(d0), int(o0), int(d1), int(o1)
        get = self.documents.get_document
        if d0 == d1:
            pieces = [get(int(self.document_index[d0]), o0, o1 - o0 + 1)]
        else:
            pieces = [get(int(self.document_index[d0]), o0)]
            pieces += [get(int(self.document_index[d])) for d in range(d0 + 1, d1)]
            pieces.append(get(int(self.document_index[d1]), 0, o1 + 1))
        window = np.concatenate(pieces).astype(np.int64)
        if len(window) != self.seq_length + 1:  # index/documents mismatch: never silently train on garbage
            raise RuntimeError(f"sample {idx} has {len(window)} tokens, expected {self.seq_length + 1}; "
                               "the cached sample index does not match the data, delete the cache folder")
        if self.vocab_size is not None and window.size and (window.max() >= self.vocab_size or window.min() < 0):
            raise ValueError(f"sample {idx} of the {self.name} dataset holds token id {int(window.max())} outside "
                             f"[0, vocab_size={self.vocab_size}); the data was tokenized with a different tokenizer — "
                             "set model.vocab_size / data.tokenizer to match it")
        return window

    def __getitem__(self, idx: int) -> dict:
        return make_sample(self.window(int(idx)), self.eod, **self.flags)
