"""The served ensemble scores equal the in-process PyTorch model on the same samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

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


def _status_is_invalid_arg(error: InferenceServerException) -> bool:
    """INVALID_ARG as each protocol spells it (gRPC's code name, HTTP's 400)."""
    return str(error.status()) in ("StatusCode.INVALID_ARGUMENT", "400")


def test_numkeys_not_one_key_per_table_per_sample_is_refused_by_name(client: object, e2e_models: E2EModels) -> None:
    """NUMKEYS [2B, 0, B, ...] gives HPS as many keys (and vectors) as [B] * T, so only NUMKEYS
    itself can tell that embeddings would be paired with the wrong samples: refused by name."""
    keys, dense = _samples(e2e_models, 5, seed=11)
    request = dlrm_request(keys, dense).as_dict()
    uneven = request["NUMKEYS"].copy()
    uneven[0, :2] = 10, 0
    with pytest.raises(InferenceServerException) as info:
        infer(client, "dlrm", {**request, "NUMKEYS": uneven}, "SCORE")
    message = info.value.message()
    assert _status_is_invalid_arg(info.value), (info.value.status(), message)
    assert "NUMKEYS is [10, 0, 5, 5," in message and "exactly one key per table per sample" in message
    assert "every table must have exactly 5 keys" in message
    served = infer(client, "dlrm", request, "SCORE")  # the good request, same server, same run
    np.testing.assert_allclose(served[0], _reference_scores(e2e_models, keys, dense), rtol=0, atol=1e-5)


def test_dlrm_dense_alone_scores_without_numkeys(client: object, e2e_models: E2EModels) -> None:
    """NUMKEYS is an optional input of dlrm_dense: served alone, it scores without it."""
    keys, dense = _samples(e2e_models, 4, seed=12)
    emb = np.stack([t.expected(keys[:, j]) for j, t in enumerate(e2e_models.dlrm_tables)])  # (T, B, dim)
    inputs = {"DENSE": dense.reshape(1, -1), "EMBEDDINGS": emb.reshape(1, -1)}
    served = infer(client, "dlrm_dense", inputs, "SCORE")
    np.testing.assert_allclose(served[0], _reference_scores(e2e_models, keys, dense), rtol=0, atol=1e-5)
