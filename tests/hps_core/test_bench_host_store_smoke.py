"""scripts/bench_host_store.py --quick: every part runs in its fresh processes, checks its answers
(sampled rows equal to the file, lookups equal to the stored rows), reports sane numbers, and
leaves nothing in /dev/shm. About 20 s on 2 cores (a dozen worker processes)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from hps_core.db import shm_store as shm

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_host_store.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_host_store", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_quick_run_measures_every_part_checks_rows_and_cleans_up(tmp_path: Path) -> None:
    report, folder = tmp_path / "report.md", tmp_path / "json"
    argv = ["--quick", "--sizes", "20k", "--procs", "1", "2", "--lookup-rows", "1000", "--batches", "256", "1024",
            "--data", str(tmp_path / "data"), "--timeout", "90", "--out", str(report), "--json", str(folder)]
    assert _script().main(argv) == 0
    (written,) = folder.glob("bench_host_store_*.json")
    result = json.loads(written.read_text())
    assert result["errors"] == [] and "--quick" in result["command_line"]
    runs = result["results"]

    (fill,) = runs["fill"]
    private, host, attach = fill["private"], fill["host"], fill["attach"]
    assert fill["rows"] == 20_000 and private["kind"] == "private" and host["kind"] == "host"
    assert private["checked_rows"] == host["checked_rows"] == attach["checked_rows"] == 500
    assert _positive(private["rows_per_s"]) and _positive(host["rows_per_s"]) and _positive(attach["attach_s"])
    assert host["store_bytes"] == host["tier_bytes"] > 20_000 * 32 * 4  # the file holds every row
    assert host["peak_rss"] >= host["rss_before"] > 0 and private["peak_rss"] > 0
    parts = host["parts_s"]
    assert set(parts) == {"stream_table", "_create", "_fill_chunk"} and parts["_fill_chunk"] > 0  # filled by the kernel
    assert 0 < parts["stream_table"] + parts["_create"] + parts["_fill_chunk"] <= host["fill_s"]

    pss = {(r["kind"], r["processes"]): r for r in runs["pss"]}
    assert set(pss) == {(kind, n) for kind in ("bare", "private", "host") for n in (1, 2)}
    assert all(r["pss_sum"] > 0 and r["rss_sum"] >= r["pss_sum"] for r in pss.values())
    assert all(pss[kind, 1]["pss_vs_one"] == 1.0 for kind in ("bare", "private", "host"))
    assert pss["private", 2]["filled_by"] == 2 and pss["host", 2]["filled_by"] == 1  # the second attached
    # the host store's rows are shared memory; the private map's are not (a few KiB of other shmem aside)
    assert pss["host", 2]["pss_shmem_sum"] > 20_000 * 32 * 4 > pss["private", 2]["pss_shmem_sum"]

    lookup = runs["lookup"]
    assert {(r["tables"], r["batch"]) for r in lookup} == {(t, b) for t in (26, 1) for b in (256, 1024)}
    assert all(r["checked_equal"] is True and _positive(r["host_vs_private"]) for r in lookup)

    text = report.read_text()
    for heading in ("## Fill and attach", "## Memory with N processes", "## Lookup speed", "Targets:"):
        assert heading in text
    assert "not Triton" in text and "scripts/bench_host_store.py --quick" in text
    left = sorted(p.name for p in shm.shm_root().glob(f"hps.bench-host-store-{os.getpid()}-*"))
    assert left == [], f"the benchmark left stores behind: {left}"
