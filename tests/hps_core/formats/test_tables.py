"""Tests of hps_core.formats.tables: .npz archives, .npy pairs and format detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hps_core.errors import FormatError
from hps_core.formats import (
    detect_format,
    read_npy_pair,
    read_npz,
    read_table,
    write_npy_pair,
    write_npz,
    write_sparse_model,
)


def _table(n: int = 50, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    keys = rng.choice(10**9, size=n, replace=False).astype(np.int64)
    return keys, rng.standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("dim", [1, 16])
def test_npz_round_trip(tmp_path: Path, dim: int) -> None:
    keys, vectors = _table(dim=dim)
    write_npz(tmp_path / "t.npz", keys, vectors)
    table = read_npz(tmp_path / "t.npz", dim)
    np.testing.assert_array_equal(table.keys, keys)
    np.testing.assert_array_equal(table.vectors, vectors)
    assert table.keys.dtype == np.int64 and table.vectors.dtype == np.float32


@pytest.mark.parametrize("dim", [1, 16])
def test_npy_pair_round_trip_memory_mapped(tmp_path: Path, dim: int) -> None:
    keys, vectors = _table(dim=dim)
    write_npy_pair(tmp_path / "t", keys, vectors)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["keys.npy", "vectors.npy"]
    table = read_npy_pair(tmp_path / "t", dim)
    assert isinstance(table.vectors, np.memmap)
    np.testing.assert_array_equal(table.keys, keys)
    np.testing.assert_array_equal(table.vectors, vectors)
    assert not isinstance(read_npy_pair(tmp_path / "t", mmap=False).vectors, np.memmap)


def test_npy_written_by_numpy_save_is_read(tmp_path: Path) -> None:
    # Tables exported by training scripts: int32 / uint32 keys and float64 vectors convert.
    (tmp_path / "t").mkdir()
    np.save(tmp_path / "t" / "keys.npy", np.array([1, 2**32 - 1], dtype=np.uint32))
    np.save(tmp_path / "t" / "vectors.npy", np.ones((2, 3), dtype=np.float64))
    table = read_npy_pair(tmp_path / "t", 3)
    assert table.keys.dtype == np.int64 and table.keys[1] == 2**32 - 1
    assert table.vectors.dtype == np.float32


def test_npz_from_numpy_savez_compressed(tmp_path: Path) -> None:
    keys, vectors = _table()
    np.savez_compressed(tmp_path / "c.npz", keys=keys, vectors=vectors)
    np.testing.assert_array_equal(read_npz(tmp_path / "c.npz").vectors, vectors)


def test_empty_tables(tmp_path: Path) -> None:
    write_npz(tmp_path / "e.npz", np.empty(0, np.int64), np.empty((0, 4), np.float32))
    assert read_npz(tmp_path / "e.npz", 4).vectors.shape == (0, 4)
    write_npy_pair(tmp_path / "e", np.empty(0, np.int64), np.empty((0, 4), np.float32))
    assert len(read_npy_pair(tmp_path / "e", 4)) == 0


def test_mismatched_dim(tmp_path: Path) -> None:
    write_npz(tmp_path / "t.npz", *_table(dim=16))
    with pytest.raises(FormatError, match=r"t.npz: vectors have dim 16, expected 8"):
        read_npz(tmp_path / "t.npz", 8)
    write_npy_pair(tmp_path / "p", *_table(dim=16))
    with pytest.raises(FormatError, match=r"vectors have dim 16, expected 1"):
        read_npy_pair(tmp_path / "p", 1)


def test_npz_missing_member(tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", keys=np.arange(3), values=np.zeros((3, 2)))
    with pytest.raises(FormatError, match=r"member\(s\) \['vectors'\] missing"):
        read_npz(tmp_path / "t.npz")


def test_npz_truncated(tmp_path: Path) -> None:
    write_npz(tmp_path / "t.npz", *_table())
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="not a readable .npz archive"):
        read_npz(tmp_path / "t.npz")


def test_npy_truncated(tmp_path: Path) -> None:
    write_npy_pair(tmp_path / "t", *_table())
    path = tmp_path / "t" / "vectors.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FormatError, match=r"vectors.npy: not a readable .npy file"):
        read_npy_pair(tmp_path / "t")


def test_npy_missing_file(tmp_path: Path) -> None:
    write_npy_pair(tmp_path / "t", *_table())
    (tmp_path / "t" / "keys.npy").unlink()
    with pytest.raises(FormatError, match=r"keys.npy: file not found"):
        read_npy_pair(tmp_path / "t")


def test_npy_row_count_mismatch(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    np.save(tmp_path / "t" / "keys.npy", np.arange(3))
    np.save(tmp_path / "t" / "vectors.npy", np.zeros((4, 2), np.float32))
    with pytest.raises(FormatError, match="3 keys but 4 vector rows"):
        read_npy_pair(tmp_path / "t")


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    np.save(tmp_path / "t" / "keys.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    np.save(tmp_path / "t" / "vectors.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(FormatError, match="keys.npy: not a readable .npy file"):
        read_npy_pair(tmp_path / "t")


def test_writes_refuse_duplicates_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="duplicate"):
        write_npz(tmp_path / "t.npz", [1, 1], np.zeros((2, 2), np.float32))
    with pytest.raises(FormatError, match="duplicate"):
        write_npy_pair(tmp_path / "t", [1, 1], np.zeros((2, 2), np.float32))
    with pytest.raises(FormatError, match="must end in .npz"):
        write_npz(tmp_path / "t.zip", [1], np.zeros((1, 2), np.float32))
    assert not list(tmp_path.iterdir())


def test_check_unique_on_read(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", keys=np.array([4, 4]), vectors=np.zeros((2, 1), np.float32))
    assert len(read_npz(tmp_path / "d.npz")) == 2
    with pytest.raises(FormatError, match="duplicate"):
        read_npz(tmp_path / "d.npz", check_unique=True)


def test_detect_format_and_read_table(tmp_path: Path) -> None:
    keys, vectors = _table(dim=4)
    write_sparse_model(tmp_path / "h", keys, vectors)
    write_npz(tmp_path / "z.npz", keys, vectors)
    write_npy_pair(tmp_path / "n", keys, vectors)
    assert [detect_format(tmp_path / p) for p in ("h", "z.npz", "n")] == ["hugectr", "npz", "npy"]
    for name in ("h", "z.npz", "n"):
        table = read_table(tmp_path / name, 4)
        np.testing.assert_array_equal(table.keys, keys)
        np.testing.assert_array_equal(table.vectors, vectors)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="not a table"):
        read_table(tmp_path / "empty")
    with pytest.raises(FormatError, match="not a table"):
        detect_format(tmp_path / "missing.npz")
