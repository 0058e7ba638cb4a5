"""The lookup path of one deployed model: request keys in, embedding vectors out.

A :class:`LookupSession` answers HugeCTR's HPS request — ``KEYS`` (all keys of all tables,
table-major) and ``NUMKEYS`` (keys per table) — with the vectors in the same order, flattened.
For each table it de-duplicates the keys, then asks each tier only for what the tiers above
did not have::

    volatile DB (hash map | Redis)  →  persistent DB (RocksDB)  →  the table's default value

Every step is a batched call on arrays; nothing here loops over keys in Python.
The GPU embedding cache slots in above the volatile DB (see docs/architecture.md).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from hps_core.config import ModelConfig, TableConfig
from hps_core.db.base import EmbeddingTier
from hps_core.errors import RequestError, TierError

__all__ = ["LookupSession", "TableCounters", "split_request"]

_INTEGER_KINDS = ("i", "u")


@dataclass
class TableCounters:
    """Running totals for one table; read by metrics and tests."""

    keys: int = 0
    unique_keys: int = 0
    volatile_hits: int = 0
    persistent_hits: int = 0
    defaults: int = 0
    tier_errors: int = 0
    seconds_volatile: float = 0.0
    seconds_persistent: float = 0.0

    def snapshot(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Tier:
    name: str  # "volatile" | "persistent": selects the counters to bump
    db: EmbeddingTier


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
    """Answers lookups for one model over the tiers it was given.

    Thread-safe: the tiers guard themselves and the counters have their own lock.
    ``volatile`` and ``persistent`` may be None (a tier of type "disabled").
    """

    def __init__(
        self,
        model: ModelConfig,
        *,
        volatile: EmbeddingTier | None,
        persistent: EmbeddingTier | None,
    ) -> None:
        self.model = model
        self._tiers = tuple(
            _Tier(name, db) for name, db in (("volatile", volatile), ("persistent", persistent)) if db is not None
        )
        self._counters = {t.name: TableCounters() for t in model.tables}
        self._counters_lock = threading.Lock()

    def lookup(self, keys: np.ndarray, numkeys: np.ndarray) -> np.ndarray:
        """Vectors for one request: ``keys`` (n,) int64 table-major, ``numkeys`` (tables,) int32.

        Returns (sum over tables of count_i * dim_i,) float32, host: each table's vectors in
        key order, tables one after another.
        """
        per_table = split_request(keys, numkeys, self.model)
        parts = [self._lookup_table(table, table_keys).ravel() for table, table_keys in zip(self.model.tables, per_table)]
        return np.concatenate(parts)

    def lookup_batch(self, keys: np.ndarray, numkeys: np.ndarray) -> np.ndarray:
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
        return np.stack(rows)

    def counters(self) -> dict[str, dict[str, float]]:
        """Snapshot of the per-table counters, keyed by table name."""
        with self._counters_lock:
            return {name: c.snapshot() for name, c in self._counters.items()}

    def _lookup_table(self, table: TableConfig, keys: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(keys, return_inverse=True)
        vectors = np.empty((unique.size, table.dim), dtype=np.float32)
        missing = np.arange(unique.size)
        found_by_tier: dict[str, int] = {}
        seconds_by_tier: dict[str, float] = {}
        errors = 0
        for tier in self._tiers:
            if missing.size == 0:
                break
            start = time.perf_counter()
            try:
                found = self._fetch(tier, table, unique[missing], vectors, missing)
            except TierError:
                # A failing tier is a tier that has nothing: the next one answers.
                errors += 1
                found = np.zeros(missing.size, dtype=bool)
            seconds_by_tier[tier.name] = time.perf_counter() - start
            found_by_tier[tier.name] = int(found.sum())
            missing = missing[~found]
        vectors[missing] = table.default_value
        self._count(table, keys.size, unique.size, found_by_tier, seconds_by_tier, missing.size, errors)
        return vectors[inverse]

    @staticmethod
    def _fetch(tier: _Tier, table: TableConfig, keys: np.ndarray, vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.empty((keys.size, table.dim), dtype=np.float32)
        found = tier.db.fetch(table.qualified_name, keys, out)
        vectors[rows[found]] = out[found]
        return found

    def _count(
        self,
        table: TableConfig,
        n_keys: int,
        n_unique: int,
        found: dict[str, int],
        seconds: dict[str, float],
        n_default: int,
        errors: int,
    ) -> None:
        with self._counters_lock:
            c = self._counters[table.name]
            c.keys += n_keys
            c.unique_keys += n_unique
            c.volatile_hits += found.get("volatile", 0)
            c.persistent_hits += found.get("persistent", 0)
            c.seconds_volatile += seconds.get("volatile", 0.0)
            c.seconds_persistent += seconds.get("persistent", 0.0)
            c.defaults += n_default
            c.tier_errors += errors
