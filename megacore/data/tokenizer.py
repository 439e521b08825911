"""One tokenizer interface, four backends.

Every tokenizer has ``encode(text) -> list[int]`` (no BOS/EOS added), ``encode_batch(texts)``,
``decode(ids) -> str``, ``vocab_size`` (ids are in ``[0, vocab_size)``), ``eod`` (the
end-of-document id appended between documents) and ``fingerprint()`` (a content hash for cache keys).

- ``HFTokenizer(path)``: a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library).
- ``SentencePieceTokenizer(path)``: a sentencepiece ``.model`` (needs ``pip install sentencepiece``).
- ``TiktokenTokenizer``: a tiktoken encoding (needs ``pip install tiktoken``), either named
  (``tiktoken:cl100k_base``; tiktoken downloads its rank file once into ``$TIKTOKEN_CACHE_DIR``) or
  a local BPE rank file ``*.tiktoken`` (lines ``<base64 token> <rank>``) with the cl100k
  pre-tokenizer pattern and ``<|endoftext|>`` as the id after the last rank. Special-token
  strings inside a text are encoded as ordinary text (tiktoken's ``encode_ordinary``).
- ``train_bpe(texts, vocab_size, cache_dir)``: a byte-level BPE trained on the given texts with
  ``tokenizers``, cached as ``<cache_dir>/tokenizers/bpe-<hash>.json`` keyed by a hash of
  (texts, vocab size), so a second run loads it in milliseconds.

``load_tokenizer(spec)`` picks the backend from the spec: ``tiktoken:NAME`` or ``*.tiktoken`` ->
tiktoken, ``*.model`` -> sentencepiece, ``*.json`` or a folder holding ``tokenizer.json`` -> HF.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from megacore.data.cache import atomic_write_bytes, build_lock, ensure_dir, stable_hash

EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens of common tokenizer families, tried in order when no eod is named.
_EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]", "<|eot_id|>")
# Bump when the training recipe changes, so old cache entries are not reused.
_BPE_RECIPE = "bytelevel-bpe-v1"


class Tokenizer:
    """Interface; see the module docstring."""

    name: str = "tokenizer"

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eod(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hash of what decides the ids (for cache keys): same fingerprint, same encoding."""
        return stable_hash(type(self).__name__, repr(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def _eos_from_config(folder: Path) -> Optional[str]:
    """The ``eos_token`` named by a Hugging Face ``tokenizer_config.json`` beside the tokenizer."""
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        eos = json.loads(cfg.read_text()).get("eos_token")
    except (ValueError, OSError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (from a ``tokenizer.json`` file or an object).

    ``eod_token`` names the end-of-document token; by default the ``eos_token`` of a
    ``tokenizer_config.json`` next to the file, else the first of ``<|endoftext|>``,
    ``<|end_of_text|>``, ``</s>``, ``<eos>``, ... that the vocabulary has.
    """

    def __init__(self, source: Union[str, Path, "object"], eod_token: Optional[str] = None):
        from tokenizers import Tokenizer as _HF

        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.is_dir():
                path = path / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist; pass a Hugging Face tokenizer.json "
                                        "(or the folder holding it), a sentencepiece .model, or 'bpe'")
            try:
                self._tok = _HF.from_file(str(path))
            except Exception as e:  # the Rust error is terse; say what file and what was expected
                raise ValueError(f"{str(path)!r} is not a valid Hugging Face tokenizer.json: {e}") from None
            self.name = str(path)
            eod_token = eod_token or _eos_from_config(path.parent)
        else:
            self._tok = source
            self.name = "in-memory"
        vocab = self._tok.get_vocab(with_added_tokens=True)
        candidates = (eod_token,) if eod_token else _EOD_CANDIDATES
        found = [c for c in candidates if c in vocab]
        if not found:
            raise ValueError(f"tokenizer {self.name!r} has none of the end-of-document tokens {list(candidates)}; "
                             "pass eod_token= naming the token that separates documents")
        self.eod_token = found[0]
        self._eod = int(vocab[self.eod_token])
        self._vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self._tok.to_str()

    def fingerprint(self) -> str:
        return stable_hash("hf", self.to_json(), self._eod)

    def save(self, path: Union[str, Path]) -> None:
        atomic_write_bytes(Path(path), self.to_json().encode("utf-8"))


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model``; ``eod`` is its end-of-sentence id."""

    def __init__(self, path: Union[str, Path]):
        try:
            import sentencepiece
        except ImportError:
            raise ImportError(f"loading the sentencepiece model {str(path)!r} needs the sentencepiece package: "
                              "`pip install sentencepiece` (or convert it to a Hugging Face tokenizer.json)") from None
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model {str(path)!r} does not exist")
        self.name = str(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self._eod = int(self._sp.eos_id())
        if self._eod < 0:
            raise ValueError(f"sentencepiece model {str(path)!r} defines no end-of-sentence token; "
                             "retrain it with --eos_id set")

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def eod(self) -> int:
        return self._eod

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        return stable_hash("sp", Path(self.name).read_bytes(), self._eod)


# The pre-tokenizer of OpenAI's cl100k_base, used for a local ``.tiktoken`` rank file.
TIKTOKEN_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
                    r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
TIKTOKEN_PREFIX = "tiktoken:"


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE rank file: one ``<base64 token> <rank>`` per line (read directly, not through
    tiktoken's loader, which caches by path and would serve a stale copy of an edited file)."""
    import base64
    import binascii

    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{str(path)}:{no}: not a tiktoken rank line '<base64 token> <rank>': "
                                 f"{line[:60]!r}") from None
    if not ranks:
        raise ValueError(f"tiktoken rank file {str(path)!r} is empty")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding: ``tiktoken:NAME`` (a named encoding) or a local ``.tiktoken`` rank file.

    ``eod`` is ``<|endoftext|>`` (the encoding's ``eot_token``); a rank file gets it as the id after
    its last rank. ``vocab_size`` is the largest id + 1 (tiktoken's ``n_vocab``).
    """

    def __init__(self, spec: Union[str, Path]):
        try:
            import tiktoken
        except ImportError:
            raise ImportError(f"the tokenizer {str(spec)!r} needs the tiktoken package: `pip install tiktoken` "
                              "(or `pip install megacore[data]`)") from None
        spec = str(spec)
        if spec.startswith(TIKTOKEN_PREFIX):
            name = spec[len(TIKTOKEN_PREFIX):]
            if name not in tiktoken.list_encoding_names():
                raise ValueError(f"tiktoken has no encoding {name!r}; known: {tiktoken.list_encoding_names()}")
            try:
                self._enc = tiktoken.get_encoding(name)
            except Exception as e:  # network errors differ by transport; the fix is the same
                raise ValueError(f"cannot load the tiktoken encoding {name!r} ({type(e).__name__}: {e}); it is "
                                 "downloaded on first use: run once with network access (it is then cached in "
                                 "$TIKTOKEN_CACHE_DIR), or pass a local .tiktoken rank file") from None
            self._source = ("named", name)
        else:
            path = Path(spec).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"tiktoken rank file {spec!r} does not exist")
            ranks = read_tiktoken_ranks(path)
            self._enc = tiktoken.Encoding(name=path.stem, pat_str=TIKTOKEN_PATTERN, mergeable_ranks=ranks,
                                          special_tokens={EOD_TOKEN: max(ranks.values()) + 1})
            self._source = ("file", path)
        self.name = spec
        self._eod = int(self._enc.eot_token)

    @property
    def vocab_size(self) -> int:
        return int(self._enc.n_vocab)

    @property
    def eod(self) -> int:
        return self._eod

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        kind, what = self._source
        payload = what.read_bytes() if kind == "file" else what
        return stable_hash("tiktoken", kind, payload, self._enc._pat_str, self._eod, self.vocab_size)


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* [0-9]+\r?$")


def _is_tiktoken_file(path: Path) -> bool:
    """Whether ``path`` reads as a tiktoken rank file (first line ``<base64> <rank>``): Llama 3
    ships one named ``tokenizer.model``, the suffix of sentencepiece's binary protobuf models."""
    with open(path, "rb") as f:
        first = f.readline(256)
    return bool(_TIKTOKEN_LINE.match(first.rstrip(b"\n")))


def load_tokenizer(spec: Union[str, Path]) -> Tokenizer:
    """A tokenizer from a spec (see the module doc): ``tiktoken:NAME``, ``*.tiktoken``, ``*.model``,
    ``*.json`` or a folder holding ``tokenizer.json``."""
    if str(spec).startswith(TIKTOKEN_PREFIX):
        return TiktokenTokenizer(str(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer(path)
    if path.suffix == ".model":
        if path.is_file() and _is_tiktoken_file(path):
            raise ValueError(f"{str(spec)!r} is a tiktoken BPE rank file, not a sentencepiece model (Llama 3 ships "
                             "one as tokenizer.model): use the tokenizer.json of the same model folder, or rename "
                             "it to .tiktoken (its special tokens are then not those of the model)")
        return SentencePieceTokenizer(path)
    if path.suffix == ".json" or path.is_dir():
        return HFTokenizer(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {str(spec)!r} does not exist; give a tokenizer.json, a folder holding one, "
                                "a sentencepiece .model, a .tiktoken rank file, tiktoken:NAME, or 'bpe' to train one")
    raise ValueError(f"tokenizer {str(spec)!r} is not a .json (Hugging Face), a .model (sentencepiece) or a "
                     ".tiktoken file, nor tiktoken:NAME")


def bpe_cache_path(texts: Sequence[str], vocab_size: int, cache_dir: Union[str, Path]) -> Path:
    key = stable_hash(_BPE_RECIPE, vocab_size, len(texts), *texts)
    return Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}.json"


def _train_bpe_json(texts: Sequence[str], vocab_size: int) -> str:
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes: any text round-trips
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok.to_str()


def train_bpe(texts: Sequence[str], vocab_size: int, cache_dir: Optional[Union[str, Path]] = None,
              log=None) -> HFTokenizer:
    """Byte-level BPE with ``<|endoftext|>`` (id 0) as eod, trained on ``texts`` (or loaded from cache).

    The trained vocabulary can be smaller than ``vocab_size`` when the texts are short; use the
    returned tokenizer's ``vocab_size``. ``cache_dir`` None trains without caching.
    """
    if vocab_size < 257:
        raise ValueError(f"BPE vocab_size={vocab_size} is too small: it needs the 256 bytes plus the "
                         "end-of-document token; use e.g. 4096")
    if not texts:
        raise ValueError("cannot train a BPE tokenizer on an empty list of texts")
    from tokenizers import Tokenizer as _HF

    if cache_dir is None:
        return HFTokenizer(_HF.from_str(_train_bpe_json(texts, vocab_size)), eod_token=EOD_TOKEN)
    path = bpe_cache_path(texts, vocab_size, cache_dir)
    if not path.is_file():
        ensure_dir(path.parent)
        with build_lock(path.with_suffix(".lock")):
            if not path.is_file():  # another process may have built it while we waited
                if log:
                    log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {len(texts)} texts -> {path}")
                atomic_write_bytes(path, _train_bpe_json(texts, vocab_size).encode("utf-8"))
    return HFTokenizer(path, eod_token=EOD_TOKEN)
