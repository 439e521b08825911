"""``megacore generate``: load a model and a tokenizer, continue a prompt.

    megacore generate --model HF_DIR --prompt "def fib(n):" [--max-new-tokens 64]
    megacore generate --model CKPT_DIR --prompt "..." [--config CONFIG.yaml] [--tokenizer tokenizer.json]
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 1] [--dtype bf16] [--device cuda]
    megacore generate --model CKPT_DIR --prompt-ids 5,17,3        (no tokenizer: ids in, ids out)

``--model`` is either

* a Hugging Face model directory (``config.json`` + safetensors; Llama, Mistral, Qwen2, GPT-2),
  loaded with ``megacore.interop.hf.load_pretrained``; or
* a megacore checkpoint (a root with ``latest``, or one ``iter_*`` directory), saved at any
  parallel layout. The model is rebuilt from the ``model_config`` recorded in ``index.json``, or
  from the ``model:`` section of ``--config`` when the checkpoint records none, and read with
  ``megacore.checkpoint.load_checkpoint`` (weights only).

The tokenizer is, in order: ``--tokenizer PATH`` (a ``tokenizer.json``, a folder holding one, or a
sentencepiece ``.model``); a ``tokenizer.json`` in the model directory (or, for a checkpoint made by
``megacore convert --from hf``, in the HF directory it came from); the run's own tokenizer built
from ``--config``'s ``data:`` section (for ``data.source=default`` the cached byte-level BPE of the
embedded corpus, the one training used), or from the ``data`` section of a ``run_config`` that the
checkpoint's ``extra`` records. Without any, pass ``--prompt-ids``.

Decoding (``--decoder``): ``static`` is ``megacore.inference.static`` -- a cache preallocated for the
prompt and ``--max-new-tokens``, the prompt prefilled once, then device-side decode steps captured in
CUDA graphs on a GPU (``--compile`` runs each step through ``torch.compile`` first: tens of seconds
once, fewer kernels per token after); ``loop`` is the KV-cached Python loop of
``megacore.inference.sampling`` (one token per step, and the only one that slides past the model's
positions). ``auto`` (the default) takes ``static`` on a GPU when the prompt and ``--max-new-tokens``
fit in the model's positions, else ``loop``. Greedy tokens are the same either way; a seed's sampled
tokens differ between them (the static path samples on the device). ``--temperature 0`` (the
default) is greedy. Generation stops at ``--max-new-tokens`` or at
an end-of-sequence token (the HF config's ``eos_token_id``, else the tokenizer's end-of-document
id; ``--ignore-eos`` disables this). The prompt and the continuation are printed to stdout.

The model reads at most its maximum positions (``model.seq_length``; a HF model's
``max_position_embeddings`` / ``n_positions``). A longer prompt is refused; a prompt that fits but
would grow past it with ``--max-new-tokens`` gets a warning on stderr: from there on each token is
predicted from the last ``seq_length`` tokens only (a sliding window, see
``megacore.inference.sampling``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from megacore.inference.sampling import check_sampling_args, generate
from megacore.precision.mixed import DTYPES


class GenerateError(ValueError):
    """The model, checkpoint, tokenizer or arguments cannot be used; the message says what to pass."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    kind: str                                   # "hf" or "megacore"
    path: str                                   # the directory actually read (iter_* for checkpoints)
    eos_ids: list = field(default_factory=list)  # from the HF config, when there is one
    tokenizer_dirs: list = field(default_factory=list)  # where a tokenizer.json may sit
    run_data: Optional[dict] = None             # the data: section a training checkpoint recorded


# ------------------------------------------------------------------------------ model
def detect_format(path: str) -> str:
    """``"hf"`` or ``"megacore"`` for a model directory; GenerateError naming what was expected otherwise."""
    p = Path(path)
    if not p.exists():
        raise GenerateError(f"model directory {path!r} does not exist; pass a Hugging Face model directory "
                            "(config.json + *.safetensors) or a megacore checkpoint directory")
    if not p.is_dir():
        raise GenerateError(f"--model {path!r} is a file, not a directory; pass a Hugging Face model directory "
                            "(config.json + *.safetensors) or a megacore checkpoint directory (latest, iter_*/index.json)")
    if (p / "config.json").is_file():
        return "hf"
    if (p / "latest").is_file() or (p / "index.json").is_file() or any(p.glob("iter_*")):
        return "megacore"
    found = sorted(x.name for x in p.iterdir())[:8]
    raise GenerateError(f"{path!r} is neither a Hugging Face model directory (no config.json) nor a megacore "
                        f"checkpoint (no 'latest', index.json or iter_* directory); it holds {found or 'nothing'}")


def _hf_eos_ids(hf_cfg: Optional[dict]) -> list[int]:
    if not hf_cfg:
        return []
    eos = hf_cfg.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def load_hf(path: str, dtype: Optional[torch.dtype], device: torch.device) -> LoadedModel:
    from megacore.interop.hf import load_pretrained

    model = load_pretrained(path, dtype=dtype, device=device)
    return LoadedModel(model, "hf", path, _hf_eos_ids(getattr(model, "hf_config", None)), [path])


def load_megacore(path: str, dtype: Optional[torch.dtype], device: torch.device,
                  config_model: Optional[Any] = None, build=None) -> LoadedModel:
    """Rebuild a one-device GPTModel from a megacore checkpoint (any saved layout).

    ``config_model``: a TransformerConfig (or a function returning one) used only when the
    checkpoint records no ``model_config``. ``build(config, dtype, device)``: makes the model the
    weights are loaded into (default ``megacore.compose.build_inference_model``, one device;
    tensor-parallel serving passes a sharded one, and the load is then collective).
    """
    from megacore.checkpoint import CheckpointError, load_checkpoint, resolve_load_path
    from megacore.checkpoint.directory import INDEX
    from megacore.checkpoint.serialize import dtype_from_name, read_json
    from megacore.config import TransformerConfig
    from megacore.compose import build_inference_model

    try:
        ckpt = resolve_load_path(path, "latest")
    except CheckpointError as e:
        raise GenerateError(str(e)) from None
    if ckpt is None:
        raise GenerateError(f"{path!r} holds no complete checkpoint (its 'latest' file is missing); pass an iter_* "
                            "directory with a COMPLETE marker, or a checkpoint root written by megacore")
    index = read_json(os.path.join(ckpt, INDEX), ckpt)
    saved = index.get("model_config")
    if saved:
        names = {f.name for f in dataclasses.fields(TransformerConfig)}
        config = TransformerConfig(**{k: v for k, v in saved.items() if k in names})
    elif config_model is not None:
        config = config_model() if callable(config_model) else config_model
    else:
        raise GenerateError(f"checkpoint {ckpt} records no model config; pass --config CONFIG.yaml (the run's config, "
                            "whose model: section describes the model)")
    model_keys = sorted(k for k in index.get("tensors", {}) if k.startswith("model/"))
    if not model_keys:
        raise GenerateError(f"checkpoint {ckpt} holds no model weights (no 'model/...' tensors)")
    if dtype is None:
        dtype = dtype_from_name(index["tensors"][model_keys[0]]["dtype"])
    model = (build or build_inference_model)(config, dtype, device)
    try:
        result = load_checkpoint(ckpt, model, load_optimizer=False, load_rng=False)
    except CheckpointError as e:
        raise GenerateError(str(e)) from None
    extra = result.extra if isinstance(result.extra, dict) else {}
    hf_cfg = extra.get("hf_config")
    dirs = [ckpt, path] + ([extra["converted_from"]] if extra.get("converted_from") else [])
    run_cfg = extra.get("run_config")
    run_data = run_cfg.get("data") if isinstance(run_cfg, dict) and isinstance(run_cfg.get("data"), dict) else None
    return LoadedModel(model.eval(), "megacore", ckpt, _hf_eos_ids(hf_cfg), dirs, run_data)


def load_model(path: str, dtype: Optional[torch.dtype] = None, device="cpu", config_model=None) -> LoadedModel:
    """A one-device model (eval mode) from a HF directory or a megacore checkpoint."""
    device = torch.device(device)
    kind = detect_format(path)
    if kind == "hf":
        return load_hf(path, dtype, device)
    return load_megacore(path, dtype, device, config_model)


# ------------------------------------------------------------------------------ tokenizer
def find_tokenizer(loaded: LoadedModel, tokenizer: Optional[str] = None, run_cfg=None):
    """The tokenizer to use, or None (see the module docstring for the order)."""
    from megacore.config import DataConfig, from_dict
    from megacore.data import build_tokenizer, load_tokenizer

    try:
        if tokenizer:
            return load_tokenizer(tokenizer)
        for d in loaded.tokenizer_dirs:
            if (Path(d) / "tokenizer.json").is_file():
                return load_tokenizer(d)
        if run_cfg is not None:
            return build_tokenizer(run_cfg.data)
        if loaded.run_data is not None:
            return build_tokenizer(from_dict(DataConfig, loaded.run_data, prefix="data."))
    except (FileNotFoundError, ValueError, ImportError) as e:  # ConfigError is a ValueError
        raise GenerateError(f"tokenizer: {e}") from None
    return None


# ------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megacore generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory or megacore checkpoint directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids to continue (no tokenizer needed)")
    p.add_argument("--config", help="run config YAML: its model: section (checkpoints without a recorded config) "
                                    "and data: section (the run's tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer.json, a folder holding one, or a sentencepiece .model")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the most likely tokens up to this mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same tokens)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at an end-of-sequence token")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="parameter dtype (default: as stored)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--ids", action="store_true", help="also print the generated token ids")
    p.add_argument("--decoder", choices=("auto", "static", "loop"), default="auto",
                   help="static: preallocated cache + device-side steps (CUDA graphs on a GPU); loop: the KV-cached "
                        "Python loop; auto (default): static on a GPU when prompt + max-new-tokens fit, else loop")
    p.add_argument("--compile", action="store_true", help="with the static decoder: torch.compile the decode step")
    return p


def pick_decoder(choice: str, model, device: torch.device, needed: int) -> str:
    """``static`` or ``loop`` for ``--decoder choice`` (see the module docstring); GenerateError when
    ``static`` was asked for and cannot run."""
    max_positions = getattr(getattr(model, "config", None), "seq_length", None)
    fits = max_positions is None or needed <= max_positions
    can = bool(getattr(model, "supports_kv_cache", False))
    if choice == "static":
        if not can:
            raise GenerateError("--decoder static needs a whole model that decodes with a KV cache; use --decoder loop")
        if not fits:
            raise GenerateError(f"--decoder static: the prompt + --max-new-tokens ({needed} positions) exceed the "
                                f"model's {max_positions}; lower --max-new-tokens or use --decoder loop (it slides)")
        return "static"
    if choice == "loop":
        return "loop"
    return "static" if device.type == "cuda" and can and fits else "loop"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {name} but no CUDA GPU is visible; use --device cpu")
    return dev


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", ",").split(",") if x.strip()]
    except ValueError:
        raise GenerateError(f"--prompt-ids {text!r} is not a comma-separated list of integers") from None
    if not ids:
        raise GenerateError("--prompt-ids is empty; give at least one token id")
    return ids


def check_positions(prompt_len: int, max_new_tokens: int, max_positions: Optional[int], stream=None) -> None:
    """GenerateError when the prompt alone exceeds the model's ``max_positions``; a warning on
    ``stream`` (stderr) when the continuation would (see the module docstring)."""
    if not max_positions:
        return
    if prompt_len > max_positions:
        raise GenerateError(f"the prompt has {prompt_len} tokens but the model reads at most {max_positions} positions "
                            "(seq_length; max_position_embeddings in a HF config.json); shorten the prompt")
    if prompt_len + max_new_tokens > max_positions:
        print(f"warning: the prompt ({prompt_len} tokens) + --max-new-tokens {max_new_tokens} runs past the model's "
              f"maximum of {max_positions} positions; tokens after position {max_positions} are predicted from the "
              f"last {max_positions} tokens only (a sliding window; the model was not trained beyond it). Lower "
              f"--max-new-tokens to {max_positions - prompt_len} to stay inside", file=stream or sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    """Everything ``main`` does except printing; returns prompt/generated ids and text."""
    from megacore.config import ConfigError, load_run_config

    try:
        check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    run_cfg = None
    if args.config:
        try:
            run_cfg = load_run_config(args.config)
        except ConfigError as e:
            raise GenerateError(f"--config: {e}") from None
    device = _device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    config_model = None
    if run_cfg is not None:
        def config_model():
            # Only for a checkpoint without a recorded config. Training sets model.vocab_size to its
            # tokenizer's vocabulary: do the same before building the model.
            tok = find_tokenizer(LoadedModel(None, "megacore", args.model, tokenizer_dirs=[args.model]),
                                 args.tokenizer, run_cfg)
            if tok is not None:
                run_cfg.model.vocab_size = tok.vocab_size
            return run_cfg.model
    loaded = load_model(args.model, dtype, device, config_model)
    vocab = loaded.model.config.vocab_size
    tokenizer = None
    if args.prompt is not None:
        tokenizer = find_tokenizer(loaded, args.tokenizer, run_cfg)
        if tokenizer is None:
            raise GenerateError(f"no tokenizer found for {args.model!r}: pass --tokenizer PATH (tokenizer.json or "
                                "sentencepiece .model), --config CONFIG.yaml of the training run, or --prompt-ids")
        prompt_ids = tokenizer.encode(args.prompt)
        if not prompt_ids:
            raise GenerateError("--prompt encodes to no tokens; give a non-empty prompt")
    else:
        prompt_ids = _parse_ids(args.prompt_ids)
    bad = [i for i in prompt_ids if not 0 <= i < vocab]
    if bad:
        raise GenerateError(f"prompt token ids {bad[:8]} are outside the model's vocabulary [0, {vocab}); "
                            "the tokenizer does not belong to this model")
    check_positions(len(prompt_ids), args.max_new_tokens, getattr(loaded.model.config, "seq_length", None))
    eos = [] if args.ignore_eos else (loaded.eos_ids or ([tokenizer.eod] if tokenizer is not None else []))
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    decoder = pick_decoder(args.decoder, loaded.model, device, len(prompt_ids) + args.max_new_tokens)
    if args.compile and decoder != "static":
        raise GenerateError("--compile applies to the static decoder; add --decoder static (or drop --compile)")
    if decoder == "static":
        from megacore.inference.static import StaticGenerator

        gen = StaticGenerator(loaded.model, 1, max_length=len(prompt_ids) + args.max_new_tokens,
                              use_graphs=device.type == "cuda", compile_step=args.compile)
        out = gen.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, eos_ids=eos)
    else:
        out = generate(loaded.model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, eos_ids=eos)
    new_ids = out[len(prompt_ids):].tolist()
    result = {"prompt_ids": prompt_ids, "new_ids": new_ids, "model": loaded.path, "format": loaded.kind,
              "decoder": decoder}
    if tokenizer is not None:
        result["text"] = tokenizer.decode(prompt_ids + new_ids)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (GenerateError, ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "text" in result:
        print(result["text"])
    if args.ids or "text" not in result:
        print(" ".join(str(i) for i in result["prompt_ids"] + result["new_ids"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
