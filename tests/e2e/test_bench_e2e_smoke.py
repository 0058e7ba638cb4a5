"""scripts/bench_e2e.py --smoke: the end-to-end benchmark runs and reports what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.triton, pytest.mark.slow]

_FIELDS = ("model", "protocol", "shared_memory", "batch", "concurrency", "throughput_rps", "throughput_sps",
           "p50_ms", "p90_ms", "p99_ms", "server_queue_us", "server_compute_input_us", "server_compute_infer_us",
           "server_compute_output_us", "hit_rates", "errors", "command")


def test_smoke_benchmark_reports_positive_throughput_and_no_errors(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_e2e.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "bench_e2e.json").read_text())
    assert result["machine"]["cpus"] >= 1 and result["config"]["smoke"] is True
    records = result["paths"]["cpu"]
    if result["machine"]["gpus"] == 0:
        assert result["paths"]["gpu"] == "pending (no GPU)"
    seen = {(r["model"], r["protocol"], r["sweep"], r["batch"], r["concurrency"]) for r in records}
    for model in ("dlrm", "hps_embedding"):
        for protocol in ("http", "grpc"):
            assert {(model, protocol, "batch", b, 1) for b in (32, 256)} <= seen
            assert {(model, protocol, "concurrency", 32, c) for c in (1, 2)} <= seen
    for record in records:
        assert "error" not in record, record
        assert all(f in record for f in _FIELDS), sorted(set(_FIELDS) - set(record))
        assert record["throughput_rps"] > 0 and record["throughput_sps"] > 0
        assert record["p99_ms"] >= record["p50_ms"] > 0
        assert record["errors"] == 0
        rates = record["hit_rates"]
        assert rates["keys"] > 0 and rates["volatile_hit_rate"] is not None
        assert 0.0 <= rates["volatile_hit_rate"] <= 1.0
    for plot in ("latency_vs_batch.png", "speedup_vs_batch.png", "throughput_vs_concurrency.png"):
        assert (out / "plots" / plot).stat().st_size > 0
