"""The .bin/.idx files follow Megatron's documented layout byte for byte, in both directions."""

import pickle
import struct

import numpy as np
import pytest

from megacore.data import IndexedDataset, IndexedDatasetBuilder
from megacore.data.indexed_dataset import optimal_dtype

# Megatron-LM's dtype table, written out independently of the implementation.
MEGATRON_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                  8: np.uint16}


def _documents(rng, n_docs=7, max_seqs=3):
    """Each document: a list of sequences (1-D int arrays), some empty."""
    return [[rng.integers(0, 60000, size=int(rng.integers(0, 20))) for _ in range(int(rng.integers(1, max_seqs + 1)))]
            for _ in range(n_docs)]


def _parse_idx(path):
    """Independent reader: struct + np.frombuffer over the documented layout."""
    raw = open(path, "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack_from("<Q", raw, 9)
    code, = struct.unpack_from("<B", raw, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", raw, 18)
    off = 34
    lengths = np.frombuffer(raw, np.int32, n_seq, off)
    off += 4 * n_seq
    pointers = np.frombuffer(raw, np.int64, n_seq, off)
    off += 8 * n_seq
    docs = np.frombuffer(raw, np.int64, n_doc, off)
    off += 8 * n_doc
    assert off == len(raw), "no trailing bytes after the document indices"
    return version, code, lengths, pointers, docs


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_written_files_match_megatron_layout(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = _documents(rng)
    if dtype == np.uint8:
        docs = [[s % 256 for s in d] for d in docs]
    builder = IndexedDatasetBuilder(tmp_path / "d.bin", dtype=dtype)
    for d in docs:
        builder.add_document(np.concatenate(d), [len(s) for s in d])
    builder.finalize(tmp_path / "d.idx")

    version, code, lengths, pointers, doc_idx = _parse_idx(tmp_path / "d.idx")
    seqs = [s for d in docs for s in d]
    assert version == 1
    assert MEGATRON_CODES[code] == dtype
    np.testing.assert_array_equal(lengths, [len(s) for s in seqs])
    item = np.dtype(dtype).itemsize
    np.testing.assert_array_equal(pointers, np.concatenate([[0], np.cumsum([len(s) * item for s in seqs])[:-1]]))
    np.testing.assert_array_equal(doc_idx, np.concatenate([[0], np.cumsum([len(d) for d in docs])]))
    raw_bin = open(tmp_path / "d.bin", "rb").read()
    np.testing.assert_array_equal(np.frombuffer(raw_bin, dtype), np.concatenate(seqs).astype(dtype))

    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == len(seqs) and ds.num_documents == len(docs)
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(ds[i], s)
        assert ds[i].dtype == dtype
    for k, d in enumerate(docs):
        np.testing.assert_array_equal(ds.get_document(k), np.concatenate(d))
    np.testing.assert_array_equal(ds.sequence_lengths, lengths)
    np.testing.assert_array_equal(ds.document_indices, doc_idx)
    assert not list(tmp_path.glob("*.tmp")), "temporary files are moved into place"


def test_hand_built_megatron_file_reads_back(tmp_path):
    """A file laid out by hand with struct (as Megatron-LM writes it) reads back correctly."""
    seqs = [np.array([5, 6, 7], np.int32), np.array([9], np.int32), np.array([], np.int32),
            np.array([1, 2, 3, 4], np.int32)]
    doc_idx = [0, 2, 4]  # document 0 = sequences 0,1; document 1 = sequences 2,3
    with open(tmp_path / "m.bin", "wb") as f:
        for s in seqs:
            f.write(s.tobytes())
    with open(tmp_path / "m.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", 4))  # int32
        f.write(struct.pack("<Q", len(seqs)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(seqs)}i", *[len(s) for s in seqs]))
        ptr, ptrs = 0, []
        for s in seqs:
            ptrs.append(ptr)
            ptr += 4 * len(s)
        f.write(struct.pack(f"<{len(seqs)}q", *ptrs))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))
    ds = IndexedDataset(str(tmp_path / "m"))
    assert ds.dtype == np.int32 and len(ds) == 4
    assert [x.tolist() for x in ds[0:4]] == [s.tolist() for s in seqs]
    assert ds.get(3, offset=1, length=2).tolist() == [2, 3]
    assert ds.get(-1).tolist() == [1, 2, 3, 4]
    assert ds.document_indices.tolist() == doc_idx
    assert ds.document_lengths.tolist() == [4, 4]
    assert ds.get_document(0).tolist() == [5, 6, 7, 9]
    assert ds.get_document(1, offset=1, length=2).tolist() == [2, 3]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=5)


def test_pickles_by_path(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "p.bin", dtype=np.int32)
    b.add_document(np.arange(100_000), [100_000])
    b.finalize(tmp_path / "p.idx")
    ds = IndexedDataset(tmp_path / "p")
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the 400 kB of tokens are re-mapped, not copied
    np.testing.assert_array_equal(pickle.loads(blob)[0], ds[0])


def test_add_item_end_document_and_suffix_prefix(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16)
    b.add_item([1, 2])
    b.add_item(np.array([3]))
    b.end_document()
    b.add_item([4, 5, 6])  # finalize closes the open document
    b.finalize(str(tmp_path / "x.idx"))
    ds = IndexedDataset(str(tmp_path / "x.bin"))  # a .bin/.idx path is accepted as the prefix
    assert ds.document_indices.tolist() == [0, 2, 3]
    assert [s.tolist() for s in ds[:]] == [[1, 2], [3], [4, 5, 6]]


def test_builder_rejects_bad_input(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "x.bin", dtype=np.uint16)
    with pytest.raises(ValueError, match="sum to"):
        b.add_document([1, 2, 3], [2])
    with pytest.raises(ValueError, match="do not fit dtype uint16"):
        b.add_document(np.array([70000], np.int64), [1])
    b.discard()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no Megatron index code"):
        IndexedDatasetBuilder(tmp_path / "y.bin", dtype=np.uint32)
    assert optimal_dtype(4096) == np.uint16 and optimal_dtype(128256) == np.int32


def test_exception_inside_builder_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(tmp_path / "x.bin") as b:
            b.add_document([1, 2], [2])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _write_small(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "d.bin", dtype=np.int32)
    b.add_document(np.arange(10), [4, 6])
    b.add_document(np.arange(5), [5])
    b.finalize(tmp_path / "d.idx")
    return tmp_path / "d"


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"index file .*nope\.idx.* does not exist"):
        IndexedDataset(tmp_path / "nope")
    prefix = _write_small(tmp_path)
    (tmp_path / "d.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"data file .*d\.bin"):
        IndexedDataset(prefix)


def test_corrupt_index_gives_clear_errors(tmp_path):
    prefix = _write_small(tmp_path)
    idx = tmp_path / "d.idx"
    good = idx.read_bytes()

    idx.write_bytes(b"TNTIDX\x00\x00\x00" + good[9:])
    with pytest.raises(ValueError, match="magic"):
        IndexedDataset(prefix)
    idx.write_bytes(good[:9] + struct.pack("<Q", 2) + good[17:])
    with pytest.raises(ValueError, match="version 2"):
        IndexedDataset(prefix)
    idx.write_bytes(good[:17] + struct.pack("<B", 42) + good[18:])
    with pytest.raises(ValueError, match="unknown dtype code 42"):
        IndexedDataset(prefix)
    idx.write_bytes(good[:-8])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        IndexedDataset(prefix)
    idx.write_bytes(good[:20])
    with pytest.raises(ValueError, match="truncated"):
        IndexedDataset(prefix)
    idx.write_bytes(good[:-8] + struct.pack("<q", 7))  # last document index != sequence count
    with pytest.raises(ValueError, match="inconsistent document indices"):
        IndexedDataset(prefix)


def test_truncated_or_mismatched_bin_gives_clear_error(tmp_path):
    prefix = _write_small(tmp_path)
    bin_path = tmp_path / "d.bin"
    good = bin_path.read_bytes()
    bin_path.write_bytes(good[:-4])
    with pytest.raises(ValueError, match=r"truncated: 56 bytes, but its index needs 60"):
        IndexedDataset(prefix)
    bin_path.write_bytes(good + b"\x00" * 4)
    with pytest.raises(ValueError, match="different runs"):
        IndexedDataset(prefix)


def test_empty_dataset_round_trips(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "e.bin", dtype=np.uint16)
    b.finalize(tmp_path / "e.idx")
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 0 and ds.document_indices.tolist() == [0]
