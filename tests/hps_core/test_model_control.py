"""hps_core.model_control against a real Triton 2.51 (explicit model control, token).

One server per module over a tiny repository: ``m`` (``backend: "python"``, version policy
``all``, answers ``[version, pid of its stub]``) and ``ens`` (an ensemble of one step on
``m``). What is checked is what publishing relies on (docs/deployment.md, "Model versions and
runtime loading"): a new version folder loads beside the served one without touching it, a
removed one unloads alone, an ensemble override switches versions, and every failure is a
ServingError naming the model, the version and Triton's message.
"""

from __future__ import annotations

import json
import secrets
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hps_core.errors import ConfigError, ServingError
from hps_core.model_control import ModelControl, api_token
from hps_core.serving import API_TOKEN_ENV, TritonServer

MODEL = '''
import os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.version = int(args["model_version"])

    def execute(self, requests):
        answer = np.array([self.version, os.getpid()], dtype=np.int64)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", answer)]) for _ in requests]
'''

CONFIG = """
name: "m"
backend: "python"
max_batch_size: 0
version_policy: { all {} }
input [{ name: "X", data_type: TYPE_INT64, dims: [ -1 ] }]
output [{ name: "Y", data_type: TYPE_INT64, dims: [ -1 ] }]
instance_group [{ count: 1, kind: KIND_CPU }]
"""


def ensemble_config(version: int) -> dict[str, object]:
    """``ens`` with its step pinned to ``version`` of ``m`` (-1: the latest), as Triton's JSON."""
    return {
        "name": "ens", "platform": "ensemble", "max_batch_size": 0,
        "input": [{"name": "X", "data_type": "TYPE_INT64", "dims": [-1]}],
        "output": [{"name": "Y", "data_type": "TYPE_INT64", "dims": [-1]}],
        "ensemble_scheduling": {"step": [{
            "model_name": "m", "model_version": version, "input_map": {"X": "X"}, "output_map": {"Y": "Y"},
        }]},
    }


ENSEMBLE_PBTXT = """
name: "ens"
platform: "ensemble"
max_batch_size: 0
input [{ name: "X", data_type: TYPE_INT64, dims: [ -1 ] }]
output [{ name: "Y", data_type: TYPE_INT64, dims: [ -1 ] }]
ensemble_scheduling { step [ { model_name: "m" model_version: -1 input_map { key: "X" value: "X" } output_map { key: "Y" value: "Y" } } ] }
"""

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TOKEN = secrets.token_urlsafe(24)


def answer(server: TritonServer, model: str, version: int | None = None) -> tuple[int, int]:
    """(version, stub pid) that ``model`` answers with."""
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    body = json.dumps({"inputs": [{"name": "X", "datatype": "INT64", "shape": [1], "data": [1]}]}).encode()
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=body, method="POST")
    with _OPENER.open(request, timeout=60) as response:
        data = json.loads(response.read())["outputs"][0]["data"]
    return int(data[0]), int(data[1])


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("model_control") / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "config.pbtxt").write_text(CONFIG)
    (repo / "m" / "1" / "model.py").write_text(MODEL)
    (repo / "ens" / "1").mkdir(parents=True)
    (repo / "ens" / "config.pbtxt").write_text(ENSEMBLE_PBTXT)
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[TritonServer]:
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, api_token=TOKEN, gpu=False) as server:
        yield server


@pytest.fixture(scope="module")
def control(server: TritonServer) -> ModelControl:
    control = ModelControl(server.http_url, TOKEN, timeout=120)
    control.load("m")  # the first load after start re-creates every loaded version once (see Findings)
    return control


def test_api_token_from_file_else_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_TOKEN_ENV, "from-the-environment")
    assert api_token() == "from-the-environment"
    (tmp_path / "token").write_text(" from-the-file-0123456789\n")
    assert api_token(tmp_path / "token") == "from-the-file-0123456789"
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        api_token(tmp_path / "token")
    with pytest.raises(ConfigError, match="missing"):
        api_token(tmp_path / "missing")


@pytest.mark.triton
@pytest.mark.timeout(300)
def test_a_new_version_loads_beside_the_served_one_and_a_removed_one_unloads_alone(
    repository: Path, server: TritonServer, control: ModelControl
) -> None:
    assert [(e.name, e.version, e.state) for e in control.index()] == [("ens", 1, "READY"), ("m", 1, "READY")]
    assert control.config("m")["version_policy"] == {"all": {}}
    v1 = answer(server, "m", 1)
    shutil.copytree(repository / "m" / "1", repository / "m" / "2")
    try:
        control.load("m", versions=[2])
        assert {v: e.state for v, e in control.versions("m").items()} == {1: "READY", 2: "READY"}
        assert control.is_ready("m", 2) and control.is_ready("m", 1)
        assert answer(server, "m", 1) == v1  # the same stub: version 1 was not touched
        assert answer(server, "m")[0] == 2  # unversioned requests go to the latest
        # The ensemble switches by a config override, and back to config.pbtxt by a plain load.
        control.load("ens", config=ensemble_config(1))
        assert answer(server, "ens") == v1
    finally:
        shutil.rmtree(repository / "m" / "2")
    control.load("m")
    control.wait_gone("m", [2], timeout=60)
    assert control.ready_versions("m") == [1] and control.versions("m")[2].state == "UNAVAILABLE" and answer(server, "m", 1) == v1
    assert not control.is_ready("m", 2)
    control.load("ens")
    assert answer(server, "ens") == v1


@pytest.mark.triton
@pytest.mark.timeout(300)
def test_a_model_loaded_from_files_then_unloaded(server: TritonServer, control: ModelControl) -> None:
    config = {**json.loads(json.dumps(control.config("m"))), "name": "from_files"}
    control.load("from_files", config=config, files={"3/model.py": MODEL.encode()}, versions=[3])
    assert answer(server, "from_files", 3)[0] == 3
    control.unload("from_files")
    control.wait_gone("from_files", [3], timeout=60)
    assert not control.is_ready("from_files")


@pytest.mark.triton
@pytest.mark.timeout(300)
def test_errors_name_the_model_the_version_and_tritons_message(server: TritonServer, control: ModelControl) -> None:
    with pytest.raises(ServingError, match=r"load of model 'absent' failed: HTTP 500: failed to load 'absent'"):
        control.load("absent")
    with pytest.raises(ServingError, match="hps-api-token"):
        ModelControl(server.http_url, None).index()
    with pytest.raises(ServingError, match="hps-api-token"):
        ModelControl(server.http_url, "wrong-token-0123456789").load("m")
    with pytest.raises(ServingError, match=r"model 'm' version\(s\) 7 not READY after 0 s; Triton reports 7: absent"):
        control.wait_ready("m", [7], timeout=0.2)
    with pytest.raises(ServingError, match=r"did not bring version\(s\) 9 \(Triton serves 1\)"):
        control.load("m", versions=[9], timeout=0.5)
    with pytest.raises(ServingError, match=r"config of model 'm' version 9 failed: HTTP 404: .*'m' version 9 is not found"):
        control.config("m", 9)
    # An override pinning a version that is not loaded fails, and takes the ensemble down
    # (Triton's behaviour, Findings F3); a plain load is then a no-op: a good override restores it.
    with pytest.raises(ServingError, match=r"load of model 'ens' failed: HTTP 400: .*version 5 is not loaded"):
        control.load("ens", config=ensemble_config(5))
    assert control.ready_versions("ens") == []
    control.load("ens", config=ensemble_config(-1), versions=[1])
    assert answer(server, "ens")[0] == 1
    with pytest.raises(ServingError, match=r"http://127.0.0.1:1: the repository index failed: .*is the server running"):
        ModelControl("127.0.0.1:1", TOKEN, timeout=2).index()
