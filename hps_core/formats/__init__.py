"""Embedding table files: HugeCTR sparse model folders and NumPy ``.npy``/``.npz`` tables.

All readers return a :class:`SparseTable` (``keys`` int64 (n,), ``vectors`` float32
(n, dim)) and raise :class:`~hps_core.errors.FormatError` naming the file, the sizes found and
the fix.
"""

from __future__ import annotations

from hps_core.formats.hugectr import (
    SparseTable,
    iter_sparse_model_chunks,
    read_sparse_model,
    sparse_model_rows,
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
    "SparseTable",
    "detect_format",
    "iter_sparse_model_chunks",
    "read_npy_pair",
    "read_npz",
    "read_sparse_model",
    "read_table",
    "sparse_model_rows",
    "write_npy_pair",
    "write_npz",
    "write_sparse_model",
]
