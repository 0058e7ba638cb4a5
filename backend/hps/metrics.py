"""Publish the HPS model's metrics at Triton's ``/metrics`` through ``pb_utils.MetricFamily``.

The samples come from :class:`hps_core.metrics.MetricsCollector` (pure logic); this module
only owns the Triton objects: one ``MetricFamily`` per family name, one ``Metric`` per label
set, created on first use. Counters get ``increment(delta)``, gauges ``set(value)``, and only
for series that changed.

Why a background thread and not an update at the end of each ``execute``: every
``increment``/``set`` is a round trip from the stub process to Triton (about 30 µs here), and
a 26-table model moves about 200 series per request. Measured on the 2-core machine
(``hps_embedding``, 26 tables, 32 samples per request, HTTP): 1.55 ms per request without
metrics, 7.8 ms with an update after each ``execute``. A thread publishing every
``interval_s`` (model parameter ``hps_metrics_interval_s``, else :data:`DEFAULT_INTERVAL_S`)
costs the same calls once per interval whatever the request rate, and nothing on the request
path; the counters it reads are the session's own, so nothing is lost between publications.

Counters carry no instance label, so the instances of one model (each its own stub process)
add up into one series; gauges describe one process and carry ``instance``.

Loaded by ``backend/hps/model.py`` as a sibling file (Triton imports a Python-based
backend's ``model.py`` as a top-level module, so this file is found by path, not by package).
"""

from __future__ import annotations

from typing import Any

from hps_core.background import RepeatInBackground
from hps_core.metrics import FAMILIES, CounterDeltas, GaugeChanges, Labels, MetricsCollector, Sample

__all__ = ["DEFAULT_INTERVAL_S", "TritonMetrics"]

DEFAULT_INTERVAL_S = 1.0  # seconds between two publications when hps_metrics_interval_s is not set


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
        self._loop: RepeatInBackground | None = None

    def start(self, interval_s: float) -> None:
        """Publish now, then every ``interval_s`` seconds from a daemon thread (0: only now)."""
        self.update(force_slow=True)  # the series exist (at zero) before the first request
        if interval_s > 0 and self._loop is None:
            # metrics must never take the model down: a failed publication is logged, the loop goes on
            self._loop = RepeatInBackground(
                self.update, name="hps-metrics", interval_s=interval_s,
                on_error=lambda exc: self._pb.Logger.log_warn(f"hps: publishing metrics failed: {exc}"))
            self._loop.start()

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
        """Stop the publishing thread. The Triton objects are NOT dropped here: they go with
        the stub process after ``finalize``, and Triton removes the model's metrics when it
        unloads the model. Dropping them in ``finalize`` (each a delete sent to Triton) left
        Triton 2.51 with a corrupted heap once a model whose families share their names with
        a model still loaded (every HPS model: the names are the same) was unloaded at runtime:
        the next model load hung in ``malloc(): unsorted double linked list corrupted``
        (docs/deployment.md, "Model versions and runtime loading")."""
        if self._loop is not None:
            self._loop.stop()
            self._loop = None

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
