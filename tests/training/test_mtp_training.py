"""Training with multi-token prediction (``model.mtp_num_layers``, megacore.layers.mtp) on CPU:
the trainer logs ``mtp_loss`` (and each depth's term) through the step's one read while the
reported ``loss`` stays the main LM loss; with ``mtp_loss_weight=0`` the run is the run without
MTP; PP2 (the depths and a copy of the table on the last stage, tied and untied) and TP2 with
sequence parallelism (and TP2 without it) and DP2 reproduce the single-process curve, mtp_loss and grad norms included; the
layouts MTP does not run in are refused."""

from __future__ import annotations

import pytest

from megacore.config import ConfigError
from megacore.config.loading import load_run_config
from tests.training.test_train_cli import ROOT, grad_norms, losses, read_metrics, train_tiny

MTP = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
       "model.ffn_hidden_size=64", "model.seq_length=16", "model.vocab_size=128", "model.mtp_num_layers=2",
       "model.mtp_loss_weight=0.3", "data.source=mock", "train.global_batch_size=4", "train.micro_batch_size=2",
       "train.iters=5", "train.warmup_iters=1", "train.lr=3e-3", "train.eval_interval=0", "log.interval=5",
       "checkpoint.dir=null"]


def _run_in_process(tmp_path, name: str, extra: list[str]) -> list[dict]:
    from megacore.training.trainer import Trainer

    cfg = load_run_config(f"{ROOT}/configs/tiny_cpu.yaml", [*MTP, *extra, f"log.dir={tmp_path / name}"])
    Trainer(cfg).run()
    return [r for r in read_metrics(str(tmp_path / name)) if "loss" in r]


def _close(a: list[float], b: list[float], tol: float) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)) < tol


def test_trainer_logs_mtp_loss_and_reports_the_main_loss(tmp_path):
    with_mtp = _run_in_process(tmp_path, "mtp", [])
    without = _run_in_process(tmp_path, "plain", ["model.mtp_num_layers=0"])
    zero_weight = _run_in_process(tmp_path, "zero", ["model.mtp_loss_weight=0"])
    assert len(with_mtp) == 5
    for r in with_mtp:
        assert r["mtp_loss"] == pytest.approx((r["mtp_loss_1"] + r["mtp_loss_2"]) / 2, rel=1e-12)
        assert 2.0 < r["mtp_loss"] < 8.0, r  # about ln(128) at the start
    assert "mtp_loss" not in without[0]
    # Step 1 is computed before any update: the same main model (init is by parameter name), so
    # the reported loss is the main LM loss, not the objective with the MTP term.
    assert with_mtp[0]["loss"] == without[0]["loss"]
    assert with_mtp[0]["grad_norm"] != without[0]["grad_norm"]  # the MTP loss is backpropagated
    # Weight 0: the depths' gradients are 0, the main model trains as without MTP (up to the
    # summation order of the grad norm over buffers that now also hold the depths' zeros).
    assert _close([r["loss"] for r in zero_weight], [r["loss"] for r in without], 1e-6)
    assert _close([r["grad_norm"] for r in zero_weight], [r["grad_norm"] for r in without], 1e-6)
    assert zero_weight[0]["mtp_loss"] == with_mtp[0]["mtp_loss"]  # logged all the same, unweighted


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtp")
    return {tie: train_tiny(root, f"single_{tie}", [*MTP, f"model.tie_embeddings={tie}"]) for tie in ("true", "false")}


def _mtp_losses(log_dir) -> list[float]:
    return [r["mtp_loss"] for r in read_metrics(log_dir) if "loss" in r]


@pytest.mark.parametrize("name,tie,extra", [
    ("pp2_tied", "true", ["parallel.pipeline=2"]),
    ("pp2_untied", "false", ["parallel.pipeline=2"]),
    ("tp2_sp_tied", "true", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    ("tp2_untied", "false", ["parallel.tensor=2"]),
    ("dp2_untied", "false", ["parallel.distributed_optimizer=true"]),
])
def test_layouts_reproduce_single_process_curve(tmp_path, reference, name, tie, extra):
    log = train_tiny(tmp_path, name, [*MTP, f"model.tie_embeddings={tie}", *extra], nproc=2)
    want = reference[tie]
    assert _close(losses(log), losses(want), 1e-5), (name, losses(log), losses(want))
    assert _close(_mtp_losses(log), _mtp_losses(want), 1e-5), (name, _mtp_losses(log), _mtp_losses(want))
    assert _close(grad_norms(log), grad_norms(want), 1e-4), (name, grad_norms(log), grad_norms(want))


@pytest.mark.parametrize("extra, words", [
    (["parallel.context=2"], "parallel.context=2"),
    (["model.layer_pattern=*-"], "model.layer_pattern"),
    (["parallel.fsdp=true"], "parallel.fsdp"),
])
def test_unsupported_layouts_are_refused(extra, words):
    cfg = load_run_config(f"{ROOT}/configs/tiny_cpu.yaml", MTP + extra)
    with pytest.raises(ConfigError, match=words):
        cfg.validate(world_size=2)


MOE = ["model.num_experts=4", "model.moe_top_k=2", "model.moe_first_k_dense=1", "model.moe_aux_loss_coeff=0.05",
       "model.moe_router_bias_update_rate=0.001", "model.moe_router_score=sigmoid"]


def test_moe_depth_trains_and_counts_in_the_moe_metrics(tmp_path):
    """An MoE model's MTP layer is an MoE layer (global number 2 >= moe_first_k_dense=1): its balance
    loss is averaged with the decoder's one MoE layer, its load has its own row of the step table."""
    from megacore.training.moe import num_moe_layers

    moe = MOE
    records = _run_in_process(tmp_path, "moe", moe)
    cfg = load_run_config(f"{ROOT}/configs/tiny_cpu.yaml", MTP + moe)
    assert num_moe_layers(cfg.model) == 3  # decoder layer 1, MTP layers 2 and 3
    assert len(records) == 5
    for r in records:
        assert 1.0 < r["moe_aux_loss"] < 4.0 and r["moe_load_cv"] >= 0.0 and r["mtp_loss"] > 0, r


def test_moe_pp2_reproduces_single_process(tmp_path):
    """PP2 of that model: stage 0 holds only the dense layer 0 (it adds a zero balance-loss sum to the
    step's all-reduce), stage 1 the MoE layer 1 and both MoE depths."""
    single = read_metrics(train_tiny(tmp_path, "single", MTP + MOE))
    pp2 = read_metrics(train_tiny(tmp_path, "pp2", MTP + MOE + ["parallel.pipeline=2"], nproc=2))
    for key, tol in (("loss", 1e-5), ("mtp_loss", 1e-5), ("moe_aux_loss", 1e-5), ("grad_norm", 1e-4)):
        assert _close([r[key] for r in pp2 if "loss" in r], [r[key] for r in single if "loss" in r], tol), key


def test_pp2_checkpoint_resumes_on_one_process(tmp_path, reference):
    """Saved at PP2 (untied: the last stage's copy of the table is saved once, under the embedding's
    name), resumed on one process: steps 4-5 follow the single-process curve."""
    ckpt = str(tmp_path / "ckpt")
    base = [*MTP, "model.tie_embeddings=false"]
    train_tiny(tmp_path, "pp2_save", [*base, "parallel.pipeline=2", f"checkpoint.dir={ckpt}", "checkpoint.interval=3"],
               nproc=2)
    resumed = [r for r in read_metrics(train_tiny(tmp_path, "resumed", [*base, f"checkpoint.load={ckpt}/iter_0000003"]))
               if "loss" in r]
    assert [r["step"] for r in resumed] == [4, 5]
    want = [r for r in read_metrics(reference["false"]) if "loss" in r][3:]
    assert _close([r["loss"] for r in resumed], [r["loss"] for r in want], 1e-5)
    assert _close([r["mtp_loss"] for r in resumed], [r["mtp_loss"] for r in want], 1e-5)
