"""Hugging Face LLaVA (``LlavaForConditionalGeneration``) checkpoints in and out of ``LlavaModel``.

    model = load_pretrained_llava("path/to/hf_llava")       # config.json + safetensors -> LlavaModel
    save_pretrained_llava(model, "path/to/out")              # -> what transformers loads back

The LLaVA mapping (vision tower, projector, prefixes, activation names) is the adapter in
``megacore.interop.families.llava``; the language model goes through its own family's adapter,
found from ``text_config.model_type``. This module only drives them, with the shared checks and
copies of ``megacore.interop.hf_transfer``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

from megacore.interop import registry
from megacore.interop.families.llava import ADAPTER as LLAVA
from megacore.interop.families.llava import READ, WRITE  # noqa: F401  (re-exported)
from megacore.interop.hf import read_hf_config
from megacore.interop.hf_config import adapter_of, config_from_hf, config_to_hf, dtype_name, infer_family
from megacore.interop.hf_io import CheckpointReader, atomic_directory, write_safetensors
from megacore.interop.hf_transfer import build_empty, check_tensor_names, copy_weights, default_dtype, rules_to_hf
from megacore.models.llava import LlavaConfig, LlavaModel

PathLike = Union[str, Path]


def config_from_hf_llava(hf: dict, **text_overrides: Any) -> LlavaConfig:
    """LlavaConfig from a LLaVA ``config.json`` dict; ConfigError names any setting we cannot map.
    ``text_overrides``: TransformerConfig fields for the language model."""
    text = config_from_hf(LLAVA.text_hf_config(hf), **text_overrides)
    return LLAVA.config_from_hf(hf, text)


def config_to_hf_llava(c: LlavaConfig, family: str, dtype: torch.dtype) -> dict:
    """The LLaVA ``config.json`` dict of ``c``, its language model written as ``family``."""
    return LLAVA.config_to_hf(c, config_to_hf(c.text, family, dtype), dtype_name(dtype))


def _text_family(model: LlavaModel, family: Optional[str]) -> str:
    return family or getattr(model, "hf_family", None) or infer_family(model.config.text)


@torch.no_grad()
def load_pretrained_llava(hf_dir: PathLike, dtype: Optional[torch.dtype] = None,
                          device: Optional[Union[str, torch.device]] = None, **text_overrides: Any) -> LlavaModel:
    """A HF LLaVA directory (config.json + safetensors) as a ``LlavaModel`` in eval mode.

    ValueError names a missing, unexpected or wrongly shaped tensor; ConfigError an unsupported
    setting. ``text_overrides``: TransformerConfig fields for the language model (e.g.
    ``attention_backend``)."""
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    config = config_from_hf_llava(hf, **text_overrides)
    text = adapter_of(hf["text_config"])
    what = f"{LLAVA.name} ({text.name})"
    with CheckpointReader(hf_dir) as reader:
        rules = LLAVA.weight_rules(config, text, LLAVA.read_prefixes(reader.keys()))
        check_tensor_names(reader, rules, hf_dir, what, lambda n: LLAVA.is_ignorable(n, config, text))
        if dtype is None:
            text_cfg = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else {}
            dtype = default_dtype({**text_cfg, **{k: hf[k] for k in ("dtype", "torch_dtype") if hf.get(k)}}, reader,
                                  [n for r in rules for n in r.hf], hf_dir)
        target = torch.device(device if device is not None else "cpu")
        # The language model (most of the weights) is allocated once, not randomly initialized first.
        model = LlavaModel(config, language_model=build_empty(config.text, dtype, target)).to(target, dtype)
        copy_weights(model, rules, reader, hf_dir, what)
    model.hf_family = text.name
    return model.eval()


def llava_hf_state_dict(model: LlavaModel, family: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The HF-named tensors ``save_pretrained_llava`` writes."""
    text = registry.causal_lm_adapter(_text_family(model, family))
    return rules_to_hf(dict(model.named_parameters()), LLAVA.weight_rules(model.config, text, WRITE))


def save_pretrained_llava(model: LlavaModel, out_dir: PathLike, family: Optional[str] = None,
                          max_shard_size: Union[int, str] = "5GB") -> Path:
    """config.json + safetensors that ``transformers.LlavaForConditionalGeneration`` loads; written
    atomically (a crash leaves no half-written directory). ``family``: the language model's HF
    family; default the one it was loaded as, else inferred from its config."""
    family = _text_family(model, family)
    hf_cfg = config_to_hf_llava(model.config, family, next(model.parameters()).dtype)
    tensors = llava_hf_state_dict(model, family)
    with atomic_directory(out_dir) as tmp:
        write_safetensors(tmp, tensors, max_shard_size)
        with open(tmp / "config.json", "w") as f:
            json.dump(hf_cfg, f, indent=2)
    return Path(out_dir)
