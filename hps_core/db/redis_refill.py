"""Refill of a Redis volatile tier after a node lost its data (restarted empty).

A Redis node restarted without persistence (or with its files lost) comes back holding
nothing: without a persistent tier its keys would answer the default vector from then on.
:class:`RefillMonitor` notices and puts the rows back, in the background:

- **Detection.** Each (table, partition) hash has a load marker in its own slot
  (``hps_et{<table>/p<N>}m``, see ``_redis_layout``), written once the partition's rows were
  loaded. A node that lost its data lost the markers of its partitions with it. Every
  ``interval_s`` the monitor asks for all markers at once (one pipelined EXISTS per node,
  :meth:`~hps_core.db.base.PartitionMarkers.check_markers`, the optional tier capability
  declared in ``base.py``). A node that does not answer is not a loss yet: only a marker that
  is *gone* is. The markers are written *before* the rows they stand for, so a node that
  restarts empty during or just after a load is noticed too.
- **Refill.** Only the lost partitions are refilled, from the table's sparse file: the same
  leading ``initial_cache_rate`` share of rows the start-up fill loaded, keeping the rows
  whose partition (the layout's partition function, vectorised) is lost. Where the server has
  a persistent tier, the rows it holds replace the file's (it receives the update stream).
  In a server that follows updates that tier is a RocksDB *secondary*, which catches up with
  the writer only every ``catch_up_s``: the monitor catches it up (``catch_up``) right before
  it reads the rows of a refill. Rows are written with HSETNX semantics
  (:meth:`~hps_core.db.base.PartitionMarkers.insert_missing`), packed in the table's row
  format as every insert is: a row the update stream wrote since the node came back is kept.
  Then the markers are written again. Where the metadata hashes were lost too, the table is
  created again with its source's dim and row format (:class:`RefillSource`).
- **Several processes** (Triton runs one per model instance) share one Redis: a refill lock
  per partition (``SET NX PX``, in the partition's slot) lets one of them refill, and the
  claim re-checks the marker, so a partition refilled meanwhile is not refilled twice. The
  writes are idempotent, so a lock that expires mid-refill costs time, not correctness.
- **Nowhere to refill from** (the sparse file is gone or unreadable): logged as an error,
  rate-limited, and visible as :meth:`RefillMonitor.lost_partitions` (the gauge
  ``hps_volatile_lost_partitions``), until a later pass succeeds.

What a loss means for updates: rows the update stream wrote to Redis before the node lost
its data are lost from Redis with it. Without a persistent tier the refill brings back the
sparse file's rows: those updates are lost from Redis until their keys are updated again.
With one, it brings back that tier's rows as of the refill, which include every update its
writer had applied by then. The two tiers take the stream through separate consumers,
though, and the persistent one may lag: an update the volatile consumer had written to Redis
but the persistent consumer had not applied yet when the refill read its rows is lost too,
the refill puts the older row back, and Redis serves it until that key is updated again.
Only partitions whose marker is gone are refilled, so rows of healthy nodes are never
rewritten from the file.

One table failing (its file gone, a node failing again, its metadata refused with a
ConfigError) does not stop the others: each table's refill is isolated, and its count in
:meth:`RefillMonitor.lost_partitions` is updated whatever happened.

Every log line goes through :class:`~hps_core.logs.RateLimitedLog`: one line per cause per
interval, however often the probe runs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hps_core.db import _redis_layout as layout
from hps_core.arrays import Keys, Vectors
from hps_core.background import RepeatInBackground
from hps_core.db.base import EmbeddingTier, PartitionMarkers
from hps_core.errors import ConfigError, HPSError, TierError
from hps_core.formats import read_table
from hps_core.logs import RateLimitedLog
from hps_core.row_formats import RowFormat

__all__ = ["DEFAULT_INTERVAL_S", "RefillMonitor", "RefillSource"]

log = logging.getLogger(__name__)
_log = RateLimitedLog(log)

DEFAULT_INTERVAL_S = 1.0  # seconds between two probes of the markers
DEFAULT_LOCK_S = 120.0  # a refill lock expires after this (a process that died mid-refill)
DEFAULT_CHUNK_ROWS = 1 << 16  # rows of the sparse file read per step (bounds memory)


@dataclass(frozen=True)
class RefillSource:
    """Where a table's volatile rows came from: its sparse file and the share loaded."""

    table: str  # qualified name (hps_et.<model>.<table>)
    dim: int
    path: str  # HugeCTR sparse model folder, .npz or .npy folder
    fraction: float  # initial_cache_rate: the leading share of the file the fill loaded
    row_format: RowFormat = RowFormat.FP32  # the table's row format (its metadata is restored with it)


class RefillMonitor:
    """Probes the load markers of ``sources`` every ``interval_s`` and refills lost partitions.

    ``persistent``: the server's persistent tier, or None; where given, its rows replace the
    file's in a refill. ``catch_up``: called right before those rows are read, when
    ``persistent`` follows a writer in another process (a RocksDB secondary's ``refresh``);
    None when it cannot lag. :meth:`check_once` runs one pass (the thread calls it; tests may
    too).
    """

    def __init__(
        self,
        tier: PartitionMarkers,
        sources: Sequence[RefillSource],
        *,
        persistent: EmbeddingTier | None = None,
        catch_up: Callable[[], None] | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        lock_s: float = DEFAULT_LOCK_S,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        if interval_s <= 0:
            raise ConfigError(f"refill interval_s must be > 0 seconds, got {interval_s}")
        self._tier = tier
        self._sources = {s.table: s for s in sources}
        self._persistent = persistent
        self._catch_up = catch_up
        self._interval_s = float(interval_s)
        self._lock_s = float(lock_s)
        self._chunk_rows = int(chunk_rows)
        self._token = tier.new_token()
        self._lost = {name: 0 for name in self._sources}
        self._lost_lock = threading.Lock()
        self._loop: RepeatInBackground | None = None
        self.refills = 0  # partitions this process refilled
        self.rows_refilled = 0
        self.last_refill_s: float | None = None  # seconds from detection to markers rewritten

    def start(self) -> None:
        if self._loop is None and self._sources:
            self._loop = RepeatInBackground(self.check_once, name="hps-redis-refill", interval_s=self._interval_s,
                                            on_error=lambda exc: _log.failure("volatile refill", exc))
            self._loop.start()

    def stop(self) -> None:
        """Stop probing; a refill in progress finishes its current chunk first."""
        if self._loop is not None:
            self._loop.stop()
            self._loop = None

    def lost_partitions(self) -> dict[str, int]:
        """Per table: partitions found without their rows at the last probe and not refilled
        (by this process) since; 0 when all are in place."""
        with self._lost_lock:
            return dict(self._lost)

    def check_once(self) -> dict[str, int]:
        """One probe, and a refill of every lost partition this process can claim; returns
        :meth:`lost_partitions`."""
        try:
            state = self._tier.check_markers(tuple(self._sources))
        except TierError as exc:
            _log.failure("volatile refill: probing the load markers", exc, level=logging.WARNING)
            return self.lost_partitions()
        for name, source in self._sources.items():  # one table failing does not stop the others
            still = lost = state.missing.get(name, [])
            try:
                if state.meta_missing:  # the node of the metadata hashes lost them
                    self._restore_metadata(source)
                if lost:
                    still = self._refill(source, lost)
            except HPSError as exc:
                _log.failure(f"volatile refill: {name}", exc, level=_level(exc))
            finally:
                with self._lost_lock:
                    self._lost[name] = len(still)
        return self.lost_partitions()

    def _restore_metadata(self, source: RefillSource) -> None:
        """Write the table's metadata again; the refill does not need it, so a failure is
        logged and left to the next probe."""
        try:
            self._tier.create_table(source.table, source.dim, source.row_format)
        except HPSError as exc:  # TierError: a node failed; ConfigError: another count was stored
            _log.failure("volatile refill: restoring the table metadata", exc, level=_level(exc))

    def _refill(self, source: RefillSource, lost: list[int]) -> list[int]:
        """Refill the ``lost`` partitions of one table that this process can claim; returns the
        partitions still lost afterwards (claimed by another process, or failed)."""
        detected = time.monotonic()
        _log.warning(
            f"volatile refill: {source.table}: partitions lost",
            f"volatile refill: {source.table}: {len(lost)} of {self._tier.num_partitions} partitions lost "
            f"their rows (a Redis node came back empty); refilling from {source.path}",
        )
        claimed = self._tier.claim_partitions(source.table, lost, self._token, self._lock_s)
        if not claimed:
            return lost  # another process refills them; the next probe sees its markers
        try:
            rows = self._copy(source, claimed)
            if rows < 0:
                return lost  # stopped: the markers stay missing, the next server refills
            self._tier.mark_loaded(source.table, claimed)
        except (OSError, ValueError, HPSError) as exc:
            # TierError (a node failed again), FormatError or OSError (the file is gone)
            _log.error(
                f"volatile refill: {source.table}: cannot refill: {type(exc).__name__}",
                f"volatile refill: {source.table}: cannot refill {len(claimed)} lost partitions from "
                f"{source.path}: {type(exc).__name__}: {exc}. Their keys answer the default vector "
                "(or the persistent tier's rows) until they are loaded again (hps load --tier volatile)",
                exc=exc,
            )
            return lost
        finally:
            self._tier.release_partitions(source.table, claimed, self._token)
        self.refills += len(claimed)
        self.rows_refilled += rows
        self.last_refill_s = time.monotonic() - detected
        _log.log(
            logging.INFO,
            f"volatile refill: {source.table}: refilled",
            f"volatile refill: {source.table}: refilled {len(claimed)} partitions ({rows} rows) in "
            f"{self.last_refill_s:.2f} s",
        )
        return [p for p in lost if p not in claimed]

    def _copy(self, source: RefillSource, partitions: list[int]) -> int:
        """Write the rows of ``partitions`` from the file's loaded share; returns rows written,
        or -1 when the monitor was stopped before the end."""
        table = read_table(source.path, source.dim)  # memory-mapped: only the chunks are read
        total = int(math.floor(len(table) * source.fraction))
        wanted = np.zeros(self._tier.num_partitions, np.bool_)
        wanted[partitions] = True
        if self._persistent is not None:
            self._catch_up_persistent(source.table)
        written = 0
        for lo in range(0, total, self._chunk_rows):
            if self._loop is not None and self._loop.stopping.is_set():
                return -1
            hi = min(lo + self._chunk_rows, total)
            keys = np.asarray(table.keys[lo:hi], dtype=np.int64)
            keep = wanted[layout.partition_of(keys, self._tier.num_partitions)]
            if not keep.any():
                continue
            keys = np.ascontiguousarray(keys[keep])
            values = np.ascontiguousarray(np.asarray(table.vectors[lo:hi])[keep], dtype=np.float32)
            if self._persistent is not None:
                self._fresher_rows(source.table, keys, values)
            self._tier.insert_missing(source.table, keys, values)
            written += keys.shape[0]
        return written

    def _catch_up_persistent(self, table: str) -> None:
        """Let the persistent tier see what its writer applied up to now, before its rows are
        read; on failure the refill goes on with the rows as of its last catch-up."""
        if self._catch_up is None:
            return
        try:
            self._catch_up()
        except TierError as exc:
            _log.failure(f"volatile refill: {table}: catching up the persistent tier", exc, level=logging.WARNING)

    def _fresher_rows(self, table: str, keys: Keys, values: Vectors) -> None:
        """Replace ``values`` by the persistent tier's rows where it has them (it takes the
        update stream); the file's rows stay where it cannot answer."""
        assert self._persistent is not None
        try:
            self._persistent.fetch(table, keys, values)
        except TierError as exc:  # a PartialTierError wrote what it could
            _log.failure(f"volatile refill: {table}: reading the persistent tier", exc, level=logging.WARNING)


def _level(exc: BaseException) -> int:
    """A tier failing (it may come back) is a warning; anything else an error."""
    return logging.WARNING if isinstance(exc, TierError) else logging.ERROR
