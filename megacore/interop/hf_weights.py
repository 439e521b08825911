"""Weight-name mapping between megacore and Hugging Face checkpoints.

Each ``Rule`` ties one megacore parameter to one or more HF tensors, with the two exact
(bit-preserving) transforms between them: identity, Conv1D transpose, vocab padding, the grouped
q/k/v fusion and the [gate; up] fusion. Loading and saving are both driven by the same rule list.

Fused QKV (megacore ``linear_qkv``, rows grouped per KV group g = 0..G-1)::

    [ q rows of the q_per_group heads of group g ][ k_g: D rows ][ v_g: D rows ]   for g in 0..G-1

HF keeps q_proj [Hq·D, h], k_proj [G·D, h], v_proj [G·D, h] (GPT-2: one Conv1D c_attn whose output
columns are [q all heads | k all heads | v all heads]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from megacore.config import TransformerConfig

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """megacore parameter ``ours`` <-> HF tensors ``hf`` (names without the checkpoint prefix resolved)."""

    ours: str
    hf: tuple[str, ...]
    to_ours: Callable[[Tensors], torch.Tensor]
    to_hf: Callable[[torch.Tensor], Tensors]


# ----------------------------------------------------------------------------------- transforms


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """q [Hq·D, *r], k/v [G·D, *r] -> grouped fused [(Hq+2G)·D, *r] (works for weights and biases)."""
    rest = q.shape[1:]
    parts = [t.reshape(num_groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, num_heads: int, num_groups: int, head_dim: int) -> Tensors:
    """Inverse of ``fuse_qkv``: grouped [(Hq+2G)·D, *r] -> [q [Hq·D, *r], k [G·D, *r], v [G·D, *r]]."""
    rest = fused.shape[1:]
    q_rows = num_heads // num_groups * head_dim
    grouped = fused.reshape(num_groups, q_rows + 2 * head_dim, *rest)
    q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def _identity() -> tuple[Callable, Callable]:
    return (lambda ts: ts[0]), (lambda t: [t])


def _transposed() -> tuple[Callable, Callable]:
    """GPT-2 Conv1D stores weight [in, out]; nn.Linear wants [out, in]."""
    return (lambda ts: ts[0].t()), (lambda t: [t.t()])


def _vocab_padded(padded: int, vocab: int) -> tuple[Callable, Callable]:
    """HF [V, h] <-> megacore [padded_V, h]; padding rows are zero and dropped on export."""
    return (lambda ts: F.pad(ts[0], (0, 0, 0, padded - ts[0].shape[0]))), (lambda t: [t[:vocab]])


def _qkv(c: TransformerConfig) -> tuple[Callable, Callable]:
    heads, groups, hd = c.num_attention_heads, c.num_kv_heads, c.head_dim
    return (lambda ts: fuse_qkv(*ts, groups)), (lambda t: split_qkv(t, heads, groups, hd))


def _gpt2_qkv(c: TransformerConfig, weight: bool) -> tuple[Callable, Callable]:
    """GPT-2 c_attn ([h, 3h] Conv1D weight or [3h] bias) <-> grouped fused qkv (G = Hq, MHA)."""
    heads, hd = c.num_attention_heads, c.head_dim

    def to_ours(ts: Tensors) -> torch.Tensor:
        t = ts[0].t() if weight else ts[0]
        return fuse_qkv(*t.chunk(3, dim=0), heads)

    def to_hf(t: torch.Tensor) -> Tensors:
        joined = torch.cat(split_qkv(t, heads, heads, hd), dim=0)
        return [joined.t() if weight else joined]

    return to_ours, to_hf


def _gate_up() -> tuple[Callable, Callable]:
    return (lambda ts: torch.cat(ts, dim=0)), (lambda t: list(t.chunk(2, dim=0)))


def _experts_gate_up(num_experts: int) -> tuple[Callable, Callable]:
    """HF (w1_0, w3_0, w1_1, w3_1, ...) [F, h] each <-> megacore [E, 2F, h] ([gate; up] per expert)."""
    def to_ours(ts: Tensors) -> torch.Tensor:
        return torch.stack([torch.cat(ts[2 * e:2 * e + 2], dim=0) for e in range(num_experts)])

    def to_hf(t: torch.Tensor) -> Tensors:
        return [half for e in range(num_experts) for half in t[e].chunk(2, dim=0)]
    return to_ours, to_hf


def _experts_stacked(num_experts: int) -> tuple[Callable, Callable]:
    """HF (w2_0, w2_1, ...) [h, F] each <-> megacore [E, h, F]."""
    return (lambda ts: torch.stack(ts)), (lambda t: [t[e] for e in range(num_experts)])


# ----------------------------------------------------------------------------------- rule lists

# Top-level prefix each family's CausalLM class puts before the base model's names.
BASE_PREFIX = {"llama": "model.", "mistral": "model.", "qwen2": "model.", "mixtral": "model.", "gpt2": "transformer.",
               "nemotron_h": "backbone."}  # NemotronH checkpoints store the base model as backbone.*


def _rules_rope_family(c: TransformerConfig, base: str) -> list[Rule]:
    ident = _identity()
    rules = [Rule("embedding.word_embeddings.weight", (f"{base}embed_tokens.weight",),
                  *_vocab_padded(c.padded_vocab_size, c.vocab_size))]
    for i in range(c.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"{base}layers.{i}."
        att, mlp = f"{hf}self_attn.", f"{hf}mlp."
        rules += [
            Rule(f"{ours}input_norm.weight", (f"{hf}input_layernorm.weight",), *ident),
            Rule(f"{ours}self_attention.linear_qkv.weight",
                 tuple(f"{att}{p}_proj.weight" for p in "qkv"), *_qkv(c)),
            Rule(f"{ours}self_attention.linear_proj.weight", (f"{att}o_proj.weight",), *ident),
            Rule(f"{ours}pre_mlp_norm.weight", (f"{hf}post_attention_layernorm.weight",), *ident),
        ]
        if c.num_experts is not None:  # Mixtral's on-disk names
            moe, e = f"{hf}block_sparse_moe.", c.num_experts
            rules += [
                Rule(f"{ours}mlp.router.weight", (f"{moe}gate.weight",), *ident),
                Rule(f"{ours}mlp.experts.linear_fc1",
                     tuple(f"{moe}experts.{j}.{w}.weight" for j in range(e) for w in ("w1", "w3")),
                     *_experts_gate_up(e)),
                Rule(f"{ours}mlp.experts.linear_fc2", tuple(f"{moe}experts.{j}.w2.weight" for j in range(e)),
                     *_experts_stacked(e)),
            ]
        else:
            rules += [
                Rule(f"{ours}mlp.linear_fc1.weight", (f"{mlp}gate_proj.weight", f"{mlp}up_proj.weight"), *_gate_up()),
                Rule(f"{ours}mlp.linear_fc2.weight", (f"{mlp}down_proj.weight",), *ident),
            ]
        if c.add_qkv_bias:
            rules.append(Rule(f"{ours}self_attention.linear_qkv.bias",
                              tuple(f"{att}{p}_proj.bias" for p in "qkv"), *_qkv(c)))
        if c.add_bias_linear:
            rules += [
                Rule(f"{ours}self_attention.linear_proj.bias", (f"{att}o_proj.bias",), *ident),
                Rule(f"{ours}mlp.linear_fc1.bias", (f"{mlp}gate_proj.bias", f"{mlp}up_proj.bias"), *_gate_up()),
                Rule(f"{ours}mlp.linear_fc2.bias", (f"{mlp}down_proj.bias",), *ident),
            ]
    rules.append(Rule("decoder.final_norm.weight", (f"{base}norm.weight",), *ident))
    if not c.tie_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), *_vocab_padded(c.padded_vocab_size, c.vocab_size)))
    return rules


def _rules_gpt2(c: TransformerConfig, base: str) -> list[Rule]:
    ident, tr = _identity(), _transposed()
    rules = [
        Rule("embedding.word_embeddings.weight", (f"{base}wte.weight",), *_vocab_padded(c.padded_vocab_size, c.vocab_size)),
        Rule("embedding.position_embeddings.weight", (f"{base}wpe.weight",), *ident),
    ]
    for i in range(c.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"{base}h.{i}."
        for ours_norm, hf_norm in (("input_norm", "ln_1"), ("pre_mlp_norm", "ln_2")):
            rules += [Rule(f"{ours}{ours_norm}.{p}", (f"{hf}{hf_norm}.{p}",), *ident) for p in ("weight", "bias")]
        rules += [
            Rule(f"{ours}self_attention.linear_qkv.weight", (f"{hf}attn.c_attn.weight",), *_gpt2_qkv(c, True)),
            Rule(f"{ours}self_attention.linear_qkv.bias", (f"{hf}attn.c_attn.bias",), *_gpt2_qkv(c, False)),
            Rule(f"{ours}self_attention.linear_proj.weight", (f"{hf}attn.c_proj.weight",), *tr),
            Rule(f"{ours}self_attention.linear_proj.bias", (f"{hf}attn.c_proj.bias",), *ident),
            Rule(f"{ours}mlp.linear_fc1.weight", (f"{hf}mlp.c_fc.weight",), *tr),
            Rule(f"{ours}mlp.linear_fc1.bias", (f"{hf}mlp.c_fc.bias",), *ident),
            Rule(f"{ours}mlp.linear_fc2.weight", (f"{hf}mlp.c_proj.weight",), *tr),
            Rule(f"{ours}mlp.linear_fc2.bias", (f"{hf}mlp.c_proj.bias",), *ident),
        ]
    rules += [Rule(f"decoder.final_norm.{p}", (f"{base}ln_f.{p}",), *ident) for p in ("weight", "bias")]
    if not c.tie_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), *_vocab_padded(c.padded_vocab_size, c.vocab_size)))
    return rules


def weight_rules(family: str, config: TransformerConfig, base_prefix: str | None = None) -> list[Rule]:
    """The rules for ``family``; ``base_prefix`` overrides the default (``model.`` / ``transformer.``),
    e.g. ``""`` for checkpoints saved from a bare base model (the original ``gpt2`` repo)."""
    base = BASE_PREFIX[family] if base_prefix is None else base_prefix
    if family == "gpt2":
        return _rules_gpt2(config, base)
    if family == "nemotron_h":
        from megacore.interop import hf_nemotron_h

        return hf_nemotron_h.weight_rules(config, base)
    return _rules_rope_family(config, base)


def is_ignorable(name: str, family: str, config: TransformerConfig) -> bool:
    """HF tensors that carry no weights megacore needs: cached rotary tables, GPT-2's stored causal
    mask buffers, and a tied ``lm_head.weight`` that some checkpoints store anyway."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    if family == "gpt2" and (name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")):
        return True
    return config.tie_embeddings and name == "lm_head.weight"
