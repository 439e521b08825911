"""Hugging Face NemotronH (``NemotronHForCausalLM``) <-> megacore hybrid stacks.

NemotronH is the Megatron-style hybrid: every layer is ``x + mixer(norm(x))`` with a Mamba-2, an
attention (no rotary) or a squared-ReLU MLP mixer, listed in ``layers_block_type`` (older configs:
``hybrid_override_pattern`` with megacore's own characters). Both map one to one onto
``model.layer_pattern`` and the ``mamba_*`` keys; MoE layers ('E' / "moe": shared expert,
non-gated experts) are not supported.
"""

from __future__ import annotations

from typing import Any

from megacore.config import ConfigError, TransformerConfig
from megacore.interop.hf_weights import Rule, _identity, _qkv, _vocab_padded

FAMILY = "nemotron_h"
_KIND_TO_HF = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
_HF_TO_KIND = {v: k for k, v in _KIND_TO_HF.items()}
_HF_TO_KIND["mamba"] = "M"  # spelling of earlier transformers releases
_HF_TO_KIND["attention"] = "*"


def _pattern(hf: dict) -> str:
    kinds = hf.get("layers_block_type") or hf.get("layer_types")
    if kinds:
        unknown = sorted({k for k in kinds if k not in _HF_TO_KIND})
        if unknown:
            raise ConfigError(f"nemotron_h layers_block_type has layer kinds {unknown} that megacore cannot build "
                              f"(supported: {sorted(_HF_TO_KIND)}; MoE layers are not supported)")
        return "".join(_HF_TO_KIND[k] for k in kinds)
    pattern = hf.get("hybrid_override_pattern")
    if not pattern:
        raise ConfigError("nemotron_h config.json has neither layers_block_type nor hybrid_override_pattern")
    if set(pattern) - set(_KIND_TO_HF):
        raise ConfigError(f"nemotron_h hybrid_override_pattern={pattern!r} has layer kinds megacore cannot build "
                          "(supported: 'M', '*', '-'; MoE layers 'E' are not supported)")
    return pattern


def fields_from_hf(hf: dict) -> dict:
    """TransformerConfig fields of a NemotronH config.json dict."""
    for key, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        if hf.get(key, want) != want:
            raise ConfigError(f"nemotron_h {key}={hf[key]!r} is not supported; megacore builds {want!r}")
    for key in ("use_bias", "mlp_bias", "attention_bias", "mamba_proj_bias"):
        if hf.get(key, False):
            raise ConfigError(f"nemotron_h {key}=true is not supported: megacore's hybrid layers have no linear biases")
    if not hf.get("use_conv_bias", True):
        raise ConfigError("nemotron_h use_conv_bias=false is not supported: megacore's Mamba conv1d has a bias")
    pattern = _pattern(hf)
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    return dict(
        num_layers=len(pattern), layer_pattern=pattern, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=None if head_dim is None or int(head_dim) == hidden // heads else int(head_dim),
        ffn_hidden_size=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
        seq_length=int(hf.get("max_position_embeddings", 4096)), normalization="RMSNorm",
        norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)), activation="squared_relu", position_embedding="none",
        attention_dropout=float(hf.get("attention_dropout", 0.0) or 0.0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=float(hf.get("initializer_range", 0.02)),
        mamba_num_heads=int(hf["mamba_num_heads"]), mamba_head_dim=int(hf["mamba_head_dim"]),
        mamba_state_dim=int(hf["ssm_state_size"]), mamba_num_groups=int(hf.get("n_groups", 1)),
        mamba_conv_kernel=int(hf.get("conv_kernel", 4)), mamba_chunk_size=int(hf.get("chunk_size", 128)),
        # transformers' mixer clamps the time step at time_step_min (its time_step_limit is unused)
        mamba_dt_clamp_min=float(hf.get("time_step_min", 0.001)),
    )


def check_exportable(c: TransformerConfig, cannot) -> None:
    """Call ``cannot(family, field, value, need)`` for the first field NemotronH cannot represent."""
    if c.layer_pattern is None:
        cannot(FAMILY, "layer_pattern", None, "a hybrid stack (model.layer_pattern)")
    if c.num_experts is not None:
        cannot(FAMILY, "num_experts", c.num_experts, "dense MLP layers (its MoE layers are not supported)")
    checks = [("normalization", "RMSNorm"), ("activation", "squared_relu"), ("position_embedding", "none"),
              ("add_qkv_bias", False), ("add_bias_linear", False), ("sliding_window", None), ("qk_norm", False),
              ("attention_softmax_scale", None)]
    for field, want in checks:
        if getattr(c, field) != want:
            cannot(FAMILY, field, getattr(c, field), repr(want))


def fields_to_hf(c: TransformerConfig) -> dict[str, Any]:
    """The structural keys of a NemotronH config.json for ``c``."""
    return dict(
        hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        layers_block_type=[_KIND_TO_HF[k] for k in c.layer_pattern], num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate_size=c.ffn_size,
        max_position_embeddings=c.seq_length, layer_norm_epsilon=c.norm_epsilon, mlp_hidden_act="relu2",
        attention_dropout=c.attention_dropout, attention_bias=False, mlp_bias=False, use_bias=False,
        mamba_num_heads=c.mamba_heads, mamba_head_dim=c.mamba_head_dim, ssm_state_size=c.mamba_state_dim,
        n_groups=c.mamba_num_groups, conv_kernel=c.mamba_conv_kernel, chunk_size=c.mamba_chunk_size,
        use_conv_bias=True, mamba_hidden_act="silu", time_step_min=c.mamba_dt_clamp_min,
    )


def weight_rules(c: TransformerConfig, base: str) -> list[Rule]:
    """megacore parameter <-> NemotronH tensor rules."""
    ident = _identity()
    rules = [Rule("embedding.word_embeddings.weight", (f"{base}embeddings.weight",),
                  *_vocab_padded(c.padded_vocab_size, c.vocab_size))]
    for i, kind in enumerate(c.layer_pattern):
        ours, hf = f"decoder.layers.{i}.", f"{base}layers.{i}."
        rules.append(Rule(f"{ours}input_norm.weight", (f"{hf}norm.weight",), *ident))
        if kind == "M":
            names = [("in_proj.weight", "in_proj.weight"), ("conv1d.weight", "conv1d.weight"),
                     ("conv1d.bias", "conv1d.bias"), ("dt_bias", "dt_bias"), ("A_log", "A_log"), ("D", "D"),
                     ("norm_weight", "norm.weight"), ("out_proj.weight", "out_proj.weight")]
            rules += [Rule(f"{ours}mixer.{a}", (f"{hf}mixer.{b}",), *ident) for a, b in names]
        elif kind == "*":
            rules += [Rule(f"{ours}self_attention.linear_qkv.weight", tuple(f"{hf}mixer.{p}_proj.weight" for p in "qkv"),
                           *_qkv(c)),
                      Rule(f"{ours}self_attention.linear_proj.weight", (f"{hf}mixer.o_proj.weight",), *ident)]
        else:
            rules += [Rule(f"{ours}mlp.linear_fc1.weight", (f"{hf}mixer.up_proj.weight",), *ident),
                      Rule(f"{ours}mlp.linear_fc2.weight", (f"{hf}mixer.down_proj.weight",), *ident)]
    rules.append(Rule("decoder.final_norm.weight", (f"{base}norm_f.weight",), *ident))
    if not c.tie_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), *_vocab_padded(c.padded_vocab_size, c.vocab_size)))
    return rules
