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
- the hash map: in the host store (``host_shared``, the default) a table that a server filled
  is a file in /dev/shm, so inspect reports its real rows and bytes, and lists the namespace's
  store files (``host_stores``: rows, format, bytes, the model version, the attached processes,
  the keeper, repairs of dead writers; :func:`host_stores` lists every namespace on the host for
  ``hps inspect --stores``). A table no server filled yet, and a private map (``host_shared:
  false``, inside each serving process), get what a start-up load of ``initial_cache_rate``
  would take: ``rows × volatile_bytes_per_row``, the map's own steady-state estimate for the
  table's width, format and overflow settings (header, packed row and slots:
  :func:`hps_core.db.hash_map.estimate_bytes_per_row`);
- Redis (``volatile_db.type: redis_cluster``, or ``--redis``), shared, so asked: its rows
  (``HLEN``), the format it stores the table in (``redis_format``, from its metadata; a
  mismatch with the config's is listed like RocksDB's), and ``MEMORY USAGE`` of the table's
  hashes, in total and per row (``redis_bytes_per_row``: packed row, key and Redis's own
  overhead; sampled by Redis, so an estimate). A Redis that cannot be reached is named in
  the report, the rest of it still given;
- the embedding cache of a model that asks for one (``gpucache``): ``cache_bytes_per_row``,
  the bytes a row takes in its value store (:func:`hps_core.cache.base.row_stride`: the
  packed row, fp8 and int8 rounded up to 4 bytes). Slot metadata (keys, versions, LRU
  stamps: 24.125 bytes a slot in the dynamic GPU cache) is not counted; docs/cache.md,
  "Memory per row".

Output (:func:`format_report`): a plain aligned table; ``hps inspect`` (``hps_core/cli/inspect.py``)
prints it, or the report as JSON with ``--json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hps_core.config import ParameterServerConfig, TableConfig, gpu_cache_requested
from hps_core.db.base import DiskUsage, EmbeddingTier, MemoryUsage, PersistentDB, VolatileDB
from hps_core.errors import FormatError, TierError
from hps_core.formats import detect_format, sparse_model_rows

__all__ = ["format_host_stores", "format_report", "host_stores", "inspect_tiers"]

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
    ("redis_rows", "redis rows"),
    ("redis_format", "redis format"),
    ("redis_bytes_per_row", "redis row~"),
    ("redis_bytes", "redis mem~"),
    ("cache_bytes_per_row", "cache row"),
)
#: columns the text table leaves out when no table has a value in them
_OPTIONAL = ("volatile_rows", "volatile_bytes_per_row", "volatile_bytes", "redis_rows", "redis_format",
             "redis_bytes_per_row", "redis_bytes", "cache_bytes_per_row")


def _file_rows(table: TableConfig) -> int | None:
    try:
        if detect_format(table.sparse_file) == "hugectr":
            return sparse_model_rows(table.sparse_file, table.dim)[0]
    except (FormatError, OSError):
        return None
    return None


def _open_rocksdb(config: ParameterServerConfig) -> PersistentDB | None:
    """The persistent tier, read-only, through the factory; None when disabled or not created yet."""
    from hps_core.db import open_persistent_db

    settings = config.persistent_db
    if not settings.enabled or not Path(settings.path, "CURRENT").exists():
        return None
    return open_persistent_db(dataclasses.replace(settings, read_only=True, num_threads=1))


def _load_state(db: EmbeddingTier, table: TableConfig, name: str) -> str:
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


def host_stores(config: ParameterServerConfig | None = None) -> list[dict[str, Any]]:
    """The host store files of ``config``'s namespace (every namespace on this host when None;
    none when its volatile tier is not a host-shared hash map), as report rows."""
    from hps_core.db.shm_store import list_stores, namespace_of

    if config is None:
        infos = list_stores()
    elif config.volatile_db.type.in_process and config.volatile_db.host_shared:
        infos = list_stores(namespace_of(config.volatile_db, config.source))
    else:
        return []
    return [{**dataclasses.asdict(info), "version": info.version} for info in infos]


def format_host_stores(stores: list[dict[str, Any]]) -> str:
    """The host stores as an aligned table (one line saying there are none otherwise)."""
    if not stores:
        return f"host stores: none in {_shm_root()} (huge pages: {_huge_pages()})"
    cells = [["host store", "version", "dim", "format", "rows", "bytes", "state", "users (pids)", "keeper",
              "repairs"]]
    for st in stores:
        cells.append([st["path"], st["version"], str(st["dim"]), st["row_format"], str(st["rows"]),
                      _human(st["bytes"]), "complete" if st["complete"] else "filling",
                      ",".join(map(str, st["users"])) or "-", str(st["keeper"] or "-"), str(st["recoveries"])])
    return "\n".join([_aligned(cells),
                      f"host stores' huge pages: {_huge_pages()} (never: slower lookups, docs/deployment.md)"])


def gpu_caches() -> list[dict[str, Any]]:
    """The shared GPU caches on this host (one per model and GPU), as report rows."""
    from hps_core.cache.shared_gpu import list_caches

    return [dataclasses.asdict(info) for info in list_caches()]


def format_gpu_caches(caches: list[dict[str, Any]]) -> str:
    """The shared GPU caches as an aligned table (one line saying there are none otherwise)."""
    if not caches:
        return "shared GPU caches: none"
    cells = [["shared GPU cache", "GPU", "kind", "bytes", "state", "users (pids)", "GPU keeper", "kept by",
              "repairs"]]
    for c in caches:
        cells.append([c["path"], str(c["device"]), c["kind"], _human(c["bytes"]), "ready" if c["ready"] else "creating",
                      ",".join(map(str, c["users"])) or "-", str(c["keeper"] or "-"), str(c["kept_by"] or "-"),
                      str(c["repairs"])])
    return _aligned(cells)


def _aligned(cells: list[list[str]]) -> str:
    """Rows of cells, the first column left-aligned and the others right-aligned."""
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def _huge_pages() -> str:
    from hps_core.db.shm_store import huge_pages

    return huge_pages()


def _shm_root() -> str:
    from hps_core.db.shm_store import shm_root

    return str(shm_root())


def _open_redis(config: ParameterServerConfig) -> tuple[VolatileDB | None, dict[str, Any] | None]:
    """The shared volatile tier and the report's ``redis`` section; (None, None) when the volatile tier is not Redis. A Redis
    that cannot be reached gives (None, its section naming the error)."""
    from hps_core.db import open_volatile_db

    settings = config.volatile_db
    if not settings.type.shared:
        return None, None
    section: dict[str, Any] = {"address": settings.redis.address, "error": None}
    try:
        return open_volatile_db(settings), section
    except TierError as exc:
        section["error"] = str(exc)
        return None, section


def _redis(tier: VolatileDB | None, name: str, section: dict[str, Any]) -> dict[str, Any]:
    """Redis's rows, stored format and memory for table ``name`` (None each where unknown)."""
    out: dict[str, Any] = {"redis_rows": None, "redis_format": None, "redis_bytes_per_row": None,
                           "redis_bytes": None}
    if tier is None or section["error"]:
        return out
    try:
        if name not in tier.table_names():
            return out
        rows = tier.count(name)
        nbytes = tier.memory_bytes(name) if isinstance(tier, MemoryUsage) else None
        out.update(redis_rows=rows, redis_format=tier.row_format(name).value, redis_bytes=nbytes,
                   redis_bytes_per_row=round(nbytes / rows) if rows and nbytes is not None else None)
    except TierError as exc:  # a node failed mid-way: the report says so, the rest stands
        section["error"] = str(exc)
    return out


def _tables(config: ParameterServerConfig, *tiers: EmbeddingTier | None) -> list[TableConfig]:
    tables = [t for m in config.models for t in m.tables]
    if tables:
        return tables
    found: dict[str, TableConfig] = {}
    for tier in tiers:  # --rocksdb / --redis alone: every table they hold, in the format stored
        if tier is None:
            continue
        for n in tier.table_names():
            found.setdefault(n, TableConfig(name=n.split(".", 2)[-1], dim=tier.dim(n), default_value=0.0,
                                            max_keys_per_sample=1, sparse_file="", qualified_name=n,
                                            row_format=tier.row_format(n)))
    return [found[n] for n in sorted(found)]


def inspect_tiers(config: ParameterServerConfig) -> dict[str, Any]:
    """The report as data: ``{"rocksdb": {...}, "volatile": {...}, "tables": [row, ...]}``."""
    from hps_core.cache.base import row_stride

    db = _open_rocksdb(config)
    redis, redis_section = _open_redis(config)
    cached = {t.qualified_name for m in config.models if gpu_cache_requested(m) for t in m.tables}
    stores = host_stores(config)
    stored = {st["table"]: st for st in stores if st["complete"]}
    try:
        rows = []
        for table in _tables(config, db, redis):
            name = table.qualified_name
            file_rows = _file_rows(table)
            row: dict[str, Any] = {"table": name, "dim": table.dim, "format": table.row_format.value,
                                   "row_bytes": table.row_format.row_bytes(table.dim), "file_rows": file_rows,
                                   "rocksdb_rows": None, "rocksdb_format": None, "rocksdb_bytes": None,
                                   "load": None}
            if db is not None and name in db.table_names():
                rows_on_disk, bytes_on_disk = ((db.estimate_rows(name), db.disk_bytes(name))
                                               if isinstance(db, DiskUsage) else (db.count(name), None))
                row.update(rocksdb_rows=rows_on_disk, rocksdb_format=db.row_format(name).value,
                           rocksdb_bytes=bytes_on_disk, load=_load_state(db, table, name))
            row.update(_volatile(config, table, file_rows))
            if name in stored:  # filled by a server: what the host store really holds
                row.update(volatile_rows=stored[name]["rows"], volatile_bytes=stored[name]["bytes"],
                           volatile_bytes_per_row=round(stored[name]["bytes"] / max(1, stored[name]["rows"])))
            if redis_section is not None:
                row.update(_redis(redis, name, redis_section))
            row["cache_bytes_per_row"] = row_stride(table.row_format, table.dim) if name in cached else None
            rows.append(row)
        settings = config.persistent_db
        return {
            "rocksdb": {"path": settings.path if settings.enabled else None,
                        "exists": db is not None,
                        "dir_bytes": _dir_bytes(settings.path) if db is not None else None},
            "volatile": {"type": config.volatile_db.type,
                         "initial_cache_rate": config.volatile_db.initial_cache_rate},
            "redis": redis_section,
            "host_stores": stores,
            "tables": rows,
        }
    finally:
        if db is not None:
            db.close()
        if redis is not None:
            redis.close()


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
    columns = [(key, label) for key, label in _COLUMNS
               if key not in _OPTIONAL or any(row.get(key) is not None for row in report["tables"])]
    cells = [[label for _, label in columns]]
    for row in report["tables"]:
        line = []
        for key, _ in columns:
            value = row.get(key)
            line.append(_human(value) if "bytes" in key else "-" if value is None else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    rdb, vol = report["rocksdb"], report["volatile"]
    where = rdb["path"] or "disabled"
    if rdb["path"] and not rdb["exists"]:
        where += " (no database yet)"
    lines.append(f"rocksdb: {where}" + (f", {_human(rdb['dir_bytes'])} on disk" if rdb["dir_bytes"] else ""))
    lines.append(f"volatile: {vol['type']}, initial_cache_rate {vol['initial_cache_rate']:g} "
                 "(hash map: the host store's files where a server filled them, else estimates; ~ = estimate)")
    redis = report.get("redis")
    if redis is not None:
        lines.append(f"redis: {redis['address']}" + (f", unreachable or failed: {redis['error']}" if redis["error"] else ""))
    lines.append("row size: one packed row in the table's format; volatile row~: the hash map's bytes per row, "
                 "overhead included")
    if any(key == "redis_bytes_per_row" for key, _ in columns):
        lines.append("redis row~: Redis's MEMORY USAGE of the table's hashes per row (key, packed row, overhead)")
    if any(key == "cache_bytes_per_row" for key, _ in columns):
        lines.append("cache row: one row in the embedding cache's value store (slot metadata not counted: "
                     "+24.125 B a slot in the dynamic GPU cache, docs/cache.md)")
    if report.get("host_stores"):
        lines.append(format_host_stores(report["host_stores"]))
    for row in report["tables"]:
        for tier in ("rocksdb", "redis"):
            stored = row.get(f"{tier}_format")
            if stored not in (None, row["format"]):
                lines.append(f"format mismatch: {row['table']} is {stored} in {tier} but "
                             f"{row['format']} in the config: a server refuses to load it; serve it as "
                             f"{stored}, or drop it and load it again")
    return "\n".join(lines)
