"""Online updates for one server: the update stream into its tiers, and on into its caches.

HugeCTR runs one Kafka consumer per database layer. Here:

- **volatile layer** → the volatile DB. A private hash map (``host_shared: false``) belongs to
  one process, so each process consumes every update (its own consumer group, suffixed with the
  process id; a new process starts from the earliest offset, which replays what its freshly
  loaded hash map lacks). The host store is one per host, so the processes attached to it share
  one group, which applies each update once per host: the group is named after the stores'
  generation (:meth:`~hps_core.db.base.HostSharedTables.generation`), so a store built anew
  replays the stream from the earliest offset and a reused one resumes where its group
  committed. A Redis Cluster is shared between hosts, so one group applies each update once
  (HugeCTR's naming).
- **persistent layer** → RocksDB, one group per host (only one process may write): the
  writer is opened per batch, under RocksDB's write lock, and closed after. Serving handles
  are RocksDB *secondary* instances that catch up every ``catch_up_s`` seconds.
- **caches follow**: every update batch overwrites the rows that the caches hold
  (``LookupSession.apply_update``: cached keys only, nothing inserted or flushed; the session
  also keeps rows fetched before an update out of the cache), so a cached row is never
  staler than the stream. With a private hash map the volatile
  layer's own consumer (per process) feeds the caches after each apply; otherwise (the host
  store, a shared Redis Cluster, or no volatile DB) the caches get a consumer group per process
  that only refreshes them, since a shared group hands each update to one process only.
- **row formats**: updates are float32 rows (HugeCTR's wire format) whatever a table's row
  format; each tier and cache packs them in the table's format (``TableConfig.row_format``,
  handed to the appliers with the widths), so a row served after an update reads the same as
  one loaded from a file. A row the format cannot store is refused and counted in
  ``rejected_updates`` (see hps_core/updates/applier.py), never retried.
- **finite rows only**: every source (the caches' own group too) refuses a message holding a
  NaN or an infinity whole before any tier or cache sees it, counted in ``rejected_updates``
  and ``rejected_non_finite`` per layer (hps_core/updates/source.py), so no lookup serves one.

Staleness (publish → applied) is measured by each source; :meth:`OnlineUpdates.stats`
reports it per layer.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hps_core.arrays import Keys, Vectors
from hps_core.background import RepeatInBackground
from hps_core.config import ParameterServerConfig
from hps_core.db.base import EmbeddingTier, HostSharedTables, Refreshable, SharedTier
from hps_core.logs import RateLimitedLog
from hps_core.lookup import LookupSession
from hps_core.updates import TierUpdateApplier, UpdateSource

__all__ = ["OnlineUpdates"]

log = logging.getLogger(__name__)


class OnlineUpdates:
    """Starts and stops the update sources of one :class:`HierarchicalParameterServer`."""

    def __init__(
        self,
        config: ParameterServerConfig,
        sessions: Mapping[str, LookupSession],
        *,
        volatile: EmbeddingTier | None,
        persistent_writer: Callable[[], EmbeddingTier] | None,
        persistent_reader: EmbeddingTier | None,
        catch_up_s: float = 1.0,
        consumer_config: Mapping[str, Any] | None = None,
    ) -> None:
        self._config = config
        self._sessions = sessions
        self._reader = persistent_reader
        self._catch_up_s = catch_up_s
        tables = [t for s in sessions.values() for t in s.model.tables]
        dims = {t.qualified_name: t.dim for t in tables}
        formats = {t.qualified_name: t.row_format for t in tables}  # tables an update creates: as configured
        self._cache_of = {  # qualified table name → (session, table name) of the cached tables
            t.qualified_name: (s, t.name) for s in sessions.values() for t in s.model.tables if t.name in s.caches
        }
        self.sources: dict[str, UpdateSource] = {}
        host_store = isinstance(volatile, HostSharedTables)
        in_process = volatile is not None and not isinstance(volatile, SharedTier) and not host_store
        if volatile is not None:
            if in_process:
                instance: str | None = _instance_id()
            elif isinstance(volatile, HostSharedTables):
                instance = volatile.generation(sorted(dims))
            else:
                instance = None
            self.sources["volatile"] = UpdateSource.for_layer(
                config,
                "volatile",
                TierUpdateApplier(volatile, dims, on_applied=self._refresh_caches if in_process else None,
                                  row_formats=formats),
                instance=instance,
                consumer_config=consumer_config,
            )
        if self._cache_of and not in_process:
            # A shared tier's group applies each update in one process only; every process's
            # caches must still see it, so the caches get a consumer group of their own.
            self.sources["cache"] = UpdateSource(
                config.update_source,
                _CacheApplier(dims, self._refresh_caches),
                layer="volatile",
                update_filters=config.volatile_db.update_filters,
                key_dtype=np.int64 if config.supportlonglong else np.uint32,
                group_id=f"hps.cache.{socket.gethostname()}.{_instance_id()}",
                consumer_config=consumer_config,
            )
        if persistent_writer is not None:
            hook = None
            self.sources["persistent"] = UpdateSource.for_layer(
                config,
                "persistent",
                TierUpdateApplier.opening(persistent_writer, dims, on_applied=hook, row_formats=formats),
                consumer_config=consumer_config,
            )
        self._catch_up: RepeatInBackground | None = None
        # The catch-up loop fails the same way every second while RocksDB is unreadable.
        self._failures = RateLimitedLog(log)

    def start(self) -> None:
        for source in self.sources.values():
            source.start()
        if isinstance(self._reader, Refreshable) and self._catch_up is None:
            self._catch_up = RepeatInBackground(
                self._reader.refresh, name="hps-rocksdb-catch-up", interval_s=self._catch_up_s,
                # serving goes on with the last state it saw
                on_error=lambda exc: self._failures.failure("persistent DB catch-up failed", exc))
            self._catch_up.start()

    def stop(self) -> None:
        for source in self.sources.values():
            source.stop()
        if self._catch_up is not None:
            self._catch_up.stop()
            self._catch_up = None
        self._failures.flush()  # each source's stop flushes its own

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each layer's source counters and staleness (see UpdateSource.stats)."""
        return {layer: source.stats() for layer, source in self.sources.items()}

    def _refresh_caches(self, table: str, keys: Keys, values: Vectors) -> None:
        cached = self._cache_of.get(table)
        if cached is not None:
            session, name = cached
            session.apply_update(name, keys, values)


_servers_in_process = itertools.count()


def _instance_id() -> str:
    """Unique among live servers: the process id, and a counter for several in one process."""
    return f"{os.getpid()}-{next(_servers_in_process)}"


class _CacheApplier:
    """An UpdateApplier that only refreshes this process's caches (tiers are written elsewhere)."""

    def __init__(self, dims: Mapping[str, int],
                 refresh: Callable[[str, Keys, Vectors], None]) -> None:
        self._dims = dict(dims)
        self._refresh = refresh

    def dim(self, table: str) -> int | None:
        return self._dims.get(table)

    def apply(self, table: str, keys: Keys, values: Vectors) -> None:
        """Refresh the cached rows; a GPU out of memory raises DeviceMemoryError, which the
        source retries (a skipped batch would leave stale rows in the cache); another
        DeviceError stops it."""
        self._refresh(table, keys, values)
