"""The router's step-level pieces in training: the aux-loss-free bias moves by ±rate steps and is
checkpointed (a resumed run continues the uninterrupted one, bias included), ``metrics.jsonl`` gets
the expert-load keys (and the z-loss), the step-end sum over ranks (gloo, a rank without MoE layers
included), and DP2 with ``global_batch`` and the bias update reproduces the one-process run on the
same global batch."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from tests.dist.harness import run_distributed
from tests.training.test_moe_training import MOE
from tests.training.test_train_cli import ROOT, losses, read_metrics, train_tiny

RATE = 1e-3
ROUTER = ["model.moe_router_score=sigmoid", f"model.moe_router_bias_update_rate={RATE}", "model.moe_z_loss_coeff=1e-3",
          "model.moe_router_num_groups=2", "model.moe_router_group_topk=1", "model.moe_routed_scaling_factor=2.0",
          "model.moe_aux_loss_type=sequence", "model.moe_capacity_factor=1.5", "model.num_experts=8"]
LOAD_KEYS = ("moe_load_max", "moe_load_min", "moe_load_cv", "moe_z_loss")


def _trainer(tmp_path, name, extra):
    from megacore.config import load_run_config
    from megacore.training.trainer import Trainer

    cfg = load_run_config(os.path.join(ROOT, "configs/tiny_cpu.yaml"),
                          [*MOE, *ROUTER, f"log.dir={tmp_path / name}", *extra])
    return Trainer(cfg)


def _biases(trainer):
    return [layer.router.expert_bias.clone() for layer in trainer.moe_layers]


def test_bias_moves_is_checkpointed_and_metrics_are_logged(tmp_path):
    full = _trainer(tmp_path, "full", ["train.iters=6", f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.interval=3"])
    full.run()
    records = [r for r in read_metrics(tmp_path / "full") if "loss" in r]
    assert len(records) == 6
    for r in records:
        assert r["moe_load_max"] >= 1.0 >= r["moe_load_min"] >= 0.0 and r["moe_load_cv"] >= 0.0, r
        assert r["moe_z_loss"] > 0 and math.isfinite(r["moe_z_loss"]), r
    biases = _biases(full)
    assert len(biases) == 2 and all(b.dtype == torch.float32 for b in biases)
    assert any(b.abs().max() > 0 for b in biases)
    for b in biases:  # six steps of ±rate (or 0): integer multiples of rate, at most 6 of them
        steps = b / RATE
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 6

    # Resume from step 3: the bias comes back from the checkpoint, so steps 4..6 repeat exactly.
    resumed = _trainer(tmp_path, "resumed", ["train.iters=6", f"checkpoint.load={tmp_path / 'ckpt'}/iter_0000003"])
    resumed.run()
    again = [r for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    assert [r["step"] for r in again] == [4, 5, 6]
    for r, want in zip(again, records[3:]):
        for key in ("loss", "grad_norm", *LOAD_KEYS):
            assert r[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (key, r, want)
    for a, b in zip(_biases(resumed), biases):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dense_model_logs_no_load_keys(tmp_path):
    trainer = _trainer(tmp_path, "dense", ["train.iters=1", "model.num_experts=null"])
    trainer.run()
    record = read_metrics(tmp_path / "dense")[-1]
    assert not any(k.startswith("moe_") for k in record), record


# ---------------------------------------------------------------------------- over ranks
def _end_step_cases(rank, world):
    """Rank 0 holds MoE layer 0 and rank 2 layer 1 (two pipeline stages); rank 1 is rank 0's
    data-parallel peer with other loads; rank 3 holds no MoE layer. One all-reduce sums the table."""
    from megacore.config import TransformerConfig
    from megacore.layers.moe import MoELayer, Routing
    from megacore.training.moe import end_moe_step

    cfg = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=8, vocab_size=16,
                            seq_length=4, num_experts=4, moe_router_bias_update_rate=0.5).validate()
    loads = {0: [3.0, 1.0, 0.0, 0.0], 1: [0.0, 1.0, 4.0, 3.0], 2: [1.0, 1.0, 1.0, 5.0]}
    layers = []
    if rank in loads:
        layer = MoELayer(cfg)
        layer.step_row = 0 if rank < 2 else 1
        layer.router.record_step(Routing(None, None, None, None, torch.tensor(loads[rank])))
        layers.append(layer)
    metrics = end_moe_step(layers, cfg)
    dist.barrier()
    return ([layer.router.expert_bias.tolist() for layer in layers], {k: v.item() for k, v in metrics.items()})


def test_end_of_step_sums_the_load_over_all_ranks():
    results = run_distributed(_end_step_cases, world_size=4)
    # layer 0: [3, 2, 4, 3] (mean 3) on ranks 0 and 1 alike; layer 1: [1, 1, 1, 5] (mean 2)
    assert results[0][0] == results[1][0] == [[0.0, 0.5, -0.5, 0.0]]
    assert results[2][0] == [[0.5, 0.5, 0.5, -0.5]] and results[3][0] == []
    total = torch.tensor([4.0, 3.0, 5.0, 8.0], dtype=torch.float64)
    want = {"moe_load_max": 8 / 5, "moe_load_min": 3 / 5, "moe_load_cv": total.std(correction=0).item() / 5}
    for _, metrics in results:  # every rank has the whole model's numbers (rank 0 logs them)
        assert metrics == pytest.approx(want)


def test_dp2_global_batch_and_bias_match_one_process(tmp_path):
    """One micro-batch of 8 on one process vs one of 4 on each of 2 DP ranks: the global-batch
    balance loss counts the same 8 sequences' assignments, and the bias moves by the same sums."""
    # (no capacity here: it is per forward, so it drops differently for 8 local sequences than for 4)
    router = [o for o in ROUTER if "capacity" not in o and "aux_loss_type" not in o]
    common = [*router, "model.moe_aux_loss_type=global_batch", "train.iters=8", "train.global_batch_size=8"]
    one = train_tiny(tmp_path, "one", [*MOE, *common, "train.micro_batch_size=8"])
    two = train_tiny(tmp_path, "two", [*MOE, *common, "train.micro_batch_size=4"], nproc=2)
    got, want = losses(two), losses(one)
    assert len(got) == len(want) == 8
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) < 1e-4, (got, want)
    for key in ("moe_aux_loss", *LOAD_KEYS):
        pairs = [(r[key], q[key]) for r, q in zip(read_metrics(two), read_metrics(one)) if "loss" in r]
        assert max(abs(a - b) / max(abs(b), 1e-6) for a, b in pairs) < 1e-4, (key, pairs)
    # The balance loss sits near k = 2 (even load); its excess over 2 is what differs between the
    # micro-batch loss of 4 sequences and the global one of 8: it must match closely too.
    excess = [(r["moe_aux_loss"] - 2, q["moe_aux_loss"] - 2) for r, q in zip(read_metrics(two), read_metrics(one))
              if "loss" in r]
    assert all(abs(a - b) < 0.02 * abs(b) for a, b in excess), excess
