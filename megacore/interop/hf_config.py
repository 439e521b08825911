"""Hugging Face ``config.json`` <-> ``TransformerConfig``, through the family adapters.

The family of a ``config.json`` comes from its ``model_type`` (else ``architectures``) via
``megacore.interop.registry``; what each family's keys mean lives in its module under
``megacore/interop/families/``. This module holds what every family shares: overrides, the
identity keys written on export (``model_type``, ``architectures``, ``vocab_size``, ``dtype``, ...)
and the guess of a family for a model built in megacore.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional

import torch

from megacore.config import ConfigError, TransformerConfig
from megacore.interop import registry
from megacore.interop.adapter import CausalLMAdapter

# family -> (model_type, CausalLM class name)
FAMILIES: dict[str, tuple[str, str]] = {name: (a.model_type, a.architecture)
                                        for name, a in registry.causal_lm_adapters().items()}
SUPPORTED = registry.supported()

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, the spelling of ``config.json``."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# Keys of config.json that count something (layers, heads, sizes): each must be a positive integer.
POSITIVE_INT_KEYS = ("hidden_size", "n_embd", "num_attention_heads", "n_head", "num_hidden_layers", "n_layer",
                     "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "vocab_size",
                     "max_position_embeddings", "n_positions", "num_local_experts", "num_experts_per_tok",
                     "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step",
                     "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size",
                     "n_routed_experts", "n_shared_experts", "n_group", "topk_group", "q_lora_rank", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def check_hf_numbers(hf_config: dict) -> None:
    """ConfigError naming the first key of ``POSITIVE_INT_KEYS`` whose value is not a positive integer
    (zero heads would otherwise end in a ZeroDivisionError deep inside a family's mapping)."""
    for key in POSITIVE_INT_KEYS:
        value = hf_config.get(key)
        if value is None:
            continue
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or value < 1:
            raise ConfigError(f"{key}={value!r} in config.json must be a positive integer; the file does not "
                              "describe a usable model (compare it with the model's original config.json)")


def adapter_of(hf_config: dict) -> CausalLMAdapter:
    """The causal-LM adapter of a HF config dict; ConfigError for other architectures (a model of
    another kind, such as LLaVA, is redirected to its own entry point)."""
    if not isinstance(hf_config, dict):
        raise ConfigError(f"a Hugging Face config must be a JSON object of keys, got a {type(hf_config).__name__}")
    adapter = registry.adapter_for_hf_config(hf_config)
    if not isinstance(adapter, CausalLMAdapter):
        raise ConfigError(f"model_type={adapter.model_type!r} ({adapter.architecture}) is not a causal language model "
                          f"megacore.interop.hf loads; load it with {adapter.entry_point}")
    return adapter


def detect_family(hf_config: dict) -> str:
    """The family name of a HF config dict, from ``model_type`` (else ``architectures``)."""
    return adapter_of(hf_config).name


def config_from_hf(hf_config: dict, **overrides: Any) -> TransformerConfig:
    """Build a validated ``TransformerConfig`` from a HF ``config.json`` dict.

    ``overrides`` set TransformerConfig fields after the mapping (e.g. ``vocab_padding_multiple=64``,
    ``attention_backend="reference"``, ``seq_length=4096``).
    """
    adapter = adapter_of(hf_config)
    check_hf_numbers(hf_config)
    try:
        fields = adapter.fields_from_hf(hf_config)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, ZeroDivisionError, AttributeError) as e:
        raise ConfigError(f"config.json of this {adapter.name} model holds a value megacore cannot read "
                          f"({type(e).__name__}: {e}); compare it with the model's original config.json") from None
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"config_from_hf: unknown TransformerConfig field(s) {unknown} in overrides; "
                          f"valid fields: {sorted(known)}")
    fields.update(overrides)
    return TransformerConfig(**fields).validate()


def infer_family(config: TransformerConfig) -> str:
    """Guess the HF family of a model built from scratch, most specific first: multi-latent attention
    -> deepseek_v3, a layer pattern -> nemotron_h, learned positions + LayerNorm -> gpt2, MoE with q/k
    norm -> qwen3_moe, MoE with a
    shared expert -> qwen2_moe, other MoE -> mixtral, q/k/v bias -> qwen2,
    sliding window -> mistral, else llama (each family's ``reads_like`` and ``guess_rank``)."""
    return registry.guess_adapter(config).name


def check_exportable(config: TransformerConfig, family: str) -> None:
    """Raise ConfigError naming the first field the HF family cannot represent."""
    registry.causal_lm_adapter(family).check_exportable(config)


def config_to_hf(config: TransformerConfig, family: str, dtype: torch.dtype = torch.float32,
                 base: Optional[dict] = None) -> dict:
    """A HF ``config.json`` dict for ``config`` as ``family``.

    ``base`` (the dict the model was loaded from) keeps the keys megacore does not model (token ids,
    tokenizer hints, ...); the structural keys are rewritten from ``config``. Its rotary block is
    kept verbatim when it maps to the same rotary_* fields, so a load/save round trip leaves it as is.
    """
    adapter = registry.causal_lm_adapter(family)
    adapter.check_exportable(config)
    c = config
    out = copy.deepcopy(base) if base is not None else {"bos_token_id": None, "eos_token_id": None}
    out.update(model_type=adapter.model_type, architectures=[adapter.architecture], vocab_size=c.vocab_size,
               tie_word_embeddings=c.tie_embeddings, initializer_range=c.init_std, dtype=dtype_name(dtype))
    out.pop("torch_dtype", None)
    adapter.write_hf(c, out, base)
    return out
