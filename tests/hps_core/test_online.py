"""Online updates through a real Kafka-protocol broker into a running server's tiers and caches.

A HierarchicalParameterServer with a hash map, RocksDB and CPU-twin caches consumes the
stream while lookups run; once applied, every served vector is the newest published one,
the caches were refreshed in place (not flushed), and RocksDB holds the updates.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hps_core.config import PersistentDBConfig, load_config
from hps_core.db import RocksDBPersistentDB
from hps_core.formats import write_sparse_model
from hps_core.server import HierarchicalParameterServer
from hps_core.updates import UpdateSink
from tests.kafka_broker import KafkaBroker, broker_or_skip

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

DIM = 4
ROWS = 2_000
# fast group joins, and new topics found within a second (the default looks every 30 s)
FAST_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 300, "topic.metadata.refresh.interval.ms": 1000}


@pytest.fixture(scope="module")
def broker() -> Iterator[KafkaBroker]:
    with broker_or_skip() as server:
        yield server


def _rows(keys: np.ndarray, version: int) -> np.ndarray:
    return (keys[:, None] * 10 + np.arange(DIM) + 1000 * version).astype(np.float32)


def _config(tmp_path: Path, brokers: str, model: str = "online") -> Path:
    """Each test its own model name, hence its own topic: the broker outlives a test."""
    keys = np.arange(ROWS, dtype=np.int64)
    write_sparse_model(tmp_path / "t.model", keys, _rows(keys, 0))
    path = tmp_path / "hps.json"
    path.write_text(json.dumps({
        "volatile_db": {"type": "hash_map", "initial_cache_rate": 1.0},
        "persistent_db": {"type": "rocks_db", "path": "rocksdb"},
        "update_source": {"type": "kafka_message_queue", "brokers": brokers, "poll_timeout_ms": 50},
        "models": [{
            "model": model, "sparse_files": ["t.model"], "embedding_table_names": ["t"],
            "embedding_vecsize_per_table": [DIM], "maxnum_catfeature_query_per_table_per_sample": [ROWS],
            "max_batch_size": 1, "gpucacheper": 0.5, "hit_rate_threshold": 1.1,
        }],
    }))
    return path


def _lookup(server: HierarchicalParameterServer, keys: np.ndarray, model: str = "online") -> np.ndarray:
    return server.session(model).lookup(keys, np.array([keys.size], np.int32)).reshape(keys.size, DIM)


def _publish_and_see_in_every_cache(servers: tuple[HierarchicalParameterServer, ...], broker: KafkaBroker,
                                    model: str, keys: np.ndarray, updated: np.ndarray) -> None:
    """Fill each server's cache, publish version 1 of ``updated``, wait until every server
    answers it (each cache must have followed)."""
    for server in servers:
        np.testing.assert_array_equal(_lookup(server, keys, model), _rows(keys, 0))  # fills each cache
    time.sleep(3)  # let the consumer groups join before publishing
    with UpdateSink(broker.bootstrap) as sink:
        sink.publish(model, "t", updated, _rows(updated, 1))
        sink.flush(30)
    expected = _rows(keys, 0)
    expected[updated] = _rows(updated, 1)
    for server in servers:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not np.array_equal(_lookup(server, keys, model), expected):
            time.sleep(0.2)
        np.testing.assert_array_equal(_lookup(server, keys, model), expected)


def test_updates_reach_tiers_and_caches_while_serving(tmp_path: Path, broker: KafkaBroker) -> None:
    keys = np.arange(ROWS, dtype=np.int64)
    updated = keys[::3]
    config = load_config(_config(tmp_path, broker.bootstrap))
    with HierarchicalParameterServer(config, cache_device="cpu", update_consumer_config=FAST_GROUP) as server:
        np.testing.assert_array_equal(_lookup(server, keys), _rows(keys, 0))  # fills the cache
        cache = server.session("online").caches["t"]
        cached_before = cache.size()
        time.sleep(3)  # let the consumer groups join before publishing

        stop = threading.Event()
        errors: list[str] = []

        def serve() -> None:
            while not stop.is_set():
                got = _lookup(server, keys)
                version = np.round((got[:, 0] - keys * 10) / 1000)
                if not np.isin(version, (0, 1, 2)).all() or (got - _rows(keys, 0) - 1000 * version[:, None]).any():
                    errors.append("a served vector is no published version of its row")

        reader = threading.Thread(target=serve)
        reader.start()
        with UpdateSink(broker.bootstrap) as sink:
            for version in (1, 2):
                sink.publish("online", "t", updated, _rows(updated, version))
                sink.flush(30)
        expected = _rows(keys, 0)
        expected[updated] = _rows(updated, 2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not np.array_equal(_lookup(server, keys), expected):
            time.sleep(0.2)
        stop.set()
        reader.join()
        np.testing.assert_array_equal(_lookup(server, keys), expected)
        assert errors == []
        assert cache.size() == cached_before  # refreshed in place, not flushed
        stats = server.updates.stats()
        assert stats["volatile"]["updates_applied"] >= 2 * updated.size
        assert stats["volatile"]["staleness_p99_s"] >= 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and server.updates.stats()["persistent"]["updates_applied"] < 2 * updated.size:
            time.sleep(0.2)
    rocks = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "rocksdb"), read_only=True))
    out = np.empty((updated.size, DIM), np.float32)
    assert rocks.fetch("hps_et.online.t", updated, out).all()
    np.testing.assert_array_equal(out, _rows(updated, 2))
    rocks.close()


@pytest.mark.redis
def test_every_servers_cache_follows_updates_to_a_shared_redis(tmp_path: Path, broker: KafkaBroker) -> None:
    from tests.redis_servers import RedisProcesses

    keys = np.arange(ROWS, dtype=np.int64)
    updated = keys[::5]
    with RedisProcesses.cluster(tmp_path / "redis", nodes=3) as cluster:
        path = _config(tmp_path, broker.bootstrap, model="shared")
        data = json.loads(path.read_text())
        data["volatile_db"] = {"type": "redis_cluster", "address": cluster.address, "initial_cache_rate": 1.0}
        data["persistent_db"] = {"type": "disabled"}
        path.write_text(json.dumps(data))
        config = load_config(path)
        with HierarchicalParameterServer(config, cache_device="cpu", update_consumer_config=FAST_GROUP) as first, \
                HierarchicalParameterServer(config, cache_device="cpu", update_consumer_config=FAST_GROUP) as second:
            _publish_and_see_in_every_cache((first, second), broker, "shared", keys, updated)
            applied = sum(s.updates.stats()["volatile"]["updates_applied"] for s in (first, second))
            assert applied == updated.size  # Redis is shared: the update was written once


def test_the_host_store_applies_each_update_once_per_host_and_every_cache_follows(
        tmp_path: Path, broker: KafkaBroker) -> None:
    """Two servers of one HPS JSON share its host store (one copy of the hash map): their volatile
    layer is one consumer group, so an update is written once, while each server's cache follows
    through a group of its own."""
    keys = np.arange(ROWS, dtype=np.int64)
    updated = keys[::7]
    path = _config(tmp_path, broker.bootstrap, model="per_host")
    data = json.loads(path.read_text())
    data["persistent_db"] = {"type": "disabled"}
    path.write_text(json.dumps(data))
    config = load_config(path)
    with HierarchicalParameterServer(config, cache_device="cpu", update_consumer_config=FAST_GROUP) as first, \
            HierarchicalParameterServer(config, cache_device="cpu", update_consumer_config=FAST_GROUP) as second:
        assert first.volatile is not None and second.volatile is not None
        assert first.volatile.store_path("hps_et.per_host.t") == second.volatile.store_path("hps_et.per_host.t")
        groups = [s.updates.sources["volatile"].group_id for s in (first, second)]
        assert groups[0] == groups[1] and groups[0].startswith("hps.volatile.")
        assert first.updates.sources["cache"].group_id != second.updates.sources["cache"].group_id
        _publish_and_see_in_every_cache((first, second), broker, "per_host", keys, updated)
        applied = sum(s.updates.stats()["volatile"]["updates_applied"] for s in (first, second))
        assert applied == updated.size  # one copy per host: the update was written once


def test_non_finite_updates_are_never_served_and_are_counted_per_layer(tmp_path: Path, broker: KafkaBroker) -> None:
    """The issue's case: a producer that checks nothing (HugeCTR's own sink; ours refuses) sends
    25 rows with a NaN and 25 infinite rows, then a good message, on one partition. While lookups
    run, no served value is ever NaN or infinite; once the good message is applied by both layers,
    the 50 keys still answer their loaded rows from every tier (cache, host store, RocksDB), and each
    layer (the caches' own consumer group too) counted the 50 in
    hps_update_rejected_total{reason="non_finite"}."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from hps_core.metrics import MetricsCollector
    from hps_core.updates import encode, topic_name

    model = "nonfinite"
    keys = np.arange(ROWS, dtype=np.int64)
    nan_keys, inf_keys, good = keys[:25], keys[25:50], keys[100:110]
    nan_rows = _rows(nan_keys, 1)
    nan_rows[::5, 2] = np.nan  # five of the 25 rows; the other 20 are refused with them
    inf_rows = _rows(inf_keys, 1)
    inf_rows[:, 0] = np.inf
    topic = topic_name(model, "t")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        future.result(30)  # one partition: the good message is consumed after the bad ones
    config = load_config(_config(tmp_path, broker.bootstrap, model=model))
    with HierarchicalParameterServer(config, cache_device="cpu", update_consumer_config=FAST_GROUP) as server:
        np.testing.assert_array_equal(_lookup(server, keys, model), _rows(keys, 0))  # fills the cache
        stop = threading.Event()
        served_non_finite = [0]

        def serve() -> None:
            while not stop.is_set():
                served_non_finite[0] += int((~np.isfinite(_lookup(server, keys, model))).sum())

        reader = threading.Thread(target=serve)
        reader.start()
        producer = Producer({"bootstrap.servers": broker.bootstrap})
        for batch, rows in ((nan_keys, nan_rows), (inf_keys, inf_rows), (good, _rows(good, 1))):
            producer.produce(topic, value=encode(batch, rows), partition=0)
        assert producer.flush(30) == 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                s["updates_applied"] >= good.size for s in server.updates.stats().values()):
            time.sleep(0.2)
        stop.set()
        reader.join()
        expected = _rows(keys, 0)
        expected[good] = _rows(good, 1)
        np.testing.assert_array_equal(_lookup(server, keys, model), expected)
        assert served_non_finite[0] == 0
        stats = server.updates.stats()
        assert set(stats) == {"volatile", "persistent", "cache"}  # the host store: the caches' own group
        for layer in stats.values():
            assert layer["updates_applied"] == good.size and layer["messages"] == 1
            assert layer["rejected_non_finite"] == layer["rejected_updates"] == 50
        samples = MetricsCollector(model, []).collect({}, stats, force_slow=True)
        rejected = {(dict(s.labels)["tier"], dict(s.labels)["reason"]): s.value
                    for s in samples if s.name == "hps_update_rejected_total"}
        assert rejected == {(layer, reason): 50 if reason == "non_finite" else 0
                            for layer in stats for reason in ("non_finite", "tier")}
        assert server.volatile is not None
        out = np.empty((50, DIM), np.float32)
        assert server.volatile.fetch(f"hps_et.{model}.t", keys[:50], out).all()
        np.testing.assert_array_equal(out, _rows(keys[:50], 0))
    rocks = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "rocksdb"), read_only=True))
    try:
        out = np.empty((60, DIM), np.float32)
        assert rocks.fetch(f"hps_et.{model}.t", np.concatenate([keys[:50], good]), out).all()
        np.testing.assert_array_equal(out, np.concatenate([_rows(keys[:50], 0), _rows(good, 1)]))
    finally:
        rocks.close()
