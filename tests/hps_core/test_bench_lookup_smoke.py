"""scripts/bench_lookup.py --quick: each mode runs, checks its answers and reports sane ratios.

Also its cached mode on the CPU twin (``--cache cpu``). The ``--device gpu`` path runs on a GPU
machine only, through scripts/gpu_check.sh.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_lookup.py"
TINY = ["--quick", "--rows", "500", "--dims", "16", "--min-seconds", "0.005", "--min-reps", "3"]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_lookup", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *argv: str) -> dict[str, Any]:
    assert _script().main([*TINY, *argv, "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / "results.json").read_text())


def _positive_finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_inprocess_and_tables_modes_report_checked_positive_ratios(tmp_path: Path) -> None:
    result = _run(tmp_path, "--mode", "inprocess", "tables", "--keys", "powerlaw", "uniform")
    assert result["meta"]["machine"]["cpus"] >= 1 and "--quick" in result["meta"]["command"]
    rows = result["inprocess"]
    assert {(r["keys_dist"], r["samples"]) for r in rows} == {(d, s) for d in ("powerlaw", "uniform") for s in (32, 512)}
    for r in rows:
        assert r["checked_equal"] is True and r["keys"] == 26 * r["samples"]
        assert all(_positive_finite(r[k]) for k in ("lookup_vs_gather", "lookup_vs_takes", "lookup_ms", "gather_ms"))
    assert result["tables"] and all(r["checked_equal"] is True and _positive_finite(r["many_vs_one"])
                                    for r in result["tables"])
    assert (tmp_path / "bench_lookup.png").stat().st_size > 0


def test_cached_mode_on_the_cpu_twin_is_all_hit_and_checked(tmp_path: Path) -> None:
    result = _run(tmp_path, "--mode", "inprocess", "tables", "--cache", "cpu", "--samples", "32", "--tables-samples",
                  "32", "--keys", "uniform")
    assert result["meta"]["args"]["cache"] == "cpu" and result["meta"]["args"]["device"] == "cpu"
    (inproc,) = result["inprocess"]
    (tables,) = result["tables"]
    for row in (inproc, tables):
        assert row["checked_equal"] is True and row["cache"] == "cpu" and row["device"] == "cpu"
        assert row["hit_rate"] == 1.0 and row["cache_resident"] == 1.0  # warmed: every request all-hit
        assert "launches_per_lookup" not in row  # counted on the GPU only
    assert _positive_finite(inproc["lookup_vs_gather"]) and _positive_finite(tables["many_vs_one"])
    assert tables["one_table"]["hit_rate"] == 1.0


def test_a_failing_mode_is_recorded_and_the_others_still_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _script()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("lookup and gather disagree (planted)")

    monkeypatch.setattr(module, "bench_inprocess", broken)
    argv = [*TINY, "--mode", "inprocess", "tables", "--tables-samples", "32", "--out", str(tmp_path)]
    assert module.main(argv) == 1
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["errors"] == [{"mode": "inprocess", "dim": 16, "error": "AssertionError: lookup and gather "
                                                                          "disagree (planted)"}]
    assert result["inprocess"] == [] and len(result["tables"]) == 1 and result["meta"]["partial"] is False


def test_cache_and_device_must_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _script().main([*TINY, "--device", "gpu", "--cache", "cpu", "--out", str(tmp_path)])
    assert "does not go with" in capsys.readouterr().err



@pytest.mark.triton
@pytest.mark.slow
def test_served_mode_compares_hps_with_the_zeros_floor(tmp_path: Path) -> None:
    result = _run(tmp_path, "--mode", "served", "--served-samples", "32", "--requests", "5")
    (row,) = result["served"]
    assert row["checked_equal"] is True and row["protocol"] == "grpc" and row["keys"] == 26 * 32
    assert _positive_finite(row["hps_vs_zeros_p50"]) and _positive_finite(row["hps_vs_zeros_p99"])
    assert row["hps"]["requests"] == row["zeros"]["requests"] == 5
