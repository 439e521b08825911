"""LLaVA (``LlavaForConditionalGeneration``): a CLIP vision tower, a two-linear projector and a
language model of any causal-LM family (its adapter is passed in: Llama, Mistral, Qwen2, ...).

config.json <-> ``LlavaConfig``: ``text_config`` through the language model's family;
``vision_config`` (``clip_vision_model`` only) <-> ``VisionConfig`` (``hidden_act`` quick_gelu /
gelu / gelu_pytorch_tanh (+ gelu_new) <-> ``vision.activation``); ``image_token_index``,
``vision_feature_layer`` (one index), ``vision_feature_select_strategy``, ``projector_hidden_act``
(gelu, gelu_pytorch_tanh (+ gelu_new) <-> ``vision.projector_activation`` gelu, gelu_tanh).

Weights: the language model's rules under LLaVA's prefix; CLIP's separate q/k/v projections
become the tower's fused ``linear_qkv`` (one group per head); the projector maps one to one.
Tensor names differ between writers; both spellings are read, the one transformers 5 writes is
written:

=========================  ======================================  ==============================
part                       written (and read)                      also read
=========================  ======================================  ==============================
language model body        ``language_model.model.``               ``model.language_model.``
output layer               ``language_model.lm_head.weight``       ``lm_head.weight``
vision tower               ``vision_tower.``                       ``vision_tower.vision_model.``,
                                                                   ``model.vision_tower.``
projector                  ``multi_modal_projector.``              ``model.multi_modal_projector.``
=========================  ======================================  ==============================
"""

from __future__ import annotations

import dataclasses
from megacore.config import ConfigError, TransformerConfig, VisionConfig
from megacore.interop.adapter import CausalLMAdapter, FamilyAdapter
from megacore.interop.hf_activations import GELU_TANH, ActivationNames
from megacore.interop.hf_weights import Rule, qkv, same
from megacore.models.llava import LlavaConfig

VISION_ACT = ActivationNames("hidden_act", {"quick_gelu": ("quick_gelu",), "gelu": ("gelu",), "gelu_tanh": GELU_TANH,
                                            "relu": ("relu",), "squared_relu": ("relu2",)}, default="quick_gelu")
PROJECTOR_ACT = ActivationNames("projector_hidden_act", {"gelu": ("gelu",), "gelu_tanh": GELU_TANH}, default="gelu")

WRITE = {"lm": "language_model.model.", "head": "language_model.lm_head.weight", "vision": "vision_tower.",
         "projector": "multi_modal_projector."}
READ = {"lm": ("language_model.model.", "model.language_model."),
        "head": ("language_model.lm_head.weight", "lm_head.weight"),
        "vision": ("vision_tower.vision_model.", "model.vision_tower.", "vision_tower."),
        "projector": ("multi_modal_projector.", "model.multi_modal_projector.")}


class LlavaAdapter(FamilyAdapter):
    name, model_type, architectures = "llava", "llava", ("LlavaForConditionalGeneration",)
    entry_point = "megacore.interop.hf_llava.load_pretrained_llava"
    defaults = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                "multimodal_projector_bias": True, "tie_word_embeddings": False}
    vision_defaults = {"model_type": "clip_vision_model", "num_channels": 3, "layer_norm_eps": 1e-5}
    activations = (VISION_ACT, PROJECTOR_ACT)

    # -------------------------------------------------------------------------------------- config
    def text_hf_config(self, hf: dict) -> dict:
        """The language model's config.json dict (``tie_word_embeddings`` from the top level if unset)."""
        if hf.get("model_type") != self.model_type:
            raise ConfigError(f"model_type={hf.get('model_type')!r} is not 'llava'; load it with "
                              "megacore.interop.hf.load_pretrained")
        text = dict(hf["text_config"])
        text.setdefault("tie_word_embeddings", self.get(hf, "tie_word_embeddings"))
        return text

    def config_from_hf(self, hf: dict, text: TransformerConfig) -> LlavaConfig:
        """LlavaConfig from a LLaVA config.json dict and its language model's ``text`` config;
        ConfigError names any setting that cannot be mapped."""
        vision = {**self.vision_defaults, **{k: v for k, v in hf.get("vision_config", {}).items() if v is not None}}
        layer = self.get(hf, "vision_feature_layer")
        if vision["model_type"] != "clip_vision_model":
            raise ConfigError(f"vision_config.model_type={vision['model_type']!r} is not supported; megacore's "
                              "LLaVA vision tower is CLIP's (clip_vision_model)")
        if not isinstance(layer, int):
            raise ConfigError(f"vision_feature_layer={layer!r}: features from several layers are not supported; "
                              "use one layer index")
        if not self.get(hf, "multimodal_projector_bias"):
            raise ConfigError("multimodal_projector_bias=false is not supported: megacore's projector has biases")
        return LlavaConfig(text=text, vision=VisionConfig(
            image_size=vision["image_size"], patch_size=vision["patch_size"],
            num_channels=vision["num_channels"], hidden_size=vision["hidden_size"],
            intermediate_size=vision["intermediate_size"], num_layers=vision["num_hidden_layers"],
            num_attention_heads=vision["num_attention_heads"], norm_epsilon=vision["layer_norm_eps"],
            activation=VISION_ACT.to_ours(vision, "llava vision_config"), enabled=True,
            image_token_id=hf.get("image_token_index", hf.get("image_token_id")), feature_layer=layer,
            feature_select=self.get(hf, "vision_feature_select_strategy"),
            projector_activation=PROJECTOR_ACT.to_ours(hf, self.name))).validate()

    def check_exportable(self, c: LlavaConfig) -> None:
        """ConfigError naming a vision setting transformers' LLaVA cannot hold."""
        self.activation_to_hf(VISION_ACT, c.vision.activation, "activation", "vision")
        self.activation_to_hf(PROJECTOR_ACT, c.vision.projector_activation, "projector_activation", "vision")

    def config_to_hf(self, c: LlavaConfig, text_hf: dict, dtype: str) -> dict:
        """The LLaVA config.json dict around the language model's ``text_hf``."""
        self.check_exportable(c)
        v = c.vision
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "text_config": text_hf, "tie_word_embeddings": c.text.tie_embeddings,
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.hidden_size,
                              "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                              "num_attention_heads": v.num_attention_heads, "image_size": v.image_size,
                              "patch_size": v.patch_size, "num_channels": v.num_channels,
                              "layer_norm_eps": v.norm_epsilon, "hidden_act": VISION_ACT.to_hf(v.activation),
                              "attention_dropout": 0.0},
            "image_token_index": v.image_token_id, "image_seq_length": v.image_seq_length,
            "vision_feature_layer": v.feature_layer, "vision_feature_select_strategy": v.feature_select,
            "projector_hidden_act": PROJECTOR_ACT.to_hf(v.projector_activation), "multimodal_projector_bias": True,
            "torch_dtype": dtype,
        }

    # ------------------------------------------------------------------------------------- weights
    def read_prefixes(self, names: list[str]) -> dict[str, str]:
        """The prefix of each part (see ``READ``) that a checkpoint's tensor ``names`` use."""
        found = {}
        for part, options in READ.items():
            for option in options:
                if any(n == option or n.startswith(option) for n in names):
                    found[part] = option
                    break
        missing = [p for p in ("lm", "vision", "projector") if p not in found]
        if missing:
            raise ValueError(f"the checkpoint has no tensors of the LLaVA {', '.join(missing)} (looked for names "
                             f"starting with {[READ[p] for p in missing]}); is it a LLaVA checkpoint?")
        found.setdefault("head", WRITE["head"])
        return found

    def _vision_rules(self, v: VisionConfig, base: str) -> list[Rule]:
        heads, hd = v.num_attention_heads, v.hidden_size // v.num_attention_heads
        ours = "vision_tower."
        rules = same([(f"{ours}class_embedding", f"{base}embeddings.class_embedding"),
                      (f"{ours}patch_embedding.weight", f"{base}embeddings.patch_embedding.weight"),
                      (f"{ours}position_embedding.weight", f"{base}embeddings.position_embedding.weight")])
        rules += same([(f"{ours}{mine}.{p}", f"{base}{theirs}.{p}") for mine, theirs in
                       (("pre_norm", "pre_layrnorm"), ("post_norm", "post_layernorm")) for p in ("weight", "bias")])
        for i in range(v.num_layers):
            o, h = f"{ours}encoder.layers.{i}.", f"{base}encoder.layers.{i}."
            for p in ("weight", "bias"):
                rules.append(Rule(f"{o}self_attention.linear_qkv.{p}", tuple(f"{h}self_attn.{x}_proj.{p}" for x in "qkv"),
                                  *qkv(heads, heads, hd)))
                rules += same([(f"{o}input_norm.{p}", f"{h}layer_norm1.{p}"),
                               (f"{o}pre_mlp_norm.{p}", f"{h}layer_norm2.{p}"),
                               (f"{o}self_attention.linear_proj.{p}", f"{h}self_attn.out_proj.{p}"),
                               (f"{o}mlp.linear_fc1.{p}", f"{h}mlp.fc1.{p}"),
                               (f"{o}mlp.linear_fc2.{p}", f"{h}mlp.fc2.{p}")])
        return rules

    def weight_rules(self, c: LlavaConfig, text: CausalLMAdapter, prefixes: dict[str, str]) -> list[Rule]:
        """Every parameter of a LlavaModel <-> its HF tensors, under ``prefixes`` (see ``WRITE``);
        the language model's through its family adapter ``text``."""
        lm = []
        for rule in text.weight_rules(c.text, prefixes["lm"]):
            hf = tuple(prefixes["head"] if n == "lm_head.weight" else n for n in rule.hf)
            lm.append(dataclasses.replace(rule, ours=f"language_model.{rule.ours}", hf=hf))
        projector = same([(f"projector.{layer}.{p}", f"{prefixes['projector']}{layer}.{p}")
                          for layer in ("linear_1", "linear_2") for p in ("weight", "bias")])
        return lm + self._vision_rules(c.vision, prefixes["vision"]) + projector

    def is_ignorable(self, name: str, c: LlavaConfig, text: CausalLMAdapter) -> bool:
        """The language model family's ignorable tensors (cached rotary tables, ...)."""
        return text.is_ignorable(name, c.text)


ADAPTER = LlavaAdapter()
