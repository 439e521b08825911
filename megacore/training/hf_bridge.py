"""Hugging Face at both ends of ``megacore train``: ``model.from_hf`` in, ``checkpoint.save_hf`` out.

``HFBridge(cfg, log)`` is made by the trainer before anything reads the config:

- ``model.from_hf=DIR``: the ``model`` section becomes the one ``DIR/config.json`` maps to
  (``megacore.interop.hf_finetune.resolve_model``: a ``model.*`` key that contradicts it is a
  ConfigError naming the key and both values; runtime keys such as dropout, the attention backend
  or a shorter ``seq_length`` may be set on top). The composition root fills the weights from
  ``DIR``'s safetensors at whatever parallel layout the run has (``hf_finetune.load_weights``); a
  resumed run then loads its checkpoint over them, so a checkpoint always wins.
- The tokenizer: when ``DIR`` holds a ``tokenizer.json`` (else a sentencepiece ``tokenizer.model``)
  and ``data.tokenizer`` is unset, it becomes ``data.tokenizer`` (``data.source=default`` tokenizes
  the embedded corpus with it; ``indexed`` data must be what ``megacore preprocess --tokenizer
  DIR`` wrote). A ``data.tokenizer``, or a ``PREFIX.tokenizer.json`` beside indexed data, whose
  vocabulary differs from ``DIR``'s is a ConfigError: the pretrained embeddings belong to
  ``DIR``'s token ids, and other ids would train the model on garbage without any error.
  ``data.tokenizer=bpe`` (a fresh BPE) is refused for the same reason, and so is the embedded
  corpus when ``DIR`` has no tokenizer.
- ``checkpoint_extra()``: what every checkpoint of the run records about its source (``hf_family``,
  ``hf_config``, ``converted_from``), so ``megacore convert --from megacore`` and ``megacore
  generate`` know the family, the token ids and where the tokenizer is.
- ``export(chunks, step, extra)`` (``checkpoint.save_hf=OUT``; at the end of training, and after
  every checkpoint save with ``checkpoint.save_hf_at_each_save``): every rank writes its shards as
  a model-only checkpoint into ``.OUT.export`` beside ``OUT`` (collective: any TP/PP/EP/DP layout),
  rank 0 reads it back into one model and writes ``OUT`` with ``megacore convert``'s export
  (``megacore_to_hf``: config.json with the source's token ids and other keys, generation config,
  tokenizer files, safetensors; atomically), and the temporary checkpoint is removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from megacore.config import ConfigError, RunConfig

Log = Callable[[str], None]


class HFBridge:
    def __init__(self, cfg: RunConfig, log: Log = lambda msg: None):
        self.cfg, self.log = cfg, log
        self.source: Optional[str] = cfg.model.from_hf
        self.hf_config: Optional[dict] = None
        self.family: Optional[str] = None
        self._solo = None  # a process group of rank 0 alone, for reading an export back
        self.exported_step: Optional[int] = None
        if self.source is not None:
            self._resolve()
        if cfg.checkpoint.save_hf is not None:
            self._check_export()

    # ------------------------------------------------------------------------------- from_hf
    def _resolve(self) -> None:
        from megacore.interop.hf import adapter_of, read_hf_config
        from megacore.interop.hf_finetune import resolve_model

        cfg, src = self.cfg, self.source
        if cfg.vision.enabled:
            raise ConfigError(f"model.from_hf={src!r} with vision.enabled=true: model.from_hf loads causal language "
                              "models; a LLaVA run builds its language model from the model.* keys")
        explicit = getattr(cfg, "explicit_keys", None)  # recorded by the config loader
        seq_set = ("model.seq_length" in explicit) if explicit is not None else \
            cfg.model.seq_length != type(cfg.model)().seq_length
        try:
            cfg.model = resolve_model(cfg.model, src, explicit)
            self.hf_config = read_hf_config(src)
            self.family = adapter_of(self.hf_config).name
        except ConfigError:
            raise
        except (OSError, ValueError) as e:  # a missing or damaged file: one line naming it
            raise ConfigError(f"model.from_hf={src!r}: {e}") from None
        m = cfg.model
        self.log(f"model.from_hf: {self.family} model of {m.num_layers} layers, hidden {m.hidden_size}, vocab "
                 f"{m.vocab_size} from {src}" + ("" if seq_set else f"; model.seq_length={m.seq_length} is its "
                                                  "max positions (set model.seq_length to train on shorter ones)"))
        self._resolve_tokenizer()

    def _resolve_tokenizer(self) -> None:
        data, src = self.cfg.data, Path(self.source)
        if data.source == "mock":
            return
        theirs = next((p for p in (src / "tokenizer.json", src / "tokenizer.model") if p.is_file()), None)
        if theirs is None:
            if data.tokenizer == "bpe" or (data.source == "default" and data.tokenizer is None):
                raise ConfigError(f"model.from_hf={self.source!r} holds no tokenizer (tokenizer.json or tokenizer.model), "
                                  "and a new BPE vocabulary would not be the one the model was trained on; set "
                                  "data.tokenizer to the model's tokenizer")
            return  # indexed data or a named tokenizer: trusted as the model's
        if data.tokenizer is None:
            beside = Path(f"{data.paths[0]}.tokenizer.json") if data.source == "indexed" and data.paths else None
            if beside is not None and beside.is_file() and not _same_vocabulary(beside, theirs):
                raise ConfigError(f"data.paths[0]={data.paths[0]!r} was tokenized with {beside}, whose vocabulary is "
                                  f"not the one of model.from_hf={self.source!r}; preprocess the text again with "
                                  f"`megacore preprocess --tokenizer {self.source} ...`")
            data.tokenizer = self.source if theirs.suffix == ".json" else str(theirs)
            self.log(f"data.tokenizer: the tokenizer of model.from_hf ({theirs})")
        elif data.tokenizer == "bpe":
            raise ConfigError(f"data.tokenizer='bpe' trains a new vocabulary, but model.from_hf={self.source!r} was "
                              f"trained on the ids of its own {theirs.name}; unset data.tokenizer to use it")
        elif not _same_vocabulary(Path(data.tokenizer), theirs):
            raise ConfigError(f"data.tokenizer={data.tokenizer!r} has another vocabulary than the {theirs.name} of "
                              f"model.from_hf={self.source!r}, whose token ids the model was trained on; unset "
                              "data.tokenizer (the data must then be preprocessed with that tokenizer)")
        size = _tokenizer_size(theirs)
        if size > self.cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer of model.from_hf={self.source!r} has {size} ids but its config.json has "
                              f"vocab_size={self.cfg.model.vocab_size}; the directory's tokenizer and model disagree")

    def checkpoint_extra(self) -> dict:
        """The source, for every checkpoint of the run (keys ``megacore convert`` and ``generate`` read)."""
        if self.source is None:
            return {}
        return {"hf_family": self.family, "hf_config": self.hf_config,
                "converted_from": os.path.abspath(self.source)}

    # ------------------------------------------------------------------------------- save_hf
    def _check_export(self) -> None:
        cfg = self.cfg
        if cfg.parallel.fsdp:
            raise ConfigError("checkpoint.save_hf exports through a checkpoint of the run, which FSDP2 runs do not "
                              "write yet; train with parallel.distributed_optimizer=true instead of parallel.fsdp")
        if cfg.vision.enabled:
            raise ConfigError("checkpoint.save_hf exports causal language models; a LLaVA run is exported with "
                              "megacore.interop.hf_llava.save_pretrained_llava")
        if cfg.checkpoint.save_hf_at_each_save and not (cfg.checkpoint.dir and cfg.checkpoint.interval):
            raise ConfigError("checkpoint.save_hf_at_each_save=true but no checkpoint is saved during the run; set "
                              "checkpoint.dir and checkpoint.interval, or export only at the end")
        out = Path(cfg.checkpoint.save_hf)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"checkpoint.save_hf={str(out)!r} is a file; name a directory to export into")

    @property
    def export_each_save(self) -> bool:
        return self.cfg.checkpoint.save_hf is not None and self.cfg.checkpoint.save_hf_at_each_save

    def export(self, chunks, step: int, extra: dict) -> None:
        """Write ``checkpoint.save_hf`` from the model of step ``step`` (collective, see the module doc);
        nothing when that step is exported already (a save at the last step, then the end)."""
        if step == self.exported_step:
            return
        from megacore.checkpoint import comm
        from megacore.checkpoint.convert import megacore_to_hf
        from megacore.checkpoint.save import save_checkpoint

        out = Path(self.cfg.checkpoint.save_hf).absolute()
        staging = out.parent / f".{out.name}.export"
        rank0 = comm.rank() == 0
        error = None
        if rank0:
            try:
                shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted export
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                error = f"cannot prepare {staging}: {e}"
        comm.raise_if_any(error, f"exporting step {step} to {out}")
        handle = save_checkpoint(str(staging), step, chunks, extra=extra)
        if self._solo is None and comm.world_size() > 1:  # reading back is collective: rank 0 alone
            import torch.distributed as dist

            self._solo = dist.new_group([0])
        if rank0:
            try:
                megacore_to_hf(handle.path, str(out), group=self._solo)
            except Exception as e:  # every rank must hear of it (below), whatever it was
                error = f"{type(e).__name__}: {e}"
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        comm.raise_if_any(error, f"exporting step {step} to {out}")
        self.exported_step = step
        self.log(f"exported step {step} as a Hugging Face model: {out}")


def _vocabulary(path: Path):
    """A comparable description of a tokenizer's vocabulary: the token -> id map of a tokenizer.json,
    else (vocab size, end-of-document id) through megacore's loader."""
    path = path / "tokenizer.json" if path.is_dir() and (path / "tokenizer.json").is_file() else path
    try:
        if path.suffix == ".json":
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
        from megacore.data import load_tokenizer

        tok = load_tokenizer(path)
        return tok.vocab_size, tok.eod
    except Exception as e:  # the Rust tokenizers error is terse: name the file
        raise ConfigError(f"tokenizer {str(path)!r} cannot be read: {e}") from None


def _same_vocabulary(ours: Path, theirs: Path) -> bool:
    a, b = _vocabulary(ours), _vocabulary(theirs)
    if isinstance(a, dict) != isinstance(b, dict):  # a tokenizer.json against a sentencepiece model
        from megacore.data import load_tokenizer

        try:
            ta, tb = load_tokenizer(ours), load_tokenizer(theirs)
        except (ImportError, OSError, ValueError) as e:
            raise ConfigError(f"tokenizer {str(ours)!r} cannot be compared with {str(theirs)!r}: {e}") from None
        return (ta.vocab_size, ta.eod) == (tb.vocab_size, tb.eod)
    return a == b


def _tokenizer_size(path: Path) -> int:
    vocab = _vocabulary(path)
    return max(vocab.values()) + 1 if isinstance(vocab, dict) else vocab[0]
