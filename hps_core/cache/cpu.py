"""CPU twins of the GPU caches, compiled with numba: same contract, same layout, same policy.

Both kinds hold the caches of several tables in one structure (:class:`MultiTableCache`),
and answer a batch of keys of any number of tables with ONE numba call.

Dynamic cache layout (mirrors kernels/dynamic_cache.cu)::

    table t owns global sets set_base[t] .. set_base[t] + num_sets[t] - 1
    set of key k of table t = set_base[t] + mix64(k) % num_sets[t]
    slot_keys  key_dtype[total_sets, WAYS]
    slot_used  uint8[total_sets, WAYS]     1 = occupied
    slot_ts    int64[total_sets, WAYS]     last access (a global clock ticked once per call)
    slot_freq  uint32[total_sets, WAYS]    accesses since insertion (LFU), saturating at FREQ_MAX
    values     uint8, flat: rows packed in their table's format (codes[t]); the row of slot
               (s, w) of table t starts at byte value_base[t] + ((s - set_base[t]) * WAYS + w)
               * strides[t] (CacheLayout)

Victim of a full set: ``lru`` the smallest ``ts``; ``lfu`` the smallest ``freq``, ties by
the smallest ``ts``; an empty slot always first. A hit updates ``ts`` (and ``freq``), so a
query writes slot metadata too.

Concurrency (lock striping, locks taken inside the kernels): set s belongs to stripe
``s % num_stripes``; each stripe has a reader-writer spinlock (:mod:`hps_core.intrinsics`). A
batch is counting-sorted by stripe inside the kernel and each stripe's share runs under its
lock: queries share it, writers (replace, update, clear) hold it exclusively, so a reader
never sees a half-written vector or a slot that changed owner between its probe and its
copy. The LRU/LFU stamps that concurrent readers write are advisory (a lost bump only
misjudges a victim), as on the GPU. Threads on different stripes, and readers of one stripe,
run in parallel (the kernels release the GIL). The GPU kernels use per-slot seqlocks
instead; both give the contract's guarantee.

Row formats: writes pack each float32 row with :func:`hps_core.row_formats.encode_row`
inside the kernels, under the stripe's lock, and queries unpack into ``out`` with
:func:`~hps_core.row_formats.decode_row`: the module every tier uses, so a cached row and
a tier's row are the same bits, and the GPU kernels (kernels/row_formats.cuh) mirror it. A
batch holding a row its table's format cannot store is refused (RowValueError) before the
kernel runs.

Static tables: per table a power-of-two region of open-addressing slots (linear probing,
≥ 2 × capacity) key -> row, rows appended, no eviction; one reader-writer spinlock: queries
share it, replace/update/clear hold it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit

from hps_core.arrays import is_device_array, to_host
from hps_core.cache.base import (
    WAYS,
    AccessClock,
    CacheLayout,
    TableView,
    check_room,
    check_multi_cache_args,
    check_storable,
    check_table_rows,
    normalize_keys,
)
from hps_core.config import CacheKind, CachePolicy
from hps_core.errors import RequestError
from hps_core.grouping import first_of_pairs, group_by
from hps_core.hashing import mix64
from hps_core.rows import check_rows_fit, copy_rows
from hps_core.intrinsics import LockArray, read_acquire, read_release, write_acquire, write_release
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import decode_row, encode_row

__all__ = [
    "CpuDynamicCache",
    "CpuEmbeddingCache",
    "CpuStaticCache",
    "CpuStaticEmbeddingTable",
    "sets_of",
]

DEFAULT_STRIPES = 16
_EMPTY = -1
#: LFU counts stop here (HPS_FREQ_MAX in kernels/dynamic_cache.cu): 32-bit counts that
#: saturate rather than wrap, so a key that hot stays among the hottest.
FREQ_MAX = 0xFFFF0000


# --------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True)
def _dynamic_sets(keys: Any, table_ids: Any, set_base: Any, num_sets: Any) -> Any:
    sets = np.empty(keys.shape[0], np.int64)
    for i in range(keys.shape[0]):
        t = table_ids[i]
        sets[i] = set_base[t] + np.int64(mix64(keys[i]) % np.uint64(num_sets[t]))
    return sets


@njit(nogil=True, cache=True, inline="always")
def _by_stripe(sets: Any, num_stripes: int) -> Any:
    """Batch positions grouped by ``set % num_stripes``, in batch order inside a stripe (which
    makes "last duplicate wins")."""
    return group_by(sets % num_stripes, num_stripes)


@njit(nogil=True, cache=True, inline="always")
def _find_way(slot_keys: Any, slot_used: Any, s: int, key: Any) -> int:
    for w in range(slot_keys.shape[1]):
        if slot_used[s, w] and slot_keys[s, w] == key:
            return w
    return -1


@njit(nogil=True, cache=True, inline="always")
def _victim_way(slot_used: Any, slot_ts: Any, slot_freq: Any, s: int, lfu: bool) -> int:
    """An empty way if any, else the policy's victim (lowest way on ties)."""
    best = 0
    for w in range(slot_used.shape[1]):
        if not slot_used[s, w]:
            return w
        if lfu:
            if slot_freq[s, w] < slot_freq[s, best] or (
                slot_freq[s, w] == slot_freq[s, best] and slot_ts[s, w] < slot_ts[s, best]
            ):
                best = w
        elif slot_ts[s, w] < slot_ts[s, best]:
            best = w
    return best


@njit(nogil=True, cache=True, inline="always")
def _count_access(slot_freq: Any, s: int, w: int) -> None:
    """One more access to slot (s, w) (LFU), saturating at FREQ_MAX."""
    if slot_freq[s, w] < FREQ_MAX:
        slot_freq[s, w] += 1


@njit(nogil=True, cache=True, inline="always")
def _missing(hit: Any) -> Any:
    """Ascending positions where ``hit`` is False."""
    m = 0
    for i in range(hit.shape[0]):
        m += not hit[i]
    out = np.empty(m, np.int64)
    j = 0
    for i in range(hit.shape[0]):
        if not hit[i]:
            out[j] = i
            j += 1
    return out


@njit(nogil=True, cache=True)
def _dynamic_query(keys, table_ids, offsets, out, set_base, num_sets, dims, codes, strides,  # type: ignore[no-untyped-def]
                   value_base, slot_keys, slot_used, slot_ts, slot_freq, values, clock, locks, waiting):
    sets = _dynamic_sets(keys, table_ids, set_base, num_sets)
    stripes = locks.shape[0]
    order, starts = _by_stripe(sets, stripes)
    hit = np.zeros(keys.shape[0], np.bool_)
    for p in range(stripes):
        if starts[p] == starts[p + 1]:
            continue
        read_acquire(locks, waiting, p)
        for j in range(starts[p], starts[p + 1]):
            i = order[j]
            s = sets[i]
            w = _find_way(slot_keys, slot_used, s, keys[i])
            if w < 0:
                continue
            t = table_ids[i]
            start = value_base[t] + ((s - set_base[t]) * WAYS + w) * strides[t]
            decode_row(values, start, dims[t], codes[t], out, offsets[i])
            slot_ts[s, w] = clock
            _count_access(slot_freq, s, w)
            hit[i] = True
        read_release(locks, p)
    return _missing(hit)


@njit(nogil=True, cache=True)
def _dynamic_write(keys, table_ids, src, src_offsets, set_base, num_sets, dims, codes, strides,  # type: ignore[no-untyped-def]
                   value_base, slot_keys, slot_used, slot_ts, slot_freq, values, clock, lfu, insert, locks, waiting):
    """Replace (``insert``) or update in batch order, packing the float32 rows of ``src`` in
    their tables' formats. Returns how many positions found their key cached."""
    sets = _dynamic_sets(keys, table_ids, set_base, num_sets)
    stripes = locks.shape[0]
    order, starts = _by_stripe(sets, stripes)
    found = 0
    for p in range(stripes):
        if starts[p] == starts[p + 1]:
            continue
        write_acquire(locks, waiting, p)
        for j in range(starts[p], starts[p + 1]):
            i = order[j]
            s = sets[i]
            key = keys[i]
            w = _find_way(slot_keys, slot_used, s, key)
            if w >= 0:
                found += 1
                _count_access(slot_freq, s, w)
            elif insert:
                w = _victim_way(slot_used, slot_ts, slot_freq, s, lfu)
                slot_keys[s, w] = key
                slot_used[s, w] = 1
                slot_freq[s, w] = 1
            else:
                continue
            slot_ts[s, w] = clock
            t = table_ids[i]
            start = value_base[t] + ((s - set_base[t]) * WAYS + w) * strides[t]
            encode_row(src, src_offsets[i], dims[t], codes[t], values, start)
        write_release(locks, p)
    return found


@njit(nogil=True, cache=True)
def _dynamic_dump(start, end, slot_keys, slot_used, locks, waiting):  # type: ignore[no-untyped-def]
    """(sets, keys) held in sets [start, end), each stripe read under its lock."""
    stripes = locks.shape[0]
    sets = np.empty((end - start) * WAYS, np.int64)
    keys = np.empty((end - start) * WAYS, slot_keys.dtype)
    m = 0
    for p in range(stripes):
        first = start + (p - start % stripes) % stripes  # the first set of stripe p in range
        if first >= end:
            continue
        read_acquire(locks, waiting, p)
        for s in range(first, end, stripes):
            for w in range(WAYS):
                if slot_used[s, w]:
                    sets[m] = s
                    keys[m] = slot_keys[s, w]
                    m += 1
        read_release(locks, p)
    return sets[:m], keys[:m]


@njit(nogil=True, cache=True, inline="always")
def _static_row(key, t, slot_base, slot_mask, slot_keys, slot_rows):  # type: ignore[no-untyped-def]
    """(slot, row) of ``key`` in table t's region; row -1 and the free slot where absent."""
    mask = np.uint64(slot_mask[t])
    base = slot_base[t]
    s = mix64(key) & mask
    while slot_rows[base + s] != _EMPTY:
        if slot_keys[base + s] == key:
            return base + np.int64(s), slot_rows[base + s]
        s = (s + np.uint64(1)) & mask
    return base + np.int64(s), np.int64(_EMPTY)


@njit(nogil=True, cache=True)
def _static_query(keys, table_ids, offsets, out, slot_base, slot_mask, slot_keys, slot_rows,  # type: ignore[no-untyped-def]
                  dims, codes, strides, value_base, values, locks, waiting):
    hit = np.zeros(keys.shape[0], np.bool_)
    read_acquire(locks, waiting, 0)
    for i in range(keys.shape[0]):
        t = table_ids[i]
        _, row = _static_row(keys[i], t, slot_base, slot_mask, slot_keys, slot_rows)
        if row < 0:
            continue
        decode_row(values, value_base[t] + row * strides[t], dims[t], codes[t], out, offsets[i])
        hit[i] = True
    read_release(locks, 0)
    return _missing(hit)


@njit(nogil=True, cache=True)
def _static_stored(keys, table_ids, slot_base, slot_mask, slot_keys, slot_rows):  # type: ignore[no-untyped-def]
    """(n,) bool: whether each key is stored in its table. Caller holds the lock."""
    stored = np.empty(keys.shape[0], np.bool_)
    for i in range(keys.shape[0]):
        stored[i] = _static_row(keys[i], table_ids[i], slot_base, slot_mask, slot_keys, slot_rows)[1] >= 0
    return stored


@njit(nogil=True, cache=True)
def _static_write(keys, table_ids, src, src_offsets, slot_base, slot_mask, slot_keys, slot_rows,  # type: ignore[no-untyped-def]
                  dims, codes, strides, value_base, values, n_rows, insert):
    """Upsert (``insert``) or update in batch order, packing the float32 rows of ``src`` in
    their tables' formats; the caller checked there is room and holds the lock. Returns the
    positions whose key was already stored."""
    found = 0
    for i in range(keys.shape[0]):
        t = table_ids[i]
        key = keys[i]
        slot, row = _static_row(key, t, slot_base, slot_mask, slot_keys, slot_rows)
        if row >= 0:
            found += 1
        elif insert:
            row = n_rows[t]
            n_rows[t] += 1
            slot_keys[slot] = key
            slot_rows[slot] = row
        else:
            continue
        encode_row(src, src_offsets[i], dims[t], codes[t], values, value_base[t] + row * strides[t])
    return found


# --------------------------------------------------------------------------- helpers


def sets_of(keys: npt.NDArray[np.integer[Any]], num_sets: int) -> npt.NDArray[np.int64]:
    """(n,) int64 set of each key of a one-table cache: ``mix64(key) % num_sets`` (the GPU
    kernels' formula)."""
    sets: npt.NDArray[np.int64] = _dynamic_sets(keys, np.zeros(keys.shape[0], np.int64), np.zeros(1, np.int64),
                                                np.array([num_sets], np.int64))
    return sets


def _host(arr: Any, what: str) -> npt.NDArray[Any]:
    if isinstance(arr, np.ndarray) or is_device_array(arr):  # a CuPy array is brought over
        return to_host(arr)
    raise RequestError(f"{what} must be a numpy array, got {type(arr).__name__}")


class _CpuCacheBase:
    """Argument checks and the packed value store shared by both CPU multi-table caches."""

    device = "cpu"
    kind: CacheKind
    capacities: npt.NDArray[np.int64]  # (T,) rows per table, set by each kind

    def __init__(self, kind: CacheKind, capacities: Sequence[int], dims: Sequence[int], policy: CachePolicy | str,
                 row_formats: Sequence[RowFormat] | None, key_dtype: Any) -> None:
        caps, self.dims, self.row_formats, self.key_dtype = check_multi_cache_args(
            kind, capacities, dims, policy, row_formats, key_dtype
        )
        self.policy = CachePolicy(policy)
        self.tables = int(self.dims.shape[0])
        self._requested = caps

    def _store(self, layout: CacheLayout) -> None:
        """Take the layout's per-table attributes and allocate its value store."""
        self.capacities, self.num_sets, self.set_base = layout.capacities, layout.num_sets, layout.set_base
        self.total_sets, self.value_base = layout.total_sets, layout.value_base
        self._codes, self._strides = layout.codes, layout.strides
        self._values = np.zeros(layout.value_bytes, np.uint8)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tables={self.tables}, capacities={self.capacities.tolist()}, "
            f"dims={self.dims.tolist()}, row_formats={[str(f) for f in self.row_formats]}, "
            f"key_dtype={self.key_dtype})"
        )

    def copy_rows(self, src: Any, src_offsets: Any, dst: Any, dst_offsets: Any, table_ids: Any,
                  stream: Any = None) -> None:
        copy_rows(src, src_offsets, dst, dst_offsets, table_ids, self.dims)

    def _args(self, table_ids: Any, keys: Any, buffer: Any, offsets: Any, name: str) -> tuple[Any, Any, Any, Any]:
        """Host arrays of a multi-table call, checked (bounds included; the rows of a write
        must be storable in their tables' formats)."""
        ids, buf, offs = _host(table_ids, "table_ids"), _host(buffer, name), _host(offsets, "offsets")
        keys = normalize_keys(np, _host(keys, "keys"), self.key_dtype)
        check_table_rows(np, ids, keys, buf, offs, name)
        check_rows_fit(ids, offs, self.dims, buf.shape[0], f"cache {name}")
        if name == "values":
            check_storable(ids, buf, offs, self.dims, self._codes, self.row_formats, f"cache {name}")
        return ids, keys, buf, offs


# --------------------------------------------------------------------------- dynamic


class CpuDynamicCache(_CpuCacheBase):
    """Set-associative caches of several tables, LRU or LFU; the twin of GpuDynamicCache.

    ``capacities[t]`` rows of ``dims[t]`` floats for table t, rounded up to whole sets of
    :data:`WAYS` slots, stored as ``row_formats[t]`` (None: all fp32).
    """

    kind = CacheKind.DYNAMIC

    def __init__(self, capacities: Sequence[int], dims: Sequence[int], *, policy: CachePolicy | str = CachePolicy.LRU,
                 row_formats: Sequence[RowFormat] | None = None, key_dtype: Any = np.int64,
                 num_stripes: int | None = None, clock_start: int = 1) -> None:
        super().__init__(CacheKind.DYNAMIC, capacities, dims, policy, row_formats, key_dtype)
        self._store(CacheLayout.dynamic(self._requested, self.dims, self.row_formats))
        stripes = num_stripes or min(DEFAULT_STRIPES, max(2, 4 * (os.cpu_count() or 1)))
        self.num_stripes = max(1, min(int(stripes), self.total_sets))
        self._locks = LockArray(self.num_stripes)
        self._clock = AccessClock(clock_start)
        shape = (self.total_sets, WAYS)
        self._keys = np.zeros(shape, self.key_dtype)
        self._used = np.zeros(shape, np.uint8)
        self._ts = np.zeros(shape, np.int64)
        self._freq = np.zeros(shape, np.uint32)

    def query_tables(self, table_ids: Any, keys: Any, out: Any, offsets: Any,
                     stream: Any = None) -> npt.NDArray[np.int64]:
        ids, keys, out, offs = self._args(table_ids, keys, out, offsets, "out")
        missing: npt.NDArray[np.int64] = _dynamic_query(
            keys, ids, offs, out, self.set_base, self.num_sets, self.dims, self._codes, self._strides,
            self.value_base, self._keys, self._used, self._ts, self._freq, self._values, self._clock.tick(),
            self._locks.locks, self._locks.waiting,
        )
        return missing

    def replace_tables(self, table_ids: Any, keys: Any, values: Any, offsets: Any, stream: Any = None) -> None:
        self._write(table_ids, keys, values, offsets, insert=True)

    def update_tables(self, table_ids: Any, keys: Any, values: Any, offsets: Any, stream: Any = None) -> int:
        return self._write(table_ids, keys, values, offsets, insert=False)

    def dump_sets(self, start_set: int, end_set: int,
                  stream: Any = None) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.integer[Any]]]:
        lo, hi = max(0, int(start_set)), min(self.total_sets, int(end_set))
        if lo >= hi:
            return np.empty(0, np.int64), np.empty(0, self.key_dtype)
        sets, keys = _dynamic_dump(lo, hi, self._keys, self._used, self._locks.locks, self._locks.waiting)
        return np.searchsorted(self.set_base, sets, side="right").astype(np.int64) - 1, keys

    def sets_of(self, table_ids: Any, keys: Any) -> npt.NDArray[np.int64]:
        keys = normalize_keys(np, _host(keys, "keys"), self.key_dtype)
        sets: npt.NDArray[np.int64] = _dynamic_sets(keys, _host(table_ids, "table_ids"), self.set_base, self.num_sets)
        return sets

    def clear(self, table: int | None = None, stream: Any = None) -> None:
        lo, hi = (0, self.total_sets) if table is None else (
            int(self.set_base[table]), int(self.set_base[table] + self.num_sets[table]))
        with self._locks.all_write_locked():
            self._used[lo:hi] = 0
            self._freq[lo:hi] = 0
            self._ts[lo:hi] = 0

    def sizes(self, stream: Any = None) -> npt.NDArray[np.int64]:
        per_set = np.count_nonzero(self._used, axis=1)
        return np.add.reduceat(per_set, self.set_base).astype(np.int64)

    def _write(self, table_ids: Any, keys: Any, values: Any, offsets: Any, *, insert: bool) -> int:
        ids, keys, values, offs = self._args(table_ids, keys, values, offsets, "values")
        return int(_dynamic_write(
            keys, ids, values, offs, self.set_base, self.num_sets, self.dims, self._codes, self._strides,
            self.value_base, self._keys, self._used, self._ts, self._freq, self._values, self._clock.tick(),
            self.policy is CachePolicy.LFU, insert, self._locks.locks, self._locks.waiting,
        ))


# --------------------------------------------------------------------------- static


class CpuStaticCache(_CpuCacheBase):
    """Whole tables resident: per table an open-addressing region key -> row; the twin of
    GpuStaticCache. A replace whose new keys do not fit a table raises CacheFullError."""

    kind = CacheKind.STATIC

    def __init__(self, capacities: Sequence[int], dims: Sequence[int], *, policy: CachePolicy | str = CachePolicy.LRU,
                 row_formats: Sequence[RowFormat] | None = None, key_dtype: Any = np.int64) -> None:
        super().__init__(CacheKind.STATIC, capacities, dims, policy, row_formats, key_dtype)
        layout = CacheLayout.static(self._requested, self.dims, self.row_formats)
        self._store(layout)
        self._slot_base = layout.slot_base
        self._slot_mask = np.diff(layout.slot_base) - 1
        self._slot_keys = np.zeros(int(layout.slot_base[-1]), self.key_dtype)
        self._slot_rows = np.full(int(layout.slot_base[-1]), _EMPTY, np.int64)
        self._n_rows = np.zeros(self.tables, np.int64)
        self._lock = LockArray(1)

    def query_tables(self, table_ids: Any, keys: Any, out: Any, offsets: Any,
                     stream: Any = None) -> npt.NDArray[np.int64]:
        ids, keys, out, offs = self._args(table_ids, keys, out, offsets, "out")
        missing: npt.NDArray[np.int64] = _static_query(
            keys, ids, offs, out, self._slot_base, self._slot_mask, self._slot_keys, self._slot_rows,
            self.dims, self._codes, self._strides, self.value_base, self._values, self._lock.locks,
            self._lock.waiting,
        )
        return missing

    def replace_tables(self, table_ids: Any, keys: Any, values: Any, offsets: Any, stream: Any = None) -> None:
        self._write(table_ids, keys, values, offsets, insert=True)

    def update_tables(self, table_ids: Any, keys: Any, values: Any, offsets: Any, stream: Any = None) -> int:
        return self._write(table_ids, keys, values, offsets, insert=False)

    def dump_sets(self, start_set: int, end_set: int,
                  stream: Any = None) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.integer[Any]]]:
        lo, hi = max(0, int(start_set)), min(self.tables, int(end_set))
        if lo >= hi:
            return np.empty(0, np.int64), np.empty(0, self.key_dtype)
        a, b = int(self._slot_base[lo]), int(self._slot_base[hi])
        with self._lock.read_locked(0):
            held = np.flatnonzero(self._slot_rows[a:b] != _EMPTY) + a
            keys = self._slot_keys[held]
        return np.searchsorted(self._slot_base, held, side="right").astype(np.int64) - 1, keys

    def sets_of(self, table_ids: Any, keys: Any) -> npt.NDArray[np.int64]:
        return np.asarray(_host(table_ids, "table_ids"), np.int64).copy()

    def clear(self, table: int | None = None, stream: Any = None) -> None:
        lo, hi = (0, self.tables) if table is None else (table, table + 1)
        with self._lock.write_locked(0):
            self._slot_rows[self._slot_base[lo] : self._slot_base[hi]] = _EMPTY
            self._n_rows[lo:hi] = 0

    def sizes(self, stream: Any = None) -> npt.NDArray[np.int64]:
        return self._n_rows.copy()

    def _write(self, table_ids: Any, keys: Any, values: Any, offsets: Any, *, insert: bool) -> int:
        ids, keys, values, offs = self._args(table_ids, keys, values, offsets, "values")
        with self._lock.write_locked(0):
            if insert:
                self._check_room(ids, keys)
            return int(_static_write(
                keys, ids, values, offs, self._slot_base, self._slot_mask, self._slot_keys, self._slot_rows,
                self.dims, self._codes, self._strides, self.value_base, self._values, self._n_rows, insert,
            ))

    def _check_room(self, table_ids: npt.NDArray[np.int64], keys: npt.NDArray[np.integer[Any]]) -> None:
        """Refuse the whole batch, before writing anything, if a table's new keys do not fit."""
        stored = _static_stored(keys, table_ids, self._slot_base, self._slot_mask, self._slot_keys, self._slot_rows)
        new = np.bincount(table_ids[first_of_pairs(table_ids, keys) & ~stored], minlength=self.tables)
        check_room(self._n_rows, self.capacities, new)


# --------------------------------------------------------------------------- one table


class CpuEmbeddingCache(TableView):
    """A one-table dynamic CPU cache: :class:`CpuDynamicCache` behind the single-table contract."""

    def __init__(self, capacity: int, dim: int, *, policy: CachePolicy | str = CachePolicy.LRU, row_format: RowFormat = RowFormat.FP32,
                 key_dtype: Any = np.int64, num_stripes: int | None = None) -> None:
        super().__init__(CpuDynamicCache([capacity], [dim], policy=policy, row_formats=[row_format],
                                         key_dtype=key_dtype, num_stripes=num_stripes), 0)


class CpuStaticEmbeddingTable(TableView):
    """A one-table static CPU table: :class:`CpuStaticCache` behind the single-table contract."""

    def __init__(self, capacity: int, dim: int, *, policy: CachePolicy | str = CachePolicy.LRU, row_format: RowFormat = RowFormat.FP32,
                 key_dtype: Any = np.int64) -> None:
        super().__init__(CpuStaticCache([capacity], [dim], policy=policy, row_formats=[row_format],
                                        key_dtype=key_dtype), 0)
