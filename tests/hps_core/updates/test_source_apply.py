"""UpdateSource's retry policies, without a broker: a tier that fails is retried until it
answers or the source stops, anything else the apply raises is skipped, never retried; a
Kafka failure recreates the consumer, anything else stops the source, visibly."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException

from hps_core.config import UpdateSourceConfig
from hps_core.errors import ConfigError, TierBusyError, TierError
from hps_core.updates import UpdateSource

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


def _source(applier: _Applier) -> UpdateSource:
    cfg = UpdateSourceConfig(type="kafka_message_queue", failure_backoff_ms=1)
    return UpdateSource(cfg, applier, layer="volatile", group_id="hps.test")


def test_a_failing_tier_is_retried_until_it_answers() -> None:
    applier = _Applier([TierError("down"), TierBusyError("locked"), TierError("down")])
    source = _source(applier)
    assert source._apply("hps_et.m.t", KEYS, VALUES)
    stats = source.stats()
    assert applier.calls == 4 and applier.applied == 3
    assert stats["apply_errors"] == 3 and stats["rejected_updates"] == 0


@pytest.mark.parametrize("error", [ConfigError("table stored with dim 4"), TypeError("a bug"), KeyError("t")])
def test_an_error_that_is_not_retryable_skips_the_slice_at_once(error: BaseException) -> None:
    applier = _Applier([error])
    source = _source(applier)
    assert source._apply("hps_et.m.t", KEYS, VALUES)  # the stream goes on; the offsets commit
    stats = source.stats()
    assert applier.calls == 1 and applier.applied == 0
    assert stats["apply_errors"] == 1 and stats["rejected_updates"] == 3


def test_a_stop_ends_the_retries_and_commits_nothing() -> None:
    applier = _Applier([TierError("down")] * 1000)
    source = _source(applier)
    stopper = threading.Timer(0.05, source._stop.set)
    stopper.start()
    assert not source._apply("hps_et.m.t", KEYS, VALUES)
    stopper.join()
    assert applier.applied == 0 and 1 <= applier.calls < 1000


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


def test_a_consumer_setting_librdkafka_refuses_stops_the_source() -> None:
    cfg = UpdateSourceConfig(type="kafka_message_queue", failure_backoff_ms=1)
    source = UpdateSource(cfg, _Applier([]), layer="volatile", group_id="hps.test",
                          consumer_config={"no.such.property": 1})
    _run_to_end(source)
    stats = source.stats()
    assert not stats["running"] and stats["consumer_restarts"] == 0
    assert stats["stopped_by"].startswith("ConfigError: update source hps.test: consumer settings")
