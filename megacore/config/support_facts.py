"""What the support matrix (``megacore.config.support``) decides on: the ``Facts`` of a run (the
layout sizes and the features and model kinds in use, read from the config) and the named
``FEATURES`` its rules and the rendered matrix (``docs/support-matrix.md``) speak of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

# parallel.tp_comm_overlap modes that torch.compile's inductor implements (CUDA only).
INDUCTOR_TP_COMM_OVERLAP_MODES = ("schedule", "reorder", "symm_mem")

# ------------------------------------------------------------------------------------- the facts
class UnknownFact(Exception):
    """A rule read a fact its caller does not know; the rule is skipped (see ``check``)."""


FACT_NAMES = ("world_size", "tensor", "pipeline", "virtual_pipeline", "context", "expert", "expert_tensor",
              "sequence_parallel", "distributed_optimizer", "fsdp", "pipeline_layers", "tp_comm_overlap",
              "tp_batch_chunks", "context_mode", "context_a2a_size", "model", "num_layers", "train", "data", "checkpoint", "precision", "vision",
              "device", "compile", "compile_mode")


class Facts:
    """What the rules read, flat: the mesh sizes (``tensor``, ``expert`` ...), the other ``parallel``
    keys, ``model`` (a TransformerConfig), ``num_layers``, the other run sections (``train``,
    ``precision`` ...), ``device``, ``compile``, ``compile_mode`` and ``world_size``. A caller gives
    the ones it knows; reading any other raises ``UnknownFact``."""

    def __init__(self, **known: Any):
        unknown = set(known) - set(FACT_NAMES)
        if unknown:
            raise ValueError(f"unknown facts {sorted(unknown)}; known: {FACT_NAMES}")
        if "model" in known and "num_layers" not in known:
            known["num_layers"] = known["model"].num_layers
        self._known = known

    def __getattr__(self, name: str) -> Any:
        known = self.__dict__.get("_known", {})
        if name in known:
            return known[name]
        raise UnknownFact(name)


def facts_of_parallel(p, world_size: Optional[int] = None) -> Facts:
    """The facts of a ``ParallelConfig`` (and the world size, when known)."""
    world = {} if world_size is None else {"world_size": world_size}
    return Facts(**world, tensor=p.tensor, pipeline=p.pipeline, virtual_pipeline=p.virtual_pipeline,
                 context=p.context, expert=p.expert, expert_tensor=p.expert_tensor, sequence_parallel=p.sequence_parallel,
                 distributed_optimizer=p.distributed_optimizer, fsdp=p.fsdp, pipeline_layers=p.pipeline_layers,
                 tp_comm_overlap=p.tp_comm_overlap, tp_batch_chunks=p.tp_batch_chunks, context_mode=p.context_mode,
                 context_a2a_size=p.context_a2a_size)


def facts_of_run(cfg, world_size: Optional[int] = None) -> Facts:
    """Every fact of a ``RunConfig`` (and the world size, when known)."""
    return Facts(**facts_of_parallel(cfg.parallel, world_size)._known, model=cfg.model, train=cfg.train, data=cfg.data, checkpoint=cfg.checkpoint,
                 precision=cfg.precision, vision=cfg.vision, device=cfg.device, compile=cfg.compile,
                 compile_mode=cfg.compile_mode)


# ---------------------------------------------------------------------------------- the features
@dataclass(frozen=True)
class Feature:
    """A layout axis, a feature or a model kind that rules name: when it is on, and how an error
    names it (``parallel.tensor=2``). ``implies``: features it needs on too (sequence parallelism
    implies tensor parallelism), so the matrix marks it unsupported wherever those are."""

    key: str
    label: str
    on: Callable[[Facts], bool]
    named: Callable[[Facts], str]
    implies: tuple[str, ...] = ()


def _key(field: str, value_of: Callable[[Facts], Any]) -> Callable[[Facts], str]:
    return lambda f: f"{field}={value_of(f)!r}"


_FEATURES = [
    # layout axes (rows of the matrix)
    Feature("tensor", "tensor parallel (`parallel.tensor` > 1)", lambda f: f.tensor > 1,
            _key("parallel.tensor", lambda f: f.tensor)),
    Feature("sequence_parallel", "sequence parallel (`parallel.sequence_parallel`)", lambda f: f.sequence_parallel,
            _key("parallel.sequence_parallel", lambda f: f.sequence_parallel), implies=("tensor",)),
    Feature("pipeline", "pipeline parallel (`parallel.pipeline` > 1)", lambda f: f.pipeline > 1,
            _key("parallel.pipeline", lambda f: f.pipeline)),
    Feature("virtual_pipeline", "virtual pipeline (`parallel.virtual_pipeline` > 1)",
            lambda f: (f.virtual_pipeline or 1) > 1, _key("parallel.virtual_pipeline", lambda f: f.virtual_pipeline),
            implies=("pipeline",)),
    Feature("context", "context parallel (`parallel.context` > 1)", lambda f: f.context > 1,
            _key("parallel.context", lambda f: f.context)),
    Feature("context_ring", "ring context parallel (`parallel.context_mode` ring or a2a+ring)",
            lambda f: f.context > 1 and f.context_mode in ("ring", "a2a+ring"),
            _key("parallel.context_mode", lambda f: f.context_mode), implies=("context",)),
    Feature("context_a2a", "all-to-all context parallel (`parallel.context_mode` a2a or a2a+ring)",
            lambda f: f.context > 1 and f.context_mode in ("a2a", "a2a+ring"),
            _key("parallel.context_mode", lambda f: f.context_mode), implies=("context",)),
    Feature("context_a2a_size", "`parallel.context_a2a_size`", lambda f: f.context_a2a_size is not None,
            _key("parallel.context_a2a_size", lambda f: f.context_a2a_size)),
    Feature("expert", "expert parallel (`parallel.expert` > 1)", lambda f: f.expert > 1,
            _key("parallel.expert", lambda f: f.expert)),
    Feature("expert_tensor", "expert tensor parallel (`parallel.expert_tensor` > 1)", lambda f: f.expert_tensor > 1,
            _key("parallel.expert_tensor", lambda f: f.expert_tensor)),
    Feature("distributed_optimizer", "distributed optimizer (`parallel.distributed_optimizer`)",
            lambda f: f.distributed_optimizer,
            _key("parallel.distributed_optimizer", lambda f: f.distributed_optimizer)),
    Feature("fsdp", "FSDP2 (`parallel.fsdp`)", lambda f: f.fsdp, _key("parallel.fsdp", lambda f: f.fsdp)),
    Feature("fp8", "FP8 GEMMs (`precision.fp8`)", lambda f: f.precision.fp8 is not None,
            _key("precision.fp8", lambda f: f.precision.fp8)),
    Feature("attention_dropout", "attention dropout (`model.attention_dropout` > 0)",
            lambda f: f.model.attention_dropout > 0, _key("model.attention_dropout", lambda f: f.model.attention_dropout)),
    Feature("fp16", "fp16 with loss scaling (`precision.dtype=fp16`)", lambda f: f.precision.dtype == "fp16",
            _key("precision.dtype", lambda f: f.precision.dtype)),
    # model kinds (columns of the matrix)
    Feature("dense", "dense", lambda f: f.model.num_experts is None,
            _key("model.num_experts", lambda f: f.model.num_experts)),
    Feature("moe", "MoE (`model.num_experts`)", lambda f: f.model.num_experts is not None,
            _key("model.num_experts", lambda f: f.model.num_experts)),
    Feature("hybrid", "hybrid stack (`model.layer_pattern`)", lambda f: f.model.layer_pattern is not None,
            _key("model.layer_pattern", lambda f: f.model.layer_pattern)),
    Feature("mamba", "Mamba layers ('M' in `model.layer_pattern`)", lambda f: "M" in f.model.layer_kinds,
            _key("model.layer_pattern", lambda f: f.model.layer_pattern), implies=("hybrid",)),
    Feature("llava", "LLaVA (`vision.enabled`)", lambda f: f.vision.enabled,
            _key("vision.enabled", lambda f: f.vision.enabled)),
    Feature("mla", "multi-latent attention (`model.multi_latent_attention`)",
            lambda f: f.model.multi_latent_attention,
            _key("model.multi_latent_attention", lambda f: f.model.multi_latent_attention)),
    Feature("mtp", "multi-token prediction (`model.mtp_num_layers` > 0)", lambda f: f.model.mtp_num_layers > 0,
            _key("model.mtp_num_layers", lambda f: f.model.mtp_num_layers)),
    # other features
    Feature("copy_engine", "`parallel.tp_comm_overlap=copy_engine`", lambda f: f.tp_comm_overlap == "copy_engine",
            _key("parallel.tp_comm_overlap", lambda f: f.tp_comm_overlap)),
    Feature("tp_comm_overlap", "`parallel.tp_comm_overlap` other than off", lambda f: f.tp_comm_overlap != "off",
            _key("parallel.tp_comm_overlap", lambda f: f.tp_comm_overlap)),
    Feature("inductor_overlap", "`parallel.tp_comm_overlap` = " + " / ".join(INDUCTOR_TP_COMM_OVERLAP_MODES),
            lambda f: f.tp_comm_overlap in INDUCTOR_TP_COMM_OVERLAP_MODES,
            _key("parallel.tp_comm_overlap", lambda f: f.tp_comm_overlap)),
    Feature("tp_batch_chunks", "`parallel.tp_batch_chunks` > 1", lambda f: f.tp_batch_chunks > 1,
            _key("parallel.tp_batch_chunks", lambda f: f.tp_batch_chunks)),
    Feature("checkpointing", "checkpointing (`checkpoint.dir` or `checkpoint.load`)",
            lambda f: bool(f.checkpoint.dir or f.checkpoint.load),
            lambda f: (f"checkpoint.dir={f.checkpoint.dir!r}" if f.checkpoint.dir
                       else f"checkpoint.load={f.checkpoint.load!r}")),
    Feature("loss_spike", "the loss-spike check (`train.loss_spike_factor`)",
            lambda f: f.train.loss_spike_factor is not None,
            _key("train.loss_spike_factor", lambda f: f.train.loss_spike_factor)),
    Feature("reset_position_ids", "`data.reset_position_ids`", lambda f: f.data.reset_position_ids,
            _key("data.reset_position_ids", lambda f: f.data.reset_position_ids)),
    Feature("reset_attention_mask", "`data.reset_attention_mask`", lambda f: f.data.reset_attention_mask,
            _key("data.reset_attention_mask", lambda f: f.data.reset_attention_mask)),
    Feature("text_only_data", "text-only data (`data.source` other than mock)", lambda f: f.data.source != "mock",
            _key("data.source", lambda f: f.data.source)),
    Feature("cpu", "`device=cpu`", lambda f: f.device == "cpu", _key("device", lambda f: f.device)),
    Feature("compile_mode", "`compile_mode`", lambda f: f.compile_mode is not None,
            _key("compile_mode", lambda f: f.compile_mode)),
]
FEATURES: dict[str, Feature] = {feature.key: feature for feature in _FEATURES}
MATRIX_ROWS = ("tensor", "sequence_parallel", "pipeline", "virtual_pipeline", "context", "context_ring", "context_a2a",
               "expert", "expert_tensor",
               "distributed_optimizer", "fsdp", "fp8", "fp16")
MATRIX_COLUMNS = ("dense", "moe", "hybrid", "mamba", "llava", "mla", "mtp")
