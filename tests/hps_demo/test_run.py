"""The demo, end to end at a tiny size: train, serve through Triton, query, perf_analyzer."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.models import COMMITTED_REPOSITORY

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def test_demo_serves_what_it_trained(tmp_path: Path) -> None:
    repository = tmp_path / "repo" / "model_repository"
    shutil.copytree(COMMITTED_REPOSITORY, repository)  # its ../../work paths land in tmp_path
    result = subprocess.run(
        [sys.executable, "-m", "hps_demo", "--model-repository", str(repository), "--samples", "40000",
         "--rows-scale", "0.05", "--epochs", "2", "--latency-requests", "20", "--perf-seconds", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert (tmp_path / "repo" / "work" / "demo" / "dense.pt").is_file()
    assert (tmp_path / "repo" / "work" / "demo" / "sparse" / "table25.model" / "emb_vector").is_file()
    for protocol in ("http", "grpc"):
        match = re.search(rf"{protocol}: AUC ([\d.]+); max \|served - in-process\| ([\d.e+-]+)", out)
        assert match, out
        assert float(match.group(1)) > 0.6
        assert float(match.group(2)) <= 1e-5
        assert re.search(rf"{protocol}: p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert re.search(r"concurrency 2: [\d,.]+ requests/s = [\d,]+ samples/s", out)
