"""Qwen2 (``Qwen2ForCausalLM``): Llama with q/k/v biases and an optional sliding window.

config.json <-> TransformerConfig as Llama (``megacore.interop.families.llama``), except: q/k/v
always have biases and o_proj/the MLP never (``add_qkv_bias=True``, ``add_bias_linear=False``;
``attention_bias``/``mlp_bias`` are not Qwen2 keys); ``sliding_window`` applies only when
``use_sliding_window`` is set and every layer slides (layers from ``max_window_layers`` on slide,
or as ``layer_types`` says). Weight names are Llama's, with ``self_attn.{q,k,v}_proj.bias``.
"""

from __future__ import annotations

from typing import Any, Optional

from megacore.config import TransformerConfig
from megacore.interop.families.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    name, model_type, architectures = "qwen2", "qwen2", ("Qwen2ForCausalLM",)
    defaults = {**LlamaAdapter.defaults, "max_position_embeddings": 32768, "max_window_layers": 28}
    guess_rank = 30  # q/k/v bias without linear bias

    def biases(self, hf: dict) -> tuple[bool, bool]:
        return True, False

    def sliding_window(self, hf: dict, num_layers: int) -> Optional[int]:
        if not hf.get("use_sliding_window", False):
            return None
        window, layer_types = hf.get("sliding_window"), hf.get("layer_types")
        if layer_types is None and window is not None:
            start = self.get(hf, "max_window_layers")
            layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
        return self.sliding_from_layer_types(window, layer_types)

    def export_checks(self, c: TransformerConfig) -> list[tuple[str, Any]]:
        return [("add_qkv_bias", True), ("add_bias_linear", False)]

    def check_extra(self, c: TransformerConfig) -> None:
        pass

    def write_extra(self, c: TransformerConfig, out: dict) -> None:
        sliding = c.sliding_window is not None
        out.update(use_sliding_window=sliding, sliding_window=c.sliding_window,
                   max_window_layers=0 if sliding else c.num_layers,
                   layer_types=[("sliding_attention" if sliding else "full_attention")] * c.num_layers)

    def reads_like(self, c: TransformerConfig) -> bool:
        return c.add_qkv_bias and not c.add_bias_linear


ADAPTER = Qwen2Adapter()
