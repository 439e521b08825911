"""`megacore preprocess` reads parquet files, folders of them and Hugging Face `datasets` folders:
the same texts give byte-identical .bin/.idx to the equivalent JSON lines (the reference), and bad
columnar input is one clear error naming the file, the column or the row."""

import json
import sys

import pytest

from megacore.data import IndexedDataset, load_tokenizer, train_bpe
from megacore.data.preprocess import main

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

# Unicode, an empty document (just the eod with --append-eod), newlines inside a document.
LINES = "lines\nand more "
DOCS = [f"Row {i}: naïve café — {LINES * (i % 3)}words {i * 13}." for i in range(23)]
DOCS[7] = ""


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([d for d in DOCS if d] * 2, 300).save(path)
    return path


def _jsonl(path, docs, key="body"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, key: d}) + "\n")


def _preprocess(src, prefix, tokenizer, *extra):
    assert main(["--input", str(src), "--output-prefix", str(prefix), "--tokenizer", str(tokenizer),
                 "--append-eod", "--text-key", "body", "--chunk-size", "4", *extra]) == 0


def _same_files(a, b):
    for suffix in (".bin", ".idx"):
        assert (a.parent / (a.name + suffix)).read_bytes() == (b.parent / (b.name + suffix)).read_bytes(), suffix


def test_parquet_and_datasets_give_the_bytes_of_jsonl(tmp_path, tokenizer_json):
    datasets = pytest.importorskip("datasets")
    _jsonl(tmp_path / "in.jsonl", DOCS)
    _preprocess(tmp_path / "in.jsonl", tmp_path / "ref", tokenizer_json)

    table = pa.table({"id": list(range(len(DOCS))), "body": DOCS})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=5)  # several row groups
    _preprocess(tmp_path / "in.parquet", tmp_path / "pq", tokenizer_json)
    _same_files(tmp_path / "ref", tmp_path / "pq")

    shards = tmp_path / "shards"  # a folder of parquet files, read in name order
    shards.mkdir()
    pq.write_table(table.slice(0, 10), shards / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(10), shards / "train-00001-of-00002.parquet")
    _preprocess(shards, tmp_path / "pqdir", tokenizer_json, "--workers", "2")
    _same_files(tmp_path / "ref", tmp_path / "pqdir")

    datasets.Dataset.from_dict({"id": list(range(len(DOCS))), "body": DOCS}).save_to_disk(str(tmp_path / "hfds"))
    _preprocess(tmp_path / "hfds", tmp_path / "hf", tokenizer_json)
    _same_files(tmp_path / "ref", tmp_path / "hf")

    # And the reference itself holds the tokenizer's ids of each document.
    tok = load_tokenizer(tokenizer_json)
    ds = IndexedDataset(tmp_path / "ref")
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(d) + [tok.eod] for d in DOCS]


def test_columnar_errors_name_the_file_column_and_row(tmp_path, tokenizer_json, capsys):
    datasets = pytest.importorskip("datasets")
    base = ["--output-prefix", str(tmp_path / "o"), "--tokenizer", str(tokenizer_json)]

    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "nulls.parquet")
    assert main(["--input", str(tmp_path / "nulls.parquet"), *base]) == 2
    assert "nulls.parquet: row 2 is null, not a string" in capsys.readouterr().err

    assert main(["--input", str(tmp_path / "nulls.parquet"), "--text-key", "content", *base]) == 2
    err = capsys.readouterr().err
    assert "no column 'content'" in err and "['text']" in err and "--text-key" in err

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    assert main(["--input", str(tmp_path / "ints.parquet"), *base]) == 2
    assert "column 'text' holds int64, not strings" in capsys.readouterr().err

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]}),
                               "test": datasets.Dataset.from_dict({"text": ["y"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert main(["--input", str(tmp_path / "dd"), *base]) == 2
    err = capsys.readouterr().err
    assert "DatasetDict with splits ['test', 'train']" in err and str(tmp_path / "dd" / "test") in err

    (tmp_path / "empty").mkdir()
    assert main(["--input", str(tmp_path / "empty"), *base]) == 2
    assert "neither a Hugging Face datasets folder" in capsys.readouterr().err
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "o.idx").exists()


@pytest.mark.parametrize("module,package", [("pyarrow.parquet", "pyarrow"), ("datasets", "datasets")])
def test_missing_optional_dependency_names_the_package(tmp_path, tokenizer_json, capsys, monkeypatch, module, package):
    if module == "datasets":
        pytest.importorskip("datasets")
        src = tmp_path / "hfds"
        import datasets

        datasets.Dataset.from_dict({"text": ["x"]}).save_to_disk(str(src))
    else:
        src = tmp_path / "in.parquet"
        pq.write_table(pa.table({"text": ["x"]}), src)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer", str(tokenizer_json)]) == 2
    assert f"pip install {package}" in capsys.readouterr().err
