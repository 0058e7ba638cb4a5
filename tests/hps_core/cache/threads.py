"""The thread harness of the caches' concurrency tests (CPU, GPU and the sanitizer runs)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_writers_and_readers(writer: Callable[[int], None], reader: Callable[[int], None],
                            stop: threading.Event) -> None:
    """writer(1), writer(2), reader(3), reader(4) on threads of their own, until both readers
    return; then ``stop`` is set and the writers are joined."""
    writers = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    readers = [threading.Thread(target=reader, args=(s,)) for s in (3, 4)]
    for t in writers + readers:
        t.start()
    for t in readers:
        t.join()
    stop.set()
    for t in writers:
        t.join()
