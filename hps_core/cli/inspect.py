"""``hps inspect``: what the tiers hold, per table (hps_core/inspection.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from hps_core.cli.load import cli_config
from hps_core.errors import ConfigError
from hps_core.inspection import (
    format_gpu_caches,
    format_host_stores,
    format_report,
    gpu_caches,
    host_stores,
    inspect_tiers,
)

__all__ = ["add_inspect", "run_inspect"]


def add_inspect(parser: argparse.ArgumentParser) -> None:
    """Set up ``hps inspect``."""
    parser.description = ("Report, per table, its row format and bytes per packed row, the rows of its "
                     "sparse file, RocksDB's row estimate, stored format, disk size and load state, "
                     "the memory the hash map would take, Redis's rows, stored format and memory "
                     "per row, and the bytes a row takes in the embedding cache.")
    parser.add_argument("--config", metavar="HPS_JSON", help="HugeCTR HPS JSON")
    parser.add_argument("--rocksdb", metavar="DIR", help="RocksDB folder (instead of, or overriding, the config's)")
    parser.add_argument("--redis", metavar="HOST:PORT[,...]", help="Redis (cluster) (instead of, or overriding, the config's)")
    parser.add_argument("--stores", action="store_true",
                        help="list every host store file on this host (/dev/shm/hps.*): table, model version, rows, "
                             "format, bytes, attached processes, keeper; then the shared GPU caches (model, GPU, kind, "
                             "bytes, attached processes, keepers); --json: {\"host_stores\": [...], \"gpu_caches\": [...]}")
    parser.add_argument("--remove-orphans", action="store_true",
                        help="with --stores: first remove the store files no live process uses and no live keeper "
                             "keeps (left by servers that all died, Triton started directly); a host store made with "
                             "shared_memory_auto_remove: false is kept")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    """``hps inspect``: print the report."""
    if args.stores and not (args.config or args.rocksdb or args.redis):
        if args.remove_orphans:
            from hps_core.db.shm_store import remove_orphaned_stores

            for path in remove_orphaned_stores():
                print(f"removed orphaned {path}", file=sys.stderr, flush=True)
        stores, caches = host_stores(), gpu_caches()
        if args.json:
            print(json.dumps({"host_stores": stores, "gpu_caches": caches}, indent=2), flush=True)
        else:
            print(f"{format_host_stores(stores)}\n\n{format_gpu_caches(caches)}", flush=True)
        return 0
    if not args.config and not args.rocksdb and not args.redis:
        raise ConfigError("give --config HPS_JSON, or --rocksdb DIR / --redis HOST:PORT, or --stores")
    config = cli_config(args.config, rocksdb=args.rocksdb, redis=args.redis)
    if not args.config:
        config = dataclasses.replace(config, source=args.rocksdb or args.redis)
    report = inspect_tiers(config)
    print(json.dumps(report, indent=2) if args.json else format_report(report), flush=True)
    return 0
