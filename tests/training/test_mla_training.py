"""``megacore train`` with multi-latent attention on CPU (in this process, a few steps): the run finishes
with finite losses, also with the up-projections recomputed, and PP2, TP2 with sequence parallelism and CP2 follow
the one-process run."""

from __future__ import annotations

import json
import math
import os

import pytest

from megacore.cli import main
from megacore.config import ConfigError
from megacore.config.loading import load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
MLA = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=null",
       "model.ffn_hidden_size=64", "model.seq_length=16", "model.vocab_size=128", "model.multi_latent_attention=true",
       "model.q_lora_rank=16", "model.kv_lora_rank=8", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4",
       "model.v_head_dim=8", "data.source=mock", "train.global_batch_size=2", "train.micro_batch_size=2",
       "train.iters=3", "train.warmup_iters=0", "train.eval_interval=0", "log.interval=1", "checkpoint.dir=null"]


@pytest.mark.parametrize("extra", [[], ["recompute.granularity=selective", "recompute.modules=[core_attn,mla_up_proj]"]],
                         ids=["plain", "recompute_up_proj"])
def test_train_cli_runs_mla(tmp_path, extra):
    assert main(["train", CONFIG, *MLA, *extra, f"log.dir={tmp_path}"]) == 0
    with open(tmp_path / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, filter(str.strip, f)) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses


def test_unknown_recompute_module_names_the_choices():
    cfg = load_run_config(CONFIG, MLA + ["recompute.granularity=selective", "recompute.modules=[mla_up]"])
    with pytest.raises(ConfigError, match="mla_up_proj"):
        cfg.validate(world_size=1)


def test_pipeline_parallel_mla_reproduces_the_single_process_losses(tmp_path):
    """PP2 (one MLA layer per stage, built and initialized by global name; two micro-batches of one
    sample for the 1F1B schedule) follows the one-process run."""
    from tests.training.test_train_cli import losses, train_tiny

    single = losses(train_tiny(tmp_path, "single", MLA))
    pp2 = losses(train_tiny(tmp_path, "pp2", [*MLA, "parallel.pipeline=2", "train.micro_batch_size=1"], nproc=2))
    assert len(single) == len(pp2) == 3
    worst = max(abs(a - b) / abs(b) for a, b in zip(pp2, single))
    assert worst < 1e-5, (pp2, single)


def test_tensor_sequence_and_context_parallel_mla_reproduce_the_single_process_losses(tmp_path):
    """TP2 + SP (one head per rank, the latents gathered over the token shards) and CP2 (keys and
    values gathered over the load-balanced split) follow the one-process run."""
    from tests.training.test_train_cli import losses, train_tiny

    single = losses(train_tiny(tmp_path, "single", MLA))
    for name, layout in (("tp2_sp", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
                         ("cp2", ["parallel.context=2"])):
        curve = losses(train_tiny(tmp_path, name, [*MLA, *layout], nproc=2))
        assert len(curve) == len(single) == 3, (name, curve)
        worst = max(abs(a - b) / abs(b) for a, b in zip(curve, single))
        assert worst < 1e-5, (name, curve, single)
