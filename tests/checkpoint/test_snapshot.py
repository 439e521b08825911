"""The snapshot stage of a save: buffers packed into power-of-two slabs, reused across saves (nothing
allocated from the second save on), never overwritten while a writer still reads them, and the
values each checkpoint holds are those of its own step. The pool logic runs here with pageable
slabs (``PinnedPool(pin=False)``); the GPU tests check the pinned path itself."""

import threading
import time

import pytest
import torch

import megacore.checkpoint.snapshot as snap
from megacore.checkpoint import load_checkpoint, save_checkpoint, wait_for_pending
from megacore.checkpoint.save import prepare_snapshot_buffers
from megacore.checkpoint.snapshot import ALIGN, PinnedPool, take_snapshot
from megacore.models.gpt import GPTModel
from tests.checkpoint.layouts import tiny_config


def _items():
    base = torch.randn(40, 30)
    return [("a", torch.randn(7, 5)), ("b", torch.randn(()).double()), ("c", torch.zeros(0, 3)),
            ("d", base[:, 3:17]),  # non-contiguous view
            ("e", torch.rand(100) > 0.5), ("f", torch.randn(33, 3).to(torch.bfloat16)),
            ("g", torch.randn(600))]  # 2400 bytes: larger than the 1 KiB slabs below


def _slab_of(pool, buf):
    for slab, _ in pool.slabs:
        lo = slab.data_ptr()
        if lo <= buf.data_ptr() < lo + slab.numel():
            return slab
    return None


def test_pool_packs_buffers_into_pow2_slabs_and_reuses_them():
    pool = PinnedPool(slab_bytes=1024, pin=False)
    items = _items()
    out, stats = take_snapshot(items, True, pool, use_pool=True)
    for (_, t), o in zip(items, out):
        assert o.dtype == t.dtype and o.shape == t.shape and torch.equal(o, t) and o.is_contiguous()
    assert stats.pooled and stats.bytes == sum(t.numel() * t.element_size() for _, t in items)
    sizes = [s.numel() for s, _ in pool.slabs]
    assert all(n & (n - 1) == 0 for n in sizes) and stats.alloc_bytes == sum(sizes)
    assert 4096 in sizes and len(sizes) <= 3  # "g" gets a slab of its own size (rounded); the rest share
    for o in out:
        if o.numel():
            slab = _slab_of(pool, o)
            assert slab is not None and (o.data_ptr() - slab.data_ptr()) % ALIGN == 0
    # second snapshot of the same pieces: same buffers, nothing allocated, new values
    with torch.no_grad():
        for _, t in items:
            if t.dtype != torch.bool:
                t.add_(1)
    ptrs = [o.data_ptr() for o in out]
    out2, stats2 = take_snapshot(items, True, pool, use_pool=True)
    assert stats2.alloc_bytes == 0 and [o.data_ptr() for o in out2] == ptrs
    assert all(torch.equal(o, t) for (_, t), o in zip(items, out2))
    # other pieces: start over (the old slabs go back to the allocator)
    changed = items[:3] + [("h", torch.randn(9, 9))]
    out3, stats3 = take_snapshot(changed, True, pool, use_pool=True)
    assert stats3.alloc_bytes > 0 and set(pool.buffers) == {(n, tuple(t.shape), t.dtype) for n, t in changed}
    assert all(torch.equal(o, t) for (_, t), o in zip(changed, out3))


def test_small_saves_get_small_slabs():
    pool = PinnedPool(pin=False)  # default 256 MiB slabs: a few KiB of pieces must not take one
    _, stats = take_snapshot(_items(), True, pool, use_pool=True)
    assert stats.alloc_bytes <= 8192


def test_pool_waits_for_the_reader_before_reusing_buffers():
    pool = PinnedPool(pin=False)
    src = torch.arange(1000.0)
    (buf,), _ = take_snapshot([("x", src)], True, pool, use_pool=True)
    seen = []

    def reader():  # a slow background writer still reading the buffer
        time.sleep(0.3)
        seen.append(buf.clone())

    thread = threading.Thread(target=reader)
    thread.start()
    pool.reader = thread
    src.add_(1)
    (buf2,), _ = take_snapshot([("x", src)], True, pool, use_pool=True)
    assert buf2.data_ptr() == buf.data_ptr() and not thread.is_alive()
    assert torch.equal(seen[0], torch.arange(1000.0))  # the reader saw the old snapshot, whole
    assert torch.equal(buf2, src)


def test_cpu_snapshot_is_a_clone_without_the_pool():
    items = _items()
    out, stats = take_snapshot(items, True)
    assert not stats.pooled and stats.alloc_bytes == 0
    assert all(torch.equal(o, t) and o.data_ptr() != t.data_ptr() for (_, t), o in zip(items, out) if t.numel())


@pytest.fixture
def pooled_on_cpu(monkeypatch):
    """Route CPU saves through a (pageable) pool, as GPU saves are."""
    pool = PinnedPool(pin=False)
    monkeypatch.setattr(snap, "_POOL", pool)
    monkeypatch.setattr(snap, "uses_pool", lambda items: True)
    return pool


def _model_and_opt():
    model = GPTModel(tiny_config(num_layers=2), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
    return model, opt


def test_async_saves_reuse_buffers_and_each_holds_its_own_step(tmp_path, monkeypatch, pooled_on_cpu):
    import megacore.checkpoint.serialize as ser

    real = ser._write_chunk
    monkeypatch.setattr(ser, "_write_chunk", lambda f, h, d: (time.sleep(0.01), real(f, h, d)))
    model, opt = _model_and_opt()
    expected, handles = {}, []
    for step in (1, 2, 3):
        expected[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        h = save_checkpoint(str(tmp_path), step, model, opt, async_save=True)
        handles.append(h)
        assert pooled_on_cpu.reader is h._thread
        with torch.no_grad():  # training goes on while the writer still reads the buffers
            for p in model.parameters():
                p.mul_(-1.5).add_(0.25)
    wait_for_pending()
    nbytes = handles[0].snapshot_bytes
    assert handles[0].alloc_bytes > 0 and nbytes > 0
    assert all(h.alloc_bytes == 0 and h.snapshot_bytes == nbytes for h in handles[1:])
    assert all(0 < h.snapshot_s <= h.stall_s for h in handles)
    for step in (1, 2, 3):
        fresh = GPTModel(model.config, seed=5)
        load_checkpoint(str(tmp_path / f"iter_{step:07d}"), fresh)
        for n, p in fresh.named_parameters():
            assert torch.equal(p, expected[step][n]), (step, n)


def test_prepare_reserves_the_buffers_of_the_next_save(tmp_path, pooled_on_cpu):
    model, opt = _model_and_opt()
    stats = prepare_snapshot_buffers(model, opt)
    assert stats.alloc_bytes > 0 and stats.alloc_bytes == pooled_on_cpu.reserved_bytes
    h = save_checkpoint(str(tmp_path), 1, model, opt, async_save=True)
    h.wait()
    assert h.alloc_bytes == 0 and h.snapshot_bytes > 0


def test_prepare_is_a_no_op_without_cuda_tensors():
    model, opt = _model_and_opt()
    assert prepare_snapshot_buffers(model, opt) is None


@pytest.mark.gpu
def test_gpu_snapshot_is_pinned_reused_and_exact(tmp_path):
    wait_for_pending()
    snap.default_pool().reset()  # earlier tests in this process may have filled the shared pool
    model = GPTModel(tiny_config(num_layers=2), seed=0).cuda().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handles, want = [], []
    for step in (1, 2):
        want.append({n: p.detach().cpu().clone() for n, p in model.named_parameters()})
        h = save_checkpoint(str(tmp_path), step, model, opt, async_save=True)
        handles.append(h)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    wait_for_pending()
    assert handles[0].alloc_bytes > 0 and handles[1].alloc_bytes == 0
    assert all(h.d2h_s is not None and h.snapshot_bytes > 0 for h in handles)
    pool = snap.default_pool()
    assert pool.buffers and all(b.is_pinned() for b in pool.buffers.values() if b.numel())
    for step, expect in zip((1, 2), want):
        cpu = GPTModel(model.config, seed=3).to(torch.bfloat16)
        load_checkpoint(str(tmp_path / f"iter_{step:07d}"), cpu)
        for n, p in cpu.named_parameters():
            assert torch.equal(p, expect[n]), (step, n)


@pytest.mark.gpu
def test_manager_resume_reserves_buffers_so_the_first_save_allocates_nothing(tmp_path):
    from megacore.checkpoint import CheckpointManager
    from megacore.config import CheckpointConfig

    model = GPTModel(tiny_config(num_layers=2, hidden_size=48, ffn_hidden_size=80), seed=0).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.ones_like(p)}
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path), interval=1, async_save=True))
    assert manager.resume(model, opt) is None
    h = manager.save(1, model, opt)
    manager.finish(1, model, opt)
    assert h.alloc_bytes == 0 and h.snapshot_bytes > 0 and h.path == str(tmp_path / "iter_0000001")


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning succeeds here; this checks the fallback")
def test_pinning_failure_falls_back_to_pageable_buffers_with_a_warning():
    pool = PinnedPool()
    items = _items()
    with pytest.warns(RuntimeWarning, match="pinned host memory"):
        out, stats = take_snapshot(items, True, pool, use_pool=True)
    assert not stats.pinned and stats.alloc_bytes == 0 and not pool.slabs
    assert all(torch.equal(o, t) for (_, t), o in zip(items, out))
    out2, _ = take_snapshot(items, True, pool, use_pool=True)  # reused, no second warning needed
    assert [o.data_ptr() for o in out2] == [o.data_ptr() for o in out]
