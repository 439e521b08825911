"""``data.paths`` spelled as a prefix, its ``.bin`` or its ``.idx`` is the same dataset with the same
tokenizer; a token id outside ``model.vocab_size`` stops the run at its start, naming the file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megacore.config import ConfigError, DataConfig
from megacore.data import IndexedDataset, IndexedDatasetBuilder, build_datasets, build_tokenizer, data_prefix
from megacore.data import vocab_check
from megacore.data.preprocess import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = [f"Paragraph {i}: the tokens of the corpus, {i * 3} of them, and words words words." * (1 + i % 4)
        for i in range(60)]


def _jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    """``megacore preprocess --tokenizer bpe``: the .bin/.idx plus the tokenizer and meta beside them.
    The output prefix is given as ``docs.bin``: it names ``docs``."""
    root = tmp_path_factory.mktemp("paths")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGACORE_CACHE", str(root / "cache"))
        assert main(["--input", str(_jsonl(root / "in.jsonl", DOCS)), "--output-prefix", str(root / "docs.bin"),
                     "--tokenizer", "bpe", "--vocab-size", "300", "--append-eod"]) == 0
    assert sorted(p.name for p in root.glob("docs*")) == ["docs.bin", "docs.idx", "docs.meta.json",
                                                          "docs.tokenizer.json"]
    return root


def test_data_prefix_spellings():
    assert data_prefix("a/b") == data_prefix("a/b.bin") == data_prefix("a/b.idx") == "a/b"
    assert data_prefix("a/b.bin.bin") == "a/b.bin" and data_prefix("a/b.jsonl") == "a/b.jsonl"


def test_every_spelling_gives_the_same_batches_and_finds_the_tokenizer(bpe_data, tmp_path):
    prefix = str(bpe_data / "docs")
    raw = np.fromfile(prefix + ".bin", dtype=IndexedDataset(prefix).dtype)  # the reference: the file's ids
    firsts = []
    for spelling in (prefix, prefix + ".bin", prefix + ".idx"):
        cfg = DataConfig(source="indexed", paths=[spelling], split="1,0,0").validate()
        tok = build_tokenizer(cfg)
        assert tok is not None and tok.name == prefix + ".tokenizer.json", spelling
        train, _, _ = build_datasets(cfg, seq_length=32, vocab_size=tok.vocab_size, seed=3, num_samples=(16, 0, 0),
                                     tokenizer=tok, cache_dir=tmp_path / "cache")
        batch = [train[i] for i in range(16)]
        firsts.append(np.stack([s["tokens"] for s in batch]))
        for s in batch:  # every window is a stretch of the file's tokens... of some shuffled document order
            assert set(s["tokens"].tolist()) <= set(raw.tolist())
    assert all(np.array_equal(firsts[0], f) for f in firsts[1:])
    # A blended list may mix spellings; it is the same file twice, with one tokenizer.
    cfg = DataConfig(source="indexed", paths=[prefix + ".bin", prefix], weights=[1, 1], split="1,0,0").validate()
    assert build_tokenizer(cfg).name == prefix + ".tokenizer.json"


def test_data_preprocessed_with_different_tokenizers_is_refused(bpe_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MEGACORE_CACHE", str(tmp_path / "cache"))
    other = [d.upper() + " ZEBRA QUARTZ" for d in DOCS]
    assert main(["--input", str(_jsonl(tmp_path / "o.jsonl", other)), "--output-prefix", str(tmp_path / "other"),
                 "--tokenizer", "bpe", "--vocab-size", "300"]) == 0
    cfg = DataConfig(source="indexed", paths=[str(bpe_data / "docs.bin"), str(tmp_path / "other.idx")])
    with pytest.raises(ConfigError, match="preprocessed with different tokenizers"):
        build_tokenizer(cfg)


def _vocab_error(prefix, vocab_size, cache):
    cfg = DataConfig(source="indexed", paths=[prefix + ".bin"], split="1,0,0").validate()
    with pytest.raises(ConfigError) as e:
        build_datasets(cfg, seq_length=32, vocab_size=vocab_size, seed=3, num_samples=(4, 0, 0), cache_dir=cache)
    return str(e.value)


def test_out_of_vocab_ids_are_caught_from_the_sidecar_or_a_cached_scan(bpe_data, tmp_path, monkeypatch):
    prefix = str(tmp_path / "docs")
    for suffix in (".bin", ".idx", ".meta.json"):
        (tmp_path / f"docs{suffix}").write_bytes((bpe_data / f"docs{suffix}").read_bytes())
    want = int(np.fromfile(prefix + ".bin", dtype=IndexedDataset(prefix).dtype).max())
    assert json.loads((tmp_path / "docs.meta.json").read_text())["max_token_id"] == want

    scans = []
    real_scan = vocab_check.scan_token_range
    monkeypatch.setattr(vocab_check, "scan_token_range", lambda ds: scans.append(ds) or real_scan(ds))
    msg = _vocab_error(prefix, want, tmp_path / "cache")  # ids must be < vocab_size: want itself is out
    assert f"{prefix}.bin holds token id {want}, outside model.vocab_size={want}" in msg
    assert f"model.vocab_size >= {want + 1}" in msg and "preprocess" in msg and "docs.tokenizer.json" in msg
    assert not scans  # the sidecar answered

    os.remove(tmp_path / "docs.meta.json")  # as Megatron-LM writes them: no sidecar
    msg = _vocab_error(prefix, 100, tmp_path / "cache")
    assert f"holds token id {want}, outside model.vocab_size=100" in msg and len(scans) == 1
    _vocab_error(prefix, 100, tmp_path / "cache")
    assert len(scans) == 1  # the scan's result is cached

    cfg = DataConfig(source="indexed", paths=[prefix], split="1,0,0").validate()
    train, _, _ = build_datasets(cfg, seq_length=32, vocab_size=want + 1, seed=3, num_samples=(4, 0, 0),
                                 cache_dir=tmp_path / "cache")
    assert train[0]["tokens"].max() <= want

    # A sidecar that no longer describes the files (rebuilt by another tool) is not trusted.
    stale = json.loads((bpe_data / "docs.meta.json").read_text())
    stale.update(max_token_id=5, num_tokens=stale["num_tokens"] + 1)
    (tmp_path / "docs.meta.json").write_text(json.dumps(stale))
    assert vocab_check.token_range(IndexedDataset(prefix))[1] == want


def test_scan_in_chunks_and_negative_ids(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(-3, 1000, size=1001).astype(np.int32)
    with IndexedDatasetBuilder(tmp_path / "s.bin", dtype=np.int32) as b:
        for part in np.array_split(tokens, 9):
            b.add_document(part, [part.size])
        b.finalize(tmp_path / "s.idx")
    ds = IndexedDataset(tmp_path / "s")
    assert vocab_check.scan_token_range(ds, chunk=7) == (int(tokens.min()), int(tokens.max()))
    assert "negative token id" in vocab_check.vocab_problem(ds, 2000)


def test_out_of_vocab_stops_megacore_train_at_start(bpe_data, tmp_path):
    """The user's path: data made with a 300-token vocabulary, a model of 64, no tokenizer named or
    beside the data (the .json was copied away): one line naming the file, exit status 2."""
    for suffix in (".bin", ".idx"):
        (tmp_path / f"docs{suffix}").write_bytes((bpe_data / f"docs{suffix}").read_bytes())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, MEGACORE_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-m", "megacore", "train", "configs/tiny_cpu.yaml", "data.source=indexed",
                          f"data.paths=[{tmp_path / 'docs.bin'}]", "model.vocab_size=64", f"log.dir={tmp_path / 'log'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert f"{tmp_path / 'docs.bin'} holds token id" in out.stderr and "model.vocab_size=64" in out.stderr
