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
from dataclasses import dataclass
from typing import Optional

from megacore.config.errors import check_finite
from megacore.config.errors import fail as _fail
from megacore.config.fields import doc
from megacore.config.model import TransformerConfig
from megacore.config.support import check, check_supported, facts_of_parallel
from megacore.config.vision import VisionConfig

TP_COMM_OVERLAP_MODES = ("off", "schedule", "reorder", "symm_mem", "copy_engine")
CONTEXT_MODES = ("allgather", "ring", "a2a", "a2a+ring")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ParallelConfig:
    """Model-parallel layout. World size = pipeline * data * context * tensor (TP fastest-varying)."""

    tensor: int = doc(1, "Tensor-parallel size: ranks that split each layer's weights (neighbouring ranks).")
    pipeline: int = doc(1, "Pipeline-parallel size: stages the layers are cut into.")
    virtual_pipeline: Optional[int] = doc(None, "Model chunks per pipeline stage (interleaved schedule); "
                                                "null: one chunk per stage.")
    context: int = doc(1, "Context-parallel size: ranks that each hold part of every sequence.")
    expert: int = doc(1, "Expert-parallel size: ranks the routed experts of a MoE layer are spread over.")
    expert_tensor: int = doc(1, "Expert tensor parallelism: ranks of the TP group that split each expert's hidden "
                                "units (1 or parallel.tensor); 1 replicates the routed experts over TP.")
    expert_dispatcher: str = doc("all_to_all", "How tokens reach their experts' ranks under expert parallelism: "
                                 "all_to_all (each row travels to its expert's rank and back) or all_gather (every "
                                 "rank gathers every row; P times the traffic, simpler: for 2-4 ranks).")
    sequence_parallel: bool = doc(False, "Split the activations outside attention/MLP along the sequence over the "
                                         "TP ranks (needs parallel.tensor > 1).")
    distributed_optimizer: bool = doc(False, "Shard the optimizer state and master weights over data-parallel "
                                             "ranks (ZeRO-1/2).")
    fsdp: bool = doc(False, "Shard parameters, gradients and optimizer state over data-parallel ranks (FSDP2).")
    pipeline_layers: Optional[list] = doc(None, "Layers per pipeline block, in model order (pipeline x "
                                                "virtual_pipeline counts summing to model.num_layers); null: an "
                                                "even split.")
    pipeline_schedule: str = doc("1f1b", "Pipeline schedule: 1f1b, interleaved (needs virtual_pipeline), gpipe or "
                                         "zero_bubble.")
    ddp_bucket_size_mb: float = doc(25.0, "Size in MB of the gradient buckets reduced over data parallelism "
                                          "(larger: fewer, bigger collectives).")
    overlap_grad_reduce: bool = doc(True, "Reduce each gradient bucket during backward, as soon as it is full.")
    overlap_param_gather: bool = doc(True, "Distributed optimizer: all-gather the updated parameters bucket by "
                                           "bucket, overlapped with the next forward.")
    grad_reduce_dtype: str = doc("fp32", "dtype of the data-parallel gradient reduction on the wire: fp32 (exact "
                                         "sums) or bf16 (half the traffic).")
    tp_comm_overlap: str = doc("off", "Overlap sequence-parallel communication with compute (needs "
                               "sequence_parallel): off; copy_engine (each SP linear moves its tokens by peer-to-peer "
                               "copies over symmetric memory while it multiplies the local part; eager or compiled, "
                               "CUDA graphs included; plain collectives on CPU/gloo). Inductor passes, compile=true "
                               "on CUDA only: schedule (its overlap scheduler), reorder (its older reordering passes), "
                               "symm_mem (its micro-pipelined async TP); measured slower on 2 H100s "
                               "(docs/parallelism-tp.md).")
    tp_batch_chunks: int = doc(1, "Split each micro-batch into this many groups of whole sequences inside every "
                                  "layer, so one group's collectives run while another computes; 1: off.")
    context_mode: str = doc("allgather", "How attention exchanges keys/values across context-parallel ranks: "
                            "allgather (every rank gathers the whole K/V), ring (K/V blocks passed around the ring, "
                            "overlapped with attention), a2a (all-to-all: heads scattered, sequence gathered; heads "
                            "divisible by parallel.context) or a2a+ring (a2a inside groups of context_a2a_size "
                            "ranks, ring across them).")
    context_a2a_size: Optional[int] = doc(None, "With context_mode=a2a+ring: ranks per all-to-all group (a divisor "
                                                "of parallel.context).")
    timeout_s: float = doc(1800.0, "Seconds a collective may wait for the other ranks (every NCCL/gloo group): a "
                                   "rank that stalls or dies ends the job within this time, naming the rank and "
                                   "step. Generous: rank 0 may build the data index or save while others wait.")

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
    iters: int = doc(200, "Optimizer steps to train (a resumed run continues up to this step).")
    global_batch_size: int = doc(8, "Sequences per optimizer step, over all data-parallel ranks.")
    micro_batch_size: int = doc(8, "Sequences per forward/backward pass on one rank; global_batch_size / "
                                   "(micro_batch_size x data-parallel size) micro-batches accumulate per step.")
    seed: int = doc(1234, "Seed of the weights, dropout and data order (the same seed gives the same model and "
                          "batches in every parallel layout).")
    lr: float = doc(1e-3, "Peak learning rate, reached after warmup_iters.")
    min_lr: float = doc(1e-4, "Learning rate at the end of the decay (0 <= min_lr <= lr).")
    warmup_iters: int = doc(20, "Steps of linear warmup from 0 to lr.")
    lr_decay_style: str = doc("cosine", "Learning-rate decay after warmup: cosine, linear, wsd (warmup-stable-decay: "
                                        "constant, then decay over the last wsd_decay_fraction) or constant.")
    lr_decay_iters: Optional[int] = doc(None, "Step at which the decay reaches min_lr; null: train.iters.")
    wsd_decay_fraction: float = doc(0.2, "lr_decay_style=wsd: fraction (0-1) of the decay steps spent decaying.")
    weight_decay: float = doc(0.1, "AdamW decoupled weight decay (matrices only; not biases or norms); 0: none.")
    adam_beta1: float = doc(0.9, "AdamW beta1, in [0, 1).")
    adam_beta2: float = doc(0.95, "AdamW beta2, in [0, 1).")
    adam_eps: float = doc(1e-8, "AdamW epsilon (> 0).")
    clip_grad: float = doc(1.0, "Clip the global gradient norm to this value; 0: no clipping.")
    eval_interval: int = doc(0, "Evaluate on the validation split every this many steps; 0: never.")
    eval_iters: int = doc(10, "Validation batches (of global_batch_size) per evaluation.")
    max_skipped_steps: Optional[int] = doc(3, "Divergence policy: a step whose loss or grad norm is not finite (or "
                                              "a loss spike) is skipped and logged with skipped=true; this many "
                                              "skips in a row stop the run (exit 1); null: never stop.")
    loss_spike_factor: Optional[float] = doc(None, "Skip a step whose loss exceeds this multiple (> 1, e.g. 3.0) of "
                                                   "the mean loss of the last loss_spike_window applied steps; null: "
                                                   "no loss-spike check.")
    loss_spike_window: int = doc(20, "Applied steps whose mean loss a spike is measured against.")

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

    source: str = doc("default", "Training data: default (the embedded corpus, Python stdlib docstrings), mock "
                                 "(deterministic synthetic tokens) or indexed (data.paths).")
    paths: Optional[list] = doc(None, "data.source=indexed: datasets written by `megacore preprocess` (or "
                                      "Megatron-LM), each as its prefix, PREFIX.bin or PREFIX.idx, e.g. "
                                      "[data/web, data/code.bin].")
    weights: Optional[list] = doc(None, "Blend weights, one per entry of data.paths (normalized); null: in "
                                        "proportion to each dataset's tokens.")
    split: str = doc("969,30,1", "train,valid,test proportions of the documents (Megatron style).")
    tokenizer: Optional[str] = doc(None, "A Hugging Face tokenizer.json (or its folder), a sentencepiece .model, a "
                                         "tiktoken rank file (.tiktoken) or tiktoken:NAME, or "
                                         "bpe (train a byte-level BPE on the default corpus); null: the default "
                                         "corpus's BPE, or the PREFIX.tokenizer.json beside indexed data.")
    tokenizer_vocab_size: int = doc(4096, "Vocabulary size of a BPE trained on the fly (data.tokenizer=bpe or null "
                                          "with source=default).")
    cache_dir: Optional[str] = doc(None, "Where tokenizers, tokenized corpora and sample indices are cached; null: "
                                         "$MEGACORE_CACHE, else ~/.cache/megacore.")
    eod_mask_loss: bool = doc(False, "Do not train the prediction that follows an end-of-document token (across a "
                                     "document boundary).")
    reset_position_ids: bool = doc(False, "Restart position ids at 0 after each end-of-document token.")
    reset_attention_mask: bool = doc(False, "Attend only within each document of a packed sequence (a per-sample "
                                            "attention mask).")

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
    dir: Optional[str] = doc(None, "Checkpoint directory: saves go here (iter_NNNNNNN folders and a latest file), "
                                   "and a run resumes from its latest checkpoint; null: no checkpoints.")
    interval: int = doc(0, "Save every this many steps; 0: only at the end (checkpoint.save_on_exit).")
    load: Optional[str] = doc(None, "Checkpoint to start from: an iter_* folder, a checkpoint directory (its "
                                    "latest), iter_N or a step number in checkpoint.dir, or latest (the latest in "
                                    "checkpoint.dir; a fresh start when there is none); null: as latest.")
    async_save: bool = doc(False, "Write periodic checkpoints in the background (training stalls only for the copy "
                                  "to host memory).")
    keep_last: int = doc(3, "Keep this many most recent checkpoints in checkpoint.dir (>= 1); older ones are "
                            "deleted.")
    save_on_exit: bool = doc(True, "Save a final checkpoint at the end of training and on SIGTERM/Ctrl-C (needs "
                                   "checkpoint.dir).")
    save_hf: Optional[str] = doc(None, "Export the model as a Hugging Face directory (config.json with the source "
                                       "model's token ids, generation_config.json, safetensors, tokenizer when known) "
                                       "here at the end of training; null: no export.")
    save_hf_at_each_save: bool = doc(False, "Also export to checkpoint.save_hf at every checkpoint save "
                                            "(overwriting).")

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

    dtype: str = doc("fp32", "Parameter and compute dtype: fp32, bf16 or fp16 (fp16 adds dynamic loss scaling).")
    master_weights: bool = doc(True, "With bf16/fp16: keep fp32 master weights in the optimizer and accumulate "
                                     "gradients in fp32.")
    fp8: Optional[str] = doc(None, "FP8 GEMMs in the transformer layers (Hopper GPUs): tensorwise; null: off.")
    initial_loss_scale: float = doc(2.0 ** 16, "fp16: the loss scale to start from.")
    loss_scale_window: int = doc(1000, "fp16: overflow-free steps after which the loss scale doubles.")
    min_loss_scale: float = doc(1.0, "fp16: the loss scale never backs off below this.")
    hysteresis: int = doc(2, "fp16: overflows tolerated before the loss scale halves (1: back off on every "
                             "overflow).")

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

    granularity: Optional[str] = doc(None, "Activation recomputation: full (whole layers), selective (the listed "
                                           "recompute.modules) or null (off).")
    every: int = doc(1, "granularity=full: recompute every n-th layer (1: every layer).")
    modules: list = doc(text="granularity=selective: core_attn (attention), mlp_act (the MLP activation), "
                             "mla_up_proj (multi-latent attention's up-projections, with its attention).",
                        factory=lambda: ["core_attn"])

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

    project: Optional[str] = doc(None, "W&B project to log to; null: W&B off.")
    name: Optional[str] = doc(None, "W&B run name; null: W&B chooses one.")
    entity: Optional[str] = doc(None, "W&B entity (user or team); null: your default entity.")
    offline: bool = doc(False, "Write the W&B run files under log.dir without contacting the server (sync later "
                               "with `wandb sync`).")


@dataclass
class LogConfig:
    dir: str = doc("runs/demo", "Run directory: metrics.jsonl, config.yaml (the resolved config and versions), "
                                "TensorBoard/W&B/profiler files. A new run in a used directory goes to DIR-2, DIR-3, "
                                "...; a resumed run continues in it.")
    interval: int = doc(1, "Print the progress line every this many steps (metrics.jsonl records every step).")
    tensorboard: bool = doc(False, "Also write TensorBoard event files to log.dir (needs `pip install tensorboard`).")
    wandb: WandbConfig = doc(text="Weights & Biases logging from rank 0.", factory=WandbConfig)

    def validate(self) -> "LogConfig":
        if self.interval < 1:
            _fail("log.interval", self.interval, "must be >= 1", "use 1 to log every step")
        return self


@dataclass
class ProfileConfig:
    """The PyTorch profiler over steps ``start_step..end_step`` (a Chrome trace per rank under
    ``<log.dir>/profile``), and CUDA memory history (``memory_snapshot``: dumped under ``log.dir``
    at the end and on out-of-memory)."""

    start_step: Optional[int] = doc(None, "First profiled step (1-based); null: no profiler.")
    end_step: Optional[int] = doc(None, "Last profiled step (inclusive); null: start_step only.")
    ranks: Optional[list] = doc(None, "Ranks that profile, e.g. [0]; null: every rank.")
    record_shapes: bool = doc(False, "Record the input shapes of each operator in the trace.")
    with_stack: bool = doc(False, "Record the Python stack of each operator in the trace (larger files).")
    memory_snapshot: bool = doc(False, "Record the CUDA memory history and dump it under log.dir at the end and on "
                                       "out-of-memory (view at pytorch.org/memory_viz).")
    memory_snapshot_max_entries: int = doc(100000, "Allocation events the CUDA memory history keeps.")

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
    model: TransformerConfig = doc(text="Shape and numerics of the decoder-only transformer.",
                                   factory=TransformerConfig)
    parallel: ParallelConfig = doc(text="Parallel layout: world size = pipeline x data x context x tensor.",
                                   factory=ParallelConfig)
    train: TrainConfig = doc(text="Steps, batch sizes, optimizer, learning-rate schedule, divergence policy.",
                             factory=TrainConfig)
    data: DataConfig = doc(text="Training data and tokenizer.", factory=DataConfig)
    checkpoint: CheckpointConfig = doc(text="Saving, resuming and Hugging Face export.", factory=CheckpointConfig)
    precision: PrecisionConfig = doc(text="Dtypes, master weights, fp16 loss scaling, FP8.", factory=PrecisionConfig)
    recompute: RecomputeConfig = doc(text="Activation recomputation (trade compute for memory).",
                                     factory=RecomputeConfig)
    log: LogConfig = doc(text="Run directory, progress line, TensorBoard, Weights & Biases.", factory=LogConfig)
    vision: VisionConfig = doc(text="The image side of a LLaVA model (off unless vision.enabled).",
                               factory=VisionConfig)
    profile: ProfileConfig = doc(text="PyTorch profiler traces and CUDA memory snapshots.", factory=ProfileConfig)
    device: str = doc("cpu", "Where to train: cpu, cuda or auto (cuda when available).")
    compile: bool = doc(False, "torch.compile the layers and the loss head.")
    compile_mode: Optional[str] = doc(None, "torch.compile mode: null (inductor's default), reduce-overhead (CUDA "
                                            "graphs, for host-bound steps), max-autotune or max-autotune-no-cudagraphs "
                                            "(GEMM autotuning; slow first compile).")

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
