"""The HPS model's metrics at Triton's /metrics: names, labels and exact counts."""

from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import pytest

from hps_demo.client import hps_request, infer
from tests.e2e.models import DLRM_TABLES, E2EModels

pytestmark = pytest.mark.triton

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_PUBLISH_INTERVAL_S = 1.0  # backend/hps/metrics.py default (hps_metrics_interval_s)
_LINE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$")


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(name, labels): value}`` of the hps_ series in Triton's Prometheus text."""
    with _OPENER.open(url, timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match and match.group(1).startswith("hps_"):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            out[(match.group(1), labels)] = float(match.group(3))
    return out


def value(series: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    found = [v for (n, ls), v in series.items() if n == name and wanted <= ls and len(ls) == len(wanted)]
    assert len(found) == 1, f"{name}{labels}: {len(found)} series"
    return found[0]


def total(series: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and wanted <= ls)


def wait_for(url: str, name: str, expected: float, timeout: float = 10.0, **labels: str) -> dict:
    """Scrape until ``name`` totals ``expected`` (the backend publishes once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        series = scrape(url)
        if total(series, name, **labels) >= expected or time.monotonic() > deadline:
            return series
        time.sleep(0.1)


def settled(url: str, timeout: float = 15.0) -> dict:
    """A scrape after the backend has published everything sent so far: requests of earlier
    tests may still be on their way (published once a second)."""
    deadline = time.monotonic() + timeout
    series = scrape(url)
    while True:
        time.sleep(_PUBLISH_INTERVAL_S * 1.5)
        again = scrape(url)
        if again == series or time.monotonic() > deadline:
            return again
        series = again


def test_hps_metrics_count_exactly_the_keys_sent(triton: object, e2e_models: E2EModels, client: object) -> None:
    rng = np.random.default_rng(3)
    tables = e2e_models.dlrm_tables
    before = settled(triton.metrics_url)
    sent = np.zeros(DLRM_TABLES, dtype=np.int64)
    unique = np.zeros(DLRM_TABLES, dtype=np.int64)
    found = np.zeros(DLRM_TABLES, dtype=np.int64)
    for batch in (4, 16, 32):
        keys = np.stack([rng.choice(t.keys, size=batch) for t in tables], axis=1)
        keys[0, :] = 12345  # absent from every table: counted as a default
        keys[1, :] = keys[2, :]  # a duplicate within the request
        infer(client, "hps_embedding", hps_request(keys), "OUTPUT0")
        sent += batch
        per_table_unique = [np.unique(keys[:, i]) for i in range(DLRM_TABLES)]
        unique += [u.size for u in per_table_unique]
        found += [np.isin(u, t.keys).sum() for u, t in zip(per_table_unique, tables)]
    expected_keys = total(before, "hps_lookup_keys_total", model="hps_embedding") + sent.sum()
    after = wait_for(triton.metrics_url, "hps_lookup_keys_total", expected_keys, model="hps_embedding")
    for i in (0, 7, DLRM_TABLES - 1):
        table = f"t{i}"

        def delta(name: str, **labels: str) -> float:
            return total(after, name, model="hps_embedding", table=table, **labels) - total(
                before, name, model="hps_embedding", table=table, **labels)

        assert delta("hps_lookup_keys_total") == sent[i]
        assert delta("hps_lookup_unique_keys_total") == unique[i]
        assert delta("hps_defaults_total") == unique[i] - found[i]
        hits = delta("hps_hits_total", tier="volatile") + delta("hps_hits_total", tier="persistent")
        assert hits == found[i]
        # what the hash map (half of each table) lacked went to RocksDB or got the default
        assert delta("hps_misses_total", tier="volatile") == delta("hps_hits_total", tier="persistent") + (
            unique[i] - found[i])
        assert delta("hps_misses_total", tier="persistent") == unique[i] - found[i]
        assert delta("hps_tier_seconds_total", tier="volatile") > 0
        assert delta("hps_tier_errors_total") == 0
    rates = [v for (n, ls), v in after.items() if n == "hps_hit_rate" and ("table", "t0") in ls]
    assert rates and all(0.0 <= r <= 1.0 for r in rates)


def test_every_series_is_labelled_with_model_and_table(triton: object) -> None:
    series = scrape(triton.metrics_url)
    names = {name for name, _ in series}
    expected = {"hps_lookup_keys_total", "hps_lookup_unique_keys_total", "hps_hits_total", "hps_misses_total",
                "hps_defaults_total", "hps_tier_errors_total", "hps_tier_seconds_total"}
    assert expected <= names
    for (name, labels), _ in series.items():
        keys = dict(labels)
        assert keys.get("model") in ("hps_embedding", "hps_multi"), (name, labels)
        if not name.startswith("hps_update"):
            assert "table" in keys, (name, labels)
    # hps_multi: four tables, each with its own series (from initialize, before any request)
    multi = {dict(ls)["table"] for n, ls in series if n == "hps_lookup_keys_total" and ("model", "hps_multi") in ls}
    assert multi == {"t0", "t1", "t2", "t3"}


def test_metrics_follow_the_ensemble_too(triton: object, e2e_models: E2EModels) -> None:
    from hps_demo.client import dlrm_request, make_client

    rng = np.random.default_rng(5)
    before = total(settled(triton.metrics_url), "hps_lookup_keys_total", model="hps_embedding")
    keys = np.stack([rng.choice(t.keys, size=8) for t in e2e_models.dlrm_tables], axis=1)
    request = dlrm_request(keys, rng.normal(size=(8, 13)).astype(np.float32))
    infer(make_client("http", triton.http_url), "dlrm", request.as_dict(), "SCORE")
    after = wait_for(triton.metrics_url, "hps_lookup_keys_total", before + 8 * DLRM_TABLES, model="hps_embedding")
    assert total(after, "hps_lookup_keys_total", model="hps_embedding") - before == 8 * DLRM_TABLES
