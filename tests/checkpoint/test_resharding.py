"""Save at one parallel layout, load at another: every parameter and optimizer tensor must equal the
single-device reference (a full model trained with plain AdamW) sliced the way the loading layout
holds it. Layouts are built by tests/checkpoint/layouts.py (TP shards with ParamMeta.shard_fn,
pipeline stages with global layer names, virtual chunks, ZeRO-1 flat optimizer shards)."""

import os

import torch

from megacore.checkpoint import load_checkpoint, resolve_load_path, save_checkpoint
from megacore.sharding import peek_meta
from tests.checkpoint.layouts import FlatShardedState, Layout, local_model, local_shard, reference_state, tiny_config
from tests.dist.harness import run_distributed

PAIRS = [  # (save layout, load layout) on 4 ranks
    ("tp2pp2", Layout(tp=2, pp=2), Layout()),                                        # TP2xPP2 -> TP1xPP1 (DP4)
    ("dp4_zero1", Layout(flat_optimizer=True), Layout(tp=2, pp=2)),                   # DP4 + ZeRO-1 -> TP2xPP2
    ("tp4_kv_replicated", Layout(tp=4), Layout(tp=2, flat_optimizer=True)),           # TP4 -> TP2xDP2 + ZeRO-1
    ("pp2_vpp2_dp2", Layout(pp=2, vpp=2), Layout(tp=4)),                             # virtual PP -> TP4
    ("tp2_dp2_zero1", Layout(tp=2, flat_optimizer=True), Layout(pp=2, vpp=2, flat_optimizer=True)),
]


def _build(cfg, full, states, layout, rank, world, fill=None):
    chunks = local_model(cfg, full, layout, rank, world, fill=fill)
    named = []
    for c in chunks:
        for n, p in c.named_parameters():
            named.append(((peek_meta(p).global_name or n), p))
    params = [p for _, p in named]
    if layout.flat_optimizer:
        _, dp_rank, _, dp = layout.coords(rank, world)
        opt = FlatShardedState(params, dp_rank, dp)
        if fill is None:
            opt.fill_from({id(p): p.detach() for p in params},
                          {id(p): {s: local_shard(cfg, layout, rank, world, g, states[g][s]) for s in ("exp_avg", "exp_avg_sq")}
                           for g, p in named})
            opt.step = 2
    else:
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        if fill is None:
            for g, p in named:
                opt.state[p] = {"step": states[g]["step"].clone(),
                                **{s: local_shard(cfg, layout, rank, world, g, states[g][s]).clone()
                                   for s in ("exp_avg", "exp_avg_sq")}}
    return chunks, named, opt


def _check(cfg, full, states, layout, rank, world, named, opt) -> int:
    compared = 0
    for g, p in named:
        want = local_shard(cfg, layout, rank, world, g, full[g])
        assert torch.equal(p.detach(), want), f"{layout}: param {g} differs on rank {rank}"
        compared += 1
    if layout.flat_optimizer:
        expected = FlatShardedState(opt.params, *layout.coords(rank, world)[1:4:2])
        expected.fill_from({id(p): p.detach() for _, p in named},
                           {id(p): {s: local_shard(cfg, layout, rank, world, g, states[g][s]) for s in ("exp_avg", "exp_avg_sq")}
                            for g, p in named})
        for s in FlatShardedState.STATES:
            assert torch.equal(opt.buffers[s], expected.buffers[s]), f"{layout}: flat {s} differs on rank {rank}"
            compared += 1
        assert opt.step == 2
    else:
        for g, p in named:
            st = opt.state[p]
            assert float(st["step"]) == 2.0
            for s in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[s], local_shard(cfg, layout, rank, world, g, states[g][s])), \
                    f"{layout}: {s} of {g} differs on rank {rank}"
                compared += 1
    return compared


def _reshard_cases(rank, world, root, full, states):
    cfg = tiny_config()
    compared = {}
    for i, (name, save_layout, load_layout) in enumerate(PAIRS):
        directory = os.path.join(root, name)
        chunks, _, opt = _build(cfg, full, states, save_layout, rank, world)
        handle = save_checkpoint(directory, 2, chunks, opt, scheduler_state={"step": 2}, extra={"consumed_samples": 8},
                                 async_save=i % 2 == 1)
        handle.wait()
        chunks, named, opt = _build(cfg, full, states, load_layout, rank, world, fill=0.0)
        result = load_checkpoint(directory, chunks, opt)
        assert result.step == 2 and result.extra == {"consumed_samples": 8} and result.scheduler_state == {"step": 2}
        compared[name] = _check(cfg, full, states, load_layout, rank, world, named, opt)
    return compared


def test_save_one_layout_load_another(tmp_path):
    cfg = tiny_config()
    full, states = reference_state(cfg)  # computed once here: workers then never import torch._dynamo
    results = run_distributed(_reshard_cases, world_size=4, args=(str(tmp_path), full, states))
    for per_rank in results:
        assert set(per_rank) == {p[0] for p in PAIRS} and all(n > 0 for n in per_rank.values())
    # A different world size: the TP2xPP2 checkpoint (4 ranks) loads into one full model in this process.
    chunks, named, opt = _build(cfg, full, states, Layout(), 0, 1, fill=0.0)
    result = load_checkpoint(resolve_load_path(str(tmp_path / "tp2pp2")), chunks, opt)
    assert not result.rng_restored and "world size" in result.rng_note
    _check(cfg, full, states, Layout(), 0, 1, named, opt)
