"""Embedding table files: HugeCTR sparse model folders and NumPy ``.npy``/``.npz`` tables.

All readers return a :class:`SparseTable` (``keys`` int64 (n,), ``vectors`` float32
(n, dim)) and raise :class:`~hps_core.errors.FormatError` naming the file, the sizes found and
the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from hps_core.formats.hugectr import (
    Chunk,
    SparseTable,
    first_non_finite,
    iter_sparse_model_chunks,
    read_sparse_model,
    sparse_model_rows,
    stream_sparse_model,
    write_sparse_model,
)
from hps_core.formats.tables import (
    detect_format,
    read_npy_pair,
    read_npz,
    read_table,
    write_npy_pair,
    write_npz,
)

__all__ = [
    "Chunk",
    "SparseTable",
    "detect_format",
    "iter_sparse_model_chunks",
    "read_npy_pair",
    "read_npz",
    "read_sparse_model",
    "read_table",
    "sparse_model_rows",
    "stream_sparse_model",
    "stream_table",
    "write_npy_pair",
    "write_npz",
    "write_sparse_model",
]


def stream_table(path: str | os.PathLike[str], dim: int, start: int, stop: int, chunk_rows: int
                 ) -> Iterator[Chunk]:
    """Rows ``[start, stop)`` of any table file as :data:`~hps_core.formats.hugectr.Chunk` s (each
    with its first non-finite row, or -1); a HugeCTR folder is read with plain reads into
    reused buffers (:func:`stream_sparse_model`), a NumPy file through its memory map."""
    if detect_format(path) == "hugectr":
        yield from stream_sparse_model(path, dim, start, stop, chunk_rows)
        return
    table = read_table(path, dim)
    for lo in range(start, min(stop, len(table)), chunk_rows):
        hi = min(lo + chunk_rows, stop, len(table))
        vectors = np.ascontiguousarray(table.vectors[lo:hi], dtype=np.float32)
        yield lo, np.ascontiguousarray(table.keys[lo:hi], dtype=np.int64), vectors, first_non_finite(vectors)
