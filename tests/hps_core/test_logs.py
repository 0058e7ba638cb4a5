"""RateLimitedLog: one line per cause per interval, with the count held back."""

from __future__ import annotations

import logging

import pytest

from hps_core.background import BackgroundQueue
from hps_core.errors import TierError
from hps_core.logs import RateLimitedLog, cause_of


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


def test_background_failures_do_not_flood(caplog: pytest.LogCaptureFixture) -> None:
    queue = BackgroundQueue(max_pending=10_000, name="test-bg")

    def fail() -> None:
        raise TierError("Redis: node down: Connection refused")

    with caplog.at_level(logging.DEBUG, "hps_core.background"):
        for _ in range(2000):
            queue.submit(fail)
        queue.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "test-bg: task failed: TierError" in errors[0].getMessage()
