#!/usr/bin/env python
"""Online updates while the served model is under perf_analyzer load (issue 5, item 5).

One real ``tritonserver`` serves ``hps_embedding`` (hash map volatile tier + RocksDB, with an
``update_source`` on a tansu broker this script starts). While perf_analyzer keeps it busy:

- a publisher thread sends updates at a steady ``--rate`` (updates/s, random keys of tables
  1…T-1); applied updates/s per layer are read from the server's own
  ``hps_updates_applied_total{tier=volatile|persistent}`` over the steady window;
- publish-to-visible probes on table 0, one at a time (``bench_updates.measure_publish_to_visible``):
  publish ``keys_per_probe`` keys with a fresh value, poll them over HTTP until the server
  answers it;
- perf_analyzer's throughput is recorded under updates and, first, without them (ratio).

Usage::

    .venv/bin/python scripts/bench_updates_under_load.py                 # defaults below
    .venv/bin/python scripts/bench_updates_under_load.py --rate 50000 --probes 200 --concurrency 2

Writes ``<out>/bench_updates_under_load_<time>.json`` (default ``work/bench_updates/``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_updates import measure_publish_to_visible  # noqa: E402

from hps_core.background import RepeatInBackground  # noqa: E402
from hps_core.formats import write_sparse_model  # noqa: E402
from hps_core.serving import TritonServer  # noqa: E402
from hps_core.updates import UpdateSink  # noqa: E402
from hps_demo.bench.harness import command_line, metric_total, scrape  # noqa: E402
from hps_demo.client import hps_request, infer, make_client, write_perf_analyzer_data  # noqa: E402
from hps_demo.tools import find_perf_analyzer  # noqa: E402

MODEL = "hps_embedding"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--rate", type=int, default=20_000, help="updates/s published (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=20.0, help="steady window for the applied rate")
    p.add_argument("--probes", type=int, default=100, help="publish-to-visible probes")
    p.add_argument("--batch", type=int, default=256, help="samples per perf_analyzer request")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "work" / "bench_updates")
    return p.parse_args(argv)


def _repository(root: Path, args: argparse.Namespace, brokers: str) -> Path:
    keys = np.arange(args.rows, dtype=np.int64)
    rng = np.random.default_rng(0)
    files = []
    for t in range(args.tables):
        path = root / "sparse" / f"table{t}.model"
        if not path.is_dir():
            write_sparse_model(path, keys, rng.standard_normal((args.rows, args.dim), dtype=np.float32))
        files.append(str(path))
    model = root / "repository" / MODEL
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text((REPO / "model_repository" / MODEL / "config.pbtxt").read_text())
    (model / "hps.json").write_text(json.dumps({
        "supportlonglong": True,
        "volatile_db": {"type": "hash_map", "num_partitions": 4, "initial_cache_rate": 1.0},
        "persistent_db": {"type": "rocks_db", "path": str(root / "rocksdb")},
        "update_source": {"type": "kafka_message_queue", "brokers": brokers, "poll_timeout_ms": 50,
                          "metadata_refresh_interval_ms": 1000},
        "models": [{
            "model": MODEL, "sparse_files": files,
            "embedding_table_names": [f"table{t}" for t in range(args.tables)],
            "embedding_vecsize_per_table": [args.dim] * args.tables,
            "maxnum_catfeature_query_per_table_per_sample": [1] * args.tables,
            "default_value_for_each_table": [0.0] * args.tables,
            "max_batch_size": max(args.batch, 1024), "gpucache": False,
        }],
    }, indent=2))
    return root / "repository"


class _Load:
    """perf_analyzer runs back to back on ``hps_embedding`` until stopped; keeps their summaries."""

    def __init__(self, server: TritonServer, data: Path, concurrency: int) -> None:
        self._tool = find_perf_analyzer()
        self._cmd = [str(self._tool.path), "-m", MODEL, "-u", server.grpc_url, "-i", "grpc", "--input-data", str(data),
                     "--concurrency-range", str(concurrency), "-p", "2000", "-s", "100", "--max-trials", "3"]
        self.throughputs: list[float] = []
        self.loop = RepeatInBackground(self._run_once, name="perf-analyzer")

    def _run_once(self) -> None:
        done = subprocess.run(self._cmd, capture_output=True, text=True, env=self._tool.environment())
        self.throughputs += [float(x) for x in re.findall(r"throughput: ([\d.]+) infer/sec", done.stdout)]


def _publisher(brokers: str, args: argparse.Namespace, stop: threading.Event, sent: list[int]) -> None:
    """Steady ``args.rate`` updates/s in 50 ms ticks, on tables 1…T-1 (table 0 is for probes)."""
    rng = np.random.default_rng(7)
    per_tick = max(1, args.rate // 20)
    with UpdateSink(brokers) as sink:
        next_tick = time.perf_counter()
        while not stop.is_set():
            table = f"table{int(rng.integers(1, args.tables))}"
            keys = rng.integers(0, args.rows, per_tick, dtype=np.int64)
            sink.publish(MODEL, table, keys, rng.standard_normal((per_tick, args.dim), dtype=np.float32))
            sent[0] += per_tick
            next_tick += 0.05
            time.sleep(max(0.0, next_tick - time.perf_counter()))


def _applied(url: str) -> dict[str, float]:
    series = scrape(url)
    return {tier: metric_total(series, "hps_updates_applied_total", model=MODEL, tier=tier) for tier in ("volatile", "persistent")}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from tests.kafka_broker import KafkaBroker

    root = args.out / "under_load"
    with KafkaBroker() as broker:
        repository = _repository(root, args, broker.bootstrap)
        with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, startup_timeout=600) as server:
            return _measure(args, broker.bootstrap, server, root)


def _measure(args: argparse.Namespace, brokers: str, server: TritonServer, root: Path) -> int:
    rng = np.random.default_rng(3)
    requests = [hps_request(rng.integers(0, args.rows, (args.batch, args.tables))) for _ in range(3)]
    data = root / "perf_input.json"
    data.write_text(json.dumps({"data": [{k: {"content": v.ravel().tolist(), "shape": [v.shape[-1]]}
                                          for k, v in r.items()} for r in requests]}))
    client = make_client("http", server.http_url)

    def fetch(keys: np.ndarray) -> np.ndarray:
        counts = np.zeros((1, args.tables), np.int32)
        counts[0, 0] = keys.size
        out = infer(client, MODEL, {"KEYS": keys.reshape(1, -1), "NUMKEYS": counts}, "OUTPUT0")
        return out.reshape(keys.size, args.dim)

    with UpdateSink(brokers) as sink:  # warm-up: topics exist, both layers' groups joined
        for t in range(args.tables):
            sink.publish(MODEL, f"table{t}", np.array([0], np.int64), np.zeros((1, args.dim), np.float32))
    deadline = time.monotonic() + 120
    while min(_applied(server.metrics_url).values()) < args.tables:
        if time.monotonic() > deadline:
            raise TimeoutError("the server's update sources did not join and apply the warm-up")
        time.sleep(0.5)

    idle = _Load(server, data, args.concurrency)
    with idle.loop:
        time.sleep(8)  # a few perf_analyzer windows without updates: the baseline
    baseline = idle.throughputs

    stop, sent = threading.Event(), [0]
    publisher = threading.Thread(target=_publisher, args=(brokers, args, stop, sent), daemon=True)
    load = _Load(server, data, args.concurrency)
    with load.loop:
        publisher.start()
        time.sleep(2)  # the consumers reach the steady rate
        first, t0, sent0 = _applied(server.metrics_url), time.perf_counter(), sent[0]
        time.sleep(args.seconds)
        last, t1, sent1 = _applied(server.metrics_url), time.perf_counter(), sent[0]
        latency = measure_publish_to_visible(brokers, MODEL, "table0", args.dim, fetch, probes=args.probes,
                                             keys_per_probe=16, key_space=args.rows, poll_interval_s=0.002)
        stop.set()
        publisher.join()
    staleness = {labels_q: v for (n, ls), v in scrape(server.metrics_url).items()
                 if n == "hps_update_staleness_seconds" for labels_q in [",".join(f"{k}={x}" for k, x in sorted(ls))]}
    elapsed = t1 - t0
    result = {
        "benchmark": "bench_updates_under_load", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": command_line("scripts/bench_updates_under_load.py", None),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "published_updates_per_s": (sent1 - sent0) / elapsed,
        "applied_updates_per_s": {tier: (last[tier] - first[tier]) / elapsed for tier in last},
        "publish_to_visible_http": latency,
        "server_staleness_seconds": staleness,
        "perf_analyzer_infer_per_s": {"without_updates": baseline, "with_updates": load.throughputs},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_updates_under_load_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("published_updates_per_s", "applied_updates_per_s",
                                             "publish_to_visible_http", "perf_analyzer_infer_per_s")}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
