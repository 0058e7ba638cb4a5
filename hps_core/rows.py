"""Rows of several tables in one flat buffer: the layout every multi-table call shares.

A lookup answers keys of tables with different vector widths in one pass, so its vectors do
not fit one 2-D array. They live in one flat float32 buffer instead, each row at a float
offset given per key, its width the width of the key's table::

    table_ids  (n,) int64        index into the call's tables (a model's tables, in order)
    offsets    (n,) int64        row i occupies buffer[offsets[i] : offsets[i] + dims[table_ids[i]]]
    dims       (T,) int64        width of each table

The tiers' ``fetch_tables``, the caches' ``*_tables`` calls and the lookup's unique-row and
output buffers all use it. This module holds the host (numba) row operations; the GPU caches
carry the device ones (``kernels/rows.cu``).

Rows stored as bytes (Redis hash values, RocksDB values) are packed in their table's row
format (:mod:`hps_core.row_formats`), ``sizes[t]`` bytes each: :func:`unpack_stored` joins a
batch of them once and dequantises them straight into the flat buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit

from hps_core.errors import RequestError
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import decode_rows

__all__ = ["check_rows_fit", "copy_rows", "fill_rows", "join_rows", "row_offsets", "row_sizes", "unpack_stored"]

Offsets = npt.NDArray[np.int64]


@njit(nogil=True, cache=True)
def copy_rows(src: Any, src_offsets: Any, dst: Any, dst_offsets: Any, table_ids: Any, dims: Any) -> None:
    """``dst[dst_offsets[i] : +w] = src[src_offsets[i] : +w]``, ``w = dims[table_ids[i]]``."""
    for i in range(table_ids.shape[0]):
        width = dims[table_ids[i]]
        s, d = src_offsets[i], dst_offsets[i]
        for j in range(width):
            dst[d + j] = src[s + j]


@njit(nogil=True, cache=True)
def fill_rows(dst: Any, dst_offsets: Any, table_ids: Any, dims: Any, values: Any) -> None:
    """Every element of row i of ``dst`` set to ``values[table_ids[i]]`` (a table's default)."""
    for i in range(table_ids.shape[0]):
        t = table_ids[i]
        d = dst_offsets[i]
        for j in range(dims[t]):
            dst[d + j] = values[t]


@njit(nogil=True, cache=True)
def row_offsets(table_ids: Any, dims: Any) -> Any:
    """Offsets of rows packed one after another in order; returns (offsets (n,), total floats)."""
    n = table_ids.shape[0]
    out = np.empty(n, np.int64)
    total = 0
    for i in range(n):
        out[i] = total
        total += dims[table_ids[i]]
    return out, total


@njit(nogil=True, cache=True)
def _first_misfit(table_ids: Any, offsets: Any, dims: Any, size: int) -> int:
    tables = dims.shape[0]
    for i in range(table_ids.shape[0]):
        t = table_ids[i]
        if t < 0 or t >= tables or offsets[i] < 0 or offsets[i] + dims[t] > size:
            return i
    return -1


def check_rows_fit(table_ids: Any, offsets: Any, dims: Any, size: int, what: str) -> None:
    """Refuse table ids outside ``[0, len(dims))`` and rows that do not fit a buffer of ``size``
    floats, naming the first offending position (``what`` names the call for the message)."""
    bad = _first_misfit(table_ids, offsets, dims, int(size))
    if bad >= 0:
        t = int(table_ids[bad])
        width = int(dims[t]) if 0 <= t < dims.shape[0] else "?"
        raise RequestError(
            f"{what}: position {bad} has table id {t} (of {dims.shape[0]} tables) and offset "
            f"{int(offsets[bad])}, width {width}, which does not fit the {size}-float buffer"
        )


def row_sizes(formats: Sequence[RowFormat], dims: Offsets) -> Offsets:
    """(T,) int64 bytes of one stored row of each table: ``formats[t].row_bytes(dims[t])``."""
    return np.array([fmt.row_bytes(int(dim)) for fmt, dim in zip(formats, dims.tolist())], np.int64)


def join_rows(values: list[bytes], sizes: Offsets) -> tuple[npt.NDArray[np.uint8], Offsets, int]:
    """Rows stored as bytes → one flat (m,) uint8 array (one ``b"".join``), the byte start of
    each row in it, and the position of the first value that is not ``sizes[i]`` bytes (-1
    when all fit; the caller names the table). ``sizes``: (n,) int64, the bytes value i
    must hold (its table's ``row_bytes(dim)``)."""
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    bad = np.flatnonzero(lengths != sizes)
    starts = np.zeros(len(values), np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    first_bad = int(bad[0]) if bad.shape[0] else -1
    return np.frombuffer(b"".join(values), dtype=np.uint8), starts, first_bad


def unpack_stored(
    values: list[bytes], table_ids: Offsets, dims: Offsets, codes: Offsets, sizes: Offsets, out: Any, offsets: Offsets
) -> int:
    """Stored rows → float32 rows of the flat buffer ``out``: value i, of table
    ``table_ids[i]``, is dequantised from its format (``codes``: (T,) int64 format codes,
    ``sizes``: (T,) int64 row bytes, :func:`row_sizes`) into ``out[offsets[i] : + dims[t]]``.

    One join and one :func:`~hps_core.row_formats.decode_rows` for the whole batch. Returns
    the position of the first value that is not its table's row size, writing nothing then
    (the caller raises StoredWidthError naming the table); -1 when every row was written."""
    data, starts, bad = join_rows(values, sizes[table_ids])
    if bad < 0:
        decode_rows(data, starts, table_ids, dims, codes, out, offsets)
    return bad
