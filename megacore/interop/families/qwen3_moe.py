"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen2-MoE without q/k/v bias and without a shared expert,
with per-head RMSNorm of q and k.

config.json <-> TransformerConfig as Qwen2-MoE (``megacore.interop.families.qwen2_moe``: experts,
``norm_topk_prob``, ``decoder_sparse_step`` / ``mlp_only_layers``, ``router_aux_loss_coef``), except:

- ``model.qk_norm`` is always on: ``self_attn.{q,k}_norm.weight`` [head_dim], applied per head
  before the rotary embedding, with ``rms_norm_eps`` (megacore's ``q_norm``/``k_norm`` exactly);
- ``head_dim`` is written always (Qwen3 sets it apart from hidden/heads);
- ``attention_bias`` must be false: transformers then puts biases on q, k, v *and* o_proj but none
  on the MLPs, which megacore's two switches (``add_qkv_bias``; ``add_bias_linear`` for o_proj and
  every MLP) cannot express;
- the expert count is ``num_experts`` (the hub's key) or ``num_local_experts`` (what transformers
  5 writes); export writes back the key the loaded config used, else ``num_experts``;
- ``use_sliding_window`` applies ``sliding_window`` to every layer.

Weights: Qwen2-MoE's, less ``shared_expert*``, plus ``self_attn.{q,k}_norm.weight`` <->
``decoder.layers.i.self_attention.{q,k}_norm.weight``.
"""

from __future__ import annotations

from typing import Any, Optional

from megacore.config import ConfigError, TransformerConfig
from megacore.interop.families.qwen2_moe import Qwen2MoeAdapter


class Qwen3MoeAdapter(Qwen2MoeAdapter):
    name, model_type, architectures = "qwen3_moe", "qwen3_moe", ("Qwen3MoeForCausalLM",)
    defaults = {**Qwen2MoeAdapter.defaults, "num_experts_per_tok": 8, "attention_bias": False}
    guess_rank = 10  # MoE layers with q/k norm
    shared_expert = False
    qk_norm = True
    experts_keys = ("num_experts", "num_local_experts")
    writes_head_dim = True

    def biases(self, hf: dict) -> tuple[bool, bool]:
        if self.get(hf, "attention_bias"):
            raise ConfigError("attention_bias=true is not supported for qwen3_moe: transformers then adds biases to "
                              "q, k, v and o_proj but not to the MLPs, and megacore's add_bias_linear would add "
                              "them to o_proj and every MLP alike")
        return False, False

    def sliding_window(self, hf: dict, num_layers: int) -> Optional[int]:
        window = hf.get("sliding_window")
        return int(window) if hf.get("use_sliding_window", False) and window is not None else None

    def extra_fields(self, hf: dict) -> dict[str, Any]:
        return {**super().extra_fields(hf), "qk_norm": True}

    def export_checks(self, c: TransformerConfig) -> list[tuple[str, Any]]:
        return [("qk_norm", True), ("qk_norm_scope", "head"), ("add_qkv_bias", False), ("add_bias_linear", False)]

    def write_sliding(self, c: TransformerConfig, out: dict) -> None:
        out["use_sliding_window"] = c.sliding_window is not None
        if c.sliding_window is not None:
            out["sliding_window"] = c.sliding_window
        else:
            out.setdefault("sliding_window", None)

    def write_biases(self, c: TransformerConfig, out: dict) -> None:
        out["attention_bias"] = False

    def reads_like(self, c: TransformerConfig) -> bool:
        return c.num_experts is not None and c.qk_norm and c.qk_norm_scope == "head"


ADAPTER = Qwen3MoeAdapter()
