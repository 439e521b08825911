"""Mixtral (``MixtralForCausalLM``): Mistral whose MLPs are mixtures of experts.

config.json <-> TransformerConfig as Mistral (``megacore.interop.families.mistral``), plus
``num_local_experts`` <-> ``model.num_experts``, ``num_experts_per_tok`` <-> ``model.moe_top_k``,
and ``router_aux_loss_coef`` <-> ``model.moe_aux_loss_coeff`` when ``output_router_logits`` is set
(transformers adds the balancing loss only then; else 0). Export needs renormalized top-k router
weights and experts of ``ffn_hidden_size``.

Weights per layer (``model.layers.i.block_sparse_moe.``), instead of Llama's MLP:

    gate.weight                                  <-> decoder.layers.i.mlp.router.weight
    experts.e.{w1 ; w3}.weight, stacked over e   <-> decoder.layers.i.mlp.experts.linear_fc1 [E, 2F, h]
    experts.e.w2.weight, stacked over e          <-> decoder.layers.i.mlp.experts.linear_fc2 [E, h, F]
"""

from __future__ import annotations

from typing import Any

from megacore.config import TransformerConfig
from megacore.interop.families.mistral import MistralAdapter
from megacore.interop.hf_weights import Rule, experts_gate_up, experts_stacked, same


class MixtralAdapter(MistralAdapter):
    name, model_type, architectures = "mixtral", "mixtral", ("MixtralForCausalLM",)
    defaults = {**MistralAdapter.defaults, "rms_norm_eps": 1e-5, "num_experts_per_tok": 2}
    guess_rank = 20  # MoE layers
    moe = True

    def extra_fields(self, hf: dict) -> dict[str, Any]:
        coeff = float(hf.get("router_aux_loss_coef", 0.0)) if hf.get("output_router_logits", False) else 0.0
        return dict(num_experts=int(self.require(hf, "num_local_experts")),
                    moe_top_k=int(self.get(hf, "num_experts_per_tok")), moe_aux_loss_coeff=coeff)

    def check_extra(self, c: TransformerConfig) -> None:
        if c.num_experts is None:
            self.cannot("num_experts", None, "MoE layers (model.num_experts)")
        if not c.moe_router_norm_topk:
            self.cannot("moe_router_norm_topk", False, "renormalized top-k router weights")
        if c.moe_ffn_size != c.ffn_size:
            self.cannot("moe_ffn_hidden_size", c.moe_ffn_hidden_size, "experts of ffn_hidden_size")
        # Mixtral's router: plain softmax top-k over all experts, no bias, scaling or capacity.
        self.check_fields(c, [("moe_router_score", "softmax"), ("moe_router_bias_update_rate", 0.0),
                              ("moe_router_num_groups", None), ("moe_routed_scaling_factor", 1.0),
                              ("moe_capacity_factor", None)])

    def write_extra(self, c: TransformerConfig, out: dict) -> None:
        super().write_extra(c, out)
        out.update(num_local_experts=c.num_experts, num_experts_per_tok=c.moe_top_k,
                   router_aux_loss_coef=c.moe_aux_loss_coeff, output_router_logits=c.moe_aux_loss_coeff > 0)

    def mlp_rules(self, c: TransformerConfig, ours: str, hf: str) -> list[Rule]:
        moe, e = f"{hf}block_sparse_moe.", c.num_experts
        return [*same([(f"{ours}mlp.router.weight", f"{moe}gate.weight")]),
                Rule(f"{ours}mlp.experts.linear_fc1",
                     tuple(f"{moe}experts.{j}.{w}.weight" for j in range(e) for w in ("w1", "w3")),
                     *experts_gate_up(e)),
                Rule(f"{ours}mlp.experts.linear_fc2", tuple(f"{moe}experts.{j}.w2.weight" for j in range(e)),
                     *experts_stacked(e))]

    def reads_like(self, c: TransformerConfig) -> bool:
        return c.num_experts is not None


ADAPTER = MixtralAdapter()
