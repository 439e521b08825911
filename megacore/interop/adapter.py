"""What a Hugging Face model family is to megacore: an adapter object, one per module in
``megacore/interop/families/`` (found there by ``megacore.interop.registry``).

An adapter holds everything family-specific, so the shared code (reading safetensors, checking
names and shapes, copying, writing) has no per-family branches:

- identity: ``name``, the ``model_type`` and ``architectures`` of its ``config.json`` (the first
  architecture is written on export), the prefix its checkpoints put before the base model;
- ``defaults``: the transformers config class's values for keys a ``config.json`` may omit;
- ``activations``: its activation-name tables (``ActivationNames``), both directions;
- config: ``fields_from_hf`` (config.json -> TransformerConfig fields) and ``write_hf`` (back);
- export: ``check_exportable`` (ConfigError naming the first field it cannot hold);
- weights: ``weight_rules`` (megacore names <-> HF names, with transforms) and ``is_ignorable``
  (checkpoint tensors that carry nothing megacore needs);
- ``reads_like``: whether a model built from scratch looks like this family (``guess_rank`` orders
  the guesses, most specific first).
"""

from __future__ import annotations

from typing import Any, Callable, NoReturn, Optional

from megacore.config import ConfigError, TransformerConfig
from megacore.interop.hf_activations import ActivationNames
from megacore.interop.hf_weights import Rule


class FamilyAdapter:
    """The identity and helpers every family shares (causal LMs and composite models alike)."""

    name: str = ""
    model_type: str = ""
    architectures: tuple[str, ...] = ()
    entry_point: str = "megacore.interop.hf.load_pretrained"  # named in errors that redirect here
    defaults: dict[str, Any] = {}
    activations: tuple[ActivationNames, ...] = ()

    @property
    def architecture(self) -> str:
        """The class name written to ``architectures`` on export."""
        return self.architectures[0]

    def get(self, hf: dict, key: str) -> Any:
        """``hf[key]``, or this family's default when the key is absent or null."""
        value = hf.get(key)
        return self.defaults.get(key) if value is None else value

    def require(self, hf: dict, key: str) -> Any:
        value = self.get(hf, key)
        if value is None:
            raise ConfigError(f"{self.name} config.json lacks {key!r}; it is required to build the model")
        return value

    def cannot(self, field: str, value: Any, need: str, section: str = "model") -> NoReturn:
        raise ConfigError(f"cannot export to Hugging Face {self.name}: {section}.{field}={value!r} but {self.name} "
                          f"needs {need}; pick another family (save_pretrained(..., family=...)) or change the model")

    def check_fields(self, config: Any, checks: list[tuple[str, Any]], section: str = "model") -> None:
        """``cannot`` for the first ``(field, value needed)`` pair ``config`` does not meet."""
        for field, need in checks:
            if getattr(config, field) != need:
                self.cannot(field, getattr(config, field), f"{field}={need!r}", section)

    def activation_to_hf(self, names: ActivationNames, ours: str, field: str, section: str = "model") -> str:
        """The transformers name of megacore activation ``ours`` under ``names.key``; ``cannot`` if none."""
        hf_name = names.to_hf(ours)
        if hf_name is None:
            self.cannot(field, ours, f"one of {list(names.table)}", section)
        return hf_name


class CausalLMAdapter(FamilyAdapter):
    """A family whose checkpoints are a ``GPTModel`` (``AutoModelForCausalLM``)."""

    base_prefix: str = "model."  # before the base model's names in the CausalLM's checkpoints
    guess_rank: int = 100        # order of ``reads_like`` checks in ``infer_family`` (lower first)

    def fields_from_hf(self, hf: dict) -> dict[str, Any]:
        """TransformerConfig fields of a ``config.json`` dict; ConfigError for what cannot be built."""
        raise NotImplementedError

    def check_exportable(self, c: TransformerConfig) -> None:
        """ConfigError (``cannot``) naming the first field of ``c`` this family cannot represent."""
        raise NotImplementedError

    def write_hf(self, c: TransformerConfig, out: dict, base: Optional[dict]) -> None:
        """Write the structural keys of ``c`` into ``out`` (a copy of ``base``, the dict the model was
        loaded from, when there is one; the shared identity keys are already written)."""
        raise NotImplementedError

    def weight_rules(self, c: TransformerConfig, prefix: str) -> list[Rule]:
        """Every parameter of ``GPTModel(c)`` <-> its HF tensors, base model names under ``prefix``."""
        raise NotImplementedError

    def weight_rules_for(self, hf_config: Optional[dict], c: TransformerConfig, prefix: str) -> list[Rule]:
        """``weight_rules`` for the checkpoint of ``hf_config`` (the config.json read, or the one the
        model was loaded from on export; None for a model built in megacore). A family whose tensor
        layout depends on a config.json key beyond TransformerConfig reads it here (DeepSeek-V3's
        ``rope_interleave``)."""
        return self.weight_rules(c, prefix)

    def is_ignorable(self, name: str, c: TransformerConfig) -> bool:
        """Checkpoint tensors with nothing megacore needs: cached rotary tables and a tied
        ``lm_head.weight`` that some checkpoints store anyway."""
        return name.endswith("rotary_emb.inv_freq") or (c.tie_embeddings and name == "lm_head.weight")

    def ignorable_in(self, hf_config: dict, c: TransformerConfig) -> Callable[[str], bool]:
        """``is_ignorable`` for the checkpoint of ``hf_config`` (a family whose checkpoints carry modules
        transformers does not run, counted in config.json, widens it: DeepSeek-V3's MTP layers)."""
        return lambda name: self.is_ignorable(name, c)

    def fields_from_checkpoint(self, hf_config: dict, c: TransformerConfig, names: list[str]) -> dict[str, Any]:
        """TransformerConfig fields that depend on which tensors the checkpoint holds (``names``), to
        replace those of ``c`` (the config.json mapping) unless the caller overrides them; default
        none. DeepSeek-V3: no MTP depths when config.json counts some but no tensor of theirs is there."""
        return {}

    def reads_like(self, c: TransformerConfig) -> bool:
        """Whether a model built in megacore looks like this family (for ``infer_family``)."""
        return False

    def check_plain_decoder(self, c: TransformerConfig, moe: bool = False, qk_norm: bool = False,
                            mla: bool = False) -> None:
        """The transformer decoders of HF: no hybrid stack, plain norm weights, no q/k norm unless
        ``qk_norm`` (per-head RMSNorm, as megacore's), dense MLPs unless ``moe``, and q/k/v attention
        unless ``mla`` (multi-latent attention, DeepSeek)."""
        if c.num_experts is not None and not moe:
            self.cannot("num_experts", c.num_experts, "dense MLPs")
        if c.multi_latent_attention != mla:
            self.cannot("multi_latent_attention", c.multi_latent_attention,
                        "multi-latent attention" if mla else "q/k/v attention (multi-latent attention: deepseek_v3)")
        if c.layer_pattern is not None:
            self.cannot("layer_pattern", c.layer_pattern, "attention+MLP layers only (no hybrid stacks)")
        if c.qk_norm and not qk_norm:
            self.cannot("qk_norm", True, "no q/k norm")
        if c.layernorm_zero_centered_gamma:
            self.cannot("layernorm_zero_centered_gamma", True, "plain norm weights")

    def check_softmax_router(self, c: TransformerConfig) -> None:
        """The routers of HF's Mixtral/Qwen MoE families: softmax over all experts, top-k, no expert
        bias, no group-limited choice, no scaling of the routed weights. (Capacity, z-loss and the
        kind of balancing loss shape training only; a dropless HF model runs the same weights.)"""
        self.check_fields(c, [("moe_router_score", "softmax"), ("moe_router_bias_update_rate", 0.0),
                              ("moe_router_expert_bias", False), ("moe_router_num_groups", None),
                              ("moe_routed_scaling_factor", 1.0)])
