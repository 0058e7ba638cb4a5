"""``hps inspect``: what the tiers hold, per table — rows, width, memory and disk.

Per table (from ``--config``'s models, or every table of ``--rocksdb``'s database):

- ``format`` and ``row_bytes``: the table's row format (``embedding_format_per_table`` or
  ``fp8_quant``; with ``--rocksdb`` alone, the format RocksDB stores) and the bytes of one
  packed row in it (:meth:`~hps_core.row_formats.RowFormat.row_bytes`), what every tier and
  cache keeps per row before its own overhead;
- ``file_rows``: rows of the table's sparse file (file sizes only);
- RocksDB: ``rocksdb.estimate-num-keys`` (O(1), approximate), the format it stores the table
  in (``rocksdb_format``; one that differs from the config's is listed under the table, since
  a server would refuse to load it), SST + memtable bytes, and the loader's progress marker
  (``complete``, ``partial``, ``stale`` when the file changed since, ``none``). The database
  is opened read-only, so inspect runs beside a writer or a server;
- the hash map lives in each serving process, so inspect reports what a start-up load of
  ``initial_cache_rate`` would take there: ``rows × volatile_bytes_per_row``, the map's own
  steady-state estimate for the table's width, format and overflow settings (header, packed
  row and slots: :func:`hps_core.db.hash_map.estimate_bytes_per_row`).

Output (:func:`format_report`): a plain aligned table; ``hps inspect`` (``hps_core/cli/inspect.py``)
prints it, or the report as JSON with ``--json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hps_core.config import ParameterServerConfig, TableConfig
from hps_core.errors import FormatError
from hps_core.formats import detect_format, sparse_model_rows

__all__ = ["format_report", "inspect_tiers"]

_COLUMNS = (
    ("table", "table"),
    ("dim", "dim"),
    ("format", "format"),
    ("row_bytes", "row size"),
    ("file_rows", "file rows"),
    ("rocksdb_rows", "rocksdb rows~"),
    ("rocksdb_format", "rocksdb format"),
    ("rocksdb_bytes", "rocksdb disk"),
    ("load", "load"),
    ("volatile_rows", "volatile rows"),
    ("volatile_bytes_per_row", "volatile row~"),
    ("volatile_bytes", "volatile mem~"),
)


def _file_rows(table: TableConfig) -> int | None:
    try:
        if detect_format(table.sparse_file) == "hugectr":
            return sparse_model_rows(table.sparse_file, table.dim)[0]
    except (FormatError, OSError):
        return None
    return None


def _open_rocksdb(config: ParameterServerConfig) -> Any:
    """The persistent tier, read-only, through the factory (Any: the report also reads
    RocksDB's estimate_rows and disk_bytes); None when disabled or not created yet."""
    from hps_core.db import open_persistent_db

    settings = config.persistent_db
    if not settings.enabled or not Path(settings.path, "CURRENT").exists():
        return None
    return open_persistent_db(dataclasses.replace(settings, read_only=True, num_threads=1))


def _load_state(db: Any, table: TableConfig, name: str) -> str:
    from hps_core.loader import fingerprint, read_marker

    marker = read_marker(db, name)
    if marker is None:
        return "none"
    if not marker.complete:
        return f"partial {marker.rows}/{marker.total}"
    try:
        if table.sparse_file and fingerprint(table.sparse_file) != marker.fingerprint:
            return "stale"
    except (FormatError, OSError):
        pass
    return "complete"


def _volatile(config: ParameterServerConfig, table: TableConfig, file_rows: int | None
              ) -> dict[str, Any]:
    """The hash map's rows, bytes per row and memory for ``table`` (None each where unknown)."""
    from hps_core.db.hash_map import estimate_bytes_per_row

    settings = config.volatile_db
    out: dict[str, Any] = {"volatile_rows": None, "volatile_bytes_per_row": None, "volatile_bytes": None}
    if not settings.type.in_process:
        return out
    per_row = estimate_bytes_per_row(table.dim, table.row_format, settings.overflow)
    out["volatile_bytes_per_row"] = round(per_row)
    if file_rows is not None:
        rows = int(file_rows * settings.initial_cache_rate)
        if settings.overflow.limited:
            rows = min(rows, settings.overflow.margin * settings.num_partitions)
        out.update(volatile_rows=rows, volatile_bytes=int(rows * per_row))
    return out


def _tables(config: ParameterServerConfig, db: Any) -> list[TableConfig]:
    tables = [t for m in config.models for t in m.tables]
    if tables or db is None:
        return tables
    return [  # --rocksdb alone: every table the database holds, in the format it stores
        TableConfig(name=n.split(".", 2)[-1], dim=db.dim(n), default_value=0.0,
                    max_keys_per_sample=1, sparse_file="", qualified_name=n, row_format=db.row_format(n))
        for n in db.table_names()
    ]


def inspect_tiers(config: ParameterServerConfig) -> dict[str, Any]:
    """The report as data: ``{"rocksdb": {...}, "volatile": {...}, "tables": [row, ...]}``."""
    db = _open_rocksdb(config)
    try:
        rows = []
        for table in _tables(config, db):
            name = table.qualified_name
            file_rows = _file_rows(table)
            row: dict[str, Any] = {"table": name, "dim": table.dim, "format": table.row_format.value,
                                   "row_bytes": table.row_format.row_bytes(table.dim), "file_rows": file_rows,
                                   "rocksdb_rows": None, "rocksdb_format": None, "rocksdb_bytes": None,
                                   "load": None}
            if db is not None and name in db.table_names():
                row.update(rocksdb_rows=db.estimate_rows(name), rocksdb_format=db.row_format(name).value,
                           rocksdb_bytes=db.disk_bytes(name), load=_load_state(db, table, name))
            row.update(_volatile(config, table, file_rows))
            rows.append(row)
        settings = config.persistent_db
        return {
            "rocksdb": {"path": settings.path if settings.enabled else None,
                        "exists": db is not None,
                        "dir_bytes": _dir_bytes(settings.path) if db is not None else None},
            "volatile": {"type": config.volatile_db.type,
                         "initial_cache_rate": config.volatile_db.initial_cache_rate},
            "tables": rows,
        }
    finally:
        if db is not None:
            db.close()


def _dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _human(n: Any) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain aligned table with a header and a footer line per tier."""
    cells = [[label for _, label in _COLUMNS]]
    for row in report["tables"]:
        line = []
        for key, _ in _COLUMNS:
            value = row[key]
            line.append(_human(value) if "bytes" in key else "-" if value is None else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    rdb, vol = report["rocksdb"], report["volatile"]
    where = rdb["path"] or "disabled"
    if rdb["path"] and not rdb["exists"]:
        where += " (no database yet)"
    lines.append(f"rocksdb: {where}" + (f", {_human(rdb['dir_bytes'])} on disk" if rdb["dir_bytes"] else ""))
    lines.append(f"volatile: {vol['type']}, initial_cache_rate {vol['initial_cache_rate']:g} "
                 "(hash map: per serving process; ~ = estimate)")
    lines.append("row size: one packed row in the table's format; volatile row~: the hash map's bytes per row, "
                 "overhead included")
    for row in report["tables"]:
        if row["rocksdb_format"] not in (None, row["format"]):
            lines.append(f"format mismatch: {row['table']} is {row['rocksdb_format']} in rocksdb but "
                         f"{row['format']} in the config: a server refuses to load it; serve it as "
                         f"{row['rocksdb_format']}, or drop it and load it again")
    return "\n".join(lines)
