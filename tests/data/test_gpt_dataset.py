"""GPT sample builder: windows over the shuffled document stream, determinism, epoch coverage,
caching, and Megatron's EOD semantics (checked against plain-Python loops)."""

import numpy as np
import pytest

from megacore.data import GPTDataset, IndexedDataset, IndexedDatasetBuilder, InMemoryDocuments, make_sample
from megacore.data import gpt_dataset as gd


def _unique_docs(lengths):
    """Documents whose tokens are globally unique ids, so coverage can be counted exactly."""
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return [np.arange(starts[i], starts[i + 1]) for i in range(len(lengths))]


def _lengths_with_total(rng, n_docs, seq, total_mod_one=True):
    lengths = rng.integers(0, 40, size=n_docs)
    if total_mod_one:  # make T = B*S + 1 so one epoch of samples uses every token
        lengths[-1] += (1 - lengths.sum()) % seq
    return lengths


def test_windows_are_consecutive_slices_of_the_document_stream():
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 30, size=25)
    docs = _unique_docs(lengths)
    split = np.arange(3, 20)
    ds = GPTDataset(InMemoryDocuments(docs), split, seq_length=6, num_samples=150, seed=5)
    # each epoch of the document index is a permutation of the split
    n = len(split)
    for e in range(len(ds.document_index) // n):
        assert sorted(ds.document_index[e * n:(e + 1) * n].tolist()) == split.tolist()
    stream = np.concatenate([docs[d] for d in ds.document_index])
    served = set()
    for k in range(len(ds)):
        i = int(ds.shuffle_index[k])
        served.add(i)
        s = ds[k]
        np.testing.assert_array_equal(s["tokens"], stream[i * 6:i * 6 + 6])
        np.testing.assert_array_equal(s["labels"], stream[i * 6 + 1:i * 6 + 7])
        assert s["tokens"].dtype == np.int64 and s["labels"].dtype == np.int64
        assert s["loss_mask"].dtype == np.float32 and s["position_ids"].dtype == np.int64
        np.testing.assert_array_equal(s["position_ids"], np.arange(6))
        np.testing.assert_array_equal(s["loss_mask"], np.ones(6))
    assert len(served) == len(ds)


@pytest.mark.parametrize("seq", [1, 5, 16])
def test_one_epoch_covers_every_token_exactly_once(seq):
    rng = np.random.default_rng(seq)
    lengths = _lengths_with_total(rng, 30, seq)
    docs = _unique_docs(lengths)
    total = int(lengths.sum())
    per_epoch = (total - 1) // seq
    assert per_epoch * seq + 1 == total
    ds = GPTDataset(InMemoryDocuments(docs), np.arange(30), seq, per_epoch * 3, seed=11)
    assert ds.samples_per_epoch == per_epoch
    first = [ds[k] for k in range(per_epoch)]
    inputs = np.concatenate([s["tokens"] for s in first])
    assert len(inputs) == len(np.unique(inputs)) == total - 1, "no input token repeats within the first epoch"
    seen = np.union1d(inputs, np.concatenate([s["labels"] for s in first]))
    np.testing.assert_array_equal(seen, np.arange(total))  # every token once (the last only as a label)
    # later blocks drift one token per epoch behind the epoch boundaries (samples share their
    # boundary token), so block b repeats at most b tokens of the previous epoch
    for b in (1, 2):
        block = np.concatenate([ds[k]["tokens"] for k in range(b * per_epoch, (b + 1) * per_epoch)])
        assert len(block) - len(np.unique(block)) <= b


def test_one_epoch_with_leftover_tail_misses_fewer_than_seq_tokens():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 40, size=20)
    lengths[-1] += (5 - lengths.sum()) % 8  # T - 1 = 4 (mod 8): a tail of 4 tokens is left over
    docs = _unique_docs(lengths)
    ds = GPTDataset(InMemoryDocuments(docs), np.arange(20), 8, (lengths.sum() - 1) // 8, seed=0)
    inputs = np.concatenate([ds[k]["tokens"] for k in range(len(ds))])
    assert len(np.unique(inputs)) == len(inputs)
    assert lengths.sum() - len(inputs) - 1 == 4


def test_deterministic_by_seed_and_prefix_stable():
    rng = np.random.default_rng(7)
    docs = _unique_docs(rng.integers(1, 50, size=40))
    d = InMemoryDocuments(docs)
    a = GPTDataset(d, np.arange(40), 8, 300, seed=1)
    b = GPTDataset(d, np.arange(40), 8, 300, seed=1)
    c = GPTDataset(d, np.arange(40), 8, 300, seed=2)
    longer = GPTDataset(d, np.arange(40), 8, 900, seed=1)
    ta = np.stack([a[i]["tokens"] for i in range(300)])
    np.testing.assert_array_equal(ta, np.stack([b[i]["tokens"] for i in range(300)]))
    np.testing.assert_array_equal(ta, np.stack([longer[i]["tokens"] for i in range(300)]))
    assert not np.array_equal(ta, np.stack([c[i]["tokens"] for i in range(300)]))
    with pytest.raises(IndexError, match="out of range"):
        a[300]


def test_indices_are_cached_and_reused(tmp_path, monkeypatch):
    rng = np.random.default_rng(8)
    docs = _unique_docs(rng.integers(1, 50, size=40))
    d = InMemoryDocuments(docs)
    a = GPTDataset(d, np.arange(40), 8, 100, seed=3, cache_dir=tmp_path)
    files = sorted(p.name for p in (tmp_path / "gpt_indices").glob("*.npy"))
    assert len(files) == 3

    def boom(*args, **kwargs):
        raise AssertionError("indices were rebuilt instead of loaded from the cache")

    monkeypatch.setattr(gd, "build_sample_index", boom)
    b = GPTDataset(d, np.arange(40), 8, 100, seed=3, cache_dir=tmp_path)
    for i in range(100):
        np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
    with pytest.raises(AssertionError, match="rebuilt"):  # a different seed is a different cache entry
        GPTDataset(d, np.arange(40), 8, 100, seed=4, cache_dir=tmp_path)


def test_reads_from_indexed_dataset(tmp_path):
    rng = np.random.default_rng(9)
    docs = _unique_docs(rng.integers(1, 30, size=12))
    b = IndexedDatasetBuilder(tmp_path / "c.bin", dtype=np.int32)
    for doc in docs:  # two sequences per document: the sample builder works on whole documents
        half = len(doc) // 2
        b.add_document(doc, [half, len(doc) - half])
    b.finalize(tmp_path / "c.idx")
    ids = np.arange(12)
    from_disk = GPTDataset(IndexedDataset(tmp_path / "c"), ids, 5, 40, seed=0)
    in_mem = GPTDataset(InMemoryDocuments(docs), ids, 5, 40, seed=0)
    for i in range(40):
        np.testing.assert_array_equal(from_disk[i]["tokens"], in_mem[i]["tokens"])


def _reference_sample(window, eod, eod_mask_loss, reset_position_ids):
    """Plain loops: Megatron's get_ltor_masks_and_position_ids, one sample."""
    tokens = list(window[:-1])
    loss_mask = [1.0] * len(tokens)
    pos = list(range(len(tokens)))
    if eod_mask_loss:
        loss_mask = [0.0 if t == eod else 1.0 for t in tokens]
    if reset_position_ids:
        prev = 0
        for j, t in enumerate(tokens):
            if t == eod:
                for k in range(j + 1, len(tokens)):
                    pos[k] -= (j + 1 - prev)
                prev = j + 1
    allowed = [[k <= q and tokens[:q].count(eod) - tokens[:k].count(eod) == 0 if k <= q else False
                for k in range(len(tokens))] for q in range(len(tokens))]
    return loss_mask, pos, allowed


def test_eod_semantics_match_megatron_reference():
    rng = np.random.default_rng(10)
    eod = 0
    for trial in range(30):
        window = rng.integers(0, 4, size=13)  # many eods, including first and last positions
        for mask_loss in (False, True):
            for reset_pos in (False, True):
                s = make_sample(window, eod, eod_mask_loss=mask_loss, reset_position_ids=reset_pos,
                                reset_attention_mask=True)
                ref_mask, ref_pos, ref_allowed = _reference_sample(window, eod, mask_loss, reset_pos)
                np.testing.assert_array_equal(s["loss_mask"], ref_mask)
                np.testing.assert_array_equal(s["position_ids"], ref_pos)
                np.testing.assert_array_equal(s["attention_mask"][0], np.array(ref_allowed))
    with pytest.raises(ValueError, match="end-of-document id"):
        make_sample(np.arange(5), None, eod_mask_loss=True)


def test_too_small_split_gives_clear_error():
    d = InMemoryDocuments([np.arange(5)])
    with pytest.raises(ValueError, match="fewer than one sample"):
        GPTDataset(d, np.arange(1), 8, 10, seed=0)
    empty = GPTDataset(d, np.arange(0), 8, 0, seed=0)  # zero samples from an empty split is fine
    assert len(empty) == 0


def test_vocab_check_catches_mismatched_tokenizer():
    d = InMemoryDocuments([np.arange(100)])
    ds = GPTDataset(d, np.arange(1), 8, 5, seed=0, vocab_size=50)
    with pytest.raises(ValueError, match="outside"):
        for i in range(5):
            ds[i]
