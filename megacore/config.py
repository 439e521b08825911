"""Typed, validated configuration.

Every section is a dataclass with a ``validate()`` that names the bad field, the value and the fix.
``RunConfig`` groups the sections of one training run and is what ``megacore train CONFIG.yaml
key=value ...`` builds: YAML file first, then dotted overrides, then ``validate()``.

Unknown keys are errors that list the nearest valid names, so a typo never silently falls back to
a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


def _fail(field_name: str, value: Any, problem: str, fix: str) -> None:
    raise ConfigError(f"{field_name}={value!r} {problem}; {fix}")


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "swiglu", "geglu", "relu", "squared_relu")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned", "none")
LAYER_KINDS = ("M", "*", "-")  # model.layer_pattern: Mamba-2, self-attention, MLP
ROTARY_SCALINGS = (None, "llama3", "yarn", "linear")
ATTENTION_BACKENDS = ("auto", "sdpa", "reference")
TP_COMM_OVERLAP_MODES = ("off", "schedule", "reorder", "symm_mem", "copy_engine")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TransformerConfig:
    """Shape and numerics of a decoder-only transformer (dense GPT / Llama family).

    ``num_query_groups`` is the number of key/value heads (GQA; equal to ``num_attention_heads``
    for MHA, 1 for MQA). ``kv_channels`` is the per-head dimension (defaults to
    ``hidden_size // num_attention_heads``). ``ffn_hidden_size`` defaults to ``4 * hidden_size``.
    """

    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    vocab_size: int = 1024
    seq_length: int = 256
    # Rows of the embedding/output tables are padded to a multiple of this (never changes the loss:
    # padded logits are masked). Must be divisible by the tensor-parallel size.
    vocab_padding_multiple: int = 128

    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    layernorm_zero_centered_gamma: bool = False
    activation: str = "swiglu"

    position_embedding: str = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rotary_scaling: Optional[str] = None
    rotary_scaling_factor: float = 1.0
    rotary_original_max_positions: Optional[int] = None
    rotary_low_freq_factor: float = 1.0   # llama3
    rotary_high_freq_factor: float = 4.0  # llama3
    rotary_beta_fast: float = 32.0        # yarn
    rotary_beta_slow: float = 1.0         # yarn
    rotary_mscale: float = 1.0            # yarn
    rotary_mscale_all_dim: float = 0.0    # yarn

    add_qkv_bias: bool = False
    add_bias_linear: bool = False
    qk_norm: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    sliding_window: Optional[int] = None
    attention_softmax_scale: Optional[float] = None
    attention_backend: str = "auto"

    tie_embeddings: bool = False
    init_std: float = 0.02
    scaled_output_init: bool = True

    # Mixture of experts (megacore.layers.moe): every layer's MLP becomes num_experts expert MLPs
    # of moe_ffn_hidden_size (default ffn_hidden_size), each token sent to its moe_top_k experts.
    num_experts: Optional[int] = None
    moe_top_k: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_norm_topk: bool = True   # renormalize the top-k router probabilities to sum to 1 (Mixtral)
    moe_aux_loss_coeff: float = 0.0     # weight of the load-balancing loss (e.g. 0.01; 0: off)
    # Hybrid stacks (Megatron / NemotronH convention): one character per layer, each layer one
    # pre-norm residual block: 'M' Mamba-2 mixer, '*' self-attention, '-' MLP (or MoE when
    # num_experts is set). null: every layer is attention + MLP (a plain transformer).
    layer_pattern: Optional[str] = None
    mamba_num_heads: Optional[int] = None   # default: 2 * hidden_size / mamba_head_dim (expand 2)
    mamba_head_dim: int = 64
    mamba_state_dim: int = 128
    mamba_num_groups: int = 8               # B and C are shared by the heads of each group
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128             # SSD chunk length (speed only; results do not depend on it)
    mamba_dt_clamp_min: float = 0.0         # lower clamp of the time step (NemotronH: its time_step_min)

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
    def gated_mlp(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_percent)

    def validate(self) -> "TransformerConfig":
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
        if self.layer_pattern is not None:
            self._validate_hybrid()
        return self

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


@dataclass
class ParallelConfig:
    """Model-parallel layout. World size = pipeline * data * context * tensor (TP fastest-varying)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    context: int = 1
    expert: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    fsdp: bool = False
    pipeline_layers: Optional[list] = None
    pipeline_schedule: str = "1f1b"
    ddp_bucket_size_mb: float = 25.0
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    grad_reduce_dtype: str = "fp32"   # dtype of data-parallel gradient reduction on the wire (fp32 | bf16)
    # Overlap sequence-parallel communication with compute (needs sequence_parallel): "off";
    # "copy_engine" (megacore.parallel.sp_overlap: each SP linear moves its tokens by peer-to-peer
    # copies over symmetric memory while it multiplies the local part; eager or compiled, CUDA graphs
    # included; on CPU/gloo the same ops run the plain collectives). Inductor passes, compile=true on
    # CUDA only: "schedule" (its overlap scheduler starts each collective early and waits late);
    # "reorder" (its older reordering passes); "symm_mem" (its micro-pipelined async TP). The
    # inductor passes measured slower on 2 H100s: see docs/parallelism-tp.md.
    tp_comm_overlap: str = "off"
    # Split each micro-batch into this many groups of whole sequences inside every transformer layer:
    # the groups are independent, so one group's collectives can run while another computes.
    tp_batch_chunks: int = 1

    def validate(self, world_size: Optional[int] = None) -> "ParallelConfig":
        """Each key's own values here; which sizes and features go together (and with the world
        size, when given) is the support table's (``megacore.config_support``)."""
        # The first spelling was a boolean, where true meant inductor's async TP.
        legacy = {True: "symm_mem", False: "off", "true": "symm_mem", "false": "off"}
        if isinstance(self.tp_comm_overlap, (bool, str)) and self.tp_comm_overlap in legacy:
            self.tp_comm_overlap = legacy[self.tp_comm_overlap]
        if self.tp_comm_overlap not in TP_COMM_OVERLAP_MODES:
            _fail("parallel.tp_comm_overlap", self.tp_comm_overlap, "is not known",
                  f"use one of {list(TP_COMM_OVERLAP_MODES)}")
        if not isinstance(self.tp_batch_chunks, int) or self.tp_batch_chunks < 1:
            _fail("parallel.tp_batch_chunks", self.tp_batch_chunks, "must be an integer >= 1",
                  "set parallel.tp_batch_chunks=1 to disable it")
        if self.grad_reduce_dtype not in ("fp32", "bf16"):
            _fail("parallel.grad_reduce_dtype", self.grad_reduce_dtype, "is not known",
                  "use fp32 (exact sums) or bf16 (half the traffic)")
        if self.pipeline_schedule not in ("1f1b", "interleaved", "gpipe", "zero_bubble"):
            _fail("parallel.pipeline_schedule", self.pipeline_schedule, "is not known",
                  "use one of ['1f1b', 'interleaved', 'gpipe', 'zero_bubble']")
        from megacore.config_support import check, facts_of_parallel

        check(facts_of_parallel(self, world_size))
        return self

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor * self.pipeline * self.context)

    def mesh_sizes(self) -> dict:
        """Every axis of the process mesh this section asks for, as the keyword arguments of
        ``megacore.parallel.initialize`` (the one place the config becomes process groups; an axis
        added here reaches the mesh without touching the caller)."""
        return {"tensor": self.tensor, "pipeline": self.pipeline, "context": self.context, "expert": self.expert,
                "virtual_pipeline": self.virtual_pipeline if (self.virtual_pipeline or 1) > 1 else None}


@dataclass
class TrainConfig:
    iters: int = 200
    global_batch_size: int = 8
    micro_batch_size: int = 8
    seed: int = 1234
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 20
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None
    wsd_decay_fraction: float = 0.2
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    eval_interval: int = 0
    eval_iters: int = 10
    log_interval: int = 1

    def validate(self) -> "TrainConfig":
        for name in ("iters", "global_batch_size", "micro_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                _fail(f"train.{name}", v, "must be a positive integer", f"set train.{name} >= 1")
        if self.global_batch_size % self.micro_batch_size != 0:
            _fail("train.global_batch_size", self.global_batch_size,
                  f"is not divisible by micro_batch_size={self.micro_batch_size}",
                  "make global_batch_size a multiple of micro_batch_size * data-parallel size")
        if self.lr_decay_style not in ("cosine", "linear", "wsd", "constant"):
            _fail("train.lr_decay_style", self.lr_decay_style, "is not known",
                  "use one of ['cosine', 'linear', 'wsd', 'constant']")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            _fail("train.min_lr", self.min_lr, f"must be in [0, lr={self.lr}] with lr > 0", "lower min_lr")
        if self.warmup_iters < 0:
            _fail("train.warmup_iters", self.warmup_iters, "must be >= 0", "use 0 to disable warmup")
        if not 0.0 <= self.wsd_decay_fraction <= 1.0:
            _fail("train.wsd_decay_fraction", self.wsd_decay_fraction, "must be in [0, 1]", "use e.g. 0.2")
        if self.clip_grad < 0:
            _fail("train.clip_grad", self.clip_grad, "must be >= 0", "use 0 to disable clipping")
        return self


@dataclass
class DataConfig:
    """``source``: ``default`` (the embedded corpus), ``mock`` (deterministic synthetic tokens) or
    ``indexed`` (``paths``: Megatron .bin/.idx prefixes, with optional ``weights``)."""

    source: str = "default"
    paths: Optional[list] = None
    weights: Optional[list] = None
    split: str = "969,30,1"
    tokenizer: Optional[str] = None
    tokenizer_vocab_size: int = 4096
    cache_dir: Optional[str] = None
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    num_workers: int = 0

    def validate(self) -> "DataConfig":
        if self.source not in ("default", "mock", "indexed"):
            _fail("data.source", self.source, "is not known", "use one of ['default', 'mock', 'indexed']")
        if self.source == "indexed" and not self.paths:
            _fail("data.paths", self.paths, "is empty but data.source='indexed'",
                  "list one or more .bin/.idx path prefixes (from `megacore preprocess`)")
        if self.weights is not None:
            if self.paths is None or len(self.weights) != len(self.paths):
                _fail("data.weights", self.weights, "must have one weight per entry of data.paths",
                      "give as many weights as paths, or omit weights")
            if any(float(w) < 0 for w in self.weights) or sum(float(w) for w in self.weights) <= 0:
                _fail("data.weights", self.weights, "must be non-negative with a positive sum", "fix the weights")
        parts = str(self.split).split(",")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) != 3 or any(n < 0 for n in nums) or sum(nums) <= 0:
            _fail("data.split", self.split, "must be three non-negative numbers 'train,valid,test'", "use e.g. '969,30,1'")
        return self


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    interval: int = 0
    load: Optional[str] = None
    async_save: bool = False
    keep_last: int = 3
    save_on_exit: bool = True

    def validate(self) -> "CheckpointConfig":
        if self.interval < 0:
            _fail("checkpoint.interval", self.interval, "must be >= 0", "use 0 to save only at the end")
        if self.interval > 0 and not self.dir:
            _fail("checkpoint.dir", self.dir, "is not set but checkpoint.interval > 0", "set checkpoint.dir=PATH")
        if self.keep_last < 1:
            _fail("checkpoint.keep_last", self.keep_last, "must be >= 1", "keep at least one checkpoint")
        return self


@dataclass
class PrecisionConfig:
    """``dtype`` is the compute/parameter dtype. With bf16/fp16 the optimizer keeps fp32 master
    weights and gradients accumulate in fp32 unless ``master_weights=false``."""

    dtype: str = "fp32"
    master_weights: bool = True
    fp8: Optional[str] = None
    initial_loss_scale: float = 2.0 ** 16
    loss_scale_window: int = 1000
    min_loss_scale: float = 1.0
    hysteresis: int = 2

    def validate(self) -> "PrecisionConfig":
        if self.dtype not in ("fp32", "bf16", "fp16"):
            _fail("precision.dtype", self.dtype, "is not known", "use one of ['fp32', 'bf16', 'fp16']")
        if self.fp8 not in (None, "tensorwise"):
            _fail("precision.fp8", self.fp8, "is not known", "use null or 'tensorwise'")
        if self.initial_loss_scale <= 0:
            _fail("precision.initial_loss_scale", self.initial_loss_scale, "must be positive", "use e.g. 65536")
        return self


@dataclass
class RecomputeConfig:
    """``granularity``: null (off), ``full`` (whole layers; every ``every``-th layer) or
    ``selective`` (the listed ``modules``: ``core_attn``, ``mlp_act``)."""

    granularity: Optional[str] = None
    every: int = 1
    modules: list = field(default_factory=lambda: ["core_attn"])

    def validate(self) -> "RecomputeConfig":
        if self.granularity not in (None, "full", "selective"):
            _fail("recompute.granularity", self.granularity, "is not known", "use null, 'full' or 'selective'")
        if self.every < 1:
            _fail("recompute.every", self.every, "must be >= 1", "use 1 to recompute every layer")
        bad = [m for m in self.modules if m not in ("core_attn", "mlp_act")]
        if bad:
            _fail("recompute.modules", self.modules, f"contains unknown modules {bad}", "use 'core_attn' and/or 'mlp_act'")
        return self


@dataclass
class LogConfig:
    dir: str = "runs/demo"
    interval: int = 1
    tensorboard: bool = False

    def validate(self) -> "LogConfig":
        if self.interval < 1:
            _fail("log.interval", self.interval, "must be >= 1", "use 1 to log every step")
        return self


from megacore.config_vision import VisionConfig  # noqa: E402 (uses this module's helpers lazily)


@dataclass
class RunConfig:
    model: TransformerConfig = field(default_factory=TransformerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    device: str = "cpu"
    compile: bool = False
    # torch.compile mode of the layer and loss-head graphs: null (inductor's default),
    # "reduce-overhead" (CUDA graphs: one launch per graph replay, for host-bound steps),
    # "max-autotune" or "max-autotune-no-cudagraphs" (GEMM autotuning; slow first compile).
    compile_mode: Optional[str] = None

    def validate(self, world_size: Optional[int] = None) -> "RunConfig":
        self.model.validate()
        self.parallel.validate()  # its own keys; the world size is checked with the whole table below
        self.train.validate()
        self.data.validate()
        self.checkpoint.validate()
        self.precision.validate()
        self.recompute.validate()
        self.log.validate()
        if self.vision.enabled:
            self.vision.validate().check_text(self.model)
        if self.device not in ("cpu", "cuda", "auto"):
            _fail("device", self.device, "is not known", "use 'cpu', 'cuda' or 'auto'")
        if self.compile_mode not in COMPILE_MODES:
            _fail("compile_mode", self.compile_mode, "is not a torch.compile mode", f"use one of {list(COMPILE_MODES)}")
        from megacore.config_support import check_supported

        check_supported(self, world_size)  # the support matrix: layouts x features x model kinds, sizes
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Building configs from YAML and dotted overrides lives in megacore.config_loading; re-exported here
# so ``from megacore.config import load_run_config`` keeps working.
from megacore.config_loading import apply_override, from_dict, load_run_config  # noqa: E402,F401
