"""Cache refresh: re-read cached rows from the tiers so the caches follow changes below them.

HugeCTR's ``refresh_interval``, ``refresh_delay`` and ``cache_refresh_percentage_per_iteration``:
after ``refresh_delay`` seconds, every ``refresh_interval`` seconds, the next ``percentage`` of
the model's cache sets (all tables' sets in one range, so each table's share is refreshed in
proportion to its size) is dumped, their keys fetched again from the volatile and persistent
tiers in one call per tier, and the cached copies overwritten with ``update`` (existing keys
only, so a refresh never evicts or inserts). A full pass over the cache takes
``1 / percentage`` steps.
Online updates (Kafka) refresh the rows they change directly; this catches everything else,
such as a RocksDB reloaded by ``hps load``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np

from hps_core.arrays import device_context, to_host
from hps_core.background import RepeatInBackground
from hps_core.errors import ConfigError
from hps_core.logs import RateLimitedLog

if TYPE_CHECKING:
    from hps_core.lookup import LookupSession

__all__ = ["CacheRefresher"]

log = logging.getLogger(__name__)


class CacheRefresher:
    """Refreshes the caches of one :class:`LookupSession`, in steps, from a daemon thread."""

    def __init__(self, session: LookupSession, *, percentage: float, interval: float, delay: float = 0.0) -> None:
        if not 0.0 < percentage <= 1.0:
            raise ConfigError(f"cache_refresh_percentage_per_iteration must be in (0, 1], got {percentage}")
        self._session = session
        self._percentage = percentage
        self._interval = interval
        self._delay = delay
        self._cursor = 0  # next global set of the cache to refresh
        self._loop: RepeatInBackground | None = None
        # A tier that is down fails every refresh step the same way: one line per cause per interval.
        self._failures = RateLimitedLog(log)

    def step(self) -> int:
        """Refresh the next slice of the cache's sets; returns the rows updated."""
        cache = self._session.cache
        if cache is None:
            return 0
        width = max(1, math.ceil(cache.total_sets * self._percentage))
        start = self._cursor
        stop = min(start + width, cache.total_sets)
        self._cursor = 0 if stop >= cache.total_sets else stop
        with device_context(cache):
            table_ids, keys = (to_host(a) for a in cache.dump_sets(start, stop))
        if keys.size == 0:
            return 0
        keys = keys.astype(np.int64, copy=False)
        fetch_started = time.monotonic()
        fetched = self._session.fetch_from_tiers(table_ids, keys)
        return self._session.cache_rows(table_ids, keys, fetched, fetch_started, insert=False)

    def start(self) -> None:
        """Run :meth:`step` every ``interval`` seconds after ``delay``, until :meth:`stop`."""
        if self._interval <= 0 or self._session.cache is None or self._loop is not None:
            return  # HugeCTR: refresh_interval 0 means never; started already
        self._loop = RepeatInBackground(self.step, name="hps-cache-refresh", interval_s=self._interval,
                                        first_delay_s=self._delay,
                                        on_error=lambda exc: self._failures.failure("cache refresh step failed", exc))
        self._loop.start()

    def stop(self) -> None:
        """Stop the thread; log how many failures were held back."""
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        self._failures.flush()
