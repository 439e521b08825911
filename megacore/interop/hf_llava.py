"""Hugging Face LLaVA (``LlavaForConditionalGeneration``) checkpoints in and out.

The language model is any family ``megacore.interop`` maps (Llama, Mistral, Qwen2, ...), read
through the same weight rules under LLaVA's prefix. The vision tower is CLIP's vision transformer.
Its separate q/k/v projections become megacore's fused ``linear_qkv`` (one group per head). The
projector's two linears map one to one.

Tensor names differ between writers. Both spellings are read, and the one transformers 5 writes is
written:

=========================  ======================================  ==============================
part                       written (and read)                      also read
=========================  ======================================  ==============================
language model body        ``language_model.model.``               ``model.language_model.``
output layer               ``language_model.lm_head.weight``       ``lm_head.weight``
vision tower               ``vision_tower.``                       ``vision_tower.vision_model.``,
                                                                   ``model.vision_tower.``
projector                  ``multi_modal_projector.``              ``model.multi_modal_projector.``
=========================  ======================================  ==============================
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

from megacore.config import ConfigError, VisionConfig
from megacore.interop.hf_config import config_from_hf, config_to_hf, detect_family, infer_family
from megacore.interop.hf import build_empty, check_tensor_names, copy_weights, rules_to_hf
from megacore.interop.hf_io import CheckpointReader, atomic_directory, write_safetensors
from megacore.interop.hf_weights import Rule, _identity, fuse_qkv, is_ignorable, split_qkv, weight_rules
from megacore.models.llava import LlavaConfig, LlavaModel

PathLike = Union[str, Path]

WRITE = {"lm": "language_model.model.", "head": "language_model.lm_head.weight", "vision": "vision_tower.",
         "projector": "multi_modal_projector."}
READ = {"lm": ("language_model.model.", "model.language_model."),
        "head": ("language_model.lm_head.weight", "lm_head.weight"),
        "vision": ("vision_tower.vision_model.", "model.vision_tower.", "vision_tower."),
        "projector": ("multi_modal_projector.", "model.multi_modal_projector.")}


# ------------------------------------------------------------------------------------------ config
def config_from_hf_llava(hf: dict, **text_overrides: Any) -> LlavaConfig:
    """LlavaConfig from a LLaVA ``config.json`` dict; ConfigError names any setting we cannot map."""
    if hf.get("model_type") != "llava":
        raise ConfigError(f"model_type={hf.get('model_type')!r} is not 'llava'; load it with megacore.interop.load_pretrained")
    vision, layer = hf.get("vision_config", {}), hf.get("vision_feature_layer", -2)
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConfigError(f"vision_config.model_type={vision.get('model_type')!r} is not supported; megacore's "
                          "LLaVA vision tower is CLIP's (clip_vision_model)")
    if not isinstance(layer, int):
        raise ConfigError(f"vision_feature_layer={layer!r}: features from several layers are not supported; "
                          "use one layer index")
    if not hf.get("multimodal_projector_bias", True):
        raise ConfigError("multimodal_projector_bias=false is not supported: megacore's projector has biases")
    text_hf = dict(hf["text_config"])
    text_hf.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    return LlavaConfig(
        text=config_from_hf(text_hf, **text_overrides),
        vision=VisionConfig(image_size=vision["image_size"], patch_size=vision["patch_size"],
                            num_channels=vision.get("num_channels", 3), hidden_size=vision["hidden_size"],
                            intermediate_size=vision["intermediate_size"], num_layers=vision["num_hidden_layers"],
                            num_attention_heads=vision["num_attention_heads"],
                            norm_epsilon=vision.get("layer_norm_eps", 1e-5),
                            activation=vision.get("hidden_act", "quick_gelu"), enabled=True,
                            image_token_id=hf.get("image_token_index", hf.get("image_token_id")),
                            feature_layer=layer, feature_select=hf.get("vision_feature_select_strategy", "default"),
                            projector_activation=hf.get("projector_hidden_act", "gelu")),
    ).validate()


def config_to_hf_llava(c: LlavaConfig, family: str, dtype: torch.dtype) -> dict:
    v = c.vision
    text = config_to_hf(c.text, family, dtype)
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": text, "tie_word_embeddings": c.text.tie_embeddings,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                          "num_attention_heads": v.num_attention_heads, "image_size": v.image_size,
                          "patch_size": v.patch_size, "num_channels": v.num_channels, "layer_norm_eps": v.norm_epsilon,
                          "hidden_act": v.activation, "attention_dropout": 0.0},
        "image_token_index": v.image_token_id, "image_seq_length": v.image_seq_length,
        "vision_feature_layer": v.feature_layer, "vision_feature_select_strategy": v.feature_select,
        "projector_hidden_act": v.projector_activation, "multimodal_projector_bias": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ----------------------------------------------------------------------------------------- weights
def _vision_rules(v: VisionConfig, base: str) -> list[Rule]:
    ident = _identity()
    heads, hd = v.num_attention_heads, v.hidden_size // v.num_attention_heads
    qkv = ((lambda ts: fuse_qkv(*ts, heads)), (lambda t: split_qkv(t, heads, heads, hd)))
    ours = "vision_tower."
    rules = [Rule(f"{ours}class_embedding", (f"{base}embeddings.class_embedding",), *ident),
             Rule(f"{ours}patch_embedding.weight", (f"{base}embeddings.patch_embedding.weight",), *ident),
             Rule(f"{ours}position_embedding.weight", (f"{base}embeddings.position_embedding.weight",), *ident)]
    for mine, theirs in (("pre_norm", "pre_layrnorm"), ("post_norm", "post_layernorm")):
        rules += [Rule(f"{ours}{mine}.{p}", (f"{base}{theirs}.{p}",), *ident) for p in ("weight", "bias")]
    for i in range(v.num_layers):
        o, h = f"{ours}encoder.layers.{i}.", f"{base}encoder.layers.{i}."
        for p in ("weight", "bias"):
            rules += [
                Rule(f"{o}input_norm.{p}", (f"{h}layer_norm1.{p}",), *ident),
                Rule(f"{o}pre_mlp_norm.{p}", (f"{h}layer_norm2.{p}",), *ident),
                Rule(f"{o}self_attention.linear_qkv.{p}", tuple(f"{h}self_attn.{x}_proj.{p}" for x in "qkv"), *qkv),
                Rule(f"{o}self_attention.linear_proj.{p}", (f"{h}self_attn.out_proj.{p}",), *ident),
                Rule(f"{o}mlp.linear_fc1.{p}", (f"{h}mlp.fc1.{p}",), *ident),
                Rule(f"{o}mlp.linear_fc2.{p}", (f"{h}mlp.fc2.{p}",), *ident),
            ]
    return rules


def llava_rules(c: LlavaConfig, family: str, prefixes: dict[str, str]) -> list[Rule]:
    """Every megacore parameter of a LlavaModel <-> its HF tensors, under ``prefixes`` (see WRITE)."""
    text = []
    for rule in weight_rules(family, c.text, prefixes["lm"]):
        hf = tuple(prefixes["head"] if n == "lm_head.weight" else n for n in rule.hf)
        text.append(dataclasses.replace(rule, ours=f"language_model.{rule.ours}", hf=hf))
    ident = _identity()
    projector = [Rule(f"projector.{layer}.{p}", (f"{prefixes['projector']}{layer}.{p}",), *ident)
                 for layer in ("linear_1", "linear_2") for p in ("weight", "bias")]
    return text + _vision_rules(c.vision, prefixes["vision"]) + projector


def _read_prefixes(names: list[str]) -> dict[str, str]:
    found = {}
    for part, options in READ.items():
        for option in options:
            if any(n == option or n.startswith(option) for n in names):
                found[part] = option
                break
    missing = [p for p in ("lm", "vision", "projector") if p not in found]
    if missing:
        raise ValueError(f"the checkpoint has no tensors of the LLaVA {', '.join(missing)} (looked for names starting "
                         f"with {[READ[p] for p in missing]}); is it a LLaVA checkpoint?")
    found.setdefault("head", WRITE["head"])
    return found


@torch.no_grad()
def load_pretrained_llava(hf_dir: PathLike, dtype: Optional[torch.dtype] = None,
                          device: Optional[Union[str, torch.device]] = None, **text_overrides: Any) -> LlavaModel:
    """A HF LLaVA directory (config.json + safetensors) as a ``LlavaModel`` in eval mode.

    ValueError names a missing, unexpected or wrongly shaped tensor; ConfigError an unsupported
    setting. ``text_overrides``: TransformerConfig fields for the language model (e.g.
    ``attention_backend``)."""
    hf_dir = Path(hf_dir)
    with open(hf_dir / "config.json") as f:
        hf = json.load(f)
    config = config_from_hf_llava(hf, **text_overrides)
    family = detect_family(hf["text_config"])
    with CheckpointReader(hf_dir) as reader:
        rules = llava_rules(config, family, _read_prefixes(reader.keys()))
        check_tensor_names(reader, rules, hf_dir, f"llava ({family})",
                           lambda n: is_ignorable(n, family, config.text))
        if dtype is None:
            dtype = reader.get(rules[0].hf[0]).dtype
        target = torch.device(device if device is not None else "cpu")
        # The language model (most of the weights) is allocated once, not randomly initialized first.
        model = LlavaModel(config, language_model=build_empty(config.text, dtype, target)).to(target, dtype)
        copy_weights(model, rules, reader, hf_dir, f"llava ({family})")
    model.hf_family = family
    return model.eval()


def llava_hf_state_dict(model: LlavaModel, family: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The HF-named tensors ``save_pretrained_llava`` writes."""
    family = family or getattr(model, "hf_family", None) or infer_family(model.config.text)
    return rules_to_hf(dict(model.named_parameters()), llava_rules(model.config, family, WRITE))


def save_pretrained_llava(model: LlavaModel, out_dir: PathLike, family: Optional[str] = None,
                          max_shard_size: Union[int, str] = "5GB") -> Path:
    """config.json + safetensors that ``transformers.LlavaForConditionalGeneration`` loads; written
    atomically (a crash leaves no half-written directory)."""
    family = family or getattr(model, "hf_family", None) or infer_family(model.config.text)
    tensors = llava_hf_state_dict(model, family)
    dtype = next(model.parameters()).dtype
    with atomic_directory(out_dir) as tmp:
        write_safetensors(tmp, tensors, max_shard_size)
        with open(tmp / "config.json", "w") as f:
            json.dump(config_to_hf_llava(model.config, family, dtype), f, indent=2)
    return Path(out_dir)
