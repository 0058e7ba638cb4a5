"""A bounded queue of background work, run by one daemon thread.

The lookup hands it work that must not delay a request (cache insertions above the hit-rate
threshold, copying rows up to the volatile DB). When more than ``max_pending`` tasks wait,
new ones are refused rather than queued: under overload it is better to skip a cache fill
than to grow memory and latency without bound (HugeCTR drops them too).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

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
    """Within a ``with`` block, runs ``step()`` again and again on a daemon thread; the block's
    exit lets the running step finish, then joins. ``step`` sees :attr:`stopping` to cut waits short."""

    def __init__(self, step: Callable[[], object], *, name: str = "hps-repeat") -> None:
        self._step = step
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> RepeatInBackground:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._thread.join()

    def _run(self) -> None:
        while not self.stopping.is_set():
            self._step()
