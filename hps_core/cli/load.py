"""``hps load``: the tables of an HPS JSON, or one .npy/.npz table, into the tiers (hps_core/loader.py)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from hps_core.config import ParameterServerConfig, TableConfig, TierType, VolatileDBConfig, load_config
from hps_core.errors import ConfigError
from hps_core.loader import DEFAULT_CHUNK_ROWS, TIERS, load_config_tables, select_tables
from hps_core.row_formats import FORMAT_NAMES, RowFormat

__all__ = ["add_load", "cli_config", "run_load"]


def add_load(parser: argparse.ArgumentParser) -> None:
    """Set up ``hps load``."""
    parser.description = (
            "Load the embedding tables of an HPS JSON (HugeCTR sparse model folders) or one "
            ".npy/.npz table into the chosen tiers, each in its row format (fp32, fp16, fp8, "
            "int8: quantised from the file's float32 rows). Resumable: a load that is killed and run "
            "again ends with the same content; a rerun of a finished load writes nothing. "
            "Servers may keep serving from read-only or secondary handles meanwhile."
        )
    parser.add_argument("--config", metavar="HPS_JSON", help="HugeCTR HPS JSON naming the tiers and models")
    parser.add_argument("--model", action="append", metavar="NAME", help="load only this model (repeatable)")
    parser.add_argument("--tables", metavar="T1,T2", help="load only these tables (plain or hps_et.<model>.<table>)")
    parser.add_argument("--tier", choices=TIERS, default="persistent", help="tiers to fill (default: %(default)s)")
    parser.add_argument("--redis", metavar="HOST:PORT[,...]", help="volatile tier: this Redis (cluster) instead of the config's")
    parser.add_argument("--rocksdb", metavar="DIR", help="persistent tier: this RocksDB folder instead of the config's")
    parser.add_argument("--npy", metavar="PATH", help="load this .npz file or keys.npy/vectors.npy folder instead of the config's tables")
    parser.add_argument("--table", metavar="NAME", help="with --npy: table name, e.g. hps_et.dlrm.cat0")
    parser.add_argument("--dim", type=int, metavar="D", help="with --npy: vector width")
    parser.add_argument("--format", choices=FORMAT_NAMES, default=None,
                        help="with --npy: the row format the table is stored in (default: the format "
                             "--config declares for --table, else fp32); config tables take "
                             "embedding_format_per_table / fp8_quant")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, metavar="N",
                        help="rows per step (one SST file each; default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_load)


def cli_config(path: str | None, *, rocksdb: str | None = None, redis: str | None = None) -> ParameterServerConfig:
    """The HPS config of ``--config PATH`` with ``--rocksdb``/``--redis`` applied (or one built
    from those alone)."""
    config = load_config(path) if path else ParameterServerConfig(
        volatile_db=VolatileDBConfig(type=TierType.DISABLED), source="<command line>")
    if rocksdb:
        config = dataclasses.replace(config, persistent_db=dataclasses.replace(
            config.persistent_db, type=TierType.ROCKS_DB, path=str(Path(rocksdb).absolute())))
    if redis:
        vdb = config.volatile_db if config.volatile_db.type.shared else VolatileDBConfig(
            type=TierType.REDIS_CLUSTER, initial_cache_rate=config.volatile_db.initial_cache_rate)
        config = dataclasses.replace(config, volatile_db=dataclasses.replace(
            vdb, redis=dataclasses.replace(vdb.redis, address=redis)))
    if not path and not rocksdb and not redis:
        raise ConfigError("give --config HPS_JSON, or --rocksdb DIR / --redis HOST:PORT")
    return config


def _npy_table(args: argparse.Namespace, config: ParameterServerConfig) -> TableConfig:
    if not args.table or args.dim is None:
        raise ConfigError("--npy needs --table NAME (e.g. hps_et.dlrm.cat0) and --dim D")
    if not args.table.startswith("hps_et.") or args.table.count(".") < 2:
        raise ConfigError(f"--table {args.table!r}: tables are named hps_et.<model>.<table>")
    path = str(Path(args.npy).absolute())
    return TableConfig(name=args.table.split(".", 2)[2], dim=args.dim, default_value=0.0,
                       max_keys_per_sample=1, sparse_file=path, qualified_name=args.table,
                       row_format=_npy_format(args, config))


def _npy_format(args: argparse.Namespace, config: ParameterServerConfig) -> RowFormat:
    """``--format``; a table ``--config`` declares takes the config's format (a server would
    refuse it stored in another), and a ``--format`` saying otherwise is refused."""
    declared = [t for m in config.models for t in m.tables if t.qualified_name == args.table]
    if not declared:
        return RowFormat(args.format) if args.format else TableConfig.row_format
    fmt = declared[0].row_format
    if args.format and args.format != fmt.value:
        raise ConfigError(
            f"--format {args.format}: {config.source} declares {args.table} as {fmt} "
            "(embedding_format_per_table / fp8_quant), and a server with that config refuses the "
            f"table stored as {args.format}. Fix: leave out --format (the table is loaded as {fmt}), "
            "or change the config's format"
        )
    return fmt


def run_load(args: argparse.Namespace) -> int:
    """``hps load``: print one line per table and tier, rows written."""
    config = cli_config(args.config, rocksdb=args.rocksdb, redis=args.redis)
    if args.npy:
        tables = [_npy_table(args, config)]
    else:
        if args.format:
            raise ConfigError(f"--format {args.format} is for --npy tables; a config's tables are loaded in "
                              "the format it declares (embedding_format_per_table / fp8_quant)")
        if not args.config:
            raise ConfigError("give --config HPS_JSON (or --npy PATH --table NAME --dim D)")
        names = [t for t in (args.tables or "").split(",") if t]
        tables = select_tables(config, args.model, names)
    report = load_config_tables(config, tables, tier=args.tier, progress=not args.no_progress,
                                chunk_rows=args.chunk_rows)
    for tier_name, rows in report.items():
        for table, written in rows.items():
            state = "already loaded" if written == 0 else f"{written} rows written"
            print(f"hps load: {tier_name:<10} {table}: {state}", flush=True)
    return 0
