"""The storage-tier contract shared by every volatile and persistent database.

HugeCTR puts every database behind one batched interface; so do we. A tier stores, per
table, a map ``int64 key -> float32[dim] vector``, each row packed in the table's row format
(:mod:`hps_core.row_formats`: fp32, fp16, fp8 or int8) and dequantised to float32 where it is
read, so callers see float32 rows whatever the format. Table names are qualified
(``hps_et.<model>.<table>``) so tiers can be shared between models and processes.

Every call is batched and fills caller-provided arrays: ``fetch`` writes the rows it finds
into ``out`` and returns a boolean mask; misses leave ``out`` untouched so the caller can
hand just the compacted misses to the next tier. ``fetch_tables`` does the same for keys of
several tables in ONE call — a lookup asks each tier once per batch, whatever its table
count — writing rows of different widths into one flat buffer (the layout of
:mod:`hps_core.rows`).

Input checks live here, in one place, so every implementation rejects the same inputs
with the same :class:`~hps_core.errors.RequestError` before it writes anything: a batch is
either stored whole or refused whole, never half-written because of a malformed argument.
:class:`TierBase`, the base class of every tier, runs them in the public methods and hands
the tier's own ``_insert``, ``_fetch``, ... arguments already checked.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from hps_core.arrays import Flat, Keys, Mask, Vectors
from hps_core.errors import ConfigError, RequestError, UnknownTableError
from hps_core.row_formats import RowFormat
from hps_core.rows import check_rows_fit

__all__ = [
    "BulkLoad",
    "DiskUsage",
    "DropTable",
    "EmbeddingTier",
    "HostSharedTables",
    "MarkerState",
    "MemoryUsage",
    "PartitionMarkers",
    "PersistentDB",
    "Refreshable",
    "SharedTier",
    "TableMetadata",
    "TableGroups",
    "TierBase",
    "VolatileDB",
    "check_dim",
    "check_keys",
    "check_out",
    "check_row_format",
    "format_mismatch",
    "check_table_batch",
    "check_table_name",
    "check_values",
    "unknown_table",
]

@runtime_checkable
class EmbeddingTier(Protocol):
    """Batched key -> vector store; the contract every database tier implements.

    Arrays are host (NumPy) arrays. ``keys`` is ``(n,) int64`` (``uint32`` is accepted and
    widened); ``values`` and ``out`` are ``(n, dim) float32``, C-contiguous, where ``dim``
    is the table's vector size.
    """

    def create_table(self, table: str, dim: int, row_format: RowFormat = RowFormat.FP32) -> None:
        """Create ``table`` holding ``dim``-wide vectors stored in ``row_format``.

        Idempotent for the same ``dim`` and format; a different ``dim`` or format for an
        existing table (one this tier stored before, in another process too) raises
        ConfigError naming both (:func:`format_mismatch`). A table stored before formats
        existed is fp32.
        """
        ...

    def row_format(self, table: str) -> RowFormat:
        """The format ``table``'s rows are stored in."""
        ...

    def insert(self, table: str, keys: Keys, values: Vectors) -> None:
        """Upsert ``values[i]`` under ``keys[i]``, packed in the table's row format.

        keys: (n,) int64 (or uint32). values: (n, dim) float32, C-contiguous.
        Duplicate keys inside one batch: the last occurrence wins. A row the format cannot
        store (NaN, infinity, out of range) refuses the whole batch with RowValueError
        before anything is written.
        """
        ...

    def fetch(self, table: str, keys: Keys, out: Vectors) -> Mask:
        """Look ``keys`` up; write each found row into ``out`` and return the found mask.

        keys: (n,) int64 (or uint32). out: (n, dim) float32, C-contiguous, writeable;
        rows of keys not found are left untouched. Returns (n,) bool, True where found.
        """
        ...

    def fetch_tables(
        self, tables: Sequence[str], table_ids: Keys, keys: Keys, out: Flat, offsets: Keys
    ) -> Mask:
        """Look up keys of several tables at once; write each found row into ``out``.

        tables: the tables the batch may name, ``T`` of them (a tuple; a tier may keep what it
        resolved per tuple). table_ids: (n,) int64, key i belongs to ``tables[table_ids[i]]``.
        keys: (n,) int64 (or uint32). out: (m,) float32, C-contiguous, writeable. offsets:
        (n,) int64; the row of key i goes to ``out[offsets[i] : offsets[i] + dim]``, ``dim``
        its table's width. Rows of keys not found are left untouched; rows must not overlap.
        Returns (n,) bool, True where found. An unknown table raises UnknownTableError.
        """
        ...

    def count(self, table: str) -> int:
        """Number of distinct keys stored in ``table``."""
        ...

    def table_names(self) -> list[str]:
        """Names of the tables this tier holds, sorted."""
        ...

    def dim(self, table: str) -> int:
        """Vector width of ``table``."""
        ...

    def close(self) -> None:
        """Release memory and handles; further calls raise TierError. Idempotent."""
        ...


@runtime_checkable
class VolatileDB(EmbeddingTier, Protocol):
    """Role: the in-memory tier (CPU hash map, Redis Cluster) between cache and disk."""


@runtime_checkable
class PersistentDB(EmbeddingTier, Protocol):
    """Role: the durable tier holding full tables (RocksDB on local SSD)."""


# --------------------------------------------------------------------------- optional capabilities


@dataclass(frozen=True)
class MarkerState:
    """What one probe of the load markers found (:meth:`PartitionMarkers.check_markers`).

    ``missing``: per table, the partitions whose marker is gone (their node lost its data);
    ``meta_missing``: the table metadata is gone (the node holding it lost its data);
    ``unknown``: markers not checked because their node did not answer.
    """

    missing: dict[str, list[int]]
    meta_missing: bool
    unknown: int


@runtime_checkable
class PartitionMarkers(Protocol):
    """Optional tier capability: per-partition load markers and refill locks, for a shared
    tier whose nodes can lose their data (Redis; see ``hps_core/db/redis_refill.py``).

    A marker per (table, partition) says the partition's rows were loaded, and is lost
    with them. Callers check for the capability with ``isinstance``, never by probing names.
    """

    @property
    def num_partitions(self) -> int: ...

    def create_table(self, table: str, dim: int, row_format: RowFormat = RowFormat.FP32) -> None: ...

    def mark_loaded(self, table: str, partitions: Iterable[int] | None = None) -> None:
        """Write the load marker of ``partitions`` of ``table`` (all by default)."""
        ...

    def check_markers(self, tables: Sequence[str]) -> MarkerState:
        """Which partitions of ``tables`` lost their marker (a node that does not answer is
        ``unknown``, not lost)."""
        ...

    def claim_partitions(self, table: str, partitions: Sequence[int], token: str, lock_s: float) -> list[int]:
        """Take the refill lock of each of ``partitions`` for ``lock_s`` seconds; return those
        taken whose marker is still missing (the others' locks are released)."""
        ...

    def release_partitions(self, table: str, partitions: Sequence[int], token: str) -> None:
        """Release the refill locks of ``partitions`` that ``token`` holds."""
        ...

    def insert_missing(self, table: str, keys: Keys, values: Vectors) -> None:
        """As ``insert``, but a key already stored keeps its row (a refill must not overwrite
        a newer one). keys: (n,) int64. values: (n, dim) float32, C-contiguous."""
        ...

    def new_token(self) -> str:
        """A token naming this process's refill locks."""
        ...


@runtime_checkable
class BulkLoad(Protocol):
    """Optional tier capability: a write path for loading many rows at once (RocksDB: one
    SST file ingested atomically). The loader prefers it to ``insert``."""

    def bulk_load(self, table: str, keys: Keys, values: Vectors) -> int:
        """Upsert the rows, all or none; a key repeated in the batch keeps its last row.
        keys: (n,) int64. values: (n, dim) float32, C-contiguous. Returns rows written."""
        ...


@runtime_checkable
class HostSharedTables(Protocol):
    """Optional tier capability: tables every process on the host maps (the host store,
    ``hps_core/db/shared_hash_map.py``). A table is filled once per host, by the first process
    that opens it, while the others wait and then attach; the loader fills through this."""

    def open_table(self, table: str, dim: int, row_format: RowFormat = RowFormat.FP32, *, rows: int = 0,
                   source: str = "", fill: Callable[[Callable[[Keys, Vectors], None]], None] | None = None
                   ) -> bool:
        """Attach to ``table``, or create it with room for ``rows`` and run ``fill(write)``
        (``write(keys, values)`` per chunk) before anyone attaches. ``source`` identifies what
        fills it (a complete table of another source is not reused). True when filled here."""
        ...

    def generation(self, tables: Sequence[str]) -> str:
        """An identity of ``tables``' stores, the same in every process attached to them, that
        changes whenever one of them is built anew (so an update consumer group named after it
        replays the stream into a fresh store, and resumes over a reused one)."""
        ...


@runtime_checkable
class DropTable(Protocol):
    """Optional tier capability: remove a table, its rows and its metadata, for good.

    What removes an unloaded model version's tables (``hps_et.<model>_v<N>.<table>``) from a
    tier other processes share (docs/deployment.md, "Model versions and runtime loading"). After
    it the table is unknown to this handle and to any process that opens the tier afterwards, and
    ``create_table`` starts it again empty, in any width and format. A partial failure leaves the
    table listed, so the drop can be repeated. Processes that still serve the table must be
    stopped first: what they see of it afterwards is undefined (a handle with the table cached
    reads misses, or rows it had opened).
    """

    def drop_table(self, table: str) -> int:
        """Delete ``table``: every row, its width, format and load bookkeeping. Returns the
        rows dropped (RocksDB: its estimate). Unknown table: ``UnknownTableError``; a handle that
        cannot write (read-only RocksDB): ``TierError``."""
        ...


@runtime_checkable
class DiskUsage(Protocol):
    """Optional tier capability: what a table takes on disk, cheaply (``hps inspect``)."""

    def estimate_rows(self, table: str) -> int:
        """About how many rows ``table`` holds (the store's own estimate, not a count)."""
        ...

    def disk_bytes(self, table: str) -> int:
        """Bytes of ``table`` on disk."""
        ...


@runtime_checkable
class MemoryUsage(Protocol):
    """Optional tier capability: the memory a table's rows take (``hps inspect``)."""

    def memory_bytes(self, table: str) -> int:
        """Bytes of memory ``table`` uses in the tier."""
        ...


@runtime_checkable
class TableMetadata(Protocol):
    """Optional tier capability: small named bookkeeping values stored beside the tables
    (the loader's resumable progress markers), written only by a writable handle."""

    @property
    def read_only(self) -> bool:
        """Whether ``put_meta`` is refused (a read-only or secondary handle)."""
        ...

    def get_meta(self, name: str) -> bytes | None:
        """The value stored under ``name``, or None."""
        ...

    def put_meta(self, name: str, value: bytes) -> None:
        """Store ``value`` under ``name``; TierError when ``read_only``."""
        ...

    def delete_meta(self, name: str) -> None:
        """Remove ``name`` (absent: nothing to do); TierError when ``read_only``."""
        ...


@runtime_checkable
class Refreshable(Protocol):
    """Optional tier capability: a handle that must be told to see what a writer in another
    process added since it opened (a RocksDB read-only or secondary handle)."""

    def refresh(self) -> None:
        """Catch up with the writer (tables created since included); cheap when nothing
        changed. A handle that sees its own writes does nothing."""
        ...


@runtime_checkable
class SharedTier(Protocol):
    """Optional tier capability: one store shared between servers (Redis), as HugeCTR's
    ``is_shared()``. Each update is applied by one process for all of them, and the tier is
    filled ahead (``hps load``) rather than by each process at start-up. The tier type's
    :attr:`~hps_core.config.TierType.shared` says the same before the tier is opened."""

    @property
    def address(self) -> str:
        """Where the shared store lives (``host:port,...``), for messages."""
        ...


# --------------------------------------------------------------------------- checks


def check_table_name(table: object) -> str:
    """A table name must be a non-empty string (RocksDB and Redis use it verbatim)."""
    if not isinstance(table, str) or not table:
        raise RequestError(f"table name must be a non-empty str, got {table!r}")
    return table


def check_dim(table: str, dim: object) -> int:
    """``dim`` from a config: a positive int (bools are rejected, they are ints too)."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ConfigError(f"table {table!r}: vector size must be a positive integer, got {dim!r}")
    return int(dim)


def check_row_format(table: str, row_format: object) -> RowFormat:
    """``row_format`` of a ``create_table`` call: a :class:`RowFormat` (ConfigError otherwise)."""
    if not isinstance(row_format, RowFormat):
        raise ConfigError(f"table {table!r}: row_format must be a RowFormat, got {row_format!r}")
    return row_format


def format_mismatch(
    table: str, where: str, stored: RowFormat, asked: RowFormat, *, unformatted: bool = False
) -> ConfigError:
    """The error for a table stored in one row format and opened in another (``where``: the
    tier, for the message). ``unformatted``: the tier holds the table's rows but no stored
    format (written by HugeCTR or a version before formats), so they are fp32."""
    why = (
        " (it holds rows written without a row format, by HugeCTR or an older version of this "
        "server: such rows are HugeCTR's fp32)"
        if unformatted
        else ""
    )
    return ConfigError(
        f"table {table!r} in {where} stores {stored} rows{why}, but {asked} was asked for (the model's "
        f"embedding_format_per_table or fp8_quant); serve it as {stored}, or drop the table and "
        f"load it again as {asked} (hps load)"
    )


def unknown_table(table: str, known: Iterable[str]) -> UnknownTableError:
    """The error for a table this tier does not hold, listing the ones it does."""
    names = sorted(known)
    shown = ", ".join(repr(n) for n in names[:10]) + (", ..." if len(names) > 10 else "")
    return UnknownTableError(
        f"table {table!r} does not exist in this tier (tables: {shown or 'none'}); "
        "create it with create_table(table, dim) first"
    )


def check_keys(table: str, keys: object) -> Keys:
    """Keys as a contiguous (n,) int64 array; uint32 keys are widened (HugeCTR's
    ``supportlonglong: false``), any other dtype is refused rather than guessed at."""
    if not isinstance(keys, np.ndarray):
        kind = type(keys).__name__
        raise RequestError(f"table {table!r}: keys must be a numpy array, got {kind}")
    if keys.ndim != 1:
        raise RequestError(f"table {table!r}: keys must be 1-D, got shape {keys.shape}")
    if keys.dtype == np.uint32:
        return keys.astype(np.int64)
    if keys.dtype != np.int64:
        raise RequestError(
            f"table {table!r}: keys must be int64 (or uint32), got {keys.dtype}; "
            "convert with keys.astype(np.int64)"
        )
    return np.ascontiguousarray(keys)


def _check_rows(table: str, name: str, arr: object, n: int, dim: int) -> Vectors:
    if not isinstance(arr, np.ndarray):
        kind = type(arr).__name__
        raise RequestError(f"table {table!r}: {name} must be a numpy array, got {kind}")
    if arr.dtype != np.float32:
        raise RequestError(
            f"table {table!r}: {name} must be float32, got {arr.dtype}; "
            "convert with .astype(np.float32)"
        )
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise RequestError(
            f"table {table!r} holds {dim}-wide vectors: {name} must have shape ({n}, {dim}), "
            f"got {arr.shape}"
        )
    if arr.shape[0] != n:
        raise RequestError(
            f"table {table!r}: {name} has {arr.shape[0]} rows for {n} keys; they must match"
        )
    return arr


def check_values(table: str, values: object, n: int, dim: int) -> Vectors:
    """Values to insert: (n, dim) float32, made C-contiguous (a copy only if it was not)."""
    return np.ascontiguousarray(_check_rows(table, "values", values, n, dim))


def check_out(table: str, out: object, n: int, dim: int) -> Vectors:
    """The output buffer of a fetch: (n, dim) float32, C-contiguous and writeable, because
    rows are written into it in place (a silent copy would lose them)."""
    arr = _check_rows(table, "out", out, n, dim)
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        raise RequestError(f"table {table!r}: out must be a writeable C-contiguous array")
    return arr


def check_table_batch(
    what: str, dims: Keys, table_ids: object, keys: object, out: object, offsets: object, *, bounds: bool = True
) -> tuple[Keys, Keys, Flat, Keys]:
    """The arrays of a ``fetch_tables`` call, checked: ``dims`` (T,) int64 are the widths of
    its tables; returns ``(table_ids, keys, out, offsets)`` as contiguous int64 / float32.

    Refuses wrong types and dtypes, lengths that differ, a non-writeable or non-contiguous
    ``out``, and (with ``bounds``; a tier whose kernel checks them itself before it writes
    passes False) table ids out of range and rows that do not fit ``out`` (RequestError
    naming ``what`` and the position)."""
    keys = check_keys(what, keys)
    n = keys.shape[0]
    ids, offs = (_check_index(what, name, arr, n) for name, arr in (("table_ids", table_ids), ("offsets", offsets)))
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.ndim != 1:
        raise RequestError(f"{what}: out must be a 1-D float32 numpy array (rows of every table, flat)")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise RequestError(f"{what}: out must be a writeable C-contiguous array")
    if bounds:
        check_rows_fit(ids, offs, dims, out.shape[0], what)
    return ids, keys, out, offs


def _check_index(what: str, name: str, arr: object, n: int) -> Keys:
    if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype != np.int64:
        kind = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise RequestError(f"{what}: {name} must be a 1-D int64 numpy array, got {kind}")
    if arr.shape[0] != n:
        raise RequestError(f"{what}: {name} has {arr.shape[0]} entries for {n} keys; they must match")
    return np.ascontiguousarray(arr)


Resolved = TypeVar("Resolved")
_MAX_GROUPS = 256  # tuples remembered; a session passes one, always the same


class TableGroups(Generic[Resolved]):
    """What a tier works out for the tuple of table names a ``fetch_tables`` call names (their
    widths, where they live), once per tuple: a session passes the same tuple on every call, so
    a lookup costs no work per table here. ``resolve(names)`` does the tier's part (and raises
    UnknownTableError); :meth:`clear` forgets everything when the tier's tables change.
    """

    def __init__(self, resolve: Callable[[tuple[str, ...]], Resolved]) -> None:
        self._resolve = resolve
        self._known: dict[tuple[str, ...], Resolved] = {}
        self._lock = threading.Lock()

    def get(self, tables: Sequence[str]) -> Resolved:
        if isinstance(tables, str):
            raise RequestError(f"tables must be a sequence of table names, got the str {tables!r}")
        names = tables if isinstance(tables, tuple) else tuple(tables)
        try:
            return self._known[names]
        except KeyError:
            pass
        except TypeError as exc:  # an unhashable name
            raise RequestError(f"tables must be table names (str), got {names!r}") from exc
        resolved = self._resolve(tuple(check_table_name(t) for t in names))
        with self._lock:
            if len(self._known) >= _MAX_GROUPS:  # callers that build a new tuple per call
                self._known.clear()
            self._known[names] = resolved
        return resolved

    def clear(self) -> None:
        with self._lock:
            self._known.clear()


# --------------------------------------------------------------------------- the base class


Group = TypeVar("Group")


class TierBase(ABC, Generic[Group]):
    """The public contract of :class:`EmbeddingTier`, validated once: every tier derives from
    it and implements ``_create_table``, ``_insert``, ``_fetch`` and ``_fetch_tables``, which
    receive arguments already checked (keys contiguous int64, uint32 widened; values and
    ``out`` of the table's width) and do no checking of their own.

    A tier provides two hooks: :meth:`_check_open` (TierError once closed) and
    :meth:`_dim_of` (the table's width; TierError when closed, UnknownTableError when it does
    not hold the table), and :meth:`_tables_of` for ``fetch_tables`` (the widths of a tuple of
    tables and what the tier resolved for it, :class:`TableGroups`).

    Class attributes say how a tier checks, which differs on purpose:

    ``_label``
        names the tier in ``fetch_tables``' errors (``"<label> fetch_tables: ..."``).
    ``_kernel_bounds``
        True where ``_fetch_tables``' kernel checks table ids and row bounds itself before it
        writes anything (the hash maps), so they are not checked twice.
    ``_strict_names``
        True for a tier that uses a table's name verbatim in commands it sends (Redis): every
        call checks that the tier is open and that the name is a non-empty str first, and a
        batch's keys before the table is looked up (the lookup may be a round trip to the
        metadata node, which a malformed batch then does not cost). The other tiers look a name
        up in their own dict first, so a name they do not hold is an UnknownTableError.
    """

    _label: ClassVar[str]
    _kernel_bounds: ClassVar[bool] = False
    _strict_names: ClassVar[bool] = False

    # ---------------------------------------------------------------- the contract, checked here

    def create_table(self, table: str, dim: int, row_format: RowFormat = RowFormat.FP32) -> None:
        self._create_table(*self._table_shape(table, dim, row_format))

    def insert(self, table: str, keys: Keys, values: Vectors) -> None:
        self._insert(*self._rows_in(table, keys, values))

    def fetch(self, table: str, keys: Keys, out: Vectors) -> Mask:
        table, keys, dim = self._table_keys(table, keys)
        return self._fetch(table, keys, check_out(table, out, keys.shape[0], dim))

    def fetch_tables(
        self, tables: Sequence[str], table_ids: Keys, keys: Keys, out: Flat, offsets: Keys
    ) -> Mask:
        if self._strict_names:
            self._check_open()
        dims, group = self._tables_of(tables)
        ids, keys, out, offsets = check_table_batch(
            f"{self._label} fetch_tables", dims, table_ids, keys, out, offsets, bounds=not self._kernel_bounds
        )
        return self._fetch_tables(group, ids, keys, out, offsets)

    @abstractmethod
    def row_format(self, table: str) -> RowFormat: ...

    @abstractmethod
    def count(self, table: str) -> int: ...

    @abstractmethod
    def table_names(self) -> list[str]: ...

    @abstractmethod
    def dim(self, table: str) -> int: ...

    @abstractmethod
    def close(self) -> None: ...

    # ---------------------------------------------------------------- what each tier implements

    @abstractmethod
    def _check_open(self) -> None:
        """Raise TierError when the tier is closed."""

    @abstractmethod
    def _dim_of(self, table: str) -> int:
        """``table``'s width: TierError when closed, UnknownTableError when not held."""

    @abstractmethod
    def _tables_of(self, tables: Sequence[str]) -> tuple[Keys, Group]:
        """The widths ``(T,) int64`` of ``tables`` and what the tier resolved for them
        (UnknownTableError for a table it does not hold)."""

    @abstractmethod
    def _create_table(self, table: str, dim: int, row_format: RowFormat) -> None:
        """``create_table`` with a checked name, width and format."""

    @abstractmethod
    def _insert(self, table: str, keys: Keys, values: Vectors) -> None:
        """``insert`` of checked keys (n,) int64 and values (n, dim) float32, C-contiguous."""

    @abstractmethod
    def _fetch(self, table: str, keys: Keys, out: Vectors) -> Mask:
        """``fetch`` of checked keys into a checked ``out`` (n, dim) float32."""

    @abstractmethod
    def _fetch_tables(self, group: Group, table_ids: Keys, keys: Keys, out: Flat, offsets: Keys) -> Mask:
        """``fetch_tables`` with checked arrays, ``group`` from :meth:`_tables_of`."""

    # ---------------------------------------------------------------- checks for the tiers' extras

    def _checked_name(self, table: object) -> str:
        """The name of a table a call names, for a tier with ``_strict_names``: closed first,
        then the name."""
        self._check_open()
        return check_table_name(table)

    def _table_shape(self, table: str, dim: object, row_format: object) -> tuple[str, int, RowFormat]:
        """The arguments of ``create_table`` (and of an ``open_table``), checked."""
        if self._strict_names:
            self._check_open()
        table = check_table_name(table)
        return table, check_dim(table, dim), check_row_format(table, row_format)

    def _rows_in(self, table: str, keys: Keys, values: Vectors) -> tuple[str, Keys, Vectors]:
        """The arguments of a write of rows (``insert`` and a tier's other writes), checked."""
        table, keys, dim = self._table_keys(table, keys)
        return table, keys, check_values(table, values, keys.shape[0], dim)

    def _table_keys(self, table: str, keys: Keys) -> tuple[str, Keys, int]:
        """A batch's table and keys, checked in the tier's order (``_strict_names``), and the
        table's width."""
        if self._strict_names:
            table = self._checked_name(table)
            keys = check_keys(table, keys)
            return table, keys, self._dim_of(table)
        dim = self._dim_of(table)
        return table, check_keys(table, keys), dim

    def _keys_in(self, table: str, keys: Keys) -> Keys:
        """The keys of a call naming ``table`` and keys only (``remove``), checked after the
        table is looked up."""
        self._dim_of(table)
        return check_keys(table, keys)

    @staticmethod
    def _batch_in(table: str, keys: Keys, values: Vectors, dim: int) -> tuple[Keys, Vectors]:
        """A chunk of rows for a table not held yet (a fill), its width given: checked."""
        keys = check_keys(table, keys)
        return keys, check_values(table, values, keys.shape[0], dim)
