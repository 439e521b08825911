"""Bad or unusual data input: ``megacore preprocess`` refuses an input without documents, names the
file and line of bytes that are not UTF-8, tokenizes a very long line in pieces (same ids, bounded
memory); a truncated cached sample index is rebuilt instead of read."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from megacore.data import IndexedDataset, train_bpe
from megacore.data.preprocess import encode_long, main, split_for_encoding

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = "the quick brown fox jumps over the lazy dog naïvely 12345 don't it's  spaced\ttab — ,.;".split(" ")


def _text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([_text(500, seed) for seed in range(10)], 300).save(path)
    return path


def _args(src, out, tokenizer):
    return ["--input", str(src), "--output-prefix", str(out), "--tokenizer", str(tokenizer)]


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.txt", "\n\n  \n"),
                                          ("empty_docs.jsonl", '{"text": ""}\n{"text": ""}\n')])
def test_input_without_documents_is_refused_and_writes_nothing(tmp_path, tokenizer_json, capsys, name, content):
    src = tmp_path / name
    src.write_text(content, encoding="utf-8")
    for tok in (str(tokenizer_json), "bpe"):
        assert main(_args(src, tmp_path / "out" / "o", tok)) == 2
        err = capsys.readouterr().err
        assert f"{src}" in err and "no non-empty document" in err, err
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path, tokenizer_json, capsys):
    for name, lines in (("latin1.jsonl", [b'{"text": "fine"}', b'{"text": "caf\xe9"}']),
                        ("latin1.txt", [b"fine", b"", b"more", b"caf\xe9 au lait"])):
        src = tmp_path / name
        src.write_bytes(b"\n".join(lines) + b"\n")
        assert main(_args(src, tmp_path / "o", tokenizer_json)) == 2
        err = capsys.readouterr().err
        line = len(lines)
        assert f"{src}:{line}: not UTF-8 text (byte 0xe9" in err, err
        assert not list(tmp_path.glob("o.*"))


def test_long_text_is_encoded_in_pieces_with_the_ids_of_one_call(tokenizer_json):
    from megacore.data import load_tokenizer

    tok = load_tokenizer(tokenizer_json)
    text = _text(6000, seed=3) + " " + "x" * 1500 + " end"  # ends with a stretch that has no space
    pieces = list(split_for_encoding(text, 1000))
    assert "".join(pieces) == text and len(pieces) > 20 and max(map(len, pieces)) <= 1000
    cut_inside_x = [p for p in pieces[:-1] if p.endswith("x") and pieces[pieces.index(p) + 1].startswith("x")]
    assert cut_inside_x, "a stretch without a space is cut at the limit"
    words_only = _text(6000, seed=3)
    assert encode_long(tok, words_only, 1000) == tok.encode(words_only)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak memory from /proc")
def test_a_long_line_is_preprocessed_in_bounded_memory(tmp_path, tokenizer_json):
    """A 2.3 MB one-line document: the peak memory of `megacore preprocess` stays far below what one
    tokenizer call over the line needs (~150 bytes per character: ~400 MB more), and the document
    holds the tokenizer's ids of the whole text."""
    from megacore.data import load_tokenizer

    text = _text(450_000, seed=5)
    assert len(text) > 2_200_000
    src = tmp_path / "long.jsonl"
    src.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "short"}) + "\n", encoding="utf-8")
    # VmHWM: this process's peak resident memory (ru_maxrss would include the forking pytest's).
    prog = ("import sys; from megacore.data.preprocess import main; code = main(sys.argv[1:]); "
            "print([int(line.split()[1]) // 1024 for line in open('/proc/self/status') if line.startswith('VmHWM')][0]);"
            " sys.exit(code)")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", prog, *_args(src, tmp_path / "o", tokenizer_json)], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    peak_mb = int(out.stdout.split()[-1])
    assert peak_mb < 250, peak_mb
    ds = IndexedDataset(str(tmp_path / "o"))
    assert len(ds) == 2
    tok = load_tokenizer(tokenizer_json)
    head = text[:20_000].rsplit(" ", 1)[0]
    assert list(ds[0][:len(tok.encode(head))]) == tok.encode(head)  # the pieces add up to the whole's ids
    assert list(ds[1]) == tok.encode("short")


def test_truncated_cached_sample_index_is_rebuilt(tmp_path):
    from megacore.data.gpt_dataset import GPTDataset

    class Docs:
        document_lengths = np.full(40, 50, dtype=np.int64)

        def get_document(self, i, offset=0, length=None):
            doc = (np.arange(50, dtype=np.int64) + i) % 97
            return doc[offset:] if length is None else doc[offset:offset + length]

    def build():
        return GPTDataset(Docs(), np.arange(40), seq_length=16, num_samples=300, seed=7, cache_dir=tmp_path)

    fresh = build()
    want = [fresh.window(i).tolist() for i in range(300)]
    cached = sorted((tmp_path / "gpt_indices").glob("*-sample_index.npy"))
    assert len(cached) == 1
    data = cached[0].read_bytes()
    cached[0].write_bytes(data[: len(data) // 2])  # a crash of a copy, a full disk ...
    with pytest.warns(UserWarning, match="truncated or damaged; rebuilding"):
        again = build()
    assert [again.window(i).tolist() for i in range(300)] == want
    assert cached[0].read_bytes() == data
