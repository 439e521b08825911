"""``megacore train`` with a hybrid stack (Mamba-2, attention and MLP layers) on CPU: the loss falls,
DP2 (distributed optimizer), PP2, TP2 with sequence parallelism and CP2 (Mamba states passed between
the ranks' chunks) reproduce the single-process curve, packed documents too (TP2+SP), and the layouts this version cannot run are
refused with errors that name the keys."""

from __future__ import annotations

import pytest

from megacore.config import ConfigError
from megacore.config.loading import load_run_config
from megacore.config.support import check_supported as check_hybrid_layout
from tests.training.test_train_cli import ROOT, losses, read_metrics, train_tiny

HYBRID = ["model.num_layers=4", "model.layer_pattern=M*M-", "model.hidden_size=64", "model.num_attention_heads=4",
          "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.activation=squared_relu",
          "model.position_embedding=none", "model.mamba_head_dim=16", "model.mamba_state_dim=8",
          "model.mamba_num_groups=2", "model.mamba_chunk_size=8", "model.seq_length=32", "model.vocab_size=256",
          "data.source=mock", "train.global_batch_size=8", "train.micro_batch_size=2", "train.iters=12",
          "train.warmup_iters=2", "train.lr=3e-3", "train.eval_interval=0", "log.interval=4", "checkpoint.dir=null"]


def _train(tmp_path, name, extra, nproc=1):
    return train_tiny(tmp_path, name, [*HYBRID, *extra], nproc)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("hybrid"), "single", [])


def test_hybrid_training_learns(reference):
    records = [r for r in read_metrics(reference) if "loss" in r]
    assert len(records) == 12
    assert records[-1]["loss"] < records[0]["loss"] - 0.2, records  # mock tokens: the unigram fit


@pytest.mark.parametrize("name,extra", [("dp2_distopt", ["parallel.distributed_optimizer=true"]),
                                        ("pp2", ["parallel.pipeline=2"]),
                                        ("tp2_sp", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
                                        ("cp2", ["parallel.context=2"])])
def test_hybrid_layouts_reproduce_single_process_curve(tmp_path, reference, name, extra):
    log = _train(tmp_path, name, extra, nproc=2)
    got, want = losses(log), losses(reference)
    assert len(got) == len(want) == 12
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    assert worst < 1e-4, (name, worst, got, want)


def test_packed_documents_train_alike_at_tp2_sp(tmp_path, reference):
    """data.reset_attention_mask=true: the Mamba layers restart at every document (the model-level
    proof is tests/layers/test_mamba.py); through the trainer TP2+SP reproduces the one-process curve,
    and that curve is not the unpacked one (the document masks took effect)."""
    packed = _train(tmp_path, "docs", ["data.reset_attention_mask=true", "data.reset_position_ids=true"])
    tp2 = _train(tmp_path, "docs_tp2", ["data.reset_attention_mask=true", "data.reset_position_ids=true",
                                        "parallel.tensor=2", "parallel.sequence_parallel=true"], nproc=2)
    got, want = losses(tp2), losses(packed)
    assert len(got) == len(want) == 12
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) < 1e-4, (got, want)
    assert max(abs(a - b) for a, b in zip(want, losses(reference))) > 1e-3


def test_hybrid_moe_balance_loss_is_averaged_over_its_moe_layers(tmp_path):
    """'M-' with experts has ONE MoE layer: the logged balance loss is its mean (about moe_top_k = 2
    for even routing), not that sum spread over all layers of the pattern."""
    log = _train(tmp_path, "moe", ["model.num_layers=2", "model.layer_pattern=M-", "model.num_experts=4",
                                   "model.moe_top_k=2", "model.moe_aux_loss_coeff=0.05", "train.iters=4"])
    records = [r for r in read_metrics(log) if "loss" in r]
    # about 2.0 here; dividing by both layers of the pattern would log about 1.0
    assert len(records) == 4 and all(1.5 < r["moe_aux_loss"] < 4.0 for r in records), records


@pytest.mark.parametrize("extra, words", [
    (["data.reset_attention_mask=true", "parallel.context=2"], "parallel.context=1"),
    (["model.sliding_window=8"], "model.sliding_window"),
])
def test_unsupported_hybrid_layouts_are_refused(extra, words):
    cfg = load_run_config(f"{ROOT}/configs/tiny_cpu.yaml", HYBRID + extra)
    with pytest.raises(ConfigError, match=words):  # the config's own validation, or the trainer's layout check
        cfg.validate()
        check_hybrid_layout(cfg)


def test_tp2_checkpoint_resumes_on_one_process(tmp_path, reference):
    """A hybrid checkpoint saved at TP2+SP (Mamba mixers split by heads) resumes on one process:
    steps 7-12 follow the single-process curve."""
    ckpt = str(tmp_path / "ckpt")
    _train(tmp_path, "tp2_save", ["parallel.tensor=2", "parallel.sequence_parallel=true", f"checkpoint.dir={ckpt}",
                                  "checkpoint.interval=6"], nproc=2)
    resumed = _train(tmp_path, "resumed", [f"checkpoint.load={ckpt}/iter_0000006"])
    records = [r for r in read_metrics(resumed) if "loss" in r]
    assert [r["step"] for r in records] == list(range(7, 13))
    want = losses(reference)[6:]
    worst = max(abs(r["loss"] - w) / abs(w) for r, w in zip(records, want))
    assert worst < 1e-4, (worst, [r["loss"] for r in records], want)
