"""UpdateSource's apply step under its RetryPolicy, without a broker: a tier that fails is
retried until it answers or the source stops; anything else is skipped, never retried."""

from __future__ import annotations

import threading

import numpy as np
import pytest

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
