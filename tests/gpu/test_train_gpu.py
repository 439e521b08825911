"""``megacore train`` on CUDA: bf16 training runs and logs GPU metrics; with two GPUs, NCCL layouts
reproduce the one-GPU loss curve within bf16 tolerance."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=8", "model.num_query_groups=4",
         "model.ffn_hidden_size=704", "model.seq_length=256", "model.vocab_size=4096", "data.source=mock",
         "train.global_batch_size=8", "train.micro_batch_size=4", "train.iters=30", "train.warmup_iters=5",
         "train.lr=3e-3", "train.eval_interval=0", "precision.dtype=bf16", "device=cuda", "log.interval=10"]


def _train(tmp_path, name, extra, nproc=1):
    log_dir = str(tmp_path / name)
    cmd = [sys.executable, "-m", "megacore", "train", "configs/tiny_cpu.yaml", *SMALL, f"log.dir={log_dir}", *extra]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_bf16_training_on_one_gpu_logs_gpu_metrics(tmp_path):
    records = _train(tmp_path, "one", [])
    assert len(records) == 30
    assert all(r["mem_gb"] > 0 and 0 < r["mfu"] < 1 for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.3  # mock tokens are random: the unigram fit still helps


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("extra", [["parallel.tensor=2", "parallel.sequence_parallel=true"],
                                   ["parallel.tensor=2", "parallel.sequence_parallel=true", "compile=true"],
                                   # CUDA graphs: also proves the run exits (a captured NCCL kernel once made
                                   # destroy_process_group hang; the subprocess timeout fails the test then)
                                   ["parallel.tensor=2", "parallel.sequence_parallel=true", "compile=true",
                                    "compile_mode=reduce-overhead"],
                                   # SP collectives as copy-engine transfers beside the matmuls, in CUDA graphs
                                   ["parallel.tensor=2", "parallel.sequence_parallel=true", "compile=true",
                                    "compile_mode=reduce-overhead", "parallel.tp_comm_overlap=copy_engine"],
                                   ["parallel.distributed_optimizer=true"], ["parallel.pipeline=2"],
                                   ["parallel.context=2"],
                                   ["model.num_experts=4", "model.moe_aux_loss_coeff=0.01", "parallel.expert=2"]],
                         ids=["tp2_sp", "tp2_sp_compiled", "tp2_sp_cudagraphs", "tp2_sp_copy_engine", "dp2_distopt", "pp2", "cp2", "moe_ep2"])
def test_two_gpu_layouts_reproduce_one_gpu_curve_in_bf16(tmp_path, extra):
    # The reference is the same code path on one GPU (a compiled layout against the compiled model:
    # inductor's fused torch references round bf16 differently from the eager Triton kernels).
    # lr 1e-3, not 3e-3: at 3e-3 this small model on random tokens has loss spikes (grad norm up to
    # 18), and where a spike lands depends on bf16 rounding; correct layouts then drift 4% apart
    # (benchmarks/results/2026-11-27-h100x2-session3-small-curves-lr3e-3.txt; command in benchmarks/README.md).
    calm = ["train.lr=1e-3"]
    same_model = [e for e in extra if e.startswith(("compile=", "model."))]  # the layout is what differs
    ref = [r["loss"] for r in _train(tmp_path, "ref", calm + same_model)]
    got = [r["loss"] for r in _train(tmp_path, "two", calm + extra, nproc=2)]
    # bf16 activations, fp32 master weights: reduction order differs between layouts.
    worst = max(abs(a - b) / b for a, b in zip(got, ref))
    print(f"{extra}: max relative loss difference over {len(ref)} steps {worst:.2e}")
    assert len(got) == len(ref) == 30 and worst < 2e-2, (got, ref)
