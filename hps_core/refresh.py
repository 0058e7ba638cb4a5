"""Cache refresh: re-read cached rows from the tiers so the caches follow changes below them.

HugeCTR's ``refresh_interval``, ``refresh_delay`` and ``cache_refresh_percentage_per_iteration``:
after ``refresh_delay`` seconds, every ``refresh_interval`` seconds, each table's cache has the
next ``percentage`` of its sets dumped, their keys fetched again from the volatile and
persistent tiers, and the cached copies overwritten with ``update`` (existing keys only, so a
refresh never evicts or inserts). A full pass over a cache takes ``1 / percentage`` steps.
Online updates (Kafka) refresh the rows they change directly; this catches everything else,
such as a RocksDB reloaded by ``hps load``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING

from hps_core.arrays import to_host

if TYPE_CHECKING:
    from hps_core.lookup import LookupSession

__all__ = ["CacheRefresher"]

log = logging.getLogger(__name__)


class CacheRefresher:
    """Refreshes the caches of one :class:`LookupSession`, in steps, from a daemon thread."""

    def __init__(self, session: LookupSession, *, percentage: float, interval: float, delay: float = 0.0) -> None:
        if not 0.0 < percentage <= 1.0:
            raise ValueError(f"cache_refresh_percentage_per_iteration must be in (0, 1], got {percentage}")
        self._session = session
        self._percentage = percentage
        self._interval = interval
        self._delay = delay
        self._cursor = {name: 0 for name in session.caches}  # next set to refresh, per table
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> int:
        """Refresh the next slice of every table's cache; returns the rows updated."""
        updated = 0
        for table in self._session.model.tables:
            cache = self._session.caches.get(table.name)
            if cache is None:
                continue
            num_sets = getattr(cache, "num_sets", 1)
            width = max(1, math.ceil(num_sets * self._percentage))
            start = self._cursor[table.name]
            stop = min(start + width, num_sets)
            self._cursor[table.name] = 0 if stop >= num_sets else stop
            keys = to_host(cache.dump(start, stop))
            if keys.size == 0:
                continue
            fetch_started = time.monotonic()
            fetched = self._session.fetch_from_tiers(table, keys)
            updated += self._session.cache_rows(table, keys, fetched, fetch_started, insert=False)
        return updated

    def start(self) -> None:
        """Run :meth:`step` every ``interval`` seconds after ``delay``, until :meth:`stop`."""
        if self._interval <= 0 or not self._cursor:
            return  # HugeCTR: refresh_interval 0 means never
        self._thread = threading.Thread(target=self._run, name="hps-cache-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        if self._stop.wait(self._delay):
            return
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a failed refresh must not end the refresher
                log.exception("cache refresh step failed")
            self._stop.wait(self._interval)
