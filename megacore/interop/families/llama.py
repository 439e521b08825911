"""Llama (``LlamaForCausalLM``), and the base the RoPE decoder families specialize (Mistral,
Mixtral, Qwen2 override the hooks marked below).

config.json <-> TransformerConfig: RMSNorm, RoPE (``megacore.interop.hf_rope``), gated MLP
(``hidden_act`` silu/swish <-> ``swiglu``; gelu_pytorch_tanh/gelu_new <-> ``geglu``), GQA,
``head_dim`` when it is not hidden/heads, ``attention_bias`` + ``mlp_bias`` (both or neither:
megacore has one ``add_bias_linear``), tied embeddings.

Weights (base prefix ``model.``; per layer ``model.layers.i.``):

    embed_tokens.weight (vocab-padded)          <-> embedding.word_embeddings.weight
    input_layernorm.weight                      <-> decoder.layers.i.input_norm.weight
    self_attn.{q,k,v}_proj.{weight,bias}        <-> decoder.layers.i.self_attention.linear_qkv (grouped fusion)
    self_attn.o_proj.{weight,bias}              <-> decoder.layers.i.self_attention.linear_proj
    post_attention_layernorm.weight             <-> decoder.layers.i.pre_mlp_norm.weight
    mlp.{gate_proj ; up_proj}.{weight,bias}     <-> decoder.layers.i.mlp.linear_fc1 ([gate; up])
    mlp.down_proj.{weight,bias}                 <-> decoder.layers.i.mlp.linear_fc2
    norm.weight                                 <-> decoder.final_norm.weight
    lm_head.weight (untied only, vocab-padded)  <-> output_layer.weight
"""

from __future__ import annotations

import math
from typing import Any, Optional

from megacore.config import ConfigError, TransformerConfig
from megacore.interop.adapter import CausalLMAdapter
from megacore.interop.hf_activations import GELU_TANH, SILU, ActivationNames
from megacore.interop.hf_rope import rope_fields, write_rope
from megacore.interop.hf_weights import Rule, config_qkv, gate_up, output_rules, same, vocab_rule

GATED_ACT = ActivationNames("hidden_act", {"swiglu": SILU, "geglu": GELU_TANH}, default="silu")


class LlamaAdapter(CausalLMAdapter):
    name, model_type, architectures = "llama", "llama", ("LlamaForCausalLM",)
    defaults = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "initializer_range": 0.02, "attention_dropout": 0.0}
    activations = (GATED_ACT,)
    guess_rank = 100  # the fallback: any other decoder reads like Llama
    moe = False       # whether its MLPs are experts
    qk_norm = False   # whether its attention may RMS-normalize q and k per head (self_attn.{q,k}_norm)

    # ------------------------------------------------------------------ hooks the variants override
    def biases(self, hf: dict) -> tuple[bool, bool]:
        """(add_qkv_bias, add_bias_linear) from config.json."""
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise ConfigError(f"attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported: megacore has "
                              "one add_bias_linear switch for o_proj and the MLP; both must be equal")
        return attn_bias, attn_bias

    def sliding_window(self, hf: dict, num_layers: int) -> Optional[int]:
        """``model.sliding_window`` (Llama: none, whatever config.json says)."""
        return None

    def extra_fields(self, hf: dict) -> dict[str, Any]:
        """Further TransformerConfig fields (Mixtral: the experts)."""
        return {}

    def export_checks(self, c: TransformerConfig) -> list[tuple[str, Any]]:
        """(field, value needed) pairs beyond the shared RMSNorm/RoPE ones."""
        return [("sliding_window", None)]

    def check_extra(self, c: TransformerConfig) -> None:
        """Further export refusals (Llama: one bias switch for q/k/v/o and the MLP)."""
        if c.add_qkv_bias != c.add_bias_linear:
            self.cannot("add_qkv_bias", c.add_qkv_bias, f"add_qkv_bias == add_bias_linear ({c.add_bias_linear}; "
                        "llama's attention_bias covers q, k, v and o)")

    def write_extra(self, c: TransformerConfig, out: dict) -> None:
        """Family keys beyond the shared ones."""
        out.update(attention_bias=c.add_qkv_bias, mlp_bias=c.add_bias_linear)

    def mlp_rules(self, c: TransformerConfig, ours: str, hf: str, layer: int) -> list[Rule]:
        """The MLP of layer ``ours`` (``decoder.layers.i.``, i = ``layer``) <-> HF layer ``hf``
        (``model.layers.i.``)."""
        rules = [Rule(f"{ours}mlp.linear_fc1.weight", (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"),
                      *gate_up()),
                 *same([(f"{ours}mlp.linear_fc2.weight", f"{hf}mlp.down_proj.weight")])]
        if c.add_bias_linear:
            rules += [Rule(f"{ours}mlp.linear_fc1.bias", (f"{hf}mlp.gate_proj.bias", f"{hf}mlp.up_proj.bias"),
                           *gate_up()),
                      *same([(f"{ours}mlp.linear_fc2.bias", f"{hf}mlp.down_proj.bias")])]
        return rules

    # ------------------------------------------------------------------------------ shared by all
    def sliding_from_layer_types(self, window: Any, layer_types: Optional[list]) -> Optional[int]:
        """One window for every layer: refuse ``layer_types`` that mix sliding and full layers."""
        if layer_types is not None and window is not None:
            kinds = set(layer_types)
            if kinds == {"full_attention"}:
                return None
            if kinds != {"sliding_attention"}:
                raise ConfigError(f"layer_types={layer_types} mixes sliding and full attention layers, which megacore "
                                  "cannot represent (one sliding_window for all layers); set use_sliding_window=false "
                                  "or make max_window_layers 0")
        return int(window) if window is not None else None

    def fields_from_hf(self, hf: dict) -> dict[str, Any]:
        hidden = int(self.require(hf, "hidden_size"))
        heads = int(self.require(hf, "num_attention_heads"))
        layers = int(self.require(hf, "num_hidden_layers"))
        qkv_bias, linear_bias = self.biases(hf)
        head_dim = hf.get("head_dim")
        fields = dict(
            num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            kv_channels=None if head_dim is None or int(head_dim) == hidden // heads else int(head_dim),
            ffn_hidden_size=int(self.require(hf, "intermediate_size")),
            vocab_size=int(self.require(hf, "vocab_size")),
            seq_length=int(self.get(hf, "max_position_embeddings")),
            normalization="RMSNorm", norm_epsilon=float(self.get(hf, "rms_norm_eps")),
            activation=GATED_ACT.to_ours(hf, self.name), position_embedding="rope",
            add_qkv_bias=qkv_bias, add_bias_linear=linear_bias,
            attention_dropout=float(self.get(hf, "attention_dropout")),
            sliding_window=self.sliding_window(hf, layers),
            tie_embeddings=bool(self.get(hf, "tie_word_embeddings")),
            init_std=float(self.get(hf, "initializer_range")),
            **self.extra_fields(hf),
        )
        fields.update(rope_fields(hf))
        if fields["rotary_percent"] != 1.0:
            raise ConfigError(f"partial_rotary_factor={fields['rotary_percent']} is not used by {self.name} in "
                              "transformers; only full rotary (1.0) round-trips")
        return fields

    def check_exportable(self, c: TransformerConfig) -> None:
        self.check_plain_decoder(c, moe=self.moe, qk_norm=self.qk_norm)
        self.check_fields(c, [("normalization", "RMSNorm"), ("position_embedding", "rope"), ("rotary_percent", 1.0)]
                          + self.export_checks(c))
        self.activation_to_hf(GATED_ACT, c.activation, "activation")
        if c.attention_softmax_scale is not None and not math.isclose(c.attention_softmax_scale,
                                                                      1.0 / math.sqrt(c.head_dim)):
            self.cannot("attention_softmax_scale", c.attention_softmax_scale, "1/sqrt(head_dim)")
        self.check_extra(c)

    def write_hf(self, c: TransformerConfig, out: dict, base: Optional[dict]) -> None:
        out.update(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
                   num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate_size=c.ffn_size,
                   hidden_act=GATED_ACT.to_hf(c.activation), max_position_embeddings=c.seq_length,
                   rms_norm_eps=c.norm_epsilon, attention_dropout=c.attention_dropout)
        self.write_extra(c, out)
        write_rope(c, out, base)

    def weight_rules(self, c: TransformerConfig, prefix: str) -> list[Rule]:
        rules = [vocab_rule("embedding.word_embeddings.weight", f"{prefix}embed_tokens.weight", c)]
        for i in range(c.num_layers):
            ours, hf = f"decoder.layers.{i}.", f"{prefix}layers.{i}."
            att = f"{hf}self_attn."
            rules += [*same([(f"{ours}input_norm.weight", f"{hf}input_layernorm.weight")]),
                      Rule(f"{ours}self_attention.linear_qkv.weight",
                           tuple(f"{att}{p}_proj.weight" for p in "qkv"), *config_qkv(c)),
                      *same([(f"{ours}self_attention.linear_proj.weight", f"{att}o_proj.weight"),
                             (f"{ours}pre_mlp_norm.weight", f"{hf}post_attention_layernorm.weight")])]
            if c.add_qkv_bias:
                rules.append(Rule(f"{ours}self_attention.linear_qkv.bias",
                                  tuple(f"{att}{p}_proj.bias" for p in "qkv"), *config_qkv(c)))
            if c.add_bias_linear:
                rules += same([(f"{ours}self_attention.linear_proj.bias", f"{att}o_proj.bias")])
            if c.qk_norm:
                rules += same([(f"{ours}self_attention.{n}_norm.weight", f"{att}{n}_norm.weight") for n in "qk"])
            rules += self.mlp_rules(c, ours, hf, i)
        rules += same([("decoder.final_norm.weight", f"{prefix}norm.weight")])
        return rules + output_rules(c)

    def reads_like(self, c: TransformerConfig) -> bool:
        return True


ADAPTER = LlamaAdapter()
