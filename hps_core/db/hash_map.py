"""In-process volatile tier: a partitioned open-addressing hash map compiled with numba.

Layout, per table (rows packed in the table's row format, :mod:`hps_core.row_formats`)::

    table ─ partition[p] for p in range(num_partitions)   (p = mix(key) >> 32 mod P)
              slots   int64[cap, 2]   (key, row) pairs; open addressing, linear probing,
                                      cap a power of two, load factor <= 1/2,
                                      grown by rehash into a table twice as large
              rows    uint8[rows_cap, stride]   rows 0..n_rows-1, dense; a rehash leaves them
                                      be, growth copies them to a larger array. Each row is
                                      a header of int64 words, seen through an int64 view
                                      ``meta``: the key, then the access stat when the
                                      overflow policy reads one (last-access stamp for
                                      ``evict_oldest``, access count for
                                      ``evict_least_used``); then the packed row
                                      (``row_format.row_bytes(dim)``), padded to 8 bytes

    stride = 8 (key) [+ 8 (stat)] + row_bytes rounded up to 8

so an int8 row of dim 128 takes 144 bytes where fp32 takes 520 (8 + 512). Inserts pack the
batch once (:func:`~hps_core.row_formats.pack`, one numba call; fp32 rows are their own
bytes) and copy packed rows in; the lookup kernel dequantises each row into ``out`` in its
copy pass (``decode_row``, the format's code per table passed like the widths), so callers
see float32 rows.

An empty slot is marked by row -1, never by a magic key: every int64 is a valid key, while
a row index is never negative. Key and row share a 16-byte slot so a probe touches one
cache line, not three arrays; a row's header shares the vector's cache line, so the access
bookkeeping of a fetch costs no extra cache miss (a separate stats array cost 15-40% of
fetch throughput, measured).

Every per-key loop is a ``@njit(nogil=True, cache=True)`` kernel. A lookup of keys of any
number of tables (``fetch_tables``) is ONE kernel call: it sorts the batch by (partition,
table) and reads each group from that table's partition. The kernel finds the arrays of every
(table, partition) through the *directory*: their addresses and shapes in one int64 array
(entry ``table_index * P + partition``), which writers keep current when they grow or replace a
partition's arrays (typed lists of arrays cost ~1 us each to pass to a kernel, and a getitem
per group).

Thread safety: one reader-writer spinlock per partition number, shared by the tables
(:mod:`hps_core.intrinsics`), taken inside the lookup kernel, so a lookup costs no Python per
partition or table. Readers share it; writers (insert, remove, evictions) hold it
exclusively, per chunk of at most ``max_set_batch_size`` keys, so a large insert cannot stall
readers for long. A rehash or a value-array growth replaces the arrays a reader would be
probing, so a reader must not run beside a writer of the same partition (without the read
lock, the stress test in tests/hps_core/db/test_hash_map.py crashes: a reader pairs new slots
with old values). Creating, emptying or dropping a table changes the directory itself and
holds every partition's lock. The kernels release the GIL, so readers run in parallel.

Deletion (``remove``, evictions) is backward-shift deletion: the slots after the freed one
that would be unreachable are shifted back, so no tombstones accumulate and a probe still
stops at the first empty slot. The freed value row is recycled by moving the last row into
it (swap-remove), so rows stay dense and ``n_rows`` is the partition's size.

Overflow (HugeCTR's ``overflow_margin``, ``overflow_policy``,
``overflow_resolution_target``): after an insert chunk leaves a partition above
``overflow_margin`` rows, it is shrunk to ``floor(overflow_margin * overflow_resolution_target)``
rows, still under the partition lock. Victims are chosen over the dense ``meta`` rows with one
vectorised ``np.argpartition`` of the stat column (``evict_oldest``: smallest last-access
stamp; ``evict_least_used``: smallest access count) or a random sample (``evict_random``), and
removed by the numba deletion kernel. The stamp is the tier's logical clock (one tick per key
touched, taken atomically), not wall time: cheap and deterministic. A fetch refreshes the
stamp or bumps the count of every row it hits, inside the lookup kernel; concurrent readers
may race on these (advisory: a lost bump only misjudges a victim, never a value). A tier
keeps only the stat its policy reads: with ``evict_random`` or no margin set (the default:
nothing is ever evicted) a row's header is its key alone and the fetch skips the bookkeeping.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit
from numba.np.numpy_support import carray  # where numba defines it (``numba.carray`` re-exports)

from hps_core.arrays import Flat, Keys, Mask, Vectors
from hps_core.db.base import TableGroups, TierBase, format_mismatch, unknown_table
from hps_core.config import OVERFLOW_POLICIES, OverflowConfig, VolatileDBConfig
from hps_core.errors import ConfigError, TierError
from hps_core.grouping import group_by
from hps_core.hashing import mix64, partition, partition_array
from hps_core.intrinsics import (
    LockArray,
    as_voidptr,
    atomic_add,
    atomic_tick,
    prefetch,
    read_acquire,
    read_release,
)
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import decode_row, pack
from hps_core.rows import check_rows_fit

__all__ = ["HashMapVolatileDB", "MapSettings", "estimate_bytes_per_row"]

_MIN_SLOTS = 16
_SLOT_BYTES = 16  # (key, row) as two int64
_EMPTY = -1  # row of an empty slot
_KEY, _STAT = 0, 1  # columns of meta, the int64 view of each row's header
# which access stat a tier's rows keep in column _STAT (none: the header is the key alone)
_NO_STAT, _STAMP_STAT, _COUNT_STAT = 0, 1, 2
_STAT_OF_POLICY = {"evict_random": _NO_STAT, "evict_oldest": _STAMP_STAT, "evict_least_used": _COUNT_STAT}

# rows of the directory (see _Directory)
_SLOTS, _SLOT_COUNT, _VALUES, _VALUE_ROWS, _VALUE_WIDTH, _CLOSED = range(6)
_DIRECTORY_ROWS = 6
_CLOSED_STATUS = -2  # what the lookup kernel returns when the tier was closed meanwhile
_AHEAD = 32  # keys between a slot's prefetch and its probe: enough loads in flight to hide DRAM
_ROWS_AHEAD = 16  # rows between their prefetch and their copy (a row is several cache lines)
_LINE_BYTES = 64
_FLOATS_PER_LINE = _LINE_BYTES // 4


# --------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True, inline="always")
def _header_bytes(stat: int) -> int:
    """Bytes of a row's header: its key, and the access stat when the tier keeps one."""
    return 8 if stat == _NO_STAT else 16


@njit(nogil=True, cache=True)
def _find_tables(
    keys: Keys,
    table_ids: Keys,
    offsets: Keys,
    out: Flat,
    found: Mask,
    entries: Keys,
    dims: Keys,
    codes: Keys,
    num_partitions: int,
    directory: Any,
    locks: Any,
    waiting: Any,
    clock: Any,
    stat: int,
    max_per_hold: int,
) -> int:
    """For each i: if ``keys[i]`` is stored in the table whose directory entries start at
    ``entries[table_ids[i]]``, write its row, dequantised from format ``codes[table_ids[i]]``,
    to ``out[offsets[i]:]`` and set ``found[i]``.

    Returns -1 when done; the first position whose table id or row does not fit ``out`` (then
    nothing was read); or -2 when the tier was closed meanwhile (``directory[_CLOSED]``).

    The batch is counting-sorted by (partition, table); each partition is read under its read
    lock, released and taken again every ``max_per_hold`` keys (so a waiting writer gets in
    between), each (partition, table) group from its own arrays, found through the directory
    under the lock. Hit rows get consecutive stamps of the tier's clock (``stat`` is
    ``_STAMP_STAT``) or one more access (``_COUNT_STAT``). Two passes per group on purpose: the
    first resolves every key to its row, the second decodes the rows into ``out``. Each pass's
    iterations are independent loads, so the CPU keeps many cache misses in flight at once;
    one loop that probes and then copies serialises them (1.5-2x slower on tables much larger
    than the CPU caches). The probe pass prefetches the
    slot of the key ``_AHEAD`` places on; the copy pass every line of the row ``_ROWS_AHEAD``
    places on and of its place in ``out`` (for writing). Measured on 26 tables x 50,000 rows,
    26,448 unique keys: 2.7 -> 1.7 ms at dim 16, 11.2 -> 7.6 ms at dim 128, against
    prefetching only a row's first and last line from the probe pass.
    """
    n = keys.shape[0]
    tables = entries.shape[0]
    buckets = num_partitions * tables
    hashes = np.empty(n, np.uint64)
    bucket = np.empty(n, np.int64)
    for i in range(n):
        t = table_ids[i]
        if t < 0 or t >= tables or offsets[i] < 0 or offsets[i] + dims[t] > out.shape[0]:
            return i
        h = mix64(keys[i])
        hashes[i] = h
        bucket[i] = partition(h, num_partitions) * tables + t
    order, starts = group_by(bucket, buckets)
    rows = np.empty(n, np.int64)
    for p in range(num_partitions):
        if starts[p * tables] == starts[(p + 1) * tables]:
            continue
        if not _acquire_open(locks, waiting, p, directory):
            return _CLOSED_STATUS
        held = 0
        for t in range(tables):
            j, end = starts[p * tables + t], starts[p * tables + t + 1]
            while j < end:
                if held == max_per_hold:  # let a waiting writer in
                    read_release(locks, p)
                    if not _acquire_open(locks, waiting, p, directory):
                        return _CLOSED_STATUS
                    held = 0
                hi = min(end, j + max_per_hold - held)
                e = entries[t] + p
                slots = carray(as_voidptr(directory[_SLOTS, e]), (directory[_SLOT_COUNT, e], 2), np.int64)
                stride = directory[_VALUE_WIDTH, e]
                data = carray(as_voidptr(directory[_VALUES, e]), (directory[_VALUE_ROWS, e] * stride,), np.uint8)
                _find_group(keys, hashes, order, offsets, out, found, rows, j, hi, dims[t], codes[t], slots,
                            data, stride, clock, stat)
                held += hi - j
                j = hi
        read_release(locks, p)
    return -1


@njit(nogil=True, cache=True, inline="always")
def _acquire_open(locks: Any, waiting: Any, p: int, directory: Any) -> bool:
    """Take partition p's read lock; False (lock released) when the tier was closed: after a
    close the directory's addresses point at freed arrays and must not be read."""
    read_acquire(locks, waiting, p)
    if directory[_CLOSED, 0]:
        read_release(locks, p)
        return False
    return True


@njit(nogil=True, cache=True, inline="always")
def _find_group(keys: Keys, hashes: Any, order: Any, offsets: Keys, out: Flat, found: Mask, rows: Any,
                lo: int, hi: int, dim: int, code: int, slots: Any, data: Any, stride: int, clock: Any,
                stat: int) -> None:
    """Keys ``order[lo:hi]``, all of one (table, partition) whose arrays are given (``data``:
    its rows, flat uint8, ``stride`` bytes each); the caller holds the partition's read lock
    (the arrays were read under it)."""
    mask = np.uint64(slots.shape[0] - 1)
    header = _header_bytes(stat)
    for j in range(lo, min(lo + _AHEAD, hi)):
        prefetch(slots, 2 * np.int64(hashes[order[j]] & mask), False)
    for j in range(lo, hi):
        if j + _AHEAD < hi:
            prefetch(slots, 2 * np.int64(hashes[order[j + _AHEAD]] & mask), False)
        key = keys[order[j]]
        s = hashes[order[j]] & mask
        row = _EMPTY
        while slots[s, 1] != _EMPTY:
            if slots[s, 0] == key:
                row = slots[s, 1]
                break
            s = (s + np.uint64(1)) & mask
        rows[j] = row
    stamp0 = atomic_add(clock, 0, hi - lo) if stat == _STAMP_STAT else 0
    meta = data.view(np.int64)  # the rows' headers, flat: word stride // 8 * row + column
    words = stride // 8
    for j in range(lo, min(lo + _ROWS_AHEAD, hi)):
        _prefetch_row(data, rows[j], stride, out, offsets[order[j]], dim)
    for j in range(lo, hi):
        if j + _ROWS_AHEAD < hi:
            _prefetch_row(data, rows[j + _ROWS_AHEAD], stride, out, offsets[order[j + _ROWS_AHEAD]], dim)
        row = rows[j]
        if row == _EMPTY:
            continue
        i = order[j]
        o = offsets[i]
        # row and destination passed as slices at offset 0: once inlined, the decoder's indices
        # are provably non-negative and its loop is vectorised (int8 decodes 2x faster, fp32
        # copies ~15% faster than the float32 loop of unpacked rows; measured, 26 tables)
        decode_row(data[row * stride + header : (row + 1) * stride], 0, dim, code, out[o : o + dim], 0)
        found[i] = True
        if stat == _STAMP_STAT:
            meta[row * words + _STAT] = stamp0 + j - lo
        elif stat == _COUNT_STAT:
            meta[row * words + _STAT] += 1


@njit(nogil=True, cache=True, inline="always")
def _prefetch_row(data: Any, row: int, stride: int, out: Flat, o: int, dim: int) -> None:
    """Every cache line of a stored row (to read) and of its place in ``out`` (to write)."""
    if row == _EMPTY:
        return
    start = row * stride
    for b in range(0, stride, _LINE_BYTES):
        prefetch(data, start + b, False)
    prefetch(data, start + stride - 1, False)
    for d in range(0, dim, _FLOATS_PER_LINE):
        prefetch(out, o + d, True)
    prefetch(out, o + dim - 1, True)


@njit(nogil=True, cache=True)
def _upsert(
    keys: Keys,
    positions: Any,
    packed: Any,
    slots: Any,
    values: Any,
    meta: Any,
    n_rows: int,
    stamp0: int,
    stat: int,
) -> int:
    """Store packed row ``packed[i]`` (uint8) under ``keys[i]`` for each ``i`` in
    ``positions``, in order.

    The caller guarantees room: enough free slots to stay under load 1/2 and enough free
    value rows for every key being new. With ``_STAMP_STAT`` a write stamps the row
    ``stamp0 + j``; with ``_COUNT_STAT`` a new row starts with one access. Returns the new
    number of rows.
    """
    mask = np.uint64(slots.shape[0] - 1)
    row_bytes = packed.shape[1]
    header = _header_bytes(stat)
    for j in range(positions.shape[0]):
        i = positions[j]
        key = keys[i]
        s = probe(slots, key, mask)
        row = slots[s, 1]
        if row == _EMPTY:
            row = n_rows
            n_rows += 1
            slots[s, 0] = key
            slots[s, 1] = row
            meta[row, _KEY] = key
            if stat == _COUNT_STAT:
                meta[row, _STAT] = 1
        if stat == _STAMP_STAT:
            meta[row, _STAT] = stamp0 + j
        dst, src = values[row, header:], packed[i]  # views at offset 0: a vectorised copy
        for b in range(row_bytes):
            dst[b] = src[b]
    return n_rows


@njit(nogil=True, cache=True, inline="always")
def probe(slots: Any, key: int, mask: Any) -> Any:
    """The slot holding ``key``, or the empty slot where it goes (linear probing; the load
    factor <= 1/2 guarantees one)."""
    s = mix64(key) & mask
    while slots[s, 1] != _EMPTY and slots[s, 0] != key:
        s = (s + np.uint64(1)) & mask
    return s


@njit(nogil=True, cache=True, inline="always")
def _slot_of(slots: Any, key: int, mask: Any) -> Any:
    """The slot holding ``key``, or -1."""
    s = mix64(key) & mask
    while slots[s, 1] != _EMPTY:
        if slots[s, 0] == key:
            return np.int64(s)
        s = (s + np.uint64(1)) & mask
    return np.int64(-1)


@njit(nogil=True, cache=True)
def _delete_slot(slots: Any, hole: int, mask: Any) -> None:
    """Backward-shift deletion: free ``slots[hole]`` and move back every later entry of the
    probe run whose home lies cyclically outside ``(hole, j]``, so no entry becomes
    unreachable and no tombstone is left."""
    i = np.uint64(hole)
    j = i
    while True:
        j = (j + np.uint64(1)) & mask
        if slots[j, 1] == _EMPTY:
            break
        home = mix64(slots[j, 0]) & mask
        if i <= j:
            stays = i < home and home <= j
        else:
            stays = home > i or home <= j
        if not stays:
            slots[i, 0] = slots[j, 0]
            slots[i, 1] = slots[j, 1]
            i = j
    slots[i, 1] = _EMPTY


@njit(nogil=True, cache=True)
def _remove(keys: Keys, positions: Any, slots: Any, meta: Any, n_rows: int) -> int:
    """Delete ``keys[i]`` for each ``i`` in ``positions`` (absent keys are skipped).

    The freed value row is refilled with the last row (swap-remove), whose slot is
    repointed, so rows ``0..n_rows-1`` stay dense. Returns the new number of rows.
    """
    mask = np.uint64(slots.shape[0] - 1)
    words = meta.shape[1]  # the whole row, header and packed row, as int64 words
    for j in range(positions.shape[0]):
        s = _slot_of(slots, keys[positions[j]], mask)
        if s < 0:
            continue
        row = slots[s, 1]
        _delete_slot(slots, s, mask)
        last = n_rows - 1
        if row != last:
            for w in range(words):
                meta[row, w] = meta[last, w]
            slots[_slot_of(slots, meta[row, _KEY], mask), 1] = row
        n_rows -= 1
    return n_rows


@njit(nogil=True, cache=True)
def _rehash(old: Any, new: Any) -> None:
    """Re-insert every occupied slot of ``old`` into the (larger, empty) ``new``."""
    mask = np.uint64(new.shape[0] - 1)
    for s_old in range(old.shape[0]):
        if old[s_old, 1] != _EMPTY:
            key = old[s_old, 0]
            s = mix64(key) & mask
            while new[s, 1] != _EMPTY:
                s = (s + np.uint64(1)) & mask
            new[s, 0] = key
            new[s, 1] = old[s_old, 1]


# --------------------------------------------------------------------------- storage


def _pow2_at_least(n: int) -> int:
    return max(_MIN_SLOTS, 1 << (max(n, 1) - 1).bit_length())


def _empty_slots(count: int) -> Any:
    return np.full((count, 2), _EMPTY, dtype=np.int64)


def _row_stride(dim: int, row_format: RowFormat, stat: int) -> int:
    """Bytes of one stored row: header and packed row, rounded up to 8 so every row's int64
    header is aligned."""
    return -(-(_header_bytes(stat) + row_format.row_bytes(dim)) // 8) * 8


def _empty_rows(rows: int, stride: int) -> Any:
    """Row storage: uint8[rows, stride] (``stride`` a multiple of 8)."""
    return np.empty((rows, stride), np.uint8)


@dataclass(eq=False)
class _Partition:
    """One open-addressing table plus its value rows: one table's share of one partition.

    Changed only under its partition's write lock; every change of ``slots`` or ``values``
    is published to the directory before the lock is released."""

    slots: Any  # int64[cap, 2]: (key, row), row == _EMPTY for a free slot
    values: Any  # uint8[rows_cap, stride]: header + packed row; rows [0, n_rows) live
    meta: Any  # int64 view of values: column _KEY, then _STAT when the tier keeps one
    rng: np.random.Generator  # victims of evict_random (used under the lock only)
    n_rows: int = 0

    @classmethod
    def empty(cls, stride: int, expected_rows: int, seed: Any) -> _Partition:
        values = _empty_rows(max(expected_rows, 1), stride)
        return cls(
            slots=_empty_slots(_pow2_at_least(2 * expected_rows)),
            values=values,
            meta=values.view(np.int64),
            rng=np.random.default_rng(seed),
        )

    @property
    def capacity(self) -> int:
        return int(self.slots.shape[0])

    def reserve(self, extra: int) -> bool:
        """Make room for ``extra`` more keys (all assumed new); True when arrays were replaced
        (the caller publishes them). Caller holds the write lock."""
        needed = self.n_rows + extra
        slots, values = self.slots, self.values
        # Both new arrays exist before either replaces the old one: an allocation that fails
        # leaves the partition (and what the directory points at) as it was.
        if 2 * needed > self.capacity:
            slots = _empty_slots(_pow2_at_least(2 * needed))
            _rehash(self.slots, slots)
        if needed > self.values.shape[0]:
            # geometric growth keeps appends amortised O(1)
            values = _empty_rows(max(needed, 2 * self.values.shape[0]), self.values.shape[1])
            values[: self.n_rows] = self.values[: self.n_rows]
        grown = slots is not self.slots or values is not self.values
        self.slots, self.values, self.meta = slots, values, values.view(np.int64)
        return grown

    def remove(self, keys: Keys, positions: Any) -> int:
        """Delete the keys at ``positions``; returns how many were stored. Caller holds the lock."""
        before = self.n_rows
        self.n_rows = _remove(keys, positions, self.slots, self.meta, before)
        return before - self.n_rows

    def resolve_overflow(self, overflow: OverflowConfig) -> int:
        """Shrink to ``margin * resolution_target`` rows if above the margin; returns rows evicted.

        Victims are picked with one vectorised selection over the dense rows and removed
        by the numba deletion kernel. Caller holds the lock.
        """
        if self.n_rows <= overflow.margin:
            return 0
        victim_keys = overflow_victims(self.meta, self.n_rows, overflow, self.rng)
        return self.remove(victim_keys, np.arange(victim_keys.shape[0], dtype=np.int64))

    def nbytes(self) -> int:
        return int(self.slots.nbytes + self.values.nbytes)


@dataclass(eq=False)
class _Table:
    dim: int
    row_format: RowFormat
    index: int  # position in the directory: entries index * P .. index * P + P - 1
    partitions: list[_Partition]


class _Directory:
    """Where the arrays of every (table, partition) are: addresses and shapes in one int64
    array the lookup kernel reads under the partition's lock (no Python objects to unbox).

    Columns are entries ``table.index * P + p``; rows ``_SLOTS``/``_SLOT_COUNT`` (the
    ``int64[count, 2]`` slot array) and ``_VALUES``/``_VALUE_ROWS``/``_VALUE_WIDTH`` (the
    ``uint8[rows, stride]`` row storage); row ``_CLOSED`` column 0 says the tier was closed.
    Growing for a new table makes a larger array; every array ever handed to a kernel stays
    alive and is kept current, so a kernel that read an older one still finds valid addresses.
    The arrays an entry points at are kept alive here (with the partition that owns them), so
    an address in the directory is never one of freed memory while the tier is open.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.table = np.zeros((_DIRECTORY_ROWS, capacity), np.int64)
        self._handed_out = [self.table]
        self._published: list[tuple[_Partition, Any, Any] | None] = []

    def __len__(self) -> int:
        return len(self._published)

    def append(self, part: _Partition) -> None:
        """Add an entry. Caller holds every partition's write lock."""
        entry = len(self._published)
        if entry == self.table.shape[1]:
            bigger = np.zeros((_DIRECTORY_ROWS, 2 * entry), np.int64)
            bigger[:, :entry] = self.table
            self.table = bigger
            self._handed_out.append(bigger)
        self._published.append(None)
        self.publish(entry, part)

    def publish(self, entry: int, part: _Partition) -> None:
        """Point ``entry`` at ``part``'s arrays. Caller holds the entry's partition write lock."""
        self._published[entry] = (part, part.slots, part.values)
        for table in self._handed_out:
            if entry < table.shape[1]:
                table[_SLOTS, entry] = part.slots.ctypes.data
                table[_SLOT_COUNT, entry] = part.slots.shape[0]
                table[_VALUES, entry] = part.values.ctypes.data
                table[_VALUE_ROWS, entry] = part.values.shape[0]
                table[_VALUE_WIDTH, entry] = part.values.shape[1]

    def refresh(self, entry: int, part: _Partition) -> None:
        """Publish ``part``'s grown arrays if the entry still belongs to it: an insert may race
        an evict_table, drop_table or close that gave the entry to another partition (or
        none), and must not bring its arrays back. Caller holds the partition's write lock."""
        current = self._published[entry] if entry < len(self._published) else None
        if current is not None and current[0] is part:
            self.publish(entry, part)

    def close(self) -> None:
        """Mark every handed-out array closed and drop the partitions' arrays. Caller holds
        every partition's write lock."""
        for table in self._handed_out:
            table[_CLOSED, 0] = 1
        self._published = [None] * len(self._published)


def estimate_bytes_per_row(
    dim: int, row_format: RowFormat = RowFormat.FP32, overflow: OverflowConfig | None = None
) -> float:
    """Steady-state bytes per stored row of a ``dim``-wide table in ``row_format``, on a tier
    with ``overflow`` settings (which decide whether rows keep an access stat; default: none
    set): header + packed row, and the slot array between load 1/2 and 1/4 (3 slots on
    average)."""
    stat = _stat_of(_check_overflow(OverflowConfig() if overflow is None else overflow))
    return float(_row_stride(dim, row_format, stat) + 3 * _SLOT_BYTES)


# --------------------------------------------------------------------------- the tier


def _check_overflow(overflow: OverflowConfig) -> OverflowConfig:
    """Validated overflow settings, policy aliases resolved; errors name the HugeCTR field."""
    margin, policy, target = overflow.margin, overflow.policy, overflow.resolution_target
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 1:
        raise ConfigError(
            f"volatile_db.overflow_margin must be a positive integer (rows per partition), "
            f"got {margin!r}"
        )
    canonical = next((name for name, aliases in OVERFLOW_POLICIES.items() if policy in aliases), None)
    if canonical is None:
        raise ConfigError(
            f"volatile_db.overflow_policy must be one of {', '.join(OVERFLOW_POLICIES)}, "
            f"got {policy!r}"
        )
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
        raise ConfigError(
            f"volatile_db.overflow_resolution_target must be a number in (0, 1), got {target!r}"
        )
    return OverflowConfig(margin=int(margin), policy=canonical, resolution_target=float(target))


@dataclass(frozen=True)
class MapSettings:
    """A hash map's settings read from ``volatile_db`` and checked (errors name the HugeCTR
    field): what the private map and the host store (shared_hash_map.py) both run by."""

    num_partitions: int  # independently written partitions per table
    max_get: int  # keys looked up per lock hold
    max_set: int  # keys written per lock (or seqlock) hold: never above the overflow margin
    overflow: OverflowConfig  # policy aliases resolved
    stat: int  # the access stat rows keep (the one the overflow policy reads, if any)

    @classmethod
    def of(cls, config: VolatileDBConfig) -> MapSettings:
        for name, value in (("num_partitions", config.num_partitions),
                            ("max_get_batch_size", config.get_batch_size),
                            ("max_set_batch_size", config.set_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"volatile_db.{name} must be a positive integer, got {value!r}")
        overflow = _check_overflow(config.overflow)
        # a chunk never exceeds the margin, so a partition holds at most 2 x margin rows
        return cls(config.num_partitions, config.get_batch_size, min(config.set_batch_size, overflow.margin),
                   overflow, _stat_of(overflow))


def overflow_victims(meta: Any, n: int, overflow: OverflowConfig, rng: np.random.Generator) -> Keys:
    """The keys to evict from a partition of ``n`` dense rows (``meta``: their int64 headers)
    to shrink it to ``margin * resolution_target`` rows: one vectorised selection of the stat
    the policy reads (``evict_random``: a sample). Caller holds the partition's writer lock."""
    k = n - int(overflow.margin * overflow.resolution_target)
    if k >= n:
        victims = np.arange(n)
    elif overflow.policy == "evict_random":
        victims = rng.choice(n, size=k, replace=False)
    else:  # the tier keeps the stat its policy reads
        victims = np.argpartition(meta[:n, _STAT], k - 1)[:k]
    return np.ascontiguousarray(meta[victims, _KEY])


def group_by_partition(keys: Keys, num_partitions: int) -> tuple[Any, Any]:
    """Batch positions grouped by partition, in batch order inside a partition (which is what
    makes "last duplicate wins" hold for inserts): ``order`` and ``starts`` of :func:`group_by`."""
    if num_partitions == 1:  # nothing to group: skip a pass over the batch
        return np.arange(keys.shape[0], dtype=np.int64), np.array([0, keys.shape[0]], np.int64)
    return group_by(partition_array(keys, num_partitions), num_partitions)


def _stat_of(overflow: OverflowConfig) -> int:
    """The access stat rows keep under checked ``overflow`` settings: the one its policy reads,
    none when nothing is ever evicted."""
    return _STAT_OF_POLICY[overflow.policy] if overflow.limited else _NO_STAT


class HashMapVolatileDB(TierBase[tuple[Keys, Keys, Keys]]):
    """Volatile tier in this process's memory (HugeCTR ``hash_map`` / ``parallel_hash_map``).

    Args:
        config: the ``volatile_db`` section (defaults: ``VolatileDBConfig()``). Read here:
            ``num_partitions`` (independently locked partitions per table; threads working
            on different partitions run in parallel), ``max_get_batch_size`` /
            ``max_set_batch_size`` (most keys looked up / written per partition under one
            lock hold) and ``overflow``: ``margin`` (most rows per partition; an insert that
            goes beyond evicts), ``policy`` (which rows: ``evict_random``,
            ``evict_least_used`` (fewest accesses) or ``evict_oldest`` (least recently
            inserted or fetched)), ``resolution_target`` (an overflowing partition is shrunk
            to ``floor(margin * resolution_target)`` rows).
        initial_capacity: rows per table to allocate for up front (avoids early rehashes
            when the table size is known, e.g. when loading a sparse model).
        seed: seed of the ``evict_random`` victim choice (per partition).

    Arguments are checked by :class:`~hps_core.db.base.TierBase`; table ids and row bounds of
    ``fetch_tables`` by the lookup kernel's first pass, before it reads anything.
    """

    _label = "hash map"
    _kernel_bounds = True

    def __init__(
        self,
        config: VolatileDBConfig | None = None,
        *,
        initial_capacity: int = 0,
        seed: int | None = None,
    ) -> None:
        settings = MapSettings.of(VolatileDBConfig() if config is None else config)
        cap = initial_capacity
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ConfigError(f"initial_capacity must be a non-negative integer, got {cap!r}")
        self._overflow = settings.overflow
        self._num_partitions = num_partitions = settings.num_partitions
        self._max_get = settings.max_get
        self._max_set = settings.max_set
        self._stat = settings.stat
        self._initial_capacity = initial_capacity
        self._seeds = np.random.SeedSequence(seed)
        self._locks = LockArray(num_partitions)
        self._clock = np.zeros(1, np.int64)  # logical time of access stamps, ticked atomically
        self._directory = _Directory()
        self._tables: dict[str, _Table] = {}
        # what fetch_tables needs of a tuple of tables: first directory entries, dims, format codes
        self._groups: TableGroups[tuple[Keys, Keys, Keys]] = TableGroups(self._resolve)
        self._tables_lock = threading.Lock()  # guards the dicts, not the data
        self._closed = False

    def __repr__(self) -> str:
        parts, tables = self._num_partitions, len(self._tables)
        limit = f", overflow_margin={self._overflow.margin}, {self._overflow.policy}" if self._overflow.limited else ""
        return f"HashMapVolatileDB(num_partitions={parts}{limit}, tables={tables})"

    @property
    def overflow_margin(self) -> int:
        return self._overflow.margin

    @property
    def overflow_policy(self) -> str:
        return self._overflow.policy

    @property
    def overflow_resolution_target(self) -> float:
        return self._overflow.resolution_target

    # ---------------------------------------------------------------- contract

    def _create_table(self, table: str, dim: int, row_format: RowFormat) -> None:
        with self._tables_lock:
            self._check_open()
            existing = self._tables.get(table)
            if existing is not None:
                if existing.dim != dim:
                    raise ConfigError(
                        f"table {table!r} already exists with dim {existing.dim}, not {dim}"
                    )
                if existing.row_format is not row_format:
                    raise format_mismatch(table, "the hash map", existing.row_format, row_format)
                return
            index = len(self._directory) // self._num_partitions
            fresh = self._new_table(dim, row_format, index)
            with self._locks.all_write_locked():  # appending may move the lists' storage
                for part in fresh.partitions:
                    self._directory.append(part)
            self._tables[table] = fresh

    def row_format(self, table: str) -> RowFormat:
        return self._table(table).row_format

    def _insert(self, table: str, keys: Keys, values: Vectors) -> None:
        t = self._table(table)
        if keys.shape[0] == 0:
            return
        # every row packed (or the batch refused) before any is written; fp32 rows are their bytes
        if t.row_format is RowFormat.FP32:
            packed = values.view(np.uint8)
        else:
            packed = pack(t.row_format, values, f"table {table!r}")
        order, offsets = self._group(keys)
        overflow = self._overflow
        for p, part in enumerate(t.partitions):
            group = order[offsets[p] : offsets[p + 1]]
            for start in range(0, group.shape[0], self._max_set):
                chunk = group[start : start + self._max_set]
                with self._locks.write_locked(p):
                    if part.reserve(chunk.shape[0]):
                        self._directory.refresh(t.index * self._num_partitions + p, part)
                    stamp0 = atomic_tick(self._clock, chunk.shape[0])
                    part.n_rows = _upsert(
                        keys, chunk, packed, part.slots, part.values, part.meta, part.n_rows, stamp0, self._stat
                    )
                    if part.n_rows > overflow.margin:
                        part.resolve_overflow(overflow)

    def _fetch(self, table: str, keys: Keys, out: Vectors) -> Mask:
        n, dim = out.shape
        return self.fetch_tables(
            (table,), np.zeros(n, np.int64), keys, out.reshape(-1), np.arange(0, n * dim, dim, dtype=np.int64)
        )

    def _tables_of(self, tables: Sequence[str]) -> tuple[Keys, tuple[Keys, Keys, Keys]]:
        group = self._groups.get(tables)
        return group[1], group

    def _fetch_tables(
        self, group: tuple[Keys, Keys, Keys], table_ids: Keys, keys: Keys, out: Flat, offsets: Keys
    ) -> Mask:
        entries, dims, codes = group
        # bounds are checked by the kernel's first pass, before it reads anything
        found = np.zeros(keys.shape[0], np.bool_)
        if keys.shape[0]:
            status = _find_tables(
                keys, table_ids, offsets, out, found, entries, dims, codes, self._num_partitions,
                self._directory.table, self._locks.locks, self._locks.waiting, self._clock,
                self._stat, self._max_get,
            )
            if status == _CLOSED_STATUS:
                raise TierError("the hash-map volatile tier was closed during a fetch")
            if status >= 0:
                check_rows_fit(table_ids, offsets, dims, out.shape[0], "hash map fetch_tables")
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
            with self._locks.all_write_locked():  # in-flight lookups finish first
                # Marked closed, a kernel that already holds this directory's table stops at
                # its first lock, before it reads an address; then the arrays can go now.
                self._directory.close()
            self._tables.clear()
            self._groups.clear()

    # ---------------------------------------------------------------- extras

    def remove(self, table: str, keys: Keys) -> int:
        """Delete ``keys`` (n,) int64 from ``table``; absent keys are ignored.

        Returns the number of rows removed (HugeCTR's ``evict(table, keys)``).
        """
        t = self._table(table)
        keys = self._keys_in(table, keys)
        if keys.shape[0] == 0:
            return 0
        order, offsets = self._group(keys)
        removed = 0
        for p, part in enumerate(t.partitions):
            group = order[offsets[p] : offsets[p + 1]]
            for start in range(0, group.shape[0], self._max_set):
                with self._locks.write_locked(p):
                    removed += part.remove(keys, group[start : start + self._max_set])
        return removed

    def evict_table(self, table: str) -> int:
        """Empty ``table`` (it stays defined with its dim and format); returns the rows dropped."""
        with self._tables_lock:
            t = self._table(table)
            fresh = self._new_table(t.dim, t.row_format, t.index)
            self._replace(table, fresh)
        return sum(part.n_rows for part in t.partitions)

    def drop_table(self, table: str) -> int:
        """Delete ``table`` and its rows; returns the rows dropped (the ``DropTable`` capability)."""
        with self._tables_lock:
            t = self._table(table)
            # its directory entries stay (indices are positions) but hold empty arrays
            self._replace(None, self._new_table(1, RowFormat.FP32, t.index))
            del self._tables[table]
            self._groups.clear()
        return sum(part.n_rows for part in t.partitions)

    def memory_bytes(self, table: str | None = None) -> int:
        """Bytes allocated for ``table`` (slot arrays, value rows and row metadata, spare
        room included), or for every table when ``table`` is None."""
        if table is None:
            self._check_open()
            tables = list(self._tables.values())
        else:
            tables = [self._table(table)]
        return sum(part.nbytes() for t in tables for part in t.partitions)

    def bytes_per_row(self, table: str) -> float:
        """Allocated bytes per stored key (packed row + row header + slot overhead + spare room).

        For an empty table, the steady-state floor: the stored row (header and packed row)
        and two slots' worth of slot arrays (load factor 1/2).
        """
        t = self._table(table)
        n = self.count(table)
        if n == 0:
            return float(_row_stride(t.dim, t.row_format, self._stat) + 2 * _SLOT_BYTES)
        return self.memory_bytes(table) / n

    # ---------------------------------------------------------------- helpers

    def _check_open(self) -> None:
        if self._closed:
            raise TierError("the hash-map volatile tier is closed")

    def _dim_of(self, table: str) -> int:
        return self._table(table).dim

    def _new_table(self, dim: int, row_format: RowFormat, index: int) -> _Table:
        per_part = -(-self._initial_capacity // self._num_partitions)
        if self._overflow.limited:
            per_part = min(per_part, self._overflow.margin)
        seeds = self._seeds.spawn(self._num_partitions)
        stride = _row_stride(dim, row_format, self._stat)
        return _Table(dim, row_format, index, [_Partition.empty(stride, per_part, s) for s in seeds])

    def _replace(self, table: str | None, fresh: _Table) -> None:
        """Put ``fresh``'s arrays in the directory (and under ``table``). Caller holds _tables_lock."""
        with self._locks.all_write_locked():
            for p, part in enumerate(fresh.partitions):
                self._directory.publish(fresh.index * self._num_partitions + p, part)
            if table is not None:
                self._tables[table] = fresh

    def _resolve(self, names: tuple[str, ...]) -> tuple[Keys, Keys, Keys]:
        """First directory entry, dim and format code of each of ``names`` (see TableGroups)."""
        with self._tables_lock:
            resolved = [self._table(name) for name in names]
        return (
            np.array([t.index * self._num_partitions for t in resolved], np.int64),
            np.array([t.dim for t in resolved], np.int64),
            np.array([t.row_format.code for t in resolved], np.int64),
        )

    def _group(self, keys: Keys) -> tuple[Any, Any]:
        return group_by_partition(keys, self._num_partitions)

    def _table(self, table: str) -> _Table:
        self._check_open()
        t = self._tables.get(table)
        if t is None:
            self._check_open()  # closed meanwhile: say so, not "unknown table"
            raise unknown_table(table, self._tables)
        return t
