"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-latent attention, a sigmoid group-limited router
with a score-correction bias, shared experts, and dense first layers.

config.json <-> TransformerConfig (transformers' ``DeepseekV3Config`` defaults for absent keys):

- RMSNorm (``rms_norm_eps``), gated MLPs (``hidden_act`` as Llama), untied or tied embeddings;
- multi-latent attention (``model.multi_latent_attention``): ``q_lora_rank`` (null: a full-rank
  ``q_proj``), ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim`` map by
  name. ``num_key_value_heads`` must equal ``num_attention_heads`` (transformers' attention repeats
  keys by their ratio, which for MLA is 1; export writes the head count). ``attention_bias`` must be
  false (it would bias q_a_proj, kv_a_proj_with_mqa and o_proj). Transformers builds the two latent
  norms (q_a_layernorm, kv_a_layernorm) with eps 1e-6 whatever ``rms_norm_eps`` says and megacore
  uses ``norm_epsilon`` for every norm, so ``rms_norm_eps`` must be 1e-6 (DeepSeek's value);
- ``rope_interleave`` (default true, DeepSeek's own layout): the rotary rows of the checkpoint are
  interleaved pairs; import permutes them into megacore's half-rotation layout
  (``megacore.layers.mla.rope_deinterleave_index``), export applies the inverse, so the tensors
  round-trip bit for bit. With ``rope_interleave=false`` they map as they are. Export writes back the
  loaded config's value, else true;
- rotary: ``megacore.interop.hf_rope`` (``rope_parameters`` or ``rope_theta`` + ``rope_scaling``),
  with DeepSeek's YaRN attention terms, below;
- ``n_routed_experts`` / ``num_experts_per_tok`` / ``moe_intermediate_size`` <-> ``num_experts`` /
  ``moe_top_k`` / ``moe_ffn_hidden_size``; ``intermediate_size`` is the dense layers' width;
  ``norm_topk_prob`` <-> ``moe_router_norm_topk``; ``routed_scaling_factor`` <->
  ``moe_routed_scaling_factor``; ``moe_router_score="sigmoid"`` always (transformers' DeepSeek-V3
  router ignores ``scoring_func`` / ``topk_method``);
- ``n_group`` / ``topk_group`` <-> ``moe_router_num_groups`` / ``moe_router_group_topk`` (group
  score: the sum of the group's two best biased scores, the same in both); ``n_group=1`` is no group
  limit (null/null), and export writes 1/1 for none;
- ``n_shared_experts`` <-> ``moe_shared_expert_hidden_size = n_shared_experts · moe_intermediate_size``,
  ungated (export needs a multiple of ``moe_ffn_hidden_size``);
- ``first_k_dense_replace`` <-> ``moe_first_k_dense``; every later layer is MoE (transformers ignores
  ``moe_layer_freq``; a config.json giving another value than 1 is refused, as is
  ``model.moe_layer_freq != 1`` on export);
- the router bias: ``moe_router_expert_bias`` is on after import (export needs the bias:
  ``moe_router_expert_bias`` or ``moe_router_bias_update_rate > 0``);
- no balancing loss: transformers' DeepSeek-V3 adds none, so import sets ``moe_aux_loss_coeff=0``
  (training settings of megacore such as the aux loss, z-loss or the bias update rate do not change
  the exported model);
- multi-token prediction (``megacore.layers.mtp``): ``num_nextn_predict_layers`` (transformers'
  ``num_mtp_layers``) = D counts the MTP modules the checkpoint stores as layers
  ``num_hidden_layers ... num_hidden_layers + D - 1``; import sets ``mtp_num_layers = D`` and loads
  them into ``mtp.layers.<k-1>`` (weights below). ``DeepseekV3ForCausalLM`` does not run them (it
  skips those tensors), nor does megacore outside training (generation never runs the depths), so
  the main logits are transformers'. ``mtp_loss_weight`` has no key in config.json: megacore's
  default (0.1) is kept; set it with an override. A config.json that counts D modules while the
  checkpoint holds no tensor of any of them (what transformers' own ``save_pretrained`` writes:
  its default D is 1 and its model has no MTP modules) imports with ``mtp_num_layers=0``. The
  override ``mtp_num_layers=0`` (``load_pretrained(dir, mtp_num_layers=0)``) imports without the
  depths (inference only), skipping their tensors; ``mtp_num_layers=d < D`` loads the first d.
  Export writes ``num_nextn_predict_layers = mtp_num_layers`` and the depths' tensors. The depth's
  decoder layer has the global index ``num_hidden_layers + k - 1`` >= ``first_k_dense_replace``,
  so it is an MoE layer (as DeepSeek-V3's layer 61 is) and megacore's ``is_moe_layer`` agrees.

YaRN (``rope_type="yarn"``). Transformers' DeepSeek-V3 multiplies the softmax scale 1/√(dn+dr) by
mscale(factor, ``mscale_all_dim``)² whenever ``mscale_all_dim`` is non-zero, with
mscale(f, m) = 0.1·m·ln f + 1 (1 for f <= 1), and scales cos/sin by ``attention_factor``, else by
mscale(f, ``mscale``) / mscale(f, ``mscale_all_dim``) when both are non-zero, else by mscale(f, 1).
megacore's softmax term is the same with ``rotary_mscale_all_dim``, and its cos/sin factor is
mscale(f, ``rotary_mscale``) / mscale(f, ``rotary_mscale_all_dim``) (the second term 1 when it is
0, as in DeepSeek's reference code). Import therefore takes ``rotary_mscale_all_dim =
mscale_all_dim`` (0 when absent) and ``rotary_mscale`` = ``mscale`` when that reproduces
transformers' cos/sin factor (DeepSeek's own configs: both set), else the value that does.
Export writes ``mscale`` and ``mscale_all_dim`` and, when transformers would infer another cos/sin
factor from them (``rotary_mscale != 1`` with ``rotary_mscale_all_dim = 0``), ``attention_factor``.
Non-YaRN scalings with a non-zero ``mscale_all_dim`` are refused (transformers scales the softmax
then too; megacore only under YaRN).

Weights (per layer ``model.layers.i.``; ``self_attn.`` names: ``megacore.layers.mla``):

    input_layernorm / post_attention_layernorm .weight   <-> decoder.layers.i.{input_norm, pre_mlp_norm}.weight
    self_attn.q_proj.weight (q_lora_rank null)           <-> self_attention.linear_q_proj.weight (rope rows permuted)
    self_attn.q_a_proj / q_a_layernorm .weight           <-> self_attention.linear_q_down_proj / q_layernorm .weight
    self_attn.q_b_proj.weight                            <-> self_attention.linear_q_up_proj.weight (rope rows permuted)
    self_attn.kv_a_proj_with_mqa.weight                  <-> self_attention.linear_kv_down_proj.weight (rope rows permuted)
    self_attn.kv_a_layernorm / kv_b_proj / o_proj .weight <-> self_attention.kv_layernorm / linear_kv_up_proj / linear_proj
    mlp.{gate ; up ; down}_proj.weight  (i < first_k_dense_replace)  <-> mlp.linear_fc1 ([gate; up]) / mlp.linear_fc2
    mlp.gate.weight                                      <-> mlp.router.weight
    mlp.gate.e_score_correction_bias (fp32)              <-> mlp.router.expert_bias (an fp32 buffer)
    mlp.experts.e.{gate_proj ; up_proj}.weight, over e   <-> mlp.experts.linear_fc1 [E, 2F, h]
    mlp.experts.e.down_proj.weight, stacked over e       <-> mlp.experts.linear_fc2 [E, h, F]
    mlp.shared_experts.{gate_proj ; up_proj}.weight      <-> mlp.shared_expert.linear_fc1.weight
    mlp.shared_experts.down_proj.weight                  <-> mlp.shared_expert.linear_fc2.weight

plus Llama's embedding, final norm and ``lm_head``. MTP module k (1..D) is checkpoint layer
L = num_hidden_layers + k - 1 (``model.layers.L.``), megacore ``mtp.layers.<k-1>.``:

    enorm / hnorm / eh_proj .weight                      <-> enorm / hnorm / eh_proj .weight
    shared_head.norm.weight                              <-> final_norm.weight
    input_layernorm, post_attention_layernorm, self_attn.*, mlp.*  <-> layer.* (as decoder layer L above)
    embed_tokens.weight                                  <-> a copy of embedding.word_embeddings.weight
    shared_head.head.weight                              <-> a copy of output_layer.weight (the embedding if tied)

``eh_proj`` reads [enorm(embedding) ; hnorm(hidden)] in both (DeepSeek's reference inference code
concatenates the normed embedding first, as ``megacore.layers.mtp.MTPDepth`` does), so it maps
as it is. megacore shares the embedding and output head with the main model, so import requires
each copy to equal the main tensor bit for bit (ValueError naming the copy otherwise) and export
writes the shared tensor again under the copy's name.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

import torch

from megacore.config import ConfigError, TransformerConfig
from megacore.interop.families.llama import GATED_ACT, LlamaAdapter
from megacore.interop.hf_rope import ROPE_FIELDS, _rope_params, rope_fields, rope_parameters
from megacore.interop.hf_weights import (Rule, Tensors, experts_gate_up, experts_stacked, gate_up, same,
                                         vocab_padded)
from megacore.layers.mla import rope_deinterleave_index
from megacore.layers.rotary import yarn_mscale

LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default, used for q_a_layernorm / kv_a_layernorm


def rows_permuted(index: torch.Tensor) -> tuple[Callable, Callable]:
    """HF tensor [n, *r] <-> megacore [n, *r] with megacore row j = HF row ``index[j]`` (exact both ways)."""
    inverse = torch.argsort(index)
    return (lambda ts: ts[0][index]), (lambda t: [t[inverse.to(t.device)]])


def query_rows(heads: int, nope: int, rope: int, interleave: bool) -> torch.Tensor:
    """HF row of each megacore row of q_proj / q_b_proj: per head [nope rows | de-interleaved rope rows]."""
    perm = rope_deinterleave_index(rope) if interleave else torch.arange(rope)
    head = torch.cat([torch.arange(nope), nope + perm])
    return torch.cat([head + h * (nope + rope) for h in range(heads)])


def kv_down_rows(rank: int, rope: int, interleave: bool) -> torch.Tensor:
    """HF row of each megacore row of kv_a_proj_with_mqa: [latent rows | de-interleaved rope rows]."""
    perm = rope_deinterleave_index(rope) if interleave else torch.arange(rope)
    return torch.cat([torch.arange(rank), rank + perm])


def hf_cos_sin_factor(factor: float, mscale: Any, mscale_all_dim: Any, attention_factor: Any) -> float:
    """transformers' YaRN cos/sin factor (``_compute_yarn_parameters``)."""
    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def our_cos_sin_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """megacore's YaRN cos/sin factor (``megacore.layers.rotary.rotary_inv_freq``)."""
    if mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor, mscale)


def yarn_mscales(p: dict, factor: float) -> dict:
    """``rotary_mscale`` / ``rotary_mscale_all_dim`` that reproduce transformers' DeepSeek-V3 softmax
    scale and cos/sin factor for the rope parameters ``p`` (module docstring)."""
    all_dim = float(p.get("mscale_all_dim") or 0.0)
    want = hf_cos_sin_factor(factor, p.get("mscale"), p.get("mscale_all_dim"), p.get("attention_factor"))
    mscale = float(p["mscale"]) if p.get("mscale") else 1.0
    if not math.isclose(our_cos_sin_factor(factor, mscale, all_dim), want, rel_tol=1e-12, abs_tol=0.0):
        if factor <= 1:  # both factors are 1 then, whatever the mscales
            raise ConfigError(f"rope_parameters.attention_factor={want} with factor={factor} <= 1 cannot be "
                              "represented; megacore's YaRN cos/sin factor is 1 when factor <= 1")
        # solve yarn_mscale(factor, m) = want · yarn_mscale(factor, all_dim) for m
        mscale = (want * yarn_mscale(factor, all_dim) - 1.0) / (0.1 * math.log(factor))
    return dict(rotary_mscale=mscale, rotary_mscale_all_dim=all_dim)


def deepseek_rope_fields(hf: dict) -> dict:
    """``rope_fields`` with DeepSeek-V3's YaRN attention terms (module docstring)."""
    fields = rope_fields(hf)
    p = _rope_params(hf)
    if fields.get("rotary_scaling") == "yarn":
        fields.update(yarn_mscales(p, fields["rotary_scaling_factor"]))
    elif p.get("rope_type", "default") != "default" and p.get("mscale_all_dim"):
        raise ConfigError(f"rope_type={p['rope_type']!r} with mscale_all_dim={p['mscale_all_dim']} is not supported: "
                          "transformers' DeepSeek-V3 then scales the attention softmax by it, which megacore does "
                          "only under YaRN scaling")
    return fields


def shared_rule(ours: str, names: tuple[str, ...], c: TransformerConfig) -> Rule:
    """A vocab table (``vocab_rule``) stored under ``names[0]`` and again, as copies, under the other
    names (the MTP modules' ``embed_tokens`` / ``shared_head.head``). Import requires every copy to
    equal ``names[0]`` bit for bit, since megacore keeps one shared tensor; export writes it under
    every name."""
    to_ours, to_hf = vocab_padded(c.padded_vocab_size, c.vocab_size)

    def checked(ts: Tensors) -> torch.Tensor:
        for name, copy in zip(names[1:], ts[1:]):
            if copy.dtype != ts[0].dtype or not torch.equal(copy, ts[0]):
                raise ValueError(f"tensor {name!r} differs from {names[0]!r}: megacore's multi-token prediction "
                                 f"shares {ours} with the main model, so the checkpoint's copy must equal it bit "
                                 "for bit (or import without the MTP modules: mtp_num_layers=0)")
        return to_ours(ts[:1])

    def copies(t: torch.Tensor) -> Tensors:
        (main,) = to_hf(t)
        return [main] + [main.clone() for _ in names[1:]]
    return Rule(ours, names, checked, copies)


class DeepseekV3Adapter(LlamaAdapter):
    name, model_type, architectures = "deepseek_v3", "deepseek_v3", ("DeepseekV3ForCausalLM",)
    # transformers 5.24's DeepseekV3Config defaults for the keys read
    defaults = {**LlamaAdapter.defaults, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
                "num_experts_per_tok": 8, "n_shared_experts": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
                "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
                "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3, "norm_topk_prob": True,
                "rope_interleave": True, "attention_bias": False, "moe_layer_freq": 1}
    guess_rank = 5  # multi-latent attention
    moe = True

    # ------------------------------------------------------------------------------ import
    def present(self, hf: dict, key: str) -> Any:
        """``hf[key]`` when the key is there (null included), else the default: for keys whose null
        means something (``q_lora_rank``: no query bottleneck)."""
        return hf[key] if key in hf else self.defaults.get(key)

    def fields_from_hf(self, hf: dict) -> dict[str, Any]:
        hidden = int(self.require(hf, "hidden_size"))
        heads = int(self.require(hf, "num_attention_heads"))
        layers = int(self.require(hf, "num_hidden_layers"))
        if hf.get("quantization_config"):
            raise ConfigError(f"quantization_config={hf['quantization_config']!r}: a quantized checkpoint (DeepSeek-V3's "
                              "own release is FP8 with per-block scales) cannot be loaded as is; dequantize it to "
                              "bf16 first")
        kv_heads = hf.get("num_key_value_heads")
        if kv_heads is not None and int(kv_heads) != heads:
            raise ConfigError(f"num_key_value_heads={kv_heads} differs from num_attention_heads={heads}: transformers' "
                              "DeepSeek-V3 attention then repeats its per-head keys by their ratio, which does not "
                              "compute attention; multi-latent attention has one key per head (set them equal)")
        if self.get(hf, "attention_bias"):
            raise ConfigError("attention_bias=true is not supported for deepseek_v3: transformers then biases "
                              "q_a_proj, kv_a_proj_with_mqa and o_proj, which megacore's multi-latent attention "
                              "does not have")
        eps = float(self.get(hf, "rms_norm_eps"))
        if eps != LATENT_NORM_EPS:
            raise ConfigError(f"rms_norm_eps={eps} is not supported for deepseek_v3: transformers normalizes the "
                              f"query and key/value latents with eps {LATENT_NORM_EPS} whatever rms_norm_eps says, "
                              "and megacore uses one norm_epsilon for every norm")
        freq = self.get(hf, "moe_layer_freq")
        if freq != 1:
            raise ConfigError(f"moe_layer_freq={freq} is not supported for deepseek_v3: transformers ignores it and "
                              "makes every layer from first_k_dense_replace on an MoE layer, so the checkpoint's "
                              "layout is ambiguous; only 1 maps")
        experts = int(self.require(hf, "n_routed_experts"))
        first_k = int(self.get(hf, "first_k_dense_replace"))
        if not 0 <= first_k < layers:
            raise ConfigError(f"first_k_dense_replace={first_k} leaves no MoE layer of num_hidden_layers={layers}; "
                              "megacore's deepseek_v3 import needs at least one (0 <= first_k_dense_replace < "
                              "num_hidden_layers)")
        groups = self.present(hf, "n_group")
        top_groups = self.present(hf, "topk_group")
        if groups is None or top_groups is None:
            raise ConfigError(f"n_group={groups}, topk_group={top_groups}: transformers' DeepSeek-V3 router needs both "
                              "(use 1 and 1 for no group limit)")
        groups, top_groups = int(groups), int(top_groups)
        moe_ffn = int(self.get(hf, "moe_intermediate_size"))
        q_lora = self.present(hf, "q_lora_rank")
        fields = dict(
            num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
            ffn_hidden_size=int(self.get(hf, "intermediate_size")), vocab_size=int(self.require(hf, "vocab_size")),
            seq_length=int(self.get(hf, "max_position_embeddings")), normalization="RMSNorm", norm_epsilon=eps,
            activation=GATED_ACT.to_ours(hf, self.name), position_embedding="rope",
            attention_dropout=float(self.get(hf, "attention_dropout")),
            tie_embeddings=bool(self.get(hf, "tie_word_embeddings")), init_std=float(self.get(hf, "initializer_range")),
            multi_latent_attention=True, q_lora_rank=None if q_lora is None else int(q_lora),
            kv_lora_rank=int(self.get(hf, "kv_lora_rank")), qk_nope_head_dim=int(self.get(hf, "qk_nope_head_dim")),
            qk_rope_head_dim=int(self.get(hf, "qk_rope_head_dim")), v_head_dim=int(self.get(hf, "v_head_dim")),
            num_experts=experts, moe_top_k=int(self.get(hf, "num_experts_per_tok")), moe_ffn_hidden_size=moe_ffn,
            moe_router_score="sigmoid", moe_router_norm_topk=bool(self.get(hf, "norm_topk_prob")),
            moe_routed_scaling_factor=float(self.get(hf, "routed_scaling_factor")),
            moe_router_num_groups=None if groups == 1 else groups,
            moe_router_group_topk=None if groups == 1 else top_groups,
            moe_router_expert_bias=True,
            moe_shared_expert_hidden_size=int(self.get(hf, "n_shared_experts")) * moe_ffn,
            moe_first_k_dense=first_k, moe_layer_freq=1, moe_aux_loss_coeff=0.0,
            mtp_num_layers=self.num_mtp_layers(hf),
        )
        fields.update(deepseek_rope_fields(hf))
        if fields["rotary_percent"] != 1.0:
            raise ConfigError(f"partial_rotary_factor={fields['rotary_percent']} is not supported for deepseek_v3: "
                              "the rotary part is qk_rope_head_dim")
        return fields

    def interleaved(self, hf: Optional[dict]) -> bool:
        """Whether the checkpoint's rotary rows are interleaved pairs (``rope_interleave``; null is false,
        as transformers reads it)."""
        return True if hf is None or "rope_interleave" not in hf else bool(hf["rope_interleave"])

    def num_mtp_layers(self, hf: dict) -> int:
        for key in ("num_nextn_predict_layers", "num_mtp_layers"):
            if hf.get(key) is not None:
                value = hf[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigError(f"{key}={value!r} must be an integer >= 0 (the number of MTP modules)")
                return value
        return 0

    def mtp_layer_pattern(self) -> re.Pattern:
        return re.compile(rf"^(?:{re.escape(self.base_prefix)})?layers\.(\d+)\.")

    def fields_from_checkpoint(self, hf_config: dict, c: TransformerConfig, names: list[str]) -> dict[str, Any]:
        """``mtp_num_layers=0`` when config.json counts MTP modules but the checkpoint holds no tensor
        of any of them (transformers' ``save_pretrained`` writes its default of 1 with none)."""
        mtp = range(c.num_layers, c.num_layers + self.num_mtp_layers(hf_config))
        if not mtp:
            return {}
        pattern = self.mtp_layer_pattern()
        held = any((m := pattern.match(n)) is not None and int(m.group(1)) in mtp for n in names)
        return {} if held else {"mtp_num_layers": 0}

    def ignorable_in(self, hf_config: dict, c: TransformerConfig) -> Callable[[str], bool]:
        """Also the tensors of the MTP modules the model does not load: checkpoint layers
        num_hidden_layers + mtp_num_layers ... num_hidden_layers + num_nextn_predict_layers - 1 (all
        of them with the override ``mtp_num_layers=0``)."""
        skipped = range(c.num_layers + c.mtp_num_layers, c.num_layers + self.num_mtp_layers(hf_config))
        pattern = self.mtp_layer_pattern()

        def ignorable(name: str) -> bool:
            match = pattern.match(name)
            return (match is not None and int(match.group(1)) in skipped) or self.is_ignorable(name, c)
        return ignorable

    # ------------------------------------------------------------------------------ export
    def check_exportable(self, c: TransformerConfig) -> None:
        self.check_plain_decoder(c, moe=True, mla=True)
        if c.num_experts is None:
            self.cannot("num_experts", None, "MoE layers (model.num_experts)")
        self.check_fields(c, [("normalization", "RMSNorm"), ("position_embedding", "rope"), ("rotary_percent", 1.0),
                              ("norm_epsilon", LATENT_NORM_EPS), ("add_bias_linear", False),
                              ("moe_router_score", "sigmoid"), ("moe_layer_freq", 1),
                              ("moe_shared_expert_gate", False)])
        self.activation_to_hf(GATED_ACT, c.activation, "activation")
        if c.attention_softmax_scale is not None:
            self.cannot("attention_softmax_scale", c.attention_softmax_scale,
                        "the default softmax scale (null: 1/sqrt(qk_nope_head_dim + qk_rope_head_dim), YaRN mscale)")
        if not c.has_expert_bias:
            self.cannot("moe_router_expert_bias", False, "a router expert bias (e_score_correction_bias; set "
                        "model.moe_router_expert_bias=true: a zero bias routes as none)")
        shared = c.moe_shared_expert_hidden_size
        if shared is None or shared % c.moe_ffn_size:
            self.cannot("moe_shared_expert_hidden_size", shared,
                        f"n_shared_experts * moe_ffn_hidden_size ({c.moe_ffn_size}) in every MoE layer")
        if c.moe_router_num_groups is not None and c.num_experts // c.moe_router_num_groups < 2:
            self.cannot("moe_router_num_groups", c.moe_router_num_groups, "at least 2 experts per group "
                        "(transformers scores a group by its two best experts)")
        if c.rotary_scaling not in (None, "yarn") and c.rotary_mscale_all_dim:
            self.cannot("rotary_mscale_all_dim", c.rotary_mscale_all_dim, "0 unless rotary_scaling='yarn'")

    def write_hf(self, c: TransformerConfig, out: dict, base: Optional[dict]) -> None:
        groups = c.moe_router_num_groups
        out.update(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
                   num_key_value_heads=c.num_attention_heads, intermediate_size=c.ffn_size,
                   hidden_act=GATED_ACT.to_hf(c.activation), max_position_embeddings=c.seq_length,
                   rms_norm_eps=c.norm_epsilon, attention_dropout=c.attention_dropout, attention_bias=False,
                   q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
                   qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
                   qk_head_dim=c.qk_nope_head_dim + c.qk_rope_head_dim, head_dim=c.qk_rope_head_dim,
                   n_routed_experts=c.num_experts, num_experts_per_tok=c.moe_top_k,
                   moe_intermediate_size=c.moe_ffn_size,
                   n_shared_experts=c.moe_shared_expert_hidden_size // c.moe_ffn_size,
                   routed_scaling_factor=c.moe_routed_scaling_factor, norm_topk_prob=c.moe_router_norm_topk,
                   n_group=1 if groups is None else groups,
                   topk_group=1 if groups is None else c.moe_router_group_topk,
                   first_k_dense_replace=c.moe_first_k_dense, rope_interleave=self.interleaved(base),
                   num_nextn_predict_layers=c.mtp_num_layers)
        out.pop("num_mtp_layers", None)
        if "moe_layer_freq" in out:
            out["moe_layer_freq"] = 1
        self.write_rope(c, out, base)

    def write_rope(self, c: TransformerConfig, out: dict, base: Optional[dict]) -> None:
        """``hf_rope.write_rope`` with DeepSeek's YaRN keys: the loaded block is kept when it maps to the
        same fields, else a 5.x ``rope_parameters`` with ``mscale`` / ``mscale_all_dim`` (and
        ``attention_factor`` only where transformers would infer another cos/sin factor)."""
        if base is not None:
            try:
                old = deepseek_rope_fields(base)
                if all(getattr(c, k) == old.get(k, getattr(TransformerConfig, k)) for k in ROPE_FIELDS):
                    return
            except ConfigError:
                pass
        p = rope_parameters(c)
        if c.rotary_scaling == "yarn":
            p.update(mscale=c.rotary_mscale, mscale_all_dim=c.rotary_mscale_all_dim)
            ours = our_cos_sin_factor(c.rotary_scaling_factor, c.rotary_mscale, c.rotary_mscale_all_dim)
            inferred = hf_cos_sin_factor(c.rotary_scaling_factor, c.rotary_mscale, c.rotary_mscale_all_dim, None)
            if ours == inferred:
                p.pop("attention_factor")
            else:
                p["attention_factor"] = ours
        out.pop("rope_scaling", None)
        out.pop("partial_rotary_factor", None)
        out["rope_parameters"] = p
        out["rope_theta"] = c.rotary_base

    # ------------------------------------------------------------------------------ weights
    def weight_rules(self, c: TransformerConfig, prefix: str) -> list[Rule]:
        return self.rules(c, prefix, interleave=True)

    def weight_rules_for(self, hf_config: Optional[dict], c: TransformerConfig, prefix: str) -> list[Rule]:
        return self.rules(c, prefix, interleave=self.interleaved(hf_config))

    def rules(self, c: TransformerConfig, prefix: str, interleave: bool) -> list[Rule]:
        q_rows = rows_permuted(query_rows(c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, interleave))
        kv_rows = rows_permuted(kv_down_rows(c.kv_lora_rank, c.qk_rope_head_dim, interleave))
        mtp = [f"{prefix}layers.{c.num_layers + j}." for j in range(c.mtp_num_layers)]
        embed = (f"{prefix}embed_tokens.weight", *(f"{m}embed_tokens.weight" for m in mtp))
        heads = tuple(f"{m}shared_head.head.weight" for m in mtp)
        if c.tie_embeddings:  # the output head is the embedding: its MTP copies copy the embedding too
            embed, heads = embed + heads, ()
        rules = [shared_rule("embedding.word_embeddings.weight", embed, c)]
        for i in range(c.num_layers):
            rules += self.layer_rules(c, f"decoder.layers.{i}.", f"{prefix}layers.{i}.", i, q_rows, kv_rows)
        rules += same([("decoder.final_norm.weight", f"{prefix}norm.weight")])
        if not c.tie_embeddings:
            rules.append(shared_rule("output_layer.weight", ("lm_head.weight", *heads), c))
        for j, hf in enumerate(mtp):
            ours = f"mtp.layers.{j}."
            rules += same([(f"{ours}enorm.weight", f"{hf}enorm.weight"), (f"{ours}hnorm.weight", f"{hf}hnorm.weight"),
                           (f"{ours}eh_proj.weight", f"{hf}eh_proj.weight"),
                           (f"{ours}final_norm.weight", f"{hf}shared_head.norm.weight")])
            rules += self.layer_rules(c, f"{ours}layer.", hf, c.num_layers + j, q_rows, kv_rows)
        return rules

    def layer_rules(self, c: TransformerConfig, ours: str, hf: str, layer: int, q_rows: tuple, kv_rows: tuple
                    ) -> list[Rule]:
        """One decoder layer (global index ``layer``: a main layer or an MTP depth's) <-> its tensors."""
        mine, att = f"{ours}self_attention.", f"{hf}self_attn."
        rules = same([(f"{ours}input_norm.weight", f"{hf}input_layernorm.weight"),
                      (f"{ours}pre_mlp_norm.weight", f"{hf}post_attention_layernorm.weight")])
        if c.q_lora_rank is None:
            rules.append(Rule(f"{mine}linear_q_proj.weight", (f"{att}q_proj.weight",), *q_rows))
        else:
            rules += same([(f"{mine}linear_q_down_proj.weight", f"{att}q_a_proj.weight"),
                           (f"{mine}q_layernorm.weight", f"{att}q_a_layernorm.weight")])
            rules.append(Rule(f"{mine}linear_q_up_proj.weight", (f"{att}q_b_proj.weight",), *q_rows))
        rules.append(Rule(f"{mine}linear_kv_down_proj.weight", (f"{att}kv_a_proj_with_mqa.weight",), *kv_rows))
        rules += same([(f"{mine}kv_layernorm.weight", f"{att}kv_a_layernorm.weight"),
                       (f"{mine}linear_kv_up_proj.weight", f"{att}kv_b_proj.weight"),
                       (f"{mine}linear_proj.weight", f"{att}o_proj.weight")])
        return rules + self.mlp_rules(c, ours, hf, layer)

    def mlp_rules(self, c: TransformerConfig, ours: str, hf: str, layer: int) -> list[Rule]:
        if not c.is_moe_layer(layer):
            return super().mlp_rules(c, ours, hf, layer)
        moe, e, shared = f"{hf}mlp.", c.num_experts, f"{hf}mlp.shared_experts."
        return [*same([(f"{ours}mlp.router.weight", f"{moe}gate.weight"),
                       (f"{ours}mlp.router.expert_bias", f"{moe}gate.e_score_correction_bias")]),
                Rule(f"{ours}mlp.experts.linear_fc1",
                     tuple(f"{moe}experts.{j}.{w}_proj.weight" for j in range(e) for w in ("gate", "up")),
                     *experts_gate_up(e)),
                Rule(f"{ours}mlp.experts.linear_fc2", tuple(f"{moe}experts.{j}.down_proj.weight" for j in range(e)),
                     *experts_stacked(e)),
                Rule(f"{ours}mlp.shared_expert.linear_fc1.weight",
                     (f"{shared}gate_proj.weight", f"{shared}up_proj.weight"), *gate_up()),
                *same([(f"{ours}mlp.shared_expert.linear_fc2.weight", f"{shared}down_proj.weight")])]

    def reads_like(self, c: TransformerConfig) -> bool:
        return c.multi_latent_attention


ADAPTER = DeepseekV3Adapter()
