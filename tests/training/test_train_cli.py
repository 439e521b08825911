"""``megacore train`` end to end on CPU: from ``megacore preprocess`` output, in every parallel layout
(reference: the single-process run of the same seed and data), stop/resume, and clear failures.

Each run is a real subprocess (``python -m megacore train ... --nproc N``: torchrun + gloo), so these
tests cover exactly what a user runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A 2-layer GQA model, 2 micro-batches per step on one rank, 20 steps.
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=128", "model.seq_length=64", "train.global_batch_size=8",
         "train.micro_batch_size=4", "train.iters=20", "train.warmup_iters=4", "train.lr=3e-3",
         "train.eval_interval=0", "log.interval=5"]


def _env(tmp_cache: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, MEGACORE_CACHE=tmp_cache)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_cli(args: list[str], env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megacore", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def train_tiny(tmp_path, name: str, overrides: list[str], nproc: int = 1) -> str:
    """``megacore train configs/tiny_cpu.yaml <overrides>`` logging to ``tmp_path/name`` (with
    ``--nproc`` when > 1); asserts it succeeded and returns the log directory."""
    log_dir = str(tmp_path / name)
    args = ["train", "configs/tiny_cpu.yaml", *overrides, f"log.dir={log_dir}"]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    out = run_cli(args, _env(str(tmp_path / "cache")))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return log_dir


def read_metrics(log_dir) -> list[dict]:
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(log_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(log_dir) if "loss" in r]


def grad_norms(log_dir) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(log_dir) if "loss" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Real text (stdlib docstrings) -> ``megacore preprocess`` with a BPE trained on the fly."""
    from megacore.data.corpus import default_corpus

    root = tmp_path_factory.mktemp("cli")
    cache = str(root / "cache")
    docs = default_corpus()[:300]
    src = root / "docs.jsonl"
    with open(src, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    prefix = str(root / "data" / "docs")
    env = _env(cache)
    out = run_cli(["preprocess", "--input", str(src), "--output-prefix", prefix, "--tokenizer", "bpe",
                   "--vocab-size", "512", "--workers", "2", "--append-eod"], env)
    assert out.returncode == 0, out.stderr
    assert os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")
    return {"root": root, "env": env, "data": ["data.source=indexed", f"data.paths=[{prefix}]"]}


def train(data, name: str, extra: list[str], nproc: int = 1, iters: int | None = None) -> str:
    log_dir = str(data["root"] / name)
    args = ["train", "configs/tiny_cpu.yaml", *SMALL, *data["data"], f"log.dir={log_dir}", *extra]
    if iters is not None:
        args.append(f"train.iters={iters}")
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    out = run_cli(args, data["env"])
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.splitlines() if not ln.startswith(("W1", "I1"))]
        pytest.fail(f"{name} failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n" + "\n".join(lines[:60]))
    return log_dir


@pytest.fixture(scope="module")
def reference(data):
    return train(data, "single", [])


def test_trains_end_to_end_from_preprocess_output(reference):
    records = read_metrics(reference)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_s"):
        assert all(key in r for r in steps), key
    # Queueing a step is part of the step's wall time (on CPU the host computes it all).
    assert all(0 < r["host_queue_s"] <= r["step_time_s"] for r in steps), steps
    first, last = steps[0]["loss"], steps[-1]["loss"]
    assert first > 5.5  # ~ln(512) at init
    assert last < first - 0.7, (first, last)


# (name, overrides, processes). Tolerance: fp32 with different reduction orders over 20 Adam steps.
# SMALL has 2 KV groups: tensor=4 holds each group's k/v rows on 2 ranks (the grad norm must count
# them once).
LAYOUTS = [
    ("tp2_sp", ["parallel.tensor=2", "parallel.sequence_parallel=true"], 2),
    ("tp4_kv_replicated", ["parallel.tensor=4"], 4),
    ("tp2_sp_copy_engine", ["parallel.tensor=2", "parallel.sequence_parallel=true",
                            "parallel.tp_comm_overlap=copy_engine"], 2),
    ("dp2_distopt", ["parallel.distributed_optimizer=true"], 2),
    ("pp2", ["parallel.pipeline=2"], 2),
    ("dp2_fsdp", ["parallel.fsdp=true"], 2),
    ("cp2", ["parallel.context=2"], 2),
]


@pytest.mark.parametrize("name,overrides,nproc", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layout_reproduces_single_process_loss_curve(data, reference, name, overrides, nproc):
    """The loss and the global grad norm (each unique gradient element counted once, whatever the
    layout) of every step equal the single-process run's, both within 1e-4 relative: fp32 with other
    reduction orders (a double-counted part of the gradient moves the norm by ~1e-2)."""
    log = train(data, name, overrides, nproc)
    got, want = losses(log), losses(reference)
    assert len(got) == len(want) == 20
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    got_norms, want_norms = grad_norms(log), grad_norms(reference)
    worst_norm = max(abs(a - b) / b for a, b in zip(got_norms, want_norms))
    assert worst < 1e-4, (name, worst, got, want)
    assert worst_norm < 1e-4, (name, worst_norm, got_norms, want_norms)


def test_resume_reproduces_uninterrupted_run_exactly(data, reference):
    """Checkpoint every 5 steps, then resume from step 10 in a fresh run: steps 11..20 are identical
    (model, optimizer, data position, RNG) to the uninterrupted run."""
    ckpt = str(data["root"] / "ckpt_single")
    full = train(data, "ckpt_full", [f"checkpoint.dir={ckpt}", "checkpoint.interval=5", "checkpoint.keep_last=5"])
    assert losses(full) == losses(reference)  # saving changes nothing
    resumed = train(data, "ckpt_resumed", [f"checkpoint.load={ckpt}/iter_0000010"])
    records = read_metrics(resumed)
    assert [r["step"] for r in records] == list(range(11, 21))
    assert [r["loss"] for r in records] == losses(reference)[10:]


def test_resume_at_another_layout(data, reference):
    """A single-process checkpoint resumes at TP2 x DP... here TP=2 with the distributed optimizer
    off, and DP=2 with it on: the curve continues within fp32 reduction-order tolerance."""
    ckpt = str(data["root"] / "ckpt_single")
    if not os.path.isdir(ckpt):
        train(data, "ckpt_full2", [f"checkpoint.dir={ckpt}", "checkpoint.interval=5", "checkpoint.keep_last=5"])
    for name, extra in (("resume_tp2", ["parallel.tensor=2"]),
                        ("resume_dp2_distopt", ["parallel.distributed_optimizer=true"])):
        log = train(data, name, [f"checkpoint.load={ckpt}/iter_0000015", *extra], nproc=2)
        got = losses(log)
        want = losses(reference)[15:]
        assert len(got) == 5
        assert max(abs(a - b) / b for a, b in zip(got, want)) < 1e-4, (name, got, want)


def test_sigterm_saves_a_final_checkpoint_and_exits_cleanly(data):
    log_dir = str(data["root"] / "sigterm")
    ckpt = str(data["root"] / "ckpt_sigterm")
    args = [sys.executable, "-m", "megacore", "train", "configs/tiny_cpu.yaml", *SMALL, *data["data"],
            f"log.dir={log_dir}", f"checkpoint.dir={ckpt}", "train.iters=100000", "log.interval=1"]
    proc = subprocess.Popen(args, cwd=ROOT, env=data["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        path = os.path.join(log_dir, "metrics.jsonl")
        while time.time() < deadline:
            if os.path.exists(path) and len(read_metrics(log_dir)) >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopping cleanly" in out
    last = read_metrics(log_dir)[-1]["step"]
    with open(os.path.join(ckpt, "latest")) as f:
        assert f.read().strip() == f"iter_{last:07d}"


def test_unknown_key_is_a_clear_error(data):
    out = run_cli(["train", "configs/tiny_cpu.yaml", "train.itres=5"], data["env"])
    assert out.returncode == 2
    assert "train.itres" in out.stderr and "iters" in out.stderr


def test_unsupported_layout_is_a_clear_error(data):
    out = run_cli(["train", "configs/tiny_cpu.yaml", "parallel.expert=2"], data["env"])
    assert out.returncode == 2
    assert "parallel.expert=2" in out.stderr and "model.num_experts" in out.stderr  # no experts to split
    out = run_cli(["train", "configs/tiny_cpu.yaml", "model.num_experts=4", "parallel.tensor=2", "parallel.expert=2"],
                  data["env"])
    assert out.returncode == 2
    assert "parallel.expert=2" in out.stderr and "sequence_parallel=true" in out.stderr
    assert "Traceback" not in out.stderr


def test_non_finite_loss_stops_with_a_clear_message(monkeypatch, tmp_path):
    """The loop, not the model, is under test: a step that returns NaN stops training with advice."""
    from megacore.config import load_run_config
    from megacore.training import trainer as trainer_mod
    from megacore.training.contract import StepResult, TrainingError

    cfg = load_run_config(os.path.join(ROOT, "configs/tiny_cpu.yaml"),
                          [*SMALL, "data.source=mock", "model.vocab_size=256", f"log.dir={tmp_path}"])
    t = trainer_mod.Trainer(cfg)
    calls = []

    def fake_step(step):
        calls.append(step)
        return StepResult(loss=float("nan") if step == 2 else 5.0, grad_norm=1.0, tokens=10)

    monkeypatch.setattr(t, "train_step", fake_step)
    with pytest.raises(TrainingError, match="loss is nan at step 3.*lower train.lr"):
        t.run()
    assert calls == [0, 1, 2]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
