"""`megacore preprocess` end to end: jsonl/txt(.gz) -> .bin/.idx, worker count never changes the
output, tokens equal the tokenizer's own encoding, errors name the line."""

import gzip
import json

import numpy as np
import pytest

from megacore.data import IndexedDataset, load_tokenizer, train_bpe
from megacore.data.preprocess import main

DOCS = [f"Document {i}: the cache keeps {i * 7} tokens of text, naïvely — and then some more words." * (1 + i % 3)
        for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tok = train_bpe(DOCS, 300)
    tok.save(folder / "tokenizer.json")
    return folder / "tokenizer.json"


def _write_jsonl(path, docs, key="text"):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({key: d, "id": i}) + "\n")
            if i == 5:
                f.write("\n")  # blank lines are skipped


def _expected(tokenizer_path, docs, append_eod):
    tok = load_tokenizer(tokenizer_path)
    return [tok.encode(d) + ([tok.eod] if append_eod else []) for d in docs]


def test_jsonl_two_workers_matches_one_worker_and_the_tokenizer(tmp_path, tokenizer_json, capsys):
    src = tmp_path / "in.jsonl.gz"
    _write_jsonl(src, DOCS, key="body")
    args = ["--input", str(src), "--json-key", "body", "--tokenizer", str(tokenizer_json), "--append-eod",
            "--chunk-size", "3"]
    assert main(args + ["--output-prefix", str(tmp_path / "w2"), "--workers", "2"]) == 0
    assert "docs/s" in capsys.readouterr().err
    assert main(args + ["--output-prefix", str(tmp_path / "w1"), "--workers", "1"]) == 0
    for name in ("w1.bin", "w1.idx"):
        assert (tmp_path / name).read_bytes() == (tmp_path / name.replace("w1", "w2")).read_bytes()
    ds = IndexedDataset(tmp_path / "w2")
    expected = _expected(tokenizer_json, DOCS, append_eod=True)
    assert len(ds) == ds.num_documents == len(DOCS) and ds.dtype == np.uint16
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids


def test_txt_documents_are_blank_line_separated(tmp_path, tokenizer_json):
    src = tmp_path / "in.txt"
    src.write_text("first paragraph\nstill first\n\n\nsecond one\n\nthird\n", encoding="utf-8")
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "t"), "--tokenizer", str(tokenizer_json),
                 "--workers", "2"]) == 0
    ds = IndexedDataset(tmp_path / "t")
    expected = _expected(tokenizer_json, ["first paragraph\nstill first", "second one", "third"], append_eod=False)
    assert [s.tolist() for s in ds[:]] == expected


def test_bpe_on_the_fly_writes_its_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGACORE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, DOCS)
    prefix = tmp_path / "out" / "bpe"  # the output folder is created
    assert main(["--input", str(src), "--output-prefix", str(prefix), "--tokenizer", "bpe", "--vocab-size", "280",
                 "--append-eod"]) == 0
    tok_path = tmp_path / "out" / "bpe.tokenizer.json"
    assert tok_path.is_file()
    ds = IndexedDataset(prefix)
    tok = load_tokenizer(tok_path)
    assert tok.vocab_size <= 280
    assert [s.tolist() for s in ds[:3]] == _expected(tok_path, DOCS[:3], append_eod=True)
    assert tok.decode(ds[0][:-1]) == DOCS[0]
    assert list((tmp_path / "cache" / "tokenizers").glob("bpe-280-*.json"))


def test_errors_name_the_problem(tmp_path, tokenizer_json, capsys):
    base = ["--output-prefix", str(tmp_path / "o"), "--tokenizer", str(tokenizer_json)]
    assert main(["--input", str(tmp_path / "missing.jsonl")] + base) == 2
    assert "does not exist" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n', encoding="utf-8")
    for workers in ("1", "2"):
        assert main(["--input", str(bad), "--workers", workers] + base) == 2
        err = capsys.readouterr().err
        assert f"{bad}:3: not valid JSON" in err, err
    assert not list(tmp_path.glob("o.*")), "no partial output on error"

    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"content": "x"}\n', encoding="utf-8")
    assert main(["--input", str(nokey)] + base) == 2
    assert "nokey.jsonl:1: no key 'text'" in capsys.readouterr().err

    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    assert main(["--input", str(other)] + base) == 2
    assert "is none of .jsonl, .txt" in capsys.readouterr().err
    assert main(["--input", str(bad)]) == 2  # argparse: missing required options
