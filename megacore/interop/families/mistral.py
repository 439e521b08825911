"""Mistral (``MistralForCausalLM``): Llama with a sliding attention window.

config.json <-> TransformerConfig as Llama (``megacore.interop.families.llama``), plus
``sliding_window`` <-> ``model.sliding_window`` (one window for every layer: ``layer_types`` that
mix sliding and full layers are refused); no linear biases. Weight names are Llama's.
"""

from __future__ import annotations

from typing import Any, Optional

from megacore.config import TransformerConfig
from megacore.interop.families.llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    name, model_type, architectures = "mistral", "mistral", ("MistralForCausalLM",)
    defaults = {**LlamaAdapter.defaults, "max_position_embeddings": 4096 * 32}
    guess_rank = 40  # a sliding window

    def sliding_window(self, hf: dict, num_layers: int) -> Optional[int]:
        return self.sliding_from_layer_types(hf.get("sliding_window"), hf.get("layer_types"))

    def export_checks(self, c: TransformerConfig) -> list[tuple[str, Any]]:
        return [("add_qkv_bias", False), ("add_bias_linear", False)]

    def check_extra(self, c: TransformerConfig) -> None:
        pass

    def write_extra(self, c: TransformerConfig, out: dict) -> None:
        out["sliding_window"] = c.sliding_window

    def reads_like(self, c: TransformerConfig) -> bool:
        return c.sliding_window is not None


ADAPTER = MistralAdapter()
