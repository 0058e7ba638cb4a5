"""The hps backend's model.py driven through a stand-in for pb_utils, over a real lookup.

What a real Triton cannot be made to do on purpose: an unexpected exception while one
request's output tensor is built. It must answer that request alone with INTERNAL and its
message; the others of the execute() are answered normally. (The e2e tests run this code in a
real Triton; tests/e2e/test_load_checks.py checks the load-time interface check there.)
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hps_core.formats import write_sparse_model
from tests.backend.fake_pb_utils import fake_pb_utils
from tests.backend.hps.test_interface import HUGECTR

DIMS = (2, 3)


@pytest.fixture()
def hps_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    pb = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "backend.hps.model", raising=False)
    model_py = importlib.import_module("backend.hps.model")
    files = []
    for i, dim in enumerate(DIMS):
        keys = np.arange(10, dtype=np.int64)
        write_sparse_model(tmp_path / f"t{i}", keys, _rows(keys, dim))
        files.append(str(tmp_path / f"t{i}"))
    (tmp_path / "hps.json").write_text(json.dumps({
        "volatile_db": {"type": "hash_map", "num_partitions": 1},
        "models": [{"model": "emb", "sparse_files": files, "embedding_vecsize_per_table": list(DIMS),
                    "maxnum_catfeature_query_per_table_per_sample": [1, 1], "max_batch_size": 8,
                    "gpucache": False}],
    }))
    instance = model_py.TritonPythonModel()
    instance.initialize(_args(tmp_path, HUGECTR))
    yield instance, pb
    instance.finalize()
    sys.modules.pop("backend.hps.model", None)


def _args(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    config = {**config, "parameters": {"hps_config": {"string_value": "hps.json"},
                                       "hps_metrics_interval_s": {"string_value": "0"}}}
    return {"model_config": json.dumps(config), "model_name": config["name"], "model_repository": str(folder),
            "model_version": "1", "model_instance_kind": "CPU"}


def _rows(keys: np.ndarray, dim: int) -> np.ndarray:
    return (keys[:, None] * 10 + np.arange(dim)).astype(np.float32)


def _request(pb: Any, keys: list[int]) -> dict[str, Any]:
    """One sample: keys[0] for table 0, keys[1] for table 1, with a batch dimension."""
    return {"KEYS": pb.Tensor("KEYS", np.array([keys], np.int64)),
            "NUMKEYS": pb.Tensor("NUMKEYS", np.array([[1, 1]], np.int32))}


def _expected(keys: list[int]) -> np.ndarray:
    return np.concatenate([_rows(np.array([k]), d).ravel() for k, d in zip(keys, DIMS)])[None]


def test_an_output_that_cannot_be_built_fails_only_its_request(hps_model: tuple[Any, Any]) -> None:
    instance, pb = hps_model
    # Request 1's vectors (keys 7 and 8: first value 70) cannot become an output tensor.
    pb.Tensor.refuse = staticmethod(lambda array: array.size and array.flat[0] == 70.0)
    bad_numkeys = {**_request(pb, [1, 2]), "NUMKEYS": pb.Tensor("NUMKEYS", np.array([[2, 1]], np.int32))}
    responses = instance.execute([_request(pb, [1, 2]), _request(pb, [7, 8]), bad_numkeys, _request(pb, [3, 4])])
    assert len(responses) == 4
    for response, keys in ((responses[0], [1, 2]), (responses[3], [3, 4])):
        assert response.error is None
        np.testing.assert_array_equal(response.output_tensors[0].as_numpy(), _expected(keys))
    assert responses[1].error.code == "INTERNAL"
    assert "cannot allocate output tensor OUTPUT0" in str(responses[1].error)
    assert responses[2].error.code == "INVALID_ARG" and "NUMKEYS sums to 3" in str(responses[2].error)


def test_a_config_that_is_not_hugectrs_interface_fails_the_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pb = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "backend.hps.model", raising=False)
    model_py = importlib.import_module("backend.hps.model")
    config = {**HUGECTR, "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [24]}]}
    with pytest.raises(pb.TritonModelException, match=r"model 'emb': config.pbtxt output\[0\].dims \(OUTPUT0\) is \[24\]"):
        model_py.TritonPythonModel().initialize(_args(tmp_path, config))
    sys.modules.pop("backend.hps.model", None)


def test_internal_failures_are_one_log_line_per_cause_and_finalize_writes_the_count(
        hps_model: tuple[Any, Any]) -> None:
    """A fault that hits every request must not flood Triton's log: the first INTERNAL failure
    is logged (its traceback at verbose), the others held back, their count written at finalize."""
    instance, pb = hps_model
    pb.Tensor.refuse = staticmethod(lambda array: array.size and array.flat[0] == 70.0)
    for _ in range(50):
        responses = instance.execute([_request(pb, [7, 8]), _request(pb, [1, 2]), _request(pb, [7, 8])])
        assert [r.error.code if r.error else None for r in responses] == ["INTERNAL", None, "INTERNAL"]
    errors = [line for level, line in pb.Logger.records if level == "error"]
    assert errors == ["hps: request failed: MemoryError: cannot allocate output tensor OUTPUT0 of 20 bytes"]
    assert [line for level, line in pb.Logger.records if level == "verbose"][0].startswith("traceback of: hps: request")
    instance.finalize()
    errors = [line for level, line in pb.Logger.records if level == "error"]
    assert len(errors) == 2 and errors[1].startswith(errors[0] + " (99 like this held back in the last "), errors


def test_a_version_serves_its_own_hps_json_and_entry(hps_model: tuple[Any, Any], tmp_path: Path) -> None:
    """Version N with ``<model folder>/N/hps.json`` serves that JSON's entry ``emb_vN`` (its own
    tables), or its entry ``emb`` when it has no ``emb_vN``; a version without a folder of its
    own serves the model-level hps_config (docs/deployment.md, "Model versions and runtime loading")."""
    _, pb = hps_model
    model_py = sys.modules["backend.hps.model"]
    base = json.loads((tmp_path / "hps.json").read_text())
    for version, entry, scale in ((2, "emb_v2", -1), (3, "emb", 2)):
        folder = tmp_path / str(version)
        files = []
        for i, dim in enumerate(DIMS):
            keys = np.arange(10, dtype=np.int64)
            write_sparse_model(folder / f"t{i}", keys, _rows(keys, dim) * scale)
            files.append(str(folder / f"t{i}"))
        (folder / "hps.json").write_text(json.dumps({**base, "models": [{**base["models"][0], "model": entry,
                                                                            "sparse_files": files}]}))
    for version, scale in (("2", -1), ("3", 2), ("4", 1)):
        instance = model_py.TritonPythonModel()
        instance.initialize({**_args(tmp_path, HUGECTR), "model_version": version})
        try:
            [response] = instance.execute([_request(pb, [1, 2])])
            np.testing.assert_array_equal(response.output_tensors[0].as_numpy(), _expected([1, 2]) * scale)
        finally:
            instance.finalize()
    assert model_py.version_model_name(model_py.load_config(tmp_path / "2" / "hps.json"), "emb", 2) == "emb_v2"


def test_the_served_file_is_the_versions_own_file_seen_through_a_staged_mirror(tmp_path: Path) -> None:
    from backend.tensors import served_path
    from hps_core.repository import SOURCE_MARKER

    model = tmp_path / "repo" / "dlrm_dense"
    (model / "2").mkdir(parents=True)
    (model / "2" / "dense.pt").write_bytes(b"weights")
    staged = tmp_path / "staged" / "dlrm_dense"
    staged.mkdir(parents=True)
    (staged / SOURCE_MARKER).write_text(f"{model}\n")  # hps serve's mirror names the original folder
    for folder in (model, staged):
        args = {"model_repository": str(folder), "model_version": "2"}
        assert served_path(args, "dense.pt", "w.pt") == model / "2" / "dense.pt"
        assert served_path({**args, "model_version": "1"}, "dense.pt", "w.pt") == model / "w.pt"  # the parameter's
        assert served_path({**args, "model_version": "1"}, "dense.pt", None) is None
        assert served_path(args, "hps.json", None, "../hps.json") == tmp_path / "repo" / "hps.json"  # the default's
