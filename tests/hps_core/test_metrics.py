"""hps_core.metrics: samples from lookup counters, cache occupancy and update stats."""

from __future__ import annotations

import numpy as np
import pytest

from hps_core.config import parse_config
from hps_core.db import HashMapVolatileDB
from hps_core.lookup import COUNTER_FIELDS, LookupSession
from hps_core.metrics import FAMILIES, CounterDeltas, GaugeChanges, MetricsCollector, Sample, render_text


def _totals(**values: float) -> dict[str, float]:
    base = dict.fromkeys(COUNTER_FIELDS, 0.0)
    base.update(values)
    return base


def _by_key(samples: list[Sample]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {s.key: s.value for s in samples}


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    return _by_key(samples)[(name, tuple(sorted(labels.items())))]


class _Cache:
    capacity = 200

    def size(self) -> int:
        return 50


def test_lookup_counters_become_samples_with_misses_per_tier() -> None:
    collector = MetricsCollector("m", ["cache", "volatile", "persistent"], caches={"t0": _Cache()})
    counters = {
        "t0": _totals(keys=100, unique_keys=80, cache_hits=50, volatile_hits=20, persistent_hits=6, defaults=4,
                      seconds_volatile=0.5, dropped_inserts=3, cache_full=2),
        "t1": _totals(keys=10, unique_keys=10, volatile_hits=7, persistent_hits=1, defaults=2, tier_errors=1),
    }
    samples = collector.collect(counters)
    assert _value(samples, "hps_lookup_keys_total", model="m", table="t0") == 100
    assert _value(samples, "hps_hits_total", model="m", table="t0", tier="cache") == 50
    assert _value(samples, "hps_misses_total", model="m", table="t0", tier="cache") == 30
    assert _value(samples, "hps_misses_total", model="m", table="t0", tier="volatile") == 10  # 6 + 4
    assert _value(samples, "hps_misses_total", model="m", table="t0", tier="persistent") == 4
    assert _value(samples, "hps_tier_seconds_total", model="m", table="t0", tier="volatile") == 0.5
    assert _value(samples, "hps_hit_rate", model="m", table="t0", tier="cache") == pytest.approx(50 / 80)
    assert _value(samples, "hps_cache_occupancy", model="m", table="t0") == 0.25
    assert _value(samples, "hps_cache_capacity_rows", model="m", table="t0") == 200
    assert _value(samples, "hps_cache_dropped_inserts_total", model="m", table="t0") == 3
    assert _value(samples, "hps_cache_full_total", model="m", table="t0") == 2
    # t1 has no cache: no cache series at all
    names = {(s.name, dict(s.labels).get("tier")) for s in samples if dict(s.labels).get("table") == "t1"}
    assert ("hps_hits_total", "cache") not in names and ("hps_cache_rows", None) not in names
    assert _value(samples, "hps_misses_total", model="m", table="t1", tier="volatile") == 3
    assert _value(samples, "hps_tier_errors_total", model="m", table="t1") == 1
    assert all(s.name in FAMILIES and s.name.startswith("hps_") for s in samples)


def test_hit_rate_covers_only_the_lookups_since_the_previous_collection() -> None:
    collector = MetricsCollector("m", ["volatile", "persistent"], extra_labels={"instance": "i0"})
    collector.collect({"t": _totals(unique_keys=10, volatile_hits=10)})
    samples = collector.collect({"t": _totals(unique_keys=20, volatile_hits=12, persistent_hits=8)})
    assert _value(samples, "hps_hit_rate", model="m", table="t", tier="volatile", instance="i0") == 0.2
    assert _value(samples, "hps_hit_rate", model="m", table="t", tier="persistent", instance="i0") == 0.8
    idle = collector.collect({"t": _totals(unique_keys=20, volatile_hits=12, persistent_hits=8)})
    assert not [s for s in idle if s.name == "hps_hit_rate"]  # no lookups: the gauge keeps its value


def test_slow_samples_are_rate_limited() -> None:
    now = [0.0]
    collector = MetricsCollector("m", ["cache"], caches={"t": _Cache()}, slow_interval_s=1.0, clock=lambda: now[0])
    updates = {"volatile": {"updates_applied": 5, "messages": 1, "malformed": 0, "lag_messages": 2, "running": True,
                            "staleness_p50_s": 0.02, "staleness_p99_s": 0.05}}
    first = collector.collect({"t": _totals()}, updates)
    assert _value(first, "hps_updates_applied_total", model="m", tier="volatile") == 5
    assert _value(first, "hps_update_staleness_seconds", model="m", tier="volatile", quantile="0.99") == 0.05
    now[0] = 0.5
    assert not [s for s in collector.collect({"t": _totals()}, updates) if s.name.startswith(("hps_update", "hps_cache_r"))]
    now[0] = 1.5
    assert [s for s in collector.collect({"t": _totals()}, updates) if s.name == "hps_cache_rows"]


def test_a_stopped_update_source_reads_as_down_not_as_caught_up() -> None:
    collector = MetricsCollector("m", [], extra_labels={"instance": "i0"})
    stats = {"updates_applied": 5, "rejected_updates": 3, "rejected_non_finite": 1, "lag_messages": 0, "running": True,
             "staleness_p50_s": 0.02, "staleness_p99_s": 0.05}
    gauges = GaugeChanges()
    up = collector.collect({}, {"volatile": stats}, force_slow=True)
    gauges.changes(up)
    labels = {"model": "m", "tier": "volatile", "instance": "i0"}
    assert _value(up, "hps_update_source_up", **labels) == 1
    assert _value(up, "hps_update_lag_messages", **labels) == 0
    assert _value(up, "hps_update_rejected_total", model="m", tier="volatile", reason="tier") == 2
    assert _value(up, "hps_update_rejected_total", model="m", tier="volatile", reason="non_finite") == 1
    down = collector.collect({}, {"volatile": dict(stats, running=False, stopped_by="TypeError: a bug")},
                             force_slow=True)
    assert _value(down, "hps_update_source_up", **labels) == 0
    assert np.isnan(_value(down, "hps_update_lag_messages", **labels))  # unknown, not 0 (caught up)
    assert np.isnan(_value(down, "hps_update_staleness_seconds", quantile="0.99", **labels))
    assert {s.name for s in gauges.changes(down)} == {"hps_update_source_up", "hps_update_lag_messages",
                                                     "hps_update_staleness_seconds"}
    assert gauges.changes(down) == []  # NaN is set once, not again at every collection
    text = render_text(down)
    assert 'hps_update_lag_messages{instance="i0",model="m",tier="volatile"} NaN' in text
    assert "# TYPE hps_update_source_up gauge" in text and "# TYPE hps_update_rejected_total counter" in text


def test_staleness_is_left_out_until_an_update_was_applied() -> None:
    collector = MetricsCollector("m", [])
    samples = collector.collect({}, {"persistent": {"updates_applied": 0, "staleness_p50_s": None, "staleness_p99_s": None}})
    assert not [s for s in samples if s.name == "hps_update_staleness_seconds"]


def test_counter_deltas_report_increments_and_skip_unchanged_series() -> None:
    deltas = CounterDeltas()
    labels = (("model", "m"),)
    first = deltas.deltas([Sample("hps_lookup_keys_total", labels, 10), Sample("hps_cache_rows", labels, 3),
                           Sample("hps_defaults_total", labels, 0)])
    # gauges are not counters; a new series is reported even at zero, so that it exists
    assert first == [Sample("hps_lookup_keys_total", labels, 10), Sample("hps_defaults_total", labels, 0)]
    assert deltas.deltas([Sample("hps_defaults_total", labels, 0)]) == []
    assert deltas.deltas([Sample("hps_lookup_keys_total", labels, 10)]) == []
    assert deltas.deltas([Sample("hps_lookup_keys_total", labels, 15)]) == [Sample("hps_lookup_keys_total", labels, 5)]
    assert deltas.deltas([Sample("hps_lookup_keys_total", labels, 2)]) == [Sample("hps_lookup_keys_total", labels, 2)]


def test_gauge_changes_skip_unchanged_values() -> None:
    gauges = GaugeChanges()
    labels = (("model", "m"),)
    assert len(gauges.changes([Sample("hps_cache_rows", labels, 3)])) == 1
    assert gauges.changes([Sample("hps_cache_rows", labels, 3)]) == []
    assert len(gauges.changes([Sample("hps_cache_rows", labels, 4)])) == 1


def test_a_real_session_counts_what_it_looked_up(tmp_path) -> None:
    config = parse_config({
        "supportlonglong": True,
        "volatile_db": {"type": "hash_map"},
        "persistent_db": {"type": "disabled"},
        "models": [{"model": "m", "sparse_files": [str(tmp_path / "t0")], "embedding_table_names": ["t0"],
                    "embedding_vecsize_per_table": [4], "maxnum_catfeature_query_per_table_per_sample": [1],
                    "default_value_for_each_table": [0.0], "deployed_device_list": [0], "max_batch_size": 16}],
    }, "test")
    model = config.model("m")
    volatile = HashMapVolatileDB(config.volatile_db)
    volatile.create_table(model.tables[0].qualified_name, 4)
    volatile.insert(model.tables[0].qualified_name, np.arange(5, dtype=np.int64), np.ones((5, 4), np.float32))
    session = LookupSession(model, volatile=volatile, persistent=None)
    session.lookup(np.array([1, 1, 2, 9], dtype=np.int64), np.array([4], dtype=np.int32))
    samples = MetricsCollector("m", ["volatile"]).collect(session.counters())
    assert _value(samples, "hps_lookup_keys_total", model="m", table="t0") == 4
    assert _value(samples, "hps_lookup_unique_keys_total", model="m", table="t0") == 3
    assert _value(samples, "hps_hits_total", model="m", table="t0", tier="volatile") == 2
    assert _value(samples, "hps_defaults_total", model="m", table="t0") == 1
    assert _value(samples, "hps_misses_total", model="m", table="t0", tier="volatile") == 1
    text = render_text(samples)
    assert "# TYPE hps_lookup_keys_total counter" in text
    assert 'hps_lookup_keys_total{model="m",table="t0"} 4' in text
    volatile.close()


def test_lost_volatile_partitions_are_a_gauge_per_table() -> None:
    lost = {"t0": 0, "t1": 3}
    collector = MetricsCollector("m", ["volatile"], lost_partitions=lambda: lost, extra_labels={"instance": "0"})
    samples = collector.collect({"t0": _totals(), "t1": _totals()})
    assert _value(samples, "hps_volatile_lost_partitions", model="m", table="t1", instance="0") == 3
    assert _value(samples, "hps_volatile_lost_partitions", model="m", table="t0", instance="0") == 0
    assert FAMILIES["hps_volatile_lost_partitions"].kind == "gauge"
    assert "hps_volatile_lost_partitions" in render_text(samples)
    unwatched = MetricsCollector("m", ["volatile"]).collect({"t0": _totals()})
    assert not any(s.name == "hps_volatile_lost_partitions" for s in unwatched)
