"""Publish the HPS model's metrics at Triton's ``/metrics`` through ``pb_utils.MetricFamily``.

The samples come from :class:`hps_core.metrics.MetricsCollector` (pure logic); this module
only owns the Triton objects: one ``MetricFamily`` per family name, one ``Metric`` per label
set, created on first use. Counters get ``increment(delta)``, gauges ``set(value)``, and only
for series that changed: every call is a message from the stub to the Triton process, so an
update after each ``execute`` costs one round trip per *moving* series, nothing per key.

Counters carry no instance label, so the instances of one model (each its own stub process)
add up into one series; gauges describe one process and carry ``instance``.

Loaded by ``backend/hps/model.py`` as a sibling file (Triton imports a Python-based
backend's ``model.py`` as a top-level module, so this file is found by path, not by package).
"""

from __future__ import annotations

from typing import Any

from hps_core.metrics import FAMILIES, CounterDeltas, GaugeChanges, Labels, MetricsCollector, Sample

__all__ = ["TritonMetrics"]


class TritonMetrics:
    """The metric objects of one model instance, fed from one :class:`MetricsCollector`.

    ``pb_utils``: the ``triton_python_backend_utils`` module (passed in, so this file imports
    no Triton module and unit tests can hand in a double). ``session`` and ``updates`` are the
    instance's :class:`~hps_core.lookup.LookupSession` and ``OnlineUpdates`` (or None).
    """

    def __init__(self, pb_utils: Any, collector: MetricsCollector, session: Any, updates: Any = None) -> None:
        self._pb = pb_utils
        self._collector = collector
        self._session = session
        self._updates = updates
        self._deltas = CounterDeltas()
        self._gauges = GaugeChanges()
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple[str, Labels], Any] = {}

    def update(self, *, force_slow: bool = False) -> None:
        """Collect and publish what changed since the last call (after each ``execute``)."""
        updates = self._updates.stats() if self._updates is not None else None
        samples = self._collector.collect(self._session.counters(), updates, force_slow=force_slow)
        for sample in self._deltas.deltas(samples):
            metric = self._metric(sample)  # created at zero the first time it is seen
            if sample.value > 0:
                metric.increment(sample.value)
        for sample in self._gauges.changes(samples):
            self._metric(sample).set(sample.value)

    def close(self) -> None:
        """Drop the Triton objects; metrics must go before their families (pb_utils' rule)."""
        self._metrics.clear()
        self._families.clear()

    def _metric(self, sample: Sample) -> Any:
        metric = self._metrics.get(sample.key)
        if metric is None:
            metric = self._family(sample.name).Metric(labels=dict(sample.labels))
            self._metrics[sample.key] = metric
        return metric

    def _family(self, name: str) -> Any:
        family = self._families.get(name)
        if family is None:
            spec = FAMILIES[name]
            kind = self._pb.MetricFamily.COUNTER if spec.kind == "counter" else self._pb.MetricFamily.GAUGE
            family = self._pb.MetricFamily(name=name, description=spec.description, kind=kind)
            self._families[name] = family
        return family
