"""Embedding tables as NumPy files: an ``.npz`` archive or a pair of ``.npy`` files.

Two layouts, both holding ``keys`` (n,) integer and ``vectors`` (n, dim) floating point:

- ``table.npz``: one uncompressed archive with members ``keys`` and ``vectors``;
- a folder with ``keys.npy`` and ``vectors.npy``: memory-mapped on read, so large tables
  open instantly.

They are the convenient exchange format for tools (training scripts, ``hps load``);
:func:`read_table` also opens HugeCTR sparse model folders, choosing by what it finds.
The checks match :mod:`hps_core.formats.hugectr`: keys 1-D integers fitting int64 (read as
int64), vectors 2-D floating point (read as float32), one row per key, ``dim`` checked when
given; writes are atomic per file and refuse duplicate keys.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from hps_core.errors import FormatError
from hps_core.formats.hugectr import (
    EMB_VECTOR_FILE,
    KEY_FILE,
    SparseTable,
    as_keys,
    as_vectors,
    atomic_write,
    check_dim,
    check_unique_keys,
    read_sparse_model,
)

__all__ = [
    "KEYS_NPY",
    "VECTORS_NPY",
    "detect_format",
    "read_npy_pair",
    "read_npz",
    "read_table",
    "write_npy_pair",
    "write_npz",
]

KEYS_NPY = "keys.npy"
VECTORS_NPY = "vectors.npy"


def _table(keys: Any, vectors: Any, dim: int | None, what: str,
           check_unique: bool) -> SparseTable:
    """Validate loaded arrays; keep memory maps when no conversion is needed."""
    check_dim(dim, what)
    key_arr = as_keys(keys, what)
    vec_arr = as_vectors(vectors, key_arr.shape[0], what)
    if dim is not None and vec_arr.shape[1] != dim:
        raise FormatError(f"{what}: vectors have dim {vec_arr.shape[1]}, expected {dim}; check "
                          "embedding_vecsize_per_table for this table")
    if check_unique:
        check_unique_keys(key_arr, what)
    return SparseTable(keys=key_arr, vectors=vec_arr)


def _load_npy(path: Path, mmap: bool) -> npt.NDArray[Any]:
    if not path.is_file():
        raise FormatError(f"{path}: file not found; a .npy table folder holds '{KEYS_NPY}' and "
                          f"'{VECTORS_NPY}'")
    try:
        # np.load is typed Any (it may answer an .npz archive); a .npy file is one array
        array: npt.NDArray[Any] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        return array
    except (ValueError, OSError, EOFError) as exc:
        raise FormatError(f"{path}: not a readable .npy file ({exc}); the file is truncated "
                          "or not written by numpy.save") from exc


def read_npy_pair(folder: str | os.PathLike[str], dim: int | None = None, *,
                  mmap: bool = True, check_unique: bool = False) -> SparseTable:
    """Read ``folder/keys.npy`` and ``folder/vectors.npy`` (memory-mapped by default)."""
    root = Path(folder)
    if not root.is_dir():
        raise FormatError(f"{root}: not a folder; expected a folder with '{KEYS_NPY}' and "
                          f"'{VECTORS_NPY}'")
    keys = _load_npy(root / KEYS_NPY, mmap)
    vectors = _load_npy(root / VECTORS_NPY, mmap)
    return _table(keys, vectors, dim, f"table {root}", check_unique)


def read_npz(path: str | os.PathLike[str], dim: int | None = None, *,
             check_unique: bool = False) -> SparseTable:
    """Read an ``.npz`` archive with members ``keys`` and ``vectors``."""
    file = Path(path)
    if not file.is_file():
        raise FormatError(f"{file}: file not found")
    try:
        with np.load(file, allow_pickle=False) as archive:
            members = {m: archive[m] for m in ("keys", "vectors") if m in archive.files}
            present = list(archive.files)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{file}: not a readable .npz archive ({exc}); the file is "
                          "truncated or not written by numpy.savez") from exc
    missing = [m for m in ("keys", "vectors") if m not in members]
    if missing:
        raise FormatError(f"{file}: member(s) {missing} missing (has {present}); save with "
                          "np.savez(path, keys=..., vectors=...)")
    return _table(members["keys"], members["vectors"], dim, f"table {file}", check_unique)


def write_npy_pair(folder: str | os.PathLike[str], keys: Any, vectors: Any) -> None:
    """Write ``folder/keys.npy`` (int64) and ``folder/vectors.npy`` (float32) atomically."""
    root = Path(folder)
    table = _table(keys, vectors, None, f"table {root}", check_unique=True)
    root.mkdir(parents=True, exist_ok=True)
    _save_npy(root / VECTORS_NPY, table.vectors)
    _save_npy(root / KEYS_NPY, table.keys)


def _save_npy(path: Path, array: npt.NDArray[Any]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    atomic_write(path, write)


def write_npz(path: str | os.PathLike[str], keys: Any, vectors: Any) -> None:
    """Write an uncompressed ``.npz`` with ``keys`` (int64) and ``vectors`` (float32)."""
    file = Path(path)
    if file.suffix != ".npz":
        raise FormatError(f"{file}: an archive table must end in .npz")
    table = _table(keys, vectors, None, f"table {file}", check_unique=True)
    file.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, keys=table.keys, vectors=table.vectors)

    atomic_write(file, write)


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"hugectr"``, ``"npz"`` or ``"npy"`` for a table at ``path``; FormatError if none."""
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        return "npz"
    if p.is_dir():
        if (p / KEY_FILE).is_file() or (p / EMB_VECTOR_FILE).is_file():
            return "hugectr"
        if (p / KEYS_NPY).is_file() or (p / VECTORS_NPY).is_file():
            return "npy"
    raise FormatError(f"{p}: not a table; expected a HugeCTR sparse model folder ('{KEY_FILE}' "
                      f"+ '{EMB_VECTOR_FILE}'), a folder with '{KEYS_NPY}' + '{VECTORS_NPY}', "
                      "or a .npz file")


def read_table(path: str | os.PathLike[str], dim: int | None = None, *,
               check_unique: bool = False) -> SparseTable:
    """Read a table in any supported layout (see :func:`detect_format`)."""
    fmt = detect_format(path)
    if fmt == "hugectr":
        return read_sparse_model(path, dim, check_unique=check_unique)
    if fmt == "npz":
        return read_npz(path, dim, check_unique=check_unique)
    return read_npy_pair(path, dim, check_unique=check_unique)
