"""Non-finite update rows: refused like a publication's, never applied, counted and logged.

The check is :func:`hps_core.row_formats.non_finite_rows`. The sink refuses such rows at send
time; a message that still carries them (a foreign producer: HugeCTR's own sink checks nothing,
so the tests produce raw HugeCTR messages with a plain confluent-kafka Producer) is refused whole
by the source against a real tansu broker (tests/kafka_broker.py): nothing of it reaches the
tier or the cache hook, its pairs are counted in ``rejected_non_finite`` (the metric
``hps_update_rejected_total{reason="non_finite"}``) and one line per topic and interval is
logged, and its offset commits like any other.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from hps_core.config import UpdateSourceConfig, VolatileDBConfig
from hps_core.db import HashMapVolatileDB
from hps_core.errors import RowValueError
from hps_core.metrics import MetricsCollector
from hps_core.row_formats import non_finite_rows
from hps_core.updates import TierUpdateApplier, UpdateSink, UpdateSource, encode, topic_name
from tests.hps_core.updates.test_source_apply import _committed, _wait
from tests.kafka_broker import KafkaBroker, broker_or_skip

DIM = 4
FAST_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 300}


def _rows(keys: np.ndarray, version: int) -> np.ndarray:
    return (keys[:, None] * 10 + np.arange(DIM) + 1000 * version).astype(np.float32)


def test_non_finite_rows_finds_every_nan_and_infinity_and_nothing_else() -> None:
    values = np.ones((6, 3), np.float32)
    values[1, 2], values[3, 0], values[4, 1] = np.nan, -np.inf, np.inf
    np.testing.assert_array_equal(non_finite_rows(values), [1, 3, 4])
    huge = np.full((4, 2), 3e38, np.float32)  # finite rows whose sum overflows: the exact pass says finite
    assert non_finite_rows(huge).shape == (0,)
    assert non_finite_rows(np.empty((0, 3), np.float32)).shape == (0,)
    with pytest.raises(RowValueError, match=r"2-D \(n, dim\)"):
        non_finite_rows(np.ones(3, np.float32))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e300 as float32
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])
def test_the_sink_refuses_non_finite_rows_at_send_time_and_sends_nothing(bad: float) -> None:
    """1e300 is finite as float64 but an infinity once sent as float32: refused too. The check
    comes before anything is queued, so no broker is needed to see that nothing was sent."""
    keys = np.array([5, 6, 7], np.int64)
    values = _rows(keys, 1).astype(np.float64)
    values[1, 2] = bad
    sink = UpdateSink("127.0.0.1:1")
    try:
        with pytest.raises(RowValueError, match=r"1 of the 3 rows hold NaN or infinity \(the first: row 1, "
                                                r"key 6\); nothing of this call was sent") as caught:
            sink.publish("m", "t", keys, values)
        assert caught.value.position == 1
        assert sink.stats()["pairs"] == 0 and sink.stats()["pending"] == 0
    finally:
        sink.close(1)


# --------------------------------------------------------------------------- against a real broker
@pytest.fixture
def broker() -> Iterator[KafkaBroker]:
    with broker_or_skip() as server:
        yield server


def _produce_raw(bootstrap: str, topic: str, messages: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """HugeCTR messages, in order, on partition 0 of a new one-partition ``topic``, by a plain
    producer (what HugeCTR's own sink would send: it checks no value)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        future.result(30)
    producer = Producer({"bootstrap.servers": bootstrap})
    for keys, values in messages:
        producer.produce(topic, value=encode(keys, values), partition=0)
    assert producer.flush(30) == 0


@pytest.mark.kafka
@pytest.mark.timeout(60)
def test_a_message_with_non_finite_rows_is_refused_whole_counted_and_logged_once(
        broker: KafkaBroker, caplog: pytest.LogCaptureFixture) -> None:
    """Four messages: good [1, 2], [3..27] with one NaN row among 25, [28..52] all infinite,
    good [60]. The two bad ones are refused whole (the 24 finite rows of the NaN message too),
    the tier and the cache hook never see them, the good ones are applied, every offset commits,
    and one warning names the topic and the first bad key."""
    topic = topic_name(f"m{uuid.uuid4().hex[:8]}", "t")
    good, nan_keys, inf_keys, last = (np.array([1, 2]), np.arange(3, 28), np.arange(28, 53), np.array([60]))
    nan_rows = _rows(nan_keys, 1)
    nan_rows[4, 1] = np.nan  # key 7
    inf_rows = np.full((inf_keys.size, DIM), np.inf, np.float32)
    _produce_raw(broker.bootstrap, topic, [(good, _rows(good, 1)), (nan_keys, nan_rows), (inf_keys, inf_rows),
                                           (last, _rows(last, 1))])

    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))
    hooked: list[np.ndarray] = []
    applier = TierUpdateApplier(db, {topic: DIM}, on_applied=lambda _t, _k, values: hooked.append(values.copy()))
    cfg = UpdateSourceConfig(type="kafka_message_queue", brokers=broker.bootstrap, poll_timeout_ms=100,
                             failure_backoff_ms=1)
    source = UpdateSource(cfg, applier, layer="volatile", group_id=f"hps.test.{uuid.uuid4().hex[:8]}",
                          update_filters=[rf"^{re.escape(topic)}$"], consumer_config=FAST_GROUP,
                          log_interval=3600)
    with caplog.at_level(logging.WARNING, logger="hps_core.updates.source"):
        source.start()
        try:
            _wait(lambda: _committed(broker.bootstrap, source.group_id, topic) == 4, "offset 4 committed")
        finally:
            source.stop()

    stats = source.stats()
    assert stats["rejected_non_finite"] == stats["rejected_updates"] == 50
    assert stats["updates_applied"] == 3 and stats["messages"] == 2 and stats["apply_errors"] == 0
    assert stats["malformed"] == 0 and stats["stopped_by"] is None
    out = np.zeros((3, DIM), np.float32)
    assert db.fetch(topic, np.array([1, 2, 60]), out).all()
    np.testing.assert_array_equal(out, _rows(np.array([1, 2, 60]), 1))
    refused = np.concatenate([nan_keys, inf_keys])
    assert not db.fetch(topic, refused, np.zeros((refused.size, DIM), np.float32)).any()
    assert db.count(topic) == 3
    assert all(np.isfinite(v).all() for v in hooked) and sum(v.shape[0] for v in hooked) == 3

    samples = MetricsCollector("m", []).collect({}, {"volatile": stats}, force_slow=True)
    rejected = {dict(s.labels)["reason"]: s.value for s in samples if s.name == "hps_update_rejected_total"}
    assert rejected == {"non_finite": 50.0, "tier": 0.0}

    lines = [r.getMessage() for r in caplog.records if "refused message" in r.getMessage()]
    # the second bad message of the topic is held back by the rate limit, and told at the stop
    assert len(lines) == 2 and "1 like this held back" in lines[1], lines
    assert f"{topic}[0]@1: 1 of its 25 rows hold NaN or infinity (the first: key 7)" in lines[0], lines
