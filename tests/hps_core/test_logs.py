"""RateLimitedLog: one line per cause per interval, with the count held back."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import numpy as np
import pytest

from hps_core.background import BackgroundQueue
from hps_core.errors import TierError
from hps_core.logs import RateLimitedLog, cause_of
from hps_core.refresh import CacheRefresher


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_cause_per_interval_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    limited = RateLimitedLog(logging.getLogger("test.logs"), 10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "test.logs"):
        assert limited.warning("a", "node down")
        for _ in range(500):
            clock.now += 0.01
            assert not limited.warning("a", "node down")
        assert limited.warning("b", "other cause")  # its own budget
        clock.now += 10.0
        assert limited.warning("a", "node down")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "node down"
    assert lines[1] == "other cause"
    assert lines[2].startswith("node down (500 more like this in the last 15 s)")
    assert len(lines) == 3
    assert limited.held_back() == {}


def test_cause_of_keeps_the_message_head_only() -> None:
    one = cause_of(TierError("Redis: node 127.0.0.1:7001: Connection refused"), "insert")
    two = cause_of(TierError("Redis: node 127.0.0.1:7002: Connection refused"), "insert")
    assert one == two == "insert: TierError: Redis"
    assert cause_of(ValueError("x"), "insert") != one


def test_flush_writes_the_count_held_back_of_each_cause(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    limited = RateLimitedLog(logging.getLogger("test.logs.flush"), 10.0, clock=clock)
    with caplog.at_level(logging.INFO, "test.logs.flush"):
        limited.error("a", "node 1 down")
        for i in range(2, 42):  # a burst that stops within the interval: never logged by log()
            clock.now += 0.1
            limited.error("a", f"node {i} down")
        limited.warning("b", "slow")  # nothing held back: no line from flush
        clock.now += 1.0
        assert limited.held_back() == {"a": 40}
        assert limited.flush() == 1
        assert limited.flush() == 0  # written once
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "node 1 down"),
        (logging.WARNING, "slow"),
        (logging.ERROR, "node 41 down (40 like this held back in the last 5 s)"),
    ]
    assert limited.held_back() == {}


def test_a_callable_sink_gets_the_lines_and_the_traceback() -> None:
    """How a host's own log (Triton's pb_utils.Logger) is reached without importing it here."""
    clock = _Clock()
    lines: list[tuple[int, str]] = []
    limited = RateLimitedLog(lambda level, line: lines.append((level, line)), 10.0, clock=clock)
    try:
        raise ValueError("bad row")
    except ValueError as exc:
        assert limited.failure("hps: request failed", exc)
        assert not limited.failure("hps: request failed", exc)
    limited.flush()
    assert lines[0] == (logging.ERROR, "hps: request failed: ValueError: bad row")
    assert lines[1][0] == logging.DEBUG and lines[1][1].startswith("traceback of: hps: request failed")
    assert 'raise ValueError("bad row")' in lines[1][1]
    assert lines[2] == (logging.ERROR, "hps: request failed: ValueError: bad row (1 like this held back in the last 0 s)")
    assert len(lines) == 3


@pytest.mark.parametrize("run", [1, 2])  # twice in one process, within the interval: independent
def test_background_failures_do_not_flood(caplog: pytest.LogCaptureFixture, run: int) -> None:
    queue = BackgroundQueue(max_pending=10_000, name="test-bg")

    def fail() -> None:
        raise TierError("Redis: node down: Connection refused")

    with caplog.at_level(logging.DEBUG, "hps_core.background"):
        for _ in range(2000):
            queue.submit(fail)
        queue.close()  # writes the count held back
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, errors
    assert errors[0] == "test-bg: task failed: TierError: Redis: node down: Connection refused"
    assert errors[1].startswith(f"{errors[0]} (1999 like this held back in the last ")


class _UnreadableCache:
    """A cache whose sets cannot be read: every refresh step fails the same way."""

    device = "cpu"
    total_sets = 4

    def dump_sets(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        raise TierError("Redis: node down: Connection refused")


def test_the_refresher_writes_what_it_held_back_when_it_stops(caplog: pytest.LogCaptureFixture) -> None:
    refresher = CacheRefresher(SimpleNamespace(cache=_UnreadableCache()), percentage=1.0,  # type: ignore[arg-type]
                               interval=0.001)
    with caplog.at_level(logging.ERROR, "hps_core.refresh"):
        refresher.start()
        deadline = time.monotonic() + 10
        while len(caplog.records) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # more failures, held back
        refresher.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0] == "cache refresh step failed: TierError: Redis: node down: Connection refused"
    assert lines[1].startswith(lines[0] + " (") and " like this held back in the last " in lines[1]
