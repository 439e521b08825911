"""Four ranks on gloo CPU: PP=4 (even/uneven, tied/untied, virtual stages), PP=2 x DP=2 with megacore's
DDP, and TP=2 x PP=2 (with and without sequence parallelism) reproduce the one-device loss and every
gradient; 1F1B's in-flight bound on four stages. One spawned world runs every layout in turn."""

from __future__ import annotations

import pytest
import torch

from tests.dist.harness import run_distributed
from tests.pipeline import cases

# (name, num_layers, tie, vp, schedule, n_mb, explicit layer list)
PP4_CASES = [
    ("even-untied-1f1b", 4, False, 1, "1f1b", 4, None),
    ("uneven-tied-1f1b", 6, True, 1, "1f1b", 5, None),                  # [2, 2, 1, 1]
    ("explicit-tied-gpipe", 5, True, 1, "gpipe", 2, [1, 1, 2, 1]),
    ("vp2-tied-interleaved", 8, True, 2, "interleaved", 3, None),      # fewer micro-batches than stages
]
DP_CASES = [("pp2dp2-tied-1f1b", 3, True, 1, "1f1b", 2, None), ("pp2dp2-vp2-untied", 4, False, 2, "1f1b", 2, None),
            ("pp2dp2-tied-zero_bubble", 4, True, 1, "zero_bubble", 2, None)]  # weight grads bypass DDP's hook
TP_CASES = [("tp2pp2-tied", False), ("tp2pp2-tied-sp", True)]


def _has_parallelize() -> bool:
    try:
        from megacore.parallel import parallelize  # noqa: F401
    except ImportError:
        return False
    return True


def _world4(rank, world_size):
    import megacore.parallel as par
    from megacore.pipeline import InFlightTracker, build_stage_modules, forward_backward

    out = {}
    state = par.initialize(pipeline=4)
    for name, layers, tie, vp, schedule, n_mb, explicit in PP4_CASES:
        config = cases.tiny_config(num_layers=layers, tie=tie)
        out[name], _ = cases.run_parity(state, config, vp, schedule, n_mb, layers=explicit,
                                        clip=name == "uneven-tied-1f1b")
    config = cases.tiny_config(num_layers=4)
    chunks = build_stage_modules(config, state.pp_rank, 4, 1, cases.SEED, "cpu", torch.float32)
    mbs = cases.make_micro_batches(8, 1, config)
    peaks = []
    for _ in range(2):  # the first step also infers stage metadata; the second reuses the schedule
        tracker = InFlightTracker()
        forward_backward(chunks, mbs, cases.num_tokens(mbs), state.pp_group, "1f1b", tracker=tracker)
        peaks.append(tracker.max_in_flight)
    out["inflight_1f1b"] = max(peaks)
    par.destroy()

    state = par.initialize(pipeline=2)  # data-parallel size 2
    assert state.dp_size == 2
    for name, layers, tie, vp, schedule, n_mb, explicit in DP_CASES:
        config = cases.tiny_config(num_layers=layers, tie=tie)
        out[name], _ = cases.run_parity(state, config, vp, schedule, n_mb, layers=explicit, ddp=True, clip=True)
    par.destroy()

    if _has_parallelize():
        state = par.initialize(tensor=2, pipeline=2)
        from megacore.config import ParallelConfig, RunConfig, TrainConfig
        from megacore.compose import build_model_chunks

        for name, sp in TP_CASES:
            config = cases.tiny_config(num_layers=3, tie=True)
            if sp:  # the RunConfig route: parallelize is applied by build_model_chunks
                run = RunConfig(model=config, parallel=ParallelConfig(tensor=2, pipeline=2, sequence_parallel=True),
                                train=TrainConfig(seed=cases.SEED))
                out[name], _ = cases.run_parity(state, config, 1, "1f1b", 2, clip=True,
                                                chunks=build_model_chunks(run, state, "cpu", torch.float32))
            else:
                fn = lambda m: par.parallelize(m, state, sequence_parallel=False)  # noqa: E731
                out[name], _ = cases.run_parity(state, config, 1, "1f1b", 2, parallelize_fn=fn, clip=True)
        par.destroy()
    return out


@pytest.fixture(scope="module")
def world4():
    return run_distributed(_world4, world_size=4)


@pytest.mark.parametrize("case", PP4_CASES + DP_CASES, ids=[c[0] for c in PP4_CASES + DP_CASES])
def test_matches_single_rank(world4, case):
    name, layers, tie = case[:3]
    cases.check_coverage([r[name] for r in world4], cases.param_names(cases.tiny_config(layers, tie)))


@pytest.mark.skipif(not _has_parallelize(), reason="needs megacore.parallel.parallelize (tensor parallelism)")
@pytest.mark.parametrize("name", [c[0] for c in TP_CASES])
def test_tp2_pp2_matches_single_rank(world4, name):
    cases.check_coverage([r[name] for r in world4], cases.param_names(cases.tiny_config(3, True)))


def test_1f1b_in_flight_four_stages(world4):
    # Stage s of 4 holds at most 4 - s of the 8 micro-batches at once.
    assert [r["inflight_1f1b"] for r in world4] == [4, 3, 2, 1]
