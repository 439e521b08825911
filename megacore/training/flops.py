"""Model FLOPs and MFU (DESIGN.md's formula).

Model FLOPs per token = 6·N + 6·L·h·s, where N counts the parameters taking part in matmuls (all but
the input embedding table; the output layer counts even when tied), L layers, h hidden size, s
sequence length (causal attention counted once per pair). Recomputation is not counted. In an MoE
layer N counts the parameters a token meets: the router, its ``moe_top_k`` experts and the shared expert. In a hybrid
stack (``model.layer_pattern``) each layer counts its own kind: attention, MLP or Mamba projections.
Multi-latent attention counts its low-rank projections (``mla_attention_params``) and its own
attention term (see ``flops_per_token``).
A LLaVA model adds its image FLOPs per token (``vision_flops_per_token``).
"""

from __future__ import annotations

from megacore.config import TransformerConfig, VisionConfig

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def mla_attention_params(cfg: TransformerConfig) -> int:
    """Matmul parameters of one multi-latent attention block: the query projection (down, up; or the
    full-rank one), the joint key/value down-projection (latent and rotary key), the key/value
    up-projection and the output projection (the latent norms are no matmuls)."""
    h, heads, r = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    query = h * heads * qk if cfg.q_lora_rank is None else h * cfg.q_lora_rank + cfg.q_lora_rank * heads * qk
    kv = h * (r + cfg.qk_rope_head_dim) + r * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return query + kv + heads * cfg.v_head_dim * h


def matmul_params(cfg: TransformerConfig) -> int:
    h, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    attention = h * (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_attention_heads * hd * h
    if cfg.multi_latent_attention:
        attention = mla_attention_params(cfg)
    per_width = 3 if cfg.gated_mlp else 2
    dense_mlp = h * f * per_width
    moe_mlp = 0
    if cfg.num_experts is not None:
        moe_mlp = h * cfg.num_experts + cfg.moe_top_k * h * cfg.moe_ffn_size * per_width
        if cfg.moe_shared_expert_hidden_size is not None:
            moe_mlp += h * cfg.moe_shared_expert_hidden_size * per_width + (h if cfg.moe_shared_expert_gate else 0)
    inner = cfg.mamba_heads * cfg.mamba_head_dim
    # Mamba-2: in_proj to [z | x B C | dt], out_proj (the conv is not a matmul)
    mamba = h * (2 * inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim + cfg.mamba_heads) + inner * h
    total = h * cfg.vocab_size
    for i, kind in enumerate(cfg.layer_kinds):
        mlp = moe_mlp if cfg.is_moe_layer(i) else dense_mlp
        total += {"T": attention + mlp, "*": attention, "-": mlp, "M": mamba}[kind]
    for k in range(cfg.mtp_num_layers):  # each MTP depth: eh_proj (2h -> h), one layer, the shared output head
        mlp = moe_mlp if cfg.is_moe_layer(cfg.num_layers + k) else dense_mlp
        total += 2 * h * h + attention + mlp + h * cfg.vocab_size
    return total


def flops_per_token(cfg: TransformerConfig, seq_length: int | None = None) -> float:
    """6·N + 6·L·h·s with L the layers that attend (the MTP depths' included); a Mamba layer's scan is not counted (its
    projections are, in N), which understates a hybrid model's FLOPs a little. Under multi-latent
    attention a layer's attention term is 3·s·H·((dn+dr) + dv) instead of 6·h·s: q·k over the
    dn+dr query/key channels and p·v over the dv value channels of each of the H heads."""
    s = seq_length or cfg.seq_length
    attending = sum(k in "T*" for k in cfg.layer_kinds) + cfg.mtp_num_layers
    per_layer = 6.0 * cfg.hidden_size * s
    if cfg.multi_latent_attention:
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        per_layer = 3.0 * s * cfg.num_attention_heads * (qk + cfg.v_head_dim)
    return 6.0 * matmul_params(cfg) + attending * per_layer


def vision_flops_per_token(v: VisionConfig, text_hidden: int, seq_length: int) -> float:
    """A LLaVA sample's image FLOPs (one image per sample), spread over its ``seq_length`` tokens.

    Per image, over the S = patches + 1 positions of the layers that run: the patch convolution, the
    matmuls (4h² attention + 2·h·f MLP per layer) and bidirectional attention (every pair, 4·S²·h
    per layer forward); then the projector on the image tokens. Each counts a pass for the forward,
    one for the weight gradient and one for the input gradient where one is needed. A frozen tower
    runs forward only, and then the projector's first linear needs no input gradient either; the
    convolution never does (the pixels need none)."""
    h, s, frozen = v.hidden_size, v.num_patches + 1, v.freeze_tower
    layer = 2 * (4 * h * h + 2 * h * v.intermediate_size) * s + 4 * s * s * h
    conv = 2 * v.num_channels * v.patch_size ** 2 * h * v.num_patches
    tower = (1 if frozen else 3) * v.layers_used * layer + (1 if frozen else 2) * conv
    projector = ((2 if frozen else 3) * h * text_hidden + 3 * text_hidden * text_hidden) * 2 * v.image_seq_length
    return (tower + projector) / seq_length


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None
