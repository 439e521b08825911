"""Model FLOPs and MFU (DESIGN.md's formula).

Model FLOPs per token = 6·N + 6·L·h·s, where N counts the parameters taking part in matmuls (all but
the input embedding table; the output layer counts even when tied), L layers, h hidden size, s
sequence length (causal attention counted once per pair). Recomputation is not counted. In an MoE
layer N counts the parameters a token meets: the router and its ``moe_top_k`` experts. In a hybrid
stack (``model.layer_pattern``) each layer counts its own kind: attention, MLP or Mamba projections.
"""

from __future__ import annotations

from megacore.config import TransformerConfig

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def matmul_params(cfg: TransformerConfig) -> int:
    h, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    attention = h * (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_attention_heads * hd * h
    mlp = h * f * (3 if cfg.gated_mlp else 2)
    if cfg.num_experts is not None:
        mlp = h * cfg.num_experts + cfg.moe_top_k * h * cfg.moe_ffn_size * (3 if cfg.gated_mlp else 2)
    per_kind = {"T": attention + mlp, "*": attention, "-": mlp}
    if "M" in cfg.layer_kinds:  # Mamba-2: in_proj to [z | x B C | dt], out_proj (the conv is not a matmul)
        inner = cfg.mamba_heads * cfg.mamba_head_dim
        per_kind["M"] = h * (2 * inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim + cfg.mamba_heads) + inner * h
    return sum(per_kind[k] for k in cfg.layer_kinds) + h * cfg.vocab_size


def flops_per_token(cfg: TransformerConfig, seq_length: int | None = None) -> float:
    """6·N + 6·L·h·s with L the layers that attend; a Mamba layer's scan is not counted (its
    projections are, in N), which understates a hybrid model's FLOPs a little."""
    s = seq_length or cfg.seq_length
    attending = sum(k in "T*" for k in cfg.layer_kinds)
    return 6.0 * matmul_params(cfg) + 6.0 * attending * cfg.hidden_size * s


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None
