"""Box arithmetic and shard descriptions against brute-force index bookkeeping."""

import itertools
import random

import pytest
import torch

from megacore.checkpoint import CheckpointError, CkptView, LogicalView, Segment
from megacore.checkpoint.boxes import flat_range_boxes, probe_segments, slices, subtract, tensor_segments
from megacore.checkpoint.sharded import TensorLayout, pieces_of_flat_shard, pieces_of_tensor
from megacore.sharding import param_meta


def _assemble(global_shape, pieces):
    """Write every piece into a NaN-filled global tensor; also count writes per element."""
    out = torch.full(global_shape, float("nan"), dtype=torch.float64)
    count = torch.zeros(global_shape, dtype=torch.int64)
    for p in pieces:
        out[slices(p.offsets, p.shape)] = p.tensor.double()
        count[slices(p.offsets, p.shape)] += 1
    return out, count


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 6), ()])
def test_flat_range_boxes_concatenate_to_the_range(shape):
    n = int(torch.tensor(shape).prod().item()) if shape else 1
    full = torch.arange(n).reshape(shape)
    for start in range(n + 1):
        for stop in range(start, n + 1):
            boxes = flat_range_boxes(shape, start, stop)
            got = torch.cat([full[slices(o, s)].reshape(-1) for o, s in boxes]) if boxes else torch.empty(0, dtype=torch.int64)
            assert torch.equal(got, torch.arange(start, stop)), (shape, start, stop, boxes)
            assert len(boxes) <= max(1, 2 * len(shape) - 1)


def test_subtract_covers_difference_exactly():
    rng = random.Random(0)
    for _ in range(300):
        nd = rng.randint(1, 3)
        g = [rng.randint(1, 6) for _ in range(nd)]

        def box():
            off = [rng.randrange(d) for d in g]
            return off, [rng.randint(1, d - o) for o, d in zip(off, g)]
        (ao, ash), (bo, bsh) = box(), box()
        mask_a = torch.zeros(g, dtype=torch.int64)
        mask_a[slices(ao, ash)] = 1
        mask_b = torch.zeros(g, dtype=torch.int64)
        mask_b[slices(bo, bsh)] = 1
        got = torch.zeros(g, dtype=torch.int64)
        for o, s in subtract(ao, ash, bo, bsh):
            got[slices(o, s)] += 1
        assert torch.equal(got, mask_a * (1 - mask_b))


def _fused_fc1(rank, tp):
    return lambda f: f.reshape(2, -1, *f.shape[1:]).chunk(tp, 1)[rank].reshape(-1, *f.shape[1:])


def _qkv_replicated(rank, tp, G=2, qpg=4, hd=3):
    rep = tp // G
    g, j, qn = rank // rep, rank % rep, qpg // rep

    def fn(f):
        v = f.reshape(G, qpg + 2, hd, *f.shape[1:])[g]
        return torch.cat([v[j * qn:(j + 1) * qn], v[qpg:]]).reshape(-1, *f.shape[1:])
    return fn


CASES = {
    "fc1_gate_up_tp2": ((2 * 6, 5), _fused_fc1, 2),
    "fc1_gate_up_tp3": ((2 * 6, 5), _fused_fc1, 3),
    "column_tp2": ((4, 6), lambda r, t: (lambda f: f.chunk(t, 1)[r]), 2),
    "qkv_kv_replicated_tp4": ((2 * 6 * 3, 5), _qkv_replicated, 4),
    "bias_fc1_tp2": ((12,), _fused_fc1, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_probe_segments_reproduce_the_shard_function(case):
    gshape, make, tp = CASES[case]
    full = torch.randn(gshape, dtype=torch.float64)
    for rank in range(tp):
        fn = make(rank, tp)
        local = fn(full)
        segs = probe_segments(gshape, local.shape, fn)
        rebuilt = torch.full(local.shape, float("nan"), dtype=torch.float64)
        for s in segs:
            rebuilt[slices(s.local_offsets, s.shape)] = full[slices(s.global_offsets, s.shape)]
        assert torch.equal(rebuilt, local)


def test_fused_fc1_shard_is_two_segments():
    segs = probe_segments((12, 5), (6, 5), _fused_fc1(1, 2))
    assert sorted(s.global_offsets for s in segs) == [(3, 0), (9, 0)]


def test_probe_refuses_a_dimension_mixing_shard():
    with pytest.raises(CheckpointError, match="mixes dimensions"):
        probe_segments((4, 4), (4, 4), lambda f: f.t().contiguous())


def test_logical_view_matches_the_shard_function():
    p = torch.nn.Parameter(torch.zeros(6, 5))
    param_meta(p).ckpt_view = LogicalView((12, 5), (2, 6, 5), (2, 3, 5), (0, 3, 0))
    gshape, segs = tensor_segments(p)
    assert gshape == (12, 5)
    assert sorted(segs, key=lambda s: s.global_offsets) == sorted(probe_segments((12, 5), (6, 5), _fused_fc1(1, 2)),
                                                                  key=lambda s: s.global_offsets)


def test_explicit_view_is_validated():
    p = torch.nn.Parameter(torch.zeros(2, 5))
    param_meta(p).ckpt_view = CkptView((4, 5), [Segment((0, 0), (0, 0), (1, 5))])
    with pytest.raises(CheckpointError, match="cover 5 elements"):
        tensor_segments(p)


@pytest.mark.parametrize("case", sorted(CASES))
def test_flat_shards_of_tp_shards_tile_the_global_tensor(case):
    """Every DP rank's flat range of every TP rank's shard, mapped to global boxes, reassembles the
    full tensor with each element written exactly once per TP-distinct owner."""
    gshape, make, tp = CASES[case]
    full = torch.randn(gshape, dtype=torch.float64)
    pieces = []
    for rank, dp in itertools.product(range(tp), (3,)):
        fn = make(rank, tp)
        local = fn(full)
        layout = TensorLayout("w", gshape, probe_segments(gshape, local.shape, fn))
        flat = local.reshape(-1)
        bounds = [0, flat.numel() // 3, 2 * flat.numel() // 3 + 1, flat.numel()]
        for a, b in zip(bounds, bounds[1:]):
            pieces += pieces_of_flat_shard("w", layout, local.shape, flat[a:b], a)
        whole = pieces_of_tensor("w", layout, local)
        assert sum(p.tensor.numel() for p in whole) == local.numel()
    out, count = _assemble(gshape, pieces)
    assert torch.equal(out, full)
    assert (count >= 1).all()
