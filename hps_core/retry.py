"""Retry policy as data: which errors are worth another attempt, how long to wait, when to stop.

One :class:`RetryPolicy` per loop that retries, stated where the loop lives::

    loop                                     retryable               backoff                        limit
    TierUpdateApplier.opening: open writer   TierBusyError           busy_backoff_ms, constant      busy_retries
    WRITE_LOCK_WAIT: the RocksDB writer of   TierBusyError           0.1 s doubling to 1 s,         600 s
      a server's startup load, of a                                  jittered
      publication's bulk load and drop
    UpdateSource: apply a batch              TierError,              failure_backoff_ms, constant   until stopped
                                             DeviceMemoryError
    UpdateSink: re-send rounds               UpdateError             0.1 s doubling to 2 s,         max_idle_rounds idle rounds
                                                                     jittered

A policy whose failures come to many processes at once (several servers starting on one
RocksDB, every producer after a broker restart) sets ``jitter``: each pause is shortened by a
random share, so the processes that failed together do not all retry together (redis-py's
default backoff jitters for the same reason).

(The update source's set is ``hps_core.updates.applier.APPLY_RETRYABLE``, re-exported as
``hps_core.updates.source.APPLY_RETRYABLE``, where the source says what becomes of the other
errors of an apply.)

:meth:`RetryPolicy.call` runs a callable under a policy: an error the policy does not
declare retryable (a bug, a malformed request) is raised at once, never retried; a
retryable one is retried after :meth:`RetryPolicy.delay` until the attempt limit or the
deadline, then raised. The sleep and the clock are parameters, so tests run without sleeping,
and a loop that must stop on request passes an ``Event.wait`` as its sleep.

One policy per wait: the online updates' RocksDB writer is opened per batch under the
applier's busy policy alone, not also under the server's 600 s wait, which is only for the
writer that loads the tables at startup. A lock still busy then fails that apply, which the
source retries like any TierError, until it is stopped.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from hps_core.errors import ConfigError, TierBusyError

__all__ = ["WRITE_LOCK_WAIT", "RetryPolicy"]

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Which errors to retry, the pause between attempts, and when to give up.

    With neither ``max_attempts`` nor ``deadline_s`` it retries until its sleep reports a
    stop (see :meth:`call`): only for background loops that can be stopped.
    """

    retryable: tuple[type[BaseException], ...]  # errors worth another attempt; others are raised at once
    first_backoff_s: float = 0.05  # pause after the first failure
    factor: float = 2.0  # each further pause is this much longer ...
    max_backoff_s: float = 2.0  # ... up to this
    max_attempts: int | None = None  # attempts in all (the first included); None: no count limit
    deadline_s: float | None = None  # no new attempt this long after the first; None: no time limit
    jitter: float = 0.0  # each pause shortened by a random share up to this (0.5: between half and all of it)

    def __post_init__(self) -> None:
        if not self.retryable:
            raise ConfigError("RetryPolicy.retryable is empty: name the errors worth another attempt")
        if any(kind in (BaseException, Exception) for kind in self.retryable):
            raise ConfigError("RetryPolicy.retryable names every error: a bug would be retried; name the errors")
        if self.first_backoff_s < 0 or self.factor < 1 or self.max_backoff_s < self.first_backoff_s:
            raise ConfigError(f"RetryPolicy backoff must satisfy 0 <= first <= max and factor >= 1: {self}")
        if not 0.0 <= self.jitter < 1.0:
            raise ConfigError(f"RetryPolicy.jitter must be in [0, 1), got {self.jitter}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ConfigError(f"RetryPolicy.max_attempts must be >= 1 or None, got {self.max_attempts}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` (>= 1) failed attempts in a row, before jitter."""
        return min(self.first_backoff_s * self.factor ** max(failures - 1, 0), self.max_backoff_s)

    def pause(self, failures: int) -> float:
        """The pause actually taken: :meth:`delay` shortened by a random share up to ``jitter``."""
        return self.delay(failures) * (1.0 - self.jitter * random.random())

    def exhausted(self, failures: int, elapsed_s: float = 0.0) -> bool:
        """True when ``failures`` attempts, or ``elapsed_s`` seconds since the first, use up the policy."""
        return ((self.max_attempts is not None and failures >= self.max_attempts)
                or (self.deadline_s is not None and elapsed_s >= self.deadline_s))

    def call(
        self,
        fn: Callable[[], T],
        *,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        on_retry: Callable[[int, BaseException], None] | None = None,
    ) -> T:
        """``fn()``, retried under this policy.

        A non-retryable error propagates at once. After a retryable one, ``on_retry(failures,
        exc)`` is called (to count or log it), then ``sleep(delay)``; a ``sleep`` that returns
        True (``threading.Event.wait`` once the event is set) stops the retries and the error is
        raised. The last error is also raised once the policy is exhausted.
        """
        start = clock()
        failures = 0
        while True:
            try:
                return fn()
            except self.retryable as exc:
                failures += 1
                if self.exhausted(failures, clock() - start):
                    raise
                if on_retry is not None:
                    on_retry(failures, exc)
                if sleep(self.pause(failures)) is True:
                    raise


#: Waiting out another process's RocksDB write lock (RocksDB lets one process at a time write):
#: a server opening the writer to load its tables at startup, a publication's bulk load and its
#: drop of a retired version. A loader may be filling large tables meanwhile, hence the long
#: deadline; several servers started together wait on the same lock, hence the jitter. The online
#: updates' writer, opened per applied batch, is not under it (the applier's busy policy is).
WRITE_LOCK_WAIT = RetryPolicy(retryable=(TierBusyError,), first_backoff_s=0.1, factor=2.0, max_backoff_s=1.0,
                              deadline_s=600.0, jitter=0.5)
