#!/usr/bin/env python
"""Benchmark online updates: applied updates/s per tier and publish-to-visible latency.

Two measurements, each a function the Triton-load variant can call with its own fetch path:

- :func:`measure_apply_rate`: N updates are published to Kafka first, then an UpdateSource
  consumes and applies them into the tier. Rate = updates / (last apply end − first apply
  start), group join excluded. Printed side by side with the tier's own ``insert`` rate on
  the same batches (the ceiling), as a ratio.
- :func:`measure_publish_to_visible`: with a source running and caught up, one probe at a
  time: publish ``keys_per_probe`` keys with a fresh value, then poll ``fetch(keys)`` until
  every row shows it. Latency = visible time − publish time (p50/p99), plus the source's own
  staleness metric (Kafka message timestamp → applied).

Usage::

    .venv/bin/python scripts/bench_updates.py                    # starts its own tansu broker
    .venv/bin/python scripts/bench_updates.py --brokers HOST:PORT --updates 200000 --dim 64

Writes ``<out>/bench_updates_<time>.json`` (default ``work/bench_updates/``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hps_core.config import PersistentDBConfig, UpdateSourceConfig  # noqa: E402
from hps_core.db import HashMapVolatileDB, RocksDBPersistentDB  # noqa: E402
from hps_core.db.base import EmbeddingTier  # noqa: E402
from hps_core.updates import TierUpdateApplier, UpdateSink, UpdateSource, topic_name  # noqa: E402
from hps_demo.bench.harness import tail_percentiles_ms, write_report  # noqa: E402

Fetch = Callable[[np.ndarray], np.ndarray]  # keys (n,) int64 → vectors (n, dim) float32

_GROUP_SETTINGS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


# --------------------------------------------------------------------------- helpers
class _TimedApplier(TierUpdateApplier):
    """Records when the first apply started and the last one ended."""

    first_start: float | None = None
    last_end: float = 0.0

    def apply(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        start = time.perf_counter()
        if self.first_start is None:
            self.first_start = start
        super().apply(table, keys, values)
        self.last_end = time.perf_counter()


def _source(brokers: str, applier: TierUpdateApplier, model: str, *, max_batch_size: int,
            poll_timeout_ms: int, consumer_config: dict[str, Any] | None) -> UpdateSource:
    cfg = UpdateSourceConfig(type="kafka_message_queue", brokers=brokers, poll_timeout_ms=poll_timeout_ms,
                             max_batch_size=max_batch_size, metadata_refresh_interval_ms=1000)
    return UpdateSource(cfg, applier, layer="volatile", group_id=f"hps.bench.{uuid.uuid4().hex[:8]}",
                        update_filters=[rf"^hps_et\.{model}\."],
                        consumer_config={**_GROUP_SETTINGS, **(consumer_config or {})})


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- measurements
def measure_apply_rate(brokers: str, db: EmbeddingTier, *, updates: int = 200_000, dim: int = 64,
                       key_space: int = 1_000_000, message_pairs: int = 8192, max_batch_size: int = 8192,
                       consumer_config: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """Updates/s an UpdateSource applies into ``db``, beside ``db.insert``'s own rate."""
    model = f"bench{uuid.uuid4().hex[:8]}"
    table = topic_name(model, "t")
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, key_space, updates, dtype=np.int64)
    values = rng.standard_normal((updates, dim)).astype(np.float32)

    started = time.perf_counter()
    with UpdateSink(brokers, max_batch_size=message_pairs, send_buffer_size=message_pairs * (8 + 4 * dim) + 64) as sink:
        sink.publish(model, "t", keys, values)
        sink.flush(120)
        published = sink.stats()
    publish_s = time.perf_counter() - started

    applier = _TimedApplier(db, {table: dim})
    source = _source(brokers, applier, model, max_batch_size=max_batch_size, poll_timeout_ms=100,
                     consumer_config=consumer_config)
    with source:
        _wait(lambda: source.stats()["updates_applied"] >= updates, 600, "all updates applied")
    assert applier.first_start is not None
    kafka_s = applier.last_end - applier.first_start

    ceiling_table = f"{table}.ceiling"  # the tier alone, same batch size, fresh table
    db.create_table(ceiling_table, dim)
    started = time.perf_counter()
    for start in range(0, updates, max_batch_size):
        db.insert(ceiling_table, keys[start:start + max_batch_size], values[start:start + max_batch_size])
    insert_s = time.perf_counter() - started
    return {
        "updates": updates, "dim": dim, "messages": published["messages"], "bytes": published["bytes"],
        "publish_updates_per_s": updates / publish_s,
        "applied_updates_per_s": updates / kafka_s,
        "tier_insert_updates_per_s": updates / insert_s,
        "applied_vs_tier_insert": (updates / kafka_s) / (updates / insert_s),
        "source_staleness_p50_s": source.stats()["staleness_p50_s"],
    }


def measure_publish_to_visible(brokers: str, model: str, table: str, dim: int, fetch: Fetch, *,
                               probes: int = 200, keys_per_probe: int = 16, key_space: int = 100_000,
                               poll_interval_s: float = 0.0005, timeout_s: float = 10.0,
                               sink: UpdateSink | None = None, seed: int = 1) -> dict[str, Any]:
    """Publish-to-visible latency: one probe at a time, publish then poll ``fetch`` until
    every probed row holds the probe's value. A running source must already apply ``table``
    of ``model`` into whatever ``fetch`` reads (a tier, or a server under load)."""
    rng = np.random.default_rng(seed)
    own_sink = sink is None
    sink = sink if sink is not None else UpdateSink(brokers)
    latencies: list[float] = []
    try:
        for probe in range(probes):
            keys = rng.choice(key_space, keys_per_probe, replace=False).astype(np.int64)
            marker = float(seed * 1_000_000 + probe + 1)
            values = np.full((keys_per_probe, dim), marker, np.float32)
            published = time.perf_counter()
            sink.publish(model, table, keys, values)
            deadline = published + timeout_s
            while True:
                got = fetch(keys)
                if np.all(got == marker):
                    latencies.append(time.perf_counter() - published)
                    break
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"probe {probe} not visible after {timeout_s} s")
                time.sleep(poll_interval_s)
        sink.flush(30)
    finally:
        if own_sink:
            sink.close()
    return {"probes": probes, "keys_per_probe": keys_per_probe, **tail_percentiles_ms(latencies)}


def measure_tier(brokers: str, name: str, db: EmbeddingTier, *, updates: int, dim: int, probes: int,
                 consumer_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Both measurements for one tier (latency read back through ``db.fetch``)."""
    rate = measure_apply_rate(brokers, db, updates=updates, dim=dim, consumer_config=consumer_config)
    model = f"lat{uuid.uuid4().hex[:8]}"
    table = topic_name(model, "t")
    applier = TierUpdateApplier(db, {table: dim})
    source = _source(brokers, applier, model, max_batch_size=8192, poll_timeout_ms=100,
                     consumer_config=consumer_config)
    lock = threading.Lock()

    def fetch(keys: np.ndarray) -> np.ndarray:
        out = np.zeros((keys.size, dim), np.float32)
        with lock:
            if table in db.table_names():
                db.fetch(table, keys, out)
        return out

    with UpdateSink(brokers) as sink, source:
        # warm up: topic created, group joined, first message applied
        sink.publish(model, "t", np.array([0], np.int64), np.zeros((1, dim), np.float32))
        sink.flush(30)
        _wait(lambda: source.stats()["updates_applied"] >= 1, 60, "the source to join and apply")
        latency = measure_publish_to_visible(brokers, model, "t", dim, fetch, probes=probes, sink=sink)
        staleness = source.stats()
    return {"tier": name, **rate, "publish_to_visible": latency,
            "staleness_metric": {k: staleness[k] for k in ("staleness_p50_s", "staleness_p99_s", "staleness_max_s",
                                                           "staleness_samples")}}


# --------------------------------------------------------------------------- driver
@contextmanager
def _broker(brokers: str | None) -> Iterator[str]:
    if brokers:
        yield brokers
        return
    from tests.kafka_broker import KafkaBroker

    with KafkaBroker() as broker:
        yield broker.bootstrap


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", help="Kafka bootstrap servers (default: start a tansu broker)")
    parser.add_argument("--updates", type=int, default=200_000, help="updates per apply-rate run (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=64, help="vector size (default: %(default)s)")
    parser.add_argument("--probes", type=int, default=200, help="latency probes per tier (default: %(default)s)")
    parser.add_argument("--tiers", default="hash_map,rocks_db", help="comma-separated (default: %(default)s)")
    parser.add_argument("--fetch-wait-max-ms", type=int, default=None,
                        help="consumer fetch.wait.max.ms (librdkafka default 500)")
    parser.add_argument("--out", default=str(REPO / "work" / "bench_updates"), help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    consumer_config = {} if args.fetch_wait_max_ms is None else {"fetch.wait.max.ms": args.fetch_wait_max_ms}
    results: list[dict[str, Any]] = []
    with _broker(args.brokers) as brokers, tempfile.TemporaryDirectory(prefix="bench-rocks-") as tmp:
        for name in args.tiers.split(","):
            db: EmbeddingTier = HashMapVolatileDB() if name == "hash_map" else RocksDBPersistentDB(PersistentDBConfig(path=str(Path(tmp) / "db")))
            try:
                results.append(measure_tier(brokers, name, db, updates=args.updates, dim=args.dim,
                                            probes=args.probes, consumer_config=consumer_config))
            finally:
                db.close()
            r = results[-1]
            lat = r["publish_to_visible"]
            print(f"{name:9s} applied {r['applied_updates_per_s']:>10,.0f} updates/s "
                  f"(tier insert alone {r['tier_insert_updates_per_s']:>10,.0f}/s, ratio {r['applied_vs_tier_insert']:.2f}); "
                  f"publish→visible p50 {lat['p50_ms']:.1f} ms p99 {lat['p99_ms']:.1f} ms", flush=True)
    write_report("bench_updates", argv, args.out, consumer_config=consumer_config, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
