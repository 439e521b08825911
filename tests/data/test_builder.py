"""build_tokenizer / build_datasets for the three data sources, with the on-disk cache."""

import time

import numpy as np
import pytest

from megacore.config import ConfigError, DataConfig
from megacore.data import (BlendedDataset, GPTDataset, IndexedDatasetBuilder, MockGPTDataset, build_datasets,
                           build_tokenizer, default_corpus, tokenizer_vocab_size, train_bpe)
from megacore.data import builder as builder_mod
from megacore.data import tokenizer as tok_mod
from megacore.data.cache import default_cache_dir


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MEGACORE_CACHE", raising=False)
    assert str(default_cache_dir(None)).endswith(".cache/megacore")
    monkeypatch.setenv("MEGACORE_CACHE", str(tmp_path / "env"))
    assert default_cache_dir(None) == tmp_path / "env"
    assert default_cache_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"


def test_default_source_trains_once_then_loads_from_cache(tmp_path, monkeypatch):
    cfg = DataConfig(source="default", cache_dir=str(tmp_path), tokenizer_vocab_size=4096)
    start = time.time()
    tok = build_tokenizer(cfg)
    first_s = time.time() - start
    assert first_s < 20.0, f"corpus + 4k BPE took {first_s:.1f}s"
    assert tok.vocab_size == 4096
    train, valid, test = build_datasets(cfg, seq_length=64, vocab_size=tok.vocab_size, seed=3,
                                        num_samples=(200, 40, 0), tokenizer=tok)
    assert isinstance(train, GPTDataset) and len(train) == 200 and len(valid) == 40 and test is None
    corpus = default_corpus()
    for d in (0, 100, len(corpus) - 1):  # the cached .bin holds each document + eod, decoding back exactly
        doc = train.documents.get_document(d)
        assert doc[-1] == tok.eod and tok.decode(doc[:-1]) == corpus[d]
    assert train.documents.num_documents == len(corpus)
    # valid documents are disjoint from train documents (split by document)
    assert not set(train.document_ids.tolist()) & set(valid.document_ids.tolist())

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt instead of loading the cache")

    monkeypatch.setattr(tok_mod, "_train_bpe_json", fail)
    monkeypatch.setattr(builder_mod, "IndexedDatasetBuilder", fail)
    monkeypatch.setattr("megacore.data.gpt_dataset.build_sample_index", fail)
    start = time.time()
    tok2 = build_tokenizer(cfg)
    train2, valid2, _ = build_datasets(cfg, seq_length=64, vocab_size=tok2.vocab_size, seed=3,
                                       num_samples=(200, 40, 0), tokenizer=tok2)
    assert time.time() - start < 5.0
    for i in (0, 57, 199):
        np.testing.assert_array_equal(train[i]["tokens"], train2[i]["tokens"])
    assert tokenizer_vocab_size(cfg) == 4096


def test_mock_source():
    cfg = DataConfig(source="mock")
    assert build_tokenizer(cfg) is None
    train, valid, test = build_datasets(cfg, seq_length=16, vocab_size=50, seed=0, num_samples=(10, 4, 0))
    assert isinstance(train, MockGPTDataset) and len(train) == 10 and len(valid) == 4 and test is None
    assert not np.array_equal(train[0]["tokens"], valid[0]["tokens"])  # splits differ
    assert train[3]["tokens"].max() < 50


def _write_prefix(path, tag, n_docs=40, seed=0, eod=None):
    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(f"{path}.bin", dtype=np.uint16)
    for _ in range(n_docs):
        doc = tag * 100 + rng.integers(1, 100, size=int(rng.integers(10, 80)))
        if eod is not None:
            doc = np.append(doc, eod)
        b.add_document(doc, [len(doc)])
    b.finalize(f"{path}.idx")
    return str(path)


def test_indexed_source_blends_by_weight(tmp_path):
    a = _write_prefix(tmp_path / "a", tag=1, seed=1)
    b = _write_prefix(tmp_path / "b", tag=2, seed=2)
    cfg = DataConfig(source="indexed", paths=[a, b], weights=[3, 1], split="80,20,0", cache_dir=str(tmp_path / "c"))
    assert build_tokenizer(cfg) is None  # none named and none beside the data
    train, valid, test = build_datasets(cfg, seq_length=8, vocab_size=300, seed=0, num_samples=(2000, 100, 0))
    assert isinstance(train, BlendedDataset) and test is None
    sources = np.array([train[i]["tokens"][0] // 100 for i in range(len(train))])
    np.testing.assert_allclose(np.bincount(sources, minlength=3)[1:] / len(train), [0.75, 0.25], atol=0.01)
    again = build_datasets(cfg, seq_length=8, vocab_size=300, seed=0, num_samples=(2000, 100, 0))[0]
    for i in range(0, 2000, 111):
        np.testing.assert_array_equal(train[i]["tokens"], again[i]["tokens"])

    with pytest.raises(ConfigError, match="end-of-document id"):
        build_datasets(DataConfig(source="indexed", paths=[a], eod_mask_loss=True, cache_dir=str(tmp_path / "c")),
                       8, 300, 0, (10, 0, 0))
    with pytest.raises(ConfigError, match="valid split is empty"):
        build_datasets(DataConfig(source="indexed", paths=[a], split="1,0,0", cache_dir=str(tmp_path / "c")),
                       8, 300, 0, (10, 5, 0))
    with pytest.raises(ConfigError, match="does not exist"):
        build_datasets(DataConfig(source="indexed", paths=[str(tmp_path / "zzz")]), 8, 300, 0, (10, 0, 0))


def test_indexed_source_finds_tokenizer_beside_the_data(tmp_path):
    tok = train_bpe(["some words to train on, " * 20, "and a few more words"], 280)
    prefix = _write_prefix(tmp_path / "d", tag=1, eod=tok.eod)
    tok.save(f"{prefix}.tokenizer.json")
    cfg = DataConfig(source="indexed", paths=[prefix], eod_mask_loss=True, cache_dir=str(tmp_path / "c"))
    found = build_tokenizer(cfg)
    assert found is not None and found.eod == tok.eod and found.vocab_size == tok.vocab_size
    train, _, _ = build_datasets(cfg, 16, found.vocab_size, 0, (20, 0, 0), tokenizer=found)
    s = train[0]
    np.testing.assert_array_equal(s["loss_mask"], (s["tokens"] != tok.eod).astype(np.float32))
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        build_datasets(cfg, 16, 100, 0, (20, 0, 0), tokenizer=found)
