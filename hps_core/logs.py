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

Occurrences held back when the cause stops recurring would be lost with them (the size of the
last burst of an outage): :meth:`RateLimitedLog.flush` writes one line per cause with its
count; call it where the loop that logs stops (a queue closed, a thread stopped, finalize).

It writes to a :class:`logging.Logger`, or to any ``sink(level, line)`` callable: an adapter to
a host's own log (Triton's ``pb_utils.Logger`` in ``backend/``), so that this module needs no
import of the host.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from hps_core.errors import ConfigError

__all__ = ["DEFAULT_LOG_INTERVAL_S", "LogSink", "RateLimitedLog", "cause_of"]

#: A callable a RateLimitedLog writes to instead of a Logger: ``sink(level, line)``, with
#: ``level`` a :mod:`logging` level (tracebacks come at DEBUG).
LogSink = Callable[[int, str], None]

#: Seconds between two lines of the same cause.
DEFAULT_LOG_INTERVAL_S = 10.0
_MAX_CAUSE_CHARS = 120  # a cause is a dictionary key: keep unbounded messages out of it


def cause_of(exc: BaseException, context: str = "") -> str:
    """A stable cause for ``exc``: ``context``, its type, and its message up to the first ``:``."""
    head = str(exc).split(":", 1)[0][:_MAX_CAUSE_CHARS]
    return f"{context}{': ' if context else ''}{type(exc).__name__}: {head}"


@dataclass
class _Cause:
    last: float  # time of its last line
    held: int = 0  # occurrences held back since
    level: int = logging.INFO  # of the last one held back
    message: str = ""  # the last one held back


class RateLimitedLog:
    """Writes to ``logger`` (a Logger or a :data:`LogSink`) at most one line per cause per
    ``interval`` seconds.

    Thread-safe. ``clock`` is injectable so that tests need not sleep.
    """

    def __init__(self, logger: logging.Logger | LogSink, interval: float = DEFAULT_LOG_INTERVAL_S,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        if interval < 0:
            raise ConfigError(f"log interval must be >= 0 seconds, got {interval}")
        self._logger = logger
        self._interval = float(interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, _Cause] = {}

    def log(self, level: int, cause: str, message: str, *, exc: BaseException | None = None) -> bool:
        """Log ``message`` for ``cause`` unless a line of that cause went out less than
        ``interval`` ago; returns whether a line was written."""
        now = self._clock()
        with self._lock:
            state = self._state.get(cause)
            if state is not None and now - state.last < self._interval:
                state.held, state.level, state.message = state.held + 1, level, message
                return False
            self._state[cause] = _Cause(now)
        held = "" if state is None or not state.held else (
            f" ({state.held} more like this in the last {now - state.last:.0f} s)")
        self._write(level, message + held)
        if exc is None:
            pass
        elif not isinstance(self._logger, logging.Logger):
            trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self._logger(logging.DEBUG, f"traceback of: {message}\n{trace.rstrip()}")
        elif self._logger.isEnabledFor(logging.DEBUG):
            self._logger.debug("traceback of: %s", message, exc_info=(type(exc), exc, exc.__traceback__))
        return True

    def flush(self) -> int:
        """One line per cause with occurrences held back: the last one's message, at its
        level, and how many were held back; returns the number of lines. Call it where the
        loop that logs stops: otherwise the count of a burst that did not recur is lost."""
        now = self._clock()
        lines = []
        with self._lock:
            for state in self._state.values():
                if state.held:
                    lines.append((state.level, f"{state.message} ({state.held} like this held back in the "
                                               f"last {now - state.last:.0f} s)"))
                    state.last, state.held = now, 0
        for level, line in lines:
            self._write(level, line)
        return len(lines)

    def _write(self, level: int, line: str) -> None:
        if isinstance(self._logger, logging.Logger):
            self._logger.log(level, "%s", line)
        else:
            self._logger(level, line)

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
            return {cause: state.held for cause, state in self._state.items() if state.held}
