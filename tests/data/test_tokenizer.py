"""Tokenizer backends, the cached on-the-fly BPE, and the embedded corpus."""

import importlib.util
import json
import subprocess
import sys
import time

import pytest
from tokenizers import Tokenizer as HFRaw
from tokenizers import models, pre_tokenizers

from megacore.data import HFTokenizer, default_corpus, load_tokenizer, train_bpe
from megacore.data import corpus as corpus_mod
from megacore.data import tokenizer as tok_mod

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Größe, naïve café — ünïcödé and emoji 🚀.",
         "def f(x):\n    return x + 1\n", "Lorem ipsum dolor sit amet, consectetur adipiscing elit."] * 5


def test_bpe_round_trips_and_has_eod(tmp_path):
    tok = train_bpe(TEXTS, 300, cache_dir=tmp_path)
    assert 257 <= tok.vocab_size <= 300
    assert tok.decode([tok.eod]) == "<|endoftext|>"
    for text in TEXTS[:4] + ["unseen words: xylophone Ωmega"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(TEXTS[:3]) == [tok.encode(t) for t in TEXTS[:3]]


def test_bpe_cache_is_reused(tmp_path, monkeypatch):
    first = train_bpe(TEXTS, 320, cache_dir=tmp_path)
    cached = list((tmp_path / "tokenizers").glob("bpe-320-*.json"))
    assert len(cached) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(tok_mod, "_train_bpe_json", no_training)
    start = time.time()
    second = train_bpe(TEXTS, 320, cache_dir=tmp_path)
    assert time.time() - start < 1.0
    assert second.to_json() == first.to_json()
    for key in ([TEXTS, 321], [TEXTS[:-1], 320]):  # the key covers the texts and the vocab size
        with pytest.raises(AssertionError, match="trained again"):
            train_bpe(key[0], key[1], cache_dir=tmp_path)


def test_bpe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="too small"):
        train_bpe(TEXTS, 100)
    with pytest.raises(ValueError, match="empty"):
        train_bpe([], 1000)


def _word_level_json(path):
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3, "<|endoftext|>": 4}
    raw = HFRaw(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(path))
    return raw


def test_hf_tokenizer_json_matches_tokenizers_library(tmp_path):
    raw = _word_level_json(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world foo") == raw.encode("hello world foo", add_special_tokens=False).ids == [1, 2, 0]
    assert tok.vocab_size == 5 and tok.eod == 4  # <|endoftext|> is preferred without a config
    # a tokenizer_config.json beside it names the eos token; loading the folder works too
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert load_tokenizer(tmp_path).eod == 3


def test_tokenizer_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nothing-here")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    vocab = {"[UNK]": 0, "a": 1}
    HFRaw(models.WordLevel(vocab, unk_token="[UNK]")).save(str(tmp_path / "noeos.json"))
    with pytest.raises(ValueError, match="eod_token"):
        load_tokenizer(tmp_path / "noeos.json")


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is not None, reason="sentencepiece is installed")
def test_sentencepiece_missing_says_how_to_install(tmp_path):
    (tmp_path / "sp.model").write_bytes(b"\x00")
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        load_tokenizer(tmp_path / "sp.model")


def test_default_corpus_is_real_deterministic_and_fast(tmp_path):
    docs = default_corpus()
    total = sum(len(d) for d in docs)
    assert 300_000 < total < 5_000_000 and len(docs) > 500
    assert sum(d.count(" the ") for d in docs) > 5000  # English prose, not code
    assert all(isinstance(d, str) and d for d in docs)
    assert default_corpus(cache_dir=tmp_path) == docs  # written to the disk cache ...
    assert len(list((tmp_path / "corpus").glob("stdlib-*.json"))) == 1
    assert default_corpus(cache_dir=tmp_path) == docs  # ... and read back
    # a fresh interpreter builds the same documents, in a few seconds
    code = ("import time; t = time.time(); from megacore.data.corpus import default_corpus, corpus_fingerprint; "
            "d = default_corpus(); print(corpus_fingerprint(d), time.time() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == corpus_mod.corpus_fingerprint(docs)
    assert float(out[1]) < 10.0
