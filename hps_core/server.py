"""The parameter server: the databases and lookup sessions of every deployed model.

:class:`HierarchicalParameterServer` opens the volatile and persistent databases an HPS
config names, makes sure each table's rows are there (loading the model's sparse files the
first time, as HugeCTR does), and hands out one :class:`LookupSession` per model.

Loading rules (HugeCTR's):
- the persistent DB keeps the full table; rows are loaded only when the table holds fewer
  rows than the sparse file, so a restart over an existing RocksDB loads nothing;
- the volatile DB takes the first ``initial_cache_rate`` share of each sparse file.

Several processes share one RocksDB: Triton runs each model instance of a Python-based
backend in its own process, and RocksDB lets one process at a time hold its write lock. So a
server takes the lock only to load (waiting while another process loads), then serves from
a read-only handle. With ``persistent_db.read_only: true`` it never writes: something else
(``hps load``, another server) must have loaded the tables.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable

import numpy as np

from hps_core.config import ModelConfig, ParameterServerConfig, TableConfig
from hps_core.db import open_persistent_db, open_volatile_db
from hps_core.db.base import EmbeddingTier
from hps_core.errors import TierBusyError, UnknownTableError
from hps_core.formats import iter_sparse_model_chunks, read_sparse_model
from hps_core.lookup import LookupSession

__all__ = ["HierarchicalParameterServer"]

log = logging.getLogger(__name__)

_LOAD_CHUNK_ROWS = 1 << 18  # bounds the memory a load needs, whatever the table size
_WRITE_LOCK_TIMEOUT_S = 600.0  # a loader in another process may be filling large tables


class HierarchicalParameterServer:
    """Owns the tiers and the sessions for the models of one HPS config.

    ``models`` restricts which models of the config are deployed (a Triton model instance
    deploys only its own); by default all are.
    """

    def __init__(self, config: ParameterServerConfig, *, models: Iterable[str] | None = None) -> None:
        self.config = config
        names = [m.model for m in config.models] if models is None else list(models)
        self._models = {name: config.model(name) for name in names}
        self.volatile: EmbeddingTier | None = open_volatile_db(config.volatile_db)
        self.persistent: EmbeddingTier | None = None
        try:
            self.persistent = self._open_persistent()
            for model in self._models.values():
                self._fill_volatile(model)
        except BaseException:
            self.close()
            raise
        self._sessions = {
            name: LookupSession(model, volatile=self.volatile, persistent=self.persistent)
            for name, model in self._models.items()
        }

    def session(self, model: str) -> LookupSession:
        """The lookup session of a deployed model."""
        try:
            return self._sessions[model]
        except KeyError:
            raise UnknownTableError(
                f"model '{model}' is not deployed by this server (deployed: {', '.join(self._sessions)})"
            ) from None

    def close(self) -> None:
        for db in (self.volatile, self.persistent):
            if db is not None:
                db.close()
        self.volatile = self.persistent = None

    def __enter__(self) -> HierarchicalParameterServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tables(self) -> list[TableConfig]:
        return [table for model in self._models.values() for table in model.tables]

    def _open_persistent(self) -> EmbeddingTier | None:
        """Load missing rows under the write lock, then serve from a read-only handle."""
        settings = self.config.persistent_db
        if settings.type == "disabled":
            return None
        if not settings.read_only:
            writer = self._open_writer(settings)
            try:
                for table in self._tables():
                    writer.create_table(table.qualified_name, table.dim)
                    _fill_persistent(writer, table)
            finally:
                writer.close()
        reader = open_persistent_db(dataclasses.replace(settings, read_only=True))
        assert reader is not None
        for table in self._tables():
            reader.create_table(table.qualified_name, table.dim)  # checks the stored width
        return reader

    @staticmethod
    def _open_writer(settings: object) -> EmbeddingTier:
        deadline = time.monotonic() + _WRITE_LOCK_TIMEOUT_S
        while True:
            try:
                writer = open_persistent_db(settings)
                assert writer is not None
                return writer
            except TierBusyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _fill_volatile(self, model: ModelConfig) -> None:
        if self.volatile is not None:
            for table in model.tables:
                self.volatile.create_table(table.qualified_name, table.dim)
                self._fill_volatile_table(table)

    def _fill_volatile_table(self, table: TableConfig) -> None:
        assert self.volatile is not None
        rate = self.config.volatile_db.initial_cache_rate
        sparse = read_sparse_model(table.sparse_file, table.dim)
        n_rows = int(np.floor(sparse.keys.size * rate))
        if n_rows == 0:
            return
        log.info("caching %d rows of %s in the volatile DB", n_rows, table.qualified_name)
        for start in range(0, n_rows, _LOAD_CHUNK_ROWS):
            stop = min(start + _LOAD_CHUNK_ROWS, n_rows)
            self.volatile.insert(
                table.qualified_name,
                np.ascontiguousarray(sparse.keys[start:stop]),
                np.ascontiguousarray(sparse.vectors[start:stop]),
            )


def _fill_persistent(db: EmbeddingTier, table: TableConfig) -> None:
    n_rows = read_sparse_model(table.sparse_file, table.dim).keys.size
    if db.count(table.qualified_name) >= n_rows:
        return
    log.info("loading %d rows of %s into the persistent DB", n_rows, table.qualified_name)
    for chunk in iter_sparse_model_chunks(table.sparse_file, table.dim, _LOAD_CHUNK_ROWS):
        db.insert(table.qualified_name, chunk.keys, chunk.vectors)
