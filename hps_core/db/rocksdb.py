"""Persistent tier: RocksDB on local disk, through the ``rocksdict`` binding.

On-disk layout, HugeCTR's, so a database written by either can be read by the other:

- one column family per table, named as the table (``hps_et.<model>.<table>``);
- key: the int64 key, 8 bytes little-endian; value: the row packed in the table's row
  format (``hps_core.row_formats``): fp32 is the float32 vector, ``4 * dim`` bytes, as
  HugeCTR writes it; int8 is ``8 + dim`` bytes.

Our only addition is two metadata keys per table in the ``default`` column family,
``hps.dim.<table>`` → the vector size as ASCII and ``hps.format.<table>`` → the row format's
code (``RowFormat.code``) as ASCII, written together (one WriteBatch) when the table is
created, so a reopened database (a secondary or read-only handle too) knows each table's
``dim`` and format without being told, and a handle asking for another format is refused
(ConfigError naming both). A table without a format key (written by HugeCTR or an older
version) is fp32; a column family without a dim key (a HugeCTR-written database) gets its
``dim`` from the size of its first value.

The binding takes Python ``bytes``: keys and packed rows (``hps_core.row_formats.pack``,
once per batch) are turned into lists of ``bytes`` with one vectorised
``view(...).tolist()``, and fetch results come back as a list that is joined once and
dequantised into the caller's buffer by one ``hps_core.rows.unpack_stored``. The per-key
calls that remain are the binding's (``WriteBatch.put`` has no batch form).

``fetch_tables`` (keys of all a lookup's tables in one call; ``fetch`` is its one-table
case) groups the batch by table with NumPy, asks each table's column family with ONE list
``get`` (chunked by ``max_get_batch_size``) in bytewise key order, and decodes all the
values, of every width, with one join. The loop over column families remains because it is
the binding's floor, like ``WriteBatch.put``: rocksdict 0.3's ``get(list)`` reads the one
column family of the view it is called on, and it exposes no cross-family multi-get
(RocksDB's ``MultiGet`` with a handle per key). The per-family gets are spread over the
read pool together, packed into one task per thread, so a small table costs no hand-off
of its own.

Modes (one process at a time may hold the write lock; any number may read beside it):

- read-write (default): the loader's mode.
- ``read_only=True``: no write lock; sees the data as of the moment it opened (or of the
  last :meth:`RocksDBPersistentDB.refresh`, which reopens). Writes and new tables are refused.
- ``secondary_path=DIR``: a RocksDB *secondary* instance (its own info log and state in
  ``DIR``); :meth:`~RocksDBPersistentDB.refresh` calls ``try_catch_up_with_primary`` and
  the handle sees what the writer added since, WAL included, without reopening. This is
  what a serving process uses to follow online updates. Read-only too.

Reads: rocksdict releases the GIL inside a multi-get (measured: a Python thread kept 75%
of its speed during one), so a fetch splits a large batch over a pool of
``min(num_threads, CPU count)`` threads: 187k → 323k keys/s with 2 threads on 2 cores.

Bulk loads: :meth:`~RocksDBPersistentDB.bulk_load` sorts the rows by their byte encoding,
writes one SST file with ``SstFileWriter`` and ingests it (``ingest_external_file``, moved
not copied): atomic (all rows or none), no write-ahead log, no memtable flushes or
compaction stalls. Loader bookkeeping (``hps.load.<table>``) lives beside the dims in the
default column family (:meth:`~RocksDBPersistentDB.get_meta`, ``put_meta``).

Crash safety (a writer SIGKILLed at any point leaves a store that opens). RocksDB's MANIFEST is
the commit point of a family created or dropped; the ``OPTIONS-*`` file rocksdict would open the
families of is written after it, so every open names the families from the MANIFEST instead
(``_manifest_families``, logged when the two disagree). :meth:`~RocksDBPersistentDB.drop_table`
removes the load marker, then the family, then dim and format; a read-write open removes the
metadata of a table whose family is gone and the SST files of a bulk load never ingested.

rocksdict raises a bare ``Exception`` for every RocksDB status (IO error, lock held, read-only,
missing column family) and ``DbClosedError`` for a closed handle; every call into it is
wrapped and those, only, are re-raised as :class:`~hps_core.errors.TierError` naming the
operation, the table and the path. Anything else (a TypeError, AttributeError, ... from a bug
here, or rocksdict's KeyError for a key of the wrong type) propagates unchanged: a bug is not
a tier failure to retry.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rocksdict import (
    AccessType,
    BlockBasedOptions,
    DbClosedError,
    IngestExternalFileOptions,
    Options,
    Rdict,
    SstFileWriter,
    WriteBatch,
    WriteOptions,
)

from hps_core.arrays import Flat, Keys, Mask, Vectors
from hps_core.db.base import TableGroups, TierBase, format_mismatch, unknown_table
from hps_core.config import PersistentDBConfig
from hps_core.errors import ConfigError, StoredWidthError, TierBusyError, TierError
from hps_core.grouping import group_by
from hps_core.row_formats import RowFormat, format_codes
from hps_core.row_codecs import pack
from hps_core.rows import row_sizes, unpack_stored

__all__ = ["RocksDBPersistentDB"]

log = logging.getLogger(__name__)


_DIM_PREFIX = b"hps.dim."
_FORMAT_PREFIX = b"hps.format."  # absent: fp32 (HugeCTR's tables, ours before formats)
_META_PREFIX = b"hps."
_MIN_KEYS_PER_THREAD = 256  # ~2 ms of reads each: far above the ~50 us a thread hand-off costs
_INGEST_DIR = ".hps_ingest"  # SST files being written, inside the DB folder (same file system)
_sst_ids = itertools.count()
_DEFAULT_CF = "default"
_LOAD_PREFIX = b"hps.load."  # the loader's progress marker (hps_core/loader.py marker_name)
_TABLE_META_KINDS = (_DIM_PREFIX, _FORMAT_PREFIX, _LOAD_PREFIX)  # keys named after a table
_OPEN_ATTEMPTS = 5  # a reader re-lists the families this often when a writer drops one meanwhile
_OPTIONS_FAMILY = re.compile(r'^\[CFOptions "(.*)"\]\s*$', re.MULTILINE)
_BLOOM_BITS_PER_KEY = 10  # ~1% false positives: misses (frequent in a cascade) skip the disk

_Piece = tuple[int, int, int]  # (table index, start, stop) of a multi-get, in the sorted batch


@dataclass(frozen=True)
class _Group:
    """What fetch_tables needs of a tuple of tables: names, (T,) widths, format codes and
    stored row bytes, column-family views."""

    names: tuple[str, ...]
    dims: Keys
    codes: Keys
    sizes: Keys
    families: list[Rdict]


def _options(num_threads: int, *, create: bool) -> Options:
    """raw_mode: bytes in, bytes out (rocksdict pickles otherwise). Bloom filters because a
    lookup cascade asks the persistent tier for many keys it does not have."""
    opts = Options(raw_mode=True)
    opts.create_if_missing(create)
    opts.increase_parallelism(num_threads)
    table = BlockBasedOptions()
    table.set_bloom_filter(_BLOOM_BITS_PER_KEY, False)
    opts.set_block_based_table_factory(table)
    return opts


def _key_bytes(keys: Keys) -> list[bytes]:
    """(n,) int64 → n 8-byte little-endian ``bytes``. A void view, not ``S8``: ``S8``
    would strip trailing zero bytes (key 1 → b'\\x01')."""
    as_bytes: list[bytes] = np.ascontiguousarray(keys, dtype="<i8").view("V8").tolist()
    return as_bytes


def _row_bytes(packed: npt.NDArray[np.uint8]) -> list[bytes]:
    """(n, row_bytes) uint8 packed rows (``hps_core.row_formats.pack``) → n ``bytes``."""
    rows = np.ascontiguousarray(packed, dtype=np.uint8)
    as_bytes: list[bytes] = rows.view(np.dtype((np.void, rows.shape[1]))).reshape(-1).tolist()
    return as_bytes


def _byte_order(table_ids: Keys, keys: Keys, num_tables: int) -> Keys:
    """Positions of the batch grouped by table and, inside a table, in RocksDB's bytewise key
    order (consecutive lookups then share index and data blocks: about 1.3x faster than
    random order). Little-endian bytes compare like the same bytes read as a big-endian
    number."""
    order = np.argsort(np.ascontiguousarray(keys, dtype="<i8").view(">u8"), kind="stable")
    if num_tables > 1:  # a stable grouping, so the byte order holds inside each table
        by_table, _ = group_by(table_ids[order], num_tables)
        order = order[by_table]
    return order


def _byte_order_last_wins(keys: Keys) -> Any:
    """Positions of ``keys`` in the byte order of their 8-byte little-endian encoding (the
    order RocksDB's bytewise comparator and SstFileWriter need), one per distinct key: the
    last occurrence in the batch. Reading the little-endian bytes as a big-endian uint64
    gives a number whose order is the byte order."""
    as_bytes_order = np.ascontiguousarray(keys, dtype="<i8").view(">u8")
    order = np.argsort(as_bytes_order, kind="stable")
    ordered = as_bytes_order[order]
    last = np.ones(order.shape[0], np.bool_)
    last[:-1] = ordered[1:] != ordered[:-1]  # keep the last of each run of equal keys
    return order[last]


def _meta_keys(db: Rdict) -> list[bytes]:
    """The keys of ``db``'s default family naming a table (dim, format, load marker)."""
    found = []
    keys: Any = db.keys(from_key=_META_PREFIX)  # raw mode: bytes, in order
    for key in keys:
        if not key.startswith(_META_PREFIX):
            break
        if key.startswith(_TABLE_META_KINDS):
            found.append(key)
    return found


def _delete_keys(db: Rdict, keys: list[bytes], write_opts: WriteOptions) -> None:
    """Delete ``keys`` of ``db``'s default family in one atomic batch. Caller translates."""
    if keys:
        batch = WriteBatch(raw_mode=True)
        for key in keys:
            batch.delete(key)
        db.write(batch, write_opts)


def _meta_table(key: bytes) -> str:
    """The table a metadata key names: ``hps.<kind>.<table>`` → ``<table>``."""
    return key[len(_META_PREFIX):].partition(b".")[2].decode(errors="replace")


def _options_file_families(path: str) -> list[str] | None:
    """The column families (default left out) named by the newest ``OPTIONS-<n>`` file in
    ``path``, or None when there is none to read."""
    files = sorted(Path(path).glob("OPTIONS-*"), key=lambda p: int(p.name[8:]) if p.name[8:].isdigit() else -1)
    if not files:
        return None
    try:
        text = files[-1].read_text(errors="replace")
    except OSError:
        return None
    return [n for n in _OPTIONS_FAMILY.findall(text) if n != _DEFAULT_CF]


class RocksDBPersistentDB(TierBase[_Group]):
    """Persistent tier in a RocksDB directory (HugeCTR ``rocks_db``).

    Args:
        config: the ``persistent_db`` section (defaults: ``PersistentDBConfig()``). Read
            here: ``path`` (database directory; created unless read-only), ``read_only``
            (open without the write lock, beside a writer in another process; inserts and
            new tables raise TierError), ``num_threads`` (RocksDB background threads: flush,
            compaction), ``max_get_batch_size`` (most keys per multi-get call) and
            ``max_set_batch_size`` (most keys per WriteBatch, one atomic write each).
        disable_wal: skip the write-ahead log. Faster bulk loads; a crash loses the
            writes since the last flush (re-loadable from the sparse files).
        secondary_path: open as a RocksDB secondary instance keeping its state in this
            folder; :meth:`refresh` then catches up with the writer. Implies read-only.

    Arguments are checked by :class:`~hps_core.db.base.TierBase` (``bulk_load``'s too).
    """

    _label = "RocksDB"

    def __init__(
        self,
        config: PersistentDBConfig | None = None,
        *,
        disable_wal: bool = False,
        secondary_path: str | Path | None = None,
    ) -> None:
        config = PersistentDBConfig() if config is None else config
        path, read_only, num_threads = config.path, config.read_only, config.num_threads
        max_get_batch_size, max_set_batch_size = config.get_batch_size, config.set_batch_size
        for name, value in (
            ("num_threads", num_threads),
            ("max_get_batch_size", max_get_batch_size),
            ("max_set_batch_size", max_set_batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"persistent_db.{name} must be a positive integer, got {value!r}")
        self._path = str(path)
        self._secondary = None if secondary_path is None else str(secondary_path)
        self._read_only = bool(read_only) or self._secondary is not None
        self._num_threads = num_threads
        self._read_threads = max(1, min(num_threads, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        self._max_get = max_get_batch_size
        self._max_set = max_set_batch_size
        self._write_opts = WriteOptions()
        # An attribute at run time, though rocksdict's stubs declare a method.
        self._write_opts.disable_wal = bool(disable_wal)  # type: ignore[method-assign,assignment]
        self._lock = threading.Lock()  # guards the handle maps, not RocksDB (thread-safe)
        self._closed = False
        self._db = self._open(num_threads)
        self._cfs: dict[str, Rdict] = {}
        self._handles: dict[str, Any] = {}
        self._dims: dict[str, int] = {}
        self._formats: dict[str, RowFormat] = {}  # filled with _dims (absent in RocksDB: fp32)
        self._unformatted: set[str] = set()  # tables stored without hps.format (HugeCTR's): fp32
        # fetch_tables' widths and views per tuple of tables; views die with their handles
        self._groups: TableGroups[_Group] = TableGroups(self._resolve)
        self._load_tables()

    def __repr__(self) -> str:
        mode = "secondary" if self._secondary else "read-only" if self._read_only else "read-write"
        return f"RocksDBPersistentDB(path={self._path!r}, {mode}, tables={len(self._dims)})"

    @property
    def path(self) -> str:
        return self._path

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def secondary_path(self) -> str | None:
        return self._secondary

    # ---------------------------------------------------------------- opening

    def _open(self, num_threads: int) -> Rdict:
        exists = Path(self._path, "CURRENT").exists()
        if self._read_only and not exists:
            raise TierError(
                f"persistent_db.path {self._path!r} holds no RocksDB database; a read_only "
                "open needs an existing one (load it with a writer first)"
            )
        opts = _options(num_threads, create=not self._read_only)
        if self._secondary is not None:
            Path(self._secondary).mkdir(parents=True, exist_ok=True)
            access = AccessType.secondary(self._secondary)
        elif self._read_only:
            access = AccessType.read_only(error_if_log_file_exist=False)
        else:
            access = AccessType.read_write()
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                # The column families are named from the MANIFEST (see _manifest_families);
                # each opens with these options, as every table is created with them.
                families = self._manifest_families() if exists else None
                db = Rdict(self._path, opts, column_families=families, access_type=access)
                break
            except Exception as exc:
                if not _is_rocksdb_error(exc):
                    raise
                # A reader listed a family that a writer dropped before the open: list again.
                if "column family not found" not in str(exc).lower() or attempt == _OPEN_ATTEMPTS - 1:
                    raise translate_rocksdb(exc, self._path, "open") from exc
        if not self._read_only:
            self._repair_after_crash(db)
        return db

    def _manifest_families(self) -> dict[str, Options]:
        """The column families RocksDB's MANIFEST holds (``list_cf``), each with our options.

        rocksdict, given none, opens the families its latest ``OPTIONS-*`` file names. RocksDB
        writes that file *after* the MANIFEST records a family created or dropped, so a process
        killed in between (``hps publish-model`` dropping a retired version's tables, issue 19)
        leaves an OPTIONS file naming a dropped family, and every later open failed with
        ``Column family not found`` (or, after a create, ``Column families not opened``). The
        MANIFEST is RocksDB's commit point: opened by its list, the store opens whatever the
        moment of the kill, and a read-write open writes a fresh OPTIONS file."""
        with self._translate("list tables", None):
            names = [n for n in Rdict.list_cf(self._path) if n != _DEFAULT_CF]
        stale = _options_file_families(self._path)
        if stale is not None and set(stale) != set(names):
            log.warning(
                "RocksDB at %r: its OPTIONS file does not match the MANIFEST (a process was killed while "
                "creating or dropping a table): families %s dropped, %s created; opened by the MANIFEST's list%s",
                self._path, sorted(set(stale) - set(names)), sorted(set(names) - set(stale)),
                "" if self._read_only else ", and the OPTIONS file is rewritten by this read-write open",
            )
        return {name: _options(1, create=True) for name in names}

    def _repair_after_crash(self, db: Rdict) -> None:
        """What a writer killed mid-step leaves, removed under the write lock (no other writer
        is running): SST files of a bulk load that were written but not ingested, and the
        metadata keys of a table whose column family is gone (a drop killed after
        ``drop_column_family``: a stale load marker would let a later load of the same file
        under the same name skip it as complete). Each repair is logged."""
        ingest = Path(self._path, _INGEST_DIR)
        leftovers = sorted(ingest.glob("*.sst")) if ingest.is_dir() else []
        for sst in leftovers:
            sst.unlink(missing_ok=True)
        if leftovers:
            log.warning("RocksDB at %r: removed %d SST files of an interrupted bulk load (%s)",
                        self._path, len(leftovers), ", ".join(p.name for p in leftovers[:5]))
        with self._translate("repair metadata", None):
            families = set(Rdict.list_cf(self._path))
            keys = _meta_keys(db)
            # a table is gone when its dim is stamped but its family is not there; a marker
            # alone is bookkeeping put_meta may hold before its table exists
            gone = {_meta_table(k) for k in keys if k.startswith(_DIM_PREFIX)} - families
            orphans = [key for key in keys if _meta_table(key) in gone]
            _delete_keys(db, orphans, self._write_opts)
        if orphans:
            log.warning("RocksDB at %r: removed the metadata of tables whose column family is gone "
                        "(a drop was interrupted): %s", self._path, sorted(gone))

    def _load_tables(self) -> None:
        """Learn existing tables, dims and formats: metadata first, else fp32 and the first
        value's size."""
        families = self._list_families()
        with self._translate("list tables", None):
            for name in families:
                raw_format = self._db.get(_FORMAT_PREFIX + name.encode())
                fmt = RowFormat.FP32 if raw_format is None else RowFormat.from_code(int(raw_format))
                raw = self._db.get(_DIM_PREFIX + name.encode())
                dim = int(raw) if raw is not None else self._dim_from_first_value(name, fmt)
                if dim is not None:
                    self._dims[name] = dim
                    self._formats[name] = fmt
                    if raw_format is None:
                        self._unformatted.add(name)

    def _dim_from_first_value(self, name: str, fmt: RowFormat) -> int | None:
        try:
            cf = self._db.get_column_family(name)
        except Exception as exc:
            # Listed, but created by another process after this handle opened (its writer has
            # not stamped the dim yet): not visible here until a refresh, like any later table.
            # Two models loading into one database at once met this (a read-only open between
            # a writer's create_cf and its metadata), and the second model failed to load.
            if _is_rocksdb_error(exc) and "does not exist" in str(exc):
                return None
            raise
        try:
            for value in cf.values():
                elements, rest = divmod(len(value) - fmt.header_bytes, fmt.element_bytes)
                return elements if elements > 0 and rest == 0 else None
            return None  # empty: unknown until create_table names its dim
        finally:
            cf.close()

    # ---------------------------------------------------------------- contract

    def _create_table(self, table: str, dim: int, row_format: RowFormat) -> None:
        with self._lock:
            self._check_open()
            known = self._dims.get(table)
            if known is not None:
                if known != dim:
                    raise ConfigError(f"table {table!r} already exists with dim {known}, not {dim}")
                stored = self._formats[table]
                if stored is not row_format:
                    raise format_mismatch(
                        table, f"RocksDB at {self._path!r}", stored, row_format, unformatted=table in self._unformatted
                    )
                return
            if self._read_only:
                # checked before rocksdict is asked: its read-only create_column_family
                # does not refuse, it half-succeeds
                if self._has_family(table):  # an empty existing table: learn its dim and format
                    self._dims[table] = dim
                    self._formats[table] = row_format
                    return
                raise TierError(
                    f"cannot create table {table!r}: RocksDB at {self._path!r} is open "
                    "read-only (persistent_db.read_only: true); load it with a writer first"
                )
            with self._translate("create table", table):
                if not self._has_family(table):
                    self._db.create_column_family(table, _options(1, create=True))
                meta = WriteBatch(raw_mode=True)  # dim and format land together
                meta.put(_DIM_PREFIX + table.encode(), str(dim).encode())
                meta.put(_FORMAT_PREFIX + table.encode(), str(row_format.code).encode())
                self._db.write(meta, self._write_opts)
            self._dims[table] = dim
            self._formats[table] = row_format
            self._unformatted.discard(table)

    def row_format(self, table: str) -> RowFormat:
        self.dim(table)
        return self._formats[table]

    def _insert(self, table: str, keys: Keys, values: Vectors) -> None:
        if self._read_only:
            raise TierError(
                f"cannot insert into {table!r}: RocksDB at {self._path!r} is open read-only"
            )
        if keys.shape[0] == 0:
            return
        packed = pack(self.row_format(table), values, f"insert into {table!r}")  # refuses before any write
        handle = self._handle(table)
        key_list = _key_bytes(keys)
        row_list = _row_bytes(packed)
        with self._translate("insert", table):
            for start in range(0, len(key_list), self._max_set):
                batch = WriteBatch(raw_mode=True)
                batch.set_default_column_family(handle)
                stop = start + self._max_set
                # the binding has no batched put; this loop is its floor
                for k, v in zip(key_list[start:stop], row_list[start:stop]):
                    batch.put(k, v)
                self._db.write(batch, self._write_opts)

    def _fetch(self, table: str, keys: Keys, out: Vectors) -> Mask:
        """The one-table case of :meth:`fetch_tables` (one read path for both)."""
        n, dim = out.shape
        offsets = np.arange(0, n * dim, dim, dtype=np.int64)
        return self._fetch_rows(self._group((table,)), np.zeros(n, np.int64), keys, out.reshape(-1), offsets)

    def _tables_of(self, tables: Sequence[str]) -> tuple[Keys, _Group]:
        group = self._group(tables)
        return group.dims, group

    def _fetch_tables(self, group: _Group, table_ids: Keys, keys: Keys, out: Flat, offsets: Keys) -> Mask:
        """Keys of several tables in one call: one multi-get per column family (chunked by
        ``max_get_batch_size``), all of them spread over the read pool together. Arrays as
        in the contract (base.py)."""
        return self._fetch_rows(group, table_ids, keys, out, offsets)

    def _fetch_rows(self, group: _Group, ids: Keys, keys: Keys, out: Flat, offsets: Keys) -> Mask:
        """Checked arrays in, found rows written into ``out`` at ``offsets``."""
        names, families = group.names, group.families
        n = keys.shape[0]
        found = np.zeros(n, np.bool_)
        if n == 0:
            return found
        order = _byte_order(ids, keys, len(names))
        bounds = np.zeros(len(names) + 1, np.int64)
        np.cumsum(np.bincount(ids, minlength=len(names)), out=bounds[1:])
        key_list = _key_bytes(keys[order])
        results = np.empty(n, dtype=object)

        def read(pieces: list[_Piece]) -> None:
            t = pieces[0][0]
            try:  # one handler for the task, naming the table that failed
                for t, start, stop in pieces:
                    # stubs: a list of keys is a batch get
                    results[start:stop] = families[t].get(key_list[start:stop])  # type: ignore[arg-type]
            except Exception as exc:
                if not _is_rocksdb_error(exc):
                    raise
                raise translate_rocksdb(exc, self._path, "fetch", names[t]) from exc

        with self._translate("fetch", names[0] if len(names) == 1 else None):  # e.g. a pool shut down by close()
            self._run_ranges(read, bounds)
        hit: Mask = results != None  # noqa: E711 — elementwise on an object array
        positions = order[hit]
        hit_ids = ids[positions]
        hits: list[bytes] = results[hit].tolist()
        # one join, one decode: dequantised straight into out; nothing written on a bad size
        bad = unpack_stored(hits, hit_ids, group.dims, group.codes, group.sizes, out, offsets[positions])
        if bad >= 0:
            t = int(hit_ids[bad])
            dim, fmt = int(group.dims[t]), RowFormat.from_code(int(group.codes[t]))
            raise StoredWidthError(
                f"RocksDB table {names[t]!r} at {self._path!r} holds a value of {len(hits[bad])} bytes, "
                f"not {int(group.sizes[t])} (a {dim}-wide {fmt} row); the stored table and its dim or "
                "row format disagree",
                int(positions[bad]),
            )
        found[positions] = True
        return found

    def count(self, table: str) -> int:
        """Exact number of keys: a full key scan (RocksDB keeps only estimates), so this is
        O(table size) and meant for tooling and tests, not for the request path."""
        self.dim(table)
        cf = self._family(table)
        with self._translate("count", table):
            return sum(1 for _ in cf.keys())

    def table_names(self) -> list[str]:
        self._check_open()
        return sorted(self._dims)

    def dim(self, table: str) -> int:
        self._check_open()
        dim = self._dims.get(table)
        if dim is None:
            raise unknown_table(table, self._dims)
        return dim

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # column-family views keep the DB alive: close them first or the lock stays held
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._close_handles()

    # ---------------------------------------------------------------- extras

    def bulk_load(self, table: str, keys: Keys, values: Vectors) -> int:
        """Upsert rows through one SST file and an atomic ingest; returns rows written.

        keys: (n,) int64 (or uint32). values: (n, dim) float32, packed in the table's row
        format (a row it cannot store refuses the batch: RowValueError). Rows are sorted by
        their byte encoding (RocksDB's comparator) and, for a key repeated in the batch, the
        last occurrence wins, as in :meth:`insert`. Either every row lands or none does.
        """
        table, keys, values = self._rows_in(table, keys, values)
        self._check_writable(table, "bulk-load into")
        if keys.shape[0] == 0:
            return 0
        packed = pack(self.row_format(table), values, f"bulk load into {table!r}")
        order = _byte_order_last_wins(keys)
        sst = self._sst_path(table)
        try:
            with self._translate("bulk load (write SST)", table):
                writer = SstFileWriter(_options(1, create=True))
                writer.open(str(sst))
                for k, v in zip(_key_bytes(keys[order]), _row_bytes(packed[order])):
                    writer[k] = v  # the binding has no batched put; this loop is its floor
                writer.finish()
            opts = IngestExternalFileOptions()
            opts.set_move_files(True)
            with self._translate("bulk load (ingest SST)", table):
                self._family(table).ingest_external_file([str(sst)], opts)
        finally:
            sst.unlink(missing_ok=True)
        return int(order.shape[0])

    def refresh(self) -> None:
        """See what a writer in another process added since this handle opened.

        Secondary: ``try_catch_up_with_primary`` (cheap, incremental); tables created
        since are picked up too. Read-only: the handle is reopened. Read-write: nothing
        to do (a writer sees its own writes).
        """
        if not self._read_only:
            self._check_open()
            return
        with self._lock:
            self._check_open()
            new_tables = set(self._list_families()) - set(self._cfs) - set(self._dims)
            if self._secondary is not None and not new_tables:
                with self._translate("catch up with primary", None):
                    self._db.try_catch_up_with_primary()
                return
            self._close_handles()
            self._db = self._open(self._num_threads)
        self._load_tables()

    def drop_table(self, table: str) -> int:
        """Drop ``table``'s column family and its metadata keys (``hps.<kind>.<table>``: dim,
        format, load marker) in the default family; returns RocksDB's estimate of the rows it
        held (``DropTable``). Files a read-only handle of another process still has open stay
        readable to it until it closes them (POSIX unlink).

        Crash-safe by its order: the load marker goes first (a table without one is loaded
        again, never skipped), then the column family, then dim and format (a kill between the
        last two leaves keys without a family, which the next read-write open removes). Every
        point leaves a store that opens, and dropping again finishes the job."""
        rows = self.estimate_rows(table)
        self._check_writable(table, "drop table")
        with self._lock, self._translate("drop table", table):
            self._check_open()
            marker = [k for k in _meta_keys(self._db) if _meta_table(k) == table and k.startswith(_LOAD_PREFIX)]
            _delete_keys(self._db, marker, self._write_opts)
            cf = self._cfs.pop(table, None)
            self._handles.pop(table, None)
            self._groups.clear()  # they hold views of the dropped family
            if cf is not None:
                cf.close()
            if self._has_family(table):
                self._db.drop_column_family(table)
            _delete_keys(self._db, [k for k in _meta_keys(self._db) if _meta_table(k) == table], self._write_opts)
            del self._dims[table], self._formats[table]
            self._unformatted.discard(table)
        return rows

    def get_meta(self, name: str) -> bytes | None:
        """The bookkeeping value stored under ``hps.<name>`` in the default column family."""
        self._check_open()
        with self._translate("read metadata", None):
            value: bytes | None = self._db.get(_META_PREFIX + name.encode())
        return value

    def put_meta(self, name: str, value: bytes) -> None:
        """Store a bookkeeping value under ``hps.<name>`` (synced with the WAL unless
        ``disable_wal``); refused when read-only."""
        self._check_writable(name, "write metadata")
        with self._translate("write metadata", None):
            self._db.put(_META_PREFIX + name.encode(), value, self._write_opts)

    def delete_meta(self, name: str) -> None:
        """Remove ``hps.<name>``; refused when read-only."""
        self._check_writable(name, "delete metadata")
        with self._translate("delete metadata", None):
            self._db.delete(_META_PREFIX + name.encode(), self._write_opts)

    def estimate_rows(self, table: str) -> int:
        """RocksDB's ``rocksdb.estimate-num-keys`` for ``table``: O(1), approximate
        (exact for a freshly bulk-loaded table; overwrites counted twice until compaction)."""
        return self._int_property(table, "rocksdb.estimate-num-keys")

    def disk_bytes(self, table: str) -> int:
        """Bytes of ``table`` in SST files plus its memtables (``rocksdb.total-sst-files-size``
        + ``rocksdb.size-all-mem-tables``)."""
        return self._int_property(table, "rocksdb.total-sst-files-size") + self._int_property(
            table, "rocksdb.size-all-mem-tables"
        )

    def flush(self) -> None:
        """Write every table's memtable to SST files (so disk sizes are accurate)."""
        self._check_writable("all tables", "flush")
        with self._translate("flush", None):
            for table in self.table_names():
                self._family(table).flush(True)

    # ---------------------------------------------------------------- helpers

    def _run_ranges(self, read: Callable[[list[_Piece]], None], bounds: Keys) -> None:
        """Call ``read(pieces)`` over the sorted batch ``[0, bounds[-1])``, table t being
        ``[bounds[t], bounds[t+1])``, spread over the read pool when the batch is large
        enough to gain from it.

        The batch is cut into tasks of ``step`` keys (at most max_get, about one per
        thread); a task is a list of pieces, one per table it spans, so a task costs one
        hand-off however many small tables it holds.
        """
        n = int(bounds[-1])
        threads = min(self._read_threads, n // _MIN_KEYS_PER_THREAD)
        if threads < 2 and n <= self._max_get:  # one task: no cutting to plan
            present = np.flatnonzero(bounds[1:] > bounds[:-1])
            read(list(zip(present.tolist(), bounds[present].tolist(), bounds[present + 1].tolist())))
            return
        step = min(self._max_get, -(-n // max(threads, 1)))
        cuts = np.union1d(bounds, np.arange(0, n, step))  # sorted, distinct: empty tables vanish
        starts, stops = cuts[:-1], cuts[1:]
        tables = np.searchsorted(bounds, starts, side="right") - 1
        pieces: list[_Piece] = list(zip(tables.tolist(), starts.tolist(), stops.tolist()))
        task_starts = np.flatnonzero(np.diff(starts // step, prepend=-1)).tolist() + [len(pieces)]
        tasks = [pieces[a:b] for a, b in zip(task_starts[:-1], task_starts[1:])]
        if threads < 2 or len(tasks) < 2:
            read(pieces)
            return
        pool = self._read_pool()
        try:
            futures = [pool.submit(read, task) for task in tasks]
        except RuntimeError:  # "cannot schedule new futures after shutdown": closed meanwhile
            self._check_open()
            raise
        for future in futures:
            future.result()

    def _group(self, tables: Sequence[str]) -> _Group:
        self._check_open()
        return self._groups.get(tables)

    def _resolve(self, names: tuple[str, ...]) -> _Group:
        """Widths and column-family views of ``names`` (see TableGroups): the binding's
        multi-get reads one column family, through its view."""
        dims = np.array([self.dim(name) for name in names], dtype=np.int64)
        formats = [self.row_format(name) for name in names]
        return _Group(names, dims, format_codes(formats), row_sizes(formats, dims), [self._family(name) for name in names])

    def _read_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                self._check_open()
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._read_threads, thread_name_prefix="hps-rocksdb")
        return self._pool

    def _close_handles(self) -> None:
        """Close column-family views, then the DB. Caller holds the lock."""
        # column-family views keep the DB alive: close them first or the lock stays held
        cfs, self._cfs, self._handles = list(self._cfs.values()), {}, {}
        self._groups.clear()  # they hold views of the closed handle
        with self._translate("close", None):
            for cf in cfs:
                cf.close()
            self._db.close()

    def _list_families(self) -> list[str]:
        with self._translate("list tables", None):
            return [n for n in Rdict.list_cf(self._path) if n != _DEFAULT_CF]

    def _int_property(self, table: str, name: str) -> int:
        self.dim(table)
        with self._translate(f"read property {name}", table):
            value = self._family(table).property_int_value(name)
        return int(value or 0)

    def _check_writable(self, what: str, action: str) -> None:
        self._check_open()
        if self._read_only:
            raise TierError(
                f"cannot {action} {what!r}: RocksDB at {self._path!r} is open read-only; "
                "write with a read-write handle (only one process may hold it)"
            )

    def _sst_path(self, table: str) -> Path:
        folder = Path(self._path, _INGEST_DIR)
        folder.mkdir(exist_ok=True)
        return folder / f"{table}.{os.getpid()}.{next(_sst_ids)}.sst"

    def _check_open(self) -> None:
        if self._closed:
            raise TierError(f"RocksDB at {self._path!r} is closed")

    def _dim_of(self, table: str) -> int:
        return self.dim(table)

    def _has_family(self, table: str) -> bool:
        with self._translate("list tables", table):
            return table in Rdict.list_cf(self._path)

    def _family(self, table: str) -> Rdict:
        cf = self._cfs.get(table)
        if cf is None:
            with self._lock, self._translate("open column family", table):
                self._check_open()
                cf = self._cfs.get(table)
                if cf is None:
                    cf = self._cfs[table] = self._db.get_column_family(table)
        return cf

    def _handle(self, table: str) -> Any:
        handle = self._handles.get(table)
        if handle is None:
            with self._lock, self._translate("open column family", table):
                self._check_open()
                handle = self._handles[table] = self._db.get_column_family_handle(table)
        return handle

    @contextmanager
    def _translate(self, action: str, table: str | None) -> Iterator[None]:
        """rocksdict's errors (:func:`_is_rocksdb_error`) → :func:`translate_rocksdb`; ours,
        and programming errors, pass through unchanged."""
        # rocksdict has no exception base of its own (a bare Exception): catch that wide,
        # then let _is_rocksdb_error send everything else (a bug) on unchanged
        try:
            yield
        except Exception as exc:
            if not _is_rocksdb_error(exc):
                raise
            raise translate_rocksdb(exc, self._path, action, table) from exc


def _is_rocksdb_error(exc: BaseException) -> bool:
    """Whether rocksdict raised ``exc`` for a database failure: a bare ``Exception`` (its
    RocksDB status: IO error, lock held, read-only, missing column family, ...), a
    ``DbClosedError``, or an ``OSError`` (a filesystem fault of its own files, such as
    writing rocksdict-config.json on open: a full disk, a permission, a directory in the
    way). Other subclasses of Exception (TypeError, AttributeError, AssertionError,
    NameError, KeyError, our HPSErrors) are not: a bug must propagate, not be retried as a
    TierError."""
    return type(exc) is Exception or isinstance(exc, (DbClosedError, OSError))


def translate_rocksdb(exc: BaseException, path: str, action: str, table: str | None = None) -> TierError:
    """The error a rocksdict failure (a bare Exception) enters hps_core as, for every call of
    this module: TierBusyError when an open finds the write lock held, else TierError,
    naming the action, the table and the path."""
    where = f" on table {table!r}" if table else ""
    message = f"RocksDB {action}{where} at {path!r} failed: {exc}"
    if action == "open" and "lock" in str(exc).lower():  # rocksdict's LOCK file is held
        return TierBusyError(f"{message}; another process holds its write lock: open with read_only: true to share it")
    if "no space left" in str(exc).lower():
        message += (f"; the file system of {path!r} is full: free space on it (or point persistent_db.path "
                    "at a larger disk), then run the command again: a load resumes from its progress markers")
    return TierError(message)
