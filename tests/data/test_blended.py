"""Blending hits the weights, splits tile the documents, mock data is deterministic."""

import numpy as np
import pytest

from megacore.data import (BlendedDataset, GPTDataset, InMemoryDocuments, MockGPTDataset, blend_counts, blend_index,
                           parse_split, split_document_ranges)


def _tagged_dataset(tag, n_docs=30, seed=0):
    """Token ids tag*10000 + k, so a sample's source is visible in its tokens."""
    rng = np.random.default_rng(seed)
    docs = [tag * 10000 + rng.integers(0, 9999, size=int(rng.integers(5, 60))) for _ in range(n_docs)]
    return InMemoryDocuments(docs)


@pytest.mark.parametrize("weights", [[0.2, 0.5, 0.3], [1, 1], [7, 2, 0.5, 0.5], [0.97, 0.03]])
def test_blend_hits_weights_within_one_percent(weights):
    size = 5000
    w = np.array(weights, float) / sum(weights)
    counts = blend_counts(weights, size)
    assert sum(counts) == size
    np.testing.assert_allclose(np.array(counts) / size, w, atol=0.01)
    owners, ranks = blend_index(weights, size)
    # every prefix is within one sample of its target, and each dataset is read in order 0, 1, 2, ...
    running = np.zeros(len(w))
    for j, d in enumerate(owners[:1000]):
        running[d] += 1
        assert np.all(np.abs(running - (j + 1) * w) <= 1.0 + 1e-9)
    for d in range(len(w)):
        np.testing.assert_array_equal(ranks[owners == d], np.arange(counts[d]))


def test_blended_dataset_samples_come_from_the_weighted_sources():
    weights = [0.6, 0.3, 0.1]
    size = 2000
    counts = blend_counts(weights, size)
    parts = [GPTDataset(_tagged_dataset(t + 1, seed=t), np.arange(30), 16, counts[t], seed=4) for t in range(3)]
    blended = BlendedDataset(parts, weights, size)
    sources = np.array([int(blended[i]["tokens"][0]) // 10000 - 1 for i in range(size)])
    np.testing.assert_allclose(np.bincount(sources, minlength=3) / size, weights, atol=0.01)
    again = BlendedDataset(parts, weights, size)
    for i in range(0, size, 97):
        np.testing.assert_array_equal(blended[i]["tokens"], again[i]["tokens"])
    with pytest.raises(ValueError, match="must provide"):
        BlendedDataset(parts, weights, size * 2)
    with pytest.raises(ValueError, match="non-negative"):
        blend_index([-1, 2], 10)


def test_split_ranges_tile_documents():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    for n in (0, 1, 10, 999, 1133):
        ranges = split_document_ranges(n, "969,30,1")
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a <= b for a, b in ranges) and ranges[0][1] == ranges[1][0] and ranges[1][1] == ranges[2][0]
    assert split_document_ranges(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges(100, "1,0,0") == [(0, 100), (100, 100), (100, 100)]
    for bad in ("1,2", "a,b,c", "-1,1,1", "0,0,0"):
        with pytest.raises(ValueError, match="three non-negative"):
            parse_split(bad)


def test_mock_dataset_is_deterministic_and_well_formed():
    a = MockGPTDataset(vocab_size=100, seq_length=32, num_samples=50, seed=3, eod_mask_loss=True,
                       reset_position_ids=True)
    b = MockGPTDataset(vocab_size=100, seq_length=32, num_samples=50, seed=3, eod_mask_loss=True,
                       reset_position_ids=True)
    c = MockGPTDataset(vocab_size=100, seq_length=32, num_samples=50, seed=4)
    for i in range(50):
        sa, sb = a[i], b[i]
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k])
        assert sa["tokens"].shape == (32,) and sa["tokens"].dtype == np.int64
        assert sa["loss_mask"].dtype == np.float32 and sa["position_ids"].dtype == np.int64
        assert 0 <= sa["tokens"].min() and sa["tokens"].max() < 100
        np.testing.assert_array_equal(sa["tokens"][1:], sa["labels"][:-1])
        np.testing.assert_array_equal(sa["loss_mask"], (sa["tokens"] != 99).astype(np.float32))
    assert any(not np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(50))
    with pytest.raises(IndexError):
        a[50]
