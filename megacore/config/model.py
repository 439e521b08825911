"""``TransformerConfig``: the ``model:`` section, shape and numerics of a decoder-only transformer
(dense GPT / Llama family, MoE, hybrid Mamba stacks), with its ``validate()``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megacore.config.errors import check_finite
from megacore.config.errors import fail as _fail
from megacore.config.fields import doc

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "swiglu", "geglu", "relu", "squared_relu")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned", "none")
LAYER_KINDS = ("M", "*", "-")  # model.layer_pattern: Mamba-2, self-attention, MLP
ROTARY_SCALINGS = (None, "llama3", "yarn", "linear")
ATTENTION_BACKENDS = ("auto", "sdpa", "reference")
MOE_ROUTER_SCORES = ("softmax", "sigmoid")
MOE_AUX_LOSS_TYPES = ("micro_batch", "sequence", "global_batch")
MOE_EXPERTS_BACKENDS = ("auto", "grouped_mm", "reference")


@dataclass
class TransformerConfig:
    """Shape and numerics of a decoder-only transformer (dense GPT / Llama family).

    ``num_query_groups`` is the number of key/value heads (GQA; equal to ``num_attention_heads``
    for MHA, 1 for MQA). ``kv_channels`` is the per-head dimension (defaults to
    ``hidden_size // num_attention_heads``). ``ffn_hidden_size`` defaults to ``4 * hidden_size``.
    """

    num_layers: int = doc(2, "Transformer layers (with model.layer_pattern: blocks, one per character).")
    hidden_size: int = doc(128, "Width of the residual stream (the embedding size).")
    num_attention_heads: int = doc(4, "Query heads per attention layer.")
    num_query_groups: Optional[int] = doc(None, "Key/value heads (GQA; 1: MQA); null: num_attention_heads (MHA).")
    kv_channels: Optional[int] = doc(None, "Per-head dimension; null: hidden_size / num_attention_heads.")
    ffn_hidden_size: Optional[int] = doc(None, "Hidden size of the MLP; null: 4 x hidden_size.")
    vocab_size: int = doc(1024, "Tokens in the vocabulary (set from the tokenizer when the data has one).")
    seq_length: int = doc(256, "Tokens per training sequence (and the largest position for learned embeddings).")
    vocab_padding_multiple: int = doc(128, "Pad the embedding/output rows to a multiple of this (padded logits are "
                                           "masked, the loss is unchanged); divisible by parallel.tensor.")

    normalization: str = doc("RMSNorm", "Norm layers: RMSNorm or LayerNorm.")
    norm_epsilon: float = doc(1e-5, "Epsilon added to the variance in every norm (> 0).")
    layernorm_zero_centered_gamma: bool = doc(False, "Norm weights are stored as (gamma - 1), initialized to 0.")
    activation: str = doc("swiglu", "MLP activation: swiglu, geglu (gated), gelu, gelu_tanh, quick_gelu, relu or "
                                    "squared_relu.")

    position_embedding: str = doc("rope", "Positions: rope (rotary), learned (a table of seq_length rows) or none.")
    rotary_base: float = doc(10000.0, "RoPE base (theta) of the rotary frequencies.")
    rotary_percent: float = doc(1.0, "Fraction (0-1] of each head's dimensions that rotate (partial RoPE).")
    rotary_scaling: Optional[str] = doc(None, "RoPE context extension: llama3, yarn or linear; null: none.")
    rotary_scaling_factor: float = doc(1.0, "Context extension factor of rotary_scaling (e.g. 8.0).")
    rotary_original_max_positions: Optional[int] = doc(None, "Context length before the extension (needed by "
                                                             "llama3 and yarn scaling, e.g. 8192).")
    rotary_low_freq_factor: float = doc(1.0, "rotary_scaling=llama3: the low-frequency wavelength factor.")
    rotary_high_freq_factor: float = doc(4.0, "rotary_scaling=llama3: the high-frequency wavelength factor.")
    rotary_beta_fast: float = doc(32.0, "rotary_scaling=yarn: rotations above which a dimension is not "
                                        "interpolated (beta_fast).")
    rotary_beta_slow: float = doc(1.0, "rotary_scaling=yarn: rotations below which a dimension is fully "
                                       "interpolated (beta_slow).")
    rotary_mscale: float = doc(1.0, "rotary_scaling=yarn: the attention magnitude correction's mscale.")
    rotary_mscale_all_dim: float = doc(0.0, "rotary_scaling=yarn: DeepSeek's mscale_all_dim (also scales the "
                                            "softmax of multi-latent attention); 0: off.")

    add_qkv_bias: bool = doc(False, "Biases on the query/key/value projections (Qwen2).")
    add_bias_linear: bool = doc(False, "Biases on every other linear layer (GPT-2).")
    qk_norm: bool = doc(False, "RMS-normalize queries and keys before attention (and before the rotary "
                               "embedding); model.qk_norm_scope says over which channels.")
    qk_norm_scope: str = doc("head", "With qk_norm: 'head' normalizes each head's query and key (weights of "
                                     "head_dim; Qwen3); 'projection' normalizes a token's whole query "
                                     "projection and whole key projection (weights of heads x head_dim and "
                                     "kv_heads x head_dim; OLMoE).")
    attention_dropout: float = doc(0.0, "Dropout probability on the attention weights, in [0, 1).")
    hidden_dropout: float = doc(0.0, "Dropout probability on each residual branch's output, in [0, 1).")
    sliding_window: Optional[int] = doc(None, "A query attends only to the last this many positions (itself "
                                              "included); null: the whole causal past.")
    attention_softmax_scale: Optional[float] = doc(None, "Scale of the attention scores; null: 1/sqrt(head dim).")
    attention_backend: str = doc("auto", "Attention kernel: auto (sdpa), sdpa (torch scaled_dot_product_attention) "
                                         "or reference (plain torch).")

    tie_embeddings: bool = doc(False, "The output layer shares the input embedding's weights.")
    init_std: float = doc(0.02, "Standard deviation of the normal weight initialization.")
    scaled_output_init: bool = doc(True, "Initialize each residual branch's output projection with std init_std / "
                                         "sqrt(2 x num_layers).")

    # Mixture of experts (megacore.layers.moe).
    num_experts: Optional[int] = doc(None, "Mixture of experts: every MoE layer's MLP becomes this many expert MLPs "
                                           "(>= 2); null: dense MLPs.")
    moe_top_k: int = doc(2, "Experts each token is sent to.")
    moe_ffn_hidden_size: Optional[int] = doc(None, "Hidden size of each expert MLP; null: ffn_hidden_size.")
    moe_router_norm_topk: bool = doc(True, "Renormalize the top-k router probabilities to sum to 1 (Mixtral).")
    moe_aux_loss_coeff: float = doc(0.0, "Weight of the load-balancing loss (e.g. 0.01); 0: off.")
    moe_router_score: str = doc("softmax", "Router scores: softmax over all experts (Mixtral, Qwen) or sigmoid per "
                                           "expert (DeepSeek-V3); formulas in megacore.layers.moe.router.")
    moe_router_bias_update_rate: float = doc(0.0, "Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias "
                                                  "for the top-k choice, moved by this rate after each step toward "
                                                  "even load (e.g. 0.001); 0: off.")
    moe_router_expert_bias: bool = doc(False, "Keep that per-expert bias (expert_bias) even when training does not "
                                              "move it: a DeepSeek-V3 checkpoint carries one (HF "
                                              "e_score_correction_bias) that routing needs.")
    moe_router_num_groups: Optional[int] = doc(None, "Group-limited routing: the experts form this many groups "
                                                     "(dividing num_experts); null: off.")
    moe_router_group_topk: Optional[int] = doc(None, "Group-limited routing: the best this many groups are "
                                                     "eligible per token.")
    moe_routed_scaling_factor: float = doc(1.0, "Multiplies the routed experts' weights (DeepSeek-V3: 2.5).")
    moe_z_loss_coeff: float = doc(0.0, "Router z-loss weight (ST-MoE; e.g. 1e-3); 0: off.")
    moe_aux_loss_type: str = doc("micro_batch", "Over which tokens the load-balancing loss counts expert load: "
                                                "micro_batch (one forward), sequence (each sequence, then averaged; "
                                                "DeepSeek-V3) or global_batch (summed over data-parallel ranks).")
    moe_capacity_factor: Optional[float] = doc(None, "At most ceil(factor x tokens x top_k / num_experts) "
                                                     "assignments per expert and forward, the lowest-weighted "
                                                     "overflow dropped; null: dropless.")
    moe_pad_to_capacity: bool = doc(False, "With a capacity: every expert computes exactly its capacity rows.")
    moe_shared_expert_hidden_size: Optional[int] = doc(None, "An always-on shared expert MLP of this width beside "
                                                             "the routed ones (DeepSeek, Qwen2-MoE); null: none.")
    moe_shared_expert_gate: bool = doc(False, "Scale the shared expert by sigmoid(x.w) (Qwen2-MoE).")
    moe_first_k_dense: int = doc(0, "The first k layers keep a dense MLP (DeepSeek-V3: 3).")
    moe_layer_freq: int = doc(1, "After those, every n-th layer is MoE (layer i with (i - k) % n == 0).")
    moe_experts_backend: str = doc("auto", "Expert GEMMs: auto (grouped_mm where the build and dtype allow, else "
                                           "reference), grouped_mm (torch._grouped_mm) or reference (one expert "
                                           "after another).")
    # Multi-latent attention (DeepSeek-V2/V3; megacore.layers.mla): each head's query/key is a
    # qk_nope_head_dim part without position plus a qk_rope_head_dim rotary part (the rotary key
    # shared by all heads). Softmax scale: 1/sqrt(qk_nope_head_dim + qk_rope_head_dim), times
    # DeepSeek's YaRN mscale² under yarn scaling.
    multi_latent_attention: bool = doc(False, "Multi-latent attention (DeepSeek-V2/V3): keys and values from one "
                                              "low-rank joint latent.")
    q_lora_rank: Optional[int] = doc(None, "MLA: rank of the query bottleneck; null: a full-rank query projection "
                                           "(DeepSeek-V2-Lite).")
    kv_lora_rank: int = doc(512, "MLA: rank of the joint key/value latent.")
    qk_nope_head_dim: int = doc(128, "MLA: per-head query/key dimensions without position.")
    qk_rope_head_dim: int = doc(64, "MLA: per-head rotary query/key dimensions (even).")
    v_head_dim: int = doc(128, "MLA: per-head value dimension.")
    mtp_num_layers: int = doc(0, "Multi-token prediction (DeepSeek-V3): extra depths, depth k predicting token "
                                 "t+1+k; 0: off.")
    mtp_loss_weight: float = doc(0.1, "Weight of the mean multi-token-prediction loss added to the objective.")
    layer_pattern: Optional[str] = doc(None, "Hybrid stack, one character per layer: M Mamba-2 mixer, * "
                                             "self-attention, - MLP (MoE with num_experts); null: every layer is "
                                             "attention + MLP.")
    mamba_num_heads: Optional[int] = doc(None, "Mamba heads; null: 2 x hidden_size / mamba_head_dim (expand 2).")
    mamba_head_dim: int = doc(64, "Mamba head dimension.")
    mamba_state_dim: int = doc(128, "Mamba SSM state size per head.")
    mamba_num_groups: int = doc(8, "Mamba groups: B and C are shared by the heads of each group (divides the "
                                   "heads).")
    mamba_conv_kernel: int = doc(4, "Width of Mamba's depthwise causal convolution.")
    mamba_chunk_size: int = doc(128, "SSD chunk length (speed only; results do not depend on it).")
    mamba_dt_clamp_min: float = doc(0.0, "Lower clamp of the Mamba time step (NemotronH's time_step_min); 0: none.")
    from_hf: Optional[str] = doc(None, "A Hugging Face model directory (config.json + safetensors): the model's "
                                       "shape and weights come from it; a model.* override that contradicts it is "
                                       "an error. null: build from the model.* keys, randomly initialized.")

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def mamba_heads(self) -> int:
        if self.mamba_num_heads is not None:
            return self.mamba_num_heads
        return 2 * self.hidden_size // self.mamba_head_dim if self.mamba_head_dim > 0 else 0

    @property
    def layer_kinds(self) -> str:
        """One character per layer: ``layer_pattern``, or 'T' (attention + MLP) for every layer without one."""
        return self.layer_pattern if self.layer_pattern is not None else "T" * self.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_padding_multiple
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def moe_ffn_size(self) -> int:
        return self.moe_ffn_hidden_size if self.moe_ffn_hidden_size is not None else self.ffn_size

    @property
    def has_expert_bias(self) -> bool:
        """Whether the MoE routers hold ``expert_bias``: kept (``moe_router_expert_bias``) or trained
        (``moe_router_bias_update_rate`` > 0, which needs it)."""
        return bool(self.moe_router_expert_bias) or self.moe_router_bias_update_rate > 0

    @property
    def gated_mlp(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_percent)

    def validate(self) -> "TransformerConfig":
        check_finite("model", self)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length",
                     "vocab_padding_multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                _fail(f"model.{name}", v, "must be a positive integer", f"set model.{name} to a value >= 1")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads != 0:
            _fail("model.hidden_size", self.hidden_size,
                  f"is not divisible by num_attention_heads={self.num_attention_heads}",
                  "choose a hidden_size that is a multiple of num_attention_heads, or set model.kv_channels")
        if self.num_query_groups is not None:
            if self.num_query_groups <= 0:
                _fail("model.num_query_groups", self.num_query_groups, "must be positive",
                      "use 1 for MQA or num_attention_heads for MHA")
            if self.num_attention_heads % self.num_query_groups != 0:
                _fail("model.num_attention_heads", self.num_attention_heads,
                      f"is not divisible by num_query_groups={self.num_query_groups}",
                      "choose num_query_groups that divides num_attention_heads")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size <= 0:
            _fail("model.ffn_hidden_size", self.ffn_hidden_size, "must be positive", "set a positive size")
        if self.normalization not in NORMALIZATIONS:
            _fail("model.normalization", self.normalization, "is not a known normalization",
                  f"use one of {list(NORMALIZATIONS)}")
        if self.activation not in ACTIVATIONS:
            _fail("model.activation", self.activation, "is not a known activation", f"use one of {list(ACTIVATIONS)}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            _fail("model.position_embedding", self.position_embedding, "is not known",
                  f"use one of {list(POSITION_EMBEDDINGS)}")
        if self.position_embedding == "rope":
            if self.rotary_base <= 0:
                _fail("model.rotary_base", self.rotary_base, "must be positive", "use e.g. 10000.0")
            if not 0.0 < self.rotary_percent <= 1.0:
                _fail("model.rotary_percent", self.rotary_percent, "must be in (0, 1]", "use e.g. 0.25 or 1.0")
            if self.rotary_dim % 2 != 0 or self.rotary_dim == 0:
                _fail("model.rotary_percent", self.rotary_percent,
                      f"gives an odd or zero rotary dim {self.rotary_dim} (head_dim={self.head_dim})",
                      "rotary dims come in pairs: choose rotary_percent so head_dim*rotary_percent is even")
            if self.rotary_scaling not in ROTARY_SCALINGS:
                _fail("model.rotary_scaling", self.rotary_scaling, "is not known", f"use one of {list(ROTARY_SCALINGS)}")
            if self.rotary_scaling is not None and self.rotary_scaling_factor <= 0:
                _fail("model.rotary_scaling_factor", self.rotary_scaling_factor, "must be positive", "use e.g. 8.0")
            if self.rotary_scaling in ("llama3", "yarn") and self.rotary_original_max_positions is None:
                _fail("model.rotary_original_max_positions", None,
                      f"is required by rotary_scaling={self.rotary_scaling!r}",
                      "set it to the pre-extension context length, e.g. 8192")
        if self.head_dim % 2 != 0 and self.position_embedding == "rope":
            _fail("model.kv_channels", self.head_dim, "is odd, so rotary pairs cannot be formed", "use an even head dim")
        for name in ("attention_dropout", "hidden_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                _fail(f"model.{name}", v, "must be in [0, 1)", "use e.g. 0.0 or 0.1")
        if self.qk_norm_scope not in ("head", "projection"):
            _fail("model.qk_norm_scope", self.qk_norm_scope, "must be 'head' or 'projection'",
                  "set model.qk_norm_scope=head (per head, Qwen3) or projection (OLMoE)")
        if self.sliding_window is not None and self.sliding_window <= 0:
            _fail("model.sliding_window", self.sliding_window, "must be positive", "use null to disable it")
        if self.attention_backend not in ATTENTION_BACKENDS:
            _fail("model.attention_backend", self.attention_backend, "is not known", f"use one of {list(ATTENTION_BACKENDS)}")
        if self.init_std <= 0:
            _fail("model.init_std", self.init_std, "must be positive", "use e.g. 0.02")
        if self.norm_epsilon <= 0:
            _fail("model.norm_epsilon", self.norm_epsilon, "must be positive", "use e.g. 1e-5")
        if self.num_experts is not None:
            if not isinstance(self.num_experts, int) or self.num_experts < 2:
                _fail("model.num_experts", self.num_experts, "must be an integer >= 2",
                      "use e.g. 8, or null for dense MLPs")
            if not isinstance(self.moe_top_k, int) or not 1 <= self.moe_top_k <= self.num_experts:
                _fail("model.moe_top_k", self.moe_top_k, f"must be between 1 and num_experts={self.num_experts}",
                      "use e.g. 2")
            if self.moe_ffn_hidden_size is not None and self.moe_ffn_hidden_size <= 0:
                _fail("model.moe_ffn_hidden_size", self.moe_ffn_hidden_size, "must be positive",
                      "use null to take model.ffn_hidden_size")
            if self.moe_aux_loss_coeff < 0:
                _fail("model.moe_aux_loss_coeff", self.moe_aux_loss_coeff, "must be >= 0", "use e.g. 0.01, or 0 for none")
            self._validate_moe()
        if self.multi_latent_attention:
            self._validate_mla()
        if not isinstance(self.mtp_num_layers, int) or self.mtp_num_layers < 0:
            _fail("model.mtp_num_layers", self.mtp_num_layers, "must be an integer >= 0", "use 0 (off) or e.g. 1")
        if self.mtp_loss_weight < 0:
            _fail("model.mtp_loss_weight", self.mtp_loss_weight, "must be >= 0", "use e.g. 0.1 (DeepSeek-V3: 0.3, then 0.1)")
        if self.layer_pattern is not None:
            self._validate_hybrid()
        return self

    def _validate_mla(self) -> None:
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            v = getattr(self, key)
            if not isinstance(v, int) or v <= 0:
                _fail(f"model.{key}", v, "must be a positive integer", "use DeepSeek's values, e.g. kv_lora_rank=512, "
                      "qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            _fail("model.q_lora_rank", self.q_lora_rank, "must be a positive integer", "use e.g. 1536, or null")
        if self.qk_rope_head_dim % 2:
            _fail("model.qk_rope_head_dim", self.qk_rope_head_dim, "is odd, so rotary pairs cannot be formed",
                  "use an even size, e.g. 64")
        if self.position_embedding != "rope":
            _fail("model.position_embedding", self.position_embedding, "must be 'rope' with multi_latent_attention "
                  "(its decoupled key part is rotary)", "set model.position_embedding=rope")
        if self.num_query_groups is not None and self.num_query_groups != self.num_attention_heads:
            _fail("model.num_query_groups", self.num_query_groups, "does not apply to multi_latent_attention (every "
                  "head has its own key and value, made from the shared latent)", "set model.num_query_groups=null")
        if self.add_qkv_bias or self.qk_norm or self.sliding_window is not None:
            _fail("model.multi_latent_attention", True, "has no qkv bias, qk_norm or sliding window",
                  "set model.add_qkv_bias=false, model.qk_norm=false, model.sliding_window=null")

    def is_moe_layer(self, layer_number: int) -> bool:
        """Whether layer ``layer_number`` (global, 0-based) has an MoE block rather than a dense MLP."""
        if self.num_experts is None or layer_number < self.moe_first_k_dense:
            return False
        return (layer_number - self.moe_first_k_dense) % self.moe_layer_freq == 0

    def _validate_moe(self) -> None:
        if self.moe_router_score not in MOE_ROUTER_SCORES:
            _fail("model.moe_router_score", self.moe_router_score, "is not known", f"use one of {list(MOE_ROUTER_SCORES)}")
        if self.moe_aux_loss_type not in MOE_AUX_LOSS_TYPES:
            _fail("model.moe_aux_loss_type", self.moe_aux_loss_type, "is not known",
                  f"use one of {list(MOE_AUX_LOSS_TYPES)}")
        if self.moe_experts_backend not in MOE_EXPERTS_BACKENDS:
            _fail("model.moe_experts_backend", self.moe_experts_backend, "is not known",
                  f"use one of {list(MOE_EXPERTS_BACKENDS)}")
        for key in ("moe_router_bias_update_rate", "moe_z_loss_coeff"):
            if getattr(self, key) < 0:
                _fail(f"model.{key}", getattr(self, key), "must be >= 0", "use 0 to turn it off")
        if not isinstance(self.moe_router_expert_bias, bool):
            _fail("model.moe_router_expert_bias", self.moe_router_expert_bias, "must be true or false",
                  "use true to keep a per-expert routing bias (implied by moe_router_bias_update_rate > 0)")
        if self.moe_routed_scaling_factor <= 0:
            _fail("model.moe_routed_scaling_factor", self.moe_routed_scaling_factor, "must be positive", "use 1.0")
        groups, top = self.moe_router_num_groups, self.moe_router_group_topk
        if (groups is None) != (top is None):
            _fail("model.moe_router_group_topk", top, "and model.moe_router_num_groups must be set together",
                  "set both (e.g. 8 groups, 4 of them eligible) or neither")
        if groups is not None:
            if not isinstance(groups, int) or groups < 1 or self.num_experts % groups:
                _fail("model.moe_router_num_groups", groups, f"must divide num_experts={self.num_experts}",
                      "use e.g. 8 for 256 experts")
            if not isinstance(top, int) or not 1 <= top <= groups:
                _fail("model.moe_router_group_topk", top, f"must be between 1 and moe_router_num_groups={groups}",
                      "use e.g. 4")
            if top * (self.num_experts // groups) < self.moe_top_k:
                _fail("model.moe_router_group_topk", top,
                      f"leaves {top * (self.num_experts // groups)} eligible experts, fewer than moe_top_k="
                      f"{self.moe_top_k}", "allow more groups per token or lower moe_top_k")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            _fail("model.moe_capacity_factor", self.moe_capacity_factor, "must be positive",
                  "use e.g. 1.25, or null for dropless routing")
        if self.moe_pad_to_capacity and self.moe_capacity_factor is None:
            _fail("model.moe_pad_to_capacity", True, "needs a capacity", "set model.moe_capacity_factor (e.g. 1.25)")
        if self.moe_shared_expert_hidden_size is not None and self.moe_shared_expert_hidden_size <= 0:
            _fail("model.moe_shared_expert_hidden_size", self.moe_shared_expert_hidden_size, "must be positive",
                  "use null for no shared expert")
        if self.moe_shared_expert_gate and self.moe_shared_expert_hidden_size is None:
            _fail("model.moe_shared_expert_gate", True, "gates a shared expert, but there is none",
                  "set model.moe_shared_expert_hidden_size")
        if not isinstance(self.moe_first_k_dense, int) or not 0 <= self.moe_first_k_dense < self.num_layers:
            _fail("model.moe_first_k_dense", self.moe_first_k_dense, f"must be in [0, num_layers={self.num_layers})",
                  "use 0 for MoE from the first layer")
        if not isinstance(self.moe_layer_freq, int) or self.moe_layer_freq < 1:
            _fail("model.moe_layer_freq", self.moe_layer_freq, "must be an integer >= 1", "use 1 for every layer")

    def _validate_hybrid(self) -> None:
        pattern = self.layer_pattern
        if not pattern or set(pattern) - set(LAYER_KINDS):
            _fail("model.layer_pattern", pattern, f"must use only the layer kinds {LAYER_KINDS}",
                  "write one character per layer, e.g. 'M-M*M-' ('M' Mamba, '*' attention, '-' MLP)")
        if len(pattern) != self.num_layers:
            _fail("model.layer_pattern", pattern, f"has {len(pattern)} layers but model.num_layers={self.num_layers}",
                  f"set model.num_layers={len(pattern)} or give one character per layer")
        if "M" in pattern:
            heads, p = self.mamba_heads, self.mamba_head_dim
            if p <= 0 or heads <= 0 or (self.mamba_num_heads is None and (2 * self.hidden_size) % p):
                _fail("model.mamba_head_dim", p, f"does not divide 2 * hidden_size = {2 * self.hidden_size}",
                      "set model.mamba_num_heads, or a head dim that divides it")
            if self.mamba_num_groups <= 0 or heads % self.mamba_num_groups:
                _fail("model.mamba_num_groups", self.mamba_num_groups,
                      f"must divide the number of Mamba heads ({heads})", "use e.g. 1, 2 or 8")
            for key in ("mamba_state_dim", "mamba_conv_kernel", "mamba_chunk_size"):
                if getattr(self, key) <= 0:
                    _fail(f"model.{key}", getattr(self, key), "must be positive", "use the default")
            if self.sliding_window is not None:
                _fail("model.sliding_window", self.sliding_window, "cannot apply to Mamba layers ('M' in "
                      "model.layer_pattern), whose scan sees every earlier position", "set model.sliding_window=null")
            if self.mamba_dt_clamp_min < 0:
                _fail("model.mamba_dt_clamp_min", self.mamba_dt_clamp_min, "must be >= 0 (a time step is positive)",
                      "use 0 (no clamp) or e.g. 0.001")
