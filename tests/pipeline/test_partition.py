"""Stage partitioning, schedule checks, stage construction and the pp=1 path (one process, no spawn)."""

from __future__ import annotations

import pytest
import torch

from megacore.config import ConfigError
from megacore.models.gpt import GPTModel
from megacore.pipeline import (InFlightTracker, block_layers, build_stage_modules, check_num_microbatches,
                               forward_backward, forward_backward_no_pipelining, layer_counts, resolve_schedule,
                               stage_layers)
from megacore.sharding import peek_meta
from tests.pipeline import cases


# ------------------------------------------------------------------------------------------ layer split
@pytest.mark.parametrize("num_layers,pp,vp", [(4, 2, 1), (5, 2, 1), (10, 4, 1), (7, 3, 1), (8, 2, 2), (5, 2, 2),
                                              (13, 4, 3), (6, 6, 1)])
def test_even_split_spreads_remainder_to_first_blocks(num_layers, pp, vp):
    counts = layer_counts(num_layers, pp, vp)
    n = pp * vp
    expected = [num_layers // n + (1 if k < num_layers % n else 0) for k in range(n)]
    assert counts == expected
    assert sum(counts) == num_layers and max(counts) - min(counts) <= 1


def test_documented_examples():
    assert layer_counts(10, 4) == [3, 3, 2, 2]
    assert block_layers(8, 2, 2, [1, 3, 3, 1]) == [[0], [1, 2, 3], [4, 5, 6], [7]]
    # Chunk c of stage s holds block c*pp + s.
    assert stage_layers(8, 0, 2, 2, [1, 3, 3, 1]) == [[0], [4, 5, 6]]
    assert stage_layers(8, 1, 2, 2, [1, 3, 3, 1]) == [[1, 2, 3], [7]]


@pytest.mark.parametrize("num_layers,pp,vp,explicit", [(8, 2, 2, None), (9, 3, 2, None), (7, 2, 2, [1, 2, 3, 1]),
                                                       (12, 4, 3, None)])
def test_interleaved_assignment_covers_every_layer_once(num_layers, pp, vp, explicit):
    blocks = block_layers(num_layers, pp, vp, explicit)
    flat = [layer for b in blocks for layer in b]
    assert flat == list(range(num_layers))  # blocks are consecutive, in model order
    for s in range(pp):
        for c, layers in enumerate(stage_layers(num_layers, s, pp, vp, explicit)):
            assert layers == blocks[c * pp + s]


@pytest.mark.parametrize("args,fragment", [
    ((3, 4, 1, None), "every block needs at least one layer"),
    ((4, 2, 3, None), "= 6 blocks but model.num_layers=4"),
    ((4, 2, 1, [1, 1, 2]), "has 3 entries but pipeline=2"),
    ((4, 2, 1, [1, 2]), "sums to 3, not model.num_layers=4"),
    ((4, 2, 1, [0, 4]), "count >= 1"),
    ((4, 1, 2, None), "needs parallel.pipeline > 1"),
    ((4, 0, 1, None), "parallel.pipeline=0"),
])
def test_impossible_splits_raise_clear_errors(args, fragment):
    with pytest.raises(ConfigError) as err:
        layer_counts(*args)
    assert fragment in str(err.value)


def test_bad_pp_rank():
    with pytest.raises(ValueError, match="pp_rank=2 is outside"):
        stage_layers(4, 2, 2)


# ------------------------------------------------------------------------------------- schedule checks
def test_schedule_resolution():
    assert resolve_schedule("1f1b", 1) == "1f1b"
    assert resolve_schedule("1f1b", 2) == "interleaved"
    assert resolve_schedule("zero_bubble", 1) == "zero_bubble"
    with pytest.raises(ConfigError, match="needs parallel.virtual_pipeline >= 2"):
        resolve_schedule("interleaved", 1)
    with pytest.raises(ConfigError, match="is not known"):
        resolve_schedule("pipedream", 1)


@pytest.mark.parametrize("schedule,n,pp,vp,ok", [
    ("1f1b", 4, 4, 1, True), ("1f1b", 3, 4, 1, False), ("gpipe", 1, 4, 1, True),
    ("interleaved", 8, 4, 2, True), ("interleaved", 6, 4, 2, True),   # 6 // 4 = 1 round
    ("interleaved", 3, 4, 2, True), ("interleaved", 10, 4, 2, True),  # 2 rounds of 5
    ("interleaved", 9, 4, 2, False), ("zero_bubble", 5, 2, 1, False), ("zero_bubble", 6, 2, 1, True),
    ("1f1b", 5, 2, 2, False),  # 1f1b with virtual stages runs interleaved
])
def test_microbatch_count_rules(schedule, n, pp, vp, ok):
    if ok:
        check_num_microbatches(schedule, n, pp, vp)
        # The same rule torch's interleaved schedules enforce in their constructors.
        if resolve_schedule(schedule, vp) in ("interleaved", "zero_bubble"):
            assert n % max(1, n // pp) == 0
    else:
        with pytest.raises(ConfigError, match="micro-batches"):
            check_num_microbatches(schedule, n, pp, vp)


# -------------------------------------------------------------------------------------- stage modules
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("pp,vp,explicit", [(2, 1, None), (2, 2, [2, 1, 1, 1]), (3, 1, None)])
def test_stages_hold_exactly_the_one_device_weights(tie, pp, vp, explicit):
    config = cases.tiny_config(num_layers=5, tie=tie)
    full = dict(GPTModel(config, seed=cases.SEED).named_parameters())
    seen = set()
    for s in range(pp):
        chunks = build_stage_modules(config, s, pp, vp, cases.SEED, "cpu", torch.float32, explicit)
        assert len(chunks) == vp
        for c, chunk in enumerate(chunks):
            index = c * pp + s
            assert chunk.pipeline_stage_index == index
            assert chunk.pre_process == (index == 0) and chunk.post_process == (index == pp * vp - 1)
            for name, p in chunk.named_parameters():
                gname = cases.global_name(name, p)
                assert torch.equal(p, full[gname]), gname
                if name == "output_layer.weight" and tie:
                    assert peek_meta(p).shared_duplicate  # the grad-norm code counts the table once
                seen.add(gname)
    assert seen == set(full)


def test_build_model_chunks_checks_the_process_groups():
    from megacore.config import ParallelConfig, RunConfig
    from megacore.compose import build_model_chunks

    run = RunConfig(model=cases.tiny_config(num_layers=2), parallel=ParallelConfig(pipeline=2))
    with pytest.raises(ConfigError, match="process groups have pipeline=1"):
        build_model_chunks(run)  # megacore.parallel not initialized: a single rank
    run.parallel.pipeline = 1
    (chunk,) = build_model_chunks(run)
    assert chunk.training and chunk.pre_process and chunk.post_process


def test_meta_build_then_materialize_later():
    config = cases.tiny_config(num_layers=2)
    chunks = build_stage_modules(config, 1, 2, 1, cases.SEED, materialize=False)
    assert all(p.is_meta for p in chunks[0].parameters())


# --------------------------------------------------------------------------------- pp = 1 (no pipeline)
def _run_pp1(config, mbs, ddp: bool):
    model = GPTModel(config, seed=cases.SEED)
    chunk = model
    if ddp:
        from megacore.distributed import DistributedDataParallel

        chunk = DistributedDataParallel(model, None, bucket_size_mb=0.01)
    tracker = InFlightTracker()
    loss = forward_backward([chunk], mbs, cases.num_tokens(mbs), None, tracker=tracker)
    if ddp:
        chunk.finish_grad_sync()
    return loss, [chunk], tracker


@pytest.mark.parametrize("ddp", [False, True])
def test_no_pipelining_matches_reference(ddp):
    config = cases.tiny_config(num_layers=2, tie=True)
    mbs = cases.make_micro_batches(3, 2, config)
    ref_loss, ref_grads = cases.reference(config, mbs)
    loss, chunks, tracker = _run_pp1(config, mbs, ddp)
    assert abs(loss.item() - ref_loss) < 1e-5
    assert set(cases.check_grads(chunks, ref_grads)) == set(ref_grads)
    assert tracker.max_in_flight == 1 and tracker.in_flight == 0  # accumulation holds one micro-batch


def test_no_pipelining_forward_only():
    config = cases.tiny_config(num_layers=2)
    mbs = cases.make_micro_batches(2, 2, config)
    ref_loss, _ = cases.reference(config, mbs)
    model = GPTModel(config, seed=cases.SEED)
    loss = forward_backward_no_pipelining([model], mbs, cases.num_tokens(mbs), forward_only=True)
    assert abs(loss.item() - ref_loss) < 1e-5
    assert all(p.grad is None for p in model.parameters())


def test_micro_batch_errors():
    config = cases.tiny_config(num_layers=2)
    model = GPTModel(config, seed=cases.SEED)
    mbs = cases.make_micro_batches(2, 2, config)
    with pytest.raises(ValueError, match="micro_batches is empty"):
        forward_backward([model], [], 1.0, None)
    with pytest.raises(ValueError, match="lacks \\['labels'\\]"):
        forward_backward([model], [{"tokens": mbs[0]["tokens"]}], 1.0, None)
    with pytest.raises(ValueError, match="num_tokens_global=0"):
        forward_backward([model], mbs, 0, None)
    with pytest.raises(ValueError, match="virtual stages need pp > 1"):
        forward_backward([model, model], mbs, 1.0, None)
