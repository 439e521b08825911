"""Hugging Face import/export for ``GPTModel``: every causal-LM family of
``megacore/interop/families/`` (Llama, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3,
GPT-2, NemotronH).

    model = load_pretrained("path/to/hf_model")            # config.json + safetensors -> GPTModel
    save_pretrained(model, "path/to/out")                   # -> config.json + model.safetensors

Loading builds the model on the meta device (no random init is spent) and fills every parameter
from the checkpoint: q/k/v are fused into ``linear_qkv`` in the grouped per-KV-group layout,
gate/up into ``linear_fc1`` as [gate; up], GPT-2's Conv1D weights are transposed, and the vocab
rows are zero-padded to ``config.padded_vocab_size``. Saving inverts each step exactly, so a
load/save round trip reproduces every tensor bit for bit. Which names, transforms and config keys
apply is the family adapter's (``megacore.interop.registry`` finds it from ``model_type``); this
module only drives them. See docs/hf-interop.md for the tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from megacore.interop import registry
from megacore.interop.hf_config import (  # noqa: F401  (re-exported API)
    FAMILIES,
    SUPPORTED,
    adapter_of,
    check_exportable,
    config_from_hf,
    config_to_hf,
    detect_family,
    infer_family,
)
from megacore.config import ConfigError, TransformerConfig
from megacore.interop.adapter import CausalLMAdapter
from megacore.interop.hf_companions import GENERATION_CONFIG, write_companions
from megacore.interop.hf_io import CheckpointReader, atomic_directory, read_json_file, write_safetensors
from megacore.interop.hf_transfer import (  # noqa: F401  (build_empty: re-exported API)
    build_empty,
    check_tensor_names,
    checkpoint_prefix,
    copy_weights,
    default_dtype,
    rules_to_hf,
    weight_tensors,
)
from megacore.models.gpt import GPTModel

PathLike = Union[str, Path]

__all__ = ["load_pretrained", "save_pretrained", "config_from_hf", "config_to_hf", "read_hf_config",
           "hf_state_dict", "detect_family", "infer_family", "build_empty", "FAMILIES"]


def read_hf_config(hf_dir: PathLike) -> dict:
    """The parsed ``config.json`` of a HF model directory; ConfigError naming the file when it is not
    a JSON object (invalid JSON, not UTF-8, a list ...)."""
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a Hugging Face model directory holding config.json")
    try:
        cfg = read_json_file(path, "model config")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} holds a JSON {type(cfg).__name__}, not an object of config keys "
                          "(model_type, hidden_size, ...); it is not a Hugging Face model config")
    return cfg


def _unwrap(model: nn.Module) -> GPTModel:
    """Look through torch.compile (``_orig_mod``) and DDP-style (``module``) wrappers."""
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    if not isinstance(model, GPTModel):
        raise TypeError(f"expected a megacore GPTModel, got {type(model).__name__}")
    return model


def _mapped_config(hf_dir: Path, hf_cfg: dict, overrides: dict) -> tuple[CausalLMAdapter, TransformerConfig]:
    """(adapter, validated TransformerConfig) of config.json with ``overrides``; ConfigError naming the file."""
    try:
        return adapter_of(hf_cfg), config_from_hf(hf_cfg, **overrides)
    except ConfigError as e:
        raise ConfigError(f"{hf_dir / 'config.json'}: {e}") from None


def _with_checkpoint_fields(hf_cfg: dict, adapter: CausalLMAdapter, config: TransformerConfig,
                            reader: CheckpointReader, overrides: dict) -> TransformerConfig:
    """``config`` with the fields that depend on which tensors the checkpoint holds (unless overridden)."""
    found = {k: v for k, v in adapter.fields_from_checkpoint(hf_cfg, config, list(reader.keys())).items()
             if k not in overrides}
    return config_from_hf(hf_cfg, **found, **overrides) if found else config


def read_source(hf_dir: PathLike) -> tuple[dict, TransformerConfig]:
    """(config.json dict, the TransformerConfig ``load_pretrained`` builds) of a HF directory,
    reading the weight files' headers only; errors as ``load_pretrained``."""
    hf_dir = Path(hf_dir)
    hf_cfg = read_hf_config(hf_dir)
    adapter, config = _mapped_config(hf_dir, hf_cfg, {})
    with CheckpointReader(hf_dir) as reader:
        return hf_cfg, _with_checkpoint_fields(hf_cfg, adapter, config, reader, {})


@torch.no_grad()
def load_pretrained(hf_dir: PathLike, dtype: Optional[torch.dtype] = None,
                    device: Optional[Union[str, torch.device]] = None, **config_overrides: Any) -> GPTModel:
    """Load a HF causal-LM directory of a supported family (``FAMILIES``) into a ``GPTModel`` (eval mode).

    ``dtype``: parameter dtype; default the floating dtype config.json records, else the one the
    weights share (``megacore.interop.hf_transfer.default_dtype``). ``device``: default CPU.
    ``config_overrides``: TransformerConfig fields to set after mapping (``vocab_padding_multiple``,
    ``attention_backend``, ``seq_length``, ...; DeepSeek-V3's ``mtp_num_layers=0`` imports without the
    checkpoint's multi-token-prediction modules). The model remembers ``hf_family`` and
    ``hf_config`` (the original dict) so ``save_pretrained`` writes the same family back.

    Raises ConfigError (naming config.json) for an unsupported architecture or setting, ValueError
    naming the tensor for a missing, unexpected, wrongly shaped or integer checkpoint tensor, and
    naming the file for one that is not safetensors/JSON at all.
    """
    hf_dir = Path(hf_dir)
    hf_cfg = read_hf_config(hf_dir)
    adapter, config = _mapped_config(hf_dir, hf_cfg, config_overrides)
    with CheckpointReader(hf_dir) as reader:
        config = _with_checkpoint_fields(hf_cfg, adapter, config, reader, config_overrides)
        rules = adapter.weight_rules_for(hf_cfg, config, checkpoint_prefix(adapter.base_prefix, reader.keys()))
        check_tensor_names(reader, rules, hf_dir, adapter.name, adapter.ignorable_in(hf_cfg, config))
        if dtype is None:
            dtype = default_dtype(hf_cfg, reader, [n for r in rules for n in r.hf], hf_dir)
        model = build_empty(config, dtype, torch.device(device if device is not None else "cpu"))
        copy_weights(model, rules, reader, hf_dir, adapter.name)
    model.hf_family = adapter.name
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
    adapter = registry.causal_lm_adapter(family or getattr(model, "hf_family", None) or infer_family(model.config))
    adapter.check_exportable(model.config)
    _check_complete(model)
    base = getattr(model, "hf_config", None) if getattr(model, "hf_family", None) == adapter.name else None
    params, rules = weight_tensors(model), adapter.weight_rules_for(base, model.config, adapter.base_prefix)
    unmapped = sorted(set(params) - {r.ours for r in rules})
    if unmapped:  # a parameter the family has no tensor for would be silently lost
        raise ConfigError(f"cannot export to Hugging Face {adapter.name}: it has no tensor for the parameter(s) "
                          f"{unmapped[:8]}; pick another family (save_pretrained(..., family=...))")
    return rules_to_hf(params, rules)


def save_pretrained(model: nn.Module, out_dir: PathLike, family: Optional[str] = None,
                    max_shard_size: Union[int, str] = "5GB", source_dir: Optional[PathLike] = None) -> Path:
    """Write ``config.json`` + safetensors that ``transformers.AutoModelForCausalLM`` loads.

    ``family``: a key of ``FAMILIES`` (``llama``, ``mistral``, ``mixtral``, ``qwen2``, ``qwen2_moe``,
    ``qwen3_moe``, ``deepseek_v3``, ``gpt2``, ``nemotron_h``); default the family the model was loaded as, else inferred from the config (see ``infer_family``). Weights above
    ``max_shard_size`` (bytes or '5GB'-style) are split into shards with an index json. The
    directory is written to a temporary sibling and renamed into place; other files already in
    ``out_dir`` (tokenizer, generation config) are kept.

    ``source_dir``: the HF directory the model came from (a fine-tuning run's ``model.from_hf``):
    its tokenizer files and ``generation_config.json`` are copied in (``hf_companions``). Without
    it, a ``generation_config.json`` is made from the config's token ids unless ``out_dir`` has one.
    """
    model = _unwrap(model)
    family = registry.causal_lm_adapter(family or getattr(model, "hf_family", None) or infer_family(model.config)).name
    tensors = hf_state_dict(model, family)
    dtype = model.output_weight().dtype
    base = getattr(model, "hf_config", None) if getattr(model, "hf_family", None) == family else None
    hf_cfg = config_to_hf(model.config, family, dtype=dtype, base=base)
    with atomic_directory(out_dir) as tmp:
        with open(tmp / "config.json", "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        write_safetensors(tmp, tensors, max_shard_size)
        if source_dir is not None or not (Path(out_dir) / GENERATION_CONFIG).exists():
            write_companions(tmp, Path(source_dir) if source_dir is not None else None, hf_cfg)
    return Path(out_dir)
