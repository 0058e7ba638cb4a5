"""UpdateSource's retry policies: a tier or GPU that fails is retried until it answers or the
source stops; rows a tier refuses (another HPSError) are skipped and counted; a bug in the apply
stops the source without committing; only what was applied counts as applied. A Kafka failure
recreates the consumer, anything else stops the source, visibly; a consumer setting librdkafka
refuses fails start() (and a server's construction).

What a batch does to the stats and the committed offsets is checked against a real tansu broker
(tests/kafka_broker.py): HugeCTR messages published with UpdateSink, the group's offsets read
back with a Consumer's ``committed``. The rest calls ``_apply`` directly, or injects an error into
the consumer loop."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, TopicPartition

from hps_core.config import UpdateSourceConfig, VolatileDBConfig, load_config
from hps_core.db import HashMapVolatileDB
from hps_core.errors import ConfigError, DeviceError, DeviceMemoryError, MalformedMessage, RequestError, TierBusyError, TierError
from hps_core.formats import write_sparse_model
from hps_core.server import HierarchicalParameterServer
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack, unpack
from hps_core.updates import TierUpdateApplier, UpdateSink, UpdateSource, topic_name
from hps_core.updates.source import APPLY_RETRYABLE
from tests.kafka_broker import KafkaBroker, broker_or_skip

KEYS = np.array([1, 2, 3], np.int64)
FAST_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 300}
VALUES = np.ones((3, 2), np.float32)


class _Applier:
    """Raises the queued errors, one per call (None: that call applies), then applies; refuses (ConfigError) the slices
    whose first key is in ``refuse``; records the keys of every slice it was given."""

    def __init__(self, errors: list[BaseException | None], refuse: frozenset[int] = frozenset()) -> None:
        self.errors = errors
        self.refuse = refuse
        self.calls = 0
        self.applied = 0
        self.slices: list[list[int]] = []

    def dim(self, table: str) -> int | None:
        return 2

    def apply(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        self.calls += 1
        self.slices.append(keys.tolist())
        if self.errors and (error := self.errors.pop(0)) is not None:
            raise error
        if int(keys[0]) in self.refuse:
            raise ConfigError("refused")
        self.applied += len(keys)


def _source(applier: _Applier, max_batch_size: int = 8192) -> UpdateSource:
    cfg = UpdateSourceConfig(type="kafka_message_queue", failure_backoff_ms=1, max_batch_size=max_batch_size)
    return UpdateSource(cfg, applier, layer="volatile", group_id="hps.test")


def test_the_retryable_set_is_the_tier_and_the_gpu_out_of_memory() -> None:
    assert APPLY_RETRYABLE == (TierError, DeviceMemoryError)


@pytest.mark.parametrize("error", [TierError("down"), TierBusyError("locked"),
                                   DeviceMemoryError("GPU 0: out of memory")])
def test_a_failing_tier_or_gpu_is_retried_until_it_answers(error: BaseException) -> None:
    applier = _Applier([error, error, error])
    source = _source(applier)
    assert source._apply("hps_et.m.t", KEYS, VALUES) is True
    stats = source.stats()
    assert applier.calls == 4 and applier.applied == 3
    assert stats["apply_errors"] == 3 and stats["rejected_updates"] == 0 and stats["updates_applied"] == 3


@pytest.mark.parametrize("error", [ConfigError("table stored with dim 4"), RequestError("bad rows"),
                                   MalformedMessage("refused")])
def test_rows_the_tier_refuses_are_skipped_at_once_and_not_counted_as_applied(error: BaseException) -> None:
    applier = _Applier([error])
    source = _source(applier)
    assert source._apply("hps_et.m.t", KEYS, VALUES) is False  # skipped: the stream goes on
    stats = source.stats()
    assert applier.calls == 1 and applier.applied == 0
    assert stats["apply_errors"] == 1 and stats["rejected_updates"] == 3 and stats["updates_applied"] == 0


def test_an_update_row_the_tables_format_cannot_store_is_rejected_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """A NaN in an update of an fp8 table: the tier refuses the slice (RowValueError, a
    RequestError), the source skips it into rejected_updates at once, and logs the cause once
    per interval however often it recurs; a good slice after it is applied and packed."""
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))
    applier = TierUpdateApplier(db, {"hps_et.m.t": 2}, row_formats={"hps_et.m.t": RowFormat.FP8})
    source = UpdateSource(UpdateSourceConfig(type="kafka_message_queue", failure_backoff_ms=1), applier,
                          layer="volatile", group_id="hps.test")
    bad = VALUES.copy()
    bad[1, 0] = np.nan
    with caplog.at_level(logging.INFO, logger="hps_core.updates.source"):
        assert source._apply("hps_et.m.t", KEYS, bad) is False
        assert source._apply("hps_et.m.t", KEYS + 10, bad) is False
    stats = source.stats()
    assert stats["apply_errors"] == 2 and stats["rejected_updates"] == 6 and stats["updates_applied"] == 0
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "the row of key 2 cannot be stored" in lines[0] and "NaN" in lines[0], lines
    assert not db.fetch("hps_et.m.t", KEYS, np.zeros((3, 2), np.float32)).any()
    good = np.array([[1.0, -2.0], [0.5, 0.25], [3.0, 3.0]], np.float32)
    assert source._apply("hps_et.m.t", KEYS, good) is True
    out = np.zeros((3, 2), np.float32)
    assert db.fetch("hps_et.m.t", KEYS, out).all()
    np.testing.assert_array_equal(out, unpack(RowFormat.FP8, pack(RowFormat.FP8, good), 2))


def test_a_gpu_failing_for_good_stops_like_a_bug_instead_of_retrying_forever() -> None:
    """A DeviceError other than out of memory (an illegal memory access) would fail every
    retry: it propagates (and stops the source uncommitted), neither retried nor rejected."""
    applier = _Applier([DeviceError("GPU 0: illegal memory access")] * 3)
    source = _source(applier)
    with pytest.raises(DeviceError, match="illegal"):
        source._apply("hps_et.m.t", KEYS, VALUES)
    stats = source.stats()
    assert applier.calls == 1 and stats["rejected_updates"] == 0 and stats["updates_applied"] == 0


def test_a_batch_a_stop_interrupted_is_applied_and_counted_once() -> None:
    """A stop ends the retries of the second slice: the first stays applied and counted, and the
    flush at the consumer's close (the revoke) applies and counts only the rest, in order."""
    applier = _Applier([None, TierError("down"), None, None, TierError("down")], refuse=frozenset({5}))
    source = _source(applier, max_batch_size=2)
    for keys in ([1], [2, 3], [4]):  # rows 0 | 1-2 | 3: slices [1, 2] [3, 4]
        source._pending.add("hps_et.m.a", np.array(keys, np.int64), np.ones((len(keys), 2), np.float32), None)
    source._pending.add("hps_et.m.b", np.array([5, 6], np.int64), VALUES[:2], None)
    source._pending.add("hps_et.m.b", np.array([7], np.int64), VALUES[:1], None)
    source._stop.set()  # every failed attempt ends the flush at once
    assert source._apply_pending() is False  # [1, 2] applied, [3, 4] failed
    assert source.stats()["updates_applied"] == 2 and source.stats()["messages"] == 0
    assert source._apply_pending() is False  # [3, 4] applied, table b's [5, 6] refused, [7] failed
    stats = source.stats()
    assert stats["updates_applied"] == 4 and stats["messages"] == 3 and stats["rejected_updates"] == 2
    assert source._apply_pending() is True  # [7] applied
    assert applier.slices == [[1, 2], [3, 4], [3, 4], [5, 6], [7], [7]]
    stats = source.stats()
    assert stats["updates_applied"] == 5 and stats["messages"] == 4 and stats["rejected_updates"] == 2
    assert not source._pending.chunks and not source._pending.done


# --------------------------------------------------------------------------- against a real broker
@pytest.fixture
def broker() -> Iterator[KafkaBroker]:
    with broker_or_skip() as server:
        yield server


def _publish(bootstrap: str, *batches: list[int]) -> str:
    """One HugeCTR update message per batch, in order, on a new one-partition topic; its name."""
    model = f"m{uuid.uuid4().hex[:8]}"
    with UpdateSink(bootstrap, num_partitions=1) as sink:
        for keys in batches:
            sink.publish(model, "t", np.array(keys, np.int64), np.ones((len(keys), 2), np.float32))
        assert sink.flush(30).pending == 0
    return topic_name(model, "t")


def _broker_source(bootstrap: str, applier: _Applier, topic: str, max_batch_size: int = 8192) -> UpdateSource:
    cfg = UpdateSourceConfig(type="kafka_message_queue", brokers=bootstrap, poll_timeout_ms=100,
                             failure_backoff_ms=1, max_batch_size=max_batch_size)
    return UpdateSource(cfg, applier, layer="volatile", group_id=f"hps.test.{uuid.uuid4().hex[:8]}",
                        update_filters=[rf"^{re.escape(topic)}$"], consumer_config=FAST_GROUP)


def _committed(bootstrap: str, group: str, topic: str) -> int:
    """The offset ``group`` committed for partition 0 of ``topic`` (OFFSET_INVALID if none)."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        [tp] = probe.committed([TopicPartition(topic, 0)], timeout=10)
        assert tp.error is None, tp.error
        offset: int = tp.offset
        return offset
    finally:
        probe.close()


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


@pytest.mark.kafka
@pytest.mark.timeout(60)
def test_only_the_applied_slices_and_whole_messages_count_as_applied(broker: KafkaBroker) -> None:
    topic = _publish(broker.bootstrap, [1], [2, 3], [4])  # rows 0 | 1-2 | 3, at offsets 0 | 1 | 2
    applier = _Applier([], refuse=frozenset({3}))  # the second slice is refused
    source = _broker_source(broker.bootstrap, applier, topic, max_batch_size=2)
    source.start()
    try:
        _wait(lambda: _committed(broker.bootstrap, source.group_id, topic) == 3, "offset 3 committed")
    finally:
        source.stop()
    assert applier.slices == [[1, 2], [3, 4]]  # the three messages, in one batch, in slices of 2 rows
    stats = source.stats()
    assert stats["updates_applied"] == 2 and stats["rejected_updates"] == 2 and stats["apply_errors"] == 1
    assert stats["messages"] == 1 and stats["staleness_samples"] == 1  # [1] only: [2, 3] lost row 3
    assert stats["commits"] == 1 and stats["stopped_by"] is None  # refused rows are skipped, like malformed ones
    assert _committed(broker.bootstrap, source.group_id, topic) == 3


@pytest.mark.kafka
@pytest.mark.timeout(60)
@pytest.mark.parametrize("error", [TypeError("a bug"), KeyError("t")])
def test_a_bug_in_the_apply_stops_the_source_and_commits_nothing(
        broker: KafkaBroker, error: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    topic = _publish(broker.bootstrap, [1, 2, 3])
    applier = _Applier([error])
    source = _broker_source(broker.bootstrap, applier, topic)
    with caplog.at_level(logging.ERROR, logger="hps_core.updates.source"):
        _run_to_end(source, timeout=30)
    stats = source.stats()
    assert applier.calls == 1 and applier.applied == 0
    assert stats["updates_applied"] == 0 and stats["rejected_updates"] == 0 and stats["messages"] == 0
    assert not stats["running"] and stats["stopped_by"] == f"{type(error).__name__}: {error}"
    assert stats["commits"] == 0 and _committed(broker.bootstrap, source.group_id, topic) == OFFSET_INVALID
    assert [r.exc_info is not None for r in caplog.records if "stopped" in r.getMessage()] == [True]
    # a restart re-reads the batch: nothing is lost
    source.start()
    try:
        _wait(lambda: _committed(broker.bootstrap, source.group_id, topic) == 1, "offset 1 committed")
    finally:
        source.stop()
    assert applier.applied == 3 and applier.slices == [[1, 2, 3], [1, 2, 3]]
    assert source.stats()["updates_applied"] == 3 and source.stats()["stopped_by"] is None


def test_a_stop_ends_the_retries_and_commits_nothing() -> None:
    applier = _Applier([TierError("down")] * 1000)
    source = _source(applier)
    stopper = threading.Timer(0.05, source._stop.set)
    stopper.start()
    assert source._apply("hps_et.m.t", KEYS, VALUES) is None
    stopper.join()
    assert applier.applied == 0 and 1 <= applier.calls < 1000
    assert source.stats()["updates_applied"] == 0


# --------------------------------------------------------------------------- the consumer loop
def _run_to_end(source: UpdateSource, timeout: float = 10.0) -> None:
    source.start()
    assert source._thread is not None
    source._thread.join(timeout)


def test_a_kafka_failure_recreates_the_consumer() -> None:
    source = _source(_Applier([]))
    calls = []

    def connect_and_consume() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KafkaException(KafkaError(KafkaError._FATAL, "fenced", fatal=True))
        source._stop.set()  # consumed until stopped

    source._connect_and_consume = connect_and_consume  # type: ignore[method-assign]
    _run_to_end(source)
    stats = source.stats()
    assert len(calls) == 2 and stats["consumer_restarts"] == 1 and stats["stopped_by"] is None


def test_a_bug_in_the_loop_stops_the_source_visibly_instead_of_restarting_forever(
        caplog: pytest.LogCaptureFixture) -> None:
    source = _source(_Applier([]))
    calls = []

    def connect_and_consume() -> None:
        calls.append(1)
        raise TypeError("a bug")

    source._connect_and_consume = connect_and_consume  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="hps_core.updates.source"):
        _run_to_end(source)
    stats = source.stats()
    assert len(calls) == 1 and stats["consumer_restarts"] == 0
    assert not stats["running"] and stats["stopped_by"] == "TypeError: a bug"
    assert [r.exc_info is not None for r in caplog.records if "stopped" in r.getMessage()] == [True]


def test_a_consumer_setting_librdkafka_refuses_fails_start() -> None:
    cfg = UpdateSourceConfig(type="kafka_message_queue", failure_backoff_ms=1)
    source = UpdateSource(cfg, _Applier([]), layer="volatile", group_id="hps.test",
                          consumer_config={"no.such.property": 1})
    with pytest.raises(ConfigError, match="update source hps.test: consumer settings.*no.such.property"):
        source.start()
    assert not source.running and source._thread is None


def test_a_consumer_setting_librdkafka_refuses_fails_the_servers_construction(tmp_path: Path) -> None:
    keys = np.arange(8, dtype=np.int64)
    write_sparse_model(tmp_path / "t.model", keys, np.ones((8, 2), np.float32))
    (tmp_path / "hps.json").write_text(json.dumps({
        "volatile_db": {"type": "hash_map"},
        "persistent_db": {"type": "disabled"},
        "update_source": {"type": "kafka_message_queue", "brokers": "127.0.0.1:1"},
        "models": [{"model": "m", "sparse_files": ["t.model"], "embedding_table_names": ["t"],
                    "embedding_vecsize_per_table": [2], "maxnum_catfeature_query_per_table_per_sample": [8],
                    "gpucacheper": 0.5}],
    }))
    config = load_config(tmp_path / "hps.json")
    with pytest.raises(ConfigError, match="no.such.property"):
        HierarchicalParameterServer(config, cache_device="cpu", update_consumer_config={"no.such.property": 1})
