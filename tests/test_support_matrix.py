"""The support matrix (``megacore.config.support``): one table decides which layouts, features and
model kinds run together; ``RunConfig.validate`` runs it, the library entry points run the rules
they can answer, and ``docs/support-matrix.md`` is rendered from it (``megacore.config.support_doc``)."""

from __future__ import annotations

import os

import pytest

from megacore.config import ConfigError, RunConfig, TransformerConfig, apply_override
from megacore.config.support import RULES, Divisible, Facts, Requires, Unsupported, check, facts_of_run, skipped_rules
from megacore.config.support_doc import REGENERATE, _cell, render_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "support-matrix.md")


def _run(*overrides: str) -> RunConfig:
    cfg = RunConfig(model=TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=256,
                                            seq_length=32))
    for item in overrides:
        key, value = item.split("=", 1)
        apply_override(cfg, key, value)
    return cfg


def test_committed_doc_is_the_rendered_table():
    with open(DOC) as f:
        committed = f.read()
    assert committed == render_markdown(), f"docs/support-matrix.md differs from the table; regenerate it: {REGENERATE}"


def test_a_whole_run_answers_every_rule():
    assert skipped_rules(facts_of_run(_run(), world_size=1)) == []


def test_rules_name_known_features():
    from megacore.config.support import FEATURES, MATRIX_COLUMNS, MATRIX_ROWS

    for rule in RULES:
        keys = {Unsupported: ("a", "b"), Requires: ("a",), Divisible: ("when",)}.get(type(rule), ())
        for attr in keys:
            assert getattr(rule, attr) in FEATURES or getattr(rule, attr) is None, rule
    assert set(MATRIX_ROWS) | set(MATRIX_COLUMNS) <= set(FEATURES)


# Every refusal that used to live in the trainer, training/moe.py, training/hybrid.py or the vision
# validation now comes out of RunConfig.validate, naming the field, the value and the fix.
REFUSED = [
    (["parallel.fsdp=true", "precision.dtype=fp16"], 2, ["parallel.fsdp=True", "precision.dtype='fp16'", "bf16"]),
    (["parallel.fsdp=true", "checkpoint.dir=/tmp/x"], 2, ["parallel.fsdp=True", "checkpoint.dir='/tmp/x'"]),
    (["parallel.fsdp=true", "checkpoint.load=ckpt/iter_0000010"], 2, ["parallel.fsdp=True", "checkpoint.load='ckpt/iter_0000010'"]),
    (["parallel.fsdp=true", "parallel.tensor=2"], 2, ["parallel.fsdp=True", "parallel.tensor=2",
                                                      "distributed_optimizer=true"]),
    (["parallel.fsdp=true", "parallel.pipeline=2"], 2, ["parallel.pipeline=2"]),
    (["parallel.context=2", "parallel.fsdp=true"], 2, ["parallel.context=2", "parallel.fsdp=True"]),
    (["model.num_experts=4", "parallel.expert=2", "parallel.fsdp=true"], 2, ["parallel.expert=2", "parallel.fsdp"]),
    (["model.num_experts=4", "parallel.tensor=2", "parallel.expert=2"], 4,
     ["parallel.expert=2", "parallel.sequence_parallel=true", "once per rank"]),
    (["model.num_experts=4", "parallel.tensor=4", "parallel.expert_tensor=2"], 4,
     ["parallel.expert_tensor=2 needs parallel.expert_tensor = parallel.tensor"]),
    (["parallel.tensor=2", "parallel.expert_tensor=2"], 2, ["parallel.expert_tensor=2", "model.num_experts=None"]),
    (["model.num_experts=4", "model.moe_ffn_hidden_size=30", "parallel.tensor=4", "parallel.expert_tensor=4"], 4,
     ["model.moe_ffn_hidden_size=30 is not divisible by parallel.expert_tensor=4"]),
    (["model.num_experts=4", "model.moe_shared_expert_hidden_size=30", "parallel.tensor=4"], 4,
     ["model.moe_shared_expert_hidden_size=30 is not divisible by parallel.tensor=4"]),
    (["model.num_experts=4", "parallel.tensor=2", "parallel.tp_batch_chunks=2"], 2,
     ["parallel.tp_batch_chunks=2", "model.num_experts=4", "whole micro-batch"]),
    (["model.num_experts=4", "parallel.expert=2", "parallel.expert_dispatcher=ring"], 2,
     ["parallel.expert_dispatcher='ring'", "all_gather"]),
    (["parallel.expert=2"], 2, ["parallel.expert=2", "model.num_experts=None"]),
    (["model.num_experts=6", "parallel.expert=4"], 8, ["model.num_experts=6 is not divisible by parallel.expert=4"]),
    (["model.num_experts=4", "parallel.expert=4"], 2, ["parallel.expert=4", "2 ranks of a pipeline stage"]),
    (["model.num_layers=4", "model.layer_pattern=M*M-", "model.mamba_head_dim=16", "model.mamba_num_groups=2",
      "model.position_embedding=none", "data.reset_attention_mask=true", "parallel.context=2"], 2,
     ["data.reset_attention_mask=True", "parallel.context=1 when the model has Mamba layers"]),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.tp_comm_overlap=copy_engine",
      "precision.fp8=tensorwise", "device=cuda"], 2, ["parallel.tp_comm_overlap='copy_engine'", "precision.fp8"]),
    (["model.qk_norm=true", "model.qk_norm_scope=projection", "parallel.tensor=2"], 2,
     ["parallel.tensor=2 needs model.qk_norm_scope=head", "set parallel.tensor=1"]),
    (["compile_mode=reduce-overhead"], 1, ["compile_mode='reduce-overhead' needs compile=true"]),
]


@pytest.mark.parametrize("overrides,world,words", REFUSED, ids=[" ".join(r[0]) for r in REFUSED])
def test_validate_refuses_with_the_field_value_and_fix(overrides, world, words):
    cfg = _run(*overrides)
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=world)
    msg = str(err.value)
    assert ";" in msg, msg  # '<field>=<value> <problem>; <fix>'
    for word in words:
        assert word in msg, msg


VISION = ["vision.enabled=true", "vision.image_token_id=3", "vision.image_size=28", "vision.patch_size=14",
          "vision.hidden_size=32", "vision.intermediate_size=64", "vision.num_layers=2",
          "vision.num_attention_heads=2", "data.source=mock", "train.micro_batch_size=4"]


def test_vision_refusals_come_from_the_table():
    _run(*VISION).validate(world_size=2)
    for extra, words in ((["model.num_experts=4", "parallel.expert=2"], "parallel.expert=2 with vision.enabled=True"),
                         (["parallel.context=2"], "parallel.context=2 with vision.enabled=True"),
                         (["data.source=default"], "data.source='default' with vision.enabled=True")):
        with pytest.raises(ConfigError, match=words):
            _run(*VISION, *extra).validate(world_size=2)


def test_library_entry_points_share_the_table_messages():
    """check_tp_config, rank_groups and layer_counts raise exactly what validate raises for the same
    problem: the rule lives once."""
    from megacore.parallel import check_tp_config, rank_groups
    from megacore.pipeline.partition import layer_counts

    def message(fn):
        with pytest.raises(ConfigError) as err:
            fn()
        return str(err.value)

    model = TransformerConfig(num_layers=4, hidden_size=48, num_attention_heads=6, vocab_size=256, seq_length=32)
    cfg = _run("parallel.tensor=4")
    cfg.model = model
    assert message(lambda: check_tp_config(model, 4, False)) == message(lambda: cfg.validate(world_size=4))
    assert message(lambda: rank_groups(6, tensor=4)) == message(lambda: _run("parallel.tensor=4").validate(6))
    assert (message(lambda: layer_counts(4, 2, 3)) ==
            message(lambda: _run("parallel.pipeline=2", "parallel.virtual_pipeline=3").validate(world_size=2)))
    assert (message(lambda: layer_counts(4, 1, 2)) ==
            message(lambda: _run("parallel.virtual_pipeline=2").validate(world_size=1)))


def test_rules_a_caller_cannot_answer_are_skipped():
    check(Facts(tensor=3))                      # nothing else known: no divisibility rule can run
    with pytest.raises(ConfigError, match="parallel.tensor=0"):
        check(Facts(tensor=0))
    with pytest.raises(ValueError, match="unknown facts"):
        Facts(tensors=2)


def test_matrix_cells():
    assert _cell("pipeline", "moe") == "yes"
    assert _cell("tensor", "moe") == _cell("context", "moe") == _cell("expert_tensor", "moe") == "yes"
    assert _cell("expert_tensor", "dense").startswith("no (R")
    assert _cell("sequence_parallel", "moe") == _cell("tensor", "moe")   # SP implies TP
    assert _cell("context", "mamba") == _cell("context", "hybrid")        # Mamba layers make a hybrid stack
    assert _cell("expert", "dense").startswith("no") and _cell("expert", "moe") == "yes"
