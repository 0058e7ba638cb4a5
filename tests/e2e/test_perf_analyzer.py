"""A short perf_analyzer run on the ensemble completes with zero errors."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hps_demo.tools import find_perf_analyzer
from hps_demo.client import dlrm_request, write_perf_analyzer_data
from tests.e2e.models import E2EModels

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_on_the_ensemble(triton: object, e2e_models: E2EModels, tmp_path: Path, protocol: str) -> None:
    rng = np.random.default_rng(11)
    requests = []
    for batch in (1, 16, 64):
        keys = np.stack([rng.choice(t.keys, size=batch) for t in e2e_models.dlrm_tables], axis=1)
        requests.append(dlrm_request(keys, rng.normal(size=(batch, 13)).astype(np.float32)))
    data = write_perf_analyzer_data(tmp_path / "input.json", requests)
    tool = find_perf_analyzer()
    url = triton.http_url if protocol == "http" else triton.grpc_url
    result = subprocess.run(
        [str(tool.path), "-m", "dlrm", "-u", url, "-i", protocol, "--input-data", str(data),
         "--concurrency-range", "1:2", "--measurement-interval", "1000", "-s", "50", "--max-trials", "10"],
        capture_output=True, text=True, env=tool.environment(), timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    throughputs = re.findall(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec", result.stdout)
    assert [c for c, _ in throughputs] == ["1", "2"]
    assert all(float(t) > 0 for _, t in throughputs)
    assert "error" not in result.stdout.lower()
