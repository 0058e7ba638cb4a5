"""CPU twins of the GPU caches, compiled with numba: same contract, same layout, same policy.

Dynamic cache layout (mirrors kernels/dynamic_cache.cu)::

    set s = mix64(key) % num_sets, s in [0, num_sets)
    slot_keys  key_dtype[num_sets, WAYS]
    slot_used  uint8[num_sets, WAYS]      1 = occupied
    slot_ts    int64[num_sets, WAYS]      last access (a global clock ticked once per call)
    slot_freq  int64[num_sets, WAYS]      accesses since insertion (LFU)
    values     float32[num_sets*WAYS, dim], or uint16 bits of float16

Victim of a full set: ``lru`` the smallest ``ts``; ``lfu`` the smallest ``freq``, ties by
the smallest ``ts``; an empty slot always first. A hit updates ``ts`` (and ``freq``), so a
query writes slot metadata too.

Concurrency (copy-under-lock, lock striping): set s belongs to stripe ``s % num_stripes``;
each stripe has a ``threading.Lock``, taken by *every* call that touches its sets,
readers included, because a query writes the LRU/LFU metadata of the slots it hits. A
batch is counting-sorted by stripe and each stripe's share runs under its lock in one
``nogil`` numba call, so the key probe, the value copy and the metadata update of one key
happen inside one critical section: a reader can never see a half-written vector or a slot
that changed owner between its probe and its copy. Threads on different stripes run in
parallel (the kernels release the GIL). A seqlock would let readers skip the lock, but
numba exposes no memory fences; the GPU kernels, which have them, use one instead.

float16 storage: numba has no float16 type, so vectors are stored as their uint16 bits:
NumPy rounds a batch to float16 before the kernel (round-to-nearest-even, like the GPU's
``cvt.rn.f16.f32``), and queries widen through a 65,536-entry float32 table.

Static table: open addressing (linear probing, power-of-two slots ≥ 2 × capacity) key ->
row, rows appended, no eviction; a readers-writer lock lets queries (which write nothing)
run side by side while replace/update/clear take it exclusively.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from numba import njit

from hps_core.cache.base import (
    WAYS,
    CacheFullError,
    check_batch,
    check_cache_args,
    normalize_keys,
)
from hps_core.errors import RequestError

__all__ = ["CpuEmbeddingCache", "CpuStaticEmbeddingTable", "sets_of"]

DEFAULT_STRIPES = 16
_EMPTY = -1

# splitmix64 finaliser (the same constants as kernels/*.cu), typed so numba stays in uint64
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)

#: float16 bits -> float32, the widening table of fp16 queries (256 KiB).
_F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


# --------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True, inline="always")
def _mix(key: Any) -> Any:
    """splitmix64 finaliser: neighbouring keys land in unrelated sets."""
    x = np.uint64(key)
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


@njit(nogil=True, cache=True)
def _sets_of(keys: Any, num_sets: int, out: Any) -> None:
    ns = np.uint64(num_sets)
    for i in range(keys.shape[0]):
        out[i] = np.int64(_mix(keys[i]) % ns)


@njit(nogil=True, cache=True)
def _group_by_stripe(sets: Any, num_stripes: int) -> tuple[Any, Any]:
    """Stable counting sort of batch positions by ``set % num_stripes``: stripe p owns
    ``order[offsets[p]:offsets[p+1]]``, in batch order (which makes "last duplicate wins")."""
    n = sets.shape[0]
    offsets = np.zeros(num_stripes + 1, np.int64)
    for i in range(n):
        offsets[sets[i] % num_stripes + 1] += 1
    for p in range(num_stripes):
        offsets[p + 1] += offsets[p]
    cursor = offsets[:-1].copy()
    order = np.empty(n, np.int64)
    for i in range(n):
        p = sets[i] % num_stripes
        order[cursor[p]] = i
        cursor[p] += 1
    return order, offsets


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


@njit(nogil=True, cache=True)
def _query_f32(keys, sets, positions, slot_keys, slot_used, slot_ts, slot_freq, values, out, hit, clock):  # type: ignore[no-untyped-def]
    ways = slot_keys.shape[1]
    dim = values.shape[1]
    for j in range(positions.shape[0]):
        i = positions[j]
        s = sets[i]
        w = _find_way(slot_keys, slot_used, s, keys[i])
        if w >= 0:
            row = s * ways + w
            for d in range(dim):
                out[i, d] = values[row, d]
            slot_ts[s, w] = clock
            slot_freq[s, w] += 1
            hit[i] = True


@njit(nogil=True, cache=True)
def _query_f16(keys, sets, positions, slot_keys, slot_used, slot_ts, slot_freq, values, out, hit, clock, lut):  # type: ignore[no-untyped-def]
    ways = slot_keys.shape[1]
    dim = values.shape[1]
    for j in range(positions.shape[0]):
        i = positions[j]
        s = sets[i]
        w = _find_way(slot_keys, slot_used, s, keys[i])
        if w >= 0:
            row = s * ways + w
            for d in range(dim):
                out[i, d] = lut[values[row, d]]
            slot_ts[s, w] = clock
            slot_freq[s, w] += 1
            hit[i] = True


@njit(nogil=True, cache=True)
def _write(keys, sets, positions, src, slot_keys, slot_used, slot_ts, slot_freq, values, clock, lfu, insert):  # type: ignore[no-untyped-def]
    """Replace (``insert``) or update (not ``insert``) in batch order; ``src`` already has
    the storage dtype. Returns how many positions found their key cached."""
    ways = slot_keys.shape[1]
    dim = values.shape[1]
    found = 0
    for j in range(positions.shape[0]):
        i = positions[j]
        s = sets[i]
        key = keys[i]
        w = _find_way(slot_keys, slot_used, s, key)
        if w >= 0:
            found += 1
            slot_freq[s, w] += 1
        elif insert:
            w = _victim_way(slot_used, slot_ts, slot_freq, s, lfu)
            slot_keys[s, w] = key
            slot_used[s, w] = 1
            slot_freq[s, w] = 1
        else:
            continue
        slot_ts[s, w] = clock
        row = s * ways + w
        for d in range(dim):
            values[row, d] = src[i, d]
    return found


@njit(nogil=True, cache=True)
def _static_find(keys, slot_keys, slot_rows, rows):  # type: ignore[no-untyped-def]
    mask = np.uint64(slot_keys.shape[0] - 1)
    for i in range(keys.shape[0]):
        key = keys[i]
        s = _mix(key) & mask
        rows[i] = _EMPTY
        while slot_rows[s] != _EMPTY:
            if slot_keys[s] == key:
                rows[i] = slot_rows[s]
                break
            s = (s + np.uint64(1)) & mask


@njit(nogil=True, cache=True)
def _static_gather_f32(rows, values, out):  # type: ignore[no-untyped-def]
    for i in range(rows.shape[0]):
        r = rows[i]
        if r >= 0:
            for d in range(values.shape[1]):
                out[i, d] = values[r, d]


@njit(nogil=True, cache=True)
def _static_gather_f16(rows, values, out, lut):  # type: ignore[no-untyped-def]
    for i in range(rows.shape[0]):
        r = rows[i]
        if r >= 0:
            for d in range(values.shape[1]):
                out[i, d] = lut[values[r, d]]


@njit(nogil=True, cache=True)
def _static_write(keys, src, slot_keys, slot_rows, values, n_rows, insert):  # type: ignore[no-untyped-def]
    """Upsert (``insert``) or update in batch order; the caller checked there is room.
    Returns (new n_rows, positions whose key was already stored)."""
    mask = np.uint64(slot_keys.shape[0] - 1)
    found = 0
    for i in range(keys.shape[0]):
        key = keys[i]
        s = _mix(key) & mask
        while slot_rows[s] != _EMPTY and slot_keys[s] != key:
            s = (s + np.uint64(1)) & mask
        row = slot_rows[s]
        if row != _EMPTY:
            found += 1
        elif insert:
            row = n_rows
            n_rows += 1
            slot_keys[s] = key
            slot_rows[s] = row
        else:
            continue
        for d in range(values.shape[1]):
            values[row, d] = src[i, d]
    return n_rows, found


# --------------------------------------------------------------------------- helpers


def sets_of(keys: np.ndarray, num_sets: int) -> np.ndarray:
    """(n,) int64 set of each key: ``mix64(key) % num_sets`` (the GPU kernels' formula)."""
    out = np.empty(keys.shape[0], np.int64)
    _sets_of(keys, num_sets, out)
    return out


def _as_host(arr: Any, what: str) -> np.ndarray:
    if isinstance(arr, np.ndarray):
        return arr
    if hasattr(arr, "get") and hasattr(arr, "device"):  # a CuPy array: bring it over
        return arr.get()  # type: ignore[no-any-return]
    raise RequestError(f"{what} must be a numpy array, got {type(arr).__name__}")


def _to_storage(values: np.ndarray, value_dtype: np.dtype) -> np.ndarray:
    """Values in the storage dtype: float32 as is, float16 as uint16 bits."""
    if value_dtype == np.float16:
        return values.astype(np.float16).view(np.uint16)
    return np.ascontiguousarray(values)


class _RWLock:
    """Readers-writer lock: many readers, or one writer (writers are not starved: a
    waiting writer blocks new readers)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# --------------------------------------------------------------------------- dynamic


class CpuEmbeddingCache:
    """Set-associative cache with LRU or LFU eviction; the CPU twin of GpuEmbeddingCache.

    ``capacity`` rows are rounded up to whole sets of :data:`WAYS` slots.
    """

    kind = "dynamic"
    device = "cpu"

    def __init__(
        self,
        capacity: int,
        dim: int,
        *,
        policy: str = "lru",
        value_dtype: Any = np.float32,
        key_dtype: Any = np.int64,
        num_stripes: int | None = None,
    ) -> None:
        capacity, dim, vdt, kdt = check_cache_args("dynamic", capacity, dim, policy, value_dtype, key_dtype)
        self.dim, self.policy, self.value_dtype, self.key_dtype = dim, policy, vdt, kdt
        self.num_sets = -(-capacity // WAYS)
        self.capacity = self.num_sets * WAYS
        stripes = num_stripes or min(DEFAULT_STRIPES, max(2, 4 * (os.cpu_count() or 1)))
        self.num_stripes = max(1, min(int(stripes), self.num_sets))
        self._locks = [threading.Lock() for _ in range(self.num_stripes)]
        self._clock = itertools.count(1)  # next() is atomic under the GIL
        shape = (self.num_sets, WAYS)
        self._keys = np.zeros(shape, kdt)
        self._used = np.zeros(shape, np.uint8)
        self._ts = np.zeros(shape, np.int64)
        self._freq = np.zeros(shape, np.int64)
        storage = np.uint16 if vdt == np.float16 else np.float32
        self._values = np.zeros((self.capacity, dim), storage)

    def __repr__(self) -> str:
        return (
            f"CpuEmbeddingCache(capacity={self.capacity}, dim={self.dim}, policy={self.policy!r}, "
            f"value_dtype={self.value_dtype}, key_dtype={self.key_dtype})"
        )

    # -- contract

    def set_of(self, keys: Any) -> np.ndarray:
        return sets_of(normalize_keys(np, _as_host(keys, "keys"), self.key_dtype), self.num_sets)

    def query(self, keys: Any, out: Any, stream: Any = None) -> tuple[np.ndarray, np.ndarray]:
        keys = normalize_keys(np, _as_host(keys, "keys"), self.key_dtype)
        check_batch(np, keys, _as_host(out, "out"), self.dim, "out")
        hit = np.zeros(keys.shape[0], np.bool_)
        clock = next(self._clock)
        for sets, positions, lock in self._by_stripe(keys):
            with lock:
                if self.value_dtype == np.float16:
                    _query_f16(keys, sets, positions, self._keys, self._used, self._ts, self._freq,
                               self._values, out, hit, clock, _F16_TO_F32)
                else:
                    _query_f32(keys, sets, positions, self._keys, self._used, self._ts, self._freq,
                               self._values, out, hit, clock)
        missing = np.flatnonzero(~hit).astype(np.int64)
        return keys[missing], missing

    def replace(self, keys: Any, values: Any, stream: Any = None) -> None:
        self._write(keys, values, insert=True)

    def update(self, keys: Any, values: Any, stream: Any = None) -> int:
        return self._write(keys, values, insert=False)

    def dump(self, start_set: int, end_set: int, stream: Any = None) -> np.ndarray:
        lo, hi = max(0, int(start_set)), min(self.num_sets, int(end_set))
        if lo >= hi:
            return np.empty(0, self.key_dtype)
        with self._all_locks():
            return self._keys[lo:hi][self._used[lo:hi] != 0].copy()

    def clear(self, stream: Any = None) -> None:
        with self._all_locks():
            self._used[:] = 0
            self._freq[:] = 0
            self._ts[:] = 0

    def size(self, stream: Any = None) -> int:
        return int(np.count_nonzero(self._used))

    # -- internals

    def _write(self, keys: Any, values: Any, *, insert: bool) -> int:
        keys = normalize_keys(np, _as_host(keys, "keys"), self.key_dtype)
        values = _as_host(values, "values")
        check_batch(np, keys, values, self.dim)
        src = _to_storage(values, self.value_dtype)
        clock = next(self._clock)
        lfu = self.policy == "lfu"
        found = 0
        for sets, positions, lock in self._by_stripe(keys):
            with lock:
                found += _write(keys, sets, positions, src, self._keys, self._used, self._ts,
                                self._freq, self._values, clock, lfu, insert)
        return found

    def _by_stripe(self, keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, threading.Lock]]:
        """(sets, positions of this stripe, its lock) for each stripe the batch touches."""
        if not keys.shape[0]:
            return
        sets = sets_of(keys, self.num_sets)
        order, offsets = _group_by_stripe(sets, self.num_stripes)
        for p in range(self.num_stripes):
            lo, hi = offsets[p], offsets[p + 1]
            if lo < hi:
                yield sets, order[lo:hi], self._locks[p]

    @contextmanager
    def _all_locks(self) -> Iterator[None]:
        for lock in self._locks:  # always in index order: no lock-order deadlock
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(self._locks):
                lock.release()


# --------------------------------------------------------------------------- static


class CpuStaticEmbeddingTable:
    """Whole-table-resident open-addressing map key -> row; the CPU twin of
    StaticEmbeddingTable. ``replace`` raises CacheFullError once ``capacity`` keys are held."""

    kind = "static"
    device = "cpu"
    num_sets = 1

    def __init__(
        self,
        capacity: int,
        dim: int,
        *,
        policy: str = "lru",  # accepted for a uniform factory; nothing is ever evicted
        value_dtype: Any = np.float32,
        key_dtype: Any = np.int64,
    ) -> None:
        capacity, dim, vdt, kdt = check_cache_args("static", capacity, dim, policy, value_dtype, key_dtype)
        self.capacity, self.dim, self.value_dtype, self.key_dtype = capacity, dim, vdt, kdt
        self.policy = policy
        nslots = 1 << max(4, (2 * capacity - 1).bit_length())  # load factor <= 1/2
        self._slot_keys = np.zeros(nslots, kdt)
        self._slot_rows = np.full(nslots, _EMPTY, np.int64)
        storage = np.uint16 if vdt == np.float16 else np.float32
        self._values = np.zeros((capacity, dim), storage)
        self._n_rows = 0
        self._lock = _RWLock()

    def __repr__(self) -> str:
        return (
            f"CpuStaticEmbeddingTable(capacity={self.capacity}, dim={self.dim}, "
            f"value_dtype={self.value_dtype}, key_dtype={self.key_dtype})"
        )

    def set_of(self, keys: Any) -> np.ndarray:
        return np.zeros(_as_host(keys, "keys").shape[0], np.int64)

    def query(self, keys: Any, out: Any, stream: Any = None) -> tuple[np.ndarray, np.ndarray]:
        keys = normalize_keys(np, _as_host(keys, "keys"), self.key_dtype)
        check_batch(np, keys, _as_host(out, "out"), self.dim, "out")
        rows = np.empty(keys.shape[0], np.int64)
        with self._lock.read():
            _static_find(keys, self._slot_keys, self._slot_rows, rows)
            if self.value_dtype == np.float16:
                _static_gather_f16(rows, self._values, out, _F16_TO_F32)
            else:
                _static_gather_f32(rows, self._values, out)
        missing = np.flatnonzero(rows < 0).astype(np.int64)
        return keys[missing], missing

    def replace(self, keys: Any, values: Any, stream: Any = None) -> None:
        self._write(keys, values, insert=True)

    def update(self, keys: Any, values: Any, stream: Any = None) -> int:
        return self._write(keys, values, insert=False)

    def dump(self, start_set: int = 0, end_set: int = 1, stream: Any = None) -> np.ndarray:
        with self._lock.read():
            return self._slot_keys[self._slot_rows != _EMPTY].copy()

    def clear(self, stream: Any = None) -> None:
        with self._lock.write():
            self._slot_rows[:] = _EMPTY
            self._n_rows = 0

    def size(self, stream: Any = None) -> int:
        return self._n_rows

    def _write(self, keys: Any, values: Any, *, insert: bool) -> int:
        keys = normalize_keys(np, _as_host(keys, "keys"), self.key_dtype)
        values = _as_host(values, "values")
        check_batch(np, keys, values, self.dim)
        src = _to_storage(values, self.value_dtype)
        with self._lock.write():
            if insert:
                self._check_room(keys)
            self._n_rows, found = _static_write(keys, src, self._slot_keys, self._slot_rows,
                                                self._values, self._n_rows, insert)
        return int(found)

    def _check_room(self, keys: np.ndarray) -> None:
        """Refuse the whole batch, before writing anything, if its new keys do not fit."""
        rows = np.empty(keys.shape[0], np.int64)
        _static_find(keys, self._slot_keys, self._slot_rows, rows)
        new = np.unique(keys[rows < 0]).shape[0]
        if self._n_rows + new > self.capacity:
            raise CacheFullError(
                f"static embedding table is full: it holds {self._n_rows} of {self.capacity} rows "
                f"and the batch brings {new} new keys; size the table for the whole model "
                "(static tables never evict) or use a dynamic cache"
            )
