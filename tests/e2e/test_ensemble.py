"""The served ensemble scores equal the in-process PyTorch model on the same samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.dlrm.network import load_dense, predict
from hps_demo.client import dlrm_request, infer
from tests.e2e.models import DLRM_TABLES, E2EModels

pytestmark = pytest.mark.triton


def _samples(models: E2EModels, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = np.stack([rng.choice(t.keys, size=n) for t in models.dlrm_tables], axis=1)
    keys[::5, 3] = -12345  # absent from table 3: served with its default value
    dense = rng.normal(size=(n, 13)).astype(np.float32)
    return keys, dense


def _reference_scores(models: E2EModels, keys: np.ndarray, dense: np.ndarray) -> np.ndarray:
    emb = np.stack([t.expected(keys[:, j]) for j, t in enumerate(models.dlrm_tables)], axis=1)
    net = load_dense(models.dense_weights)
    return predict(net, torch.from_numpy(dense), torch.from_numpy(emb)).numpy()


@pytest.mark.parametrize("batch", [1, 37, 64])
def test_ensemble_scores_equal_in_process_model(client: object, e2e_models: E2EModels, batch: int) -> None:
    keys, dense = _samples(e2e_models, batch, seed=batch)
    assert keys.shape == (batch, DLRM_TABLES)
    served = infer(client, "dlrm", dlrm_request(keys, dense).as_dict(), "SCORE")
    assert served.shape == (1, batch)
    expected = _reference_scores(e2e_models, keys, dense)
    np.testing.assert_allclose(served[0], expected, rtol=0, atol=1e-5)
