"""Host-level volatile tier: the hash map in shared memory, one copy per host (issue 18).

:class:`SharedHashMapVolatileDB` keeps each table in one file under /dev/shm that every
process serving it maps (:mod:`hps_core.db.shm_store` owns the file: layout, create-or-attach,
users, removal). It is what HugeCTR's ``hash_map`` / ``parallel_hash_map`` configs get by
default (``volatile_db.host_shared: false`` keeps a private
:class:`~hps_core.db.hash_map.HashMapVolatileDB` in each process) and what
``multi_process_hash_map`` always gets.

Same hash map as the private one (``hash_map.py``: partitions, open addressing with
``(key, row)`` slots, dense rows with the key in each row's header, packed row formats,
HugeCTR's overflow policies), and the same lookup kernel body (``_find_group``), with three
differences that make it safe between processes:

- **Readers take no lock.** Each partition has a seqlock word: a writer makes it odd before it
  changes the partition and even after. The lookup kernel reads a group's rows between two
  reads of the word and reads the group again when they differ or were odd, so a row half
  written by another process is never returned. Capacities are fixed for a file's life (growth
  makes a new file), so whatever a reader sees mid-change is a valid index into mapped memory,
  and probes stop at an empty slot because the load factor stays <= 1/2.
- **One writer per table per host**, under ``flock`` (released by the kernel when its holder
  dies). Every change is journaled in the file's header (``shm_store``) and committed by one
  8-byte store: an append by the partition's ``n_rows``, an overwrite by copying the old row to
  the undo area first, a removal by ``n_rows`` after the swap-remove's copy. :func:`recover`,
  run by the next lock holder, restores the undo row or redoes the removal's copy, then rebuilds
  the partition's slots from its rows (the keys are in the rows) and makes the seqlock even.
  A writer SIGKILLed anywhere thus leaves the old or the new row, no lock held, no torn row:
  ``tests/hps_core/db/test_shared_hash_map_torture.py`` kills writers at random points.
- **Growth** (a partition out of rows) builds a file twice as large beside the old one, marks
  the old one superseded and renames the new one over it; a process's next lookup of that
  table sees the flag inside the kernel and remaps. Within a process, a lookup and a remap are
  kept apart by a reader-writer spinlock, so a mapping is never unmapped under a kernel.

Filling: the first process to open a table creates its file sized for the rows it will load,
fills it from the sparse files in one kernel call per chunk (no journal, no seqlock: nobody
can attach to a file still ``filling``), marks it complete and unlocks; others block on the
lock and attach. ``hps_core.loader`` streams the files into it (:class:`HostSharedTables`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit
from numba.np.numpy_support import carray

from hps_core.arrays import Flat, Keys, Mask, Vectors
from hps_core.config import VolatileDBConfig
from hps_core.db import shm_store as shm
from hps_core.db.base import TableGroups, TierBase, format_mismatch, unknown_table
from hps_core.db.hash_map import (
    _AHEAD,
    _EMPTY,
    _KEY,
    _STAMP_STAT,
    _STAT,
    _COUNT_STAT,
    _delete_slot,
    _find_group,
    _header_bytes,
    _row_stride,
    _slot_of,
    MapSettings,
    group_by_partition,
    overflow_victims,
    probe,
)
from hps_core.errors import ConfigError, TierError
from hps_core.grouping import group_by
from hps_core.hashing import mix64, partition
from hps_core.intrinsics import (
    LockArray,
    as_voidptr,
    atomic_add,
    atomic_load,
    atomic_store,
    atomic_tick,
    fence_acquire,
    fence_release,
    prefetch,
    sched_yield,
)
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack
from hps_core.rows import check_rows_fit

__all__ = ["SharedHashMapVolatileDB", "recover"]

log = logging.getLogger(__name__)

# directory rows: where each table's regions are (columns: tables in the order attached)
_D_HEADER, _D_PARTS, _D_SLOTS, _D_SLOT_COUNT, _D_ROWS, _D_ROW_CAP, _D_STRIDE = range(7)
_DIRECTORY_ROWS = 7
# what the lookup kernel returns, with an index
_OK, _BAD_POSITION, _SUPERSEDED, _STUCK, _GONE = 0, 1, 2, 3, 4
_SPIN_LIMIT = 20_000  # yields a reader waits for a partition's writer before it checks it is alive
# journal ops (header word H_JOP)
_J_NONE, _J_APPEND, _J_OVERWRITE, _J_REMOVE = 0, 1, 2, 3
_MIN_ROWS_PER_PARTITION = 64


# --------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True)
def _fetch(
    keys: Keys, table_ids: Keys, offsets: Keys, out: Flat, found: Mask, entries: Keys, dims: Keys,
    codes: Keys, num_partitions: int, directory: Any, stat: int, spin_limit: int,
) -> tuple[int, int]:
    """Every key's row into ``out[offsets[i]:]`` (dequantised), ``found[i]`` set; no lock taken.

    Returns (_OK, 0); (_BAD_POSITION, i) for the first key whose table id or row does not fit
    ``out`` (nothing read); (_SUPERSEDED, t) when table ``t``'s file was grown over (remap and
    call again); (_STUCK, t * P + p) when partition p of table t stayed odd for ``spin_limit``
    yields (its writer may have died: take the writer lock, which repairs it, and call again);
    (_GONE, t) when table ``t`` was dropped after the caller resolved it (nothing read).
    """
    n = keys.shape[0]
    tables = entries.shape[0]
    hashes = np.empty(n, np.uint64)
    bucket = np.empty(n, np.int64)
    for i in range(n):
        t = table_ids[i]
        if t < 0 or t >= tables or offsets[i] < 0 or offsets[i] + dims[t] > out.shape[0]:
            return _BAD_POSITION, i
        h = mix64(keys[i])
        hashes[i] = h
        bucket[i] = partition(h, num_partitions) * tables + t
    for t in range(tables):
        if directory[_D_HEADER, entries[t]] == 0:  # dropped (or the tier closed) since resolved
            return _GONE, t
        header = carray(as_voidptr(directory[_D_HEADER, entries[t]]), (shm.HEADER_WORDS,), np.int64)
        if atomic_load(header, shm.H_SUPERSEDED) != 0:
            return _SUPERSEDED, t
    order, starts = group_by(bucket, num_partitions * tables)
    rows = np.empty(n, np.int64)
    for p in range(num_partitions):
        for t in range(tables):
            lo, hi = starts[p * tables + t], starts[p * tables + t + 1]
            if lo == hi:
                continue
            e = entries[t]
            parts = carray(as_voidptr(directory[_D_PARTS, e]), (num_partitions * shm.PART_WORDS,), np.int64)
            count, cap, stride = directory[_D_SLOT_COUNT, e], directory[_D_ROW_CAP, e], directory[_D_STRIDE, e]
            slots = carray(as_voidptr(directory[_D_SLOTS, e] + p * count * 16), (count, 2), np.int64)
            data = carray(as_voidptr(directory[_D_ROWS, e] + p * cap * stride), (cap * stride,), np.uint8)
            clock = carray(as_voidptr(directory[_D_HEADER, e] + 8 * shm.H_CLOCK), (1,), np.int64)
            spins = 0
            while True:
                before = atomic_load(parts, p * shm.PART_WORDS + shm.P_SEQ)
                if before & 1 == 0:
                    for j in range(lo, hi):
                        found[order[j]] = False
                    _find_group(keys, hashes, order, offsets, out, found, rows, lo, hi, dims[t], codes[t],
                                slots, data, stride, clock, stat)
                    fence_acquire()  # the group's loads complete before the second look (weak CPUs)
                    if atomic_load(parts, p * shm.PART_WORDS + shm.P_SEQ) == before:
                        break
                spins += 1
                if spins > spin_limit:
                    return _STUCK, t * num_partitions + p
                sched_yield()
    return _OK, 0


@njit(nogil=True, cache=True)
def _fill(keys: Keys, order: Any, lo: int, hi: int, packed: Any, slots: Any, meta: Any, rows: Any, parts: Any,
          p: int, stamp0: int, stat: int) -> int:
    """Store ``packed[i]`` under ``keys[i]`` for i in ``order[lo:hi]`` (all of partition ``p``,
    whose slots, row headers and rows are given) into a file nobody else maps yet: no journal,
    no seqlock, and one thread per partition. Returns -1, or the first j whose key found no
    free row."""
    mask = np.uint64(slots.shape[0] - 1)
    cap = rows.shape[0]
    header = _header_bytes(stat)
    row_bytes = packed.shape[1]
    n_rows = parts[p * shm.PART_WORDS + shm.P_ROWS]
    flat = slots.reshape(-1)
    for j in range(lo, hi):
        if j + _AHEAD < hi:  # the slot of a key further on: its cache miss overlaps this key's work
            prefetch(flat, 2 * np.int64(mix64(keys[order[j + _AHEAD]]) & mask), True)
        i = order[j]
        key = keys[i]
        s = probe(slots, key, mask)
        row = slots[s, 1]
        if row == _EMPTY:
            if n_rows == cap:
                parts[p * shm.PART_WORDS + shm.P_ROWS] = n_rows
                return j
            row = n_rows
            n_rows += 1
            slots[s, 0] = key
            slots[s, 1] = row
            meta[row, _KEY] = key
            if stat == _COUNT_STAT:
                meta[row, _STAT] = 1
        if stat == _STAMP_STAT:
            meta[row, _STAT] = stamp0 + i
        dst, src = rows[row, header:], packed[i]
        for b in range(row_bytes):
            dst[b] = src[b]
    parts[p * shm.PART_WORDS + shm.P_ROWS] = n_rows
    return -1


@njit(nogil=True, cache=True)
def _clear_slots(slots: Any) -> None:
    """Mark every slot of one partition empty (a fresh file's slots; one thread per partition)."""
    for s in range(slots.shape[0]):
        slots[s, 1] = _EMPTY


@njit(nogil=True, cache=True)
def _count_new(keys: Keys, positions: Any, slots: Any) -> int:
    """How many of ``keys[positions]`` partition ``slots`` does not hold (by the writer-lock
    holder, so the slots are stable); a key repeated in the batch counts each time."""
    mask = np.uint64(slots.shape[0] - 1)
    fresh = 0
    for j in range(positions.shape[0]):
        if _slot_of(slots, keys[positions[j]], mask) < 0:
            fresh += 1
    return fresh


@njit(nogil=True, cache=True)
def _upsert(keys: Keys, positions: Any, packed: Any, header: Any, parts: Any, p: int, slots: Any,
            meta: Any, rows: Any, undo: Any, stamp0: int, stat: int) -> None:
    """Journaled upsert of ``packed[i]`` under ``keys[i]``, i in ``positions`` (all of
    partition ``p``), by the holder of the writer lock; the caller made room for every key."""
    mask = np.uint64(slots.shape[0] - 1)
    hb = _header_bytes(stat)
    row_bytes = packed.shape[1]
    seq = p * shm.PART_WORDS + shm.P_SEQ
    atomic_store(header, shm.H_JPART, p)
    atomic_add(parts, seq, 1)  # odd: readers of p read again
    fence_release()  # ... before any of the stores below is seen (weak CPUs)
    n_rows = parts[p * shm.PART_WORDS + shm.P_ROWS]
    for j in range(positions.shape[0]):
        i = positions[j]
        key = keys[i]
        s = probe(slots, key, mask)
        row = slots[s, 1]
        if row == _EMPTY:
            row = n_rows
            atomic_store(header, shm.H_JA, row)
            atomic_store(header, shm.H_JOP, _J_APPEND)
            meta[row, _KEY] = key
            if stat == _COUNT_STAT:
                meta[row, _STAT] = 1
        else:
            undo[:] = rows[row]
            atomic_store(header, shm.H_JA, row)
            atomic_store(header, shm.H_JOP, _J_OVERWRITE)
        if stat == _STAMP_STAT:
            meta[row, _STAT] = stamp0 + j
        dst, src = rows[row, hb:], packed[i]
        for b in range(row_bytes):
            dst[b] = src[b]
        if row == n_rows:
            slots[s, 0] = key
            slots[s, 1] = row
            n_rows += 1
            atomic_store(parts, p * shm.PART_WORDS + shm.P_ROWS, n_rows)  # the append's commit
        atomic_store(header, shm.H_JOP, _J_NONE)  # the overwrite's commit
    atomic_add(parts, seq, 1)


@njit(nogil=True, cache=True)
def _remove(keys: Keys, positions: Any, header: Any, parts: Any, p: int, slots: Any, meta: Any) -> int:
    """Journaled removal of ``keys[i]``, i in ``positions`` (all of partition ``p``; absent keys
    skipped): swap-remove, so rows stay dense. Returns the rows removed."""
    mask = np.uint64(slots.shape[0] - 1)
    words = meta.shape[1]
    seq = p * shm.PART_WORDS + shm.P_SEQ
    atomic_store(header, shm.H_JPART, p)
    atomic_add(parts, seq, 1)
    fence_release()
    n_rows = parts[p * shm.PART_WORDS + shm.P_ROWS]
    removed = 0
    for j in range(positions.shape[0]):
        s = _slot_of(slots, keys[positions[j]], mask)
        if s < 0:
            continue
        row = slots[s, 1]
        last = n_rows - 1
        atomic_store(header, shm.H_JA, row)
        atomic_store(header, shm.H_JB, last)
        atomic_store(header, shm.H_JOP, _J_REMOVE)
        _delete_slot(slots, s, mask)
        if row != last:
            for w in range(words):
                meta[row, w] = meta[last, w]
            slots[_slot_of(slots, meta[row, _KEY], mask), 1] = row
        n_rows -= 1
        atomic_store(parts, p * shm.PART_WORDS + shm.P_ROWS, n_rows)  # the removal's commit
        atomic_store(header, shm.H_JOP, _J_NONE)
        removed += 1
    atomic_add(parts, seq, 1)
    return removed


@njit(nogil=True, cache=True)
def _rebuild_slots(slots: Any, meta: Any, n_rows: int) -> None:
    """Slots of one partition made again from its rows ``[0, n_rows)`` (each holds its key)."""
    mask = np.uint64(slots.shape[0] - 1)
    for s in range(slots.shape[0]):
        slots[s, 1] = _EMPTY
    for row in range(n_rows):
        key = meta[row, _KEY]
        s = probe(slots, key, mask)
        slots[s, 0] = key
        slots[s, 1] = row


@njit(nogil=True, cache=True)
def recover(header: Any, parts: Any, slots: Any, meta: Any, rows: Any, undo: Any) -> int:
    """Repair what a writer that died left: finish or undo the journaled change, rebuild the
    slots of every partition whose seqlock is odd (or that the journal names) and make it even.
    Idempotent: a recovery killed midway is done again whole by the next lock holder. Returns
    the partitions repaired."""
    op, jp = header[shm.H_JOP], header[shm.H_JPART]
    repaired = 0
    for p in range(slots.shape[0]):
        seq = p * shm.PART_WORDS + shm.P_SEQ
        named = op != _J_NONE and p == jp
        odd = parts[seq] & 1 == 1
        if not (named or odd):
            continue
        if not odd:
            atomic_add(parts, seq, 1)
        n_rows = parts[p * shm.PART_WORDS + shm.P_ROWS]
        if named and op == _J_OVERWRITE:
            rows[p, header[shm.H_JA]] = undo
        elif named and op == _J_REMOVE:
            row, last = header[shm.H_JA], header[shm.H_JB]
            if n_rows == last + 1:  # not committed: finish it (the copy is idempotent)
                if row != last:
                    rows[p, row] = rows[p, last]
                n_rows = last
                atomic_store(parts, p * shm.PART_WORDS + shm.P_ROWS, n_rows)
        _rebuild_slots(slots[p], meta[p], n_rows)
        atomic_add(parts, seq, 1)
        repaired += 1
    atomic_store(header, shm.H_JOP, _J_NONE)
    return repaired


# --------------------------------------------------------------------------- the tier


def _views(store: shm.StoreFile) -> Any:
    """The int64 view of every row header, (P, R, stride // 8)."""
    return store.rows.view(np.int64)


_open_tiers: weakref.WeakSet[SharedHashMapVolatileDB] = weakref.WeakSet()


def _reset_locks_after_fork() -> None:
    for tier in list(_open_tiers):
        tier._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_locks_after_fork)


class SharedHashMapVolatileDB(TierBase[tuple[Keys, Keys, Keys]]):
    """Volatile tier in host shared memory: every process that opens a table maps one copy.

    Args:
        config: the ``volatile_db`` section (defaults: ``VolatileDBConfig()``). Read here, as by
            :class:`~hps_core.db.hash_map.HashMapVolatileDB`: ``num_partitions``,
            ``max_get_batch_size`` / ``max_set_batch_size`` (keys written per seqlock hold),
            ``overflow_*``; and ``shared_memory_name`` (the namespace; default: from
            ``source``), ``shared_memory_size`` (most bytes the namespace may take in
            /dev/shm) and ``shared_memory_auto_remove`` (remove a table's file when its last
            user closes it and no keeper is alive).
        source: the HPS JSON's path, which names the default namespace.
        seed: seed of the ``evict_random`` victim choice.

    One departure from the contract's letter: a lookup that raced a writer of the same
    partition reads the group again, and a key it found the first time but not the second
    (removed meanwhile) keeps the bytes the first read wrote into ``out`` although it reports
    a miss. The lookup writes every miss's row from the next tier or the default, so nothing
    served is affected; a caller that relies on misses leaving ``out`` untouched must copy.

    Arguments are checked by :class:`~hps_core.db.base.TierBase` (``open_table``'s too);
    table ids and row bounds of ``fetch_tables`` by the lookup kernel, before it writes.
    """

    _label = "host store"
    _kernel_bounds = True

    def __init__(self, config: VolatileDBConfig | None = None, *, source: str = "",
                 seed: int | None = None) -> None:
        config = VolatileDBConfig() if config is None else config
        settings = MapSettings.of(config)
        self._overflow = settings.overflow
        self._num_partitions = settings.num_partitions
        self._max_set = settings.max_set
        self._stat = settings.stat
        self._limit = config.shared_memory_size
        self._auto_remove = config.shared_memory_auto_remove
        self.namespace = shm.namespace_of(config, source)
        self._dir = shm.namespace_dir(self.namespace)
        self._rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(self._num_partitions)]
        self._stores: dict[str, shm.StoreFile] = {}
        self._index: dict[str, int] = {}  # table -> directory column
        self._names: list[str] = []  # directory column -> table
        self._directory = np.zeros((_DIRECTORY_ROWS, 16), np.int64)
        self._handed_out = [self._directory]  # every directory array a kernel may hold
        self._maps = LockArray(1)  # lookups (shared) vs. remapping (exclusive), in this process
        self._groups: TableGroups[tuple[Keys, Keys, Keys]] = TableGroups(self._resolve)
        self._tables_lock = threading.RLock()  # guards the dicts and swaps: held briefly, never across a wait
        self._opening = threading.RLock()  # one open (a fill, or a wait for another process's) at a time
        self._closed = False
        _open_tiers.add(self)

    def _after_fork_in_child(self) -> None:
        """This process's locks as a forked child finds them: held, maybe, by threads of the
        parent that do not exist here. Every lookup and remap of the child would wait on them
        for ever; nothing runs in the child yet, so they start free (shm_store gives each store
        a file description of its own beside this)."""
        self._maps.locks[:] = 0
        self._maps.waiting[:] = 0
        self._tables_lock = threading.RLock()
        self._opening = threading.RLock()

    def __repr__(self) -> str:
        return (f"SharedHashMapVolatileDB(namespace={self.namespace!r}, "
                f"num_partitions={self._num_partitions}, tables={len(self._stores)})")

    @property
    def directory(self) -> Path:
        """The namespace folder holding this tier's store files."""
        return self._dir

    # ---------------------------------------------------------------- contract

    def _create_table(self, table: str, dim: int, row_format: RowFormat) -> None:
        self._open(table, dim, row_format, 0, "", None, create=True)

    def open_table(self, table: str, dim: int, row_format: RowFormat = RowFormat.FP32, *, rows: int = 0,
                   source: str = "", fill: Callable[[Callable[[Keys, Vectors], None]], None] | None = None
                   ) -> bool:
        """Attach to ``table``'s store, or create it sized for ``rows`` and fill it.

        ``fill(write)`` runs only in the process that creates the store, under its lock, while
        the others wait; it calls ``write(keys, values)`` per chunk. ``source`` names what the
        store is filled from (the loader passes the sparse files' fingerprint): a complete store
        of another source, dim or format is rebuilt when no live process uses it, refused by
        name when one does. Returns True when this call filled the store.
        """
        table, dim, row_format = self._table_shape(table, dim, row_format)
        return self._open(table, dim, row_format, rows, source, fill, create=True)

    def _open(self, table: str, dim: int, row_format: RowFormat, rows: int, source: str,
              fill: Callable[[Callable[[Keys, Vectors], None]], None] | None, *, create: bool) -> bool:
        """``open_table``; with ``create`` false only a complete store already there is attached
        (UnknownTableError otherwise): what a read of a table this handle never opened does."""
        with self._opening:
            self._check_open()
            known = self._stores.get(table)
            if known is not None:
                self._check_shape(known, table, dim, row_format)
                return False
            store, filled = self._create_or_attach(table, dim, row_format, rows, source, fill, create=create)
            with self._tables_lock:
                if self._closed:  # closed meanwhile: leave what was just opened
                    self._detach(store)
                    self._check_open()
                self._adopt(table, store)
            return filled

    def row_format(self, table: str) -> RowFormat:
        return self._store(table).spec.row_format

    def dim(self, table: str) -> int:
        return self._store(table).spec.dim

    def _insert(self, table: str, keys: Keys, values: Vectors) -> None:
        spec = self._store(table).spec
        if keys.shape[0] == 0:
            return
        packed = values.view(np.uint8) if spec.row_format is RowFormat.FP32 else pack(
            spec.row_format, values, f"table {table!r}")
        order, offsets = self._group(keys)
        with self._writing(table) as current:
            for p in range(self._num_partitions):
                group = order[offsets[p] : offsets[p + 1]]
                for start in range(0, group.shape[0], self._max_set):
                    chunk = group[start : start + self._max_set]
                    store = current()
                    room = store.spec.rows_per_partition - store.parts[p * shm.PART_WORDS + shm.P_ROWS]
                    if chunk.shape[0] > room:  # overwrites need no room: count the new keys first
                        fresh = _count_new(keys, chunk, store.slots[p])
                        if fresh > room:
                            store = self._grow(table, store, fresh)
                    stamp0 = atomic_tick(store.header[shm.H_CLOCK : shm.H_CLOCK + 1], chunk.shape[0])
                    _upsert(keys, chunk, packed, store.header, store.parts, p, store.slots[p], _views(store)[p],
                            store.rows[p], store.undo, stamp0, self._stat)
                    if store.parts[p * shm.PART_WORDS + shm.P_ROWS] > self._overflow.margin:
                        self._resolve_overflow(store, p)

    def _fetch(self, table: str, keys: Keys, out: Vectors) -> Mask:
        n, dim = out.shape
        return self.fetch_tables((table,), np.zeros(n, np.int64), keys, out.reshape(-1),
                                 np.arange(0, n * dim, dim, dtype=np.int64))

    def _tables_of(self, tables: Sequence[str]) -> tuple[Keys, tuple[Keys, Keys, Keys]]:
        group = self._groups.get(tables)
        return group[1], group

    def _fetch_tables(self, group: tuple[Keys, Keys, Keys], table_ids: Keys, keys: Keys, out: Flat,
                      offsets: Keys) -> Mask:
        entries, dims, codes = group
        found = np.zeros(keys.shape[0], np.bool_)
        if not keys.shape[0]:
            return found
        while True:
            with self._maps.read_locked(0):
                self._check_open()
                status, index = _fetch(keys, table_ids, offsets, out, found, entries, dims, codes,
                                       self._num_partitions, self._directory, self._stat, _SPIN_LIMIT)
            if status == _OK:
                return found
            if status == _BAD_POSITION:
                check_rows_fit(table_ids, offsets, dims, out.shape[0], "host store fetch_tables")
                raise TierError(f"host store fetch_tables: key {index} does not fit out")  # unreachable
            if status == _GONE:
                self._check_open()
                self._groups.clear()
                raise unknown_table(self._names[int(entries[index])], self._stores)
            if status == _SUPERSEDED:
                self._remap(self._names[int(entries[index])])
            else:  # a partition stayed odd: its writer may be dead; the writer lock repairs it
                with self._writing(self._names[int(entries[index // self._num_partitions])]):
                    pass

    def count(self, table: str) -> int:
        return self._current(table).n_rows()

    def table_names(self) -> list[str]:
        """The tables of this namespace: those attached here and every complete store file."""
        self._check_open()
        names = set(self._stores)
        names.update(info.table for info in shm.list_stores(self.namespace) if info.complete)
        return sorted(names)

    def close(self) -> None:
        with self._tables_lock:
            if self._closed:
                return
            self._closed = True
            with self._maps.write_locked(0):  # in-flight lookups finish first
                stores, self._stores = self._stores, {}
                for table in self._handed_out:
                    table[:] = 0
            self._groups.clear()
        # outside _tables_lock: a writer growing a table holds its store lock and then wants
        # _tables_lock; leaving takes the store lock (the two deadlocked)
        for store in stores.values():
            self._detach(store)
        shm.remove_stale_growth(self._dir)  # larger files growers that died were building
        with contextlib.suppress(OSError):
            self._dir.rmdir()  # only when no file is left in it

    # ---------------------------------------------------------------- extras

    def remove(self, table: str, keys: Keys) -> int:
        """Delete ``keys`` (n,) int64 from ``table``; returns the rows removed."""
        keys = self._keys_in(table, keys)
        if keys.shape[0] == 0:
            return 0
        order, offsets = self._group(keys)
        removed = 0
        with self._writing(table) as current:
            for p in range(self._num_partitions):
                store = current()
                group = np.ascontiguousarray(order[offsets[p] : offsets[p + 1]])
                removed += _remove(keys, group, store.header, store.parts, p, store.slots[p], _views(store)[p])
        return removed

    def evict_table(self, table: str) -> int:
        """Empty ``table`` (it stays defined); returns the rows dropped."""
        with self._writing(table) as current:
            store = current()
            dropped = store.n_rows()
            for p in range(self._num_partitions):
                seq = p * shm.PART_WORDS + shm.P_SEQ
                store.parts[seq] += 1
                store.parts[p * shm.PART_WORDS + shm.P_ROWS] = 0
                store.slots[p, :, 1] = _EMPTY
                store.parts[seq] += 1
        return dropped

    def drop_table(self, table: str) -> int:
        """Delete ``table``'s store file and rows for good (the ``DropTable`` capability)."""
        with self._writing(table) as current:
            store = current()
            dropped = store.n_rows()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(store.path)
        with self._tables_lock, self._maps.write_locked(0):
            gone = self._stores.pop(table, None)
            self._directory_set(self._index[table], None)
            self._groups.clear()
        if gone is not None:
            gone.close()
        return dropped

    def memory_bytes(self, table: str | None = None) -> int:
        """Bytes of shared memory the table's store file (or every attached one) takes."""
        stores = [self._current(t) for t in ([table] if table is not None else list(self._stores))]
        return sum(s.spec.nbytes for s in stores)

    def bytes_per_row(self, table: str) -> float:
        store = self._current(table)
        n = store.n_rows()
        if n == 0:
            return float(store.spec.stride + 2 * 16)
        return store.spec.nbytes / n

    def generation(self, tables: Sequence[str]) -> str:
        """An identity of ``tables``' stores that changes whenever one of them is built anew
        (not when it grows): the processes attached to the same stores share it, which is what
        makes their update consumer group one per host (``hps_core/online.py``)."""
        created = ",".join(f"{t}@{int(self._store(t).header[shm.H_CREATED])}" for t in sorted(tables))
        return f"{self.namespace}-{hashlib.sha256(created.encode()).hexdigest()[:12]}"

    def store_path(self, table: str) -> Path:
        """The file holding ``table`` (for messages and ``hps inspect``)."""
        return self._store(table).path

    # ---------------------------------------------------------------- opening

    def _spec(self, table: str, dim: int, row_format: RowFormat, rows: int) -> shm.StoreSpec:
        if self._overflow.limited:
            per_part = self._overflow.margin + self._max_set
        else:
            # a partition's share of n keys is binomial: n/P +- sqrt(n/P); 4 sigma of room (a
            # partition past it grows), where a fixed fraction would waste memory on large tables
            share = rows / self._num_partitions
            per_part = int(share + 4 * math.sqrt(share)) + _MIN_ROWS_PER_PARTITION
        return shm.StoreSpec(table, dim, row_format, self._stat, self._num_partitions, per_part,
                             _row_stride(dim, row_format, self._stat))

    def _create_or_attach(self, table: str, dim: int, row_format: RowFormat, rows: int, source: str,
                          fill: Callable[[Callable[[Keys, Vectors], None]], None] | None, *, create: bool = True
                          ) -> tuple[shm.StoreFile, bool]:
        shm.ensure_dir(self._dir)
        shm.remove_stale_growth(self._dir)
        path = self._dir / shm.file_name(table)
        spec = self._spec(table, dim, row_format, rows)
        while True:
            try:
                fd = shm.open_fd(path, create=create)
            except FileNotFoundError:
                if not create:
                    raise unknown_table(table, self._stores) from None
                # the namespace folder, empty a moment ago, was removed by another process's
                # sweep (hps serve's stop removes empty namespace folders): make it again
                shm.ensure_dir(self._dir)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not _is_at(fd, path):
                    if not create:
                        raise unknown_table(table, self._stores)
                    continue  # removed or replaced while we waited: open it again
                if os.fstat(fd).st_size == 0:
                    if not create:  # another process is creating it: not a complete store yet
                        raise unknown_table(table, self._stores)
                    store = self._create(path, fd, spec, source)
                    fd = -1  # the store owns it now
                    store, filled = self._fill_new(table, store, fill)
                    store.header[shm.H_STATE] = shm.COMPLETE
                    store.register()
                    fcntl.flock(store.fd, fcntl.LOCK_UN)
                    return store, filled
                existing = self._attach(path, fd, table, dim, row_format, source, fill is not None)
                if existing is None:
                    continue  # removed to be built again
                fd = -1
                return existing, False
            finally:
                if fd >= 0:
                    os.close(fd)  # closing also drops the flock

    def _create(self, path: Path, fd: int, spec: shm.StoreSpec, source: str) -> shm.StoreFile:
        """A fresh store at ``path`` (its ``fd`` locked by the caller): sized, its memory taken
        and its slots emptied by one thread per partition, its header written."""
        _warn_without_huge_pages(path.parent.parent)
        store = None
        try:
            shm.reserve(fd, path, spec.nbytes, self._limit, shm.namespace_bytes(self._dir, but=path))
            store = shm.StoreFile(path, fd, spec)

            def prepare(p: int) -> None:
                assert store is not None
                store.populate(p)
                _clear_slots(store.slots[p])

            with _partition_pool(spec.partitions) as run:
                run(prepare, range(spec.partitions))
            shm.initialise(store, {"table": spec.table, "source": source, "namespace": self.namespace,
                                   "auto_remove": self._auto_remove})
        except BaseException:
            os.unlink(path)
            if store is not None:
                store.fd = -1  # the caller closes fd
                store.close()
            raise
        return store

    def _fill_new(self, table: str, store: shm.StoreFile,
                  fill: Callable[[Callable[[Keys, Vectors], None]], None] | None) -> tuple[shm.StoreFile, bool]:
        """Run ``fill`` into a fresh store nobody else maps (its flock held), growing it when a
        partition runs out; returns the store filled (a growth replaces it) and whether ``fill``
        ran. A fill that fails removes the file: nobody attached, nothing half-filled stays."""
        if fill is None:
            return store, False
        spec = store.spec
        current = [store]  # the store being filled: a growth inside write() replaces it
        try:
            with _partition_pool(spec.partitions) as run:

                def write(keys: Keys, values: Vectors) -> None:
                    keys, values = self._batch_in(table, keys, values, spec.dim)
                    packed = values.view(np.uint8) if spec.row_format is RowFormat.FP32 else pack(
                        spec.row_format, values, f"table {table!r}")
                    current[0] = self._fill_chunk(current[0], keys, packed, run)

                fill(write)
        except BaseException:
            os.unlink(current[0].path)
            current[0].close()
            raise
        return current[0], True

    def _fill_chunk(self, store: shm.StoreFile, keys: Keys, packed: Any, run: Callable[..., list[Any]]
                    ) -> shm.StoreFile:
        """One chunk of a fill into ``store``: each partition's keys by one thread of ``run``; a
        partition out of rows grows the file (all partitions) and carries on where it stopped.
        Returns the store filled (the grown one after a growth)."""
        order, starts = self._group(keys)
        pending = {p: int(starts[p]) for p in range(self._num_partitions) if starts[p] < starts[p + 1]}
        stamp0 = atomic_tick(store.header[shm.H_CLOCK : shm.H_CLOCK + 1], keys.shape[0])
        while pending:
            meta = _views(store)

            def one(p: int) -> tuple[int, int]:
                return p, _fill(keys, order, pending[p], starts[p + 1], packed, store.slots[p], meta[p],
                                store.rows[p], store.parts, p, stamp0, self._stat)

            stopped = {p: j for p, j in run(one, list(pending)) if j >= 0}
            if stopped:
                extra = max(int(starts[p + 1]) - j for p, j in stopped.items())
                store = self._grow(store.spec.table, store, extra, filling=True)
            pending = stopped
        return store

    def _attach(self, path: Path, fd: int, table: str, dim: int, row_format: RowFormat, source: str,
                check_source: bool) -> shm.StoreFile | None:
        """Judge the complete-or-not file at ``path`` (its flock held): attach, or None when it
        was removed to be rebuilt; refuses a store others use that does not fit."""
        size = os.fstat(fd).st_size
        header = np.fromfile(path, np.int64, shm.HEADER_WORDS) if size >= shm.HEADER_WORDS * 8 else None
        spec = None if header is None else shm.spec_of(header, table)
        if spec is not None and size < spec.nbytes:
            spec = None  # truncated
        wanted = self._spec(table, dim, row_format, 0)
        problem = ""
        if spec is None:
            problem = "it is not a store of this version"
        elif int(header[shm.H_STATE]) != shm.COMPLETE:  # type: ignore[index]
            problem = "its filler died before it was complete"
        else:
            shape = (spec.dim, spec.row_format, spec.stat, spec.partitions)
            if shape != (wanted.dim, wanted.row_format, wanted.stat, wanted.partitions):
                problem = (f"it holds dim {spec.dim}, {spec.row_format}, access stat {spec.stat}, "
                           f"{spec.partitions} partitions; this server wants dim {dim}, {row_format}, "
                           f"access stat {wanted.stat}, {wanted.partitions} partitions")
            elif check_source and shm.read_meta(header).get("source") != source:
                problem = "it was filled from other sparse files (or another share of them)"
        if problem:
            store = shm.StoreFile(path, fd, spec) if spec is not None else None
            users = store.users() if store is not None else []
            others = [pid for pid, _ in users]  # this process's other handles count too
            if store is not None:
                store.fd = -1  # the caller closes fd
                store.close()
            if others:
                raise ConfigError(
                    f"host store {path} cannot be used for table {table!r}: {problem}; processes "
                    f"{', '.join(map(str, others))} still use it: stop them (or give this server its own "
                    "volatile_db.shared_memory_name)"
                )
            log.warning("host store %s: %s; removing it and building it again", path, problem)
            os.unlink(path)
            return None
        assert spec is not None
        store = shm.StoreFile(path, fd, spec)
        self._repair(store)
        if int(store.header[shm.H_SUPERSEDED]):  # a grower died before its rename: this file stays
            store.header[shm.H_SUPERSEDED] = 0
        store.register()
        fcntl.flock(fd, fcntl.LOCK_UN)
        return store

    # ---------------------------------------------------------------- writing

    @contextlib.contextmanager
    def _writing(self, table: str) -> Iterator[Callable[[], shm.StoreFile]]:
        """Hold ``table``'s writer lock on its current file (repaired first when a writer died);
        yields a function returning the current store (growth replaces it)."""
        while True:
            store = self._store(table)
            store.acquire()
            if store.closed or not store.is_current():
                store.release()
                if not store.closed:
                    self._remap(table)
                continue
            break
        try:
            self._repair(store)
            yield lambda: self._store(table)
        finally:
            self._store_or_none(table, store).release()

    def _repair(self, store: shm.StoreFile) -> None:
        """Finish what a dead writer left (caller holds the lock)."""
        odd = bool((store.parts[shm.P_SEQ :: shm.PART_WORDS] & 1).any())
        if int(store.header[shm.H_JOP]) != _J_NONE or odd:
            repaired = recover(store.header, store.parts, store.slots, _views(store), store.rows, store.undo)
            store.header[shm.H_RECOVERIES] += 1
            log.warning("host store %s: repaired %d partition(s) a writer that died left", store.path, repaired)

    def _resolve_overflow(self, store: shm.StoreFile, p: int) -> None:
        meta = _views(store)[p]
        victim_keys = overflow_victims(meta, int(store.parts[p * shm.PART_WORDS + shm.P_ROWS]), self._overflow,
                                       self._rngs[p])
        _remove(victim_keys, np.arange(victim_keys.shape[0], dtype=np.int64), store.header, store.parts, p,
                store.slots[p], meta)

    def _grow(self, table: str, old: shm.StoreFile, extra: int, *, filling: bool = False) -> shm.StoreFile:
        """Replace ``old`` (its lock held) by a file with room for ``extra`` more rows in any
        partition; returns the new store, locked. The old file is marked superseded before the
        rename, so every process remaps; a grower that dies leaves the old file in place."""
        spec = old.spec
        needed = int(old.parts[shm.P_ROWS :: shm.PART_WORDS].max()) + extra
        bigger = spec.grown(max(2 * spec.rows_per_partition, needed))
        tmp = shm.growth_path(old.path)
        fd = shm.open_fd(tmp, create=True)
        new = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            shm.reserve(fd, tmp, bigger.nbytes, self._limit, shm.namespace_bytes(self._dir, but=tmp))
            new = shm.StoreFile(old.path, fd, bigger)
            with _partition_pool(spec.partitions) as run:
                run(new.populate, range(spec.partitions))
        except BaseException:
            if new is not None:
                new.close()  # closes fd too
            else:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        shm.initialise(new, old.metadata())
        # clock, keeper, repairs, creation time and users carry over; the journal is clean
        users_end = shm.H_USERS + 2 * shm.MAX_USERS
        new.header[shm.H_CLOCK : users_end] = old.header[shm.H_CLOCK : users_end]
        new.header[shm.H_STATE] = old.header[shm.H_STATE]
        new.header[shm.H_SUPERSEDED] = 0
        new.header[shm.H_JOP] = _J_NONE
        new_meta = _views(new)
        for p in range(spec.partitions):
            n = int(old.parts[p * shm.PART_WORDS + shm.P_ROWS])
            new.rows[p, :n] = old.rows[p, :n]
            new.parts[p * shm.PART_WORDS + shm.P_ROWS] = n
            _rebuild_slots(new.slots[p], new_meta[p], n)
        if not filling:
            old.header[shm.H_SUPERSEDED] = 1
        os.rename(tmp, old.path)
        if filling:
            old.close()
            return new
        new.hold()  # the new store's thread lock; its flock is already ours
        with self._tables_lock, self._maps.write_locked(0):
            self._stores[table] = new
            self._directory_set(self._index[table], new)
            old.release()
            old.close()
        log.info("host store %s grew to %d rows per partition (%d bytes)", new.path, bigger.rows_per_partition,
                 bigger.nbytes)
        return new

    # ---------------------------------------------------------------- bookkeeping

    def _remap(self, table: str) -> None:
        """Map the file now at ``table``'s path in place of this process's superseded one."""
        old = self._stores.get(table)
        if old is None or old.closed:
            return
        if old.is_current():
            # Marked superseded but not replaced yet: a grower is at work (wait for its lock;
            # not under _tables_lock, which a grower in this process takes to swap) or died
            # before its rename (then the flag is cleared and this file stays).
            with old.locked():
                if not old.closed and old.is_current() and int(old.header[shm.H_SUPERSEDED]):
                    old.header[shm.H_SUPERSEDED] = 0
            if old.closed or old.is_current():
                return
        with self._tables_lock:
            if self._stores.get(table) is not old or old.closed:
                return  # swapped meanwhile
            new = _open_current(old)
            with self._maps.write_locked(0):
                self._stores[table] = new
                self._directory_set(self._index[table], new)
                old.close()
            self._groups.clear()

    def _adopt(self, table: str, store: shm.StoreFile) -> None:
        """Make ``store`` the one lookups use for ``table``. Caller holds _tables_lock."""
        with self._maps.write_locked(0):
            self._stores[table] = store
            if table not in self._index:
                self._index[table] = len(self._names)
                self._names.append(table)
            self._directory_set(self._index[table], store)
        self._groups.clear()

    def _directory_set(self, column: int, store: shm.StoreFile | None) -> None:
        """Point ``column`` at ``store``'s regions (zeros for none) in every directory array a
        kernel may hold. Caller holds the mapping lock exclusively."""
        if column >= self._directory.shape[1]:
            bigger = np.zeros((_DIRECTORY_ROWS, 2 * column + 1), np.int64)
            bigger[:, : self._directory.shape[1]] = self._directory
            self._directory = bigger
            self._handed_out.append(bigger)
        values = [0] * _DIRECTORY_ROWS
        if store is not None:
            spec = store.spec
            values[_D_HEADER] = store.address
            values[_D_PARTS] = int(store.parts.ctypes.data)
            values[_D_SLOTS] = int(store.slots.ctypes.data)
            values[_D_SLOT_COUNT] = spec.slots_per_partition
            values[_D_ROWS] = int(store.rows.ctypes.data)
            values[_D_ROW_CAP] = spec.rows_per_partition
            values[_D_STRIDE] = spec.stride
        for table in self._handed_out:
            if column < table.shape[1]:
                table[:, column] = values

    def _detach(self, store: shm.StoreFile) -> None:
        """Leave ``store``: drop this process from its users and remove the file when nobody
        else uses it, no keeper is alive and auto-removal is on. A store another process grew
        since this one last looked is left in the file now at its path (its slot went there)."""
        try:
            while True:
                store.acquire()
                if store.is_current() or not store.path.exists():
                    break
                store.release()
                current = _open_current(store)
                store.close()
                store = current
            try:
                users = store.deregister()
                if not users and self._auto_remove and not store.keeper_alive() and store.is_current():
                    os.unlink(store.path)
            finally:
                store.release()
        except (OSError, TierError) as exc:
            log.warning("host store %s: could not leave it cleanly: %s", store.path, exc)
        finally:
            store.close()

    def _resolve(self, names: tuple[str, ...]) -> tuple[Keys, Keys, Keys]:
        stores = [self._store(name) for name in names]
        return (
            np.array([self._index[name] for name in names], np.int64),
            np.array([s.spec.dim for s in stores], np.int64),
            np.array([s.spec.row_format.code for s in stores], np.int64),
        )

    def _group(self, keys: Keys) -> tuple[Any, Any]:
        return group_by_partition(keys, self._num_partitions)

    def _check_shape(self, store: shm.StoreFile, table: str, dim: int, row_format: RowFormat) -> None:
        if store.spec.dim != dim:
            raise ConfigError(f"table {table!r} already exists with dim {store.spec.dim}, not {dim}")
        if store.spec.row_format is not row_format:
            raise format_mismatch(table, "the host store", store.spec.row_format, row_format)

    def _store(self, table: str) -> shm.StoreFile:
        self._check_open()
        store = self._stores.get(table)
        if store is not None:
            return store
        # a complete store another process made: attach to it, never create one
        info = next((i for i in shm.list_stores(self.namespace) if i.table == table and i.complete), None)
        if info is None:
            raise unknown_table(table, self._stores)
        self._open(table, info.dim, RowFormat(info.row_format), 0, "", None, create=False)
        return self._stores[table]

    def _current(self, table: str) -> shm.StoreFile:
        """``table``'s store, remapped first when another process grew it since this one last
        looked (a lookup notices that in its kernel; counts and sizes are read here)."""
        store = self._store(table)
        if int(store.header[shm.H_SUPERSEDED]):
            self._remap(table)
            store = self._store(table)
        return store

    def _store_or_none(self, table: str, fallback: shm.StoreFile) -> shm.StoreFile:
        return self._stores.get(table, fallback)

    def _check_open(self) -> None:
        if self._closed:
            raise TierError("the host-store volatile tier is closed")

    def _dim_of(self, table: str) -> int:
        return self._store(table).spec.dim


def _open_current(old: shm.StoreFile) -> shm.StoreFile:
    """The file now at ``old``'s path, mapped, when it is ``old`` grown (same shape, same
    creation time); a table dropped meanwhile is UnknownTableError, one rebuilt (another
    creation time, dim or format) a TierError: this handle served the old one."""
    table = old.spec.table
    try:
        fd = shm.open_fd(old.path, create=False)
    except FileNotFoundError:
        raise unknown_table(table, ()) from None
    try:
        header = np.frombuffer(os.pread(fd, shm.HEADER_WORDS * 8, 0), np.int64)
        spec = shm.spec_of(header, table) if header.shape[0] == shm.HEADER_WORDS else None
        same = (spec is not None and spec.grown(0) == old.spec.grown(0) and os.fstat(fd).st_size >= spec.nbytes
                and int(header[shm.H_CREATED]) == int(old.header[shm.H_CREATED]))
        if not same:
            raise TierError(f"host store {old.path}: the table's store was replaced by another one (dropped and "
                            "built again, or of another shape); restart this process to serve it")
        assert spec is not None
        return shm.StoreFile(old.path, fd, spec)
    except BaseException:
        os.close(fd)
        raise


_warned_pages: set[Path] = set()


def _warn_without_huge_pages(root: Path) -> None:
    """Once per process and root: say that lookups run slower on 4 KiB pages, and the fix."""
    if root in _warned_pages:
        return
    _warned_pages.add(root)
    if shm.huge_pages(root) == "never":
        log.warning(
            "host store in %s: its tmpfs gives no huge pages (no huge= mount option), so lookups reach "
            "fewer rows per TLB entry (measured 0.72-0.86x a private map's keys/s, 1.01-1.16x with huge "
            "pages): remount it with huge=within_size (or huge=advise), or point %s at a tmpfs mounted "
            "so (docs/deployment.md, \"Huge pages\")", root, shm.SHM_DIR_ENV)


@contextlib.contextmanager
def _partition_pool(partitions: int) -> Iterator[Callable[..., list[Any]]]:
    """``run(fn, items)``: ``fn`` over ``items`` on one thread per core (the kernels release the
    GIL and each touches one partition's memory), or in this thread on one core."""
    workers = min(partitions, os.cpu_count() or 1)
    if workers <= 1:
        yield lambda fn, items: [fn(i) for i in items]
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="hps-host-store-fill") as pool:
        yield lambda fn, items: list(pool.map(fn, items))


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the one at ``path``."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
