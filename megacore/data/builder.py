"""From a ``DataConfig`` to a tokenizer and (train, valid, test) datasets.

``data.source``:

- ``default``: the embedded corpus (``megacore.data.corpus``), tokenized with ``data.tokenizer``
  or, when that is unset or ``bpe``, a byte-level BPE of ``data.tokenizer_vocab_size`` trained on
  the corpus. Tokenizer and ``.bin``/``.idx`` are built once into the cache directory.
- ``mock``: ``MockGPTDataset`` (deterministic synthetic tokens; no tokenizer).
- ``indexed``: ``data.paths`` of ``.bin``/``.idx`` pairs, each spelled as its prefix or as its
  ``.bin`` or ``.idx`` file, blended by ``data.weights`` (default: proportional to each dataset's
  tokens in the split). The tokenizer is ``data.tokenizer``, else the ``PREFIX.tokenizer.json``
  that ``megacore preprocess`` writes beside a trained-on-the-fly BPE (found from any spelling of
  the path; paths beside different tokenizers are an error). Before any sample is built, the
  largest token id of every file is checked against ``model.vocab_size``
  (``megacore.data.vocab_check``): a file made with a bigger vocabulary stops the run at its start,
  named, with the fix.

Every returned dataset is indexed by GLOBAL sample index: the training loop reads samples
``[step·G, (step+1)·G)`` and each data-parallel rank takes its slice, so the batch stream is the
same for every parallel layout. A split whose sample count is 0 is returned as None.

The cache directory is ``data.cache_dir``, else ``$MEGACORE_CACHE``, else ``~/.cache/megacore``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from megacore.config import ConfigError, DataConfig
from megacore.data.blended import BlendedDataset, blend_counts, split_document_ranges
from megacore.data.cache import build_lock, default_cache_dir, ensure_dir, stable_hash
from megacore.data.corpus import corpus_fingerprint, default_corpus
from megacore.data.gpt_dataset import GPTDataset
from megacore.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, data_prefix, optimal_dtype
from megacore.data.mock import MockGPTDataset
from megacore.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer, train_bpe
from megacore.data.vocab_check import vocab_problem

Log = Optional[Callable[[str], None]]
SPLIT_NAMES = ("train", "valid", "test")


def _cache(data_cfg: DataConfig, cache_dir) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(data_cfg.cache_dir)


def build_tokenizer(data_cfg: DataConfig, cache_dir=None, log: Log = None) -> Optional[Tokenizer]:
    """The run's tokenizer, or None when the source needs none (mock, or indexed data with no
    tokenizer named or found beside it; the model's vocab_size is then used as is)."""
    spec = data_cfg.tokenizer
    cache = _cache(data_cfg, cache_dir)
    if data_cfg.source == "default" and (spec is None or spec == "bpe"):
        return train_bpe(default_corpus(cache_dir=cache), data_cfg.tokenizer_vocab_size, cache_dir=cache, log=log)
    if spec == "bpe":
        raise ConfigError(f"data.tokenizer='bpe' trains on the embedded corpus and only fits data.source='default' "
                          f"(source is {data_cfg.source!r}); pass the tokenizer.json written by `megacore preprocess`")
    if spec is not None:
        try:
            return load_tokenizer(spec)
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise ConfigError(f"data.tokenizer={spec!r}: {e}") from None
    if data_cfg.source == "indexed" and data_cfg.paths:
        return _tokenizer_beside(data_cfg.paths, log)
    return None


def _tokenizer_beside(paths: list, log: Log) -> Optional[Tokenizer]:
    """The ``PREFIX.tokenizer.json`` beside the data (``megacore preprocess --tokenizer bpe``), found
    from any spelling of each path; None when there is none."""
    found: dict[str, tuple[Path, Tokenizer]] = {}
    for p in paths:
        beside = Path(f"{data_prefix(p)}.tokenizer.json")
        if beside.is_file():
            try:
                tok = HFTokenizer(beside)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"data.paths: the tokenizer beside {p} cannot be read: {e}") from None
            found.setdefault(tok.fingerprint(), (beside, tok))
    if len(found) > 1:
        names = [str(b) for b, _ in found.values()]
        raise ConfigError(f"data.paths were preprocessed with different tokenizers ({', '.join(names)}): their ids mean "
                          "different things; preprocess every input with one tokenizer (e.g. --tokenizer "
                          f"{names[0]}) and set data.tokenizer to it")
    if not found:
        return None
    beside, tok = next(iter(found.values()))
    if log:
        log(f"using the tokenizer found beside the data: {beside}")
    return tok


def tokenizer_vocab_size(data_cfg: DataConfig, cache_dir=None, log: Log = None) -> Optional[int]:
    """The vocab size the model needs for this data config (None: keep model.vocab_size)."""
    tok = build_tokenizer(data_cfg, cache_dir=cache_dir, log=log)
    return None if tok is None else tok.vocab_size


def _tokenizer_fingerprint(tok: Tokenizer) -> str:
    return tok.fingerprint()


def build_default_corpus(tokenizer: Tokenizer, cache_dir: Path, log: Log = None) -> IndexedDataset:
    """The embedded corpus tokenized (eod after each document) into cached ``.bin``/``.idx``."""
    documents = default_corpus(cache_dir=cache_dir)
    key = stable_hash(corpus_fingerprint(documents), _tokenizer_fingerprint(tok=tokenizer))
    folder = ensure_dir(cache_dir / "default_corpus")
    prefix = folder / f"corpus-{key}"
    idx = Path(f"{prefix}.idx")
    if not idx.is_file():
        with build_lock(folder / f"corpus-{key}.lock"):
            if not idx.is_file():
                if log:
                    log(f"tokenizing the embedded corpus ({len(documents)} documents) -> {prefix}.bin/.idx")
                with IndexedDatasetBuilder(f"{prefix}.bin", dtype=optimal_dtype(tokenizer.vocab_size)) as builder:
                    for ids in tokenizer.encode_batch(documents):
                        ids.append(tokenizer.eod)
                        builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
                    builder.finalize(idx)
    return IndexedDataset(prefix)


def _split_ids(ds: IndexedDataset, split: str) -> list[np.ndarray]:
    return [np.arange(a, b, dtype=np.int64) for a, b in split_document_ranges(ds.num_documents, split)]


def build_datasets(data_cfg: DataConfig, seq_length: int, vocab_size: int, seed: int,
                   num_samples: tuple[int, int, int], tokenizer: Optional[Tokenizer] = None, cache_dir=None,
                   log: Log = None) -> tuple:
    """(train, valid, test) datasets of ``num_samples`` samples each (None where 0); see module doc."""
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise ValueError(f"num_samples={num_samples} must be three non-negative counts (train, valid, test)")
    cache = _cache(data_cfg, cache_dir)
    flags = dict(eod_mask_loss=data_cfg.eod_mask_loss, reset_position_ids=data_cfg.reset_position_ids,
                 reset_attention_mask=data_cfg.reset_attention_mask)
    if data_cfg.source == "mock":
        return tuple(MockGPTDataset(vocab_size, seq_length, int(n), seed=seed + 1000 * i, **flags) if n else None
                     for i, n in enumerate(num_samples))

    if tokenizer is None and data_cfg.source == "default":
        tokenizer = build_tokenizer(data_cfg, cache_dir=cache, log=log)
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; "
                          f"set model.vocab_size={tokenizer.vocab_size}")
    eod = tokenizer.eod if tokenizer is not None else None
    if eod is None and any(flags.values()):
        raise ConfigError("data.eod_mask_loss / reset_position_ids / reset_attention_mask need the end-of-document id, "
                          "but no tokenizer is known; set data.tokenizer to the tokenizer used by `megacore preprocess`")

    if data_cfg.source == "default":
        corpora = [build_default_corpus(tokenizer, cache, log)]
        weights = None
    elif data_cfg.source == "indexed":
        if not data_cfg.paths:
            raise ConfigError("data.source='indexed' needs data.paths: .bin/.idx prefixes from `megacore preprocess`")
        try:
            corpora = [IndexedDataset(data_prefix(p)) for p in data_cfg.paths]
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.paths: {e}") from None
        for c in corpora:
            problem = vocab_problem(c, vocab_size, cache, log, tokenizer=tokenizer.name if tokenizer else None)
            if problem:
                raise ConfigError(f"data.paths: {problem}")
        weights = data_cfg.weights
    else:
        raise ConfigError(f"data.source={data_cfg.source!r} is not known; use one of ['default', 'mock', 'indexed']")

    splits = [_split_ids(c, data_cfg.split) for c in corpora]
    out = []
    for s, (name, n) in enumerate(zip(SPLIT_NAMES, num_samples)):
        n = int(n)
        if n == 0:
            out.append(None)
            continue
        if weights is None:  # proportional to each corpus' tokens in this split
            w = [float(c.document_lengths[ids[s]].sum()) for c, ids in zip(corpora, splits)]
        else:
            w = [float(x) for x in weights]
        if sum(w) <= 0:
            raise ConfigError(f"the {name} split is empty (data.split={data_cfg.split!r} gives it no documents) but "
                              f"{n} {name} samples are needed; give it a share in data.split or disable evaluation")
        counts = blend_counts(w, n)
        try:
            parts = [GPTDataset(c, ids[s], seq_length, k, seed, eod=eod, cache_dir=cache, name=f"{name}{i}",
                                vocab_size=vocab_size, **flags) if k else None
                     for i, (c, ids, k) in enumerate(zip(corpora, splits, counts))]
        except ValueError as e:  # e.g. a split too small for one sample: a config problem, say so
            raise ConfigError(str(e)) from None
        if len(parts) == 1:
            out.append(parts[0])
        else:
            out.append(BlendedDataset(parts, w, n))
        if log:
            log(f"{name}: {n} samples of {seq_length} tokens from {len(corpora)} dataset(s)")
    return tuple(out)
