"""Resharding with megacore's own parallel code: megacore.parallel (TP layers, KV-head replication),
megacore.pipeline stages (global names, virtual chunks, tied embedding copy), DDP + the distributed
optimizer and the mixed-precision optimizer (fp32 masters of bf16 weights).

Reference: the single-device ``GPTModel(config, seed)`` and optimizer state drawn per global name,
each sliced by the loading parameter's own ``ParamMeta.shard``."""

import os
import zlib

import pytest
import torch

from megacore.checkpoint import load_checkpoint, save_checkpoint
from megacore.models.gpt import GPTModel
from megacore.sharding import peek_meta
from tests.checkpoint.layouts import tiny_config
from tests.dist.harness import run_distributed

parallel = pytest.importorskip("megacore.parallel", reason="needs megacore.parallel (TP layers)")
pytest.importorskip("megacore.pipeline.partition", reason="needs megacore.pipeline.partition (stages)")
pytest.importorskip("megacore.optim.distributed_optimizer", reason="needs megacore.distributed")

SEED = 5
# (name, save layout, load layout); layout = (tp, pp, vpp, optimizer, param dtype)
CASES = [
    ("tp2pp2_to_dp4_distopt", (2, 2, 1, "adamw", "fp32"), (1, 1, 1, "distopt", "fp32")),
    ("dp4_distopt_bf16_to_tp4", (1, 1, 1, "distopt", "bf16"), (4, 1, 1, "mixed", "fp32")),
    ("tp2dp2_mixed_bf16_to_pp2vpp2", (2, 1, 1, "mixed", "bf16"), (1, 2, 2, "adamw", "fp32")),
    ("pp2vpp2_to_tp2pp2_distopt_bf16", (1, 2, 2, "adamw", "fp32"), (2, 2, 1, "distopt", "bf16")),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ref_state(name: str, state: str, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{state}".encode()))
    t = torch.randn(tuple(shape), generator=gen)
    return t.abs() if state == "exp_avg_sq" else t


def _shard(p, full: torch.Tensor) -> torch.Tensor:
    return peek_meta(p).shard(full)


def _build(cfg, layout, seed):
    from megacore.distributed import DistributedDataParallel
    from megacore.optim import DistributedOptimizer
    from megacore.models.init import materialize
    from megacore.pipeline.partition import build_stage_modules
    from megacore.optim.optimizer import MixedPrecisionOptimizer

    tp, pp, vpp, kind, dtype = layout
    state = parallel.initialize(tensor=tp, pipeline=pp, virtual_pipeline=vpp if vpp > 1 else None)
    chunks = build_stage_modules(cfg, state.pp_rank, pp, vpp, seed=seed, materialize=False)
    for c in chunks:
        parallel.parallelize(c, state)
        materialize(c, cfg, seed, dtype=DTYPES[dtype])
    named = [((peek_meta(p).global_name or n), p) for c in chunks for n, p in c.named_parameters()]
    if kind == "adamw":
        return chunks, named, torch.optim.AdamW([p for _, p in named], lr=1e-3)
    assert len(chunks) == 1, "the mixed/distributed optimizers take one model chunk here"
    if kind == "mixed":
        return chunks, named, MixedPrecisionOptimizer(chunks[0], lr=1e-3)
    ddp = DistributedDataParallel(chunks[0], state.dp_group, bucket_size_mb=0.01, use_distributed_optimizer=True)
    return [ddp], named, DistributedOptimizer(ddp, lr=1e-3)


def _global_names(named):
    return {id(p): g for g, p in named}


def _fill_or_check(opt, named, ref, check: bool) -> int:
    """Set every optimizer tensor from the reference (or compare with it); returns the count."""
    names, count = _global_names(named), 0
    if hasattr(opt, "checkpoint_entries"):
        for e in opt.checkpoint_entries():
            g = names[id(e.param)]
            full = ref[g].float() if e.state_name == "master" else _ref_state(g, e.state_name, ref[g].shape)
            want = _shard(e.param, full).reshape(-1)[e.start:e.start + e.flat.numel()].to(e.flat.dtype)
            if check:
                assert torch.equal(e.flat, want), (g, e.state_name)
            else:
                e.flat.copy_(want)
            count += 1
        if check:
            assert opt.num_steps == 3
        else:
            opt.num_steps = 3
        return count
    for g, p in named:
        want = {s: _shard(p, _ref_state(g, s, ref[g].shape)).to(p.dtype) for s in ("exp_avg", "exp_avg_sq")}
        if check:
            assert float(opt.state[p]["step"]) == 3.0
            for s, w in want.items():
                assert torch.equal(opt.state[p][s], w), (g, s)
        else:
            opt.state[p] = {"step": torch.tensor(3.0), **want}
        count += 1
    return count


def _real_cases(rank, world, root):
    cfg = tiny_config()
    ref = {n: p.detach() for n, p in GPTModel(cfg, seed=SEED).named_parameters()}
    out = {}
    for i, (name, save_layout, load_layout) in enumerate(CASES):
        directory = os.path.join(root, name)
        chunks, named, opt = _build(cfg, save_layout, SEED)
        _fill_or_check(opt, named, ref, check=False)
        save_checkpoint(directory, 3, chunks, opt, async_save=i % 2 == 0).wait()
        parallel.destroy()
        chunks, named, opt = _build(cfg, load_layout, SEED + 1)
        result = load_checkpoint(directory, chunks, opt)
        assert result.step == 3
        for g, p in named:
            want = _shard(p, ref[g]).to(p.dtype)  # fp32 loads take the fp32 masters of a bf16 run
            assert torch.equal(p.detach(), want), f"{name}: {g} differs on rank {rank}"
        out[name] = _fill_or_check(opt, named, ref, check=True)
        parallel.destroy()
    return out


def test_real_parallel_layouts_reshard_exactly(tmp_path):
    results = run_distributed(_real_cases, world_size=4, args=(str(tmp_path),))
    for per_rank in results:
        assert set(per_rank) == {c[0] for c in CASES}
