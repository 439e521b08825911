"""``megacore preprocess``: text -> Megatron ``.bin``/``.idx`` (one sequence per document).

    megacore preprocess --input INPUT [--text-key text] --output-prefix out/data \\
        --tokenizer (tokenizer.json | sp.model | rank.tiktoken | tiktoken:NAME | bpe) [--vocab-size 4096] \\
        [--workers 4] [--append-eod]

INPUT is a ``.jsonl`` file (one JSON object per line; the document is ``obj[text_key]``; blank
lines are skipped), a ``.txt`` file (documents separated by one or more blank lines), either
optionally gzipped, in UTF-8 (a byte that is not is an error naming the file and line); a
``.parquet`` file or a folder of them (the ``text_key`` column, one row a document; needs
pyarrow); or a Hugging Face ``datasets`` folder written by ``Dataset.save_to_disk`` (needs
datasets). The same texts give byte-identical ``.bin``/``.idx`` through every input kind
(``megacore.data.inputs``). An input without a single non-empty document is an error, and nothing
is written. ``--output-prefix`` may be spelled ``out/data``, ``out/data.bin`` or ``out/data.idx``.
``--tokenizer bpe`` trains a byte-level BPE on the input first (cached by content hash under the
megacore cache directory) and writes it to ``PREFIX.tokenizer.json`` so training can use it
(``data.source=indexed`` finds it beside the data automatically). Beside the data goes
``PREFIX.meta.json``: the smallest and largest token id and the tokenizer, which a training run
checks against ``model.vocab_size`` before its first step (``megacore.data.vocab_check``).

Tokenization runs on ``--workers`` processes: a multiprocessing pool maps over chunks of documents
and results are consumed in input order, so the output does not depend on the worker count. Unlike
``Pool.imap`` (whose feeder thread reads the whole input ahead), at most ``4·workers`` chunks are in
flight, and a chunk closes early once it holds ``CHUNK_CHARS`` characters, so memory stays flat on
inputs of any size. A long document is tokenized in pieces of about ``PIECE_CHARS`` characters
(``encode_long``), cut only before a space that starts a word, where the pre-tokenizers of byte-level
BPE (GPT-2/Llama-3 style), tiktoken and SentencePiece split anyway: the ids equal those of one call,
while the tokenizer's per-token bookkeeping (~150 bytes a character) stays bounded: a 22 MB line
needs tens of MB beyond the line itself instead of gigabytes.
A progress line (documents, tokens, documents/s) goes to stderr every few seconds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from megacore.data.cache import default_cache_dir
from megacore.data.indexed_dataset import IndexedDatasetBuilder, data_prefix, optimal_dtype
from megacore.data.inputs import input_kind, parse_document, read_documents, read_raw
from megacore.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer, train_bpe
from megacore.data.vocab_check import write_meta

Chunk = list[tuple[int, str]]  # (line number, raw line or text)
PIECE_CHARS = 1 << 18   # a longer document is tokenized in pieces of about this many characters
CHUNK_CHARS = 1 << 23   # a chunk of documents sent to a worker closes once it holds this many characters


def ordered_map(pool, fn, items: Iterator, window: int) -> Iterator:
    """``map(fn, items)`` on ``pool``, in order, with at most ``window`` tasks in flight."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _chunks(items: Iterator[tuple[int, str]], size: int, max_chars: int = CHUNK_CHARS) -> Iterator[Chunk]:
    """Chunks of ``size`` documents, closed early once they hold ``max_chars`` characters."""
    chunk: Chunk = []
    chars = 0
    for item in items:
        chunk.append(item)
        chars += len(item[1])
        if len(chunk) == size or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


_WORD_START = re.compile(r"(?<=\S) (?=\S)")  # a single space between two non-space characters


def split_for_encoding(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of at most about ``piece_chars`` characters, each cut just before
    a single space between two non-space characters (where a word starts: every byte-level BPE and
    SentencePiece pre-tokenizer splits there too, so encoding the pieces one by one gives the ids of
    the whole). A stretch of ``piece_chars`` without such a space is cut where it ends."""
    start, n = 0, len(text)
    while n - start > piece_chars:
        limit = start + piece_chars
        cut = None
        for m in _WORD_START.finditer(text, start + piece_chars // 2, limit):
            cut = m.start()
        if cut is None or cut <= start:
            cut = limit
        yield text[start:cut]
        start = cut
    yield text[start:]


def encode_long(tok: Tokenizer, text: str, piece_chars: int = PIECE_CHARS) -> list[int]:
    """``tok.encode(text)`` for a text of any length, piece by piece (``split_for_encoding``)."""
    if len(text) <= piece_chars:
        return tok.encode(text)
    ids: list[int] = []
    for piece in split_for_encoding(text, piece_chars):
        ids.extend(tok.encode(piece))
    return ids


# ------------------------------------------------------------------------------ worker side
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, path: str, kind: str, text_key: str, append_eod: bool, threads: bool) -> None:
    if not threads:  # one process per core already; the tokenizers thread pool would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tok=load_tokenizer(tokenizer_path), path=path, kind=kind, text_key=text_key, append_eod=append_eod)


def _encode_chunk(chunk: Chunk) -> list[np.ndarray]:
    w = _WORKER
    texts = [parse_document(w["path"], w["kind"], w["text_key"], no, raw) for no, raw in chunk]
    short = [t for t in texts if len(t) <= PIECE_CHARS]
    encoded = iter(w["tok"].encode_batch(short) if short else [])
    out = []
    for text in texts:
        ids = next(encoded) if len(text) <= PIECE_CHARS else encode_long(w["tok"], text)
        if w["append_eod"]:
            ids.append(w["tok"].eod)
        out.append(np.asarray(ids, dtype=np.int64))
    return out


# ------------------------------------------------------------------------------ main side
def _resolve_tokenizer(args, path: Path, kind: str, prefix: str) -> tuple[Tokenizer, str]:
    """(tokenizer, the spec the workers load it from)."""
    if args.tokenizer != "bpe":
        return load_tokenizer(args.tokenizer), args.tokenizer
    texts = list(read_documents(path, kind, args.text_key))
    if not any(texts):
        raise ValueError(f"input {str(path)!r} holds no non-empty document, so there is nothing to train a tokenizer "
                         "on or to write; check the file and --text-key")
    print(f"training a byte-level BPE (vocab {args.vocab_size}) on {len(texts)} documents", file=sys.stderr)
    tok = train_bpe(texts, args.vocab_size, cache_dir=default_cache_dir(None))
    out = Path(f"{prefix}.tokenizer.json")
    tok.save(out)
    return HFTokenizer(out), str(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megacore preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="a .jsonl or .txt file (optionally .gz), a .parquet file or a folder of them, or a "
                        "Hugging Face datasets folder (Dataset.save_to_disk)")
    p.add_argument("--text-key", "--json-key", dest="text_key", default="text",
                   help="JSON key or column holding the document text (default: text)")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json (PREFIX.bin or PREFIX.idx name the same)")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer.json (or its folder), a sentencepiece .model, a .tiktoken rank file, "
                        "tiktoken:NAME (e.g. tiktoken:cl100k_base), or 'bpe' to train one on the input")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the BPE trained with --tokenizer bpe")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    p.add_argument("--chunk-size", type=int, default=64, help="documents per task sent to a worker")
    return p


def run(args: argparse.Namespace) -> dict:
    path = Path(args.input)
    if not path.exists():
        raise FileNotFoundError(f"input {str(path)!r} does not exist")
    if args.workers < 1 or args.chunk_size < 1:
        raise ValueError(f"--workers ({args.workers}) and --chunk-size ({args.chunk_size}) must be >= 1")
    kind = input_kind(path)
    prefix = data_prefix(args.output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tok, tok_path = _resolve_tokenizer(args, path, kind, prefix)
    init_args = (tok_path, str(path), kind, args.text_key, args.append_eod, args.workers == 1)
    chunks = _chunks(read_raw(path, kind, args.text_key), args.chunk_size)
    docs = tokens = skipped = 0
    lo, hi = None, None
    start = last_report = time.time()
    with IndexedDatasetBuilder(f"{prefix}.bin", dtype=optimal_dtype(tok.vocab_size)) as builder:
        pool: Optional[mp.pool.Pool] = None
        if args.workers > 1:
            # spawn, not fork: the parent may already run the tokenizers thread pool (BPE training)
            pool = mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=init_args)
            results = ordered_map(pool, _encode_chunk, chunks, window=4 * args.workers)
        else:
            _init_worker(*init_args)
            results = map(_encode_chunk, chunks)
        try:
            for encoded in results:
                for ids in encoded:
                    if ids.size == 0:
                        skipped += 1  # an empty document would only add an empty sequence
                        continue
                    builder.add_document(ids, [ids.size])
                    docs += 1
                    tokens += int(ids.size)
                    a, b = int(ids.min()), int(ids.max())
                    lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
                now = time.time()
                if now - last_report >= 2.0:
                    last_report = now
                    print(f"preprocess: {docs} docs, {tokens} tokens, {docs / (now - start):.0f} docs/s",
                          file=sys.stderr, flush=True)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        if docs == 0:
            raise ValueError(f"input {str(path)!r} holds no non-empty document ({skipped} empty skipped); nothing "
                             "was written: check the input and --text-key")
        builder.finalize(f"{prefix}.idx")
    write_meta(prefix, lo, hi, tok)
    elapsed = max(time.time() - start, 1e-9)
    print(f"preprocess: done, {docs} docs ({skipped} empty skipped), {tokens} tokens, {docs / elapsed:.0f} docs/s "
          f"-> {prefix}.bin/.idx", file=sys.stderr, flush=True)
    return {"documents": docs, "tokens": tokens, "skipped": skipped, "tokenizer": tok_path, "prefix": prefix,
            "max_token_id": hi}


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error (or --help)
        return int(e.code or 0)
    try:
        run(args)
    except (FileNotFoundError, ValueError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # a bad input or option, like the other commands' user errors
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
