"""Hugging Face import/export for ``GPTModel``: Llama, Mistral, Qwen2 and GPT-2 checkpoints.

    model = load_pretrained("path/to/hf_model")            # config.json + safetensors -> GPTModel
    save_pretrained(model, "path/to/out")                   # -> config.json + model.safetensors

Loading builds the model on the meta device (no random init is spent) and fills every parameter
from the checkpoint: q/k/v are fused into ``linear_qkv`` in the grouped per-KV-group layout,
gate/up into ``linear_fc1`` as [gate; up], GPT-2's Conv1D weights are transposed, and the vocab
rows are zero-padded to ``config.padded_vocab_size``. Saving inverts each step exactly, so a
load/save round trip reproduces every tensor bit for bit. See docs/hf-interop.md for the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from megacore.config import ConfigError, TransformerConfig
from megacore.interop.hf_config import (  # noqa: F401  (re-exported API)
    FAMILIES,
    SUPPORTED,
    check_exportable,
    config_from_hf,
    config_to_hf,
    detect_family,
    infer_family,
)
from megacore.interop.hf_io import CheckpointReader, atomic_directory, write_safetensors
from megacore.interop.hf_weights import BASE_PREFIX, Rule, is_ignorable, weight_rules
from megacore.layers.rotary import RotaryEmbedding
from megacore.models.gpt import GPTModel

PathLike = Union[str, Path]

__all__ = ["load_pretrained", "save_pretrained", "config_from_hf", "config_to_hf", "read_hf_config",
           "hf_state_dict", "detect_family", "infer_family", "FAMILIES"]


def read_hf_config(hf_dir: PathLike) -> dict:
    """The parsed ``config.json`` of a HF model directory."""
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a Hugging Face model directory holding config.json")
    with open(path) as f:
        return json.load(f)


def _unwrap(model: nn.Module) -> GPTModel:
    """Look through torch.compile (``_orig_mod``) and DDP-style (``module``) wrappers."""
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    if not isinstance(model, GPTModel):
        raise TypeError(f"expected a megacore GPTModel, got {type(model).__name__}")
    return model


def _to_empty_keep_attrs(model: nn.Module, device: torch.device) -> None:
    """``to_empty`` makes new Parameter objects; keep the ``_megacore_*`` init/shard attributes."""
    saved = {n: {k: v for k, v in vars(p).items() if k.startswith("_megacore")}
             for n, p in model.named_parameters(remove_duplicate=False)}
    model.to_empty(device=device)
    for n, p in model.named_parameters(remove_duplicate=False):
        for k, v in saved.get(n, {}).items():
            setattr(p, k, v)


def build_empty(config: TransformerConfig, dtype: torch.dtype, device: torch.device) -> GPTModel:
    """A GPTModel with uninitialized storage on ``device``: built on meta, then allocated once."""
    with torch.device("meta"):
        model = GPTModel(config)
    if model.rotary is not None:
        # Built under the meta device its frequency table would be meta too: rebuild it on CPU.
        model.rotary = RotaryEmbedding(config)
    model.to(dtype)  # free on meta
    _to_empty_keep_attrs(model, device)
    return model


def _expected_hf_shapes(rule: Rule, our_shape: torch.Size) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors of ``rule`` for a parameter of ``our_shape`` (computed on meta)."""
    return [tuple(t.shape) for t in rule.to_hf(torch.empty(our_shape, device="meta"))]


def _checkpoint_prefix(family: str, names: list[str]) -> str:
    default = BASE_PREFIX[family]
    return default if any(n.startswith(default) for n in names) else ""


def check_tensor_names(reader: CheckpointReader, rules: list[Rule], hf_dir: Path, family: str, ignorable) -> None:
    """ValueError naming the checkpoint tensors ``rules`` need but ``reader`` lacks, or that it holds
    but no rule uses (except those ``ignorable(name)`` accepts)."""
    wanted = {n for r in rules for n in r.hf}
    missing = sorted(n for n in wanted if n not in reader)
    if missing:
        raise ValueError(f"{hf_dir} lacks {len(missing)} tensor(s) the {family} config needs, e.g. {missing[:8]}; "
                         "the weights do not match config.json (or the download is incomplete)")
    extra = sorted(n for n in reader.keys() if n not in wanted and not ignorable(n))
    if extra:
        raise ValueError(f"{hf_dir} holds {len(extra)} tensor(s) the {family} mapping does not use, e.g. "
                         f"{extra[:8]}; config.json does not describe these weights (wrong num_hidden_layers, "
                         "bias or tie_word_embeddings setting?)")


@torch.no_grad()
def copy_weights(model: nn.Module, rules: list[Rule], reader: CheckpointReader, hf_dir: Path, family: str) -> None:
    """Fill every parameter of ``model`` from the checkpoint through ``rules``, each HF tensor's shape
    checked against the one the parameter implies before it is read."""
    params = dict(model.named_parameters())
    uncovered = sorted(set(params) - {r.ours for r in rules})
    if uncovered:
        raise RuntimeError(f"internal error: the {family} mapping leaves megacore parameters unset: {uncovered}")
    for rule in rules:
        param = params[rule.ours]
        for name, shape in zip(rule.hf, _expected_hf_shapes(rule, param.shape)):
            if reader.shape(name) != shape:
                raise ValueError(f"tensor {name!r} in {hf_dir} has shape {reader.shape(name)}, but config.json "
                                 f"implies {shape} (for megacore {rule.ours}); the weights do not match the config")
        param.copy_(rule.to_ours([reader.get(n) for n in rule.hf]))


def rules_to_hf(params: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """The HF-named tensors of ``params`` through ``rules``."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.ours not in params:
            raise ValueError(f"model has no parameter {rule.ours}; was it built with a custom layer spec that "
                             "renames submodules? HF export needs the default names")
        for name, t in zip(rule.hf, rule.to_hf(params[rule.ours].detach())):
            out[name] = t
    return out


@torch.no_grad()
def load_pretrained(hf_dir: PathLike, dtype: Optional[torch.dtype] = None,
                    device: Optional[Union[str, torch.device]] = None, **config_overrides: Any) -> GPTModel:
    """Load a HF Llama / Mistral / Mixtral / Qwen2 / GPT-2 / NemotronH directory into a ``GPTModel`` (eval mode).

    ``dtype``: parameter dtype; default the dtype stored in the checkpoint. ``device``: default CPU.
    ``config_overrides``: TransformerConfig fields to set after mapping (``vocab_padding_multiple``,
    ``attention_backend``, ``seq_length``, ...). The model remembers ``hf_family`` and
    ``hf_config`` (the original dict) so ``save_pretrained`` writes the same family back.

    Raises ConfigError for an unsupported architecture or setting, ValueError naming the tensor for
    a missing, unexpected or wrongly shaped checkpoint tensor.
    """
    hf_dir = Path(hf_dir)
    hf_cfg = read_hf_config(hf_dir)
    family = detect_family(hf_cfg)
    config = config_from_hf(hf_cfg, **config_overrides)
    with CheckpointReader(hf_dir) as reader:
        rules = weight_rules(family, config, _checkpoint_prefix(family, reader.keys()))
        check_tensor_names(reader, rules, hf_dir, family, lambda n: is_ignorable(n, family, config))
        if dtype is None:
            dtype = reader.get(rules[0].hf[0]).dtype
        model = build_empty(config, dtype, torch.device(device if device is not None else "cpu"))
        copy_weights(model, rules, reader, hf_dir, family)
    model.hf_family = family
    model.hf_config = hf_cfg
    return model.eval()


def _check_complete(model: GPTModel) -> None:
    """Export needs every parameter at full size: not a pipeline stage, not a TP shard."""
    c = model.config
    if not (model.pre_process and model.post_process) or len(model.decoder.layers) != c.num_layers:
        raise ValueError("save_pretrained needs the whole model, but this is a pipeline stage "
                         f"(pre_process={model.pre_process}, post_process={model.post_process}, "
                         f"{len(model.decoder.layers)}/{c.num_layers} layers); gather the stages first")
    with torch.device("meta"):
        reference = GPTModel(c)
    ref_shapes = {n: p.shape for n, p in reference.named_parameters()}
    for name, p in model.named_parameters():
        if name in ref_shapes and p.shape != ref_shapes[name]:
            raise ValueError(f"parameter {name} has shape {tuple(p.shape)}, the full model has "
                             f"{tuple(ref_shapes[name])}: this looks like a tensor-parallel shard; gather it first")


def hf_state_dict(model: nn.Module, family: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The HF-named tensors ``save_pretrained`` would write (vocab padding stripped, qkv/fc1 split)."""
    model = _unwrap(model)
    family = family or getattr(model, "hf_family", None) or infer_family(model.config)
    check_exportable(model.config, family)
    _check_complete(model)
    return rules_to_hf(dict(model.named_parameters()), weight_rules(family, model.config))


def save_pretrained(model: nn.Module, out_dir: PathLike, family: Optional[str] = None,
                    max_shard_size: Union[int, str] = "5GB") -> Path:
    """Write ``config.json`` + safetensors that ``transformers.AutoModelForCausalLM`` loads.

    ``family``: ``llama``, ``mistral``, ``mixtral``, ``qwen2``, ``gpt2`` or ``nemotron_h``; default the family the model was
    loaded as, else inferred from the config (see ``infer_family``). Weights above
    ``max_shard_size`` (bytes or '5GB'-style) are split into shards with an index json. The
    directory is written to a temporary sibling and renamed into place; other files already in
    ``out_dir`` (tokenizer, generation config) are kept.
    """
    model = _unwrap(model)
    family = family or getattr(model, "hf_family", None) or infer_family(model.config)
    if family not in FAMILIES:
        raise ConfigError(f"family={family!r} is not supported; use one of {list(FAMILIES)}")
    tensors = hf_state_dict(model, family)
    dtype = model.output_weight().dtype
    base = getattr(model, "hf_config", None) if getattr(model, "hf_family", None) == family else None
    hf_cfg = config_to_hf(model.config, family, dtype=dtype, base=base)
    with atomic_directory(out_dir) as tmp:
        with open(tmp / "config.json", "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        write_safetensors(tmp, tensors, max_shard_size)
    return Path(out_dir)
