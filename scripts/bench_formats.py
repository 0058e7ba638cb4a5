#!/usr/bin/env python
"""Row formats side by side (issue 12): accuracy of the served demo DLRM, memory per tier and
lookup rate for fp32, fp16, fp8 and int8 tables, in one run.

    .venv/bin/python scripts/bench_formats.py                       # the demo's size, ~10 min on 2 cores
    .venv/bin/python scripts/bench_formats.py --parts memory lookup  # no Triton (the demo is still trained)
    .venv/bin/python scripts/bench_formats.py --smoke --out /tmp/bf  # tiny: tests/e2e/test_bench_formats_smoke.py

What one run does:

served   Trains the demo DLRM once (hps_demo/train.py: ``--samples`` synthetic samples, 90 %
         train, ``--epochs``; table sizes from the committed HPS JSON and ``--rows-scale``),
         exports it once (the rows training saw as HugeCTR sparse folders, the dense network),
         then for each format serves it through the real Triton (``hps_core.serving.TritonServer``)
         from a copy of the committed ``model_repository/`` whose HPS JSON is the committed one
         with ``embedding_format_per_table: <fmt>``, the exported tables and a RocksDB of its
         own; the held-out samples go to the ``dlrm`` ensemble over gRPC (``--batch`` samples per
         request). Per format: AUC of the served scores and max / mean |score - fp32 score|.
memory   The same tables (and synthetic ones at ``--dims``, ``--synthetic-tables`` x
         ``--synthetic-rows``, the widths the issue states its targets at), loaded per format
         through ``hps_core.loader.load_table`` as the server does, measured in this process:
         hash map = RSS growth of loading them into a ``HashMapVolatileDB`` (allocator trimmed
         before and after); Redis = ``INFO memory`` used_memory growth and the summed ``MEMORY
         USAGE`` of the tier's hashes, on a ``redis-server`` started here on a free loopback
         port (stopped by PID at the end); RocksDB = size of its SST files after a flush and a
         full compaction; CPU cache = the bytes of the CPU twin's arrays (the GPU cache's
         layout) sized for the tables' rows, over its capacity in rows. Keys and every overhead
         are included.
lookup   ``LookupSession.lookup`` of ``--lookup-samples``-sample requests (every table, one key
         per table and sample) over the hash map holding every row, without and with the CPU
         cache in front (4x the rows, warmed with every row); the formats interleaved, medians;
         keys/s and the ratio to fp32 from the same run. Demo tables: the held-out samples'
         keys; synthetic tables: power-law keys (alpha ``--alpha``).

Prints the machine, the command and one markdown table (formats side by side, ratio to fp32 in
every cell), then the issue's targets met or missed; writes ``<out>/bench_formats_<time>.json``
(default ``work/bench_formats``).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hps_core.cache import make_multi_table_cache  # noqa: E402
from hps_core.config import ModelConfig, ParameterServerConfig, parse_config  # noqa: E402
from hps_core.db import open_persistent_db, open_volatile_db  # noqa: E402
from hps_core.formats import read_sparse_model, write_sparse_model  # noqa: E402
from hps_core.loader import load_table  # noqa: E402
from hps_core.lookup import LookupSession  # noqa: E402
from hps_core.row_formats import FORMAT_NAMES, RowFormat  # noqa: E402
from hps_core.serving import TritonServer  # noqa: E402
from hps_demo.bench.harness import (  # noqa: E402
    Row,
    command_line,
    interleaved,
    machine_with_gpus,
    markdown,
    rotating,
    write_report,
)
from hps_demo.bench.tables import (  # noqa: E402
    Device,
    cache_hits,
    draw_rows,
    hit_rate_of,
    make_request,
    make_tables,
    warm_cache,
)
from hps_demo.client import dlrm_request, hps_request, infer, make_client  # noqa: E402
from hps_demo.data import DEMO_ROWS_PER_TABLE, Dataset, auc, make_dataset, train_test_split  # noqa: E402
from hps_demo.train import export_model, score, train_dlrm  # noqa: E402
COMMITTED = ROOT / "model_repository"
HPS_MODEL = "hps_embedding"
ENSEMBLE = "dlrm"
CACHE_HEADROOM = 4  # cache capacity in multiples of a table's rows: every row stays resident
_DENSE_WEIGHTS = re.compile(r'(key:\s*"dense_weights"\s*value:\s*\{\s*string_value:\s*")[^"]*(")')
TIERS = ("hash_map", "redis_used", "redis_usage", "rocksdb", "cpu_cache")
TIER_LABELS = {
    "hash_map": "hash map, RSS growth",
    "redis_used": "Redis, used_memory growth",
    "redis_usage": "Redis, MEMORY USAGE",
    "rocksdb": "RocksDB, SST after compaction",
    "cpu_cache": "CPU cache arrays / capacity",
}
LOOKUP_LABELS = {"hash_map": "hash map", "cpu_cache": "CPU cache + hash map"}


# --------------------------------------------------------------------------- tables


@dataclass
class TableSet:
    """Tables measured together: one sparse folder per table, all ``dim`` wide, and the
    lookup requests ((1, T*B) int64 KEYS table-major, (1, T) int32 NUMKEYS) to time on them."""

    label: str
    dim: int
    sparse_files: list[Path]
    rows: list[int]
    requests: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


def hps_document(base: dict[str, Any], tables: TableSet, fmt: str, **sections: Any) -> dict[str, Any]:
    """``base`` (an HPS JSON with one model) serving ``tables`` in format ``fmt``; ``sections``
    replace top-level sections (volatile_db, persistent_db)."""
    doc = copy.deepcopy(base)
    doc.update(sections)
    n = len(tables.sparse_files)
    doc["models"][0].update(
        sparse_files=[str(p) for p in tables.sparse_files], embedding_table_names=[f"table{i}" for i in range(n)],
        embedding_vecsize_per_table=[tables.dim] * n, maxnum_catfeature_query_per_table_per_sample=[1] * n,
        default_value_for_each_table=[0.0] * n, embedding_format_per_table=fmt)
    return doc


def parsed(doc: dict[str, Any], where: str) -> tuple[ParameterServerConfig, ModelConfig]:
    config = parse_config(doc, where, base_dir=COMMITTED / HPS_MODEL)  # the base's relative paths
    return config, config.models[0]


def synthetic_set(args: argparse.Namespace, dim: int, folder: Path) -> TableSet:
    """``--synthetic-tables`` tables of ``--synthetic-rows`` normal rows (the lookup
    benchmarks' tables, hps_demo/bench/tables.py), written as sparse folders, and power-law requests over them."""
    tables = make_tables(args.synthetic_tables, args.synthetic_rows, dim, args.seed)
    files = []
    for t in range(tables.n):
        files.append(folder / f"dim{dim}" / f"table{t}.model")
        rows = slice(t * tables.rows, (t + 1) * tables.rows)
        write_sparse_model(files[-1], tables.key_maps[t], tables.dense[rows] * np.float32(0.05))
    rng = np.random.default_rng([args.seed, dim])
    requests = []
    for _ in range(args.request_sets):
        r = make_request(tables, draw_rows(rng, tables, args.lookup_samples, "powerlaw", args.alpha))
        requests.append((r.keys[None, :], r.numkeys[None, :]))
    return TableSet(f"synthetic, dim {dim}", dim, files, [tables.rows] * tables.n, requests)


# --------------------------------------------------------------------------- the demo model


@dataclass
class Trained:
    tables: TableSet
    dense_weights: Path
    test: Dataset
    reference: np.ndarray  # in-process scores of the held-out samples, unseen rows at the default
    seconds: float


def train_and_export(args: argparse.Namespace, base: dict[str, Any], folder: Path) -> Trained:
    _, model = parsed(base, str(COMMITTED / HPS_MODEL / "hps.json"))
    n = len(model.tables)
    sizes = [max(100, int(r * args.rows_scale)) for r in DEMO_ROWS_PER_TABLE[:n]]
    print(f"== training the demo DLRM: {args.samples:,} samples, {n} tables ({sum(sizes):,} rows), dim "
          f"{model.tables[0].dim}, {args.epochs} epoch(s)", flush=True)
    started = time.monotonic()
    data = make_dataset(args.samples, n_tables=n, rows_per_table=sizes, alpha=args.alpha, seed=args.seed)
    train, test = train_test_split(data, test_fraction=0.1, seed=args.seed)
    net, _ = train_dlrm(train, dim=model.tables[0].dim, epochs=args.epochs, seed=args.seed)
    shutil.rmtree(folder, ignore_errors=True)
    exported = export_model(net, data.key_maps, sparse_files=[folder / f"{t.name}.model" for t in model.tables],
                            dense_weights=folder / "dense.pt")
    seconds = time.monotonic() - started
    print(f"trained and exported in {seconds:.0f} s: {sum(exported.rows_per_table):,} rows seen", flush=True)
    requests = [hps_request(test.keys[i : i + args.lookup_samples])
                for i in range(0, min(len(test), args.request_sets * args.lookup_samples), args.lookup_samples)]
    tables = TableSet(f"demo DLRM, dim {exported.dim}", exported.dim, list(exported.sparse_files),
                      list(exported.rows_per_table), [(r["KEYS"], r["NUMKEYS"]) for r in requests])
    reference = score(net, test, unseen_default=model.tables[0].default_value)
    return Trained(tables, exported.dense_weights, test, reference, seconds)


def write_repository(dest: Path, hps: dict[str, Any], dense_weights: Path) -> Path:
    """The committed repository's config.pbtxt files (the dense weights' path filled in) and
    ``hps`` as the HPS JSON, under ``dest``."""
    shutil.rmtree(dest, ignore_errors=True)
    for model_dir in sorted(p for p in COMMITTED.iterdir() if (p / "config.pbtxt").is_file()):
        (dest / model_dir.name / "1").mkdir(parents=True)
        text = _DENSE_WEIGHTS.sub(rf"\g<1>{dense_weights}\g<2>", (model_dir / "config.pbtxt").read_text())
        (dest / model_dir.name / "config.pbtxt").write_text(text)
    (dest / HPS_MODEL / "hps.json").write_text(json.dumps(hps, indent=2) + "\n")
    return dest


def bench_served(args: argparse.Namespace, base: dict[str, Any], trained: Trained, folder: Path) -> Row:
    """Serve the demo DLRM in each format; AUC and the scores' distance to fp32's."""
    test, batch = trained.test, args.batch
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for fmt in args.formats:
        dest = folder / fmt
        persistent = {**base["persistent_db"], "path": str(dest / "rocksdb")}
        repository = write_repository(dest / "repository", hps_document(base, trained.tables, fmt, persistent_db=persistent),
                                      trained.dense_weights)
        started = time.monotonic()
        with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, log_file=dest / "triton.log",
                          startup_timeout=900) as server:
            client = make_client("grpc", server.grpc_url)
            scores[fmt] = np.concatenate([
                infer(client, ENSEMBLE, dlrm_request(test.keys[i : i + batch], test.dense[i : i + batch]).as_dict(),
                      "SCORE")[0]
                for i in range(0, len(test), batch)])
            client.close()
        seconds[fmt] = time.monotonic() - started
        print(f"served {fmt}: AUC {auc(test.label, scores[fmt]):.4f} ({seconds[fmt]:.0f} s with start-up)", flush=True)
    baseline = scores["fp32"].astype(np.float64)  # parse_args insists on fp32
    per_format: dict[str, Row] = {}
    for fmt, s in scores.items():
        diff = np.abs(s - baseline)
        per_format[fmt] = {"auc": auc(test.label, s), "seconds": round(seconds[fmt], 1),
                           "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
    return {"samples": len(test), "batch": batch, "in_process_auc": auc(test.label, trained.reference),
            "fp32_vs_in_process_max_abs_diff": float(np.abs(baseline - trained.reference).max()),
            "train_seconds": round(trained.seconds, 1), "formats": per_format}


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then keeps what the allocator holds
        pass


def settled_rss() -> int:
    """RSS after a garbage collection and with the allocator's free pages given back."""
    gc.collect()
    _malloc_trim()
    return rss_bytes()


def load_all(db: Any, model: ModelConfig) -> int:
    return sum(load_table(db, table) for table in model.tables)


def measure_hash_map(config: ParameterServerConfig, model: ModelConfig) -> tuple[Row, Any]:
    """RSS growth of loading ``model``'s tables into a hash map; the loaded tier is returned
    open (the lookups run on it). The private map (``host_shared: false``): the four formats'
    tiers are open at once under the same table names, which one host store would refuse."""
    before = settled_rss()
    db = open_volatile_db(dataclasses.replace(config.volatile_db, host_shared=False))
    rows = load_all(db, model)
    grown = settled_rss() - before
    return {"rows": rows, "bytes": grown, "allocated_bytes": db.memory_bytes()}, db


def measure_redis(config: ParameterServerConfig, model: ModelConfig, client: Any) -> tuple[Row, Row]:
    """used_memory growth and summed MEMORY USAGE of loading ``model``'s tables into Redis."""
    client.flushall()
    before = int(client.info("memory")["used_memory"])
    db = open_volatile_db(config.volatile_db)
    try:
        rows = load_all(db, model)
        used = int(client.info("memory")["used_memory"]) - before
        usage = sum(db.memory_bytes(t.qualified_name) for t in model.tables)
    finally:
        db.close()
        client.flushall()
    return {"rows": rows, "bytes": used}, {"rows": rows, "bytes": usage}


def measure_rocksdb(config: ParameterServerConfig, model: ModelConfig) -> Row:
    """SST bytes of ``model``'s tables after a flush and a full compaction of every column family."""
    from rocksdict import Options, Rdict

    path = Path(config.persistent_db.path)
    shutil.rmtree(path, ignore_errors=True)
    db = open_persistent_db(config.persistent_db)
    try:
        rows = load_all(db, model)
        db.flush()
        flushed = sum(db.disk_bytes(t.qualified_name) for t in model.tables)
    finally:
        db.close()
    raw = Rdict(str(path), Options(raw_mode=True))  # every column family, opened as they are
    try:
        for name in Rdict.list_cf(str(path)):
            raw.get_column_family(name).compact_range(None, None)
    finally:
        raw.close()
    sst = sum(f.stat().st_size for f in path.rglob("*.sst"))
    shutil.rmtree(path, ignore_errors=True)
    return {"rows": rows, "bytes": sst, "flushed_bytes": flushed}


def array_bytes(cache: Any) -> int:
    """Bytes of the arrays a CPU cache object holds (keys, slot state and packed rows)."""
    return sum(v.nbytes for v in vars(cache).values() if isinstance(v, np.ndarray))


def make_cache(model: ModelConfig, rows: Sequence[int], headroom: int = CACHE_HEADROOM) -> Any:
    """The CPU twin of the model's dynamic cache, ``headroom`` x ``rows[t]`` rows per table."""
    return make_multi_table_cache("dynamic", device="cpu", capacities=[headroom * r for r in rows],
                                  dims=[t.dim for t in model.tables], row_formats=[t.row_format for t in model.tables])


def per_row(row: Row) -> Row:
    return {**row, "bytes_per_row": row["bytes"] / max(1, row["rows"])}


@dataclass
class Redis:
    """A redis-server started here (tests/redis_servers.py) and a redis-py client of it."""

    address: str
    client: Any


@contextmanager
def redis_server(folder: Path, wanted: bool) -> Iterator[Redis | None]:
    if not wanted:
        yield None
        return
    import redis

    from tests.redis_servers import RedisProcesses

    servers = RedisProcesses.single(folder)
    client = redis.Redis(host="127.0.0.1", port=servers.servers[0].port)
    try:
        yield Redis(servers.address, client)
    finally:
        client.close()
        servers.stop()


def warm_up(args: argparse.Namespace, folder: Path) -> None:
    """Load and read a tiny table in every format once, so the kernels' compilation is not
    counted in the first measurement's RSS."""
    tiny = make_tables(1, 64, 8, args.seed)
    write_sparse_model(folder / "table0.model", tiny.key_maps[0], tiny.dense)
    tables = TableSet("warm-up", 8, [folder / "table0.model"], [64])
    for fmt in args.formats:
        config, model = parsed(hps_document(args.base, tables, fmt, volatile_db=args.hash_map), "warm-up")
        _, db = measure_hash_map(config, model)
        cache = make_cache(model, tables.rows)
        warm_cache(cache, Device("cpu"), [tiny.key_maps[0]], [tiny.dense])
        with closing_session(model, db, cache) as session:
            session.lookup(tiny.key_maps[0][None, :8], np.array([[8]], np.int32))
        db.close()


@contextmanager
def closing_session(model: ModelConfig, db: Any, cache: Any = None) -> Iterator[LookupSession]:
    session = LookupSession(model, volatile=db, persistent=None, cache=cache)
    try:
        yield session
    finally:
        session.close()


def bench_set(args: argparse.Namespace, tables: TableSet, folder: Path, redis: Redis | None) -> Row:
    """Memory per tier and lookup rate of ``tables`` in every format."""
    print(f"== {tables.label}: {len(tables.sparse_files)} tables, {tables.total_rows:,} rows", flush=True)
    memory: dict[str, dict[str, Row]] = {tier: {} for tier in TIERS}
    hash_maps, models = {}, {}
    try:
        for fmt in args.formats:
            rocks = {"type": "rocks_db", "path": str(folder / f"rocksdb_{fmt}")}
            config, model = models[fmt] = parsed(hps_document(args.base, tables, fmt, volatile_db=args.hash_map,
                                                              persistent_db=rocks), tables.label)
            row, hash_maps[fmt] = measure_hash_map(config, model)
            memory["hash_map"][fmt] = per_row(row)
            if "memory" not in args.parts:
                continue
            if redis is not None:
                section = {**args.hash_map, "type": "redis_cluster", "address": redis.address}
                redis_config, _ = parsed(hps_document(args.base, tables, fmt, volatile_db=section), tables.label)
                used, usage = measure_redis(redis_config, model, redis.client)
                memory["redis_used"][fmt], memory["redis_usage"][fmt] = per_row(used), per_row(usage)
            memory["rocksdb"][fmt] = per_row(measure_rocksdb(config, model))
            cache = make_cache(model, tables.rows, headroom=1)  # room for the tables' rows
            memory["cpu_cache"][fmt] = per_row({"rows": int(np.sum(cache.capacities)), "bytes": array_bytes(cache)})
            del cache
            print(f"  {fmt}: " + ", ".join(f"{tier} {memory[tier][fmt]['bytes_per_row']:.1f} B/row"
                                           for tier in TIERS if fmt in memory[tier]), flush=True)
        lookups = bench_lookups(args, tables, {f: m for f, (_, m) in models.items()}, hash_maps) \
            if "lookup" in args.parts else {}
    finally:
        for db in hash_maps.values():
            db.close()
    packed = {fmt: RowFormat(fmt).row_bytes(tables.dim) for fmt in args.formats}
    return {"label": tables.label, "dim": tables.dim, "tables": len(tables.sparse_files), "rows": tables.total_rows,
            "packed_row_bytes": packed, "memory": {t: m for t, m in memory.items() if m}, "lookup": lookups}


def bench_lookups(args: argparse.Namespace, tables: TableSet, models: dict[str, ModelConfig],
                  hash_maps: dict[str, Any]) -> dict[str, dict[str, Row]]:
    """keys/s of every format, hash map alone and with the CPU cache, interleaved."""
    keys_per_request = int(tables.requests[0][1].sum())
    out: dict[str, dict[str, Row]] = {"hash_map": {}, "cpu_cache": {}}
    sessions: dict[tuple[str, str], LookupSession] = {}
    try:
        for fmt, model in models.items():
            sessions[("hash_map", fmt)] = LookupSession(model, volatile=hash_maps[fmt], persistent=None)
            cache = make_cache(model, tables.rows)
            sparse = [read_sparse_model(t.sparse_file, t.dim) for t in model.tables]
            warm_cache(cache, Device("cpu"), [s.keys for s in sparse], [s.vectors for s in sparse])
            sessions[("cpu_cache", fmt)] = LookupSession(model, volatile=hash_maps[fmt], persistent=None, cache=cache)
        before = {key: cache_hits(s) for key, s in sessions.items()}
        calls = {key: rotating([lambda s=s, k=k, n=n: s.lookup(k, n) for k, n in tables.requests])
                 for key, s in sessions.items()}
        timed = interleaved({f"{variant} {fmt}": call for (variant, fmt), call in calls.items()},
                            args.min_seconds, args.min_reps, args.max_seconds)
        for (variant, fmt), session in sessions.items():
            t = timed[f"{variant} {fmt}"]
            out[variant][fmt] = {"keys_per_s": keys_per_request / t["median_s"], "median_ms": t["median_s"] * 1e3,
                                 "reps": t["reps"], "keys_per_request": keys_per_request,
                                 "hit_rate": hit_rate_of(session, before[(variant, fmt)])}
        for variant, rows in out.items():
            print(f"  lookup {variant}: " + ", ".join(f"{fmt} {r['keys_per_s'] / 1e6:.2f} M keys/s"
                                                    for fmt, r in rows.items()), flush=True)
    finally:
        for session in sessions.values():
            session.close()
    return out


# --------------------------------------------------------------------------- report


def _cell(value: float, base: float, text: str) -> str:
    """``text`` (the value) and its ratio to fp32's ``base``."""
    return f"{text} ({value / base:.2f}×)"


def report_table(result: Row) -> str:
    """One markdown table: a metric per row, the formats side by side, ratios to fp32."""
    formats = result["formats"]
    rows: list[list[str]] = []
    if "served" in result:
        served = result["served"]["formats"]
        fp32_auc = served["fp32"]["auc"]
        rows.append([f"served AUC ({result['served']['samples']:,} held-out samples)"] + [
            f"{served[f]['auc']:.4f}" + ("" if f == "fp32" else f" ({served[f]['auc'] - fp32_auc:+.1e})")
            for f in formats])
        rows.append(["max / mean \\|score − fp32 score\\|"] + [
            f"{served[f]['max_abs_diff']:.1e} / {served[f]['mean_abs_diff']:.1e}" for f in formats])
    for s in result["sets"]:
        where = f"{s['label']}, {s['tables']} tables, {s['rows']:,} rows"
        packed = s["packed_row_bytes"]
        rows.append([f"{where}: packed row, B"] + [_cell(packed[f], packed["fp32"], str(packed[f])) for f in formats])
        for tier, cells in s["memory"].items():
            base = cells["fp32"]["bytes_per_row"]
            rows.append([f"{where}: {TIER_LABELS[tier]}, B/row; total"] + [
                _cell(cells[f]["bytes_per_row"], base, f"{cells[f]['bytes_per_row']:.1f}")
                + f"; {cells[f]['bytes'] / 2**20:.1f} MiB" for f in formats])
        for variant, cells in s["lookup"].items():
            base = cells["fp32"]["keys_per_s"]
            rows.append([f"{where}: lookup, {LOOKUP_LABELS[variant]}, M keys/s"] + [
                _cell(cells[f]["keys_per_s"], base, f"{cells[f]['keys_per_s'] / 1e6:.2f}") for f in formats])
    table = markdown(["", *formats], rows)
    return table.replace("|---:|", "|---|", 1)  # the label column reads left-aligned


def targets(result: Row) -> list[Row]:
    """Issue 12's targets, each with the measured figure and whether it is met."""
    out: list[Row] = []
    served = result.get("served", {}).get("formats", {})
    for fmt, limit in (("int8", 0.001), ("fp8", 0.003)):
        if fmt in served:
            change = served[fmt]["auc"] - served["fp32"]["auc"]
            out.append({"target": f"{fmt} AUC within {limit} of fp32", "measured": f"{change:+.1e}",
                        "met": abs(change) <= limit})
    for s in result["sets"]:
        if "int8" not in s["packed_row_bytes"]:
            continue
        limit = 0.3 if s["dim"] >= 128 else 0.5
        for tier, cells in s["memory"].items():
            ratio = cells["int8"]["bytes_per_row"] / cells["fp32"]["bytes_per_row"]
            out.append({"target": f"int8 memory per row ≤ {limit}× fp32 at dim {s['dim']}: {s['label']}, "
                                  f"{TIER_LABELS[tier]}", "measured": f"{ratio:.3f}×", "met": ratio <= limit})
        for variant, cells in s["lookup"].items():
            ratio = cells["int8"]["keys_per_s"] / cells["fp32"]["keys_per_s"]
            out.append({"target": f"int8 lookup rate ≥ fp32: {s['label']}, {LOOKUP_LABELS[variant]}",
                        "measured": f"{ratio:.3f}×", "met": ratio >= 1.0})
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", choices=FORMAT_NAMES, default=list(FORMAT_NAMES),
                   help="formats to compare (fp32 is the baseline of every ratio)")
    p.add_argument("--parts", nargs="+", choices=["served", "memory", "lookup"], default=["served", "memory", "lookup"])
    p.add_argument("--smoke", action="store_true", help="a tiny configuration (CI): every part, seconds each")
    p.add_argument("--samples", type=int, default=None, help="synthetic samples, train + held-out (300,000; smoke 6,000)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (2; smoke 1)")
    p.add_argument("--rows-scale", type=float, default=None, help="scale of the demo's rows per table (1; smoke 0.02)")
    p.add_argument("--alpha", type=float, default=1.2, help="power-law exponent of key popularity")
    p.add_argument("--batch", type=int, default=1024, help="samples per served request")
    p.add_argument("--dims", type=int, nargs="*", default=None, help="synthetic table widths (128 16; smoke 16)")
    p.add_argument("--synthetic-tables", type=int, default=None, help="synthetic tables per width (4; smoke 2)")
    p.add_argument("--synthetic-rows", type=int, default=None, help="rows per synthetic table (100,000; smoke 2,000)")
    p.add_argument("--lookup-samples", type=int, default=None, help="samples per timed lookup (1,024; smoke 64)")
    p.add_argument("--request-sets", type=int, default=3, help="requests per table set, cycled by every candidate")
    p.add_argument("--min-seconds", type=float, default=None, help="timed seconds per candidate (1; smoke 0.01)")
    p.add_argument("--min-reps", type=int, default=None, help="repetitions per candidate (20; smoke 3)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="cap on one table set's interleaved rounds")
    p.add_argument("--no-redis", dest="redis", action="store_false", help="skip the Redis measurements")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "work" / "bench_formats")
    args = p.parse_args(None if argv is None else [str(a) for a in argv])

    def pick(value: Any, full: Any, smoke: Any) -> Any:
        return value if value is not None else (smoke if args.smoke else full)

    args.samples = pick(args.samples, 300_000, 6_000)
    args.epochs = pick(args.epochs, 2, 1)
    args.rows_scale = pick(args.rows_scale, 1.0, 0.02)
    args.dims = pick(args.dims, [128, 16], [16])
    args.synthetic_tables = pick(args.synthetic_tables, 4, 2)
    args.synthetic_rows = pick(args.synthetic_rows, 100_000, 2_000)
    args.lookup_samples = pick(args.lookup_samples, 1024, 64)
    args.min_seconds = pick(args.min_seconds, 1.0, 0.01)
    args.min_reps = pick(args.min_reps, 20, 3)
    if "fp32" not in args.formats:
        p.error("--formats must include fp32: every ratio is to it")
    args.formats = [f for f in FORMAT_NAMES if f in args.formats]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    words = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = command_line("scripts/bench_formats.py", words)
    info = machine_with_gpus()
    print(f"machine: {info.get('cpu', 'unknown CPU')}, {info['cpus']} CPUs, {info.get('memory_gib')} GiB, "
          f"{info['gpus']} GPU(s); {info['platform']}, Python {info['python']}")
    print(f"command: {command}", flush=True)
    out = args.out.absolute()
    work = out / "files"
    work.mkdir(parents=True, exist_ok=True)
    args.base = json.loads((COMMITTED / HPS_MODEL / "hps.json").read_text())
    args.hash_map = {**args.base["volatile_db"], "type": "hash_map", "initial_cache_rate": 1.0}
    result: Row = {"formats": args.formats, "sets": []}
    trained = train_and_export(args, args.base, work / "demo")
    if "served" in args.parts:
        result["served"] = bench_served(args, args.base, trained, work / "served")
    sets = [trained.tables] + [synthetic_set(args, dim, work / "synthetic") for dim in args.dims]
    if {"memory", "lookup"} & set(args.parts):
        warm_up(args, work / "warm-up")
        with redis_server(work / "redis", args.redis and "memory" in args.parts) as redis:
            for tables in sets:
                result["sets"].append(bench_set(args, tables, work / "rocksdb", redis))
    result["targets"] = targets(result)
    result["seconds"] = round(time.monotonic() - started, 1)
    table = report_table(result)
    print(f"\n{table}\n")
    for t in result["targets"]:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['measured']}")
    print(f"\n{result['seconds']:.0f} s")
    config = {k: v for k, v in vars(args).items() if k not in ("base", "hash_map")}
    write_report("bench_formats", words, str(out), machine=info, command=command,
                 config=json.loads(json.dumps(config, default=str)), markdown=table, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
