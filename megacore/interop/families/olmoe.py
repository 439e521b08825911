"""OLMoE (``OlmoeForCausalLM``): a Llama-style decoder whose every MLP is a mixture of experts, with
RMSNorm over the whole query and the whole key projection.

config.json <-> TransformerConfig as Llama (``megacore.interop.families.llama``), plus:

- every layer is sparse (``moe_first_k_dense=0``, ``moe_layer_freq=1``); ``num_experts`` /
  ``num_experts_per_tok`` <-> ``model.num_experts`` / ``moe_top_k``; ``intermediate_size`` is the
  experts' width (``moe_ffn_hidden_size``; megacore's dense ``ffn_hidden_size`` takes it too, unused);
  ``norm_topk_prob`` (default false) <-> ``moe_router_norm_topk``; ``router_aux_loss_coef`` <->
  ``moe_aux_loss_coeff`` when ``output_router_logits`` is set (as Mixtral);
- ``model.qk_norm`` is always on with ``qk_norm_scope=projection``: ``self_attn.q_norm.weight``
  [heads·head_dim] and ``k_norm.weight`` [kv_heads·head_dim], applied to the projections before they
  are split into heads and before the rotary embedding, with ``rms_norm_eps``;
- ``attention_bias`` must be false (transformers then biases q, k, v and o_proj but not the experts,
  which megacore's switches cannot express) and ``clip_qkv`` null (megacore does not clamp q/k/v).

Training note: transformers' OLMoE embedding has ``padding_idx=pad_token_id`` (1 in the released
configs), so a fine-tune there never updates that token's row; megacore's embedding has no padding
row and updates it like any other (the forward is the same).

Weights: Llama's attention and norms, ``self_attn.{q,k}_norm.weight`` <->
``decoder.layers.i.self_attention.{q,k}_norm.weight``, and the experts as Qwen2-MoE's without a shared
expert (``mlp.gate.weight``, ``mlp.experts.e.{gate,up,down}_proj.weight``).
"""

from __future__ import annotations

from typing import Any, Optional

from megacore.config import ConfigError, TransformerConfig
from megacore.interop.families.llama import LlamaAdapter
from megacore.interop.families.qwen2_moe import Qwen2MoeAdapter


class OlmoeAdapter(Qwen2MoeAdapter):
    name, model_type, architectures = "olmoe", "olmoe", ("OlmoeForCausalLM",)
    defaults = {**LlamaAdapter.defaults, "max_position_embeddings": 4096, "num_experts": 64,
                "num_experts_per_tok": 8, "norm_topk_prob": False, "attention_bias": False, "clip_qkv": None}
    guess_rank = 9  # MoE layers with a projection-wide q/k norm
    shared_expert = False
    qk_norm = True
    experts_keys = ("num_experts",)

    # ------------------------------------------------------------------------------ import
    def biases(self, hf: dict) -> tuple[bool, bool]:
        if self.get(hf, "attention_bias"):
            raise ConfigError("attention_bias=true is not supported for olmoe: transformers then adds biases to "
                              "q, k, v and o_proj but not to the experts, and megacore's add_bias_linear would add "
                              "them to o_proj and every MLP alike")
        if hf.get("clip_qkv") is not None:
            raise ConfigError(f"clip_qkv={hf['clip_qkv']} is not supported for olmoe: megacore does not clamp the "
                              "query/key/value projections; use a checkpoint trained without it (clip_qkv: null)")
        return False, False

    def sliding_window(self, hf: dict, num_layers: int) -> Optional[int]:
        return None

    def extra_fields(self, hf: dict) -> dict[str, Any]:
        coeff = float(hf.get("router_aux_loss_coef") or 0.0) if hf.get("output_router_logits", False) else 0.0
        return dict(num_experts=self.num_experts(hf), moe_top_k=int(self.get(hf, "num_experts_per_tok")),
                    moe_ffn_hidden_size=int(self.require(hf, "intermediate_size")),
                    moe_router_norm_topk=bool(self.get(hf, "norm_topk_prob")), moe_aux_loss_coeff=coeff,
                    moe_first_k_dense=0, moe_layer_freq=1, qk_norm=True, qk_norm_scope="projection")

    # ------------------------------------------------------------------------------ export
    def export_checks(self, c: TransformerConfig) -> list[tuple[str, Any]]:
        return [("qk_norm", True), ("qk_norm_scope", "projection"), ("add_qkv_bias", False),
                ("add_bias_linear", False), ("moe_first_k_dense", 0), ("moe_layer_freq", 1),
                ("sliding_window", None)]

    def write_extra(self, c: TransformerConfig, out: dict) -> None:
        out.update(num_experts=c.num_experts, num_experts_per_tok=c.moe_top_k, intermediate_size=c.moe_ffn_size,
                   norm_topk_prob=c.moe_router_norm_topk, attention_bias=False)
        out.setdefault("clip_qkv", None)
        if c.moe_aux_loss_coeff > 0:
            out.update(router_aux_loss_coef=c.moe_aux_loss_coeff, output_router_logits=True)
        else:  # transformers adds no balancing loss; a coefficient the loaded config holds stays, inert
            out["output_router_logits"] = False
            out.setdefault("router_aux_loss_coef", 0.0)

    def reads_like(self, c: TransformerConfig) -> bool:
        return c.num_experts is not None and c.qk_norm and c.qk_norm_scope == "projection"


ADAPTER = OlmoeAdapter()
