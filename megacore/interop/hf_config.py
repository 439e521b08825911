"""Hugging Face ``config.json`` <-> ``TransformerConfig`` for the supported families.

Families: ``llama`` (also any config that reads like one), ``mistral`` (sliding window), ``mixtral``
(Mistral with MoE layers),
``qwen2`` (q/k/v bias; sliding window only when ``use_sliding_window``) and ``gpt2`` (learned
positions, LayerNorm with bias, Conv1D weights, tied embeddings by default), ``nemotron_h`` (hybrid
Mamba-2 / attention / MLP stacks, ``megacore.interop.hf_nemotron_h``).

Rotary parameters are read from both spellings transformers has used: 5.x writes one
``rope_parameters`` dict (``rope_type``, ``rope_theta``, ``factor``, ...); 4.x wrote a top-level
``rope_theta`` plus an optional ``rope_scaling`` dict (``type`` or ``rope_type``). Export writes
the 5.x form (and a top-level ``rope_theta`` for older readers).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Optional

import torch

from megacore.config import ConfigError, TransformerConfig

# family -> (model_type, CausalLM class name)
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    "gpt2": ("gpt2", "GPT2LMHeadModel"),
    "nemotron_h": ("nemotron_h", "NemotronHForCausalLM"),
}
SUPPORTED = ", ".join(f"{fam} ({cls})" for fam, (_, cls) in FAMILIES.items())

# Defaults of the transformers config classes for keys a config.json may omit.
_ROPE_FAMILY_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "mistral": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "mixtral": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
}
_GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
_GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_ROPE_FIELDS = ("rotary_base", "rotary_percent", "rotary_scaling", "rotary_scaling_factor",
                "rotary_original_max_positions", "rotary_low_freq_factor", "rotary_high_freq_factor",
                "rotary_beta_fast", "rotary_beta_slow", "rotary_mscale", "rotary_mscale_all_dim")

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def detect_family(hf_config: dict) -> str:
    """The family name of a HF config dict, from ``model_type`` (else ``architectures``)."""
    model_type = hf_config.get("model_type")
    for fam, (mt, cls) in FAMILIES.items():
        if model_type == mt:
            return fam
    archs = hf_config.get("architectures") or []
    for fam, (mt, cls) in FAMILIES.items():
        if model_type is None and cls in archs:
            return fam
    raise ConfigError(f"unsupported Hugging Face architecture (model_type={model_type!r}, architectures={archs}); "
                      f"megacore.interop.hf supports: {SUPPORTED}")


def _require(hf: dict, key: str, family: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ConfigError(f"{family} config.json lacks {key!r}; it is required to build the model")
    return hf[key]


def _rope_params(hf: dict) -> dict:
    """Merge the 4.x (``rope_theta`` + ``rope_scaling``) and 5.x (``rope_parameters``) spellings."""
    params: dict = {}
    if hf.get("rope_theta") is not None:
        params["rope_theta"] = hf["rope_theta"]
    if hf.get("partial_rotary_factor") is not None:
        params["partial_rotary_factor"] = hf["partial_rotary_factor"]
    for key in ("rope_scaling", "rope_parameters"):
        block = hf.get(key)
        if not block:
            continue
        if any(isinstance(v, dict) for v in block.values()):
            raise ConfigError(f"{key}={block!r} holds per-layer-type rotary settings, which megacore cannot "
                              "represent (one rotary setting for all layers); use a model with a single rope setting")
        params.update(block)
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", 10000.0)
    return params


def _rope_fields(hf: dict) -> dict:
    """TransformerConfig rotary_* fields from a HF config dict."""
    p = _rope_params(hf)
    kind = p["rope_type"]
    out: dict = {"rotary_base": float(p["rope_theta"]),
                 "rotary_percent": float(p.get("partial_rotary_factor", 1.0) or 1.0)}
    max_pos = hf.get("max_position_embeddings")
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rotary_scaling": "linear", "rotary_scaling_factor": float(p["factor"])}
    orig = p.get("original_max_position_embeddings", hf.get("original_max_position_embeddings", max_pos))
    if kind == "llama3":
        return {**out, "rotary_scaling": "llama3", "rotary_scaling_factor": float(p["factor"]),
                "rotary_original_max_positions": int(orig),
                "rotary_low_freq_factor": float(p.get("low_freq_factor", 1.0)),
                "rotary_high_freq_factor": float(p.get("high_freq_factor", 4.0))}
    if kind == "yarn":
        if p.get("truncate", True) is False:
            raise ConfigError("rope_parameters.truncate=False (YaRN without rounding of the correction range) is not "
                              "supported; megacore's YaRN always truncates")
        factor = p.get("factor")
        factor = float(factor) if factor is not None else max_pos / orig
        out.update(rotary_scaling="yarn", rotary_scaling_factor=factor, rotary_original_max_positions=int(orig),
                   rotary_beta_fast=float(p.get("beta_fast") or 32), rotary_beta_slow=float(p.get("beta_slow") or 1))
        mscale, mscale_all, attn = p.get("mscale"), p.get("mscale_all_dim"), p.get("attention_factor")
        if attn is not None:
            # Our cos/sin scale is 0.1·m·ln(factor) + 1: solve m for the requested attention factor.
            if factor <= 1:
                if abs(attn - 1.0) > 1e-12:
                    raise ConfigError(f"rope_parameters.attention_factor={attn} with factor={factor} <= 1 cannot be "
                                      "represented; megacore's YaRN scale is 1 when factor <= 1")
                out.update(rotary_mscale=1.0, rotary_mscale_all_dim=0.0)
            else:
                out.update(rotary_mscale=(float(attn) - 1.0) / (0.1 * math.log(factor)), rotary_mscale_all_dim=0.0)
        elif mscale and mscale_all:
            out.update(rotary_mscale=float(mscale), rotary_mscale_all_dim=float(mscale_all))
        else:  # transformers ignores a lone mscale
            out.update(rotary_mscale=1.0, rotary_mscale_all_dim=0.0)
        return out
    raise ConfigError(f"rope_type={kind!r} is not supported; megacore supports rope types "
                      "'default', 'linear', 'llama3' and 'yarn'")


def _sliding_window(hf: dict, family: str, num_layers: int) -> Optional[int]:
    window = hf.get("sliding_window")
    if family == "llama":
        return None
    if family == "qwen2" and not hf.get("use_sliding_window", False):
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None and family == "qwen2" and window is not None:
        start = hf.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
    if layer_types is not None and window is not None:
        kinds = set(layer_types)
        if kinds == {"full_attention"}:
            return None
        if kinds != {"sliding_attention"}:
            raise ConfigError(f"layer_types={layer_types} mixes sliding and full attention layers, which megacore "
                              "cannot represent (one sliding_window for all layers); set use_sliding_window=false or "
                              "make max_window_layers 0")
    return int(window) if window is not None else None


def config_from_hf(hf_config: dict, **overrides: Any) -> TransformerConfig:
    """Build a validated ``TransformerConfig`` from a HF ``config.json`` dict.

    ``overrides`` set TransformerConfig fields after the mapping (e.g. ``vocab_padding_multiple=64``,
    ``attention_backend="reference"``, ``seq_length=4096``).
    """
    family = detect_family(hf_config)
    hf = hf_config
    if family == "gpt2":
        fields = _gpt2_fields(hf)
    elif family == "nemotron_h":
        from megacore.interop.hf_nemotron_h import fields_from_hf

        fields = fields_from_hf(hf)
    else:
        fields = _rope_family_fields(hf, family)
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"config_from_hf: unknown TransformerConfig field(s) {unknown} in overrides; "
                          f"valid fields: {sorted(known)}")
    fields.update(overrides)
    return TransformerConfig(**fields).validate()


def _rope_family_fields(hf: dict, family: str) -> dict:
    d = _ROPE_FAMILY_DEFAULTS[family]
    hidden = int(_require(hf, "hidden_size", family))
    heads = int(_require(hf, "num_attention_heads", family))
    layers = int(_require(hf, "num_hidden_layers", family))
    act = hf.get("hidden_act", "silu")
    if act not in _GATED_ACTS:
        raise ConfigError(f"hidden_act={act!r} is not supported for {family}; use one of {sorted(_GATED_ACTS)}")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if family == "qwen2":
        qkv_bias, linear_bias = True, False
    elif attn_bias != mlp_bias:
        raise ConfigError(f"attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported: megacore has one "
                          "add_bias_linear switch for o_proj and the MLP; both must be equal")
    else:
        qkv_bias = linear_bias = attn_bias
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) == hidden // heads:
        head_dim = None
    fields = dict(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=None if head_dim is None else int(head_dim),
        ffn_hidden_size=int(_require(hf, "intermediate_size", family)),
        vocab_size=int(_require(hf, "vocab_size", family)),
        seq_length=int(hf.get("max_position_embeddings", d["max_position_embeddings"])),
        normalization="RMSNorm", norm_epsilon=float(hf.get("rms_norm_eps", d["rms_norm_eps"])),
        activation=_GATED_ACTS[act], position_embedding="rope",
        add_qkv_bias=qkv_bias, add_bias_linear=linear_bias,
        attention_dropout=float(hf.get("attention_dropout", 0.0) or 0.0),
        sliding_window=_sliding_window(hf, family, layers),
        tie_embeddings=bool(hf.get("tie_word_embeddings", d["tie_word_embeddings"])),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    if family == "mixtral":
        # HF adds router_aux_loss_coef x its balancing loss only when output_router_logits is set.
        fields.update(num_experts=int(_require(hf, "num_local_experts", family)),
                      moe_top_k=int(hf.get("num_experts_per_tok", 2)),
                      moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0))
                      if hf.get("output_router_logits", False) else 0.0)
    fields.update(_rope_fields(hf))
    if fields["rotary_percent"] != 1.0:
        raise ConfigError(f"partial_rotary_factor={fields['rotary_percent']} is not used by {family} in transformers; "
                          "only full rotary (1.0) round-trips")
    return fields


def _gpt2_fields(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTS:
        raise ConfigError(f"activation_function={act!r} is not supported for gpt2; use one of {sorted(_GPT2_ACTS)}")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("scale_attn_by_inverse_layer_idx=True is not supported (per-layer attention scale); "
                          "megacore scales every layer by 1/sqrt(head_dim)")
    if hf.get("add_cross_attention", False):
        raise ConfigError("add_cross_attention=True is not supported: megacore models are decoder-only")
    hidden = int(hf.get("n_embd", hf.get("hidden_size", 768)))
    return dict(
        num_layers=int(hf.get("n_layer", 12)), hidden_size=hidden, num_attention_heads=int(hf.get("n_head", 12)),
        ffn_hidden_size=int(hf.get("n_inner") or 4 * hidden), vocab_size=int(hf.get("vocab_size", 50257)),
        seq_length=int(hf.get("n_positions", 1024)),
        normalization="LayerNorm", norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation=_GPT2_ACTS[act], position_embedding="learned",
        add_qkv_bias=True, add_bias_linear=True,
        attention_dropout=float(hf.get("attn_pdrop", 0.1)), hidden_dropout=float(hf.get("resid_pdrop", 0.1)),
        attention_softmax_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


# ------------------------------------------------------------------------------------------ export


def infer_family(config: TransformerConfig) -> str:
    """Guess the HF family of a model built from scratch: a layer pattern -> nemotron_h, learned
    positions + LayerNorm -> gpt2, MoE -> mixtral, q/k/v bias -> qwen2, sliding window -> mistral,
    else llama."""
    if config.layer_pattern is not None:
        return "nemotron_h"
    if config.position_embedding == "learned" and config.normalization == "LayerNorm":
        return "gpt2"
    if config.num_experts is not None:
        return "mixtral"
    if config.add_qkv_bias and not config.add_bias_linear:
        return "qwen2"
    if config.sliding_window is not None:
        return "mistral"
    return "llama"


def _cannot(family: str, field: str, value: Any, need: str) -> None:
    raise ConfigError(f"cannot export to Hugging Face {family}: model.{field}={value!r} but {family} needs {need}; "
                      "pick another family (save_pretrained(..., family=...)) or change the model")


def check_exportable(config: TransformerConfig, family: str) -> None:
    """Raise ConfigError naming the first field the HF family cannot represent."""
    if family not in FAMILIES:
        raise ConfigError(f"family={family!r} is not supported; use one of {list(FAMILIES)}")
    c = config
    if family == "nemotron_h":
        from megacore.interop.hf_nemotron_h import check_exportable as check_nemotron_h

        check_nemotron_h(c, _cannot)
        return
    if c.num_experts is not None and family != "mixtral":
        _cannot(family, "num_experts", c.num_experts, "dense MLPs")
    if family == "mixtral":
        if c.num_experts is None:
            _cannot(family, "num_experts", None, "MoE layers (model.num_experts)")
        if not c.moe_router_norm_topk:
            _cannot(family, "moe_router_norm_topk", False, "renormalized top-k router weights")
        if c.moe_ffn_size != c.ffn_size:
            _cannot(family, "moe_ffn_hidden_size", c.moe_ffn_hidden_size, "experts of ffn_hidden_size")
    if c.layer_pattern is not None:
        _cannot(family, "layer_pattern", c.layer_pattern, "attention+MLP layers only (no hybrid stacks)")
    if c.qk_norm:
        _cannot(family, "qk_norm", True, "no q/k norm")
    if c.layernorm_zero_centered_gamma:
        _cannot(family, "layernorm_zero_centered_gamma", True, "plain norm weights")
    default_scale = 1.0 / math.sqrt(c.head_dim)
    if family == "gpt2":
        checks = [("normalization", "LayerNorm"), ("position_embedding", "learned"), ("add_qkv_bias", True),
                  ("add_bias_linear", True), ("sliding_window", None)]
    else:
        checks = [("normalization", "RMSNorm"), ("position_embedding", "rope"), ("rotary_percent", 1.0)]
        if family == "qwen2":
            checks += [("add_qkv_bias", True), ("add_bias_linear", False)]
        elif family == "llama":
            checks.append(("sliding_window", None))
        elif family in ("mistral", "mixtral"):
            checks += [("add_qkv_bias", False), ("add_bias_linear", False)]
    for field, need in checks:
        if getattr(c, field) != need:
            _cannot(family, field, getattr(c, field), f"{field}={need!r}")
    if family == "gpt2":
        if c.activation not in ("gelu_tanh", "gelu", "relu"):
            _cannot(family, "activation", c.activation, "one of gelu_tanh, gelu, relu")
        if c.num_kv_heads != c.num_attention_heads:
            _cannot(family, "num_query_groups", c.num_query_groups, "multi-head attention (num_attention_heads)")
        if c.head_dim * c.num_attention_heads != c.hidden_size:
            _cannot(family, "kv_channels", c.kv_channels, "hidden_size // num_attention_heads")
        if c.attention_softmax_scale not in (None, 1.0) and not math.isclose(c.attention_softmax_scale, default_scale):
            _cannot(family, "attention_softmax_scale", c.attention_softmax_scale, "1/sqrt(head_dim) or 1.0")
        return
    if c.activation not in ("swiglu", "geglu"):
        _cannot(family, "activation", c.activation, "swiglu or geglu")
    if c.attention_softmax_scale is not None and not math.isclose(c.attention_softmax_scale, default_scale):
        _cannot(family, "attention_softmax_scale", c.attention_softmax_scale, "1/sqrt(head_dim)")
    if family == "llama" and c.add_qkv_bias != c.add_bias_linear:
        _cannot(family, "add_qkv_bias", c.add_qkv_bias,
                f"add_qkv_bias == add_bias_linear ({c.add_bias_linear}; llama's attention_bias covers q, k, v and o)")


def _rope_export(c: TransformerConfig) -> dict:
    from megacore.layers.rotary import rotary_inv_freq

    p: dict = {"rope_type": c.rotary_scaling or "default", "rope_theta": c.rotary_base}
    if c.rotary_scaling is not None:
        p["factor"] = c.rotary_scaling_factor
    if c.rotary_scaling in ("llama3", "yarn"):
        p["original_max_position_embeddings"] = c.rotary_original_max_positions
    if c.rotary_scaling == "llama3":
        p.update(low_freq_factor=c.rotary_low_freq_factor, high_freq_factor=c.rotary_high_freq_factor)
    if c.rotary_scaling == "yarn":
        p.update(beta_fast=c.rotary_beta_fast, beta_slow=c.rotary_beta_slow,
                 attention_factor=rotary_inv_freq(c)[1])
    return p


def config_to_hf(config: TransformerConfig, family: str, dtype: torch.dtype = torch.float32,
                 base: Optional[dict] = None) -> dict:
    """A HF ``config.json`` dict for ``config`` as ``family``.

    ``base`` (the dict the model was loaded from) keeps the keys megacore does not model (token ids,
    tokenizer hints, ...); the structural keys are rewritten from ``config``. Its rotary block is
    kept verbatim when it maps to the same rotary_* fields, so a load/save round trip leaves it as is.
    """
    check_exportable(config, family)
    c = config
    model_type, arch = FAMILIES[family]
    out = copy.deepcopy(base) if base is not None else {"bos_token_id": None, "eos_token_id": None}
    out.update(model_type=model_type, architectures=[arch], vocab_size=c.vocab_size,
               tie_word_embeddings=c.tie_embeddings, initializer_range=c.init_std,
               dtype=_DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", "")))
    out.pop("torch_dtype", None)
    if family == "nemotron_h":
        from megacore.interop.hf_nemotron_h import fields_to_hf

        out.pop("hybrid_override_pattern", None)
        out.update(fields_to_hf(c))
        return out
    if family == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[c.activation]
        out.update(n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_attention_heads, n_positions=c.seq_length,
                   n_inner=c.ffn_size, activation_function=act, layer_norm_epsilon=c.norm_epsilon,
                   resid_pdrop=c.hidden_dropout, embd_pdrop=c.hidden_dropout, attn_pdrop=c.attention_dropout,
                   scale_attn_weights=c.attention_softmax_scale != 1.0, scale_attn_by_inverse_layer_idx=False)
        return out
    out.update(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
               num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate_size=c.ffn_size,
               hidden_act="silu" if c.activation == "swiglu" else "gelu_pytorch_tanh",
               max_position_embeddings=c.seq_length, rms_norm_eps=c.norm_epsilon,
               attention_dropout=c.attention_dropout)
    if family == "llama":
        out.update(attention_bias=c.add_qkv_bias, mlp_bias=c.add_bias_linear)
    if family in ("mistral", "mixtral"):
        out["sliding_window"] = c.sliding_window
    if family == "mixtral":
        out.update(num_local_experts=c.num_experts, num_experts_per_tok=c.moe_top_k,
                   router_aux_loss_coef=c.moe_aux_loss_coeff, output_router_logits=c.moe_aux_loss_coeff > 0)
    if family == "qwen2":
        sliding = c.sliding_window is not None
        out.update(use_sliding_window=sliding, sliding_window=c.sliding_window,
                   max_window_layers=0 if sliding else c.num_layers,
                   layer_types=[("sliding_attention" if sliding else "full_attention")] * c.num_layers)
    keep_rope = False
    if base is not None:
        try:
            old = _rope_fields(base)
            keep_rope = all(getattr(c, k) == old.get(k, getattr(TransformerConfig, k)) for k in _ROPE_FIELDS)
        except ConfigError:
            keep_rope = False
    if not keep_rope:
        out.pop("rope_scaling", None)
        out.pop("partial_rotary_factor", None)
        out["rope_parameters"] = _rope_export(c)
        out["rope_theta"] = c.rotary_base
    return out
