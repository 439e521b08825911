"""The sections of a training run (``parallel``, ``train``, ``data``, ``checkpoint``, ``precision``,
``recompute``, ``log``) and ``RunConfig``, which groups them with ``model`` and ``vision``: what
``megacore train CONFIG.yaml key=value ...`` builds (``megacore.config.loading``), then validates.

Each section's ``validate()`` checks its own keys; which layouts, features and model kinds go
together, and which sizes must divide, is the support table's (``megacore.config.support``), run
once by ``RunConfig.validate``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from megacore.config.errors import check_finite
from megacore.config.errors import fail as _fail
from megacore.config.model import TransformerConfig
from megacore.config.support import check, check_supported, facts_of_parallel
from megacore.config.vision import VisionConfig

TP_COMM_OVERLAP_MODES = ("off", "schedule", "reorder", "symm_mem", "copy_engine")
CONTEXT_MODES = ("allgather", "ring", "a2a", "a2a+ring")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ParallelConfig:
    """Model-parallel layout. World size = pipeline * data * context * tensor (TP fastest-varying)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    context: int = 1
    expert: int = 1
    # Expert tensor parallelism: each expert's hidden units split over this many ranks of the TP group
    # (1, or parallel.tensor); the routed experts are replicated over TP when 1.
    expert_tensor: int = 1
    # How tokens reach their experts' ranks under expert parallelism (megacore.parallel.expert_parallel):
    # "all_to_all" (each row travels to its expert's rank and back) or "all_gather" (every rank gathers
    # every row and computes its experts' rows; P times the traffic, simpler: for 2-4 ranks).
    expert_dispatcher: str = "all_to_all"
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
    # How attention layers exchange keys/values across the context-parallel ranks
    # (megacore.parallel.context_parallel): "allgather" (every rank gathers the whole K/V),
    # "ring" (K/V blocks passed around the ring, overlapped with the attention of the block in hand),
    # "a2a" (all-to-all: heads scattered, sequence gathered; heads divisible by parallel.context) or
    # "a2a+ring" (a2a inside groups of parallel.context_a2a_size ranks, ring across the groups).
    context_mode: str = "allgather"
    context_a2a_size: Optional[int] = None
    # Seconds a collective may wait for the other ranks (NCCL and gloo, every process group): a rank
    # that stalls or dies ends the job within this time, with a message naming the rank and step.
    # Generous by default: rank 0 may build the data index or write a checkpoint while others wait.
    timeout_s: float = 1800.0

    def validate(self, world_size: Optional[int] = None) -> "ParallelConfig":
        """Each key's own values here; which sizes and features go together (and with the world
        size, when given) is the support table's (``megacore.config.support``)."""
        # The first spelling was a boolean, where true meant inductor's async TP.
        check_finite("parallel", self)
        legacy = {True: "symm_mem", False: "off", "true": "symm_mem", "false": "off"}
        if isinstance(self.tp_comm_overlap, (bool, str)) and self.tp_comm_overlap in legacy:
            self.tp_comm_overlap = legacy[self.tp_comm_overlap]
        if self.tp_comm_overlap not in TP_COMM_OVERLAP_MODES:
            _fail("parallel.tp_comm_overlap", self.tp_comm_overlap, "is not known",
                  f"use one of {list(TP_COMM_OVERLAP_MODES)}")
        if not isinstance(self.tp_batch_chunks, int) or self.tp_batch_chunks < 1:
            _fail("parallel.tp_batch_chunks", self.tp_batch_chunks, "must be an integer >= 1",
                  "set parallel.tp_batch_chunks=1 to disable it")
        if self.ddp_bucket_size_mb <= 0:
            _fail("parallel.ddp_bucket_size_mb", self.ddp_bucket_size_mb, "must be positive", "use e.g. 25")
        if self.grad_reduce_dtype not in ("fp32", "bf16"):
            _fail("parallel.grad_reduce_dtype", self.grad_reduce_dtype, "is not known",
                  "use fp32 (exact sums) or bf16 (half the traffic)")
        if (isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float))
                or not math.isfinite(self.timeout_s) or self.timeout_s <= 0):
            _fail("parallel.timeout_s", self.timeout_s, "must be a positive number of seconds",
                  "use e.g. 1800 (30 minutes; the time a rank may wait for the others in a collective)")
        if self.expert_dispatcher not in ("all_to_all", "all_gather"):
            _fail("parallel.expert_dispatcher", self.expert_dispatcher, "is not known",
                  "use 'all_to_all' or 'all_gather' (gathers every token on every expert-parallel rank)")
        if self.context_mode not in CONTEXT_MODES:
            _fail("parallel.context_mode", self.context_mode, "is not known", f"use one of {list(CONTEXT_MODES)}")
        if self.context_a2a_size is not None and (not isinstance(self.context_a2a_size, int)
                                                  or self.context_a2a_size < 1):
            _fail("parallel.context_a2a_size", self.context_a2a_size, "must be a positive integer",
                  "use a divisor of parallel.context, e.g. 2, or null")
        if self.pipeline_schedule not in ("1f1b", "interleaved", "gpipe", "zero_bubble"):
            _fail("parallel.pipeline_schedule", self.pipeline_schedule, "is not known",
                  "use one of ['1f1b', 'interleaved', 'gpipe', 'zero_bubble']")
        check(facts_of_parallel(self, world_size))
        return self

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor * self.pipeline * self.context)

    def mesh_sizes(self) -> dict:
        """Every axis of the process mesh this section asks for, as the keyword arguments of
        ``megacore.parallel.initialize`` (the one place the config becomes process groups; an axis
        added here reaches the mesh without touching the caller)."""
        return {"tensor": self.tensor, "pipeline": self.pipeline, "context": self.context, "expert": self.expert,
                "expert_tensor": self.expert_tensor,
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
    # Divergence policy (megacore.training.divergence). A step whose loss or grad norm is not finite,
    # or whose loss exceeds loss_spike_factor x the mean loss of the loss_spike_window applied steps
    # before it, is skipped (weights and optimizer state untouched) and logged in metrics.jsonl with
    # skipped=true and a skip_reason. max_skipped_steps skips in a row stop the run with an error
    # (exit 1); null: never stop (the skips are still logged).
    max_skipped_steps: Optional[int] = 3
    loss_spike_factor: Optional[float] = None  # e.g. 3.0 (must be > 1); null: no loss-spike check
    loss_spike_window: int = 20                # applied steps whose mean loss a spike is measured against

    def validate(self) -> "TrainConfig":
        check_finite("train", self)
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
        if self.lr <= 0:
            _fail("train.lr", self.lr, "must be positive", "use e.g. 3e-4")
        if self.min_lr < 0 or self.min_lr > self.lr:
            _fail("train.min_lr", self.min_lr, f"must be in [0, train.lr={self.lr}]", "lower train.min_lr")
        if self.seed < 0:
            _fail("train.seed", self.seed, "must be >= 0", "use e.g. 1234")
        if self.warmup_iters < 0:
            _fail("train.warmup_iters", self.warmup_iters, "must be >= 0", "use 0 to disable warmup")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            _fail("train.lr_decay_iters", self.lr_decay_iters, "must be >= 1", "use null to decay over train.iters")
        if not 0.0 <= self.wsd_decay_fraction <= 1.0:
            _fail("train.wsd_decay_fraction", self.wsd_decay_fraction, "must be in [0, 1]", "use e.g. 0.2")
        if self.weight_decay < 0:
            _fail("train.weight_decay", self.weight_decay, "must be >= 0", "use e.g. 0.1, or 0 for none")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail(f"train.{name}", getattr(self, name), "must be in [0, 1)",
                      "use e.g. adam_beta1=0.9, adam_beta2=0.95")
        if self.adam_eps <= 0:
            _fail("train.adam_eps", self.adam_eps, "must be positive", "use e.g. 1e-8")
        if self.clip_grad < 0:
            _fail("train.clip_grad", self.clip_grad, "must be >= 0", "use 0 to disable clipping")
        if self.eval_interval < 0:
            _fail("train.eval_interval", self.eval_interval, "must be >= 0", "use 0 to disable evaluation")
        if self.eval_iters < 0 or (self.eval_interval > 0 and self.eval_iters < 1):
            _fail("train.eval_iters", self.eval_iters, "must be >= 1 when train.eval_interval > 0",
                  "use e.g. 10, or train.eval_interval=0 to disable evaluation")
        if self.log_interval < 1:
            _fail("train.log_interval", self.log_interval, "must be >= 1", "use 1")
        if self.max_skipped_steps is not None and self.max_skipped_steps < 1:
            _fail("train.max_skipped_steps", self.max_skipped_steps, "must be >= 1",
                  "use e.g. 3, or null to never stop on skipped steps")
        if self.loss_spike_factor is not None and self.loss_spike_factor <= 1.0:
            _fail("train.loss_spike_factor", self.loss_spike_factor, "must be > 1 (a multiple of the recent mean loss)",
                  "use e.g. 3.0, or null to disable the loss-spike check")
        if self.loss_spike_window < 1:
            _fail("train.loss_spike_window", self.loss_spike_window, "must be >= 1", "use e.g. 20")
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
        check_finite("data", self)
        if self.source not in ("default", "mock", "indexed"):
            _fail("data.source", self.source, "is not known", "use one of ['default', 'mock', 'indexed']")
        if self.source == "indexed" and not self.paths:
            _fail("data.paths", self.paths, "is empty but data.source='indexed'",
                  "list one or more .bin/.idx path prefixes (from `megacore preprocess`)")
        if self.weights is not None:
            if self.paths is None or len(self.weights) != len(self.paths):
                _fail("data.weights", self.weights, "must have one weight per entry of data.paths",
                      "give as many weights as paths, or omit weights")
            weights = _finite_numbers(self.weights)
            if weights is None or any(w < 0 for w in weights) or sum(weights) <= 0:
                _fail("data.weights", self.weights, "must be finite non-negative numbers with a positive sum",
                      "give one number per path, e.g. [0.7, 0.3]")
        nums = _finite_numbers(str(self.split).split(","))
        if nums is None or len(nums) != 3 or any(n < 0 for n in nums) or sum(nums) <= 0:
            _fail("data.split", self.split, "must be three finite non-negative numbers 'train,valid,test'",
                  "use e.g. '969,30,1'")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            _fail("data.num_workers", self.num_workers, "must be >= 0", "use 0")
        if not isinstance(self.tokenizer_vocab_size, int) or self.tokenizer_vocab_size < 1:
            _fail("data.tokenizer_vocab_size", self.tokenizer_vocab_size, "must be a positive integer", "use e.g. 4096")
        return self


def _finite_numbers(items) -> Optional[list[float]]:
    """``items`` as floats, or None when one is not a finite number (``"nan"`` and ``"inf"`` parse as floats)."""
    try:
        nums = [float(x) for x in items]
    except (TypeError, ValueError):
        return None
    return nums if all(math.isfinite(n) for n in nums) else None


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    interval: int = 0
    load: Optional[str] = None
    async_save: bool = False
    keep_last: int = 3
    save_on_exit: bool = True
    # Export the model as a Hugging Face directory (config.json with the source model's token ids,
    # generation_config.json, safetensors, tokenizer when known) here at the end of training;
    # null: no export. save_hf_at_each_save: also export at every checkpoint save (overwriting).
    save_hf: Optional[str] = None
    save_hf_at_each_save: bool = False

    def validate(self) -> "CheckpointConfig":
        if self.interval < 0:
            _fail("checkpoint.interval", self.interval, "must be >= 0", "use 0 to save only at the end")
        if self.interval > 0 and not self.dir:
            _fail("checkpoint.dir", self.dir, "is not set but checkpoint.interval > 0", "set checkpoint.dir=PATH")
        if self.keep_last < 1:
            _fail("checkpoint.keep_last", self.keep_last, "must be >= 1", "keep at least one checkpoint")
        if self.load == "latest" and not self.dir:
            _fail("checkpoint.load", self.load, "resumes from checkpoint.dir, which is not set",
                  "set checkpoint.dir=PATH, or checkpoint.load=PATH of the checkpoint to load")
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
        check_finite("precision", self)
        if self.dtype not in ("fp32", "bf16", "fp16"):
            _fail("precision.dtype", self.dtype, "is not known", "use one of ['fp32', 'bf16', 'fp16']")
        if self.fp8 not in (None, "tensorwise"):
            _fail("precision.fp8", self.fp8, "is not known", "use null or 'tensorwise'")
        if self.min_loss_scale <= 0:
            _fail("precision.min_loss_scale", self.min_loss_scale, "must be positive", "use e.g. 1.0")
        if self.initial_loss_scale < self.min_loss_scale:
            _fail("precision.initial_loss_scale", self.initial_loss_scale,
                  f"must be positive and >= precision.min_loss_scale={self.min_loss_scale}", "use e.g. 65536")
        if self.loss_scale_window < 1:
            _fail("precision.loss_scale_window", self.loss_scale_window, "must be >= 1", "use e.g. 1000")
        if self.hysteresis < 1:
            _fail("precision.hysteresis", self.hysteresis, "must be >= 1", "use 1 to back off on every overflow")
        return self


@dataclass
class RecomputeConfig:
    """``granularity``: null (off), ``full`` (whole layers; every ``every``-th layer) or
    ``selective`` (the listed ``modules``: ``core_attn``, ``mlp_act``, ``mla_up_proj``: multi-latent
    attention's up-projections with its attention)."""

    granularity: Optional[str] = None
    every: int = 1
    modules: list = field(default_factory=lambda: ["core_attn"])

    def validate(self) -> "RecomputeConfig":
        if self.granularity not in (None, "full", "selective"):
            _fail("recompute.granularity", self.granularity, "is not known", "use null, 'full' or 'selective'")
        if self.every < 1:
            _fail("recompute.every", self.every, "must be >= 1", "use 1 to recompute every layer")
        bad = [m for m in self.modules if m not in ("core_attn", "mlp_act", "mla_up_proj")]
        if bad:
            _fail("recompute.modules", self.modules, f"contains unknown modules {bad}",
                  "use 'core_attn', 'mlp_act' and/or 'mla_up_proj'")
        return self


@dataclass
class WandbConfig:
    """Weights & Biases logging from rank 0 (needs ``pip install wandb``); off while ``project`` is null."""

    project: Optional[str] = None
    name: Optional[str] = None
    entity: Optional[str] = None
    offline: bool = False   # write the run files under log.dir without contacting the server


@dataclass
class LogConfig:
    dir: str = "runs/demo"
    interval: int = 1
    tensorboard: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> "LogConfig":
        if self.interval < 1:
            _fail("log.interval", self.interval, "must be >= 1", "use 1 to log every step")
        return self


@dataclass
class ProfileConfig:
    """The PyTorch profiler over steps ``start_step..end_step`` (a Chrome trace per rank under
    ``<log.dir>/profile``), and CUDA memory history (``memory_snapshot``: dumped under ``log.dir``
    at the end and on out-of-memory)."""

    start_step: Optional[int] = None   # first profiled step (1-based); null: no profiler
    end_step: Optional[int] = None     # last profiled step (inclusive); null: start_step only
    ranks: Optional[list] = None       # ranks that profile; null: every rank
    record_shapes: bool = False
    with_stack: bool = False
    memory_snapshot: bool = False
    memory_snapshot_max_entries: int = 100000

    def validate(self) -> "ProfileConfig":
        if self.start_step is not None and (not isinstance(self.start_step, int) or self.start_step < 1):
            _fail("profile.start_step", self.start_step, "must be a step number >= 1", "use e.g. 5, or null")
        if self.end_step is not None:
            if self.start_step is None:
                _fail("profile.end_step", self.end_step, "is set but profile.start_step is null",
                      "set profile.start_step too")
            if self.end_step < self.start_step:
                _fail("profile.end_step", self.end_step, f"is before profile.start_step={self.start_step}",
                      "use an end_step >= start_step")
        if self.memory_snapshot_max_entries < 1:
            _fail("profile.memory_snapshot_max_entries", self.memory_snapshot_max_entries, "must be >= 1",
                  "use e.g. 100000")
        return self


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
    profile: ProfileConfig = field(default_factory=ProfileConfig)
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
        self.profile.validate()
        if self.vision.enabled:
            self.vision.validate().check_text(self.model)
        if self.device not in ("cpu", "cuda", "auto"):
            _fail("device", self.device, "is not known", "use 'cpu', 'cuda' or 'auto'")
        if self.compile_mode not in COMPILE_MODES:
            _fail("compile_mode", self.compile_mode, "is not a torch.compile mode", f"use one of {list(COMPILE_MODES)}")
        check_supported(self, world_size)  # the support matrix: layouts x features x model kinds, sizes
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
