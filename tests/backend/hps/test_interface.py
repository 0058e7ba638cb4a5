"""An HPS model's config.pbtxt is checked against HugeCTR's interface when it loads."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from backend.hps.interface import check_interface
from hps_core.errors import ConfigError

# As Triton hands it to initialize() (model_config JSON); dims as Triton's JSON may spell them.
HUGECTR = {
    "name": "emb",
    "backend": "hps",
    "max_batch_size": 1024,
    "input": [
        {"name": "KEYS", "data_type": "TYPE_INT64", "dims": ["-1"], "optional": False},
        {"name": "NUMKEYS", "data_type": "TYPE_INT32", "dims": ["-1"], "optional": False},
    ],
    "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
}


def _config(change: str = "", value: Any = None) -> dict[str, Any]:
    """HUGECTR with ``change`` ("output.0.dims") set to ``value``; "input.+" appends ``value``."""
    config = copy.deepcopy(HUGECTR)
    if change:
        *path, last = change.split(".")
        node: Any = config
        for part in path:
            node = node[int(part)] if part.isdigit() else node[part]
        if last == "+":
            node.append(value)
        elif value is None:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return config


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ("", None),
        ("max_batch_size", 0),  # HugeCTR's samples: 1-D tensors, no batch dimension
        ("input.0.data_type", "TYPE_UINT32"),  # supportlonglong: false
        ("input.+", {"name": "EXTRA", "data_type": "TYPE_FP32", "dims": [-1], "optional": True}),
        ("input.0.allow_ragged_batch", True),
    ],
)
def test_hugectr_interface_is_accepted(change: str, value: Any) -> None:
    check_interface(_config(change, value))


@pytest.mark.parametrize(
    ("change", "value", "words"),
    [
        ("output.0.dims", [24], ["output[0].dims (OUTPUT0) is [24]", "[-1]", "set `dims: [ -1 ]`"]),
        ("input.0.data_type", "TYPE_FP32",
         ["input[0].data_type (KEYS) is TYPE_FP32", "TYPE_INT64 or TYPE_UINT32", "set `data_type: TYPE_INT64`"]),
        ("input.1.data_type", "TYPE_INT64", ["input[1].data_type (NUMKEYS) is TYPE_INT64", "set `data_type: TYPE_INT32`"]),
        ("output.0.data_type", "TYPE_FP16", ["output[0].data_type (OUTPUT0) is TYPE_FP16", "TYPE_FP32"]),
        ("input.1.dims", [1, -1], ["input[1].dims (NUMKEYS) is [1, -1]"]),
        ("input.0.name", "KEY", ["input has no 'KEYS'", 'add { name: "KEYS" data_type: TYPE_INT64 dims: [ -1 ] }']),
        ("output.0.name", "OUT", ["output has no 'OUTPUT0'", "to output [ ... ]"]),
        ("output", None, ["output has no 'OUTPUT0'"]),
        ("input.+", {"name": "DENSE", "data_type": "TYPE_FP32", "dims": [-1]},
         ["input[2].name is 'DENSE', required", "only KEYS, NUMKEYS", "optional: true"]),
        ("output.+", {"name": "OUTPUT1", "data_type": "TYPE_FP32", "dims": [-1]},
         ["output[1].name is 'OUTPUT1'", "only OUTPUT0", "remove it"]),
        ("input.0.optional", True, ["input[0].optional (KEYS) is true", "remove `optional: true`"]),
        ("output.0.reshape", {"shape": [-1, 8]}, ["output[0].reshape (OUTPUT0)", "remove the reshape"]),
    ],
)
def test_a_mismatch_names_model_field_found_expected_and_fix(change: str, value: Any, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        check_interface(_config(change, value))
    message = str(info.value)
    assert message.startswith("model 'emb': config.pbtxt ")
    assert "HugeCTR's HPS interface" in message
    for word in words:
        assert word in message, message
