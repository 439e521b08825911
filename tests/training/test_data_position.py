"""The data position survives a resume with another ``train.global_batch_size``: the sample stream
continues at the checkpoint's ``consumed_samples`` -- no sample skipped, none repeated."""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.ffn_hidden_size=64",
        "model.seq_length=16", "model.vocab_size=128", "data.source=mock", "train.warmup_iters=0",
        "train.eval_interval=0", "log.interval=100"]


class Recorder:
    """A dataset that remembers which global sample indices were read, in order."""

    def __init__(self, dataset):
        self.dataset, self.read = dataset, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        self.read.append(int(idx))
        return self.dataset[idx]


def _run(tmp_path, global_batch: int, iters: int) -> tuple[list[int], list[dict]]:
    """Train (resuming from tmp_path/ckpt when it holds a checkpoint) and return the training sample
    indices read by this run and the run's metrics records."""
    from megacore.config import load_run_config
    from megacore.training.trainer import Trainer

    cfg = load_run_config(os.path.join(ROOT, "configs/tiny_cpu.yaml"), [
        *TINY, f"train.global_batch_size={global_batch}", "train.micro_batch_size=2", f"train.iters={iters}",
        f"checkpoint.dir={tmp_path / 'ckpt'}", f"log.dir={tmp_path / 'log'}"])
    t = Trainer(cfg)
    real_loop, recorders = t._loop, []

    def loop():
        recorders.append(Recorder(t.data.train_ds))
        t.data.train_ds = recorders[-1]
        return real_loop()

    t._loop = loop
    t.run()
    with open(tmp_path / "log" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return recorders[0].read, records


def test_resume_with_another_global_batch_size_continues_at_consumed_samples(tmp_path):
    """4 steps of 8 samples read samples 0..31; resumed with batches of 4 (the data set, sized for
    8 steps of 4 = 32 samples before the checkpoint was read, must grow), steps 5-8 read 32..47;
    resumed again with batches of 8, steps 9-10 read 48..63: every sample exactly once, in order.
    metrics.jsonl counts the samples consumed after each step."""
    read, _ = _run(tmp_path, global_batch=8, iters=4)
    assert read == list(range(32))
    read, records = _run(tmp_path, global_batch=4, iters=8)
    assert read == list(range(32, 48))
    assert [(r["step"], r["consumed_samples"]) for r in records][-4:] == [(5, 36), (6, 40), (7, 44), (8, 48)]
    read, records = _run(tmp_path, global_batch=8, iters=10)
    assert read == list(range(48, 64))
    assert [r["consumed_samples"] for r in records][-2:] == [56, 64]
