"""In-process volatile tier: a partitioned open-addressing hash map compiled with numba.

Layout, per table::

    table ─ partition[p] for p in range(num_partitions)   (p = mix(key) >> 32 mod P)
              slots   int64[cap, 2]   (key, row) pairs; open addressing, linear probing,
                                      cap a power of two, load factor <= 1/2,
                                      grown by rehash into a table twice as large
              values  float32[rows_cap, dim]   rows appended; a rehash leaves them be,
                                               growth copies them to a larger array

An empty slot is marked by row -1, never by a magic key: every int64 is a valid key, while
a row index is never negative. Key and row share a 16-byte slot so a probe touches one
cache line, not three arrays.

Every per-key loop is a ``@njit(nogil=True, cache=True)`` kernel; Python only splits a batch
by partition (itself a numba counting sort) and walks the partitions.

Thread safety: one ``threading.Lock`` per partition, taken by readers and writers alike.
A rehash or a value-array growth replaces the arrays a reader would be probing, so a
reader must not run beside a writer of the same partition; a plain lock is the simplest
scheme that is obviously correct (without the read lock, the stress test in
tests/hps_core/db/test_hash_map.py crashes: a reader pairs new slots with old values).
The kernels release the GIL, so threads working on different partitions run in
parallel, and batches are cut into chunks of at most
``max_get_batch_size`` / ``max_set_batch_size`` keys per lock hold so a large insert
cannot stall readers for long.

Not yet here (HugeCTR has them): overflow margin and eviction policies, deletion.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit

from hps_core.db.base import (
    Keys,
    Mask,
    Vectors,
    check_dim,
    check_keys,
    check_out,
    check_table_name,
    check_values,
    unknown_table,
)
from hps_core.errors import ConfigError, TierError

__all__ = ["HashMapVolatileDB"]

# HugeCTR's defaults for the hash-map backend (VolatileDatabaseParams).
DEFAULT_NUM_PARTITIONS = min(16, os.cpu_count() or 1)
DEFAULT_MAX_BATCH_SIZE = 10_000
_MIN_SLOTS = 16
_SLOT_BYTES = 16  # (key, row) as two int64
_EMPTY = -1  # row of an empty slot

# splitmix64 finaliser constants, typed uint64 so numba never promotes to float64
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S32 = np.uint64(32)


# --------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True, inline="always")
def _mix(key: int) -> Any:
    """splitmix64 finaliser: sequential keys (the common case) spread over all slots."""
    x = np.uint64(key)
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


@njit(nogil=True, cache=True)
def _group_by_partition(keys: Keys, num_partitions: int) -> tuple[Any, Any]:
    """Stable counting sort of batch positions by partition.

    Returns ``order`` (positions, grouped) and ``offsets`` (P+1): partition p owns
    ``order[offsets[p]:offsets[p+1]]``. Stability keeps batch order inside a partition,
    which is what makes "last duplicate wins" hold for inserts.
    """
    n = keys.shape[0]
    parts = np.empty(n, np.int64)
    offsets = np.zeros(num_partitions + 1, np.int64)
    nparts = np.uint64(num_partitions)
    for i in range(n):
        p = np.int64((_mix(keys[i]) >> _S32) % nparts)
        parts[i] = p
        offsets[p + 1] += 1
    for p in range(num_partitions):
        offsets[p + 1] += offsets[p]
    cursor = offsets[:-1].copy()
    order = np.empty(n, np.int64)
    for i in range(n):
        p = parts[i]
        order[cursor[p]] = i
        cursor[p] += 1
    return order, offsets


@njit(nogil=True, cache=True)
def _find(
    keys: Keys, positions: Any, slots: Any, values: Vectors, out: Vectors, found: Mask
) -> None:
    """For each ``i`` in ``positions``: if ``keys[i]`` is stored, copy its row to ``out[i]``."""
    mask = np.uint64(slots.shape[0] - 1)
    dim = values.shape[1]
    for j in range(positions.shape[0]):
        i = positions[j]
        key = keys[i]
        s = _mix(key) & mask
        while slots[s, 1] != _EMPTY:
            if slots[s, 0] == key:
                row = slots[s, 1]
                for d in range(dim):
                    out[i, d] = values[row, d]
                found[i] = True
                break
            s = (s + np.uint64(1)) & mask


@njit(nogil=True, cache=True)
def _upsert(
    keys: Keys, positions: Any, src: Vectors, slots: Any, values: Vectors, n_rows: int
) -> int:
    """Store ``src[i]`` under ``keys[i]`` for each ``i`` in ``positions``, in order.

    The caller guarantees room: enough free slots to stay under load 1/2 and enough free
    value rows for every key being new. Returns the new number of rows.
    """
    mask = np.uint64(slots.shape[0] - 1)
    dim = values.shape[1]
    for j in range(positions.shape[0]):
        i = positions[j]
        key = keys[i]
        s = _mix(key) & mask
        while slots[s, 1] != _EMPTY and slots[s, 0] != key:
            s = (s + np.uint64(1)) & mask
        row = slots[s, 1]
        if row == _EMPTY:
            row = n_rows
            n_rows += 1
            slots[s, 0] = key
            slots[s, 1] = row
        for d in range(dim):
            values[row, d] = src[i, d]
    return n_rows


@njit(nogil=True, cache=True)
def _rehash(old: Any, new: Any) -> None:
    """Re-insert every occupied slot of ``old`` into the (larger, empty) ``new``."""
    mask = np.uint64(new.shape[0] - 1)
    for s_old in range(old.shape[0]):
        if old[s_old, 1] != _EMPTY:
            key = old[s_old, 0]
            s = _mix(key) & mask
            while new[s, 1] != _EMPTY:
                s = (s + np.uint64(1)) & mask
            new[s, 0] = key
            new[s, 1] = old[s_old, 1]


# --------------------------------------------------------------------------- storage


def _pow2_at_least(n: int) -> int:
    return max(_MIN_SLOTS, 1 << (max(n, 1) - 1).bit_length())


def _empty_slots(count: int) -> Any:
    return np.full((count, 2), _EMPTY, dtype=np.int64)


@dataclass(eq=False)
class _Partition:
    """One independently locked open-addressing table plus its value rows."""

    dim: int
    slots: Any  # int64[cap, 2]: (key, row), row == _EMPTY for a free slot
    values: Vectors
    n_rows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def empty(cls, dim: int, expected_rows: int) -> _Partition:
        return cls(
            dim=dim,
            slots=_empty_slots(_pow2_at_least(2 * expected_rows)),
            values=np.empty((max(expected_rows, 1), dim), np.float32),
        )

    @property
    def capacity(self) -> int:
        return int(self.slots.shape[0])

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more keys (all assumed new). Caller holds the lock."""
        needed = self.n_rows + extra
        if 2 * needed > self.capacity:
            grown_slots = _empty_slots(_pow2_at_least(2 * needed))
            _rehash(self.slots, grown_slots)
            self.slots = grown_slots
        if needed > self.values.shape[0]:
            # geometric growth keeps appends amortised O(1)
            rows = max(needed, 2 * self.values.shape[0])
            grown = np.empty((rows, self.dim), np.float32)
            grown[: self.n_rows] = self.values[: self.n_rows]
            self.values = grown

    def nbytes(self) -> int:
        return int(self.slots.nbytes + self.values.nbytes)


@dataclass(eq=False)
class _Table:
    dim: int
    partitions: list[_Partition]


# --------------------------------------------------------------------------- the tier


class HashMapVolatileDB:
    """Volatile tier in this process's memory (HugeCTR ``hash_map`` / ``parallel_hash_map``).

    Args:
        num_partitions: independently locked partitions per table; threads working on
            different partitions run in parallel. HugeCTR default: min(16, CPU count).
        max_get_batch_size: most keys looked up per partition under one lock hold.
        max_set_batch_size: most keys written per partition under one lock hold.
        initial_capacity: rows per table to allocate for up front (avoids early rehashes
            when the table size is known, e.g. when loading a sparse model).
    """

    def __init__(
        self,
        *,
        num_partitions: int = DEFAULT_NUM_PARTITIONS,
        max_get_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_set_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        initial_capacity: int = 0,
    ) -> None:
        for name, value in (
            ("num_partitions", num_partitions),
            ("max_get_batch_size", max_get_batch_size),
            ("max_set_batch_size", max_set_batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"volatile_db.{name} must be a positive integer, got {value!r}")
        cap = initial_capacity
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ConfigError(f"initial_capacity must be a non-negative integer, got {cap!r}")
        self._num_partitions = num_partitions
        self._max_get = max_get_batch_size
        self._max_set = max_set_batch_size
        self._initial_capacity = initial_capacity
        self._tables: dict[str, _Table] = {}
        self._tables_lock = threading.Lock()  # guards the dict, not the data
        self._closed = False

    @classmethod
    def from_config(cls, cfg: Any) -> HashMapVolatileDB:
        """Build from a VolatileDBConfig (read by HugeCTR field names; absent → default)."""
        return cls(
            num_partitions=getattr(cfg, "num_partitions", DEFAULT_NUM_PARTITIONS),
            max_get_batch_size=getattr(cfg, "max_get_batch_size", DEFAULT_MAX_BATCH_SIZE),
            max_set_batch_size=getattr(cfg, "max_set_batch_size", DEFAULT_MAX_BATCH_SIZE),
        )

    def __repr__(self) -> str:
        parts, tables = self._num_partitions, len(self._tables)
        return f"HashMapVolatileDB(num_partitions={parts}, tables={tables})"

    # ---------------------------------------------------------------- contract

    def create_table(self, table: str, dim: int) -> None:
        check_table_name(table)
        dim = check_dim(table, dim)
        with self._tables_lock:
            self._check_open()
            existing = self._tables.get(table)
            if existing is not None:
                if existing.dim != dim:
                    raise ConfigError(
                        f"table {table!r} already exists with dim {existing.dim}, not {dim}"
                    )
                return
            per_part = -(-self._initial_capacity // self._num_partitions)
            self._tables[table] = _Table(
                dim, [_Partition.empty(dim, per_part) for _ in range(self._num_partitions)]
            )

    def insert(self, table: str, keys: Keys, values: Vectors) -> None:
        t = self._table(table)
        keys = check_keys(table, keys)
        values = check_values(table, values, keys.shape[0], t.dim)
        if keys.shape[0] == 0:
            return
        order, offsets = self._group(keys)
        for p, part in enumerate(t.partitions):
            group = order[offsets[p] : offsets[p + 1]]
            for start in range(0, group.shape[0], self._max_set):
                chunk = group[start : start + self._max_set]
                with part.lock:
                    part.reserve(chunk.shape[0])
                    part.n_rows = _upsert(keys, chunk, values, part.slots, part.values, part.n_rows)

    def fetch(self, table: str, keys: Keys, out: Vectors) -> Mask:
        t = self._table(table)
        keys = check_keys(table, keys)
        out = check_out(table, out, keys.shape[0], t.dim)
        found = np.zeros(keys.shape[0], np.bool_)
        if keys.shape[0] == 0:
            return found
        order, offsets = self._group(keys)
        for p, part in enumerate(t.partitions):
            group = order[offsets[p] : offsets[p + 1]]
            for start in range(0, group.shape[0], self._max_get):
                chunk = group[start : start + self._max_get]
                with part.lock:
                    _find(keys, chunk, part.slots, part.values, out, found)
        return found

    def count(self, table: str) -> int:
        return sum(part.n_rows for part in self._table(table).partitions)

    def table_names(self) -> list[str]:
        self._check_open()
        return sorted(self._tables)

    def dim(self, table: str) -> int:
        return self._table(table).dim

    def close(self) -> None:
        with self._tables_lock:
            self._closed = True
            self._tables.clear()  # drop the arrays now, not when the object dies

    # ---------------------------------------------------------------- extras

    def memory_bytes(self, table: str) -> int:
        """Bytes allocated for ``table``: slot arrays plus value rows, spare room included."""
        return sum(part.nbytes() for part in self._table(table).partitions)

    def bytes_per_row(self, table: str) -> float:
        """Allocated bytes per stored key (vector + slot overhead + spare room).

        For an empty table, the steady-state floor: the vector plus two slots' worth of
        slot arrays (load factor 1/2).
        """
        t = self._table(table)
        n = self.count(table)
        if n == 0:
            return float(4 * t.dim + 2 * _SLOT_BYTES)
        return self.memory_bytes(table) / n

    # ---------------------------------------------------------------- helpers

    def _check_open(self) -> None:
        if self._closed:
            raise TierError("the hash-map volatile tier is closed")

    def _group(self, keys: Keys) -> tuple[Any, Any]:
        """Batch positions grouped by partition (see _group_by_partition)."""
        if self._num_partitions == 1:  # nothing to group: skip a pass over the batch
            return np.arange(keys.shape[0], dtype=np.int64), np.array([0, keys.shape[0]], np.int64)
        return _group_by_partition(keys, self._num_partitions)  # type: ignore[no-any-return]

    def _table(self, table: str) -> _Table:
        self._check_open()
        t = self._tables.get(table)
        if t is None:
            raise unknown_table(table, self._tables)
        return t
