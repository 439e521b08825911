"""``megacore train`` with MoE layers on CPU: the loss falls, and data-, pipeline-, expert-, tensor-
and context-parallel runs (DP2 with the distributed optimizer, PP2, EP2 with either optimizer, TP2
with sequence parallelism, CP2, PP2 x DP2 x EP2 with the all-gather dispatcher) reproduce the single-process curve, grad norm and logged load-balancing loss included
(its per-micro-batch scale must make every layout optimize the same objective); checkpoints reshard
between those layouts (one process -> EP2, -> EP2 x ETP2 x TP2, and EP2 -> one process)."""

from __future__ import annotations

import pytest

from megacore.config import ConfigError, ParallelConfig, PrecisionConfig
from megacore.config.loading import load_run_config
from tests.training.test_train_cli import ROOT, losses, read_metrics, train_tiny

MOE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
       "model.ffn_hidden_size=96", "model.seq_length=32", "model.vocab_size=256", "model.num_experts=4",
       "model.moe_top_k=2", "model.moe_aux_loss_coeff=0.05", "data.source=mock", "train.global_batch_size=8",
       "train.micro_batch_size=2", "train.iters=12", "train.warmup_iters=2", "train.lr=3e-3",
       "train.eval_interval=0", "log.interval=4", "checkpoint.dir=null"]


def _train(tmp_path, name, extra, nproc=1):
    return train_tiny(tmp_path, name, [*MOE, *extra], nproc)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("moe"), "single", [])


def test_moe_training_learns(reference):
    records = [r for r in read_metrics(reference) if "loss" in r]
    assert len(records) == 12
    assert records[-1]["loss"] < records[0]["loss"] - 0.3, records
    # Load-balancing loss: k = 2 for perfectly even routing; logged every step.
    assert all(1.0 < r["moe_aux_loss"] < 4.0 for r in records), records


@pytest.mark.parametrize("name,extra,nproc", [
    ("dp2_distopt", ["parallel.distributed_optimizer=true"], 2),
    ("pp2", ["parallel.pipeline=2"], 2),
    ("ep2", ["parallel.expert=2"], 2),
    ("ep2_distopt", ["parallel.expert=2", "parallel.distributed_optimizer=true"], 2),
    ("tp2_sp", ["parallel.tensor=2", "parallel.sequence_parallel=true"], 2),
    ("cp2", ["parallel.context=2"], 2),
    ("pp2_dp2_ep2_all_gather", ["parallel.pipeline=2", "parallel.expert=2", "parallel.expert_dispatcher=all_gather",
                                "parallel.distributed_optimizer=true"], 4),
])
def test_moe_layouts_reproduce_single_process_curve(tmp_path, reference, name, extra, nproc):
    log = _train(tmp_path, name, extra, nproc=nproc)
    got, want = losses(log), losses(reference)
    assert len(got) == len(want) == 12
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    assert worst < 1e-4, (name, worst, got, want)
    # The global grad norm counts every expert once, wherever it lives; the logged balance loss is the
    # mean over all layers and micro-batches, whichever rank ran them (PP: not the shape-probing pass).
    for key in ("grad_norm", "moe_aux_loss"):
        pairs = [(r[key], q[key]) for r, q in zip(read_metrics(log), read_metrics(reference)) if "loss" in r]
        assert max(abs(a - b) / b for a, b in pairs) < 1e-4, (name, key, pairs)


@pytest.mark.parametrize("overrides,words", [
    (["parallel.tensor=2", "parallel.expert=2"], "parallel.sequence_parallel=true"),
    (["parallel.expert=3"], "not divisible by parallel.expert=3"),
    (["parallel.expert=2", "model.num_experts=null"], "model.num_experts"),
])
def test_moe_unsupported_layouts_are_clear_errors(overrides, words):
    from megacore.config.support import check_supported as _check_supported

    cfg = load_run_config(f"{ROOT}/configs/tiny_cpu.yaml", [*MOE, *overrides])
    with pytest.raises(ConfigError, match=words):
        _check_supported(cfg)
    cfg.parallel, cfg.precision = ParallelConfig(), PrecisionConfig(fp8="tensorwise")
    with pytest.raises(ConfigError, match="fp8"):
        _check_supported(cfg)


@pytest.fixture(scope="module")
def single_checkpoint(tmp_path_factory):
    """A single-process MoE checkpoint at step 6 (of the reference's 12 steps: same LR schedule)."""
    tmp_path = tmp_path_factory.mktemp("moe_ckpt")
    ckpt = str(tmp_path / "ckpt")
    _train(tmp_path, "saving", [f"checkpoint.dir={ckpt}", "checkpoint.interval=6"])
    return f"{ckpt}/iter_0000006"


@pytest.mark.parametrize("name,extra,nproc", [
    ("dp2_distopt", ["parallel.distributed_optimizer=true"], 2),
    ("ep2", ["parallel.expert=2"], 2),
    ("tp2_ep2_etp2_sp", ["parallel.tensor=2", "parallel.expert=2", "parallel.expert_tensor=2",
                         "parallel.sequence_parallel=true", "parallel.distributed_optimizer=true"], 4),
])
def test_moe_checkpoint_resumes_at_another_layout(tmp_path, reference, single_checkpoint, name, extra, nproc):
    """The single-process checkpoint resumes in another layout: the stacked expert weights (split
    over EP by experts, over ETP by hidden units) and their Adam moments reshard, and steps 7..12
    follow the reference."""
    resumed = _train(tmp_path, f"resumed_{name}", [f"checkpoint.load={single_checkpoint}", *extra], nproc=nproc)
    records = [r for r in read_metrics(resumed) if "loss" in r]
    assert [r["step"] for r in records] == list(range(7, 13))
    want = losses(reference)[6:]
    worst = max(abs(r["loss"] - b) / b for r, b in zip(records, want))
    assert worst < 1e-4, (worst, records, want)


def test_ep2_checkpoint_resumes_on_one_process(tmp_path, reference):
    """Each EP rank saves its own experts; one process loads them all and continues the curve."""
    ckpt = str(tmp_path / "ckpt")
    _train(tmp_path, "saving_ep2", [f"checkpoint.dir={ckpt}", "checkpoint.interval=6", "parallel.expert=2",
                                    "parallel.distributed_optimizer=true"], nproc=2)
    resumed = _train(tmp_path, "resumed_single", [f"checkpoint.load={ckpt}/iter_0000006"])
    records = [r for r in read_metrics(resumed) if "loss" in r]
    want = losses(reference)[6:]
    worst = max(abs(r["loss"] - b) / b for r, b in zip(records, want))
    assert [r["step"] for r in records] == list(range(7, 13)) and worst < 1e-4, (worst, records, want)
