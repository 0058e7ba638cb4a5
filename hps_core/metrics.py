"""What the parameter server exports as Prometheus metrics: pure logic, no Triton import.

A :class:`MetricsCollector` turns the running totals of one deployed model — its
:class:`~hps_core.lookup.LookupSession` counters, the occupancy of its embedding caches and
the stats of the server's update sources — into a flat list of :class:`Sample` objects
``(family, labels, value)``. ``backend/hps/metrics.py`` hands them to Triton's
``pb_utils.MetricFamily`` so they appear at Triton's ``/metrics``; anything else (a test, an
in-process server) can print them with :func:`render_text`.

Families (every name starts with ``hps_``; labels ``model``, ``table``, ``tier``, ``reason``)::

    hps_lookup_keys_total{model,table}              counter  keys looked up (duplicates included)
    hps_lookup_unique_keys_total{model,table}       counter  keys after per-request de-duplication
    hps_hits_total{model,table,tier}                counter  unique keys answered by tier cache|volatile|persistent
    hps_misses_total{model,table,tier}              counter  unique keys a tier was asked for and lacked
    hps_defaults_total{model,table}                 counter  keys found in no tier (got the default value)
    hps_tier_errors_total{model,table}              counter  tier calls that failed (the next tier answered)
    hps_tier_seconds_total{model,table,tier}        counter  time spent in each tier
    hps_cache_async_inserts_total{model,table}      counter  unique keys answered with the default while their
                                                         cache insertion ran in the background
    hps_cache_dropped_inserts_total{model,table}    counter  the same, when the insertion was skipped (queue full)
    hps_cache_full_total{model,table}               counter  fetched rows a full static table left uncached
                                                         (a key not in its sparse file: served, not cached)
    hps_hit_rate{model,table,tier}                  gauge    hits / unique keys since the previous collection
    hps_cache_rows{model,table}                     gauge    rows held by the embedding cache
    hps_cache_capacity_rows{model,table}            gauge    rows the embedding cache can hold
    hps_cache_occupancy{model,table}                gauge    rows / capacity
    hps_updates_applied_total{model,tier}           counter  (key, vector) pairs applied from Kafka, per layer
    hps_update_messages_total{model,tier}           counter  update messages applied
    hps_update_malformed_total{model,tier}          counter  update messages skipped as malformed
    hps_update_rejected_total{model,tier,reason}    counter  (key, vector) pairs refused, never applied nor
                                                         retried; reason "non_finite": their message held
                                                         NaN or infinity (refused whole), "tier": the tier
                                                         refused their slice (a row its format cannot store)
    hps_update_source_up{model,tier}                gauge    1 while the layer's update source runs, 0 once
                                                         it stopped (stats()' stopped_by says why)
    hps_update_lag_messages{model,tier}             gauge    messages published but not yet consumed;
                                                         NaN while the source is stopped
    hps_update_staleness_seconds{model,tier,quantile}  gauge  publish → applied, p50 / p99 over the recent
                                                         window; NaN while the source is stopped
    hps_volatile_lost_partitions{model,table}       gauge    Redis partitions whose rows a node lost and
                                                         that are not refilled yet (hps_core/db/redis_refill.py)

Misses per tier follow from the cascade: what the volatile tier lacked went on to the
persistent tier, so volatile misses = persistent hits + defaults; persistent misses =
defaults; cache misses = unique keys − cache hits.

A stopped update source does not read as caught up: ``hps_update_source_up`` drops to 0 and
its lag and staleness gauges turn NaN rather than keeping their last values. (Prometheus'
custom is to drop such a series, but a Triton metric, once created, keeps exporting its last
value until the model unloads; NaN is what a query can tell apart. Alert on
``hps_update_source_up == 0``.)

Counters are reported as running totals; :class:`CounterDeltas` turns them into the
increments a Prometheus client library wants (``Counter.increment(delta)``), and skips the
series that did not move, so a collection after each request costs one call per *changed*
series. Gauges whose source is not free (cache occupancy asks the cache, which on a GPU is a
kernel and a sync; update stats take a lock and a percentile) are refreshed at most every
``slow_interval_s``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "FAMILIES",
    "CounterDeltas",
    "Family",
    "GaugeChanges",
    "MetricsCollector",
    "Sample",
    "render_text",
]

Kind = Literal["counter", "gauge"]
Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs: hashable, stable


@dataclass(frozen=True)
class Family:
    """One metric family: Prometheus name, kind and help text."""

    name: str
    kind: Kind
    description: str


_FAMILY_LIST = (
    Family("hps_lookup_keys_total", "counter", "Keys looked up, duplicates included"),
    Family("hps_lookup_unique_keys_total", "counter", "Keys looked up after per-request de-duplication"),
    Family("hps_hits_total", "counter", "Unique keys answered by a tier (cache, volatile, persistent)"),
    Family("hps_misses_total", "counter", "Unique keys a tier was asked for and did not hold"),
    Family("hps_defaults_total", "counter", "Keys found in no tier; answered with the table's default value"),
    Family("hps_tier_errors_total", "counter", "Tier calls that failed; the next tier answered"),
    Family("hps_tier_seconds_total", "counter", "Seconds spent in a tier"),
    Family("hps_cache_async_inserts_total", "counter",
           "Unique keys answered with the default while their cache insertion ran in the background"),
    Family("hps_cache_dropped_inserts_total", "counter",
           "Unique keys answered with the default whose cache insertion was skipped (background queue full)"),
    Family("hps_cache_full_total", "counter",
           "Fetched rows a full static embedding table left uncached (served from the tiers, not cached)"),
    Family("hps_hit_rate", "gauge", "Share of unique keys answered by a tier since the previous collection"),
    Family("hps_cache_rows", "gauge", "Rows held by the embedding cache"),
    Family("hps_cache_capacity_rows", "gauge", "Rows the embedding cache can hold"),
    Family("hps_cache_occupancy", "gauge", "Embedding cache rows / capacity"),
    Family("hps_updates_applied_total", "counter", "Embedding updates applied from Kafka, per database layer"),
    Family("hps_update_messages_total", "counter", "Update messages applied, per database layer"),
    Family("hps_update_malformed_total", "counter", "Update messages skipped as malformed, per database layer"),
    Family("hps_update_rejected_total", "counter",
           "Updates refused, never applied: reason non_finite (NaN or infinity in the message) or tier "
           "(the tier could not store them), per layer"),
    Family("hps_update_source_up", "gauge", "1 while the layer's update source runs, 0 once it stopped"),
    Family("hps_update_lag_messages", "gauge",
           "Update messages published but not yet consumed, per layer; NaN while the source is stopped"),
    Family("hps_update_staleness_seconds", "gauge",
           "Update publish-to-applied time over the recent window; NaN while the source is stopped"),
    Family("hps_volatile_lost_partitions", "gauge",
           "Redis partitions whose rows a node lost (restarted empty) and that are not refilled yet"),
)
#: Every family this module emits, by name.
FAMILIES: Mapping[str, Family] = {f.name: f for f in _FAMILY_LIST}

_CACHE, _VOLATILE, _PERSISTENT = "cache", "volatile", "persistent"
_QUANTILES = (("0.5", "staleness_p50_s"), ("0.99", "staleness_p99_s"))
_UNKNOWN = math.nan  # a gauge whose value is not known (the update source stopped)


@dataclass(frozen=True)
class Sample:
    """One series value: family name, labels, value."""

    name: str
    labels: Labels
    value: float

    @property
    def kind(self) -> Kind:
        return FAMILIES[self.name].kind

    @property
    def key(self) -> tuple[str, Labels]:
        return self.name, self.labels


#: lookup counter -> family, for tables with a cache
_CACHE_COUNTERS = (
    ("async_inserts", "hps_cache_async_inserts_total"),
    ("dropped_inserts", "hps_cache_dropped_inserts_total"),
    ("cache_full", "hps_cache_full_total"),
)


def _labels(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


class MetricsCollector:
    """Builds the samples of one model from its counters, caches and update stats.

    ``tiers``: the tiers this model's lookups go through, in cascade order, from
    ``("cache", "volatile", "persistent")`` (a disabled database, or a table without cache,
    is left out). ``caches`` maps table names to objects with ``size()`` and ``capacity``.
    ``extra_labels`` (e.g. a Triton model instance) are added to the gauges, which describe
    one process; counters are left without them so that instances add up.
    ``lost_partitions``: a callable returning, per table, the volatile partitions lost and not
    yet refilled (``HierarchicalParameterServer.lost_partitions(model)``), or None when the
    volatile tier is not watched (no gauge then); read with the slow gauges.
    """

    def __init__(
        self,
        model: str,
        tiers: Sequence[str],
        *,
        caches: Mapping[str, Any] | None = None,
        extra_labels: Mapping[str, str] | None = None,
        slow_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        lost_partitions: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.model = model
        self._lost_partitions = lost_partitions
        self.tiers = tuple(tiers)
        self._caches = dict(caches or {})
        self._extra = dict(extra_labels or {})
        self._slow_interval_s = slow_interval_s
        self._clock = clock
        self._last_slow: float | None = None
        self._previous: dict[str, Mapping[str, float]] = {}

    def collect(
        self,
        counters: Mapping[str, Mapping[str, float]],
        updates: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        force_slow: bool = False,
    ) -> list[Sample]:
        """Samples for ``counters`` (``LookupSession.counters()``: per table running totals) and
        ``updates`` (``OnlineUpdates.stats()``: per layer). Cache occupancy and update stats are
        included when ``slow_interval_s`` has passed since they last were, or ``force_slow``."""
        samples: list[Sample] = []
        for table, totals in counters.items():
            samples += self._table_samples(table, totals)
            samples += self._hit_rates(table, totals, self._previous.get(table))
            self._previous[table] = dict(totals)
        now = self._clock()
        if force_slow or self._last_slow is None or now - self._last_slow >= self._slow_interval_s:
            self._last_slow = now
            samples += self._cache_samples()
            samples += self._update_samples(updates or {})
            samples += self._volatile_samples()
        return samples

    # ---- lookups
    def _table_samples(self, table: str, c: Mapping[str, float]) -> list[Sample]:
        base = {"model": self.model, "table": table}
        out = [
            Sample("hps_lookup_keys_total", _labels(**base), c["keys"]),
            Sample("hps_lookup_unique_keys_total", _labels(**base), c["unique_keys"]),
            Sample("hps_defaults_total", _labels(**base), c["defaults"]),
            Sample("hps_tier_errors_total", _labels(**base), c["tier_errors"]),
        ]
        for tier in self._tiers_of(table):
            tiered = _labels(**base, tier=tier)
            out.append(Sample("hps_hits_total", tiered, _hits(c, tier)))
            out.append(Sample("hps_misses_total", tiered, self._misses(c, tier, table)))
            out.append(Sample("hps_tier_seconds_total", tiered, c[f"seconds_{tier}"]))
        if table in self._caches:
            out += [Sample(family, _labels(**base), c.get(field, 0)) for field, family in _CACHE_COUNTERS]
        return out

    def _tiers_of(self, table: str) -> tuple[str, ...]:
        return tuple(t for t in self.tiers if t != _CACHE or table in self._caches)

    def _misses(self, c: Mapping[str, float], tier: str, table: str) -> float:
        if tier == _CACHE:
            return c["unique_keys"] - c["cache_hits"]
        below = self._tiers_of(table)
        after = below[below.index(tier) + 1 :]
        # What this tier lacked went on to the next tiers, and what they lacked got defaults.
        return sum(_hits(c, t) for t in after) + c["defaults"]

    def _hit_rates(self, table: str, now: Mapping[str, float], before: Mapping[str, float] | None) -> list[Sample]:
        unique = now["unique_keys"] - (before["unique_keys"] if before else 0)
        if unique <= 0:
            return []  # no lookups since the last collection: the gauges keep their value
        out = []
        for tier in self._tiers_of(table):
            hits = _hits(now, tier) - (_hits(before, tier) if before else 0)
            labels = _labels(model=self.model, table=table, tier=tier, **self._extra)
            out.append(Sample("hps_hit_rate", labels, min(1.0, max(0.0, hits / unique))))
        return out

    # ---- caches and updates (slow)
    def _cache_samples(self) -> list[Sample]:
        out = []
        for table, cache in self._caches.items():
            labels = _labels(model=self.model, table=table, **self._extra)
            rows, capacity = float(cache.size()), float(cache.capacity)
            out += [
                Sample("hps_cache_rows", labels, rows),
                Sample("hps_cache_capacity_rows", labels, capacity),
                Sample("hps_cache_occupancy", labels, rows / capacity if capacity else 0.0),
            ]
        return out

    def _volatile_samples(self) -> list[Sample]:
        if self._lost_partitions is None:
            return []
        return [
            Sample("hps_volatile_lost_partitions", _labels(model=self.model, table=table, **self._extra), float(n))
            for table, n in self._lost_partitions().items()
        ]

    def _update_samples(self, updates: Mapping[str, Mapping[str, Any]]) -> list[Sample]:
        out = []
        for layer, stats in updates.items():
            counters = _labels(model=self.model, tier=layer)
            gauges = _labels(model=self.model, tier=layer, **self._extra)
            running = bool(stats.get("running"))
            # rejected_updates counts both reasons; rejected_non_finite is its non-finite share
            rejected, non_finite = float(stats.get("rejected_updates", 0)), float(stats.get("rejected_non_finite", 0))
            out += [
                Sample("hps_updates_applied_total", counters, float(stats.get("updates_applied", 0))),
                Sample("hps_update_messages_total", counters, float(stats.get("messages", 0))),
                Sample("hps_update_malformed_total", counters, float(stats.get("malformed", 0))),
                Sample("hps_update_rejected_total", _labels(model=self.model, tier=layer, reason="non_finite"), non_finite),
                Sample("hps_update_rejected_total", _labels(model=self.model, tier=layer, reason="tier"),
                       rejected - non_finite),
                Sample("hps_update_source_up", gauges, 1.0 if running else 0.0),
                # a stopped source's last values would read as caught up: unknown instead
                Sample("hps_update_lag_messages", gauges, float(stats.get("lag_messages", 0)) if running else _UNKNOWN),
            ]
            for quantile, field in _QUANTILES:
                if stats.get(field) is not None:  # None until a message was applied
                    labels = tuple(sorted((*gauges, ("quantile", quantile))))
                    value = float(stats[field]) if running else _UNKNOWN
                    out.append(Sample("hps_update_staleness_seconds", labels, value))
        return out


def _hits(c: Mapping[str, float], tier: str) -> float:
    return c[f"{tier}_hits"]


class CounterDeltas:
    """Turns running totals into increments, remembering what was reported per series.

    A total that went down (a process restarted its counters) is reported from zero again,
    as Prometheus' ``rate()`` expects of a counter reset.
    """

    def __init__(self) -> None:
        self._reported: dict[tuple[str, Labels], float] = {}

    def deltas(self, samples: Iterable[Sample]) -> list[Sample]:
        """The counter samples that moved, with ``value`` = increment since last reported.

        A series seen for the first time is included even at zero, so that it exists (an
        absent series and a zero one read differently in Prometheus queries)."""
        out = []
        for sample in samples:
            if sample.kind != "counter":
                continue
            before = self._reported.get(sample.key)
            previous = before or 0.0
            delta = sample.value - previous if sample.value >= previous else sample.value
            if delta > 0 or before is None:
                out.append(Sample(sample.name, sample.labels, delta))
            self._reported[sample.key] = sample.value
        return out


class GaugeChanges:
    """The gauge samples whose value differs from the one last set (skips redundant sets)."""

    def __init__(self) -> None:
        self._set: dict[tuple[str, Labels], float] = {}

    def changes(self, samples: Iterable[Sample]) -> list[Sample]:
        out = []
        for sample in samples:
            if sample.kind == "gauge" and not _same(self._set.get(sample.key), sample.value):
                self._set[sample.key] = sample.value
                out.append(sample)
        return out


def _same(before: float | None, value: float) -> bool:
    """Whether a gauge set to ``before`` already shows ``value`` (NaN shows NaN)."""
    return before is not None and (before == value or (math.isnan(before) and math.isnan(value)))


def render_text(samples: Iterable[Sample]) -> str:
    """Prometheus text exposition of ``samples`` (running totals), for logs and in-process use."""
    lines: list[str] = []
    seen: set[str] = set()
    for sample in samples:
        family = FAMILIES[sample.name]
        if family.name not in seen:
            seen.add(family.name)
            lines += [f"# HELP {family.name} {family.description}", f"# TYPE {family.name} {family.kind}"]
        labels = ",".join(f'{k}="{v}"' for k, v in sample.labels)
        value = "NaN" if math.isnan(sample.value) else f"{sample.value:.17g}"  # the exposition's spelling
        lines.append(f"{sample.name}{{{labels}}} {value}")
    return "\n".join(lines) + "\n"
