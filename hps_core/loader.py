"""Loading embedding tables into the tiers: resumable, idempotent, cheap when already done.

:func:`load_table` copies one table file (a HugeCTR sparse model folder, ``.npz`` or a
``keys.npy``/``vectors.npy`` folder) into one tier, in chunks of ``chunk_rows`` rows:

- into a tier with ``bulk_load`` (RocksDB) each chunk is one SST file ingested atomically;
  elsewhere (hash map, Redis) through ``insert``;
- into a tier with load bookkeeping (``get_meta``/``put_meta``: RocksDB) a **progress
  marker** ``hps.load.<table>`` in the database itself records the rows committed and the
  source file's fingerprint (sizes, mtimes and a hash of the first and last 64 KiB of each
  file). The marker is written after each chunk's ingest, so a load that is killed resumes
  at the first chunk not yet recorded; a chunk ingested but not recorded is ingested again,
  which is harmless (upserts of the same rows). A marker saying "complete" for the same
  fingerprint makes a rerun return at once, without counting rows;
- a changed source file (other fingerprint) is loaded again from the start. Rows of the old
  file whose keys the new file lacks stay: drop the table first to replace it outright.

``rows`` (or ``fraction``) loads only the leading rows of the file, which is what the volatile
tier's ``initial_cache_rate`` asks for.

Row formats. The table is created in its configured format (``TableConfig.row_format``:
``embedding_format_per_table`` or ``fp8_quant``) and the float32 rows of the file are packed
by the tier as they are written (:mod:`hps_core.row_formats`). A table the tier already stores
in another format (or width) fails the load with a ConfigError naming the table, both formats
and the config file (:func:`ensure_table`): a table's format is fixed once stored. A row the
format cannot store (a NaN, an infinity, a float16 overflow) fails it with a RowValueError
naming the file, the table and the row's key; nothing of that chunk is stored, the chunks
before it stay (and the progress marker says so).

Duplicate keys. A load that writes rows first checks that the rows it loads repeat no key
(:func:`_check_unique_rows`: the key file is read and sorted in bounded pieces, the rows are not
read) and fails with a FormatError naming the file, the table, the count and a repeated key,
before anything of the table is written: the rule of the writer and of ``publish-model``
(hps_core/formats/hugectr.py says why). A load that finds its table complete (a marker of the
same file) checks nothing: the load that completed it did.

Into a tier with per-partition load markers (:class:`~hps_core.db.base.PartitionMarkers`:
Redis) the markers of the table are written before its rows, so that a node which restarts
empty during or after the load loses them with its rows and the refill monitor of a server
(``hps_core/db/redis_refill.py``) notices. A load that fails midway leaves markers over partial
rows; it fails its caller (the server's start, ``hps load``), which loads again.

:func:`load_config_tables` does this for the models and tiers of an HPS JSON; ``hps load``
(``hps_core/cli/load.py``) is its command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hps_core.arrays import Keys, Vectors
from hps_core.config import ParameterServerConfig, TableConfig
from hps_core.db.base import BulkLoad, EmbeddingTier, HostSharedTables, PartitionMarkers, TableMetadata
from hps_core.errors import ConfigError, HPSError, RowValueError, TierError
from hps_core.formats import detect_format, read_table, sparse_model_rows, stream_table
from hps_core.formats.hugectr import check_unique_keys
from hps_core.row_codecs import first_unstorable

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "TIERS",
    "LoadMarker",
    "ensure_table",
    "fingerprint",
    "load_config_tables",
    "load_table",
    "marker_name",
    "read_marker",
    "select_tables",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 1 << 18  # bounds memory per step; one SST file each
_PROBE_BYTES = 1 << 16  # bytes hashed at each end of a source file for its fingerprint
TIERS = ("persistent", "volatile", "both")


# --------------------------------------------------------------------------- source files


def _source_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files a table's content lives in, in a fixed order."""
    root = Path(path)
    kind = detect_format(root)
    if kind == "npz":
        return [root]
    if kind == "hugectr":
        return [root / "key", root / "emb_vector"]
    return [root / "keys.npy", root / "vectors.npy"]


def fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap identity of a table file: size, mtime and the first/last 64 KiB of each file.

    Costs two small reads per file, never a pass over the table.
    """
    digest = hashlib.sha256()
    for file in _source_files(path):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        with open(file, "rb") as fh:
            digest.update(fh.read(_PROBE_BYTES))
            if stat.st_size > _PROBE_BYTES:
                fh.seek(max(stat.st_size - _PROBE_BYTES, _PROBE_BYTES))
                digest.update(fh.read(_PROBE_BYTES))
    return digest.hexdigest()[:32]


# --------------------------------------------------------------------------- markers


@dataclass(frozen=True)
class LoadMarker:
    """What the database records about a table's load: rows committed of how many, from
    which source (its fingerprint)."""

    rows: int
    total: int
    fingerprint: str

    @property
    def complete(self) -> bool:
        return self.rows >= self.total

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> LoadMarker | None:
        try:
            data = json.loads(raw)
            return cls(rows=int(data["rows"]), total=int(data["total"]), fingerprint=str(data["fingerprint"]))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: treated as absent, the load starts over


def marker_name(table: str) -> str:
    """Metadata name of ``table``'s progress marker (stored as ``hps.load.<table>``)."""
    return f"load.{table}"


def read_marker(db: EmbeddingTier, table: str) -> LoadMarker | None:
    """The progress marker of ``table`` in ``db``, or None (none, or a tier without markers)."""
    if not isinstance(db, TableMetadata):
        return None
    raw = db.get_meta(marker_name(table))
    return None if raw is None else LoadMarker.decode(raw)


# --------------------------------------------------------------------------- one table


def ensure_table(db: EmbeddingTier, table: TableConfig, source: str = "") -> None:
    """Create ``table`` in ``db`` with its width and row format (idempotent). A width or format
    the tier already stores differently is the tier's ConfigError, naming the table and both
    formats, re-raised with ``source`` (the config file) in front when given."""
    try:
        db.create_table(table.qualified_name, table.dim, table.row_format)
    except ConfigError as exc:
        if not source:
            raise
        raise ConfigError(f"{source}: {exc}") from exc


def load_table(
    db: EmbeddingTier,
    table: TableConfig,
    *,
    source: str = "",
    progress: bool = False,
    rows: int | None = None,
    fraction: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> int:
    """Load ``table.sparse_file`` into ``db`` as ``table.qualified_name``; returns rows written.

    Creates the table if needed, in ``table.row_format`` (:func:`ensure_table`; ``source``,
    the config file, is named in its errors). Idempotent: a rerun after a complete load reads only the
    marker and the source's fingerprint and writes nothing (returns 0); after a killed
    load it continues where the marker says. ``rows`` (else ``floor(fraction * n)``) limits
    the load to the file's leading rows. ``progress`` shows a tqdm bar when stderr is a TTY.
    Into a tier with partition markers, the markers go in first (see the module doc).
    """
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    name = table.qualified_name
    total = _rows_to_load(_row_count(table), rows, fraction, name)
    if isinstance(db, HostSharedTables):
        return _fill_host_table(db, table, source, total, chunk_rows, progress)
    ensure_table(db, table, source)
    start, fp = 0, ""
    meta = db if isinstance(db, TableMetadata) and not db.read_only else None
    if meta is not None:
        fp = fingerprint(table.sparse_file)
        marker = read_marker(db, name)
        if marker is not None and marker.fingerprint == fp and marker.total == total:
            if marker.complete:  # the load that wrote it checked the keys
                log.info("%s: already loaded (%d rows)", name, total)
                return 0
            start = marker.rows
            log.info("%s: resuming at row %d of %d", name, start, total)
    _check_unique_rows(table, total)  # before any row (or partition marker) is written
    if total > 0 and isinstance(db, PartitionMarkers):
        db.mark_loaded(name)  # before the rows: a node lost after this loses them with its rows
    write = db.bulk_load if isinstance(db, BulkLoad) else db.insert
    return _copy_rows(write, table, start, total, chunk_rows, progress,
                      markers=None if meta is None else (meta, fp))


def _check_unique_rows(table: TableConfig, total: int) -> None:
    """FormatError naming the file, the table, the count and a key when rows ``[0, total)``
    of the table file repeat a key (:func:`~hps_core.formats.hugectr.check_unique_keys`, the
    check ``publish-model`` and the writer apply). Only the rows a load reads are checked: a
    tier loading a leading share never serves the rest. The key file is read, never the rows."""
    if total < 2:
        return
    keys = read_table(table.sparse_file, table.dim).keys  # memory-mapped for a folder or .npy pair
    share = "" if total == keys.shape[0] else f" (its first {total} rows, the share this tier loads)"
    check_unique_keys(keys[:total], f"{table.sparse_file}: table {table.qualified_name!r}{share}")


def _fill_host_table(db: HostSharedTables, table: TableConfig, source: str, total: int, chunk_rows: int,
                     progress: bool) -> int:
    """Fill a host-store table once per host: the first process streams the file in while the
    others wait, then attach (a complete store of the same file and share is reused as it is)."""
    name = table.qualified_name
    identity = f"{fingerprint(table.sparse_file)}:{total}"
    written = 0

    def fill(write: Callable[[Keys, Vectors], None]) -> None:
        nonlocal written
        _check_unique_rows(table, total)  # a refusal here leaves no store behind
        written = _copy_rows(lambda _name, keys, values: write(keys, values), table, 0, total, chunk_rows, progress)

    try:
        db.open_table(name, table.dim, table.row_format, rows=total, source=identity, fill=fill)
    except ConfigError as exc:
        if not source:
            raise
        raise ConfigError(f"{source}: {exc}") from exc
    if not written:
        log.info("%s: attached to the host store (%d rows)", name, total)
    return written


def _row_count(table: TableConfig) -> int:
    """Rows of the table file, from file sizes where the format allows (no data read)."""
    if detect_format(table.sparse_file) == "hugectr":
        return sparse_model_rows(table.sparse_file, table.dim)[0]
    return len(read_table(table.sparse_file, table.dim))  # .npy: memory-mapped


def _rows_to_load(n: int, rows: int | None, fraction: float, name: str) -> int:
    if rows is None:
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"table {name!r}: fraction must be in [0, 1], got {fraction!r}")
        return int(np.floor(n * fraction))
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ConfigError(f"table {name!r}: rows must be a non-negative integer, got {rows!r}")
    return min(rows, n)


def _copy_rows(
    write: Callable[[str, Keys, Vectors], object],
    table: TableConfig,
    start: int,
    total: int,
    chunk_rows: int,
    progress: bool,
    *,
    markers: tuple[TableMetadata, str] | None = None,
) -> int:
    """Stream rows ``[start, total)`` of the table file through ``write(table, keys, values)``
    chunk by chunk; with ``markers`` (the tier, the file's fingerprint) the progress is
    recorded in the tier after each chunk."""
    name = table.qualified_name
    show = progress and sys.stderr.isatty()
    written = 0
    with tqdm(total=total, initial=start, unit="rows", unit_scale=True, desc=name,
              disable=not show, leave=True) as bar:
        for lo, keys, vectors, bad in stream_table(table.sparse_file, table.dim, start, total, chunk_rows):
            hi = lo + keys.shape[0]
            try:
                if bad >= 0:  # no format stores it as a value to serve, fp32 included
                    raise RowValueError(f"row {bad} holds a NaN or an infinity", position=bad)
                write(name, keys, vectors)
            except RowValueError as exc:
                raise _unstorable(table, keys, vectors, lo, exc) from exc
            if markers is not None:
                markers[0].put_meta(marker_name(name), LoadMarker(hi, total, markers[1]).encode())
            written += hi - lo
            bar.update(hi - lo)
    if markers is not None and total == start == 0:
        markers[0].put_meta(marker_name(name), LoadMarker(0, 0, markers[1]).encode())
    return written


def _unstorable(table: TableConfig, keys: Keys, vectors: Vectors, first: int,
                exc: RowValueError) -> RowValueError:
    """The tier's refusal of a chunk (rows ``first...`` of the file) restated for the file:
    which file, table and key; ``position`` is the row's index in the file."""
    row = exc.position
    if not 0 <= row < keys.shape[0]:  # the tier did not say which row: find it
        row = first_unstorable(table.row_format, vectors)[0]
    at = f"the row of key {int(keys[row])} (row {first + row} of the file)" if row >= 0 else "a row"
    return RowValueError(
        f"{table.sparse_file}: table {table.qualified_name!r} ({table.row_format}): {at} cannot be "
        f"stored ({exc}); nothing of rows {first}..{first + keys.shape[0] - 1} was written",
        position=first + row if row >= 0 else -1,
    )


# --------------------------------------------------------------------------- a whole config


def select_tables(
    config: ParameterServerConfig,
    models: Iterable[str] | None = None,
    tables: Iterable[str] | None = None,
) -> list[TableConfig]:
    """The tables of ``models`` (default: all), restricted to ``tables`` (plain or qualified
    names) when given; an unknown name is an error naming the ones that exist."""
    chosen = [config.model(m) for m in models] if models else list(config.models)
    result = [t for model in chosen for t in model.tables]
    if not tables:
        return result
    wanted = list(tables)
    known = {t.name for t in result} | {t.qualified_name for t in result}
    missing = [w for w in wanted if w not in known]
    if missing:
        raise ConfigError(
            f"{config.source}: --tables {', '.join(missing)}: no such table in the selected "
            f"models; tables: {', '.join(sorted(t.qualified_name for t in result))}"
        )
    return [t for t in result if t.name in wanted or t.qualified_name in wanted]


def load_config_tables(
    config: ParameterServerConfig,
    tables: Sequence[TableConfig],
    *,
    tier: str = "persistent",
    progress: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    after_table: Callable[[str], None] | None = None,
) -> dict[str, dict[str, int]]:
    """Load ``tables`` into the config's tiers; returns ``{tier: {table: rows written}}``.

    The persistent tier takes whole tables; the volatile tier the first
    ``initial_cache_rate`` share of each (HugeCTR's start-up rule). The in-process hash map
    is refused: it lives in each serving process, so there is nothing to load ahead.
    ``after_table(qualified name)`` is called as each table is done, in each tier.
    """
    from hps_core.db import open_persistent_db, open_volatile_db

    if tier not in TIERS:
        raise ConfigError(f"--tier must be one of {', '.join(TIERS)}, got {tier!r}")
    report: dict[str, dict[str, int]] = {}
    if tier in ("persistent", "both"):
        settings = config.persistent_db
        if not settings.enabled:
            raise ConfigError(f"{config.source}: persistent_db is disabled; set persistent_db.type "
                              "to 'rocks_db' (or load with --tier volatile)")
        if settings.read_only:
            settings = dataclasses.replace(settings, read_only=False)  # the loader is the writer
        db = open_persistent_db(settings)
        assert db is not None  # enabled, checked above
        with _closing(db, f"{config.source}: loading {_names(tables)} into RocksDB at {settings.path}"):
            report["persistent"] = _load_each(db, tables, config.source, progress, chunk_rows, after_table)
    if tier in ("volatile", "both"):
        settings_v = config.volatile_db
        if not settings_v.type.shared and (not settings_v.host_shared or settings_v.shared_memory_auto_remove):
            where = ("in host shared memory, filled by the first serving process and removed with the last"
                     if settings_v.host_shared else "inside each serving process and is filled at start-up")
            raise ConfigError(
                f"{config.source}: volatile_db.type is '{settings_v.type}': the hash map lives {where}, "
                "so there is nothing to load ahead; use --tier persistent, a shared tier (--redis "
                "HOST:PORT), or a host store that outlives its users (shared_memory_auto_remove: false)"
            )
        vdb = open_volatile_db(settings_v, config.source)
        if vdb is None:
            raise ConfigError(f"{config.source}: volatile_db is disabled; set volatile_db.type (or load with "
                              "--tier persistent)")
        with _closing(vdb, f"{config.source}: loading {_names(tables)} into the volatile tier"):
            report["volatile"] = _load_each(vdb, tables, config.source, progress, chunk_rows, after_table,
                                            fraction=settings_v.initial_cache_rate)
    return report


def _load_each(db: EmbeddingTier, tables: Sequence[TableConfig], source: str, progress: bool, chunk_rows: int,
               after_table: Callable[[str], None] | None, fraction: float = 1.0) -> dict[str, int]:
    """:func:`load_table` of each table into ``db``, in order; ``{table: rows written}``."""
    written = {}
    for table in tables:
        written[table.qualified_name] = load_table(db, table, source=source, progress=progress,
                                                   chunk_rows=chunk_rows, fraction=fraction)
        if after_table is not None:
            after_table(table.qualified_name)
    return written


def _names(tables: Sequence[TableConfig]) -> str:
    names = [t.qualified_name for t in tables]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


@contextlib.contextmanager
def _closing(db: EmbeddingTier, what: str) -> Iterator[None]:
    """Close ``db`` after the block. When the block failed, a close that fails too is logged,
    not raised: the block's error names the table and the step (a full disk fails a table's
    SST write, then the close's flush; the close's error, naming no table, used to replace
    it). A close that fails alone is re-raised with ``what`` (the tables being loaded)."""
    try:
        yield
    except BaseException:
        try:
            db.close()
        except HPSError as exc:
            log.warning("%s: closing the tier after the failure failed too: %s", what, exc)
        raise
    try:
        db.close()
    except TierError as exc:
        raise TierError(f"{what}: {exc}") from exc
