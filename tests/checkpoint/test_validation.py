"""Single-process save/load: exact round trip, async snapshot semantics, commit/retention rules, and
a clear error (with nothing modified) for every kind of bad checkpoint."""

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open

from megacore.checkpoint import (CheckpointError, list_checkpoints, load_checkpoint, prune, resolve_load_path,
                                 save_checkpoint)
from megacore.models.gpt import GPTModel
from tests.checkpoint.layouts import tiny_config


def _model_and_opt(seed=0, **cfg_kw):
    cfg = tiny_config(num_layers=2, **cfg_kw)
    model = GPTModel(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():  # optimizer state without running a step (and without importing dynamo)
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
    return model, opt


def _snapshot(model, opt):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()})


def _assert_same(model, opt, snap):
    params, states = snap
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
        for k, v in states[n].items():
            assert torch.equal(opt.state[p][k], v), (n, k)


def test_round_trip_is_exact_and_files_are_plain_safetensors(tmp_path):
    model, opt = _model_and_opt(0)
    want = _snapshot(model, opt)
    h = save_checkpoint(str(tmp_path), 5, model, opt, scheduler_state={"step": 5}, extra={"consumed_samples": 40})
    assert h.path == str(tmp_path / "iter_0000005") and open(tmp_path / "latest").read().strip() == "iter_0000005"
    with safe_open(str(tmp_path / "iter_0000005" / "rank_00000.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("model/decoder.final_norm.weight@0"), model.decoder.final_norm.weight)
    fresh = GPTModel(model.config, seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)  # no state yet: created by the load
    res = load_checkpoint(str(tmp_path), fresh, fresh_opt)
    assert (res.step, res.extra, res.scheduler_state, res.rng_restored) == (5, {"consumed_samples": 40}, {"step": 5}, True)
    _assert_same(fresh, fresh_opt, want)


def test_async_save_snapshots_before_training_continues(tmp_path, monkeypatch):
    import megacore.checkpoint.serialize as ser

    model, opt = _model_and_opt(0)
    want = _snapshot(model, opt)
    real = ser._write_chunk
    monkeypatch.setattr(ser, "_write_chunk", lambda f, h, d: (__import__("time").sleep(0.002), real(f, h, d)))
    h = save_checkpoint(str(tmp_path), 1, model, opt, async_save=True)
    with torch.no_grad():  # "training" mutates everything while the writer runs
        for p in model.parameters():
            p.add_(1.0)
            opt.state[p]["exp_avg"].mul_(0)
    from megacore.checkpoint import poll_pending
    if not h.local_done():  # still writing: polling commits nothing and does not block
        assert poll_pending() is None and not (tmp_path / "latest").exists()
    while not h.local_done():
        __import__("time").sleep(0.01)
    assert poll_pending() == str(tmp_path / "iter_0000001") and (tmp_path / "latest").exists()
    assert h.wait() == str(tmp_path / "iter_0000001")
    assert 0 < h.stall_s and h.write_s > 0
    fresh = GPTModel(model.config, seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    load_checkpoint(str(tmp_path), fresh, fresh_opt)
    _assert_same(fresh, fresh_opt, want)


def test_next_save_waits_for_the_pending_one_and_retention_keeps_latest(tmp_path):
    model, opt = _model_and_opt(0)
    for step in range(1, 5):
        save_checkpoint(str(tmp_path), step, model, opt, async_save=True, keep_last=2)
    from megacore.checkpoint import wait_for_pending
    wait_for_pending()
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [3, 4]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "iter_0000004", "latest"]
    (tmp_path / "latest").write_text("iter_0000003\n")  # latest names the older one: pruning must keep it
    save_checkpoint(str(tmp_path), 6, model, opt, keep_last=3)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [3, 4, 6]
    (tmp_path / "latest").write_text("iter_0000003\n")
    prune(str(tmp_path), 1)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [3, 6]


def test_config_mismatch_names_the_fields(tmp_path):
    model, opt = _model_and_opt(0)
    save_checkpoint(str(tmp_path), 1, model, opt)
    other = GPTModel(tiny_config(num_layers=2, hidden_size=64, ffn_hidden_size=96), seed=0)
    with pytest.raises(CheckpointError, match=r"hidden_size: checkpoint 32, model 64.*ffn_hidden_size|ffn_hidden_size.*hidden_size"):
        load_checkpoint(str(tmp_path), other)
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attention\.linear_qkv\.weight: checkpoint \(48, 32\), model \(96, 64\)"):
        load_checkpoint(str(tmp_path), other, check_config=False)


def test_missing_and_unexpected_keys(tmp_path):
    small, opt = _model_and_opt(0)
    save_checkpoint(str(tmp_path / "small"), 1, small, opt)
    big = GPTModel(tiny_config(num_layers=3), seed=0)
    with pytest.raises(CheckpointError, match=r"num_layers: checkpoint 2, model 3"):
        load_checkpoint(str(tmp_path / "small"), big)
    with pytest.raises(CheckpointError, match=r"lacks 6 tensor\(s\) this model needs: model/decoder\.layers\.2\."):
        load_checkpoint(str(tmp_path / "small"), big, check_config=False)
    save_checkpoint(str(tmp_path / "big"), 1, big)
    with pytest.raises(CheckpointError, match=r"no rank of this model has: model/decoder\.layers\.2\."):
        load_checkpoint(str(tmp_path / "big"), small, check_config=False)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(str(tmp_path / "big"), big, torch.optim.AdamW(big.parameters()))
    # strict=False keeps the missing layer's current values and loads the rest
    before = big.decoder.layers["2"].mlp.linear_fc1.weight.detach().clone()
    load_checkpoint(str(tmp_path / "small"), big, check_config=False, strict=False)
    assert torch.equal(big.decoder.layers["2"].mlp.linear_fc1.weight, before)
    assert torch.equal(big.decoder.layers["1"].mlp.linear_fc1.weight, small.decoder.layers["1"].mlp.linear_fc1.weight)


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_file_is_reported_and_nothing_is_overwritten(tmp_path, damage):
    model, opt = _model_and_opt(0)
    save_checkpoint(str(tmp_path), 1, model, opt)
    path = tmp_path / "iter_0000001" / "rank_00000.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "corrupt":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) - 100]
    path.write_bytes(bytes(data))
    target, target_opt = _model_and_opt(7)
    want = _snapshot(target, target_opt)
    listing = sorted(os.listdir(tmp_path / "iter_0000001"))
    latest = (tmp_path / "latest").read_text()
    with pytest.raises(CheckpointError, match="corrupted" if damage == "corrupt" else "truncated"):
        load_checkpoint(str(tmp_path), target, target_opt)
    _assert_same(target, target_opt, want)
    assert sorted(os.listdir(tmp_path / "iter_0000001")) == listing and (tmp_path / "latest").read_text() == latest


def test_incomplete_checkpoint_is_refused(tmp_path):
    model, opt = _model_and_opt(0)
    save_checkpoint(str(tmp_path), 1, model, opt)
    os.remove(tmp_path / "iter_0000001" / "COMPLETE")
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        resolve_load_path(str(tmp_path), "iter_0000001")
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        load_checkpoint(str(tmp_path), model, opt)
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        load_checkpoint(str(tmp_path / "iter_0000001"), model, opt)
    assert resolve_load_path(str(tmp_path / "empty")) is None


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, opt = _model_and_opt(0)
    save_checkpoint(str(tmp_path), 1, model, opt, extra={"betas": (0.9, 0.95)})

    def forbidden(*a, **k):
        raise AssertionError("checkpoint loading must not unpickle")
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    fresh = GPTModel(model.config, seed=3)
    res = load_checkpoint(str(tmp_path), fresh, torch.optim.AdamW(fresh.parameters()))
    assert res.extra == {"betas": (0.9, 0.95)}
    index = json.loads((tmp_path / "iter_0000001" / "index.json").read_text())
    assert set(index["files"]) == {"rank_00000.safetensors", "rank_00000.json"}  # every file a load reads
    assert all(len(digest["sha256"]) == 64 for digest in index["files"].values())
