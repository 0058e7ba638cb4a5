"""Rate-limited logging: one line per cause per interval, with how many were held back.

A failure that repeats on every request or background task (a Redis node down, a broker
gone) must stay visible without flooding the log: :class:`RateLimitedLog` writes the first
occurrence of a cause at once, then at most one line per ``interval`` seconds for that cause,
saying how many occurrences it held back since the last line. The traceback of a held-back
exception is dropped; the first one of each interval is logged in full at DEBUG.

A *cause* is a short string the caller chooses (``"volatile insert: ConnectionError"``):
failures with the same cause share one budget. :func:`cause_of` builds one from an exception
(its type and, for our tier errors, the part of the message before the first ``:``) so that
two different failures never share a line and one failure never gets two.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["DEFAULT_LOG_INTERVAL_S", "RateLimitedLog", "cause_of"]

#: Seconds between two lines of the same cause.
DEFAULT_LOG_INTERVAL_S = 10.0
_MAX_CAUSE_CHARS = 120  # a cause is a dictionary key: keep unbounded messages out of it


def cause_of(exc: BaseException, context: str = "") -> str:
    """A stable cause for ``exc``: ``context``, its type, and its message up to the first ``:``."""
    head = str(exc).split(":", 1)[0][:_MAX_CAUSE_CHARS]
    return f"{context}{': ' if context else ''}{type(exc).__name__}: {head}"


class RateLimitedLog:
    """Writes to ``logger`` at most one line per cause per ``interval`` seconds.

    Thread-safe. ``clock`` is injectable so that tests need not sleep.
    """

    def __init__(self, logger: logging.Logger, interval: float = DEFAULT_LOG_INTERVAL_S,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval}")
        self._logger = logger
        self._interval = float(interval)
        self._clock = clock
        self._lock = threading.Lock()
        # cause -> (time of its last line, occurrences held back since)
        self._state: dict[str, tuple[float, int]] = {}

    def log(self, level: int, cause: str, message: str, *, exc: BaseException | None = None) -> bool:
        """Log ``message`` for ``cause`` unless a line of that cause went out less than
        ``interval`` ago; returns whether a line was written."""
        now = self._clock()
        with self._lock:
            last, held = self._state.get(cause, (float("-inf"), 0))
            if now - last < self._interval:
                self._state[cause] = (last, held + 1)
                return False
            self._state[cause] = (now, 0)
        suffix = f" ({held} more like this in the last {now - last:.0f} s)" if held else ""
        self._logger.log(level, "%s%s", message, suffix)
        if exc is not None and self._logger.isEnabledFor(logging.DEBUG):
            self._logger.debug("traceback of: %s", message, exc_info=(type(exc), exc, exc.__traceback__))
        return True

    def warning(self, cause: str, message: str, *, exc: BaseException | None = None) -> bool:
        return self.log(logging.WARNING, cause, message, exc=exc)

    def error(self, cause: str, message: str, *, exc: BaseException | None = None) -> bool:
        return self.log(logging.ERROR, cause, message, exc=exc)

    def failure(self, context: str, exc: BaseException, *, level: int = logging.ERROR) -> bool:
        """Log ``exc`` under the cause :func:`cause_of` gives it: ``"<context>: <Type>: <msg>"``."""
        return self.log(level, cause_of(exc, context), f"{context}: {type(exc).__name__}: {exc}", exc=exc)

    def held_back(self) -> dict[str, int]:
        """Occurrences not yet reported, per cause (for tests and shutdown summaries)."""
        with self._lock:
            return {cause: held for cause, (_, held) in self._state.items() if held}
