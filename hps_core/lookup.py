"""The lookup path of one deployed model: requests' keys in, embedding vectors out, in one pass.

A :class:`LookupSession` answers every request Triton hands the backend in one ``execute`` —
each HugeCTR's HPS request (``KEYS``, all keys of all tables, table-major; ``NUMKEYS``, keys
per table), with or without a batch dimension — together::

    check each request (a bad one fails alone)           hps_core.request.check_request
    one de-duplication over every (table, key) pair      hps_core.request.plan_batch
    embedding cache, all tables, one call                (GPU, or its CPU twin)
      → volatile DB, one call for what the cache lacked  (hash map | Redis)
      → persistent DB, one call for what that lacked     (RocksDB)
      → each table's default value, one step
    every request's vectors copied from the unique rows, one step
    counters of all tables recorded in one step

The number of Python steps and of tier calls is the same for 1 table or 26, for one request
or a batch of them; nothing here loops over keys or tables in Python.

Rows are float32 everywhere here: the tiers and the cache store each table packed in its row
format (``TableConfig.row_format``, :mod:`hps_core.row_formats`) and dequantise it where they
read it, so nothing on this path depends on the format; a session only refuses a cache built
with other formats than its model's.

Tier failures never fail a request; they are counted in ``tier_errors`` (per table, one per
tier call that failed for some of that table's keys; ``hps_tier_errors_total``):

    TierError          the tier answered nothing: every key goes on to the next tier
    PartialTierError   some nodes of the tier (Redis) failed: the rows the others found are
                       kept, only the rest goes on, and only tables with keys on a failed
                       node count an error
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

import numpy as np
import numpy.typing as npt
from numba import njit

from hps_core.arrays import Int64s, Keys, Vectors, array_module, device_context, to_host
from hps_core.background import BackgroundQueue
from hps_core.cache.base import EmbeddingCache, MultiTableCache, TableView
from hps_core.config import ModelConfig
from hps_core.db.base import EmbeddingTier
from hps_core.errors import CacheFullError, ConfigError, PartialTierError, RequestError, TierError
from hps_core.grouping import group_by, pairs_in
from hps_core.request import BatchPlan, CheckedRequest, TableLayout, answer_each, check_request, plan_batch
from hps_core.rows import copy_rows, fill_rows, row_offsets

__all__ = ["COUNTER_FIELDS", "LookupSession", "UPDATE_GRACE_S"]

# How long before a tier fetch began an update may have reached this process's caches while
# the tier still held the old row: a shared Redis is written by whichever server's consumer
# owns the partition, and this server's cache consumer may see the message first.
UPDATE_GRACE_S = 2.0
# How long updated keys are remembered; a fetch that started longer ago than this (less the
# grace) cannot be checked, and its rows are not written into the cache.
_RECENT_UPDATES_S = 10.0

#: The running totals kept per table (``counters()``). Unique keys split exactly into
#: cache + volatile + persistent hits + defaults + async_inserts + dropped_inserts: a warm
#: batch answers its misses with the default while their insertion is queued (async) or
#: skipped because the queue was full (dropped). Seconds of a call that served several
#: tables are shared among them in proportion to the keys each asked for.
COUNTER_FIELDS = (
    "keys",
    "unique_keys",
    "cache_hits",
    "volatile_hits",
    "persistent_hits",
    "defaults",
    "tier_errors",
    "async_inserts",
    "dropped_inserts",
    "cache_full",
    "seconds_cache",
    "seconds_volatile",
    "seconds_persistent",
)
_COLUMN = {name: i for i, name in enumerate(COUNTER_FIELDS)}
_TIER_NAMES = ("volatile", "persistent")
#: per tier: the counter columns of its hits, its seconds and the errors of its calls
_TIER_COLUMNS = {
    name: (_COLUMN[f"{name}_hits"], _COLUMN[f"seconds_{name}"], _COLUMN["tier_errors"]) for name in _TIER_NAMES
}


@dataclass(frozen=True)
class _Tier:
    name: str  # "volatile" | "persistent": selects the counters to bump
    db: EmbeddingTier


@dataclass
class _Fetched:
    """What the tiers below the cache answered for some keys (host arrays).

    ``values``/``offsets``: the rows, in the flat layout, defaults where nothing was found
    (host; on the GPU path, the device copy once it crossed);
    ``found`` (m,) bool; ``counts`` (T, fields) the counters the fetch added its answer to."""

    values: npt.NDArray[np.float32]
    offsets: Int64s
    found: npt.NDArray[np.bool_]
    counts: npt.NDArray[np.float64]


class _RecentUpdates:
    """The (table, key) pairs the update stream changed in the cache over the last seconds.

    A row fetched from the tiers just before an update of its key may hold the old vector;
    written into the cache after the update reached it, it would stay stale until evicted.
    The cache's writers consult this list to leave such rows out. Not thread-safe: the
    session's cache write lock guards it.
    """

    def __init__(self, keep_s: float = _RECENT_UPDATES_S) -> None:
        self._keep_s = keep_s
        self._entries: deque[tuple[float, Int64s, Int64s]] = deque()
        self._forgotten_until = -np.inf  # updates at or before this time may be gone

    def add(self, now: float, table_ids: Int64s, keys: Int64s) -> None:
        self._entries.append((now, table_ids, keys))
        while self._entries and self._entries[0][0] < now - self._keep_s:
            self._forgotten_until = self._entries.popleft()[0]

    def since(self, start: float) -> tuple[Int64s, Int64s] | None:
        """(table ids, keys) updated at or after ``start``; None when some may be forgotten."""
        if start <= self._forgotten_until:
            return None
        recent = [(ids, keys) for at, ids, keys in self._entries if at >= start]
        if not recent:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate([r[0] for r in recent]), np.concatenate([r[1] for r in recent])


class LookupSession:
    """Answers lookups for one model over the cache and tiers it was given.

    ``cache`` holds the caches of all the model's tables in one structure (a GPU cache or
    its CPU twin, table t = the model's table t), or None to read the tiers directly. Its
    array module (numpy or cupy) is the module of the results. ``volatile`` and
    ``persistent`` may be None (a tier of type "disabled").

    Cache misses are fetched from the tiers and inserted synchronously when their table's hit
    rate in the batch is below ``hit_rate_threshold``; at or above it the batch gets the
    default value for that table's misses and the insertion runs in the background
    (HugeCTR's behaviour: a warm cache does not make requests wait for the tiers). With
    ``write_back`` (the volatile DB's ``cache_missed_embeddings``), rows found only in the
    persistent DB are copied up to the volatile DB in the background.

    Thread-safe: the cache and tiers guard themselves; the counters have their own lock.
    """

    def __init__(
        self,
        model: ModelConfig,
        *,
        volatile: EmbeddingTier | None,
        persistent: EmbeddingTier | None,
        cache: MultiTableCache | None = None,
        write_back: bool = False,
        max_pending_background: int = 64,
    ) -> None:
        self.model = model
        self.layout = TableLayout.of(model)
        if cache is not None and not np.array_equal(cache.dims, self.layout.dims):
            raise ConfigError(
                f"model '{model.model}': the cache's table widths {list(cache.dims)} differ from the "
                f"model's {self.layout.dims.tolist()}"
            )
        formats = tuple(t.row_format for t in model.tables)
        if cache is not None and tuple(cache.row_formats) != formats:
            raise ConfigError(
                f"model '{model.model}': the cache's row formats {[str(f) for f in cache.row_formats]} differ "
                f"from the model's {[str(f) for f in formats]} (embedding_format_per_table)"
            )
        self._tiers = tuple(
            _Tier(name, db) for name, db in zip(_TIER_NAMES, (volatile, persistent)) if db is not None
        )
        self._volatile = volatile
        self._cache = cache
        self._views = {name: TableView(cache, t) for t, name in enumerate(self.layout.names)} if cache else {}
        self._table_index = {name: t for t, name in enumerate(self.layout.names)}
        self._xp = array_module(cache)
        self._write_back = write_back and volatile is not None and persistent is not None
        self._totals = np.zeros((self.layout.count, len(COUNTER_FIELDS)), np.float64)
        self._counters_lock = threading.Lock()
        # Orders the cache's writers: rows fetched from the tiers against the update stream's
        # overwrites (see _RecentUpdates).
        self._cache_writes = threading.Lock()
        self._recent_updates = _RecentUpdates()
        self._background = BackgroundQueue(max_pending_background)

    @property
    def cache(self) -> MultiTableCache | None:
        return self._cache

    @property
    def caches(self) -> Mapping[str, EmbeddingCache]:
        """One-table views of the cache, by table name (empty without a cache)."""
        return self._views

    # ------------------------------------------------------------------ lookups

    def lookup(self, keys: npt.NDArray[Any], numkeys: npt.NDArray[Any]) -> Any:
        """Vectors for one request: ``keys`` (n,) int64 table-major and ``numkeys`` (tables,)
        int32, host arrays, or both with Triton's leading batch dimension ((rows, n) and (rows,
        tables): each row one HugeCTR request).

        Returns (sum over tables of count_i * dim_i,) float32, with the same leading shape, in
        the cache's memory (host without a cache, the GPU with a GPU cache). Raises
        RequestError for a malformed request.
        """
        (result,) = self.lookup_requests([(keys, numkeys)])
        if isinstance(result, Exception):
            raise result
        return result

    def lookup_requests(self, requests: Sequence[tuple[npt.NDArray[Any], npt.NDArray[Any]]]) -> list[Any]:
        """Answer several requests (``(KEYS, NUMKEYS)`` pairs, host arrays) in one pass.

        Returns one entry per request, in order: its vectors (shaped as :meth:`lookup` would
        return them), or the exception that refused it (RequestError for a malformed
        request); one request never fails the others. Should the shared pass itself fail, each
        request is answered alone, so only the one that causes the failure gets it. A tier
        that fails is absorbed by the cascade (the next tier answers).
        """
        results: list[Any] = [None] * len(requests)
        checked: list[CheckedRequest] = []
        slots: list[int] = []
        for i, (keys, numkeys) in enumerate(requests):
            try:
                request = check_request(keys, numkeys, self.layout)
                if self._cache is not None and self._cache.key_dtype == np.uint32:
                    _check_uint32(request.keys)
            except RequestError as exc:
                results[i] = exc
                continue
            checked.append(request)
            slots.append(i)
        if not checked:
            return results
        for i, answer in zip(slots, answer_each(checked, self._answer)):
            results[i] = answer
        return results

    # ------------------------------------------------------------------ the cascade

    def _answer(self, requests: Sequence[CheckedRequest]) -> list[Any]:
        plan = plan_batch(requests, self.layout)
        counts = self._new_counts()
        counts[:, _COLUMN["keys"]] = plan.key_counts
        counts[:, _COLUMN["unique_keys"]] = plan.unique_counts
        if self._cache is None:
            out = self._answer_from_tiers(plan, counts)
        else:
            with device_context(self._cache):
                out = self._answer_from_cache(self._cache, plan, counts)
        self._record(counts)
        return [
            _shape(out[plan.bounds[i] : plan.bounds[i + 1]], request)
            for i, request in enumerate(requests)
        ]

    def _answer_from_tiers(self, plan: BatchPlan, counts: Any) -> npt.NDArray[np.float32]:
        """No cache: the tiers write the unique rows into the outputs, then repeats are copied."""
        out = np.empty(plan.output_size, np.float32)
        self.fetch_from_tiers(plan.table_ids, plan.keys, out, plan.offsets, counts)
        plan.expand(out, self.layout.dims)
        return out

    def _answer_from_cache(self, cache: MultiTableCache, plan: BatchPlan, counts: Any) -> Any:
        """The cache answers what it holds, the tiers (or defaults) the rest; in its memory."""
        xp = self._xp
        device = self._to_device(cache, plan)
        out = xp.empty(plan.output_size, np.float32)  # the unique rows live in it (BatchPlan)
        start = time.perf_counter()
        missing = to_host(cache.query_tables(device["table_ids"], device["keys"], out, device["offsets"]))
        missed = np.bincount(plan.table_ids[missing], minlength=self.layout.count)
        counts[:, _COLUMN["cache_hits"]] = plan.unique_counts - missed
        counts[:, _COLUMN["seconds_cache"]] = _shares(time.perf_counter() - start, plan.unique_counts)
        if missing.size:
            self._fill_misses(cache, plan, missing, missed, out, counts)
        if xp is np:
            plan.expand(out, self.layout.dims)
        else:
            cache.copy_rows(out, device["repeat_sources"], out, device["repeat_targets"], device["repeat_tables"])
        return out

    def _to_device(self, cache: MultiTableCache, plan: BatchPlan) -> dict[str, Any]:
        """The plan's index arrays in the cache's memory: one host→device copy on the GPU."""
        names: tuple[str, ...] = ("table_ids", "keys", "offsets")
        arrays = [getattr(plan, name) for name in names]
        if self._xp is np:
            return dict(zip(names, arrays))
        names += ("repeat_sources", "repeat_targets", "repeat_tables")
        arrays += plan.repeats(self.layout.dims)
        packed = self._xp.asarray(np.concatenate(arrays))
        bounds = np.cumsum([0] + [a.shape[0] for a in arrays])
        device = {name: packed[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}
        # in the cache's key type already (checked on the host): no range check on the device
        device["keys"] = device["keys"].astype(cache.key_dtype)
        return device

    def _fill_misses(self, cache: MultiTableCache, plan: BatchPlan, missing: Int64s, missed: Int64s,
                     unique: Any, counts: Any) -> None:
        """Answer the cache's misses into ``unique``: from the tiers for tables whose hit rate in
        this batch is below hit_rate_threshold (inserting the rows), else with defaults while
        the insertion goes to the background (HugeCTR's rule: a warm cache does not wait)."""
        ids, keys = plan.table_ids[missing], plan.keys[missing]
        hit_rate = 1.0 - missed / np.maximum(plan.unique_counts, 1)
        sync = (hit_rate < self.model.hit_rate_threshold)[ids]
        on_host = self._xp is np
        # On the host the tiers write straight into the unique rows; for the GPU they fill a
        # packed host buffer that crosses to the device in one copy.
        if on_host:
            buffer, offsets = unique, plan.offsets[missing]
        else:
            offsets, size = row_offsets(ids, self.layout.dims)
            buffer = np.empty(size, np.float32)
        fetched = None
        if sync.any():
            fetch_started = time.monotonic()
            fetched = self.fetch_from_tiers(ids[sync], keys[sync], buffer, offsets[sync], counts)
        if not sync.all():
            warm = ~sync
            fill_rows(buffer, offsets[warm], ids[warm], self.layout.dims, self.layout.defaults)
            queued = self._insert_later(ids[warm], keys[warm])
            column = _COLUMN["async_inserts" if queued else "dropped_inserts"]
            counts[:, column] += np.bincount(ids[warm], minlength=self.layout.count)
        if not on_host:  # the packed rows cross once, for the answer and the cache alike
            device_rows = self._xp.asarray(buffer)
            packed = self._xp.asarray(np.concatenate([offsets, plan.offsets[missing], ids]))
            m = missing.shape[0]
            cache.copy_rows(device_rows, packed[:m], unique, packed[m : 2 * m], packed[2 * m :])
        if fetched is not None:
            if not on_host:
                fetched.values = device_rows
            self._insert_fetched(ids[sync], keys[sync], fetched, fetch_started, counts)

    # ------------------------------------------------------------------ tiers and cache writes

    def fetch_from_tiers(self, table_ids: Int64s, keys: Int64s, out: npt.NDArray[np.float32] | None = None,
                         offsets: Int64s | None = None, counts: npt.NDArray[np.float64] | None = None) -> _Fetched:
        """The tiers' answer for host ``keys`` (m,) int64 of tables ``table_ids`` (m,) int64.

        Rows go to ``out`` (flat host float32) at ``offsets``, packed into a new buffer when
        ``out`` is None; keys found nowhere get their table's default. One call per tier for
        all tables. Used by the lookup for cache misses, and by cache refresh. Records nothing
        itself: what it answered is added to ``counts`` (a new array when None), which the
        caller records in one step, so that a snapshot taken at any moment has each unique
        key in exactly one of hits, defaults or deferred.
        """
        if out is None or offsets is None:
            offsets, size = row_offsets(table_ids, self.layout.dims)
            out = np.empty(size, np.float32)
        if counts is None:
            counts = self._new_counts()
        missing: Int64s | None = None  # None: every key (saves copies while nothing was found)
        for tier in self._tiers:
            ids, ks, offs = (table_ids, keys, offsets) if missing is None else (
                table_ids[missing], keys[missing], offsets[missing])
            if ks.shape[0] == 0:
                break
            start = time.perf_counter()
            failed = np.zeros(self.layout.count, np.int64)  # per table: keys whose node failed
            try:
                found = tier.db.fetch_tables(self.layout.qualified_names, ids, ks, out, offs)
            except PartialTierError as exc:
                # Some nodes answered: their rows are in ``out``; the rest go to the next tier,
                # and each table that lost keys to the failure counts a tier error.
                found = exc.found
                failed = np.bincount(ids[exc.failed], minlength=self.layout.count)
            except TierError:
                # A failing tier is a tier that has nothing: the next one answers.
                found = np.zeros(ks.shape[0], np.bool_)
                failed = np.ones(self.layout.count, np.int64)
            still = _count_tier(ids, found, time.perf_counter() - start, failed, counts, *_TIER_COLUMNS[tier.name])
            if tier.name == "persistent" and self._write_back and still.shape[0] < ks.shape[0]:
                self._copy_up(ids[found], ks[found], out, offs[found])
            missing = still if missing is None else missing[still]
        found_mask = _fill_defaults(table_ids, missing, out, offsets, self.layout.dims, self.layout.defaults,
                                    counts, _COLUMN["defaults"])
        return _Fetched(out, offsets, found_mask, counts)

    def cache_rows(self, table_ids: Int64s, keys: Int64s, fetched: _Fetched, fetch_started: float,
                   *, insert: bool, only: npt.NDArray[np.bool_] | None = None) -> int:
        """Write rows fetched from the tiers into the cache; returns the rows written.

        ``table_ids``, ``keys`` (m,) host, as given to :meth:`fetch_from_tiers`, whose answer
        is ``fetched``; ``fetch_started``: ``time.monotonic()`` before that call. ``insert``:
        replace (insert, evicting) or update (overwrite cached keys only); ``only``: a mask of
        the rows to consider (all by default). Keys found nowhere are left out, so that a row
        published for them later is not shadowed by a cached default; so are keys the update
        stream changed since ``UPDATE_GRACE_S`` before the fetch, whose fetched row may predate
        the update. Static tables without room for their new keys raise CacheFullError
        (nothing written).
        """
        cache = self._cache
        if cache is None:
            return 0
        keep = fetched.found if only is None else fetched.found & only
        with self._cache_writes, device_context(cache):
            updated = self._recent_updates.since(fetch_started - UPDATE_GRACE_S)
            if updated is None:
                return 0  # the fetch is too old to check: leave the cache as it is
            if updated[0].size:
                keep = keep & ~pairs_in(table_ids, keys, *updated)
            rows = np.flatnonzero(keep)
            if rows.size == 0:
                return 0
            xp = self._xp
            args = (xp.asarray(table_ids[rows]), xp.asarray(keys[rows]), xp.asarray(fetched.values),
                    xp.asarray(fetched.offsets[rows]))
            if insert:
                cache.replace_tables(*args)
                return int(rows.size)
            return cache.update_tables(*args)

    def apply_update(self, table_name: str, keys: Keys, values: Vectors) -> int:
        """Overwrite the cached rows of ``keys`` (n,) int64 with ``values`` (n, dim) float32,
        host arrays from the update stream; keys not cached are left out. Returns the rows
        overwritten (0 without a cache). A GPU failure raises DeviceError (DeviceMemoryError
        when out of memory, which the update source retries)."""
        view = self._views.get(table_name)
        if view is None:
            return 0
        keys = np.asarray(keys, np.int64)
        with self._cache_writes, device_context(self._cache), self._translate_device(table_name):
            ids = np.full(keys.shape[0], self._table_index[table_name], np.int64)
            self._recent_updates.add(time.monotonic(), ids, keys)
            return view.update(self._xp.asarray(keys), self._xp.asarray(values))

    def _translate_device(self, table_name: str) -> ContextManager[None]:
        """CuPy's errors → DeviceError on a GPU cache (where they enter the update path)."""
        if self._cache is None or self._cache.device == "cpu":
            return contextlib.nullcontext()
        from hps_core.cache.gpu import translate_cupy  # only with a GPU cache: CuPy is there

        return translate_cupy(int(self._cache.device), f"refreshing cached rows of {table_name}")

    def _insert_fetched(self, table_ids: Int64s, keys: Int64s, fetched: _Fetched, fetch_started: float,
                        counts: Any) -> None:
        """Insert fetched rows; the rows of static tables without room are left out (and
        counted): such a table holds its sparse file's keys, and a key known only to a tier (a
        new id from the update stream) is served uncached while the other tables' rows go in."""
        only = np.ones(keys.shape[0], np.bool_)
        while only.any():
            try:
                self.cache_rows(table_ids, keys, fetched, fetch_started, insert=True, only=only)
                return
            except CacheFullError as full:
                refused = only & np.isin(table_ids, full.tables)
                if not refused.any():  # a table filled up meanwhile: leave the rest out too
                    refused = only
                counts[:, _COLUMN["cache_full"]] += np.bincount(table_ids[refused & fetched.found],
                                                                minlength=self.layout.count)
                only &= ~refused

    def _insert_later(self, table_ids: Int64s, keys: Int64s) -> bool:
        """Queue the fetch and cache insertion of these pairs; False when the queue was full."""

        def fetch_and_insert() -> None:
            fetch_started = time.monotonic()
            fetched = self.fetch_from_tiers(table_ids, keys)
            counts = self._new_counts()
            counts[:, _COLUMN["tier_errors"]] = fetched.counts[:, _COLUMN["tier_errors"]]
            self._insert_fetched(table_ids, keys, fetched, fetch_started, counts)
            self._record(counts)

        return self._background.submit(fetch_and_insert)

    def _copy_up(self, table_ids: Int64s, keys: Int64s, values: npt.NDArray[np.float32], offsets: Int64s) -> None:
        """Copy rows found only in the persistent DB up to the volatile DB, in the background."""
        assert self._volatile is not None
        volatile = self._volatile
        packed_offsets, size = row_offsets(table_ids, self.layout.dims)
        rows = np.empty(size, np.float32)
        copy_rows(values, offsets, rows, packed_offsets, table_ids, self.layout.dims)
        names, dims = self.layout.qualified_names, self.layout.dims

        def insert() -> None:
            # The volatile tier's insert is per table (the update stream's unit); the groups
            # come from one counting sort, and this runs off the request path.
            order, bounds = group_by(table_ids, len(names))
            for t in np.flatnonzero(np.diff(bounds)).tolist():
                part = order[bounds[t] : bounds[t + 1]]
                vectors = rows.reshape(-1)[packed_offsets[part, None] + np.arange(dims[t])]
                volatile.insert(names[t], keys[part], vectors)

        self._background.submit(insert)

    # ------------------------------------------------------------------ counters and lifetime

    def counters(self) -> dict[str, dict[str, float]]:
        """Snapshot of the per-table counters, keyed by table name."""
        with self._counters_lock:
            totals = self._totals.copy()
        return {name: dict(zip(COUNTER_FIELDS, totals[t].tolist())) for t, name in enumerate(self.layout.names)}

    def _new_counts(self) -> npt.NDArray[np.float64]:
        """Zero counters (T, fields) for one step's changes, recorded with :meth:`_record`."""
        return np.zeros(self._totals.shape)

    def _record(self, counts: npt.NDArray[np.float64]) -> None:
        with self._counters_lock:
            self._totals += counts

    def drain(self, timeout: float | None = None) -> None:
        """Wait until the background insertions queued so far are done (tests, shutdown)."""
        self._background.drain(timeout)

    def close(self) -> None:
        """Finish background work; the session answers no lookups afterwards."""
        self._background.close()


@njit(nogil=True, cache=True)
def _count_tier(table_ids: Any, found: Any, seconds: float, failed: Any, counts: Any, hits_column: int,
                seconds_column: int, errors_column: int) -> Any:
    """Add a tier's answer to ``counts`` (T, fields): its hits per table, its ``seconds``
    shared among the tables by the keys each asked for, and an error per table asked whose
    ``failed`` (T,) int64 is non-zero (the whole call failed, or some of its keys' nodes).
    Returns the positions it did not find."""
    tables = counts.shape[0]
    asked = np.zeros(tables, np.int64)
    still = np.empty(found.shape[0], np.int64)
    m = 0
    for i in range(found.shape[0]):
        t = table_ids[i]
        asked[t] += 1
        if found[i]:
            counts[t, hits_column] += 1
        else:
            still[m] = i
            m += 1
    for t in range(tables):
        if asked[t]:
            counts[t, seconds_column] += seconds * asked[t] / found.shape[0]
            counts[t, errors_column] += failed[t] > 0
    return still[:m]


@njit(nogil=True, cache=True)
def _fill_defaults(table_ids: Any, missing: Any, out: Any, offsets: Any, dims: Any, defaults: Any, counts: Any,
                   column: int) -> Any:
    """Write each table's default into the rows of the ``missing`` positions (None: all) and
    count them; returns the found mask (False at those positions)."""
    found = np.ones(table_ids.shape[0], np.bool_)
    if missing is None:
        missing = np.arange(table_ids.shape[0])
    for j in range(missing.shape[0]):
        i = missing[j]
        t = table_ids[i]
        found[i] = False
        counts[t, column] += 1
        o = offsets[i]
        for d in range(dims[t]):
            out[o + d] = defaults[t]
    return found


def _check_uint32(keys: Int64s) -> None:
    """Refuse keys a uint32 cache cannot hold (HugeCTR ``supportlonglong: false``), host side:
    the request fails alone, before the shared pass."""
    if keys.size and (int(keys.min()) < 0 or int(keys.max()) > 0xFFFFFFFF):
        raise RequestError(
            "KEYS holds a key outside [0, 2**32): this model's keys are uint32 (supportlonglong: "
            "false); send keys in that range or set supportlonglong: true"
        )


def _shares(seconds: float, weights: Any) -> Any:
    """``seconds`` shared among tables in proportion to ``weights`` (keys each one asked for)."""
    total = weights.sum()
    return seconds * weights / total if total else np.zeros(weights.shape[0])


def _shape(vectors: Any, request: CheckedRequest) -> Any:
    """A request's slice of the outputs, with its batch dimension when it came with one."""
    return vectors.reshape(request.rows, -1) if request.batched else vectors
