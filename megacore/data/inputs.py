"""Documents from the inputs ``megacore preprocess`` reads: JSON lines, plain text, parquet, and
Hugging Face ``datasets`` folders.

=====================================  ======================================================
input                                  one document is
=====================================  ======================================================
``*.jsonl`` / ``*.json`` (``.gz``)     the ``text_key`` field of each JSON object (one a line;
                                       blank lines are skipped)
``*.txt`` (``.gz``)                    a run of non-blank lines (blank lines separate documents)
``*.parquet``, or a folder of them     the ``text_key`` column of each row (files in name order;
                                       needs ``pip install pyarrow``)
a ``datasets`` folder                  the ``text_key`` column of each row of a folder written by
                                       ``Dataset.save_to_disk`` (needs ``pip install datasets``);
                                       a ``DatasetDict`` folder is refused: name one split's folder
=====================================  ======================================================

``read_raw`` yields ``(row, payload)``: the 1-based line (jsonl, txt) or row number (parquet,
datasets) and the raw JSON line or the text itself. JSON lines are parsed by ``parse_document`` in
the tokenizer workers (parsing is a good share of the work); the columnar inputs are validated
here (a missing column, a non-string type or a null value is an error naming the file and row) and
read in record batches, so memory stays flat whatever the input size. The same texts give the same
documents in the same order through every input kind.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path
from typing import Iterator

_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as surrogateescape decodes them
BATCH_ROWS = 1024  # rows per record batch read from parquet / arrow


def _open_text(path: Path) -> io.TextIOBase:
    """UTF-8 text with universal newlines; an undecodable byte becomes a lone surrogate (found per
    line by ``read_raw``, so the error can name the line)."""
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="surrogateescape")
    return open(path, encoding="utf-8", errors="surrogateescape")


def _check_utf8(path: Path, no: int, line: str) -> str:
    bad = _NOT_UTF8.search(line)
    if bad is not None:
        byte = ord(bad.group()) - 0xDC00
        raise ValueError(f"{path}:{no}: not UTF-8 text (byte 0x{byte:02x} at character {bad.start() + 1}); "
                         "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8")
    return line


def input_kind(path: Path) -> str:
    """``jsonl``, ``txt``, ``parquet`` (a file or a folder of them) or ``datasets``."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            raise ValueError(f"{str(path)!r} is a Hugging Face DatasetDict with splits {splits}; pass one split's "
                             f"folder, e.g. --input {path / (splits[0] if splits else 'train')}")
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return "datasets"
        if any(path.glob("*.parquet")):
            return "parquet"
        raise ValueError(f"folder {str(path)!r} is neither a Hugging Face datasets folder (Dataset.save_to_disk: "
                         "state.json, dataset_info.json, *.arrow) nor a folder of .parquet files")
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    if path.name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"input {str(path)!r} is none of .jsonl, .txt (optionally .gz), .parquet, a folder of .parquet "
                     "files or a Hugging Face datasets folder; convert it to JSON lines with one "
                     "{\"text\": ...} object per document")


def _read_lines(path: Path, kind: str) -> Iterator[tuple[int, str]]:
    with _open_text(path) as f:
        if kind == "jsonl":
            for no, line in enumerate(f, start=1):
                if line.strip():
                    yield no, _check_utf8(path, no, line)
            return
        para, start = [], 0
        for no, line in enumerate(f, start=1):
            if line.strip():
                _check_utf8(path, no, line)
                if not para:
                    start = no
                para.append(line)
            elif para:
                yield start, "".join(para).rstrip("\n")
                para = []
        if para:
            yield start, "".join(para).rstrip("\n")


def _column_texts(where: str, first_row: int, values: list) -> Iterator[tuple[int, str]]:
    for i, text in enumerate(values):
        if not isinstance(text, str):
            what = "null" if text is None else f"a {type(text).__name__}"
            raise ValueError(f"{where}: row {first_row + i} is {what}, not a string; drop or fill such rows first")
        yield first_row + i, text


def _string_type(type_) -> bool:
    return str(type_) in ("string", "large_string", "string_view")


def _read_parquet(path: Path, key: str) -> Iterator[tuple[int, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading the parquet input {str(path)!r} needs pyarrow: `pip install pyarrow` "
                          "(or `pip install megacore[data]`)") from None
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    row = 1
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except Exception as e:  # pyarrow's errors are terse: name the file and what was expected
            raise ValueError(f"{str(file)!r} is not a readable parquet file ({type(e).__name__}: {e})") from None
        schema = pf.schema_arrow
        if key not in schema.names:
            raise ValueError(f"{str(file)!r} has no column {key!r} (columns: {schema.names[:10]}); "
                             "pass --text-key NAME")
        if not _string_type(schema.field(key).type):
            raise ValueError(f"{str(file)!r}: column {key!r} holds {schema.field(key).type}, not strings; "
                             "pass --text-key naming the text column")
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[key]):
            values = batch.column(0).to_pylist()
            yield from _column_texts(str(file), row, values)
            row += len(values)


def _read_datasets(path: Path, key: str) -> Iterator[tuple[int, str]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading the Hugging Face datasets folder {str(path)!r} needs the datasets package: "
                          "`pip install datasets` (or `pip install megacore[data]`)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise ValueError(f"{str(path)!r} cannot be read by datasets.load_from_disk ({type(e).__name__}: {e})") from None
    if key not in ds.column_names:
        raise ValueError(f"{str(path)!r} has no column {key!r} (columns: {ds.column_names[:10]}); pass --text-key NAME")
    feature = ds.features[key]
    if not _string_type(getattr(feature, "dtype", feature)):
        raise ValueError(f"{str(path)!r}: column {key!r} holds {feature}, not strings; pass --text-key naming "
                         "the text column")
    table = ds.select_columns([key]).with_format("arrow")
    row = 1
    for batch in table.iter(batch_size=BATCH_ROWS):
        values = batch.column(0).to_pylist()
        yield from _column_texts(str(path), row, values)
        row += len(values)


def read_raw(path: Path, kind: str, text_key: str = "text") -> Iterator[tuple[int, str]]:
    """(1-based line or row number, payload): a raw JSON line, or the text of a document."""
    if kind in ("jsonl", "txt"):
        return _read_lines(path, kind)
    if kind == "parquet":
        return _read_parquet(path, text_key)
    if kind == "datasets":
        return _read_datasets(path, text_key)
    raise ValueError(f"unknown input kind {kind!r}")


def parse_document(path: str, kind: str, text_key: str, line_no: int, raw: str) -> str:
    """The text of one payload of ``read_raw`` (JSON lines are parsed here, in the workers)."""
    if kind != "jsonl":
        return raw
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                         f"JSON object such as {{\"{text_key}\": \"...\"}}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    if text_key not in obj:
        raise ValueError(f"{path}:{line_no}: no key {text_key!r} (keys: {sorted(obj)[:10]}); pass --text-key NAME")
    text = obj[text_key]
    if not isinstance(text, str):
        raise ValueError(f"{path}:{line_no}: {text_key!r} is a {type(text).__name__}, not a string")
    return text


def read_documents(path: Path, kind: str, text_key: str = "text") -> Iterator[str]:
    """Every document's text, in order (for training a tokenizer on the input)."""
    for no, raw in read_raw(path, kind, text_key):
        yield parse_document(str(path), kind, text_key, no, raw)
