"""The support matrix: which layouts, features and model kinds run together, decided in one table.

``RULES`` is the table. Each row is one of four kinds:

* :class:`Unsupported` -- two features that do not run together (a "no" cell of the matrix);
* :class:`Requires` -- a feature that needs a condition (sequence parallelism needs ``tensor > 1``);
* :class:`Divisible` -- a size that must divide another (heads by ``parallel.tensor``);
* :class:`Check` -- anything else, written as a function (the pipeline split, the world size).

``check(facts)`` runs the table in order and raises the first failure as one ``ConfigError`` that
names the field, the value and the fix. ``RunConfig.validate(world_size)`` runs it on the whole run
(``facts_of_run``); ``ParallelConfig.validate`` on its own section. Library entry points without a
``RunConfig`` pass what they know -- ``megacore.parallel.check_tp_config`` (model + tensor size),
``megacore.parallel.rank_groups`` (the mesh sizes), ``megacore.pipeline.layer_counts`` (the pipeline
split) -- and the rules that read anything else are skipped. ``megacore.config.support_doc``
renders ``docs/support-matrix.md`` from the same table (a test keeps the two equal). The facts
and the named features the rules speak of live in ``megacore.config.support_facts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from megacore.config.errors import ConfigError

from megacore.config.support_facts import (  # noqa: F401 (the matrix's vocabulary, re-exported)
    FACT_NAMES, FEATURES, INDUCTOR_TP_COMM_OVERLAP_MODES, MATRIX_COLUMNS, MATRIX_ROWS, Facts, Feature, UnknownFact,
    facts_of_parallel, facts_of_run)


# -------------------------------------------------------------------------------- the rule kinds
@dataclass(frozen=True)
class Unsupported:
    """Features ``a`` and ``b`` do not run together:
    ``<a>=<value> with <b>=<value> is not supported: <reason>; <fix>``."""

    topic: str
    a: str
    b: str
    reason: str
    fix: str

    def error(self, f: Facts) -> Optional[str]:
        a, b = FEATURES[self.a], FEATURES[self.b]
        if a.on(f) and b.on(f):
            return f"{a.named(f)} with {b.named(f)} is not supported: {self.reason}; {self.fix}"
        return None

    def doc_row(self) -> tuple[str, ...]:
        return (f"{FEATURES[self.a].label} with {FEATURES[self.b].label}", self.reason, self.fix)


@dataclass(frozen=True)
class Requires:
    """Feature ``a`` needs ``condition`` (``holds``): ``<a>=<value> needs <condition>[: <reason>]; <fix>``."""

    topic: str
    a: str
    condition: str
    holds: Callable[[Facts], bool]
    fix: str
    reason: str = ""

    def error(self, f: Facts) -> Optional[str]:
        feature = FEATURES[self.a]
        if feature.on(f) and not self.holds(f):
            return f"{feature.named(f)} needs {self.condition}{f': {self.reason}' if self.reason else ''}; {self.fix}"
        return None

    def doc_row(self) -> tuple[str, ...]:
        return (FEATURES[self.a].label, self.condition, self.fix)


@dataclass(frozen=True)
class Divisible:
    """``field`` (value ``of``) must be divisible by ``by`` (value ``divisor``) ``when`` it applies:
    ``<field>=<value> is not divisible by <by>=<shown divisor><note>; <fix>``."""

    topic: str
    field: str
    of: Callable[[Facts], int]
    by: str
    divisor: Callable[[Facts], int]
    fix: str
    when: Optional[str] = None                           # a feature key; None: always
    shown: Optional[Callable[[Facts], str]] = None       # how the divisor is written (default: its value)
    note: str = ""

    def error(self, f: Facts) -> Optional[str]:
        if self.when is not None and not FEATURES[self.when].on(f):
            return None
        n, d = self.of(f), self.divisor(f)
        if n % d == 0:
            return None
        shown = self.shown(f) if self.shown is not None else d
        return f"{self.field}={n!r} is not divisible by {self.by}={shown}{self.note}; {self.fix}"

    def doc_row(self) -> tuple[str, ...]:
        return (f"`{self.field}`", f"`{self.by}`", FEATURES[self.when].label if self.when else "always")


@dataclass(frozen=True)
class Check:
    """Any other rule: ``run(facts)`` returns the error message or None."""

    topic: str
    doc: str
    run: Callable[[Facts], Optional[str]]

    def error(self, f: Facts) -> Optional[str]:
        return self.run(f)

    def doc_row(self) -> tuple[str, ...]:
        return (self.doc,)


# ------------------------------------------------------------------------ rules written as functions
MESH_AXES = ("tensor", "pipeline", "context", "expert", "expert_tensor")


def _positive(axis: str) -> Check:
    def run(f: Facts) -> Optional[str]:
        v = getattr(f, axis)
        if axis == "virtual_pipeline" and v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            off = "null" if axis == "virtual_pipeline" else f"parallel.{axis}=1"
            return f"parallel.{axis}={v!r} must be an integer >= 1; use {off} to disable it"
        return None

    return Check("mesh", f"`parallel.{axis}` is an integer >= 1", run)


def _world_divisible(f: Facts) -> Optional[str]:
    mp = f.tensor * f.pipeline * f.context
    if f.world_size % mp == 0:
        return None
    return (f"world size {f.world_size} is not divisible by tensor={f.tensor} x pipeline={f.pipeline} x context="
            f"{f.context} = {mp} (the parallel sizes); launch a multiple of {mp} processes or choose sizes whose "
            f"product divides {f.world_size}")


def _expert_fold(f: Facts) -> Optional[str]:
    stage = f.world_size // f.pipeline  # ranks of one pipeline stage = DP·CP·TP, re-folded as EDP·EP·ETP
    folded = f.expert * f.expert_tensor
    if stage % folded == 0:
        return None
    return (f"parallel.expert={f.expert} x expert_tensor={f.expert_tensor} = {folded} does not divide the {stage} "
            f"ranks of a pipeline stage (world size {f.world_size} / parallel.pipeline={f.pipeline}); choose "
            f"expert sizes whose product divides {stage}")


def _kv_heads(f: Facts) -> Optional[str]:
    kv, t = f.model.num_kv_heads, f.tensor
    if kv % t == 0 or t % kv == 0:
        return None
    return (f"model.num_query_groups={kv} and parallel.tensor={t} divide neither way; KV groups are split across "
            "TP ranks (kv % tp == 0) or replicated (tp % kv == 0)")


def _mamba_split(f: Facts) -> Optional[str]:
    m, t = f.model, f.tensor
    if "M" not in m.layer_kinds or (m.mamba_heads % t == 0 and m.mamba_num_groups % t == 0):
        return None
    return (f"{m.mamba_heads} Mamba heads and model.mamba_num_groups={m.mamba_num_groups} must both be divisible by "
            f"parallel.tensor={t}; Mamba layers split by heads and groups: choose a tensor-parallel size that "
            "divides both")


def _mamba_cp_chunk(f: Facts) -> Optional[str]:
    m, c = f.model, f.context
    if c == 1 or "M" not in m.layer_kinds or m.seq_length // (2 * c) >= m.mamba_conv_kernel - 1:
        return None
    return (f"a context-parallel chunk of model.seq_length={m.seq_length} / (2*parallel.context={2 * c}) positions is "
            f"shorter than the Mamba conv's look-back of model.mamba_conv_kernel-1={m.mamba_conv_kernel - 1}; choose a "
            "longer sequence or a smaller context-parallel size")


def _context_a2a_size(f: Facts) -> Optional[int]:
    """Ranks of one all-to-all group of the CP mode, or None without one."""
    if f.context == 1 or f.context_mode not in ("a2a", "a2a+ring"):
        return None
    return f.context if f.context_mode == "a2a" else f.context_a2a_size


def _a2a_group_fits(f: Facts) -> Optional[str]:
    if f.context > 1 and f.context_mode == "a2a+ring":
        a = f.context_a2a_size
        if a is None or f.context % a:
            return (f"parallel.context_mode='a2a+ring' needs parallel.context_a2a_size dividing parallel.context="
                    f"{f.context}, got {a!r}; set parallel.context_a2a_size to a divisor (all-to-all inside groups "
                    "of that many ranks, ring across the groups), e.g. 2")
    return None


def _a2a_heads(f: Facts) -> Optional[str]:
    a = _context_a2a_size(f)
    if a is None or not isinstance(a, int) or a < 1:
        return None
    m, t = f.model, f.tensor
    heads, kv = m.num_attention_heads // t, max(m.num_kv_heads // t, 1)  # per TP rank (KV replicated when fewer)
    where = "parallel.context" if f.context_mode == "a2a" else "parallel.context_a2a_size"
    if heads % a:
        return (f"parallel.context_mode={f.context_mode!r} scatters the {heads} attention heads per tensor-parallel "
                f"rank over {where}={a} ranks, which does not divide them; choose {where} dividing "
                "model.num_attention_heads / parallel.tensor, or parallel.context_mode=ring or allgather")
    if kv % a and a % kv:
        return (f"parallel.context_mode={f.context_mode!r} spreads the {kv} key/value heads per tensor-parallel rank "
                f"over {where}={a} ranks, but neither divides the other (split when divisible, repeated when fewer); "
                "choose model.num_query_groups or that size so one divides the other, or parallel.context_mode=ring")
    return None


def _shared_expert_split(f: Facts) -> Optional[str]:
    m, t = f.model, f.tensor
    width = m.moe_shared_expert_hidden_size
    if m.num_experts is None or width is None or width % t == 0:
        return None
    return (f"model.moe_shared_expert_hidden_size={width} is not divisible by parallel.tensor={t}; the shared expert "
            "splits over the tensor-parallel ranks like the dense MLP: choose a width that is a multiple of it")


def _pipeline_split(f: Facts) -> Optional[str]:
    pp, vp, layers = f.pipeline, f.virtual_pipeline or 1, f.num_layers
    n_blocks = pp * vp
    counts = f.pipeline_layers
    if counts is None:
        if n_blocks <= layers:
            return None
        return (f"parallel.pipeline={pp} x virtual_pipeline={vp} = {n_blocks} blocks but model.num_layers={layers}: "
                "every block needs at least one layer; use fewer (virtual) stages or more layers")
    counts = list(counts)
    if len(counts) != n_blocks:
        return (f"parallel.pipeline_layers={counts} has {len(counts)} entries but pipeline={pp} x virtual_pipeline="
                f"{vp} needs {n_blocks} positive layer counts summing to model.num_layers={layers}; give one layer "
                "count per block in model order")
    bad = [c for c in counts if not isinstance(c, int) or isinstance(c, bool) or c < 1]
    if bad:
        return (f"parallel.pipeline_layers={counts} contains {bad}: every block needs a positive integer count >= 1 "
                "(an empty stage would only add a pipeline hop); move a layer there")
    if sum(counts) != layers:
        return (f"parallel.pipeline_layers={counts} sums to {sum(counts)}, not model.num_layers={layers}; adjust the "
                "counts so they add up to the number of layers")
    return None


def _data_parallel(f: Facts) -> int:
    return f.world_size // (f.tensor * f.pipeline * f.context)


def _batch_chunks_fit(f: Facts) -> Optional[str]:
    if f.tp_batch_chunks <= 1:
        return None
    chunks = f.tp_batch_chunks * (f.tensor if f.sequence_parallel else 1)
    if f.train.micro_batch_size % chunks == 0:
        return None
    why = " x tensor (sequence-parallel shards hold whole sequences)" if f.sequence_parallel else ""
    return (f"parallel.tp_batch_chunks={f.tp_batch_chunks} needs train.micro_batch_size divisible by tp_batch_chunks"
            f"{why} = {chunks}; set train.micro_batch_size to a multiple of {chunks} or lower tp_batch_chunks")


# ------------------------------------------------------------------------------------- the table
RULES: list = [
    # -- the mesh sizes (every rule below compares them)
    *(_positive(axis) for axis in (*MESH_AXES, "virtual_pipeline")),
    # -- parallel features that need others
    Requires("parallel", "sequence_parallel", "parallel.tensor > 1", lambda f: f.tensor > 1,
             "set parallel.tensor >= 2 or sequence_parallel=false"),
    Requires("parallel", "virtual_pipeline", "parallel.pipeline > 1", lambda f: f.pipeline > 1,
             "set parallel.pipeline >= 2 or remove virtual_pipeline"),
    Unsupported("parallel", "fsdp", "distributed_optimizer", "both shard the optimizer state, FSDP its parameters too",
                "choose one of fsdp (ZeRO-3) or distributed_optimizer (ZeRO-1)"),
    Requires("parallel", "tp_comm_overlap", "parallel.sequence_parallel=true", lambda f: f.sequence_parallel,
             "set parallel.sequence_parallel=true or tp_comm_overlap=off",
             reason="it overlaps the sequence all-gathers and reduce-scatters"),
    Requires("parallel", "tp_batch_chunks", "parallel.tensor > 1 without context parallelism",
             lambda f: f.tensor > 1 and f.context == 1, "set parallel.tp_batch_chunks=1",
             reason="it splits micro-batches to overlap tensor-parallel communication"),
    Requires("parallel", "inductor_overlap", "compile=true and device=cuda", lambda f: f.compile and f.device != "cpu",
             "set compile=true and device=cuda, or parallel.tp_comm_overlap=off",
             reason="torch.compile's inductor does this overlap, on CUDA"),
    Requires("run", "compile_mode", "compile=true", lambda f: f.compile, "set compile=true, or compile_mode=null",
             reason="it is a torch.compile mode"),
    # -- model kinds x layouts and features
    Unsupported("moe", "expert", "dense", "it splits MoE experts over ranks, but the model has none",
                "set model.num_experts or parallel.expert=1"),
    Unsupported("moe", "expert_tensor", "dense", "it splits MoE experts over ranks, but the model has none",
                "set model.num_experts or parallel.expert_tensor=1"),
    Requires("moe", "expert_tensor", "parallel.expert_tensor = parallel.tensor",
             lambda f: f.model.num_experts is None or f.expert_tensor == f.tensor,  # the mesh alone allows any
             "set parallel.expert_tensor to parallel.tensor, or 1",
             reason="an expert is split over the ranks of a tensor-parallel group, which route the same tokens"),
    Unsupported("moe", "expert_tensor", "fsdp", "FSDP2 would shard the split experts a second time",
                "use parallel.distributed_optimizer=true"),
    Requires("moe", "expert", "parallel.sequence_parallel=true or expert_tensor = tensor when parallel.tensor > 1",
             lambda f: f.tensor == 1 or f.sequence_parallel or f.expert_tensor == f.tensor,
             "set parallel.sequence_parallel=true (or parallel.expert_tensor=parallel.tensor), or parallel.tensor=1 "
             "or parallel.expert=1",
             reason="without it the tensor-parallel ranks hold the same tokens and would send each one to its "
             "experts once per rank"),
    Unsupported("moe", "tp_batch_chunks", "moe", "an MoE layer routes (and balances) a whole micro-batch, not "
                "groups of its sequences", "set parallel.tp_batch_chunks=1"),
    Unsupported("moe", "expert", "fsdp", "FSDP2 would shard the experts a second time over the ranks that split them",
                "use parallel.distributed_optimizer=true"),
    Unsupported("hybrid", "fp8", "mamba", "fp8 has not been validated with Mamba layers", "set precision.fp8=null"),
    Requires("parallel", "tensor", "model.qk_norm_scope=head when model.qk_norm is on",
             lambda f: not (f.model.qk_norm and f.model.qk_norm_scope == "projection"),
             "set parallel.tensor=1 for this model",
             reason="a norm over the whole query/key projection needs every tensor-parallel rank's heads"),
    Requires("hybrid", "reset_attention_mask", "parallel.context=1 when the model has Mamba layers",
             lambda f: f.context == 1 or "M" not in f.model.layer_kinds,
             "set parallel.context=1, or data.reset_attention_mask=false",
             reason="a context-parallel Mamba layer passes its state from rank to rank with no document resets"),
    Unsupported("llava", "context", "llava", "LLaVA trains with data, tensor and pipeline parallelism",
                "set parallel.context=1"),
    Unsupported("llava", "expert", "llava", "LLaVA trains with data, tensor and pipeline parallelism",
                "set parallel.expert=1"),
    Unsupported("llava", "expert_tensor", "llava", "LLaVA trains with data, tensor and pipeline parallelism",
                "set parallel.expert_tensor=1"),
    Unsupported("llava", "fp8", "llava", "the vision tower and projector have no fp8 path", "set precision.fp8=null"),
    Unsupported("llava", "text_only_data", "llava", "that source has no images: only data.source=mock (synthetic "
                "images and text) feeds a LLaVA model so far", "set data.source=mock"),
    Unsupported("mtp", "mtp", "hybrid", "an MTP depth is one attention + MLP layer after a plain transformer stack",
                "set model.mtp_num_layers=0 or model.layer_pattern=null"),
    Unsupported("mtp", "mtp", "llava", "the MTP depths would embed the image placeholder tokens",
                "set model.mtp_num_layers=0"),
    Unsupported("mtp", "context", "mtp", "each depth shifts the tokens and labels along the sequence, which context "
                "parallelism splits over ranks", "set parallel.context=1"),
    Unsupported("mtp", "fsdp", "mtp", "multi-token prediction has not been validated with FSDP2",
                "use parallel.distributed_optimizer=true"),
    # -- layouts x features
    Unsupported("context", "context", "fsdp", "FSDP2 is not wired to the context-parallel gradient reduction",
                "use parallel.distributed_optimizer=true with context parallelism"),
    Unsupported("context", "context_ring", "attention_dropout", "the ring's blockwise attention has no dropout",
                "set model.attention_dropout=0, or parallel.context_mode=allgather or a2a"),
    Requires("context", "context_a2a_size", "parallel.context_mode=a2a+ring", lambda f: f.context_mode == "a2a+ring",
             "set parallel.context_a2a_size=null, or parallel.context_mode=a2a+ring",
             reason="it sizes the all-to-all groups of that mode"),
    Unsupported("fsdp", "fsdp", "tensor", "FSDP2 here shards data-parallel replicas only",
                "use parallel.distributed_optimizer=true for TP/PP layouts"),
    Unsupported("fsdp", "fsdp", "pipeline", "FSDP2 here shards data-parallel replicas only",
                "use parallel.distributed_optimizer=true for TP/PP layouts"),
    Unsupported("fsdp", "fsdp", "fp16", "FSDP2 runs without megacore's loss scaler", "use precision.dtype=bf16"),
    Unsupported("fsdp", "fsdp", "checkpointing", "checkpoints of FSDP2's sharded parameters are not written yet",
                "use parallel.distributed_optimizer=true for resumable sharded runs"),
    Unsupported("fsdp", "fsdp", "loss_spike", "FSDP2 steps torch's AdamW, which cannot skip a step decided on the "
                "device", "set train.loss_spike_factor=null, or use parallel.distributed_optimizer=true"),
    Unsupported("fp8", "fp8", "cpu", "fp8 GEMMs run on NVIDIA GPUs of compute capability >= 8.9 (H100/H200, Ada)",
                "set device=cuda on such a GPU, or precision.fp8=null"),
    Unsupported("fp8", "copy_engine", "fp8", "it does not cover FP8 linears (their matmuls are not split around the "
                "transfers)", "set parallel.tp_comm_overlap=off with precision.fp8, or precision.fp8=null"),
    # -- sizes that must divide (after the combinations: "not supported" says more than a size that does not fit)
    Check("mesh", "`parallel.tensor` x `pipeline` x `context` divides the world size", _world_divisible),
    Check("mesh", "`parallel.expert` x `expert_tensor` divides the ranks of a pipeline stage (world size / `parallel.pipeline`)",
          _expert_fold),
    Divisible("tensor", "model.num_attention_heads", lambda f: f.model.num_attention_heads, "parallel.tensor",
              lambda f: f.tensor, "choose a tensor-parallel size that divides the number of heads"),
    Check("tensor", "`model.num_query_groups` and `parallel.tensor` divide one way or the other (KV groups split or "
          "replicated)", _kv_heads),
    Check("tensor", "Mamba heads and `model.mamba_num_groups` divisible by `parallel.tensor`", _mamba_split),
    Check("context", "with Mamba layers, a context-parallel chunk (`model.seq_length` / (2 x `parallel.context`)) "
          "holds at least `model.mamba_conv_kernel` - 1 positions", _mamba_cp_chunk),
    Check("context", "`parallel.context_mode=a2a+ring` has `parallel.context_a2a_size` dividing `parallel.context`",
          _a2a_group_fits),
    Check("context", "all-to-all context parallel: attention heads per TP rank divisible by the all-to-all size "
          "(`parallel.context` for a2a, `parallel.context_a2a_size` for a2a+ring); KV heads per TP rank and that "
          "size divide one way or the other", _a2a_heads),
    Divisible("tensor", "model.ffn_hidden_size", lambda f: f.model.ffn_size, "parallel.tensor", lambda f: f.tensor,
              "choose an ffn size that is a multiple of the tensor-parallel size"),
    Divisible("tensor", "model.vocab_padding_multiple", lambda f: f.model.vocab_padding_multiple, "parallel.tensor",
              lambda f: f.tensor, "use a multiple of the tensor-parallel size, e.g. 128"),
    Divisible("tensor", "model.seq_length", lambda f: f.model.seq_length, "parallel.tensor", lambda f: f.tensor,
              "choose a sequence length that is a multiple of the tensor-parallel size", when="sequence_parallel",
              note=" (sequence parallel)"),
    Divisible("context", "model.seq_length", lambda f: f.model.seq_length, "2*parallel.context",
              lambda f: 2 * f.context, "choose a sequence length that is a multiple of twice the context-parallel "
              "size", when="context"),
    Check("tensor", "`model.moe_shared_expert_hidden_size` divisible by `parallel.tensor` (the shared expert "
          "splits like the dense MLP)", _shared_expert_split),
    Divisible("moe", "model.moe_ffn_hidden_size", lambda f: f.model.moe_ffn_size, "parallel.expert_tensor",
              lambda f: f.expert_tensor, "choose an expert width that is a multiple of the expert-tensor-parallel size",
              when="expert_tensor"),
    Divisible("moe", "model.num_experts", lambda f: f.model.num_experts, "parallel.expert", lambda f: f.expert,
              "choose an expert-parallel size that divides the number of experts", when="expert"),
    Check("pipeline", "the pipeline stages (x virtual stages) fit `model.num_layers`, and `parallel.pipeline_layers` "
          "gives one positive count per block summing to it", _pipeline_split),
    Divisible("train", "train.global_batch_size", lambda f: f.train.global_batch_size,
              "train.micro_batch_size*data_parallel", lambda f: f.train.micro_batch_size * _data_parallel(f),
              "make the global batch a multiple of micro_batch_size times the data-parallel size",
              shown=lambda f: f"{f.train.micro_batch_size}*{_data_parallel(f)}"),
    Check("train", "`train.micro_batch_size` divisible by `parallel.tp_batch_chunks` (x tensor under sequence "
          "parallelism)", _batch_chunks_fit),
]


def check(facts: Facts) -> None:
    """Run the table in order; raise the first failure as a ConfigError. Rules that read a fact the
    caller did not give are skipped (a library entry point checks only what it knows)."""
    for rule in RULES:
        try:
            message = rule.error(facts)
        except UnknownFact:
            continue
        if message is not None:
            raise ConfigError(message)


def check_supported(cfg, world_size: Optional[int] = None) -> None:
    """The whole table on a ``RunConfig`` (run by ``RunConfig.validate``)."""
    check(facts_of_run(cfg, world_size))


def skipped_rules(facts: Facts) -> list:
    """Rules that ``facts`` does not answer (for tests: a whole run with its world size answers all)."""
    out = []
    for rule in RULES:
        try:
            rule.error(facts)
        except UnknownFact:
            out.append(rule)
        except Exception:  # the rule ran (a failure of the rule itself is not a missing fact)
            pass
    return out
