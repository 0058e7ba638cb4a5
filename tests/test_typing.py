"""The code type-checks: ``mypy --strict`` over hps_core and the backends, and over the demo
(hps_demo), each with pyproject's [tool.mypy] settings (its overrides name the untyped
third-party packages)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    pytest.param(["--strict", "hps_core", "backend"], id="strict-hps_core-backend"),
    pytest.param(["--strict", "hps_demo"], id="strict-hps_demo"),
])
def test_mypy_reports_no_errors(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
