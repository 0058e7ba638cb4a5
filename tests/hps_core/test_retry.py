"""RetryPolicy: what is retried, how long it waits, when it stops (no real sleeping)."""

from __future__ import annotations

import pytest

from hps_core.errors import ConfigError, RequestError, TierBusyError, TierError
from hps_core.retry import RetryPolicy


class _Clock:
    """A fake clock that sleeping advances."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _failing(errors: list[BaseException], result: str = "done"):  # type: ignore[no-untyped-def]
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return result

    return fn, calls


def test_retries_a_retryable_error_with_growing_capped_backoff() -> None:
    clock = _Clock()
    policy = RetryPolicy(retryable=(TierError,), first_backoff_s=0.1, factor=2.0, max_backoff_s=0.3, max_attempts=10)
    fn, calls = _failing([TierError("down")] * 4)
    seen: list[int] = []
    assert policy.call(fn, sleep=clock.sleep, clock=clock, on_retry=lambda n, exc: seen.append(n)) == "done"
    assert len(calls) == 5 and seen == [1, 2, 3, 4]
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.3, 0.3])


def test_a_subclass_of_a_retryable_error_is_retried() -> None:
    clock = _Clock()
    fn, calls = _failing([TierBusyError("locked")])
    assert RetryPolicy(retryable=(TierError,), max_attempts=2).call(fn, sleep=clock.sleep, clock=clock) == "done"
    assert len(calls) == 2


@pytest.mark.parametrize("error", [RequestError("bad"), TypeError("a bug"), KeyError("t")])
def test_an_error_not_declared_retryable_is_raised_at_once(error: BaseException) -> None:
    clock = _Clock()
    fn, calls = _failing([error])
    with pytest.raises(type(error)):
        RetryPolicy(retryable=(TierError,)).call(fn, sleep=clock.sleep, clock=clock)  # no limit at all
    assert len(calls) == 1 and clock.sleeps == []


def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    clock = _Clock()
    fn, calls = _failing([TierError(f"down {i}") for i in range(10)])
    with pytest.raises(TierError, match="down 2"):
        RetryPolicy(retryable=(TierError,), first_backoff_s=0.01, max_attempts=3).call(fn, sleep=clock.sleep, clock=clock)
    assert len(calls) == 3 and len(clock.sleeps) == 2


def test_gives_up_at_the_deadline() -> None:
    clock = _Clock()
    policy = RetryPolicy(retryable=(TierBusyError,), first_backoff_s=0.2, factor=1.0, max_backoff_s=0.2, deadline_s=1.0)
    fn, calls = _failing([TierBusyError("locked")] * 100)
    with pytest.raises(TierBusyError):
        policy.call(fn, sleep=clock.sleep, clock=clock)
    assert len(calls) == 6 and clock.now == pytest.approx(1.0)  # attempts at 0, 0.2, ..., 1.0


def test_a_sleep_that_reports_a_stop_ends_the_retries() -> None:
    waits: list[float] = []

    def stopped_after_two(seconds: float) -> bool:  # threading.Event.wait's answer
        waits.append(seconds)
        return len(waits) == 2

    fn, calls = _failing([TierError("down")] * 100)
    with pytest.raises(TierError):
        RetryPolicy(retryable=(TierError,)).call(fn, sleep=stopped_after_two, clock=lambda: 0.0)
    assert len(calls) == 2


def test_delay_and_exhausted_are_data() -> None:
    policy = RetryPolicy(retryable=(TierError,), first_backoff_s=0.1, factor=3.0, max_backoff_s=1.0, max_attempts=4)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.3, 0.9, 1.0])
    assert not policy.exhausted(3) and policy.exhausted(4)
    assert not RetryPolicy(retryable=(TierError,), deadline_s=5.0).exhausted(1000, 4.9)


@pytest.mark.parametrize("kwargs", [
    {"retryable": ()},
    {"retryable": (Exception,)},
    {"retryable": (TierError,), "max_attempts": 0},
    {"retryable": (TierError,), "factor": 0.5},
    {"retryable": (TierError,), "first_backoff_s": 3.0, "max_backoff_s": 1.0},
])
def test_refuses_a_policy_that_would_retry_bugs_or_never_wait(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)


def test_jitter_shortens_each_pause_by_a_random_share_so_processes_that_failed_together_spread_out() -> None:
    policy = RetryPolicy(retryable=(TierError,), first_backoff_s=0.4, factor=1.0, max_backoff_s=0.4, jitter=0.5)
    pauses = [policy.pause(1) for _ in range(200)]
    assert all(0.2 <= p <= 0.4 for p in pauses)
    assert max(pauses) - min(pauses) > 0.1  # spread, not one value
    assert policy.delay(1) == 0.4  # the nominal delay stays data
    exact = RetryPolicy(retryable=(TierError,), first_backoff_s=0.4, factor=1.0, max_backoff_s=0.4)
    assert {exact.pause(1) for _ in range(20)} == {0.4}


@pytest.mark.parametrize("jitter", [-0.1, 1.0, 2.0])
def test_refuses_a_jitter_outside_zero_to_one(jitter: float) -> None:
    with pytest.raises(ConfigError, match="jitter"):
        RetryPolicy(retryable=(TierError,), jitter=jitter)

