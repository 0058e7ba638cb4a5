"""Online updates through a real Kafka-protocol broker (tansu), into real tiers.

Every test talks to a tansu process the fixtures start (tests/kafka_broker.py); the tiers
are a real HashMapVolatileDB and a real RocksDB in ``tmp_path``. Skipped, saying why, when
tansu is not installed. Consumers use a 2 s session timeout so group joins take ~1-2 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from hps_core.cli import main as hps_main
from hps_core.config import PersistentDBConfig, UpdateSourceConfig, VolatileDBConfig
from hps_core.db import HashMapVolatileDB, RocksDBPersistentDB
from hps_core.formats import write_npz
from hps_core.updates import TierUpdateApplier, UpdateSink, UpdateSource, decode, encode, topic_name
from tests.kafka_broker import KafkaBroker, broker_or_skip

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[3]
FAST_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 300}


@pytest.fixture(scope="module")
def broker() -> Iterator[KafkaBroker]:
    with broker_or_skip() as server:
        yield server


def _config(bootstrap: str, **overrides: Any) -> UpdateSourceConfig:
    fields: dict[str, Any] = dict(type="kafka_message_queue", brokers=bootstrap, poll_timeout_ms=100,
                                  metadata_refresh_interval_ms=500, failure_backoff_ms=50)
    fields.update(overrides)
    return UpdateSourceConfig(**fields)


def _source(bootstrap: str, applier: TierUpdateApplier, layer: str, group: str, model: str,
            **overrides: Any) -> UpdateSource:
    """A source for ``model``'s topics only (the module's broker holds other tests' topics,
    which would count as unknown tables)."""
    return UpdateSource(_config(bootstrap, **overrides), applier, layer=layer, group_id=group,
                        update_filters=[rf"^hps_et\.{model}\."], consumer_config=FAST_GROUP)


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def _assert_newest(db: Any, newest: dict[str, dict[int, np.ndarray]], dims: dict[str, int]) -> None:
    for table, rows in newest.items():
        keys = np.fromiter(rows, dtype=np.int64, count=len(rows))
        expected = np.stack([rows[int(k)] for k in keys])
        out = np.zeros((keys.size, dims[table]), np.float32)
        found = db.fetch(table, keys, out)
        assert found.all(), f"{table}: {int((~found).sum())} published keys missing"
        np.testing.assert_array_equal(out, expected, err_msg=table)


def _publish_rounds(sink: UpdateSink, model: str, dims: dict[str, int], total: int, rounds: int,
                    key_space: int, seed: int) -> dict[str, dict[int, np.ndarray]]:
    """Publish ``total`` updates over the tables in ``rounds``; keys repeat, so the newest
    value of a key is the one that must win. Returns table → key → newest vector."""
    rng = np.random.default_rng(seed)
    newest: dict[str, dict[int, np.ndarray]] = {t: {} for t in dims}
    per_call = total // (rounds * len(dims))
    for _ in range(rounds):
        for table, dim in dims.items():
            keys = rng.integers(0, key_space, per_call, dtype=np.int64)
            values = rng.standard_normal((per_call, dim)).astype(np.float32)
            sink.publish(model, table.rsplit(".", 1)[1], keys, values)
            # newest per key, vectorised: the last occurrence of each key in this call
            last = keys.size - 1 - np.unique(keys[::-1], return_index=True)[1]
            newest[table].update(zip(keys[last].tolist(), values[last]))
        sink.flush(30)
    return newest


def _group_caught_up(bootstrap: str, group: str, topics: list[str]) -> bool:
    """Whether ``group`` has committed every partition of ``topics`` up to its end."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        meta = probe.list_topics(timeout=5).topics
        parts = [TopicPartition(t, p) for t in topics for p in meta[t].partitions]
        committed = {(tp.topic, tp.partition): tp.offset for tp in probe.committed(parts, timeout=5)}
        for tp in parts:
            _, high = probe.get_watermark_offsets(tp, timeout=5)
            if high > 0 and committed[(tp.topic, tp.partition)] < high:
                return False
        return True
    finally:
        probe.close()


# --------------------------------------------------------------------------- end to end
def test_updates_reach_hash_map_and_rocksdb(broker: KafkaBroker, tmp_path: Path) -> None:
    model = _unique("m")
    dims = {topic_name(model, f"t{i}"): d for i, d in enumerate((4, 8, 16))}
    total = 20_000
    volatile = HashMapVolatileDB(VolatileDBConfig(num_partitions=4))
    rocks = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "rocks")))
    refreshed: list[int] = []
    sources = [
        _source(broker.bootstrap, TierUpdateApplier(volatile, dims, lambda t, k, v: refreshed.append(k.size)),
                "volatile", _unique("hps.volatile."), model),
        _source(broker.bootstrap, TierUpdateApplier(rocks, dims), "persistent", _unique("hps.persistent."),
                model, max_batch_size=1024),
    ]
    with UpdateSink(broker.bootstrap, max_batch_size=500) as sink:
        for source in sources:
            source.start()
        try:
            # published while the sources consume: three rounds over three tables
            newest = _publish_rounds(sink, model, dims, total, rounds=3, key_space=4000, seed=0)
            published = sink.stats()["pairs"]
            _wait(lambda: all(s.stats()["updates_applied"] >= published for s in sources), 60, "all updates applied")
        finally:
            for source in sources:
                source.stop()
    for db in (volatile, rocks):
        _assert_newest(db, newest, dims)
    for source in sources:
        stats = source.stats()
        assert stats["updates_applied"] == published  # nothing applied twice without a restart
        assert stats["malformed"] == 0 and stats["apply_errors"] == 0
        assert stats["staleness_samples"] > 0 and 0 <= stats["staleness_p50_s"] <= stats["staleness_p99_s"] < 60
    assert sum(refreshed) == published  # on_applied saw every applied row
    rocks.close()


def test_malformed_messages_are_counted_skipped_and_committed(broker: KafkaBroker) -> None:
    model = _unique("m")
    table = topic_name(model, "t")
    dims = {table: 4}
    good = np.arange(8, dtype=np.float32).reshape(2, 4)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    payloads: list[tuple[str, bytes, bytes | None]] = [
        (table, encode(np.array([1, 2]), good), None),
        (table, b"XXXX" + encode(np.array([3]), good[:1])[4:], None),  # bad magic
        (table, encode(np.array([3]), np.ones((1, 8), np.float32)), None),  # wrong vector size
        (table, encode(np.array([3, 4]), good)[:-3], None),  # truncated
        (table, b"HCT", None),  # shorter than the header
        (topic_name(model, "unknown"), encode(np.array([3]), good[:1]), None),  # unknown table
        (table, encode(np.array([3]), good[:1]), b"k"),  # has a Kafka key: not from a sink
        (table, b"HCTR" + (8).to_bytes(4, "little"), None),  # a beacon: ignored, not malformed
        (table, encode(np.array([2, 5]), good + 10), None),
    ]
    for topic, value, key in payloads:
        producer.produce(topic, value=value, key=key, partition=0)
    assert producer.flush(10) == 0
    db = HashMapVolatileDB()
    group = _unique("hps.volatile.")
    source = _source(broker.bootstrap, TierUpdateApplier(db, dims), "volatile", group, model).start()
    try:
        _wait(lambda: source.stats()["updates_applied"] >= 4, 30, "the valid messages")
        _wait(lambda: _group_caught_up(broker.bootstrap, group, [table, topic_name(model, "unknown")]),
              20, "offsets of every message committed")
    finally:
        source.stop()
    stats = source.stats()
    assert stats["malformed"] == 6 and stats["unknown_table"] == 1
    assert stats["updates_applied"] == 4 and stats["messages"] == 2
    out = np.zeros((3, 4), np.float32)
    assert db.fetch(table, np.array([1, 2, 5]), out).all()
    np.testing.assert_array_equal(out, [good[0], good[0] + 10, good[1] + 10])
    assert not db.fetch(table, np.array([3, 4]), np.zeros((2, 4), np.float32)).any()  # never half applied


def test_update_filters_select_topics(broker: KafkaBroker) -> None:
    model = _unique("m")
    wanted, other = topic_name(model, "wanted"), topic_name(model, "other")
    dims = {wanted: 2, other: 2}
    with UpdateSink(broker.bootstrap) as sink:
        sink.publish(model, "other", np.array([1]), np.ones((1, 2), np.float32))
        sink.publish(model, "wanted", np.array([1]), np.ones((1, 2), np.float32))
    db = HashMapVolatileDB()
    source = UpdateSource(_config(broker.bootstrap), TierUpdateApplier(db, dims), layer="volatile",
                          group_id=_unique("hps.volatile."), update_filters=[r"\.wanted$"],
                          consumer_config=FAST_GROUP).start()
    try:
        _wait(lambda: source.stats()["updates_applied"] >= 1 and source.stats()["filtered"] >= 1, 30,
              "one applied and one filtered message")
    finally:
        source.stop()
    assert db.table_names() == [wanted]


# --------------------------------------------------------------------------- crash safety
_KILLED_CONSUMER = """
import sys, time
import numpy as np
from hps_core.config import PersistentDBConfig, UpdateSourceConfig
from hps_core.db import RocksDBPersistentDB
from hps_core.updates import TierUpdateApplier, UpdateSource

bootstrap, group, path, dims = sys.argv[1], sys.argv[2], sys.argv[3], eval(sys.argv[4])

class Slow(TierUpdateApplier):
    def apply(self, table, keys, values):
        super().apply(table, keys, values)
        print("applied", self.applied_updates, flush=True)
        time.sleep(0.03)

cfg = UpdateSourceConfig(type="kafka_message_queue", brokers=bootstrap, poll_timeout_ms=100,
                         metadata_refresh_interval_ms=500, max_batch_size=200, max_commit_interval=2)
source = UpdateSource(cfg, Slow(RocksDBPersistentDB(PersistentDBConfig(path=str(path))), dims), layer="persistent",
                      group_id=group, update_filters=[r"^hps_et\\.%s\\." % sys.argv[5]], consumer_config={"session.timeout.ms": 2000,
                                                       "heartbeat.interval.ms": 300})
source.start()
time.sleep(600)
"""


def test_killed_consumer_loses_nothing(broker: KafkaBroker, tmp_path: Path) -> None:
    model = _unique("m")
    dims = {topic_name(model, "a"): 8, topic_name(model, "b"): 4}
    total = 20_000
    with UpdateSink(broker.bootstrap, max_batch_size=200) as sink:  # ~100 messages
        newest = _publish_rounds(sink, model, dims, total, rounds=2, key_space=3000, seed=1)
    group, path = _unique("hps.persistent."), tmp_path / "rocks"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CONSUMER, broker.bootstrap, group, str(path), repr(dims), model],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        applied = 0
        assert child.stdout is not None
        for line in child.stdout:  # kill it mid-stream, while it applies
            applied = int(line.split()[1])
            if applied >= total // 3:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    assert total // 3 <= applied < total

    rocks = RocksDBPersistentDB(PersistentDBConfig(path=str(path)))  # the killed writer's lock went with it
    source = _source(broker.bootstrap, TierUpdateApplier(rocks, dims), "persistent", group, model).start()
    try:
        _wait(lambda: _group_caught_up(broker.bootstrap, group, list(dims)), 60, "the restarted consumer to catch up")
    finally:
        source.stop()
    resumed = source.stats()["updates_applied"]
    assert 0 < resumed < total  # it resumed from the committed offsets, not from the start
    _assert_newest(rocks, newest, dims)
    rocks.close()


def test_broker_down_and_back(tmp_path: Path) -> None:
    broker = broker_or_skip().start()
    model, dims = "m", {topic_name("m", "t"): 4}
    db = HashMapVolatileDB()
    source = _source(broker.bootstrap, TierUpdateApplier(db, dims), "volatile", "hps.volatile.down", model).start()
    keys = np.arange(500, dtype=np.int64)
    try:
        with UpdateSink(broker.bootstrap) as sink:
            sink.publish(model, "t", keys, np.ones((500, 4), np.float32))
        _wait(lambda: source.stats()["updates_applied"] >= 500, 30, "the first batch")

        broker.kill()  # down: memory storage forgets topics, messages and offsets
        _wait(lambda: source.stats()["broker_errors"] > 0, 30, "the source to notice the broker is down")
        assert source.running
        out = np.zeros((500, 4), np.float32)
        assert db.fetch("hps_et.m.t", keys, out).all()  # serving goes on meanwhile

        broker.start()  # back, same port, empty
        fresh = np.full((500, 4), 2.0, np.float32)

        def second_batch_visible() -> bool:
            with UpdateSink(broker.bootstrap) as sink:
                sink.publish(model, "t", keys, fresh)  # republish until the consumer is back
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                db.fetch("hps_et.m.t", keys, out)
                if np.array_equal(out, fresh):
                    return True
                time.sleep(0.1)
            return False

        _wait(second_batch_visible, 60, "updates published after the broker came back")
        assert source.running and source.stats()["consumer_restarts"] == 0
    finally:
        source.stop()
        broker.stop()


# --------------------------------------------------------------------------- hps publish
def test_hps_publish_sends_a_table(broker: KafkaBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _unique("m")
    rng = np.random.default_rng(3)
    keys = rng.permutation(5000).astype(np.int64)
    vectors = rng.standard_normal((5000, 8)).astype(np.float32)
    write_npz(tmp_path / "t.npz", keys, vectors)
    code = hps_main(["publish", "--brokers", broker.bootstrap, "--model", model, "--table", "emb",
                     "--npz", str(tmp_path / "t.npz"), "--max-batch-size", "700"])
    out = capsys.readouterr().out
    assert code == 0 and "5000 updates" in out and "; 0 re-sent" in out
    topic = topic_name(model, "emb")
    reader = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "unused",
                       "enable.partition.eof": True, "enable.auto.commit": False})
    parts = reader.list_topics(topic, timeout=5).topics[topic].partitions
    reader.assign([TopicPartition(topic, p, 0) for p in parts])  # no group join: fast
    got_keys, got_values, eof = [], [], set()
    deadline = time.monotonic() + 20
    while len(eof) < len(parts) and time.monotonic() < deadline:
        msg = reader.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            eof.add(msg.partition())
            continue
        assert msg.key() is None
        k, v = decode(msg.value(), 8)
        assert k.size <= 700
        got_keys.append(k)
        got_values.append(v)
    reader.close()
    order = np.argsort(np.concatenate(got_keys))
    np.testing.assert_array_equal(np.concatenate(got_keys)[order], np.sort(keys))
    np.testing.assert_array_equal(np.concatenate(got_values)[order], vectors[np.argsort(keys)])
