"""Model FLOPs and MFU (DESIGN.md's formula).

Model FLOPs per token = 6·N + 6·L·h·s, where N counts the parameters taking part in matmuls (all but
the input embedding table; the output layer counts even when tied), L layers, h hidden size, s
sequence length (causal attention counted once per pair). Recomputation is not counted. In an MoE
layer N counts the parameters a token meets: the router and its ``moe_top_k`` experts.
"""

from __future__ import annotations

from megacore.config import TransformerConfig

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def matmul_params(cfg: TransformerConfig) -> int:
    h, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    qkv = h * (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * hd
    proj = cfg.num_attention_heads * hd * h
    mlp = h * f * (3 if cfg.gated_mlp else 2)
    if cfg.num_experts is not None:
        mlp = h * cfg.num_experts + cfg.moe_top_k * h * cfg.moe_ffn_size * (3 if cfg.gated_mlp else 2)
    output = h * cfg.vocab_size
    return cfg.num_layers * (qkv + proj + mlp) + output


def flops_per_token(cfg: TransformerConfig, seq_length: int | None = None) -> float:
    s = seq_length or cfg.seq_length
    return 6.0 * matmul_params(cfg) + 6.0 * cfg.num_layers * cfg.hidden_size * s


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None
