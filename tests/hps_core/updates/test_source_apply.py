"""UpdateSource's retry policies, without a broker: a tier or GPU that fails is retried until
it answers or the source stops; rows a tier refuses (another HPSError) are skipped and counted;
a bug in the apply stops the source without committing; only what was applied counts as
applied. A Kafka failure recreates the consumer, anything else stops the source, visibly; a
consumer setting librdkafka refuses fails start() (and a server's construction)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from hps_core.config import UpdateSourceConfig, load_config
from hps_core.errors import ConfigError, DeviceError, MalformedMessage, RequestError, TierBusyError, TierError
from hps_core.formats import write_sparse_model
from hps_core.server import HierarchicalParameterServer
from hps_core.updates import UpdateSource
from hps_core.updates.source import APPLY_RETRYABLE
from hps_core.updates.wire import encode

KEYS = np.array([1, 2, 3], np.int64)
VALUES = np.ones((3, 2), np.float32)


class _Applier:
    """Raises the queued errors, one per call, then applies."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors
        self.calls = 0
        self.applied = 0

    def dim(self, table: str) -> int | None:
        return 2

    def apply(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        self.applied += len(keys)


def _source(applier: _Applier, max_batch_size: int = 8192) -> UpdateSource:
    cfg = UpdateSourceConfig(type="kafka_message_queue", failure_backoff_ms=1, max_batch_size=max_batch_size)
    return UpdateSource(cfg, applier, layer="volatile", group_id="hps.test")


class _Message:
    """What Consumer.consume returns, for one HugeCTR update message."""

    def __init__(self, offset: int, keys: np.ndarray) -> None:
        self._offset, self._payload = offset, encode(keys, np.ones((len(keys), 2), np.float32))

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "hps_et.m.t"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._payload

    def key(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_000


class _Consumer:
    """A consumer that hands out ``messages`` once, then nothing; records its commits."""

    def __init__(self, messages: list[_Message]) -> None:
        self.messages = messages
        self.commits: list[list[tuple[str, int, int]]] = []
        self.closed = False

    def consume(self, num_messages: int, timeout: float) -> list[_Message]:
        taken, self.messages = self.messages[:num_messages], self.messages[num_messages:]
        return taken

    def poll(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.01))

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> list[TopicPartition]:
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])
        return offsets

    def assignment(self) -> list[TopicPartition]:
        return []

    def close(self) -> None:
        self.closed = True


def test_the_retryable_set_is_the_tier_and_the_gpu() -> None:
    assert APPLY_RETRYABLE == (TierError, DeviceError)


@pytest.mark.parametrize("error", [TierError("down"), TierBusyError("locked"), DeviceError("GPU 0: out of memory")])
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


def test_only_the_applied_slices_and_whole_messages_count_as_applied() -> None:
    applier = _Applier([])
    source = _source(applier, max_batch_size=2)
    consumer = _Consumer([])
    for keys in ([1], [2, 3], [4]):  # rows 0 | 1-2 | 3; slices of 2 rows: [0, 1] [2, 3]
        source._pending.add("hps_et.m.t", np.array(keys, np.int64), np.ones((len(keys), 2), np.float32), 1_000)
    source._offsets[("hps_et.m.t", 0)] = 3
    original = applier.apply

    def second_slice_refused(table: str, keys: np.ndarray, values: np.ndarray) -> None:
        if keys[0] == 3:
            raise ConfigError("refused")
        original(table, keys, values)

    applier.apply = second_slice_refused  # type: ignore[method-assign]
    assert source._flush(consumer)  # type: ignore[arg-type]
    stats = source.stats()
    assert stats["updates_applied"] == 2 and stats["rejected_updates"] == 2
    assert stats["messages"] == 1 and stats["staleness_samples"] == 1  # [1] only: [2, 3] lost row 3
    assert consumer.commits == [[("hps_et.m.t", 0, 3)]]  # refused rows are skipped, like malformed ones


@pytest.mark.parametrize("error", [TypeError("a bug"), KeyError("t")])
def test_a_bug_in_the_apply_stops_the_source_and_commits_nothing(
        error: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    applier = _Applier([error])
    source = _source(applier)
    consumer = _Consumer([_Message(0, np.array([1, 2, 3], np.int64))])
    source._connect = lambda: consumer  # type: ignore[method-assign,assignment,return-value]
    with caplog.at_level(logging.ERROR, logger="hps_core.updates.source"):
        _run_to_end(source)
    stats = source.stats()
    assert applier.calls == 1 and applier.applied == 0
    assert stats["updates_applied"] == 0 and stats["rejected_updates"] == 0 and stats["messages"] == 0
    assert not stats["running"] and stats["stopped_by"] == f"{type(error).__name__}: {error}"
    assert consumer.commits == [] and consumer.closed  # a restart re-reads the batch: nothing is lost
    assert [r.exc_info is not None for r in caplog.records if "stopped" in r.getMessage()] == [True]


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
