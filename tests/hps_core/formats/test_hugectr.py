"""Tests of hps_core.formats.hugectr: HugeCTR sparse model folders (key + emb_vector)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import hps_core.formats as formats_module
import hps_core.formats.hugectr as hugectr
from hps_core.errors import FormatError
from hps_core.formats import (
    SparseTable,
    iter_sparse_model_chunks,
    read_sparse_model,
    sparse_model_rows,
    write_sparse_model,
)


def _table(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.permutation(np.arange(n, dtype=np.int64) * 7 - 3)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return keys, vectors


def _write_raw(folder: Path, key_bytes: bytes, vec_bytes: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key").write_bytes(key_bytes)
    (folder / "emb_vector").write_bytes(vec_bytes)
    return folder


def test_file_layout_is_hugectr_raw_little_endian(tmp_path: Path) -> None:
    keys = np.array([3, -1, 2**40], dtype=np.int64)
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    write_sparse_model(tmp_path / "t", keys, vectors)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["emb_vector", "key"]
    assert (tmp_path / "t" / "key").read_bytes() == keys.astype("<i8").tobytes()
    assert (tmp_path / "t" / "emb_vector").read_bytes() == vectors.astype("<f4").tobytes()


@pytest.mark.parametrize("dim", [1, 16, 128])
def test_round_trip(tmp_path: Path, dim: int) -> None:
    keys, vectors = _table(257, dim)
    write_sparse_model(tmp_path / "t", keys, vectors)
    table = read_sparse_model(tmp_path / "t", dim)
    assert table.dim == dim and len(table) == 257
    np.testing.assert_array_equal(table.keys, keys)
    np.testing.assert_array_equal(table.vectors, vectors)
    assert table.keys.dtype == np.int64 and table.vectors.dtype == np.float32


def test_dim_inferred_from_file_sizes(tmp_path: Path) -> None:
    write_sparse_model(tmp_path / "t", *_table(10, 16))
    assert read_sparse_model(tmp_path / "t").dim == 16
    assert sparse_model_rows(tmp_path / "t") == (10, 16)
    assert sparse_model_rows(tmp_path / "t", 16) == (10, 16)


def test_read_is_memory_mapped_and_read_only(tmp_path: Path) -> None:
    write_sparse_model(tmp_path / "t", *_table(8, 4))
    table = read_sparse_model(tmp_path / "t", 4)
    assert isinstance(table.keys, np.memmap) and isinstance(table.vectors, np.memmap)
    assert not table.vectors.flags.writeable
    with pytest.raises(ValueError):
        table.vectors[0, 0] = 1.0


def test_uint32_range_keys_round_trip(tmp_path: Path) -> None:
    # Models trained with 32-bit keys: HugeCTR still stores int64 in the key file.
    keys = np.array([0, 1, 2**31, 2**32 - 1], dtype=np.uint32)
    write_sparse_model(tmp_path / "t", keys, np.ones((4, 2), np.float32))
    table = read_sparse_model(tmp_path / "t", 2)
    np.testing.assert_array_equal(table.keys, keys.astype(np.int64))
    assert int(table.keys.max()) == 2**32 - 1


def test_int64_extreme_keys_round_trip(tmp_path: Path) -> None:
    info = np.iinfo(np.int64)
    keys = np.array([info.min, -1, 0, info.max], dtype=np.int64)
    write_sparse_model(tmp_path / "t", keys, np.zeros((4, 1), np.float32))
    np.testing.assert_array_equal(read_sparse_model(tmp_path / "t", 1).keys, keys)


def test_uint64_keys_beyond_int64_rejected(tmp_path: Path) -> None:
    keys = np.array([1, 2**63], dtype=np.uint64)
    with pytest.raises(FormatError, match="does not fit int64"):
        write_sparse_model(tmp_path / "t", keys, np.zeros((2, 1), np.float32))


def test_empty_table(tmp_path: Path) -> None:
    write_sparse_model(tmp_path / "t", np.empty(0, np.int64), np.empty((0, 8), np.float32))
    table = read_sparse_model(tmp_path / "t", 8)
    assert len(table) == 0 and table.vectors.shape == (0, 8)
    assert list(iter_sparse_model_chunks(tmp_path / "t", 8, 4)) == []
    with pytest.raises(FormatError, match="empty, so its dim cannot be inferred; pass dim"):
        read_sparse_model(tmp_path / "t")


def test_float64_vectors_stored_as_float32(tmp_path: Path) -> None:
    vectors = np.array([[0.1, 0.2]], dtype=np.float64)
    write_sparse_model(tmp_path / "t", [5], vectors)
    np.testing.assert_array_equal(read_sparse_model(tmp_path / "t", 2).vectors,
                                  vectors.astype(np.float32))


def test_write_overwrites_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    write_sparse_model(tmp_path / "t", *_table(10, 4))
    keys, vectors = _table(3, 2, seed=1)
    write_sparse_model(tmp_path / "t", keys, vectors)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["emb_vector", "key"]
    np.testing.assert_array_equal(read_sparse_model(tmp_path / "t", 2).keys, keys)


def test_write_creates_nested_folders(tmp_path: Path) -> None:
    write_sparse_model(tmp_path / "a" / "b" / "wdl0_sparse.model", [1], [[1.0]])
    assert read_sparse_model(tmp_path / "a" / "b" / "wdl0_sparse.model").dim == 1


def test_chunks_cover_table_in_order(tmp_path: Path) -> None:
    keys, vectors = _table(10, 3)
    write_sparse_model(tmp_path / "t", keys, vectors)
    chunks = list(iter_sparse_model_chunks(tmp_path / "t", 3, 4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([c.keys for c in chunks]), keys)
    np.testing.assert_array_equal(np.concatenate([c.vectors for c in chunks]), vectors)
    assert [len(c) for c in iter_sparse_model_chunks(tmp_path / "t", None, 100)] == [10]


@pytest.mark.parametrize("chunk_rows", [0, -1, 2.5, True])
def test_chunks_reject_bad_chunk_rows(tmp_path: Path, chunk_rows: object) -> None:
    write_sparse_model(tmp_path / "t", *_table(4, 1))
    with pytest.raises(FormatError, match="chunk_rows"):
        list(iter_sparse_model_chunks(tmp_path / "t", 1, chunk_rows))  # type: ignore[arg-type]


def test_duplicate_keys_refused_on_write(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"1 duplicate key\(s\), e.g. 7"):
        write_sparse_model(tmp_path / "t", [7, 1, 7], np.zeros((3, 2), np.float32))
    assert not (tmp_path / "t" / "key").exists()


def test_duplicate_keys_tolerated_on_read_unless_asked(tmp_path: Path) -> None:
    folder = _write_raw(tmp_path / "t", np.array([7, 1, 7], "<i8").tobytes(),
                        np.zeros(6, "<f4").tobytes())
    assert len(read_sparse_model(folder, 2)) == 3  # as HugeCTR: no check
    with pytest.raises(FormatError, match="duplicate"):
        read_sparse_model(folder, 2, check_unique=True)


@pytest.mark.parametrize("budget", [None, 1_000, 100])  # one sorted copy; 2^k hash groups of ~budget keys
def test_the_unique_check_counts_and_names_the_same_whatever_its_memory_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int | None) -> None:
    """check_unique_keys over a memory-mapped key file, read in pieces of 64 keys: the sorted
    copy of all keys, or groups by hash when they exceed the budget, find the same duplicates
    (the count of rows repeating an earlier key; the smallest repeated key)."""
    monkeypatch.setattr(hugectr, "_SCAN_KEYS", 64)
    if budget is not None:
        monkeypatch.setattr(hugectr, "UNIQUE_CHECK_KEYS", budget)
    keys = np.random.default_rng(0).permutation(np.arange(5_000, dtype=np.int64) * 7 - 3_000)
    write_sparse_model(tmp_path / "t", keys, np.zeros((keys.size, 1), np.float32))
    hugectr.check_unique_keys(read_sparse_model(tmp_path / "t", 1).keys, "t")
    keys[[100, 4_000, 4_999]] = keys[[7, 7, 3_333]]  # key of row 7 three times, of row 3,333 twice
    keys.tofile(tmp_path / "t" / "key")
    mapped = read_sparse_model(tmp_path / "t", 1).keys
    assert isinstance(mapped, np.memmap)
    with pytest.raises(FormatError, match=rf"^t: 3 duplicate key\(s\), e\.g\. {min(keys[7], keys[3_333])}; "):
        hugectr.check_unique_keys(mapped, "t")


def test_increasing_keys_are_unique_without_a_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strictly increasing keys (across the pieces' borders too) pass on one read; a repeat at
    a border is still found."""
    monkeypatch.setattr(hugectr, "_SCAN_KEYS", 64)
    assert hugectr._strictly_increasing(np.arange(1_000, dtype=np.int64) * 3)
    hugectr.check_unique_keys(np.arange(1_000, dtype=np.int64) * 3, "t")
    keys = np.arange(1_000, dtype=np.int64)
    keys[64] = keys[63]  # the first key of the second piece repeats the last of the first
    assert not hugectr._strictly_increasing(keys)
    with pytest.raises(FormatError, match=r"1 duplicate key\(s\), e\.g\. 63;"):
        hugectr.check_unique_keys(keys, "t")


# --------------------------------------------------------------------------------------------
# Malformed folders: each error names the file, the sizes and the expectation.
# --------------------------------------------------------------------------------------------
def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=rf"{tmp_path / 'nope'} does not exist.*sparse_files"):
        read_sparse_model(tmp_path / "nope", 4)


def test_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(FormatError, match="is not a folder"):
        read_sparse_model(tmp_path / "f", 4)


@pytest.mark.parametrize("missing", ["key", "emb_vector"])
def test_missing_file(tmp_path: Path, missing: str) -> None:
    write_sparse_model(tmp_path / "t", *_table(2, 2))
    (tmp_path / "t" / missing).unlink()
    with pytest.raises(FormatError, match=f"file '{missing}' is missing"):
        read_sparse_model(tmp_path / "t", 2)


def test_key_file_not_multiple_of_8(tmp_path: Path) -> None:
    folder = _write_raw(tmp_path / "t", b"\x00" * 12, b"\x00" * 8)
    with pytest.raises(FormatError, match=r"key: size 12 bytes is not a multiple of 8"):
        read_sparse_model(folder, 1)


def test_emb_vector_not_multiple_of_4(tmp_path: Path) -> None:
    folder = _write_raw(tmp_path / "t", b"\x00" * 8, b"\x00" * 6)
    with pytest.raises(FormatError, match=r"emb_vector: size 6 bytes is not a multiple of 4"):
        read_sparse_model(folder)


def test_truncated_emb_vector_with_dim(tmp_path: Path) -> None:
    keys, vectors = _table(10, 16)
    folder = _write_raw(tmp_path / "t", keys.tobytes(), vectors.tobytes()[:-64])
    with pytest.raises(FormatError) as info:
        read_sparse_model(folder, 16)
    message = str(info.value)
    assert str(folder / "emb_vector") in message
    assert "size 576 bytes, expected 640 bytes = 10 keys x dim 16 x 4" in message
    assert "embedding_vecsize_per_table" in message


def test_truncated_emb_vector_without_dim(tmp_path: Path) -> None:
    keys, vectors = _table(10, 16)
    folder = _write_raw(tmp_path / "t", keys.tobytes(), vectors.tobytes()[:-4])
    with pytest.raises(FormatError, match="159 floats is not a whole number of rows for 10 keys"):
        read_sparse_model(folder)


def test_mismatched_dim(tmp_path: Path) -> None:
    write_sparse_model(tmp_path / "t", *_table(10, 16))
    with pytest.raises(FormatError, match=r"10 keys x dim 8 x 4 \(it holds 16 floats per key\)"):
        read_sparse_model(tmp_path / "t", 8)


def test_vectors_without_keys(tmp_path: Path) -> None:
    folder = _write_raw(tmp_path / "t", b"", b"\x00" * 16)
    with pytest.raises(FormatError, match="4 floats but 'key' is empty"):
        read_sparse_model(folder)
    with pytest.raises(FormatError, match="expected 0 bytes"):
        read_sparse_model(folder, 4)


@pytest.mark.parametrize("dim", [0, -3, 1.5, True, "16"])
def test_bad_dim_argument(tmp_path: Path, dim: object) -> None:
    write_sparse_model(tmp_path / "t", *_table(2, 2))
    with pytest.raises(FormatError, match="dim must be a positive integer"):
        read_sparse_model(tmp_path / "t", dim)  # type: ignore[arg-type]


@pytest.mark.parametrize(("keys", "vectors", "words"), [
    (np.zeros((2, 1), np.int64), np.zeros((2, 1), np.float32), "keys must be 1-D"),
    (np.array([1.0, 2.0]), np.zeros((2, 1), np.float32), "keys must be integers"),
    (np.array([1, 2]), np.zeros(2, np.float32), "vectors must be 2-D"),
    (np.array([1, 2]), np.zeros((2, 1), np.int32), "vectors must be floating point"),
    (np.array([1, 2]), np.zeros((3, 1), np.float32), "2 keys but 3 vector rows"),
    (np.array([1, 2]), np.zeros((2, 0), np.float32), "width 0"),
])
def test_write_rejects_bad_arrays(tmp_path: Path, keys: np.ndarray, vectors: np.ndarray,
                                  words: str) -> None:
    with pytest.raises(FormatError, match=words):
        write_sparse_model(tmp_path / "t", keys, vectors)


def test_sparse_table_checks_its_arrays() -> None:
    with pytest.raises(FormatError, match="keys must be 1-D int64"):
        SparseTable(np.zeros(2, np.int32), np.zeros((2, 1), np.float32))
    with pytest.raises(FormatError, match="vectors must be 2-D float32"):
        SparseTable(np.zeros(2, np.int64), np.zeros((2, 1), np.float64))
    with pytest.raises(FormatError, match="2 keys but 3 vectors"):
        SparseTable(np.zeros(2, np.int64), np.zeros((3, 1), np.float32))


def test_exported_names() -> None:
    assert set(formats_module.__all__) == {
        "Chunk", "SparseTable", "detect_format", "iter_sparse_model_chunks", "read_npy_pair", "read_npz",
        "read_sparse_model", "read_table", "sparse_model_rows", "stream_sparse_model", "stream_table",
        "write_npy_pair", "write_npz", "write_sparse_model",
    }
    for name in formats_module.__all__:
        assert hasattr(formats_module, name)


def test_stream_reads_rows_in_two_reused_buffers(tmp_path: Path) -> None:
    keys = np.arange(1_000, dtype=np.int64) * 3 - 500
    vectors = np.random.default_rng(1).random((1_000, 7), dtype=np.float32)
    write_sparse_model(tmp_path / "t", keys, vectors)
    chunks = [(lo, k.copy(), v.copy(), k.ctypes.data, bad) for lo, k, v, bad in
              formats_module.stream_sparse_model(tmp_path / "t", 7, 10, 990, 256)]
    assert {c[4] for c in chunks} == {-1}  # every row finite
    assert [c[0] for c in chunks] == [10, 266, 522, 778]
    assert len({c[3] for c in chunks}) == 2  # two buffers taking turns, whatever the table's size
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), keys[10:990])
    np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), vectors[10:990])
    assert list(formats_module.stream_sparse_model(tmp_path / "t", 7, 5, 5, 256)) == []
    vectors[600, 2], vectors[700, 0] = np.inf, np.nan
    write_sparse_model(tmp_path / "t", keys, vectors)
    firsts = [(lo, bad) for lo, _, _, bad in formats_module.stream_sparse_model(tmp_path / "t", 7, 10, 990, 256)]
    assert firsts == [(10, -1), (266, -1), (522, 600 - 522), (778, -1)]  # each chunk's first non-finite row
