"""GPT-2 (``GPT2LMHeadModel``).

config.json <-> TransformerConfig: ``n_layer``/``n_embd``/``n_head``/``n_inner`` (null: 4·hidden)/
``n_positions``, learned positions, LayerNorm with bias (``layer_norm_epsilon``), biases on every
linear, multi-head attention, ``activation_function`` (gelu_new/gelu_pytorch_tanh <->
``gelu_tanh``, gelu, relu), ``attn_pdrop``/``resid_pdrop``, ``scale_attn_weights`` false <->
``attention_softmax_scale=1.0``, tied embeddings by default.

Weights (base prefix ``transformer.``, absent in checkpoints of the bare base model such as the
original ``gpt2`` repo; per layer ``transformer.h.i.``). Conv1D stores [in, out], so weights are
transposed (ᵀ):

    wte.weight (vocab-padded)                <-> embedding.word_embeddings.weight
    wpe.weight                               <-> embedding.position_embeddings.weight
    ln_1.{weight,bias} / ln_2.{weight,bias}  <-> decoder.layers.i.input_norm / pre_mlp_norm
    attn.c_attn.weightᵀ, .bias               <-> decoder.layers.i.self_attention.linear_qkv (split in
                                                 [q | k | v], fused per head: G = Hq)
    attn.c_proj.weightᵀ, .bias               <-> decoder.layers.i.self_attention.linear_proj
    mlp.c_fc.weightᵀ, .bias                  <-> decoder.layers.i.mlp.linear_fc1
    mlp.c_proj.weightᵀ, .bias                <-> decoder.layers.i.mlp.linear_fc2
    ln_f.{weight,bias}                       <-> decoder.final_norm
    lm_head.weight (untied only)             <-> output_layer.weight

Stored causal-mask buffers (``attn.bias``, ``attn.masked_bias``) are skipped on load.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from megacore.config import ConfigError, TransformerConfig
from megacore.interop.adapter import CausalLMAdapter
from megacore.interop.hf_activations import GELU_TANH, ActivationNames
from megacore.interop.hf_weights import Rule, Tensors, Transforms, fuse_qkv, output_rules, same, split_qkv
from megacore.interop.hf_weights import transposed, vocab_rule

# GPT-2 writes gelu_new (its original name) for GELU-tanh; every spelling of it is read.
ACT = ActivationNames("activation_function", {"gelu_tanh": ("gelu_new", *(n for n in GELU_TANH if n != "gelu_new")),
                                              "gelu": ("gelu",), "relu": ("relu",)}, default="gelu_new")


def _c_attn(c: TransformerConfig, weight: bool) -> Transforms:
    """c_attn ([h, 3h] Conv1D weight or [3h] bias) <-> grouped fused qkv (G = Hq, MHA)."""
    heads, hd = c.num_attention_heads, c.head_dim

    def to_ours(ts: Tensors) -> torch.Tensor:
        t = ts[0].t() if weight else ts[0]
        return fuse_qkv(*t.chunk(3, dim=0), heads)

    def to_hf(t: torch.Tensor) -> Tensors:
        joined = torch.cat(split_qkv(t, heads, heads, hd), dim=0)
        return [joined.t() if weight else joined]

    return to_ours, to_hf


class GPT2Adapter(CausalLMAdapter):
    name, model_type, architectures = "gpt2", "gpt2", ("GPT2LMHeadModel",)
    base_prefix = "transformer."
    defaults = {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024,
                "layer_norm_epsilon": 1e-5, "attn_pdrop": 0.1, "resid_pdrop": 0.1, "tie_word_embeddings": True,
                "initializer_range": 0.02}
    activations = (ACT,)
    guess_rank = 10  # learned positions + LayerNorm

    def fields_from_hf(self, hf: dict) -> dict[str, Any]:
        if hf.get("scale_attn_by_inverse_layer_idx", False):
            raise ConfigError("scale_attn_by_inverse_layer_idx=True is not supported (per-layer attention scale); "
                              "megacore scales every layer by 1/sqrt(head_dim)")
        if hf.get("add_cross_attention", False):
            raise ConfigError("add_cross_attention=True is not supported: megacore models are decoder-only")
        hidden = int(hf.get("n_embd", hf.get("hidden_size", self.defaults["n_embd"])))
        return dict(
            num_layers=int(self.get(hf, "n_layer")), hidden_size=hidden, num_attention_heads=int(self.get(hf, "n_head")),
            ffn_hidden_size=int(hf.get("n_inner") or 4 * hidden), vocab_size=int(self.get(hf, "vocab_size")),
            seq_length=int(self.get(hf, "n_positions")),
            normalization="LayerNorm", norm_epsilon=float(self.get(hf, "layer_norm_epsilon")),
            activation=ACT.to_ours(hf, self.name), position_embedding="learned",
            add_qkv_bias=True, add_bias_linear=True,
            attention_dropout=float(self.get(hf, "attn_pdrop")), hidden_dropout=float(self.get(hf, "resid_pdrop")),
            attention_softmax_scale=None if hf.get("scale_attn_weights", True) else 1.0,
            tie_embeddings=bool(self.get(hf, "tie_word_embeddings")),
            init_std=float(self.get(hf, "initializer_range")),
        )

    def check_exportable(self, c: TransformerConfig) -> None:
        self.check_plain_decoder(c)
        self.check_fields(c, [("normalization", "LayerNorm"), ("position_embedding", "learned"),
                              ("add_qkv_bias", True), ("add_bias_linear", True), ("sliding_window", None)])
        self.activation_to_hf(ACT, c.activation, "activation")
        if c.num_kv_heads != c.num_attention_heads:
            self.cannot("num_query_groups", c.num_query_groups, "multi-head attention (num_attention_heads)")
        if c.head_dim * c.num_attention_heads != c.hidden_size:
            self.cannot("kv_channels", c.kv_channels, "hidden_size // num_attention_heads")
        scale = c.attention_softmax_scale
        if scale not in (None, 1.0) and not math.isclose(scale, 1.0 / math.sqrt(c.head_dim)):
            self.cannot("attention_softmax_scale", scale, "1/sqrt(head_dim) or 1.0")

    def write_hf(self, c: TransformerConfig, out: dict, base: Optional[dict]) -> None:
        out.update(n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_attention_heads, n_positions=c.seq_length,
                   n_inner=c.ffn_size, activation_function=ACT.to_hf(c.activation), layer_norm_epsilon=c.norm_epsilon,
                   resid_pdrop=c.hidden_dropout, embd_pdrop=c.hidden_dropout, attn_pdrop=c.attention_dropout,
                   scale_attn_weights=c.attention_softmax_scale != 1.0, scale_attn_by_inverse_layer_idx=False)

    def weight_rules(self, c: TransformerConfig, prefix: str) -> list[Rule]:
        tr = transposed()
        rules = [vocab_rule("embedding.word_embeddings.weight", f"{prefix}wte.weight", c),
                 *same([("embedding.position_embeddings.weight", f"{prefix}wpe.weight")])]
        for i in range(c.num_layers):
            ours, hf = f"decoder.layers.{i}.", f"{prefix}h.{i}."
            rules += same([(f"{ours}{mine}.{p}", f"{hf}{theirs}.{p}")
                           for mine, theirs in (("input_norm", "ln_1"), ("pre_mlp_norm", "ln_2"))
                           for p in ("weight", "bias")])
            rules += [
                Rule(f"{ours}self_attention.linear_qkv.weight", (f"{hf}attn.c_attn.weight",), *_c_attn(c, True)),
                Rule(f"{ours}self_attention.linear_qkv.bias", (f"{hf}attn.c_attn.bias",), *_c_attn(c, False)),
                Rule(f"{ours}self_attention.linear_proj.weight", (f"{hf}attn.c_proj.weight",), *tr),
                Rule(f"{ours}mlp.linear_fc1.weight", (f"{hf}mlp.c_fc.weight",), *tr),
                Rule(f"{ours}mlp.linear_fc2.weight", (f"{hf}mlp.c_proj.weight",), *tr),
            ]
            rules += same([(f"{ours}self_attention.linear_proj.bias", f"{hf}attn.c_proj.bias"),
                           (f"{ours}mlp.linear_fc1.bias", f"{hf}mlp.c_fc.bias"),
                           (f"{ours}mlp.linear_fc2.bias", f"{hf}mlp.c_proj.bias")])
        rules += same([(f"decoder.final_norm.{p}", f"{prefix}ln_f.{p}") for p in ("weight", "bias")])
        return rules + output_rules(c)

    def is_ignorable(self, name: str, c: TransformerConfig) -> bool:
        return (name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")
                or super().is_ignorable(name, c))

    def reads_like(self, c: TransformerConfig) -> bool:
        return c.position_embedding == "learned" and c.normalization == "LayerNorm"


ADAPTER = GPT2Adapter()
