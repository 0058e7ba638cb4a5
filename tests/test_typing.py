"""The code type-checks: mypy over hps_core, the backends and the demo, as pyproject's [tool.mypy] sets it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_reports_no_errors() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "hps_core", "backend", "hps_demo"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
