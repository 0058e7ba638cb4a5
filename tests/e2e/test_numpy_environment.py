"""The models run on the numpy of the environment the tests run in.

``scripts/test.sh`` runs the end-to-end tests twice: in ``.venv`` (numpy<2, as Triton 2.51's
stub expects) and in ``.venv-numpy2`` (numpy 2, as on a GPU machine with CuPy), so the
backends' tensor I/O is checked for real under both. This test makes sure the second pass
really put numpy 2 inside the stub, not only in the test process.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.triton


def test_stub_runs_the_test_environments_numpy(triton: object, client: object) -> None:
    log = triton.log_path.read_text(errors="replace")
    assert "hps: model 'hps_embedding' (version 1) ready" in log
    assert f"(numpy {np.__version__})" in log
