"""Each malformed request gets an error naming the problem, and the server goes on serving."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from hps_demo.client import infer
from tests.e2e.models import MAX_BATCH_SIZE, E2EModels

pytestmark = pytest.mark.triton

GOOD_KEYS = np.zeros((1, 4), dtype=np.int64)
GOOD_NUMKEYS = np.ones((1, 4), dtype=np.int32)

BAD_REQUESTS = {
    "keys as FP32": ({"KEYS": GOOD_KEYS.astype(np.float32), "NUMKEYS": GOOD_NUMKEYS}, "KEYS"),
    "numkeys as INT64": ({"KEYS": GOOD_KEYS, "NUMKEYS": GOOD_NUMKEYS.astype(np.int64)}, "NUMKEYS"),
    "keys without batch dim": ({"KEYS": GOOD_KEYS[0], "NUMKEYS": GOOD_NUMKEYS}, "KEYS"),
    "keys of rank 3": ({"KEYS": GOOD_KEYS[None], "NUMKEYS": GOOD_NUMKEYS}, "KEYS"),
    "numkeys sum above keys": ({"KEYS": GOOD_KEYS, "NUMKEYS": np.array([[1, 1, 1, 2]], np.int32)}, "NUMKEYS sums to 5"),
    "numkeys sum below keys": ({"KEYS": GOOD_KEYS, "NUMKEYS": np.array([[1, 1, 1, 0]], np.int32)}, "NUMKEYS sums to 3"),
    "negative count": ({"KEYS": GOOD_KEYS, "NUMKEYS": np.array([[2, -1, 2, 1]], np.int32)}, "negative"),
    "wrong number of tables": ({"KEYS": GOOD_KEYS, "NUMKEYS": np.array([[2, 2]], np.int32)}, "4 tables"),
    "too many keys": (
        {
            "KEYS": np.zeros((1, MAX_BATCH_SIZE * 2 + 4), np.int64),
            "NUMKEYS": np.array([[MAX_BATCH_SIZE * 2 + 1, 1, 1, 1]], np.int32),
        },
        "maxnum_catfeature_query_per_table_per_sample",
    ),
    "empty request": ({"KEYS": np.zeros((1, 0), np.int64), "NUMKEYS": np.zeros((1, 4), np.int32)}, "no keys"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_refused_by_name_then_server_serves(client: object, e2e_models: E2EModels, case: str) -> None:
    inputs, expected_words = BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException) as info:
        infer(client, "hps_multi", inputs, "OUTPUT0")
    assert expected_words in info.value.message()
    good = infer(client, "hps_multi", {"KEYS": GOOD_KEYS, "NUMKEYS": GOOD_NUMKEYS}, "OUTPUT0")
    assert good.shape == (1, sum(t.vectors.shape[1] for t in e2e_models.multi_tables))


def test_unknown_model_is_refused(client: object) -> None:
    with pytest.raises(InferenceServerException) as info:
        infer(client, "no_such_model", {"KEYS": GOOD_KEYS, "NUMKEYS": GOOD_NUMKEYS}, "OUTPUT0")
    assert "no_such_model" in info.value.message()
