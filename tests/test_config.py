"""Config validation: every documented bad combination raises ConfigError naming the field and a fix;
unknown keys suggest the nearest names; command-line strings coerce to the annotated types."""

import re

import pytest

from megacore.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LogConfig,
    ParallelConfig,
    PrecisionConfig,
    RecomputeConfig,
    RunConfig,
    TrainConfig,
    TransformerConfig,
    apply_override,
    from_dict,
    load_run_config,
)


def _expect(fn, field: str, *also: str) -> str:
    """``fn()`` raises ConfigError whose message names ``field`` (as ``field=value``) and gives a fix."""
    with pytest.raises(ConfigError) as info:
        fn()
    msg = str(info.value)
    assert re.search(re.escape(field) + r"\b", msg), f"{field!r} not named in: {msg}"
    assert ";" in msg, f"no fix given in: {msg}"  # messages read '<field>=<value> <problem>; <fix>'
    for word in also:
        assert word in msg, f"{word!r} not in: {msg}"
    return msg


def _model(**kw) -> TransformerConfig:
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=256, seq_length=32)
    base.update(kw)
    return TransformerConfig(**base)


def _run(model=None, **sections) -> RunConfig:
    return RunConfig(model=model or _model(), **sections)


# ----------------------------------------------------------------------------- valid configs pass


def test_defaults_and_typical_configs_validate():
    RunConfig().validate(world_size=1)
    _model(num_query_groups=1).validate()  # MQA
    _model(num_query_groups=2, rotary_percent=0.5).validate()
    _model(rotary_scaling="llama3", rotary_scaling_factor=8.0, rotary_original_max_positions=16).validate()
    _model(position_embedding="learned", kv_channels=7).validate()  # odd head dim is fine without rope
    # KV heads may be split (kv % tp == 0) or replicated (tp % kv == 0) across TP ranks.
    train = TrainConfig(global_batch_size=8, micro_batch_size=2)
    _run(_model(num_attention_heads=8, num_query_groups=2), parallel=ParallelConfig(tensor=4),
         train=train).validate(world_size=8)
    _run(_model(num_attention_heads=8, num_query_groups=4), parallel=ParallelConfig(tensor=2),
         train=train).validate(world_size=8)
    _run(parallel=ParallelConfig(pipeline=2, pipeline_layers=[1, 3])).validate(world_size=2)
    _run(train=TrainConfig(global_batch_size=16, micro_batch_size=2)).validate(world_size=8)


# ---------------------------------------------------------------------------- model section errors

MODEL_ERRORS = [
    (dict(num_attention_heads=4, num_query_groups=3), "model.num_attention_heads", "num_query_groups"),
    (dict(num_query_groups=0), "model.num_query_groups", ""),
    (dict(activation="silu"), "model.activation", "swiglu"),
    (dict(normalization="rmsnorm"), "model.normalization", "RMSNorm"),
    (dict(hidden_size=48, num_attention_heads=8, rotary_percent=0.5), "model.rotary_percent", "odd"),  # 6*0.5 = 3
    (dict(rotary_percent=0.01), "model.rotary_percent", "zero"),  # int(16*0.01) = 0
    (dict(rotary_percent=0.0), "model.rotary_percent", "(0, 1]"),
    (dict(rotary_percent=1.5), "model.rotary_percent", "(0, 1]"),
    (dict(rotary_scaling="llama3", rotary_scaling_factor=8.0), "model.rotary_original_max_positions", "llama3"),
    (dict(rotary_scaling="yarn", rotary_scaling_factor=4.0), "model.rotary_original_max_positions", "yarn"),
    (dict(rotary_scaling="ntk"), "model.rotary_scaling", "llama3"),
    (dict(rotary_scaling="linear", rotary_scaling_factor=0.0), "model.rotary_scaling_factor", ""),
    (dict(attention_dropout=1.0), "model.attention_dropout", "[0, 1)"),
    (dict(hidden_dropout=-0.1), "model.hidden_dropout", "[0, 1)"),
    (dict(sliding_window=0), "model.sliding_window", ""),
    (dict(position_embedding="alibi"), "model.position_embedding", "rope"),
    (dict(attention_backend="flash"), "model.attention_backend", "sdpa"),
    (dict(num_layers=0), "model.num_layers", ""),
    (dict(hidden_size=-8), "model.hidden_size", ""),
    (dict(hidden_size=66, num_attention_heads=4), "model.hidden_size", "kv_channels"),
    (dict(ffn_hidden_size=0), "model.ffn_hidden_size", ""),
    (dict(init_std=0.0), "model.init_std", ""),
    (dict(norm_epsilon=0.0), "model.norm_epsilon", ""),
    (dict(num_experts=1), "model.num_experts", ">= 2"),
    (dict(num_experts=4, moe_top_k=5), "model.moe_top_k", "num_experts=4"),
    (dict(layer_pattern="*M*"), "model.layer_pattern", ""),
]


@pytest.mark.parametrize("kw,field,hint", MODEL_ERRORS, ids=[f"{e[1]}-{i}" for i, e in enumerate(MODEL_ERRORS)])
def test_model_bad_values(kw, field, hint):
    _expect(lambda: _model(**kw).validate(), field, hint)


def test_odd_head_dim_with_rope_is_rejected():
    msg = _expect(lambda: _model(kv_channels=5).validate(), "model.")
    assert "5" in msg and ("rotary" in msg or "odd" in msg)


def test_gpt_model_validates_its_config():
    from megacore.models import GPTModel

    _expect(lambda: GPTModel(_model(activation="swish")), "model.activation")


# ------------------------------------------------------------------------ parallel section errors

PARALLEL_ERRORS = [
    (dict(sequence_parallel=True), "parallel.sequence_parallel", "tensor"),
    (dict(tensor=0), "parallel.tensor", ""),
    (dict(pipeline=-1), "parallel.pipeline", ""),
    (dict(virtual_pipeline=2), "parallel.virtual_pipeline", "pipeline"),
    (dict(pipeline=2, virtual_pipeline=0), "parallel.virtual_pipeline", ""),
    (dict(fsdp=True, distributed_optimizer=True), "parallel.fsdp", "distributed_optimizer"),
    (dict(pipeline_schedule="dualpipe"), "parallel.pipeline_schedule", "1f1b"),
    (dict(tensor=2, tp_comm_overlap=True), "parallel.tp_comm_overlap", "sequence_parallel=true"),
    (dict(tensor=2, tp_comm_overlap="schedule"), "parallel.tp_comm_overlap", "sequence_parallel=true"),
    (dict(tensor=2, sequence_parallel=True, tp_comm_overlap="async"), "parallel.tp_comm_overlap", "schedule"),
    (dict(tp_batch_chunks=2), "parallel.tp_batch_chunks", "tensor > 1"),
    (dict(tensor=2, context=2, tp_batch_chunks=2), "parallel.tp_batch_chunks", "context"),
    (dict(tensor=2, tp_batch_chunks=0), "parallel.tp_batch_chunks", ">= 1"),
]


@pytest.mark.parametrize("kw,field,hint", PARALLEL_ERRORS)
def test_parallel_bad_values(kw, field, hint):
    _expect(lambda: ParallelConfig(**kw).validate(), field, hint)
    _expect(lambda: _run(parallel=ParallelConfig(**kw)).validate(), field, hint)


def test_layout_must_divide_world_size():
    _expect(lambda: ParallelConfig(tensor=2, pipeline=3).validate(world_size=8), "parallel", "world size")


# ---------------------------------------------------------------------- cross-section run errors

RUN_ERRORS = [
    # TP must divide the heads, the ffn, the vocab padding multiple.
    (dict(model=_model(num_attention_heads=4), parallel=ParallelConfig(tensor=8)), 8,
     "model.num_attention_heads", "parallel.tensor=8"),
    (dict(model=_model(num_attention_heads=12, hidden_size=96, num_query_groups=3),
          parallel=ParallelConfig(tensor=2)), 2,
     "model.num_query_groups", "parallel.tensor=2"),
    (dict(model=_model(ffn_hidden_size=130), parallel=ParallelConfig(tensor=4)), 4,
     "model.ffn_hidden_size", "parallel.tensor=4"),
    (dict(model=_model(vocab_padding_multiple=6), parallel=ParallelConfig(tensor=4)), 4,
     "model.vocab_padding_multiple", "parallel.tensor=4"),
    (dict(model=_model(seq_length=30), parallel=ParallelConfig(tensor=4, sequence_parallel=True)), 4,
     "model.seq_length", "sequence parallel"),
    (dict(model=_model(seq_length=30), parallel=ParallelConfig(context=2)), 2,
     "model.seq_length", "context"),
    # Pipeline: more stages than layers, or an explicit split that does not add up.
    (dict(model=_model(num_layers=2), parallel=ParallelConfig(pipeline=4)), 4, "parallel.pipeline", "num_layers=2"),
    (dict(model=_model(num_layers=4), parallel=ParallelConfig(pipeline=2, virtual_pipeline=3)), 2,
     "parallel.pipeline", "num_layers=4"),
    (dict(parallel=ParallelConfig(pipeline=2, pipeline_layers=[1, 2])), 2, "parallel.pipeline_layers", "num_layers=4"),
    (dict(parallel=ParallelConfig(pipeline=2, pipeline_layers=[4])), 2, "parallel.pipeline_layers", "2 positive"),
    (dict(parallel=ParallelConfig(pipeline=2, pipeline_layers=[0, 4])), 2, "parallel.pipeline_layers", "positive"),
    (dict(parallel=ParallelConfig(pipeline=2, virtual_pipeline=2, pipeline_layers=[2, 2])), 2,
     "parallel.pipeline_layers", "4 positive"),
    # Global batch must be a multiple of micro batch x data-parallel size.
    (dict(train=TrainConfig(global_batch_size=8, micro_batch_size=4)), 4, "train.global_batch_size", "4*4"),
    (dict(train=TrainConfig(global_batch_size=12, micro_batch_size=2), parallel=ParallelConfig(tensor=2)), 16,
     "train.global_batch_size", "2*8"),
    (dict(precision=PrecisionConfig(fp8="tensorwise")), 1, "precision.fp8", "cuda"),
    (dict(device="tpu"), 1, "device", "cuda"),
    (dict(compile=True, compile_mode="fastest"), 1, "compile_mode", "reduce-overhead"),
    (dict(compile_mode="reduce-overhead"), 1, "compile_mode", "compile=true"),
    (dict(parallel=ParallelConfig(tensor=2, sequence_parallel=True, tp_comm_overlap=True)), 2,
     "parallel.tp_comm_overlap", "compile=true"),
    # Sequence groups of whole sequences: the micro-batch must split over groups x SP ranks.
    (dict(parallel=ParallelConfig(tensor=2, sequence_parallel=True, tp_batch_chunks=2),
          train=TrainConfig(global_batch_size=4, micro_batch_size=2)), 2, "parallel.tp_batch_chunks", "multiple of 4"),
    (dict(parallel=ParallelConfig(tensor=2, tp_batch_chunks=3), train=TrainConfig(global_batch_size=4, micro_batch_size=2)),
     2, "parallel.tp_batch_chunks", "multiple of 3"),
]


@pytest.mark.parametrize("sections,world,field,hint", RUN_ERRORS, ids=[f"{e[2]}-{i}" for i, e in enumerate(RUN_ERRORS)])
def test_run_bad_combinations(sections, world, field, hint):
    sections = dict(sections)
    model = sections.pop("model", None)
    _expect(lambda: _run(model, **sections).validate(world_size=world), field, hint)


# ------------------------------------------------------------------------- other section errors

SECTION_ERRORS = [
    (lambda: TrainConfig(global_batch_size=10, micro_batch_size=4).validate(), "train.global_batch_size"),
    (lambda: TrainConfig(iters=0).validate(), "train.iters"),
    (lambda: TrainConfig(lr_decay_style="step").validate(), "train.lr_decay_style"),
    (lambda: TrainConfig(lr=1e-4, min_lr=1e-3).validate(), "train.min_lr"),
    (lambda: TrainConfig(warmup_iters=-1).validate(), "train.warmup_iters"),
    (lambda: TrainConfig(clip_grad=-1.0).validate(), "train.clip_grad"),
    (lambda: TrainConfig(wsd_decay_fraction=1.5).validate(), "train.wsd_decay_fraction"),
    (lambda: DataConfig(source="hub").validate(), "data.source"),
    (lambda: DataConfig(source="indexed").validate(), "data.paths"),
    (lambda: DataConfig(source="indexed", paths=["a", "b"], weights=[1.0]).validate(), "data.weights"),
    (lambda: DataConfig(source="indexed", paths=["a"], weights=[-1.0]).validate(), "data.weights"),
    (lambda: DataConfig(split="90,10").validate(), "data.split"),
    (lambda: CheckpointConfig(interval=10).validate(), "checkpoint.dir"),
    (lambda: CheckpointConfig(interval=-1).validate(), "checkpoint.interval"),
    (lambda: CheckpointConfig(keep_last=0).validate(), "checkpoint.keep_last"),
    (lambda: PrecisionConfig(dtype="fp64").validate(), "precision.dtype"),
    (lambda: PrecisionConfig(fp8="mxfp8").validate(), "precision.fp8"),
    (lambda: RecomputeConfig(granularity="partial").validate(), "recompute.granularity"),
    (lambda: RecomputeConfig(every=0).validate(), "recompute.every"),
    (lambda: RecomputeConfig(granularity="selective", modules=["mlp"]).validate(), "recompute.modules"),
    (lambda: LogConfig(interval=0).validate(), "log.interval"),
    # train.lr itself is blamed for a bad lr (not min_lr)
    (lambda: TrainConfig(lr=-1.0).validate(), "train.lr"),
    (lambda: TrainConfig(lr=0.0, min_lr=0.0).validate(), "train.lr"),
    (lambda: TrainConfig(adam_beta1=1.0).validate(), "train.adam_beta1"),
    (lambda: TrainConfig(adam_beta2=-0.1).validate(), "train.adam_beta2"),
    (lambda: TrainConfig(adam_eps=0.0).validate(), "train.adam_eps"),
    (lambda: TrainConfig(weight_decay=-0.1).validate(), "train.weight_decay"),
    (lambda: TrainConfig(eval_interval=-5).validate(), "train.eval_interval"),
    (lambda: TrainConfig(eval_interval=10, eval_iters=0).validate(), "train.eval_iters"),
    (lambda: TrainConfig(eval_iters=-1).validate(), "train.eval_iters"),
    (lambda: TrainConfig(seed=-1).validate(), "train.seed"),
    (lambda: TrainConfig(lr_decay_iters=0).validate(), "train.lr_decay_iters"),
    (lambda: TrainConfig(max_skipped_steps=0).validate(), "train.max_skipped_steps"),
    (lambda: TrainConfig(loss_spike_factor=1.0).validate(), "train.loss_spike_factor"),
    (lambda: TrainConfig(loss_spike_window=0).validate(), "train.loss_spike_window"),
    (lambda: DataConfig(source="indexed", paths=["a"], weights=["x"]).validate(), "data.weights"),
    (lambda: PrecisionConfig(min_loss_scale=0.0).validate(), "precision.min_loss_scale"),
    (lambda: PrecisionConfig(initial_loss_scale=0.5).validate(), "precision.initial_loss_scale"),
    (lambda: PrecisionConfig(hysteresis=0).validate(), "precision.hysteresis"),
    (lambda: PrecisionConfig(loss_scale_window=0).validate(), "precision.loss_scale_window"),
    (lambda: ParallelConfig(ddp_bucket_size_mb=0.0).validate(), "parallel.ddp_bucket_size_mb"),
    (lambda: _run(parallel=ParallelConfig(fsdp=True), train=TrainConfig(loss_spike_factor=3.0)).validate(world_size=2),
     "train.loss_spike_factor"),
]


@pytest.mark.parametrize("fn,field", SECTION_ERRORS, ids=[f"{e[1]}-{i}" for i, e in enumerate(SECTION_ERRORS)])
def test_section_bad_values(fn, field):
    _expect(fn, field)


NON_FINITE = [("train.lr", "nan"), ("train.lr", "inf"), ("train.min_lr", "nan"), ("train.clip_grad", "nan"),
              ("train.clip_grad", "inf"), ("train.adam_beta2", "nan"), ("train.weight_decay", "-inf"),
              ("train.loss_spike_factor", "inf"), ("model.init_std", "nan"), ("model.norm_epsilon", "nan"),
              ("model.norm_epsilon", "inf"), ("model.rotary_base", "inf"), ("model.attention_dropout", "nan"),
              ("precision.initial_loss_scale", "inf"), ("parallel.ddp_bucket_size_mb", "nan"),
              ("data.split", "nan,1,1"), ("data.split", "969,inf,1"), ("data.weights", "[nan, 1]"),
              ("data.weights", "[1, .inf]")]


@pytest.mark.parametrize("key,text", NON_FINITE, ids=[f"{k}={v}" for k, v in NON_FINITE])
def test_non_finite_numbers_are_rejected(key, text):
    """NaN passes every ``<``/``>`` bound and inf most of them: each float key refuses both, by name,
    from a command-line string as from YAML (``.nan``, ``.inf``)."""
    cfg = RunConfig()
    cfg.data.source, cfg.data.paths = "indexed", ["a", "b"]
    apply_override(cfg, key, text)
    msg = _expect(lambda: cfg.validate(world_size=1), key)
    assert "finite" in msg, msg


# ---------------------------------------------------------------- unknown keys suggest nearest names


def _unknown(fn, typo: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        fn()
    msg = str(info.value)
    assert "unknown config key" in msg and typo in msg and suggestion in msg, msg


def test_from_dict_unknown_keys_suggest_nearest():
    _unknown(lambda: from_dict(RunConfig, {"modle": {}}), "modle", "did you mean model")
    _unknown(lambda: from_dict(RunConfig, {"model": {"hidden_sise": 64}}), "model.hidden_sise", "hidden_size")
    _unknown(lambda: from_dict(RunConfig, {"parallel": {"tensor_parallel": 2}}), "parallel.tensor_parallel", "tensor")
    # Nothing close: list every valid key instead.
    _unknown(lambda: from_dict(RunConfig, {"zzzz": 1}), "zzzz", "valid keys: checkpoint, compile, compile_mode, data")


def test_from_dict_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="model must be a mapping"):
        from_dict(RunConfig, {"model": 3})


def test_apply_override_unknown_keys_suggest_nearest():
    cfg = RunConfig()
    _unknown(lambda: apply_override(cfg, "train.lrr", "1e-3"), "train.lrr", "did you mean lr")
    _unknown(lambda: apply_override(cfg, "paralel.tensor", "2"), "paralel.tensor", "parallel")
    _unknown(lambda: apply_override(cfg, "model.num_attention_head", "8"), "num_attention_head", "num_attention_heads")
    with pytest.raises(ConfigError, match="is a section, not a value"):
        apply_override(cfg, "model", "x")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override(cfg, "train.iters.x", "1")


def test_load_run_config_unknown_keys_and_bad_files(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  num_layers: 3\n  hidden_size: 48\ntrain:\n  iters: 5\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  num_layyers: 3\n")
    _unknown(lambda: load_run_config(str(typo)), "model.num_layyers", "num_layers")
    _unknown(lambda: load_run_config(str(good), ["train.iterz=3"]), "train.iterz", "iters")
    with pytest.raises(ConfigError, match="key=value"):
        load_run_config(str(good), ["train.iters"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(str(scalar))
    with pytest.raises(ConfigError, match="is a directory"):
        load_run_config(str(tmp_path))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("log:\n  dir: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml.*not UTF-8 text"):
        load_run_config(str(latin1))


def test_load_run_config_yaml_then_overrides_then_validate(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_layers: 4\n  hidden_size: 64\n  num_attention_heads: 4\n"
                    "parallel:\n  tensor: 2\ntrain:\n  global_batch_size: 8\n  micro_batch_size: 2\n  lr: 3.0e-4\n")
    cfg = load_run_config(str(path), ["train.iters=7", "parallel.sequence_parallel=true", "model.seq_length=64",
                                      "model.rotary_scaling=null", "train.lr=1e-3"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.parallel.tensor) == (4, 64, 2)
    assert cfg.train.iters == 7 and cfg.parallel.sequence_parallel is True and cfg.train.lr == 1e-3
    cfg.validate(world_size=4)
    bad = load_run_config(str(path), ["model.num_attention_heads=3", "model.hidden_size=48"])
    _expect(lambda: bad.validate(world_size=4), "model.num_attention_heads", "parallel.tensor=2")


# ------------------------------------------------------------------------------ type coercion


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
                                        ("false", False), ("FALSE", False), ("0", False), ("no", False),
                                        ("off", False)])
def test_bool_coercion(text, value):
    cfg = RunConfig()
    apply_override(cfg, "parallel.sequence_parallel", text)
    assert cfg.parallel.sequence_parallel is value


@pytest.mark.parametrize("key,text,value", [
    ("train.iters", "100", 100), ("train.iters", "1e3", 1000), ("model.hidden_size", "64.0", 64),
    ("train.lr", "1e-4", 1e-4), ("train.lr", "3", 3.0), ("train.clip_grad", "0.5", 0.5),
    ("model.num_query_groups", "2", 2), ("model.num_query_groups", "null", None),
    ("model.num_query_groups", "None", None), ("model.num_query_groups", "~", None),
    ("model.rotary_scaling", "llama3", "llama3"), ("model.rotary_scaling", "null", None),
    ("model.sliding_window", "4096", 4096), ("model.attention_softmax_scale", "0.125", 0.125),
    ("device", "cuda", "cuda"), ("model.normalization", "LayerNorm", "LayerNorm"),
])
def test_scalar_coercion(key, text, value):
    cfg = RunConfig()
    apply_override(cfg, key, text)
    section, _, name = key.rpartition(".")
    got = getattr(getattr(cfg, section) if section else cfg, name)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("key,text,value", [
    ("recompute.modules", "core_attn,mlp_act", ["core_attn", "mlp_act"]),
    ("recompute.modules", "[core_attn, mlp_act]", ["core_attn", "mlp_act"]),
    ("recompute.modules", "mlp_act", ["mlp_act"]),
    ("parallel.pipeline_layers", "[3, 5]", [3, 5]),
    ("parallel.pipeline_layers", "null", None),
    ("data.paths", "a/b,c/d", ["a/b", "c/d"]),
    ("data.weights", "[0.3, 0.7]", [0.3, 0.7]),
])
def test_list_coercion(key, text, value):
    cfg = RunConfig()
    apply_override(cfg, key, text)
    section, _, name = key.rpartition(".")
    assert getattr(getattr(cfg, section), name) == value


def test_comma_separated_numbers_become_numbers():
    """`parallel.pipeline_layers=3,5` on the command line must mean [3, 5], not ['3', '5'] (which
    later crashes validate() with a TypeError instead of a ConfigError)."""
    cfg = RunConfig(model=_model(num_layers=8))
    apply_override(cfg, "parallel.pipeline", "2")
    apply_override(cfg, "parallel.pipeline_layers", "3,5")
    assert cfg.parallel.pipeline_layers == [3, 5]
    cfg.validate(world_size=2)
    apply_override(cfg, "data.weights", "0.3,0.7")
    assert cfg.data.weights == [0.3, 0.7]


@pytest.mark.parametrize("key,text,word", [
    ("train.iters", "3.5", "integer"), ("train.iters", "ten", "integer"),
    ("train.iters", "inf", "integer"), ("train.iters", "nan", "integer"),
    ("train.lr", "fast", "number"), ("parallel.sequence_parallel", "maybe", "boolean"),
])
def test_bad_cli_strings_raise_config_error(key, text, word):
    with pytest.raises(ConfigError) as info:
        apply_override(RunConfig(), key, text)
    assert key in str(info.value) and word in str(info.value)


def test_yaml_types_are_checked_too():
    with pytest.raises(ConfigError, match="train.iters=True is not an integer"):
        from_dict(RunConfig, {"train": {"iters": True}})
    with pytest.raises(ConfigError, match="is not a list"):
        from_dict(RunConfig, {"recompute": {"modules": 3}})
    cfg = from_dict(RunConfig, {"train": {"lr": 1, "iters": 10.0}, "data": {"tokenizer": 5}})
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.train.iters == 10 and type(cfg.train.iters) is int
    assert cfg.data.tokenizer == "5"
