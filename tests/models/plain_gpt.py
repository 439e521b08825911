"""A plain fp64 GPT forward written from a state dict, independent of megacore's modules.

embedding (+ learned positions) -> per layer: norm, attention (grouped fused QKV unpacked into
separate q/k/v, optional QK-norm, rotary via complex numbers), residual, norm, MLP, residual ->
final norm -> logits over the real vocab (tied: the embedding table).
"""

from __future__ import annotations

import torch

from megacore.config import TransformerConfig
from tests.layers import reference as ref


def _norm(cfg: TransformerConfig, sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    gamma = sd[prefix + ".weight"]
    if cfg.layernorm_zero_centered_gamma:
        gamma = gamma + 1.0  # zero-centred storage: the applied scale is 1 + weight
    if cfg.normalization == "RMSNorm":
        return ref.rmsnorm(x, gamma, cfg.norm_epsilon)
    return ref.layernorm(x, gamma, sd[prefix + ".bias"], cfg.norm_epsilon)


def plain_gpt_logits(cfg: TransformerConfig, state_dict: dict, input_ids_BS: torch.Tensor,
                     padding_BS: torch.Tensor | None = None,
                     position_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, S, vocab_size] in fp64. Only the standard (unscaled) rotary is supported here."""
    assert cfg.rotary_scaling is None
    sd = {k: v.double() for k, v in state_dict.items()}
    b, s = input_ids_BS.shape
    n_q, n_kv, d = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
    positions = torch.arange(s) if position_ids_BS is None else position_ids_BS

    table = sd["embedding.word_embeddings.weight"]
    h = table[input_ids_BS]
    if cfg.position_embedding == "learned":
        h = h + sd["embedding.position_embeddings.weight"][positions]
    rope = None
    if cfg.position_embedding == "rope":
        inv = ref.rope_inv_freq(cfg.rotary_dim, cfg.rotary_base)
        rope = lambda t: ref.rope_complex(t, positions, inv)  # noqa: E731
    allowed = ref.allowed_mask(s, padding_BS=padding_BS, window=cfg.sliding_window, batch=b)

    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        w_q, w_k, w_v = ref.unpack_qkv(sd[p + "self_attention.linear_qkv.weight"], n_q, n_kv, d)
        b_q = b_k = b_v = None
        if cfg.add_qkv_bias:
            b_q, b_k, b_v = ref.unpack_qkv(sd[p + "self_attention.linear_qkv.bias"], n_q, n_kv, d)
        q_gamma = sd.get(p + "self_attention.q_norm.weight")
        k_gamma = sd.get(p + "self_attention.k_norm.weight")
        a = ref.self_attention(_norm(cfg, sd, p + "input_norm", h), w_q, w_k, w_v,
                               sd[p + "self_attention.linear_proj.weight"], n_q, n_kv, d, allowed,
                               b_q=b_q, b_k=b_k, b_v=b_v, b_o=sd.get(p + "self_attention.linear_proj.bias"),
                               q_gamma=q_gamma, k_gamma=k_gamma, eps=cfg.norm_epsilon, rope=rope)
        h = h + a
        m = ref.mlp(_norm(cfg, sd, p + "pre_mlp_norm", h), sd[p + "mlp.linear_fc1.weight"],
                    sd[p + "mlp.linear_fc2.weight"], cfg.activation,
                    sd.get(p + "mlp.linear_fc1.bias"), sd.get(p + "mlp.linear_fc2.bias"))
        h = h + m
    h = _norm(cfg, sd, "decoder.final_norm", h)
    out_w = table if cfg.tie_embeddings else sd["output_layer.weight"]
    return (h @ out_w.T)[..., : cfg.vocab_size]
