"""Work off the request path, each kind on one daemon thread.

* :class:`BackgroundQueue` — a bounded queue the lookup hands work that must not delay a
  request (cache insertions above the hit-rate threshold, copying rows up to the volatile DB).
  When more than ``max_pending`` tasks wait, new ones are refused rather than queued: under
  overload it is better to skip a cache fill than to grow memory and latency without bound
  (HugeCTR drops them too).
* :class:`RepeatInBackground` — a step repeated until stopped, back to back or periodically:
  the one loop of every periodic job (the cache refresher, the Redis refill monitor, the
  RocksDB secondary's catch-up, the backend's metrics publication) and of the benchmarks' load
  generators.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from hps_core.errors import ConfigError
from hps_core.logs import RateLimitedLog

__all__ = ["BackgroundQueue", "RepeatInBackground"]

log = logging.getLogger(__name__)

_STOP = object()


class BackgroundQueue:
    """Runs submitted callables in order on one thread; never blocks the submitter."""

    def __init__(self, max_pending: int = 64, *, name: str = "hps-background") -> None:
        self._tasks: queue.Queue[object] = queue.Queue(maxsize=max_pending)
        self._name = name
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        # A tier that is down fails every queued task the same way: one line per cause per interval.
        self._failures = RateLimitedLog(log)
        self._thread.start()

    def submit(self, task: Callable[[], object]) -> bool:
        """Queue ``task``; False when the queue is full or closed (the task is dropped)."""
        if self._closed:
            return False
        try:
            self._tasks.put_nowait(task)
        except queue.Full:
            return False
        return True

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every task queued so far has run."""
        done = threading.Event()
        self._tasks.put(done.set, timeout=timeout)
        done.wait(timeout)

    def close(self) -> None:
        """Run what is queued, then stop the thread; log how many failures were held back."""
        if self._closed:
            return
        self._closed = True
        self._tasks.put(_STOP)
        self._thread.join()
        self._failures.flush()

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is _STOP:
                return
            try:
                task()  # type: ignore[operator]
            except Exception as exc:  # noqa: BLE001 - a failed fill must not kill the thread
                self._failures.failure(f"{self._name}: task failed", exc)


class RepeatInBackground:
    """Runs ``step()`` on a daemon thread until stopped: back to back (``interval_s`` 0), or every
    ``interval_s`` seconds, the first time after ``first_delay_s`` (default: one interval).

    :meth:`start` and :meth:`stop`, or a ``with`` block; stopping lets the running step finish,
    then joins, and cuts a wait short. ``step`` sees :attr:`stopping` to cut its own waits
    short. A step that raises an Exception is handed to ``on_error(exc)`` and the loop goes on
    (a periodic job must outlive a failure); without ``on_error`` the error ends the loop.
    """

    def __init__(self, step: Callable[[], object], *, name: str = "hps-repeat", interval_s: float = 0.0,
                 first_delay_s: float | None = None,
                 on_error: Callable[[Exception], object] | None = None) -> None:
        if interval_s < 0 or (first_delay_s is not None and first_delay_s < 0):
            raise ConfigError(f"{name}: interval_s and first_delay_s must be >= 0 seconds, got "
                              f"{interval_s} and {first_delay_s}")
        self._step = step
        self._interval_s = float(interval_s)
        self._first_delay_s = self._interval_s if first_delay_s is None else float(first_delay_s)
        self._on_error = on_error
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join()

    def __enter__(self) -> RepeatInBackground:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        if self.stopping.wait(self._first_delay_s):
            return
        while not self.stopping.is_set():
            try:
                self._step()
            except Exception as exc:
                if self._on_error is None:
                    raise
                self._on_error(exc)
            if self._interval_s and self.stopping.wait(self._interval_s):
                return
