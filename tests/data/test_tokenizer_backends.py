"""Every tokenizer backend behind ``load_tokenizer`` encodes and decodes as its own library does
(tokenizers, sentencepiece, tiktoken: the references), and ``megacore preprocess`` with each
writes exactly the library's ids."""

import base64
import json

import pytest

from megacore.data import IndexedDataset, load_tokenizer, train_bpe
from megacore.data.preprocess import main
from megacore.data.tokenizer import EOD_TOKEN, TIKTOKEN_PATTERN

SAMPLES = ["The thing is that the other one isn't here.", "naïve café — Größe 🚀 and 12345 numbers",
           "def f(x):\n    return x + 1\n\n", "  leading spaces and trailing  ", ""]
TRAIN = [s for s in SAMPLES if s] * 4 + ["the quick brown fox jumps over the lazy dog"] * 8


def _sentencepiece_model(folder):
    spm = pytest.importorskip("sentencepiece")
    prefix = folder / "sp"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TRAIN), model_prefix=str(prefix), vocab_size=400,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True,
                                   hard_vocab_limit=False, minloglevel=2)
    return prefix.with_suffix(".model")


def _rank_file(path):
    """A byte-level BPE rank file: the 256 bytes, then merges in rank order (each the concatenation
    of two earlier tokens, as tiktoken's files are)."""
    ranks = {bytes([i]): i for i in range(256)}
    for merged in [b"th", b"he", b" t", b"in", b"the", b" the", b"ing", b"er", b" a", b"on", b"re", b" th"]:
        ranks.setdefault(merged, len(ranks))
    path.write_text("".join(f"{base64.b64encode(k).decode()} {v}\n" for k, v in ranks.items()))
    return ranks


def _check_against(tok, encode, decode, eod, vocab_size):
    for text in SAMPLES:
        assert tok.encode(text) == encode(text), text
        assert tok.decode(encode(text)) == decode(encode(text))
    assert tok.encode_batch(SAMPLES) == [encode(t) for t in SAMPLES]
    assert tok.eod == eod and tok.vocab_size == vocab_size


def test_hf_tokenizer_json_matches_tokenizers(tmp_path):
    from tokenizers import Tokenizer

    path = tmp_path / "tokenizer.json"
    train_bpe(TRAIN, 300).save(path)
    ref = Tokenizer.from_file(str(path))
    tok = load_tokenizer(path)
    _check_against(tok, lambda t: ref.encode(t, add_special_tokens=False).ids,
                   lambda ids: ref.decode(ids, skip_special_tokens=False), ref.token_to_id(EOD_TOKEN),
                   ref.get_vocab_size(with_added_tokens=True))
    assert load_tokenizer(tmp_path).fingerprint() == tok.fingerprint()  # the folder spelling


def test_sentencepiece_matches_sentencepiece(tmp_path):
    import sentencepiece as spm

    model = _sentencepiece_model(tmp_path)
    ref = spm.SentencePieceProcessor(model_file=str(model))
    tok = load_tokenizer(model)
    _check_against(tok, lambda t: list(ref.encode(t)), ref.decode, ref.eos_id(), ref.get_piece_size())
    assert tok.decode(tok.encode(SAMPLES[1])) == SAMPLES[1]  # byte fallback: nothing is lost


def test_tiktoken_rank_file_matches_tiktoken(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = _rank_file(tmp_path / "tiny.tiktoken")
    ref = tiktoken.Encoding("tiny", pat_str=TIKTOKEN_PATTERN, mergeable_ranks=ranks,
                            special_tokens={EOD_TOKEN: len(ranks)})
    tok = load_tokenizer(tmp_path / "tiny.tiktoken")
    _check_against(tok, ref.encode_ordinary, ref.decode, len(ranks), ref.n_vocab)
    assert tok.vocab_size == len(ranks) + 1
    assert tok.encode("the") == [ranks[b"the"]] and tok.encode(" the") == [ranks[b" the"]]
    # A special token's text inside a document is text, never the end-of-document id.
    assert tok.eod not in tok.encode(f"a {EOD_TOKEN} b")


def test_named_tiktoken_encoding(tmp_path, monkeypatch):
    """``tiktoken:NAME`` goes through tiktoken's registry (registered here from the local rank file:
    the real encodings are downloaded on first use, and tests have no network)."""
    tiktoken = pytest.importorskip("tiktoken")
    import tiktoken.registry as registry

    ranks = _rank_file(tmp_path / "tiny.tiktoken")
    tiktoken.list_encoding_names()  # load the plugins' constructors, then add ours
    spec = dict(name="megacore_tiny", pat_str=TIKTOKEN_PATTERN, mergeable_ranks=ranks,
                special_tokens={EOD_TOKEN: len(ranks)})
    monkeypatch.setitem(registry.ENCODING_CONSTRUCTORS, "megacore_tiny", lambda: spec)

    def offline():
        raise ConnectionError("no network")

    monkeypatch.setitem(registry.ENCODING_CONSTRUCTORS, "megacore_offline", offline)
    monkeypatch.setattr(registry, "ENCODINGS", {})
    ref = tiktoken.Encoding(**spec)
    tok = load_tokenizer("tiktoken:megacore_tiny")
    _check_against(tok, ref.encode_ordinary, ref.decode, len(ranks), ref.n_vocab)
    with pytest.raises(ValueError, match="no encoding 'nope'"):
        load_tokenizer("tiktoken:nope")
    with pytest.raises(ValueError, match="downloaded on first use"):
        load_tokenizer("tiktoken:megacore_offline")


def test_backend_errors_are_clear(tmp_path, monkeypatch):
    import sys

    ranks_file = tmp_path / "tokenizer.model"  # Llama 3 ships its tiktoken ranks under this name
    _rank_file(ranks_file)
    with pytest.raises(ValueError, match="is a tiktoken BPE rank file, not a sentencepiece model"):
        load_tokenizer(ranks_file)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("dGhl 0\nnot base64 at all!\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2: not a tiktoken rank line"):
        load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="tiktoken rank file"):
        load_tokenizer(tmp_path / "absent.tiktoken")
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(ImportError, match="pip install tiktoken"):
        load_tokenizer("tiktoken:cl100k_base")


@pytest.mark.parametrize("backend", ["hf", "sentencepiece", "tiktoken"])
def test_preprocess_writes_the_library_ids(tmp_path, backend):
    if backend == "hf":
        spec = tmp_path / "tokenizer.json"
        train_bpe(TRAIN, 300).save(spec)
    elif backend == "sentencepiece":
        spec = _sentencepiece_model(tmp_path)
    else:
        pytest.importorskip("tiktoken")
        spec = tmp_path / "tiny.tiktoken"
        _rank_file(spec)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLES), encoding="utf-8")
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "out"), "--tokenizer", str(spec),
                 "--append-eod", "--workers", "2", "--chunk-size", "2"]) == 0
    tok = load_tokenizer(spec)
    ds = IndexedDataset(tmp_path / "out")
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eod] for t in SAMPLES]
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["tokenizer"] == str(spec) and meta["tokenizer_vocab_size"] == tok.vocab_size
    assert meta["max_token_id"] == max(max(ds[i]) for i in range(len(ds)))
