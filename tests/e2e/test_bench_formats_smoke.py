"""scripts/bench_formats.py --smoke: every part runs for every format and reports what it promises.

The real Triton serves the tiny demo model in each format; memory and lookups are measured on
the real tiers (a redis-server of its own when one is on PATH, else ``--no-redis``).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hps_core.row_formats import FORMAT_NAMES, RowFormat

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_run_reports_accuracy_memory_and_lookups_per_format(tmp_path: Path) -> None:
    have_redis = shutil.which("redis-server") is not None
    argv = [sys.executable, str(REPO / "scripts" / "bench_formats.py"), "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(argv + ([] if have_redis else ["--no-redis"]), capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report,) = tmp_path.glob("bench_formats_*.json")
    result = json.loads(report.read_text())
    assert result["machine"]["cpus"] >= 1 and "--smoke" in result["command"]
    assert result["formats"] == list(FORMAT_NAMES)
    assert result["markdown"] in done.stdout

    served = result["served"]
    assert served["fp32_vs_in_process_max_abs_diff"] == 0.0  # fp32 serves the trained rows exactly
    assert served["formats"]["fp32"]["max_abs_diff"] == 0.0
    for fmt in FORMAT_NAMES:
        row = served["formats"][fmt]
        assert 0.0 <= row["auc"] <= 1.0
        assert 0.0 <= row["mean_abs_diff"] <= row["max_abs_diff"] < 0.2  # rounded rows, not other rows

    tiers = {"hash_map", "rocksdb", "cpu_cache"} | ({"redis_used", "redis_usage"} if have_redis else set())
    assert [s["dim"] for s in result["sets"]] == [16, 16]  # the demo's tables and a synthetic set
    for s in result["sets"]:
        assert s["packed_row_bytes"] == {f: RowFormat(f).row_bytes(s["dim"]) for f in FORMAT_NAMES}
        assert set(s["memory"]) == tiers
        for tier, cells in s["memory"].items():
            assert set(cells) == set(FORMAT_NAMES), tier
            assert all(_positive(c["bytes_per_row"]) and c["rows"] > 0 for c in cells.values()), tier
            # a compact row is smaller in every tier (RSS and Redis figures are noisy: a margin)
            assert cells["int8"]["bytes_per_row"] < 0.9 * cells["fp32"]["bytes_per_row"], (tier, cells)
        for variant in ("hash_map", "cpu_cache"):
            cells = s["lookup"][variant]
            assert set(cells) == set(FORMAT_NAMES)
            assert all(_positive(c["keys_per_s"]) for c in cells.values())
    synthetic = result["sets"][1]
    assert all(c["hit_rate"] == 1.0 for c in synthetic["lookup"]["cpu_cache"].values())  # warmed, 4x room
    assert result["targets"] and all(isinstance(t["met"], bool) for t in result["targets"])
