"""NemotronH (``NemotronHForCausalLM``) <-> megacore hybrid stacks.

NemotronH is the Megatron-style hybrid: every layer is ``x + mixer(norm(x))`` with a Mamba-2, an
attention (no rotary) or a squared-ReLU MLP mixer, listed in ``layers_block_type`` (older configs:
``hybrid_override_pattern`` with megacore's own characters). Both map one to one onto
``model.layer_pattern`` and the ``mamba_*`` keys (``mamba_num_heads``, ``mamba_head_dim``,
``ssm_state_size``, ``n_groups``, ``conv_kernel``, ``chunk_size``, ``time_step_min``);
``mlp_hidden_act`` relu2 <-> ``squared_relu``. No linear biases, no rotary; MoE layers ('E' /
"moe": shared expert, non-gated experts) are not supported.

Weights (base prefix ``backbone.``; per layer ``backbone.layers.i.``):

    embeddings.weight (vocab-padded)        <-> embedding.word_embeddings.weight
    norm.weight                             <-> decoder.layers.i.input_norm.weight
    Mamba: mixer.{in_proj.weight, conv1d.weight, conv1d.bias, dt_bias, A_log, D, out_proj.weight}
                                            <-> decoder.layers.i.mixer.<same name>
           mixer.norm.weight                <-> decoder.layers.i.mixer.norm_weight
    attention: mixer.{q,k,v}_proj.weight    <-> decoder.layers.i.self_attention.linear_qkv (grouped fusion)
               mixer.o_proj.weight          <-> decoder.layers.i.self_attention.linear_proj.weight
    MLP: mixer.up_proj.weight / down_proj   <-> decoder.layers.i.mlp.linear_fc1 / linear_fc2 .weight
    norm_f.weight                           <-> decoder.final_norm.weight
    lm_head.weight (untied only)            <-> output_layer.weight
"""

from __future__ import annotations

from typing import Any, Optional

from megacore.config import ConfigError, TransformerConfig
from megacore.interop.adapter import CausalLMAdapter
from megacore.interop.hf_activations import SILU, ActivationNames
from megacore.interop.hf_weights import Rule, config_qkv, output_rules, same, vocab_rule

_KIND_TO_HF = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
_HF_TO_KIND = {**{v: k for k, v in _KIND_TO_HF.items()}, "mamba": "M", "attention": "*"}  # + earlier spellings
MLP_ACT = ActivationNames("mlp_hidden_act", {"squared_relu": ("relu2",)}, default="relu2")
_MAMBA_NAMES = [("in_proj.weight", "in_proj.weight"), ("conv1d.weight", "conv1d.weight"),
                ("conv1d.bias", "conv1d.bias"), ("dt_bias", "dt_bias"), ("A_log", "A_log"), ("D", "D"),
                ("norm_weight", "norm.weight"), ("out_proj.weight", "out_proj.weight")]


class NemotronHAdapter(CausalLMAdapter):
    name, model_type, architectures = "nemotron_h", "nemotron_h", ("NemotronHForCausalLM",)
    base_prefix = "backbone."  # NemotronH checkpoints store the base model as backbone.*
    defaults = {"max_position_embeddings": 4096, "layer_norm_epsilon": 1e-5, "attention_dropout": 0.0,
                "tie_word_embeddings": False, "initializer_range": 0.02, "n_groups": 1, "conv_kernel": 4,
                "chunk_size": 128, "time_step_min": 0.001}
    activations = (MLP_ACT,)
    guess_rank = 0  # a layer pattern

    def _pattern(self, hf: dict) -> str:
        kinds = hf.get("layers_block_type") or hf.get("layer_types")
        if kinds:
            unknown = sorted({k for k in kinds if k not in _HF_TO_KIND})
            if unknown:
                raise ConfigError(f"nemotron_h layers_block_type has layer kinds {unknown} that megacore cannot build "
                                  f"(supported: {sorted(_HF_TO_KIND)}; MoE layers are not supported)")
            return "".join(_HF_TO_KIND[k] for k in kinds)
        pattern = hf.get("hybrid_override_pattern")
        if not pattern:
            raise ConfigError("nemotron_h config.json has neither layers_block_type nor hybrid_override_pattern")
        if set(pattern) - set(_KIND_TO_HF):
            raise ConfigError(f"nemotron_h hybrid_override_pattern={pattern!r} has layer kinds megacore cannot build "
                              "(supported: 'M', '*', '-'; MoE layers 'E' are not supported)")
        return pattern

    def fields_from_hf(self, hf: dict) -> dict[str, Any]:
        if hf.get("mamba_hidden_act", "silu") not in SILU:
            raise ConfigError(f"nemotron_h mamba_hidden_act={hf['mamba_hidden_act']!r} is not supported; megacore's "
                              "Mamba mixer uses 'silu'")
        for key in ("use_bias", "mlp_bias", "attention_bias", "mamba_proj_bias"):
            if hf.get(key, False):
                raise ConfigError(f"nemotron_h {key}=true is not supported: megacore's hybrid layers have no linear "
                                  "biases")
        if not hf.get("use_conv_bias", True):
            raise ConfigError("nemotron_h use_conv_bias=false is not supported: megacore's Mamba conv1d has a bias")
        pattern = self._pattern(hf)
        hidden, heads = int(self.require(hf, "hidden_size")), int(self.require(hf, "num_attention_heads"))
        head_dim = hf.get("head_dim")
        return dict(
            num_layers=len(pattern), layer_pattern=pattern, hidden_size=hidden, num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            kv_channels=None if head_dim is None or int(head_dim) == hidden // heads else int(head_dim),
            ffn_hidden_size=int(self.require(hf, "intermediate_size")), vocab_size=int(self.require(hf, "vocab_size")),
            seq_length=int(self.get(hf, "max_position_embeddings")), normalization="RMSNorm",
            norm_epsilon=float(self.get(hf, "layer_norm_epsilon")), activation=MLP_ACT.to_ours(hf, self.name),
            position_embedding="none", attention_dropout=float(self.get(hf, "attention_dropout")),
            tie_embeddings=bool(self.get(hf, "tie_word_embeddings")), init_std=float(self.get(hf, "initializer_range")),
            mamba_num_heads=int(self.require(hf, "mamba_num_heads")),
            mamba_head_dim=int(self.require(hf, "mamba_head_dim")),
            mamba_state_dim=int(self.require(hf, "ssm_state_size")), mamba_num_groups=int(self.get(hf, "n_groups")),
            mamba_conv_kernel=int(self.get(hf, "conv_kernel")), mamba_chunk_size=int(self.get(hf, "chunk_size")),
            # transformers' mixer clamps the time step at time_step_min (its time_step_limit is unused)
            mamba_dt_clamp_min=float(self.get(hf, "time_step_min")),
        )

    def check_exportable(self, c: TransformerConfig) -> None:
        if c.layer_pattern is None:
            self.cannot("layer_pattern", None, "a hybrid stack (model.layer_pattern)")
        if c.num_experts is not None:
            self.cannot("num_experts", c.num_experts, "dense MLP layers (its MoE layers are not supported)")
        self.activation_to_hf(MLP_ACT, c.activation, "activation")
        self.check_fields(c, [("normalization", "RMSNorm"), ("position_embedding", "none"), ("add_qkv_bias", False),
                              ("add_bias_linear", False), ("sliding_window", None), ("qk_norm", False),
                              ("attention_softmax_scale", None)])

    def write_hf(self, c: TransformerConfig, out: dict, base: Optional[dict]) -> None:
        out.pop("hybrid_override_pattern", None)
        out.update(
            hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
            layers_block_type=[_KIND_TO_HF[k] for k in c.layer_pattern], num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate_size=c.ffn_size,
            max_position_embeddings=c.seq_length, layer_norm_epsilon=c.norm_epsilon,
            mlp_hidden_act=MLP_ACT.to_hf(c.activation), attention_dropout=c.attention_dropout, attention_bias=False,
            mlp_bias=False, use_bias=False, mamba_num_heads=c.mamba_heads, mamba_head_dim=c.mamba_head_dim,
            ssm_state_size=c.mamba_state_dim, n_groups=c.mamba_num_groups, conv_kernel=c.mamba_conv_kernel,
            chunk_size=c.mamba_chunk_size, use_conv_bias=True, mamba_hidden_act="silu",
            time_step_min=c.mamba_dt_clamp_min,
        )

    def weight_rules(self, c: TransformerConfig, prefix: str) -> list[Rule]:
        rules = [vocab_rule("embedding.word_embeddings.weight", f"{prefix}embeddings.weight", c)]
        for i, kind in enumerate(c.layer_pattern):
            ours, hf = f"decoder.layers.{i}.", f"{prefix}layers.{i}."
            rules += same([(f"{ours}input_norm.weight", f"{hf}norm.weight")])
            if kind == "M":
                rules += same([(f"{ours}mixer.{a}", f"{hf}mixer.{b}") for a, b in _MAMBA_NAMES])
            elif kind == "*":
                rules += [Rule(f"{ours}self_attention.linear_qkv.weight",
                               tuple(f"{hf}mixer.{p}_proj.weight" for p in "qkv"), *config_qkv(c)),
                          *same([(f"{ours}self_attention.linear_proj.weight", f"{hf}mixer.o_proj.weight")])]
            else:
                rules += same([(f"{ours}mlp.linear_fc1.weight", f"{hf}mixer.up_proj.weight"),
                               (f"{ours}mlp.linear_fc2.weight", f"{hf}mixer.down_proj.weight")])
        rules += same([("decoder.final_norm.weight", f"{prefix}norm_f.weight")])
        return rules + output_rules(c)

    def reads_like(self, c: TransformerConfig) -> bool:
        return c.layer_pattern is not None


ADAPTER = NemotronHAdapter()
