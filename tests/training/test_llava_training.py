"""``megacore train`` with a LLaVA model (``vision.enabled``) on CPU, from configs/llava_tiny_cpu.yaml:
the loss falls on the synthetic image-text data, DP2 (with the distributed optimizer) reproduces the
single-process curve, so do FSDP2 over 2 ranks, PP2 (the vision tower on the first stage) and TP2 with sequence parallelism (the language model split, the vision
tower replicated), a resumed run continues the uninterrupted one exactly, and the settings this
version cannot run are refused with errors that name the keys."""

from __future__ import annotations

import pytest

from megacore.config import ConfigError
from megacore.config.loading import load_run_config
from megacore.data.mock import MockGPTDataset, MockImageTextDataset
from tests.training.test_train_cli import ROOT, _env, losses, read_metrics, run_cli

CONFIG = "configs/llava_tiny_cpu.yaml"
SHORT = ["train.iters=20", "train.eval_interval=0", "log.interval=1"]


def _train(tmp_path, name, extra, nproc=1):
    log_dir = str(tmp_path / name)
    args = ["train", CONFIG, *SHORT, *extra, f"log.dir={log_dir}"] + (["--nproc", str(nproc)] if nproc > 1 else [])
    out = run_cli(args, _env(str(tmp_path / "cache")))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return log_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("llava"), "single", [])


def test_llava_training_learns(reference):
    records = [r for r in read_metrics(reference) if "loss" in r]
    assert len(records) == 20
    assert records[-1]["loss"] < records[0]["loss"] - 0.3, records


@pytest.mark.parametrize("name,extra", [("dp2_distopt", ["parallel.distributed_optimizer=true"]),
                                        ("dp2_fsdp", ["parallel.fsdp=true"]),
                                        ("pp2", ["parallel.pipeline=2"]),
                                        ("tp2_sp", ["parallel.tensor=2", "parallel.sequence_parallel=true"])])
def test_layouts_reproduce_single_process_curve(tmp_path, reference, name, extra):
    got, want = losses(_train(tmp_path, name, extra, nproc=2)), losses(reference)
    assert len(got) == len(want) == 20
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    assert worst < 1e-4, (name, worst, got, want)


def test_resume_continues_the_run_exactly(tmp_path, reference):
    ckpt = str(tmp_path / "ckpt")
    full = _train(tmp_path, "full", [f"checkpoint.dir={ckpt}", "checkpoint.interval=10"])
    assert losses(full) == losses(reference)  # saving changes nothing
    resumed = _train(tmp_path, "resumed", [f"checkpoint.load={ckpt}/iter_0000010"])
    assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == list(range(11, 21))
    assert losses(resumed) == losses(reference)[10:]


def test_pp2_checkpoint_resumes_on_one_process(tmp_path, reference):
    """Saved at PP2 (the tower and the first layer on stage 0, the rest on stage 1 under LLaVA's
    names), resumed on one process: steps 11-20 follow the single-process curve."""
    ckpt = str(tmp_path / "ckpt")
    _train(tmp_path, "pp2", ["parallel.pipeline=2", f"checkpoint.dir={ckpt}", "checkpoint.interval=10"], nproc=2)
    resumed = _train(tmp_path, "resumed", [f"checkpoint.load={ckpt}/iter_0000010"])
    got, want = losses(resumed), losses(reference)[10:]
    assert len(got) == 10 and max(abs(a - b) / abs(b) for a, b in zip(got, want)) < 1e-4, (got, want)


@pytest.mark.parametrize("extra, words", [
    (["parallel.context=2"], "parallel.context=2"),
    (["data.source=default"], "data.source"),
    (["vision.image_token_id=null"], "vision.image_token_id"),
    (["vision.image_token_id=256"], "vision.image_token_id"),
    (["model.position_embedding=learned"], "model.position_embedding"),
    (["vision.image_size=30"], "vision.image_size"),
    (["precision.fp8=tensorwise"], "precision.fp8"),
])
def test_unsupported_settings_are_refused(extra, words):
    cfg = load_run_config(f"{ROOT}/{CONFIG}", extra)
    with pytest.raises(ConfigError, match=words):
        cfg.validate(world_size=2)


def test_mock_images_carry_the_first_text_token():
    text = MockGPTDataset(vocab_size=256, seq_length=32, num_samples=4, seed=3)
    data = MockImageTextDataset(text, image_token_id=254, image_seq_length=9, image_shape=(3, 8, 8), seed=3)
    for i in range(4):
        s = data[i]
        assert (s["tokens"][:9] == 254).all() and (s["tokens"][9:] != 254).all()
        assert (s["loss_mask"][:8] == 0).all() and (s["loss_mask"][8:] == 1).all()
        # channel 0 is brighter by (first text token % 8) / 4 than noise of mean 0
        assert abs(s["pixel_values"][0].mean() - (int(s["labels"][8]) % 8) / 4) < 0.5
    with pytest.raises(ValueError, match="no text"):
        MockImageTextDataset(text, 254, 32, (3, 8, 8))
