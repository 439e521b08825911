"""Qwen2-MoE (``Qwen2MoeForCausalLM``): Qwen2 whose MLPs are mixtures of experts with a gated
shared expert, some layers optionally dense. Also the base of Qwen3-MoE (``qwen3_moe``).

config.json <-> TransformerConfig as Llama (``megacore.interop.families.llama``), plus:

- ``qkv_bias`` (default true) <-> ``model.add_qkv_bias``; o_proj and the MLPs have no bias;
- ``num_experts`` / ``num_experts_per_tok`` / ``moe_intermediate_size`` <-> ``model.num_experts`` /
  ``moe_top_k`` / ``moe_ffn_hidden_size``; ``intermediate_size`` is the dense layers' width
  (``ffn_hidden_size``); ``norm_topk_prob`` <-> ``moe_router_norm_topk``;
- ``shared_expert_intermediate_size`` <-> ``moe_shared_expert_hidden_size`` with
  ``moe_shared_expert_gate`` (Qwen2-MoE always gates its shared expert by sigmoid(x·w));
- which layers are sparse: HF's layer i is MoE iff ``i not in mlp_only_layers`` and
  ``(i + 1) % decoder_sparse_step == 0``; megacore's iff ``i >= moe_first_k_dense`` and
  ``(i - moe_first_k_dense) % moe_layer_freq == 0``. Import takes the (k, n) giving exactly HF's set
  and refuses a set no (k, n) gives; export keeps the loaded keys when they still give the model's
  set, else writes the ``decoder_sparse_step`` needing the fewest ``mlp_only_layers``;
- ``router_aux_loss_coef`` <-> ``moe_aux_loss_coeff`` when ``output_router_logits`` is set (as
  Mixtral; transformers adds the balancing loss only then, else 0);
- ``use_sliding_window``: a window only when every layer slides (``layer_types``, else layers
  i < ``max_window_layers`` with even i slide, as transformers derives them).

Weights per MoE layer (``model.layers.i.mlp.``; dense layers keep Llama's ``mlp.{gate,up,down}_proj``):

    gate.weight                                      <-> decoder.layers.i.mlp.router.weight
    experts.e.{gate_proj ; up_proj}.weight, over e   <-> decoder.layers.i.mlp.experts.linear_fc1 [E, 2F, h]
    experts.e.down_proj.weight, stacked over e       <-> decoder.layers.i.mlp.experts.linear_fc2 [E, h, F]
    shared_expert.{gate_proj ; up_proj}.weight       <-> decoder.layers.i.mlp.shared_expert.linear_fc1
    shared_expert.down_proj.weight                   <-> decoder.layers.i.mlp.shared_expert.linear_fc2
    shared_expert_gate.weight [1, h]                 <-> decoder.layers.i.mlp.shared_expert_gate.weight

(transformers 5 holds the experts fused in memory, ``experts.gate_up_proj`` [E, 2F, h] and
``experts.down_proj``, but reads and writes the per-expert names above in its files.)
"""

from __future__ import annotations

from typing import Any, Optional

from megacore.config import ConfigError, TransformerConfig
from megacore.interop.families.llama import LlamaAdapter
from megacore.interop.hf_weights import Rule, experts_gate_up, experts_stacked, gate_up, same


def moe_layers(num_layers: int, first_k_dense: int, layer_freq: int) -> list[int]:
    """megacore's MoE layers (``TransformerConfig.is_moe_layer``) for these settings."""
    return [i for i in range(first_k_dense, num_layers) if (i - first_k_dense) % layer_freq == 0]


def hf_sparse_layers(num_layers: int, sparse_step: int, mlp_only: list[int]) -> list[int]:
    """transformers' Qwen-MoE sparse layers: not in ``mlp_only_layers``, (i + 1) % step == 0."""
    return [i for i in range(num_layers) if i not in mlp_only and (i + 1) % sparse_step == 0]


class Qwen2MoeAdapter(LlamaAdapter):
    name, model_type, architectures = "qwen2_moe", "qwen2_moe", ("Qwen2MoeForCausalLM",)
    defaults = {**LlamaAdapter.defaults, "max_position_embeddings": 32768, "max_window_layers": 28,
                "num_experts_per_tok": 4, "decoder_sparse_step": 1, "norm_topk_prob": False, "qkv_bias": True}
    guess_rank = 11  # MoE layers with a shared expert
    moe = True
    shared_expert = True        # the sparse blocks carry a gated shared expert
    experts_keys = ("num_experts",)  # config.json keys of the expert count (the first is written)
    writes_head_dim = False     # head_dim is not a Qwen2MoeConfig key: written only when it differs

    # ------------------------------------------------------------------------------ import
    def biases(self, hf: dict) -> tuple[bool, bool]:
        return bool(self.get(hf, "qkv_bias")), False

    def sliding_window(self, hf: dict, num_layers: int) -> Optional[int]:
        if not hf.get("use_sliding_window", False):
            return None
        window, layer_types = hf.get("sliding_window"), hf.get("layer_types")
        if layer_types is None:
            start = self.get(hf, "max_window_layers")
            layer_types = ["sliding_attention" if (i + 1) % 2 and i < start else "full_attention"
                           for i in range(num_layers)]
        return self.sliding_from_layer_types(window, layer_types)

    def num_experts(self, hf: dict) -> int:
        for key in self.experts_keys:
            if hf.get(key) is not None:
                return int(hf[key])
        raise ConfigError(f"{self.name} config.json lacks {self.experts_keys[0]!r}; it is required to build the model")

    def moe_layout(self, hf: dict, num_layers: int, num_experts: int) -> tuple[int, int]:
        """(moe_first_k_dense, moe_layer_freq) giving exactly HF's sparse layers; ConfigError otherwise."""
        step, mlp_only = int(self.get(hf, "decoder_sparse_step")), hf.get("mlp_only_layers") or []
        if not isinstance(mlp_only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in mlp_only):
            raise ConfigError(f"mlp_only_layers={mlp_only!r} must be a list of layer indices")
        sparse = hf_sparse_layers(num_layers, step, mlp_only) if num_experts > 0 else []
        for k in range(num_layers):
            for n in range(1, num_layers + 1):
                if moe_layers(num_layers, k, n) == sparse:
                    return k, n
        raise ConfigError(
            f"decoder_sparse_step={step} with mlp_only_layers={mlp_only} (num_experts={num_experts}) makes layers "
            f"{sparse} of {num_layers} sparse, which megacore cannot represent: its MoE layers are every "
            "moe_layer_freq-th layer from moe_first_k_dense on (at least one); the dense layers must come first, "
            "the sparse ones evenly spaced after them")

    def extra_fields(self, hf: dict) -> dict[str, Any]:
        layers, experts = int(self.require(hf, "num_hidden_layers")), self.num_experts(hf)
        first_k, freq = self.moe_layout(hf, layers, experts)
        coeff = float(hf.get("router_aux_loss_coef") or 0.0) if hf.get("output_router_logits", False) else 0.0
        fields = dict(num_experts=experts, moe_top_k=int(self.get(hf, "num_experts_per_tok")),
                      moe_ffn_hidden_size=int(self.require(hf, "moe_intermediate_size")),
                      moe_router_norm_topk=bool(self.get(hf, "norm_topk_prob")), moe_aux_loss_coeff=coeff,
                      moe_first_k_dense=first_k, moe_layer_freq=freq)
        if self.shared_expert:
            fields.update(moe_shared_expert_hidden_size=int(self.require(hf, "shared_expert_intermediate_size")),
                          moe_shared_expert_gate=True)
        return fields

    # ------------------------------------------------------------------------------ export
    def export_checks(self, c: TransformerConfig) -> list[tuple[str, Any]]:
        return [("add_bias_linear", False)]

    def check_extra(self, c: TransformerConfig) -> None:
        if c.num_experts is None:
            self.cannot("num_experts", None, "MoE layers (model.num_experts)")
        self.check_softmax_router(c)
        if self.shared_expert:
            if c.moe_shared_expert_hidden_size is None:
                self.cannot("moe_shared_expert_hidden_size", None,
                            "a shared expert in every MoE layer (shared_expert_intermediate_size)")
            self.check_fields(c, [("moe_shared_expert_gate", True)])
        else:
            self.check_fields(c, [("moe_shared_expert_hidden_size", None)])

    def write_layout(self, c: TransformerConfig, out: dict) -> None:
        """``decoder_sparse_step`` / ``mlp_only_layers`` for megacore's MoE layers (``out`` holds the
        loaded config's keys, kept when they still give the same layers)."""
        n = c.num_layers
        want = moe_layers(n, c.moe_first_k_dense, c.moe_layer_freq)
        step, only = out.get("decoder_sparse_step"), out.get("mlp_only_layers")
        if isinstance(step, int) and step >= 1 and isinstance(only, list) and hf_sparse_layers(n, step, only) == want:
            return
        best = None
        for step in range(1, n + 1):
            pattern = hf_sparse_layers(n, step, [])
            if set(want) <= set(pattern):
                only = [i for i in pattern if i not in want]
                if best is None or len(only) < len(best[1]):
                    best = (step, only)
        out.update(decoder_sparse_step=best[0], mlp_only_layers=best[1])

    def write_sliding(self, c: TransformerConfig, out: dict) -> None:
        """All layers slide or none (``layer_types`` spelled out); inert keys of the loaded config stay."""
        sliding = c.sliding_window is not None
        out["use_sliding_window"] = sliding
        out["layer_types"] = [("sliding_attention" if sliding else "full_attention")] * c.num_layers
        if sliding:
            out["sliding_window"] = c.sliding_window
        else:
            out.setdefault("sliding_window", None)
        out.setdefault("max_window_layers", c.num_layers)

    def write_extra(self, c: TransformerConfig, out: dict) -> None:
        key = next((k for k in self.experts_keys if k in out), self.experts_keys[0])
        out[key] = c.num_experts
        out.update(num_experts_per_tok=c.moe_top_k, moe_intermediate_size=c.moe_ffn_size,
                   norm_topk_prob=c.moe_router_norm_topk)
        if c.moe_aux_loss_coeff > 0:
            out.update(router_aux_loss_coef=c.moe_aux_loss_coeff, output_router_logits=True)
        else:  # transformers adds no balancing loss; a coefficient the loaded config holds stays, inert
            out["output_router_logits"] = False
            out.setdefault("router_aux_loss_coef", 0.0)
        if self.shared_expert:
            out["shared_expert_intermediate_size"] = c.moe_shared_expert_hidden_size
        self.write_layout(c, out)
        self.write_sliding(c, out)
        self.write_biases(c, out)

    def write_biases(self, c: TransformerConfig, out: dict) -> None:
        out["qkv_bias"] = c.add_qkv_bias

    def write_hf(self, c: TransformerConfig, out: dict, base: Optional[dict]) -> None:
        super().write_hf(c, out, base)
        if (not self.writes_head_dim and "head_dim" not in (base or {}) and c.kv_channels is None):
            out.pop("head_dim", None)

    # ------------------------------------------------------------------------------ weights
    def mlp_rules(self, c: TransformerConfig, ours: str, hf: str, layer: int) -> list[Rule]:
        if not c.is_moe_layer(layer):
            return super().mlp_rules(c, ours, hf, layer)
        moe, e = f"{hf}mlp.", c.num_experts
        rules = [*same([(f"{ours}mlp.router.weight", f"{moe}gate.weight")]),
                 Rule(f"{ours}mlp.experts.linear_fc1",
                      tuple(f"{moe}experts.{j}.{w}_proj.weight" for j in range(e) for w in ("gate", "up")),
                      *experts_gate_up(e)),
                 Rule(f"{ours}mlp.experts.linear_fc2", tuple(f"{moe}experts.{j}.down_proj.weight" for j in range(e)),
                      *experts_stacked(e))]
        if self.shared_expert:
            shared = f"{moe}shared_expert."
            rules += [Rule(f"{ours}mlp.shared_expert.linear_fc1.weight",
                           (f"{shared}gate_proj.weight", f"{shared}up_proj.weight"), *gate_up()),
                      *same([(f"{ours}mlp.shared_expert.linear_fc2.weight", f"{shared}down_proj.weight"),
                             (f"{ours}mlp.shared_expert_gate.weight", f"{moe}shared_expert_gate.weight")])]
        return rules

    def reads_like(self, c: TransformerConfig) -> bool:
        return c.num_experts is not None and c.moe_shared_expert_hidden_size is not None


ADAPTER = Qwen2MoeAdapter()
