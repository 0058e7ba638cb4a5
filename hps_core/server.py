"""The parameter server: the databases and lookup sessions of every deployed model.

:class:`HierarchicalParameterServer` opens the volatile and persistent databases an HPS
config names, makes sure each table's rows are there (loading the model's sparse files the
first time, as HugeCTR does), and hands out one :class:`LookupSession` per model.

Loading rules (HugeCTR's, through :func:`hps_core.loader.load_table`):
- the persistent DB keeps the full table; a progress marker in RocksDB records what was
  loaded from which file, so a restart over an existing RocksDB loads nothing (and a load
  that was interrupted resumes), while a changed sparse file is loaded again;
- every tier stores a table in its configured row format (``TableConfig.row_format``:
  ``embedding_format_per_table`` or ``fp8_quant``), quantising the file's float32 rows as it
  writes them; a tier that already stores the table in another format (or width) fails the
  server's construction with a ConfigError naming the table, both formats and the config file;
- the volatile DB takes the first ``initial_cache_rate`` share of each sparse file. In Redis,
  each partition gets a load marker (written before its rows, by ``load_table``), and a
  :class:`~hps_core.db.redis_refill.RefillMonitor` probes the markers every
  ``refill_interval_s``: the partitions of a node that came back empty are refilled from the
  sparse files (and the persistent DB's fresher rows, read after catching a secondary up) in
  the background, and those it cannot refill show in
  :meth:`HierarchicalParameterServer.lost_partitions`.

Several processes share one RocksDB: Triton runs each model instance of a Python-based
backend in its own process, and RocksDB lets one process at a time hold its write lock. So a
server takes the lock only to load (waiting while another process loads), then serves from
a read-only handle. With ``persistent_db.read_only: true`` it never writes: something else
(``hps load``, another server) must have loaded the tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from hps_core.arrays import array_module
from hps_core.cache.base import MultiTableCache
from hps_core.config import (
    CacheKind,
    ModelConfig,
    ParameterServerConfig,
    PersistentDBConfig,
    TableConfig,
    gpu_cache_requested,
)
from hps_core.db import open_persistent_db, open_volatile_db
from hps_core.db.base import EmbeddingTier, PartitionMarkers, Refreshable
from hps_core.db.redis_refill import DEFAULT_INTERVAL_S, RefillMonitor, RefillSource
from hps_core.errors import UnknownTableError
from hps_core.formats import read_sparse_model, sparse_model_rows
from hps_core.loader import ensure_table, fingerprint, load_table
from hps_core.lookup import LookupSession
from hps_core.refresh import CacheRefresher
from hps_core.retry import WRITE_LOCK_WAIT

if TYPE_CHECKING:
    from hps_core.online import OnlineUpdates

__all__ = ["HierarchicalParameterServer"]

log = logging.getLogger(__name__)

_LOAD_CHUNK_ROWS = 1 << 18  # bounds the memory a load needs, whatever the table size


class HierarchicalParameterServer:
    """Owns the tiers and the sessions for the models of one HPS config.

    ``models`` restricts which models of the config are deployed (a Triton model instance
    deploys only its own); by default all are. ``cache_device`` is where embedding caches
    live — a CUDA device number, "cpu" for the CPU twin, or None for no cache — for the models
    whose config asks for one (``gpucache``). ``update_consumer_config`` overrides Kafka
    consumer settings of the update sources (see hps_core/online.py). ``refill_interval_s``:
    seconds between two probes of a Redis volatile tier's load markers (see the module doc).
    """

    def __init__(
        self,
        config: ParameterServerConfig,
        *,
        models: Iterable[str] | None = None,
        cache_device: int | str | None = None,
        update_consumer_config: Mapping[str, Any] | None = None,
        refill_interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.config = config
        self.refill: RefillMonitor | None = None
        self._cache_device = cache_device
        self._update_consumer_config = update_consumer_config
        self._sessions: dict[str, LookupSession] = {}
        self._refreshers: list[CacheRefresher] = []
        self._gpu_caches: list[Any] = []  # GpuDynamicCache | GpuStaticCache: closed last (a shared one gives back its slot)
        self.updates: OnlineUpdates | None = None
        self._secondary_dir: tempfile.TemporaryDirectory[str] | None = None
        self._catch_up: Callable[[], None] | None = None  # a secondary's catch-up with its writer
        names = [m.model for m in config.models] if models is None else list(models)
        self._models = {name: config.model(name) for name in names}
        self.volatile: EmbeddingTier | None = open_volatile_db(config.volatile_db, config.source)
        self.persistent: EmbeddingTier | None = None
        try:
            self.persistent = self._open_persistent()
            for name, model in self._models.items():
                self._fill_volatile(model)
                self._sessions[name] = self._open_session(model)
            self._start_refill(refill_interval_s)
            self._start_updates()
        except BaseException:
            self.close()
            raise

    def session(self, model: str) -> LookupSession:
        """The lookup session of a deployed model."""
        try:
            return self._sessions[model]
        except KeyError:
            raise UnknownTableError(
                f"model '{model}' is not deployed by this server (deployed: {', '.join(self._sessions)})"
            ) from None

    def lost_partitions(self, model: str) -> dict[str, int]:
        """Per table of ``model`` (plain names): volatile partitions a Redis node lost and that
        are not refilled yet (the gauge ``hps_volatile_lost_partitions``); empty when the
        volatile tier is not watched (not Redis, or nothing loaded into it)."""
        if self.refill is None:
            return {}
        lost = self.refill.lost_partitions()
        return {t.name: lost[t.qualified_name] for t in self._models[model].tables if t.qualified_name in lost}

    def close(self) -> None:
        if self.refill is not None:
            self.refill.stop()
        if self.updates is not None:
            self.updates.stop()
        for refresher in self._refreshers:
            refresher.stop()
        for session in self._sessions.values():
            session.close()
        for cache in self._gpu_caches:
            cache.close()
        self._gpu_caches = []
        for db in (self.volatile, self.persistent):
            if db is not None:
                db.close()
        self.volatile = self.persistent = None
        if self._secondary_dir is not None:
            self._secondary_dir.cleanup()

    def __enter__(self) -> HierarchicalParameterServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_session(self, model: ModelConfig) -> LookupSession:
        cache = self._make_cache(model)
        session = LookupSession(
            model,
            volatile=self.volatile,
            persistent=self.persistent,
            cache=cache,
            write_back=self.config.volatile_db.cache_missed_embeddings,
        )
        if cache is not None and model.init_ec:
            _warm_up(session)
        if cache is not None and model.cache_refresh_percentage_per_iteration > 0:
            refresher = CacheRefresher(
                session,
                percentage=model.cache_refresh_percentage_per_iteration,
                interval=model.refresh_interval,
                delay=model.refresh_delay,
            )
            refresher.start()
            self._refreshers.append(refresher)
        return session

    def _make_cache(self, model: ModelConfig) -> MultiTableCache | None:
        """One cache structure for all the model's tables, sized from their sparse files: the
        GPU's shared cache of the model (``gpu_cache_shared``, the default: every process that
        serves it on this GPU maps one, named in the host store's namespace), else a private one."""
        if self._cache_device is None or not gpu_cache_requested(model):
            return None
        from hps_core.cache import SharedName, make_multi_table_cache  # the GPU module imports cupy lazily
        from hps_core.db.shm_store import namespace_of

        static = model.embedding_cache_type == CacheKind.STATIC
        rows = [sparse_model_rows(table.sparse_file, table.dim)[0] for table in model.tables]
        shared = (SharedName(namespace_of(self.config.volatile_db, self.config.source), model.model,
                             source=_sources_fingerprint(model))
                  if model.gpu_cache_shared else None)
        cache = make_multi_table_cache(
            model.embedding_cache_type,
            device=self._cache_device,
            capacities=[r if static else max(1, math.ceil(r * model.gpucacheper)) for r in rows],
            dims=[table.dim for table in model.tables],
            row_formats=[table.row_format for table in model.tables],
            key_dtype=np.int64 if self.config.supportlonglong else np.uint32,
            shared=shared,
        )
        if self._cache_device != "cpu":
            self._gpu_caches.append(cache)
        return cache

    def _tables(self) -> list[TableConfig]:
        return [table for model in self._models.values() for table in model.tables]

    def _open_persistent(self) -> EmbeddingTier | None:
        """Load missing rows under the write lock, then serve from a read-only handle."""
        settings = self.config.persistent_db
        if not settings.enabled:
            return None
        if not settings.read_only:
            writer = WRITE_LOCK_WAIT.call(lambda: _open_writer(settings))
            try:
                for table in self._tables():
                    load_table(writer, table, source=self.config.source)
            finally:
                writer.close()
        reader = self._open_reader(settings)
        try:
            for table in self._tables():
                ensure_table(reader, table, self.config.source)  # checks the stored width and format
        except BaseException:
            reader.close()
            raise
        return reader

    def _open_reader(self, settings: PersistentDBConfig) -> EmbeddingTier:
        """A handle that never takes the write lock: read-only, or a secondary instance that
        can catch up with the writer when online updates change RocksDB while serving."""
        secondary_path = None
        if self.config.update_source.enabled:
            self._secondary_dir = tempfile.TemporaryDirectory(prefix="hps-rocksdb-secondary-")
            secondary_path = self._secondary_dir.name
        reader = open_persistent_db(dataclasses.replace(settings, read_only=True),
                                    secondary_path=secondary_path)
        assert reader is not None
        if secondary_path is not None and isinstance(reader, Refreshable):
            self._catch_up = reader.refresh
        return reader

    def _start_updates(self) -> None:
        if not self.config.update_source.enabled:
            return
        from hps_core.online import OnlineUpdates  # Kafka's client: only a server that follows a stream loads it

        settings = self.config.persistent_db
        writer = None
        if self.persistent is not None and not settings.read_only:
            writer = lambda: _open_writer(settings)  # noqa: E731 - opened per applied batch
        self.updates = OnlineUpdates(
            self.config,
            self._sessions,
            volatile=self.volatile,
            persistent_writer=writer,
            persistent_reader=self.persistent,
            consumer_config=self._update_consumer_config,
        )
        self.updates.start()

    def _fill_volatile(self, model: ModelConfig) -> None:
        if self.volatile is not None:
            rate = self.config.volatile_db.initial_cache_rate
            for table in model.tables:
                # Redis: markers, then rows
                load_table(self.volatile, table, source=self.config.source, fraction=rate)

    def _start_refill(self, interval_s: float) -> None:
        """Watch a Redis volatile tier for partitions a node lost, when it holds file rows."""
        rate = self.config.volatile_db.initial_cache_rate
        if not isinstance(self.volatile, PartitionMarkers) or rate <= 0:
            return
        sources = [RefillSource(t.qualified_name, t.dim, t.sparse_file, rate, t.row_format) for t in self._tables()]
        self.refill = RefillMonitor(
            self.volatile, sources, persistent=self.persistent, catch_up=self._catch_up, interval_s=interval_s
        )
        self.refill.start()


def _open_writer(settings: PersistentDBConfig) -> EmbeddingTier:
    """The RocksDB writer; TierBusyError while another process holds the write lock."""
    writer = open_persistent_db(settings)
    assert writer is not None
    return writer


def _sources_fingerprint(model: ModelConfig) -> str:
    """The identity of what a model's shared GPU cache holds: one digest of the fingerprint
    (hps_core.loader.fingerprint: size, mtime, first and last bytes) of each table's sparse
    file, in table order."""
    digest = hashlib.sha256()
    for table in model.tables:
        digest.update(f"{table.name}={fingerprint(table.sparse_file)};".encode())
    return digest.hexdigest()[:32]


def _warm_up(session: LookupSession) -> None:
    """HugeCTR's ``init_ec``: fill each cache with the first rows of its sparse file."""
    for table in session.model.tables:
        cache = session.caches.get(table.name)
        if cache is None:
            continue
        sparse = read_sparse_model(table.sparse_file, table.dim)
        n = min(cache.capacity, sparse.keys.size)
        for start in range(0, n, _LOAD_CHUNK_ROWS):
            stop = min(start + _LOAD_CHUNK_ROWS, n)
            xp = array_module(cache)
            cache.replace(xp.asarray(sparse.keys[start:stop]), xp.asarray(sparse.vectors[start:stop]))
