"""Apply decoded update batches into a storage tier (the callback side of an UpdateSource).

:class:`UpdateApplier` is the contract an :class:`~hps_core.updates.source.UpdateSource`
drives: ``dim(table)`` says whether a table is deployed (and its width, to check messages
against), ``apply(table, keys, values)`` upserts one batch and raises on failure. What the
source does then depends on the error (:data:`APPLY_RETRYABLE`, stated here):

- TierError or DeviceMemoryError (the tier down or busy, the GPU out of memory): it backs off
  ``failure_backoff_ms`` and re-applies the same batch until it passes or the source stops
  (updates are idempotent upserts, so a repeat is harmless);
- any other HPSError (the tier refuses these rows: ConfigError, RequestError, MalformedMessage,
  a RowValueError for a row the table's row format cannot store):
  the batch is skipped and counted in ``rejected_updates``, like a malformed message;
- anything else (another DeviceError too: an illegal memory access) is a bug: the source stops (``stats()``: ``running`` false, ``stopped_by``)
  without committing the batch's offsets, so a restarted source re-reads it.

:class:`TierUpdateApplier` applies into any :class:`~hps_core.db.base.EmbeddingTier`
(``insert(table, keys, values)``), then calls ``on_applied(table, keys, values)``: the hook
through which the serving side refreshes cached rows.

Row formats. Updates arrive as float32 rows (HugeCTR's wire format) whatever the table's row
format; the tier's insert packs them. The applier creates a table it writes first in the
format it was given with the widths (``row_formats``, from the same model tables), so an
update never creates an fp32 table the model serves as int8. A row the format cannot store (a
NaN, an infinity, a float16 overflow) refuses the batch with a RowValueError naming the table
and the key: a RequestError, so the source skips it into ``rejected_updates`` and logs it,
rate-limited; it is never retried. (An UpdateSource refuses a message holding a NaN or an
infinity whole before it reaches an applier, whatever the format; what is left to this guard
is a float16 overflow, and callers that apply without a source.)

RocksDB and its write lock. Serving processes open RocksDB read-only; only one process may
hold the writer. Two ways to apply into it, both supported:

- ``TierUpdateApplier(writer_db, dims)``: the caller owns an already-open writer for the
  applier's lifetime (simplest, fastest: no open per batch). Use it when the process that
  consumes updates is the one RocksDB writer (e.g. a dedicated updater, or ``hps serve``'s
  parent process).
- ``TierUpdateApplier.opening(factory, dims)``: ``factory()`` opens the writer for each
  batch and the applier closes it right after, so the write lock is held only while a batch
  is written and other processes (a loader, another applier) can take turns. A busy lock
  (:class:`~hps_core.errors.TierBusyError`) is retried ``busy_retries`` times here, then
  raised, and the source's own backoff retries the batch later. Opening costs milliseconds
  per batch (it reopens every column family): fine at the source's batch sizes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from hps_core.arrays import Keys, Vectors
from hps_core.db.base import EmbeddingTier, check_dim, check_row_format
from hps_core.errors import (
    ConfigError,
    DeviceError,
    DeviceMemoryError,
    HPSError,
    RowValueError,
    TierBusyError,
    TierError,
)
from hps_core.logs import RateLimitedLog
from hps_core.retry import RetryPolicy
from hps_core.row_formats import RowFormat

__all__ = ["OnApplied", "TierUpdateApplier", "UpdateApplier"]

log = logging.getLogger(__name__)
# A hook that fails, fails for every batch (a cache gone bad): one line per cause per interval.
_failures = RateLimitedLog(log)

OnApplied = Callable[[str, Keys, Vectors], None]

#: The errors of an apply worth another attempt, retried every failure_backoff_ms until the
#: source stops: the tier down or busy, the GPU out of memory refreshing a cache. Any other
#: DeviceError (an illegal memory access: it would fail forever) stops the source like a bug;
#: any other HPSError rejects the slice; any other error is a bug and stops the source.
#: Stated here, where both the applier (its hook lets these through) and the source (its
#: apply policy; re-exported as ``hps_core.updates.source.APPLY_RETRYABLE``) read it.
APPLY_RETRYABLE: tuple[type[HPSError], ...] = (TierError, DeviceMemoryError)
# What the on_applied hook lets through: the retryable set, and a GPU broken for good (stops the source).
_HOOK_PROPAGATES: tuple[type[HPSError], ...] = (*APPLY_RETRYABLE, DeviceError)


@runtime_checkable
class UpdateApplier(Protocol):
    """What an UpdateSource hands decoded batches to."""

    def dim(self, table: str) -> int | None:
        """Vector width of ``table`` (a qualified ``hps_et.<model>.<table>`` name), or None
        when this applier does not serve it (the source counts such a message as malformed)."""
        ...

    def apply(self, table: str, keys: Keys, values: Vectors) -> None:
        """Upsert keys (n,) int64 → values (n, dim) float32. Raise TierError or DeviceMemoryError
        to have it retried, another HPSError to have it skipped (see the module docstring)."""
        ...


class TierUpdateApplier:
    """Upserts update batches into one EmbeddingTier, then calls ``on_applied``.

    Args:
        db: the tier to write (an open writer for RocksDB); None when ``db_factory`` is given.
        table_dims: qualified table name → vector width; only these tables are applied.
        row_formats: qualified table name → the row format a table is created in (the
            model's ``TableConfig.row_format``); a table left out is fp32, the format of every
            table stored before formats existed.
        on_applied: called as ``on_applied(table, keys, values)`` after each successful
            insert (the cache-refresh hook). An :data:`APPLY_RETRYABLE` error from it (the
            GPU out of memory) propagates, so the source retries the whole batch and the
            cache does not keep stale rows, and so does any other DeviceError (the source
            stops); any other exception is logged and counted, never retried: the tier
            already holds the rows.
        db_factory: instead of ``db``, opens the tier per batch (see :meth:`opening`).
        busy_retries, busy_backoff_ms: with ``db_factory``, how often and how far apart a
            TierBusyError open is retried before it is raised.
    """

    def __init__(self, db: EmbeddingTier | None, table_dims: Mapping[str, int],
                 on_applied: OnApplied | None = None, *,
                 row_formats: Mapping[str, RowFormat] | None = None,
                 db_factory: Callable[[], EmbeddingTier] | None = None,
                 busy_retries: int = 20, busy_backoff_ms: float = 50.0) -> None:
        if (db is None) == (db_factory is None):
            raise ConfigError("TierUpdateApplier needs exactly one of db (an open tier) and db_factory")
        self._db = db
        self._factory = db_factory
        pause = float(busy_backoff_ms) / 1000.0
        self._busy = RetryPolicy(retryable=(TierBusyError,), first_backoff_s=pause, factor=1.0,
                                 max_backoff_s=pause, max_attempts=int(busy_retries) + 1)
        self._dims = {table: check_dim(table, dim) for table, dim in table_dims.items()}
        formats = dict(row_formats or {})
        if unknown := sorted(set(formats) - set(self._dims)):
            raise ConfigError(f"TierUpdateApplier: row_formats names tables without a width: {unknown}")
        self._formats = {table: check_row_format(table, formats.get(table, RowFormat.FP32)) for table in self._dims}
        self._on_applied = on_applied
        self._created: set[str] = set()
        self._lock = threading.Lock()
        self.applied_updates = 0  # rows inserted so far
        self.hook_errors = 0  # on_applied calls that raised

    @classmethod
    def opening(cls, db_factory: Callable[[], EmbeddingTier], table_dims: Mapping[str, int],
                on_applied: OnApplied | None = None, *, row_formats: Mapping[str, RowFormat] | None = None,
                busy_retries: int = 20, busy_backoff_ms: float = 50.0) -> TierUpdateApplier:
        """An applier that opens the tier with ``db_factory()`` per batch and closes it after
        (RocksDB: hold the write lock only while writing). TierBusyError is retried
        ``busy_retries`` times, ``busy_backoff_ms`` apart, then raised."""
        return cls(None, table_dims, on_applied, row_formats=row_formats, db_factory=db_factory,
                   busy_retries=busy_retries, busy_backoff_ms=busy_backoff_ms)

    @property
    def table_dims(self) -> dict[str, int]:
        return dict(self._dims)

    @property
    def row_formats(self) -> dict[str, RowFormat]:
        """Qualified table name → the row format the table is created in."""
        return dict(self._formats)

    def dim(self, table: str) -> int | None:
        return self._dims.get(table)

    def apply(self, table: str, keys: Keys, values: Vectors) -> None:
        """Upsert one batch into the tier (creating the table on first use), then the hook.

        A table outside ``table_dims`` raises KeyError (an UpdateSource checks ``dim`` first,
        so it never does). Tier errors (TierError, TierBusyError) propagate; a row the table's
        format cannot store raises RowValueError naming the table and the row's key (nothing of
        the batch is stored).
        """
        dim = self._dims[table]
        with self._lock:  # one writer at a time; a RocksDB factory open is not re-entrant
            if self._factory is None:
                assert self._db is not None
                self._insert(self._db, table, dim, keys, values)
            else:
                db = self._open_writer()
                try:
                    self._created.discard(table)  # a fresh handle: make sure again
                    self._insert(db, table, dim, keys, values)
                finally:
                    db.close()
            self.applied_updates += int(keys.shape[0])
        self._notify(table, keys, values)

    # ---------------------------------------------------------------- internals

    def _insert(self, db: EmbeddingTier, table: str, dim: int, keys: Keys, values: Vectors) -> None:
        if table not in self._created:
            db.create_table(table, dim, self._formats[table])  # idempotent; another stored format: ConfigError
            self._created.add(table)
        try:
            db.insert(table, keys, values)
        except RowValueError as exc:
            at = f"the row of key {int(keys[exc.position])}" if 0 <= exc.position < keys.shape[0] else "a row"
            raise RowValueError(f"update of {table} ({self._formats[table]}): {at} cannot be stored: {exc}",
                                position=exc.position) from exc

    def _open_writer(self) -> EmbeddingTier:
        assert self._factory is not None
        return self._busy.call(self._factory)

    def _notify(self, table: str, keys: Keys, values: Vectors) -> None:
        if self._on_applied is None:
            return
        try:
            self._on_applied(table, keys, values)
        except _HOOK_PROPAGATES:  # the cache would keep stale rows: the source
            raise  # retries the batch (a repeated upsert, harmless), or stops on a broken GPU
        except Exception as exc:  # the rows are in the tier; a refresh that will not pass is logged
            self.hook_errors += 1
            _failures.failure(f"on_applied hook failed for updates of {table}", exc)
