"""The lookup path of one deployed model: request keys in, embedding vectors out.

A :class:`LookupSession` answers HugeCTR's HPS request — ``KEYS`` (all keys of all tables,
table-major) and ``NUMKEYS`` (keys per table) — with the vectors in the same order, flattened.
For each table it de-duplicates the keys, then asks each level only for what the levels above
did not have::

    embedding cache (GPU, or its CPU twin)  →  volatile DB (hash map | Redis)
        →  persistent DB (RocksDB)  →  the table's default value

Every step is a batched call on arrays; nothing here loops over keys in Python.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hps_core.arrays import array_module, to_host
from hps_core.background import BackgroundQueue
from hps_core.config import ModelConfig, TableConfig
from hps_core.db.base import EmbeddingTier
from hps_core.errors import RequestError, TierError

if TYPE_CHECKING:
    from hps_core.cache.base import EmbeddingCache

__all__ = ["LookupSession", "TableCounters", "split_request"]

_INTEGER_KINDS = ("i", "u")
# How long before a tier fetch began an update may have reached this process's caches while
# the tier still held the old row: a shared Redis is written by whichever server's consumer
# owns the partition, and this server's cache consumer may see the message first.
UPDATE_GRACE_S = 2.0
# How long updated keys are remembered; a fetch that started longer ago than this (less the
# grace) cannot be checked, and its rows are not written into the cache.
_RECENT_UPDATES_S = 10.0


@dataclass
class TableCounters:
    """Running totals for one table; read by metrics and tests."""

    keys: int = 0
    unique_keys: int = 0
    cache_hits: int = 0
    volatile_hits: int = 0
    persistent_hits: int = 0
    defaults: int = 0
    tier_errors: int = 0
    # Unique keys a warm batch answered with the default while their cache insertion went to
    # the background (queued), or was skipped because the queue was full (dropped). With these,
    # cache + volatile + persistent hits + defaults + async + dropped == unique_keys.
    async_inserts: int = 0
    dropped_inserts: int = 0
    seconds_cache: float = 0.0
    seconds_volatile: float = 0.0
    seconds_persistent: float = 0.0

    def snapshot(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Tier:
    name: str  # "volatile" | "persistent": selects the counters to bump
    db: EmbeddingTier


@dataclass
class _Fetched:
    """What the tiers below the cache answered for some keys (host arrays), and at what cost."""

    vectors: np.ndarray  # (m, dim) float32; defaults where nothing was found
    found: np.ndarray  # (m,) bool
    hits: dict[str, int]  # keys answered, by tier name
    seconds: dict[str, float]  # time spent, by tier name
    errors: int  # tier calls that failed (the next tier answered)

    @property
    def defaults(self) -> int:
        return int(self.found.size - self.found.sum())


class _RecentUpdates:
    """The keys the update stream changed in one table's cache over the last few seconds.

    A row fetched from the tiers just before an update of its key may hold the old vector;
    written into the cache after the update reached it, it would stay stale until evicted.
    The cache's writers consult this list to leave such rows out. Not thread-safe: the
    session's per-table write lock guards it.
    """

    def __init__(self, keep_s: float = _RECENT_UPDATES_S) -> None:
        self._keep_s = keep_s
        self._entries: deque[tuple[float, np.ndarray]] = deque()
        self._forgotten_until = -np.inf  # updates at or before this time may be gone

    def add(self, now: float, keys: np.ndarray) -> None:
        self._entries.append((now, keys))
        while self._entries and self._entries[0][0] < now - self._keep_s:
            self._forgotten_until = self._entries.popleft()[0]

    def since(self, start: float) -> np.ndarray | None:
        """Keys updated at or after ``start``; None when some of them may have been forgotten."""
        if start <= self._forgotten_until:
            return None
        recent = [keys for at, keys in self._entries if at >= start]
        return np.concatenate(recent) if recent else np.empty(0, np.int64)


def split_request(keys: np.ndarray, numkeys: np.ndarray, model: ModelConfig) -> list[np.ndarray]:
    """Check one request against ``model`` and cut KEYS into one int64 array per table.

    ``keys``: (n,) integer, host; ``numkeys``: (tables,) integer, host.
    Raises RequestError naming the input and the problem.
    """
    tables = model.tables
    keys = _as_key_array(keys)
    if numkeys.ndim != 1 or numkeys.dtype.kind not in _INTEGER_KINDS:
        raise RequestError(f"NUMKEYS must be a 1-D integer tensor, got shape {numkeys.shape} dtype {numkeys.dtype}")
    if numkeys.size != len(tables):
        raise RequestError(
            f"NUMKEYS has {numkeys.size} entries but model '{model.model}' has {len(tables)} tables "
            f"({', '.join(t.name for t in tables)}): send one count per table"
        )
    counts = numkeys.astype(np.int64)
    if (counts < 0).any():
        raise RequestError(f"NUMKEYS holds a negative count: {counts.tolist()}")
    if int(counts.sum()) != keys.size:
        raise RequestError(
            f"NUMKEYS sums to {int(counts.sum())} but KEYS holds {keys.size} keys: "
            "the counts per table must add up to the number of keys"
        )
    if keys.size == 0:
        raise RequestError("the request holds no keys: KEYS is empty")
    limits = np.array([model.max_batch_size * t.max_keys_per_sample for t in tables], dtype=np.int64)
    over = np.flatnonzero(counts > limits)
    if over.size:
        i = int(over[0])
        raise RequestError(
            f"table '{tables[i].name}' got {int(counts[i])} keys, more than max_batch_size "
            f"({model.max_batch_size}) x maxnum_catfeature_query_per_table_per_sample "
            f"({tables[i].max_keys_per_sample}) = {int(limits[i])} allows; split the request"
        )
    return np.split(keys, np.cumsum(counts)[:-1])


def _as_key_array(keys: np.ndarray) -> np.ndarray:
    if keys.ndim != 1:
        raise RequestError(f"KEYS must be 1-D after the batch dimension, got shape {keys.shape}")
    if keys.dtype.kind not in _INTEGER_KINDS:
        raise RequestError(f"KEYS must hold integers (INT64 or UINT32), got dtype {keys.dtype}")
    if keys.dtype == np.uint64 and keys.size and int(keys.max()) > np.iinfo(np.int64).max:
        raise RequestError("KEYS holds an unsigned key above the int64 range")
    return keys.astype(np.int64, copy=False)


class LookupSession:
    """Answers lookups for one model over the caches and tiers it was given.

    ``caches`` maps table names to an :class:`~hps_core.cache.EmbeddingCache` (GPU caches, or
    their CPU twins in-process); a table without one reads the tiers directly. The array
    module of the caches (numpy or cupy) is the module of the result. ``volatile`` and
    ``persistent`` may be None (a tier of type "disabled").

    Cache misses are fetched from the tiers and inserted synchronously when the batch's hit
    rate is below ``hit_rate_threshold``; above it the batch gets the default value for its
    misses and the insertion runs in the background (HugeCTR's behaviour: a warm cache does not
    make requests wait for the tiers). With ``write_back`` (the volatile DB's
    ``cache_missed_embeddings``), rows found only in the persistent DB are copied up to the
    volatile DB in the background.

    Thread-safe: caches and tiers guard themselves; the counters have their own lock.
    """

    def __init__(
        self,
        model: ModelConfig,
        *,
        volatile: EmbeddingTier | None,
        persistent: EmbeddingTier | None,
        caches: Mapping[str, EmbeddingCache] | None = None,
        write_back: bool = False,
        max_pending_background: int = 64,
    ) -> None:
        self.model = model
        self._tiers = tuple(
            _Tier(name, db) for name, db in (("volatile", volatile), ("persistent", persistent)) if db is not None
        )
        self._volatile = volatile
        self._caches = dict(caches or {})
        self._xp = array_module(next(iter(self._caches.values()), None))
        self._write_back = write_back and volatile is not None and persistent is not None
        self._counters = {t.name: TableCounters() for t in model.tables}
        self._counters_lock = threading.Lock()
        # One lock per cached table orders the cache's writers: rows fetched from the tiers
        # against the update stream's overwrites (see _RecentUpdates).
        self._cache_writes = {name: threading.Lock() for name in self._caches}
        self._recent_updates = {name: _RecentUpdates() for name in self._caches}
        self._background = BackgroundQueue(max_pending_background)

    @property
    def caches(self) -> Mapping[str, EmbeddingCache]:
        return self._caches

    def lookup(self, keys: np.ndarray, numkeys: np.ndarray) -> Any:
        """Vectors for one request: ``keys`` (n,) int64 table-major, ``numkeys`` (tables,) int32.

        Both arrive in host memory. Returns (sum over tables of count_i * dim_i,) float32 in the
        caches' memory (host without caches, the GPU with GPU caches): each table's vectors in
        key order, tables one after another.
        """
        per_table = split_request(keys, numkeys, self.model)
        xp = self._xp
        device_keys = xp.asarray(np.concatenate(per_table)) if per_table else xp.empty(0, np.int64)
        bounds = np.cumsum([0] + [k.size for k in per_table])
        parts = [
            self._lookup_table(table, device_keys[bounds[i] : bounds[i + 1]]).ravel()
            for i, table in enumerate(self.model.tables)
        ]
        return xp.concatenate(parts)

    def lookup_batch(self, keys: np.ndarray, numkeys: np.ndarray) -> Any:
        """Like :meth:`lookup`, with or without Triton's leading batch dimension.

        ``keys`` (n,) or (rows, n); ``numkeys`` (tables,) or (rows, tables). Each row is one
        HugeCTR request; the result has the same leading shape.
        """
        if keys.ndim == 1 and numkeys.ndim == 1:
            return self.lookup(keys, numkeys)
        if keys.ndim != 2 or numkeys.ndim != 2 or keys.shape[0] != numkeys.shape[0]:
            raise RequestError(
                f"KEYS {keys.shape} and NUMKEYS {numkeys.shape} must both be 1-D, "
                "or both 2-D with the same number of rows"
            )
        rows = [self.lookup(k, n) for k, n in zip(keys, numkeys)]
        if len({r.size for r in rows}) > 1:
            raise RequestError("the rows of a batched request give vectors of different total sizes")
        return self._xp.stack(rows)

    def fetch_from_tiers(self, table: TableConfig, keys: np.ndarray) -> _Fetched:
        """The tiers' answer for host ``keys`` (n,) int64 of ``table``: vectors and found mask.

        Used by the lookup for cache misses, and by cache refresh and warm-up. Counts nothing:
        the lookup records a request's counters in one step, so that a snapshot taken at any
        moment has each unique key in exactly one of hits, defaults or deferred.
        """
        vectors = np.empty((keys.size, table.dim), dtype=np.float32)
        missing = np.arange(keys.size)
        hits: dict[str, int] = {}
        seconds: dict[str, float] = {}
        errors = 0
        for tier in self._tiers:
            if missing.size == 0:
                break
            start = time.perf_counter()
            try:
                found = self._fetch(tier, table, keys[missing], vectors, missing)
            except TierError:
                # A failing tier is a tier that has nothing: the next one answers.
                errors += 1
                found = np.zeros(missing.size, dtype=bool)
            seconds[tier.name] = time.perf_counter() - start
            hits[tier.name] = int(found.sum())
            if tier.name == "persistent" and self._write_back and found.any():
                rows = missing[found]
                self._copy_up(table, keys[rows], vectors[rows])
            missing = missing[~found]
        vectors[missing] = table.default_value
        found_mask = np.ones(keys.size, dtype=bool)
        found_mask[missing] = False
        return _Fetched(vectors, found_mask, hits, seconds, errors)

    def cache_rows(self, table: TableConfig, keys: np.ndarray, fetched: _Fetched, fetch_started: float,
                   *, insert: bool) -> int:
        """Write rows fetched from the tiers into ``table``'s cache; returns the rows written.

        ``keys`` (n,) int64 host, as given to :meth:`fetch_from_tiers`, whose answer is
        ``fetched``; ``fetch_started``: ``time.monotonic()`` before that call. ``insert``:
        ``replace`` (insert, evicting) or ``update`` (overwrite cached keys only). Keys found
        nowhere are left out, so that a row published for them later is not shadowed by a
        cached default; so are keys the update stream changed since ``UPDATE_GRACE_S``
        before the fetch, whose fetched row may predate the update.
        """
        cache = self._caches[table.name]
        keep = fetched.found
        with self._cache_writes[table.name]:
            updated = self._recent_updates[table.name].since(fetch_started - UPDATE_GRACE_S)
            if updated is None:
                return 0  # the fetch is too old to check: leave the cache as it is
            if updated.size:
                keep = keep & ~np.isin(keys, updated)
            if not keep.any():
                return 0
            xp = array_module(cache)
            rows, vectors = xp.asarray(keys[keep]), xp.asarray(fetched.vectors[keep])
            if insert:
                cache.replace(rows, vectors)
                return int(keep.sum())
            return cache.update(rows, vectors)

    def apply_update(self, table_name: str, keys: np.ndarray, values: np.ndarray) -> int:
        """Overwrite the cached rows of ``keys`` (n,) int64 with ``values`` (n, dim) float32,
        host arrays from the update stream; keys not cached are left out. Returns the rows
        overwritten (0 for a table without cache)."""
        cache = self._caches.get(table_name)
        if cache is None:
            return 0
        xp = array_module(cache)
        with self._cache_writes[table_name]:
            self._recent_updates[table_name].add(time.monotonic(), keys)
            return cache.update(xp.asarray(keys), xp.asarray(values))

    def counters(self) -> dict[str, dict[str, float]]:
        """Snapshot of the per-table counters, keyed by table name."""
        with self._counters_lock:
            return {name: c.snapshot() for name, c in self._counters.items()}

    def drain(self, timeout: float | None = None) -> None:
        """Wait until the background insertions queued so far are done (tests, shutdown)."""
        self._background.drain(timeout)

    def close(self) -> None:
        """Finish background work; the session answers no lookups afterwards."""
        self._background.close()

    def _lookup_table(self, table: TableConfig, keys: Any) -> Any:
        xp = self._xp
        unique, inverse = xp.unique(keys, return_inverse=True)
        vectors = xp.empty((unique.size, table.dim), dtype=np.float32)
        cache = self._caches.get(table.name)
        start = time.perf_counter()
        if cache is None:
            missing_keys, missing_pos = unique, xp.arange(unique.size)
        else:
            missing_keys, missing_pos = cache.query(unique, vectors)
        n_missing = int(missing_pos.size)
        c = TableCounters(keys=int(keys.size), unique_keys=int(unique.size))
        if cache is not None:
            c.cache_hits = int(unique.size) - n_missing
            c.seconds_cache = time.perf_counter() - start
        if n_missing:
            hit_rate = 1.0 - n_missing / unique.size
            host_keys = to_host(missing_keys)
            if cache is None or hit_rate < self.model.hit_rate_threshold:
                fetch_started = time.monotonic()
                fetched = self.fetch_from_tiers(table, host_keys)
                vectors[missing_pos] = xp.asarray(fetched.vectors)
                if cache is not None:
                    self.cache_rows(table, host_keys, fetched, fetch_started, insert=True)
                _add_fetched(c, fetched)
            else:
                vectors[missing_pos] = table.default_value
                queued = self._insert_later(table, host_keys)
                c.async_inserts, c.dropped_inserts = (n_missing, 0) if queued else (0, n_missing)
        self._record(table, c)
        return vectors[inverse.ravel()]

    def _record(self, table: TableConfig, delta: TableCounters) -> None:
        with self._counters_lock:
            totals = self._counters[table.name]
            for name, value in delta.__dict__.items():
                setattr(totals, name, getattr(totals, name) + value)

    @staticmethod
    def _fetch(tier: _Tier, table: TableConfig, keys: np.ndarray, vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.empty((keys.size, table.dim), dtype=np.float32)
        found = tier.db.fetch(table.qualified_name, keys, out)
        vectors[rows[found]] = out[found]
        return found

    def _insert_later(self, table: TableConfig, keys: np.ndarray) -> bool:
        """Queue the fetch and cache insertion of ``keys``; False when the queue was full."""

        def fetch_and_insert() -> None:
            fetch_started = time.monotonic()
            fetched = self.fetch_from_tiers(table, keys)
            self.cache_rows(table, keys, fetched, fetch_started, insert=True)
            self._record(table, TableCounters(tier_errors=fetched.errors))

        return self._background.submit(fetch_and_insert)

    def _copy_up(self, table: TableConfig, keys: np.ndarray, vectors: np.ndarray) -> None:
        assert self._volatile is not None
        volatile = self._volatile
        self._background.submit(lambda: volatile.insert(table.qualified_name, keys, vectors))


def _add_fetched(counters: TableCounters, fetched: _Fetched) -> None:
    """Add what the tiers answered for a request's cache misses to its counters."""
    counters.volatile_hits += fetched.hits.get("volatile", 0)
    counters.persistent_hits += fetched.hits.get("persistent", 0)
    counters.seconds_volatile += fetched.seconds.get("volatile", 0.0)
    counters.seconds_persistent += fetched.seconds.get("persistent", 0.0)
    counters.defaults += fetched.defaults
    counters.tier_errors += fetched.errors
