"""scripts/bench_model_switch.py --smoke: the switch-under-load benchmark runs and reports what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def test_smoke_benchmark_switches_with_no_failed_or_mixed_answer(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_model_switch.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=400, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report,) = tmp_path.glob("bench_model_switch_*.json")
    result = json.loads(report.read_text())
    assert result["smoke"] is True and result["machine"]["cpus"] >= 1 and "--smoke" in result["command"]
    r = result["result"]
    assert r["distinguishable"] is True
    assert (r["failed"], r["mixed"], r["unknown"]) == (0, 0, 0), r
    assert r["answers"].get("v1", 0) > 0 and r["answers"].get("v2", 0) > 0, r["answers"]
    assert r["before"]["requests"] > 0 and r["before"]["p99_ms"] >= r["before"]["p50_ms"] > 0
    (publication,) = r["publications"]  # --smoke publishes one version
    assert publication["version"] == 2 and publication["old_after_switch"] == 0
    for window in ("during_switch", "during_publish"):
        assert publication["latency"][window]["requests"] > 0 and publication["latency"][window]["p99_ms"] > 0
    assert set(publication["phases_s"]) >= {"validate", "write", "bulk_load", "load", "switch", "unload"}
    assert publication["to_serving_s"] > 0 and 0 < publication["bulk_load_share"] < 1
    assert publication["rows_loaded"]["persistent"] == r["rows"]
    assert set(publication["model_load_s"]) == {"hps_embedding", "dlrm_dense"}
    assert "| v2: during the switch (load, switch, unload) |" in done.stdout and "Failed requests: **0**" in done.stdout
