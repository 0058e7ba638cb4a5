"""OUTPUT0 equals the rows of the sparse files, with defaults for absent keys.

``hps_multi`` is configured as a HugeCTR sample is: KIND_GPU (served on the CPU here), no
parameters in config.pbtxt, its HPS JSON given by ``--backend-config hps,ps=...``.
"""

from __future__ import annotations

import numpy as np
import pytest

from hps_demo.client import infer
from tests.e2e.models import E2EModels

pytestmark = pytest.mark.triton


def _query(models: E2EModels, counts: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    parts = []
    for table, n in zip(models.multi_tables, counts):
        present = rng.choice(table.keys, size=n)
        absent = rng.integers(-(1 << 40), -1, size=n)
        parts.append(np.where(rng.random(n) < 0.3, absent, present))
    return np.concatenate(parts).astype(np.int64), np.array(counts, dtype=np.int32)


def _expected(models: E2EModels, keys: np.ndarray, counts: np.ndarray) -> np.ndarray:
    per_table = np.split(keys, np.cumsum(counts)[:-1])
    return np.concatenate([t.expected(k).ravel() for t, k in zip(models.multi_tables, per_table)])


@pytest.mark.parametrize("counts", [[1, 1, 1, 1], [5, 0, 17, 3], [128, 64, 192, 64]])
def test_output0_equals_sparse_rows_with_defaults(client: object, e2e_models: E2EModels, counts: list[int]) -> None:
    keys, numkeys = _query(e2e_models, counts, seed=sum(counts))
    served = infer(client, "hps_multi", {"KEYS": keys[None], "NUMKEYS": numkeys[None]}, "OUTPUT0")
    np.testing.assert_array_equal(served[0], _expected(e2e_models, keys, numkeys))


def test_duplicate_keys_in_one_request(client: object, e2e_models: E2EModels) -> None:
    table = e2e_models.multi_tables[2]
    keys = np.concatenate([[0], np.repeat(table.keys[:3], 4), [0, 0]]).astype(np.int64)
    numkeys = np.array([1, 0, 12, 2], dtype=np.int32)
    keys[-2:] = table.keys[5], -7  # table 3 keys: one absent from table 3 as well
    served = infer(client, "hps_multi", {"KEYS": keys[None], "NUMKEYS": numkeys[None]}, "OUTPUT0")
    np.testing.assert_array_equal(served[0], _expected(e2e_models, keys, numkeys))


def test_hps_embedding_step_alone(client: object, e2e_models: E2EModels) -> None:
    rng = np.random.default_rng(3)
    keys = np.stack([rng.choice(t.keys, size=8) for t in e2e_models.dlrm_tables], axis=1)
    flat = np.ascontiguousarray(keys.T).ravel()
    numkeys = np.full(len(e2e_models.dlrm_tables), 8, dtype=np.int32)
    served = infer(client, "hps_embedding", {"KEYS": flat[None], "NUMKEYS": numkeys[None]}, "OUTPUT0")
    expected = np.concatenate([t.expected(keys[:, j]).ravel() for j, t in enumerate(e2e_models.dlrm_tables)])
    np.testing.assert_array_equal(served[0], expected)
