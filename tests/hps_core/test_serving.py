"""Tests of hps_core.serving and ``hps serve``: the launcher's helpers (fast) and a real Triton (marked).

The end-to-end test serves a tiny repository: ``add1`` (``backend: "python"``, KIND_CPU) and
``plus_gpu`` (a Python-based backend ``plus`` staged with ``--python-backend``, asking for
KIND_GPU), queries both over HTTP and gRPC, then stops the server with SIGTERM.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from hps_core.errors import ServingError
from hps_core.serving import (
    TritonServer,
    find_bundle,
    gpu_count,
    stage_backend_directory,
)

ADD_ONE_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.int64))
            responses.append(pb_utils.InferenceResponse([out]))
        return responses
'''

# The Python-based backend "plus" takes its increment from `--backend-config=plus,offset=N`,
# which TritonServer hands over as PLUS_BACKEND_CONFIG_OFFSET (Triton itself would not).
PLUS_BACKEND_MODEL = ADD_ONE_MODEL.replace(
    "(x + 1)", '(x + int(__import__("os").environ["PLUS_BACKEND_CONFIG_OFFSET"]))'
)

CONFIG = """
backend: "{backend}"
max_batch_size: 0
input [{{ name: "INPUT0", data_type: TYPE_INT64, dims: [ -1 ] }}]
output [{{ name: "OUTPUT0", data_type: TYPE_INT64, dims: [ -1 ] }}]
instance_group [
  {{
    count: 1
    kind: {kind}
{gpus}  }}
]
"""


def _write_model(repo: Path, name: str, backend: str, kind: str, model_py: str | None) -> None:
    gpus = "    gpus: [ 0 ]\n" if kind == "KIND_GPU" else ""
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(CONFIG.format(backend=backend, kind=kind, gpus=gpus))
    if model_py is not None:
        (repo / name / "1" / "model.py").write_text(model_py)


@pytest.fixture()
def tiny_repo(tmp_path: Path) -> tuple[Path, Path]:
    """(repository, model.py of the Python-based backend 'plus')."""
    repo = tmp_path / "repo"
    _write_model(repo, "add1", "python", "KIND_CPU", ADD_ONE_MODEL)
    _write_model(repo, "plus_gpu", "plus", "KIND_GPU", None)
    plus = tmp_path / "backends" / "plus" / "model.py"
    plus.parent.mkdir(parents=True)
    plus.write_text(PLUS_BACKEND_MODEL)
    return repo, plus


# --------------------------------------------------------------------------- fast unit tests
def test_stage_backend_directory_layout(tmp_path: Path, tiny_repo: tuple[Path, Path]) -> None:
    _, plus = tiny_repo
    bundle = find_bundle()
    dest = stage_backend_directory(bundle, tmp_path / "backends_dir", {"plus": plus})
    python_dir = dest / "python"
    # Triton rejects a symlinked library for Python-based backends: it must be a real file.
    assert (python_dir / "libtriton_python.so").is_file()
    assert not (python_dir / "libtriton_python.so").is_symlink()
    assert (python_dir / "triton_python_backend_stub").is_file()
    assert (python_dir / "triton_python_backend_utils.py").is_file()
    assert (dest / "plus" / "model.py").read_text() == plus.read_text()


def test_nonexistent_repository_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = subprocess.run(
        [sys.executable, "-m", "hps_core.cli", "serve", "--model-repository", str(missing)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert f"model repository {missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- real Triton
def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _read_lines(stream: object, lines: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)


def _wait_for_line(lines: queue.Queue[str], needle: str, timeout: float, seen: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} not printed within {timeout} s; got:\n{''.join(seen)}")


def _query_http(url: str, model: str) -> npt.NDArray[np.int64]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    try:
        tensor = httpclient.InferInput("INPUT0", [4], "INT64")
        tensor.set_data_from_numpy(np.array([1, 2, 3, 7], dtype=np.int64))
        return np.asarray(client.infer(model, [tensor]).as_numpy("OUTPUT0"), dtype=np.int64)
    finally:
        client.close()  # an open keep-alive connection would hold Triton's shutdown


def _instance_kinds(url: str, model: str) -> list[str]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    try:
        return [group["kind"] for group in client.get_model_config(model)["instance_group"]]
    finally:
        client.close()


def _query_grpc(url: str, model: str) -> npt.NDArray[np.int64]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput("INPUT0", [3], "INT64")
        tensor.set_data_from_numpy(np.array([-1, 0, 41], dtype=np.int64))
        return np.asarray(client.infer(model, [tensor]).as_numpy("OUTPUT0"), dtype=np.int64)
    finally:
        client.close()


@pytest.mark.triton
@pytest.mark.timeout(180)
def test_hps_serve_end_to_end(
    tmp_path: Path, tiny_repo: tuple[Path, Path], free_port: Callable[[], int]
) -> None:
    repo, plus = tiny_repo
    http, grpc, metrics = free_port(), free_port(), free_port()
    log_file = tmp_path / "triton.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hps_core.cli", "serve", "--model-repository", str(repo),
         "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
         "--metrics-port", str(metrics), "--python-backend", f"plus={plus}",
         "--backend-config", "plus,offset=1",
         "--log-file", str(log_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        _wait_for_line(lines, "Triton ready", 120, seen)
        _wait_for_line(lines, "metrics", 5, seen)
        printed = "".join(seen)
        assert f"127.0.0.1:{http}" in printed and f"127.0.0.1:{grpc}" in printed
        if gpu_count() == 0:
            _wait_for_line(lines, "on CPU instead of GPU: plus_gpu", 5, seen)
        for model in ("add1", "plus_gpu"):
            np.testing.assert_array_equal(_query_http(f"127.0.0.1:{http}", model), [2, 3, 4, 8])
            np.testing.assert_array_equal(_query_grpc(f"127.0.0.1:{grpc}", model), [0, 1, 42])
        if gpu_count() == 0:  # the model really runs on a CPU instance
            assert _instance_kinds(f"127.0.0.1:{http}", "plus_gpu") == ["KIND_CPU"]
            assert "plus_gpu_0_0 (CPU device 0)" in log_file.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(seen) + "".join(list(lines.queue))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for port in (http, grpc, metrics):
        assert not _port_open(port), f"port {port} still open after stop"


@pytest.mark.triton
@pytest.mark.timeout(120)
def test_server_failing_model_raises_with_log_tail(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write_model(repo, "broken", "python", "KIND_CPU", "raise RuntimeError('boom at import')\n")
    server = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, python_backends={}, exit_timeout=2)
    with pytest.raises(ServingError) as info:
        server.start()
    message = str(info.value)
    assert "exited with code" in message and "boom at import" in message
    assert server.process is None and server.staging is None


@pytest.mark.triton
@pytest.mark.timeout(120)
def test_triton_server_fixture_and_shm_cleanup(
    tiny_repo: tuple[Path, Path], triton_server: Callable[..., TritonServer]
) -> None:
    repo, plus = tiny_repo
    server = triton_server(repo, python_backends={"plus": plus}, backend_config=["plus,offset=1"])
    assert server.is_ready()
    np.testing.assert_array_equal(_query_http(server.http_url, "plus_gpu"), [2, 3, 4, 8])
    prefix = server._shm_prefix
    assert list(Path("/dev/shm").glob(f"{prefix}*")), "expected the python backend's shm regions"
    assert server.stop() == 0
    assert not list(Path("/dev/shm").glob(f"{prefix}*"))
    assert not server.is_running()


def test_backend_config_environment() -> None:
    from hps_core.serving import backend_config_environment

    env = backend_config_environment(["hps,ps=/abs/hps.json", "my-backend,some.key=v=1"])
    assert env == {"HPS_BACKEND_CONFIG_PS": "/abs/hps.json", "MY_BACKEND_BACKEND_CONFIG_SOME_KEY": "v=1"}
    with pytest.raises(ServingError, match="expected BACKEND,KEY=VALUE"):
        backend_config_environment(["hps"])


def test_environment_puts_venv_first() -> None:
    from hps_core.serving import server_environment

    env = server_environment(find_bundle(), base={"PATH": "/usr/bin", "LD_LIBRARY_PATH": ""})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert any(Path(p).is_dir() for p in env["LD_LIBRARY_PATH"].split(os.pathsep))


def test_cuda_pool_is_sized_for_the_largest_hps_request(tmp_path: Path) -> None:
    from hps_core.serving import DEFAULT_CUDA_POOL_BYTES, cuda_pool_bytes

    model = tmp_path / "repo" / "emb"
    model.mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "emb"\nbackend: "hps"\nparameters: { key: "hps_config" value: { string_value: "hps.json" } }\n'
    )
    (model / "hps.json").write_text(json.dumps({"models": [{
        "model": "emb", "sparse_files": ["a", "b"], "embedding_vecsize_per_table": [128, 16],
        "maxnum_catfeature_query_per_table_per_sample": [1, 3], "max_batch_size": 524288,
    }]}))
    keys, floats = 524288 * 4, 524288 * (128 + 3 * 16)
    assert cuda_pool_bytes(tmp_path / "repo") == 4 * (8 * keys + 4 * floats)
    (model / "hps.json").write_text(json.dumps({"models": [{
        "model": "emb", "sparse_files": ["a"], "embedding_vecsize_per_table": [8],
        "maxnum_catfeature_query_per_table_per_sample": [1], "max_batch_size": 16,
    }]}))
    assert cuda_pool_bytes(tmp_path / "repo") == DEFAULT_CUDA_POOL_BYTES


def test_cuda_pool_is_sized_from_the_json_each_version_serves(tmp_path: Path) -> None:
    """A published version's own <N>/hps.json is what the backend serves for N (issue 22: the
    pool sizing read only the hps_config parameter's JSON), so it sizes the pool too."""
    from hps_core.serving import DEFAULT_CUDA_POOL_BYTES, cuda_pool_bytes

    model = tmp_path / "repo" / "emb"
    (model / "1").mkdir(parents=True)
    (model / "2").mkdir()
    (model / "config.pbtxt").write_text(
        'name: "emb"\nbackend: "hps"\nparameters: { key: "hps_config" value: { string_value: "../hps.json" } }\n')
    small = {"model": "emb", "sparse_files": ["a"], "embedding_vecsize_per_table": [8],
             "maxnum_catfeature_query_per_table_per_sample": [1], "max_batch_size": 16}
    (tmp_path / "repo" / "hps.json").write_text(json.dumps({"models": [small]}))
    assert cuda_pool_bytes(tmp_path / "repo") == DEFAULT_CUDA_POOL_BYTES
    big = {**small, "model": "emb_v2", "embedding_vecsize_per_table": [256], "max_batch_size": 1 << 20}
    (model / "2" / "hps.json").write_text(json.dumps({"models": [big]}))
    assert cuda_pool_bytes(tmp_path / "repo") == 4 * (8 * (1 << 20) + 4 * (1 << 20) * 256)


def test_command_line_binds_http_apart_and_guards_model_control(tmp_path: Path) -> None:
    def command(**kwargs: object) -> list[str]:
        server = TritonServer(tmp_path, **kwargs)  # type: ignore[arg-type]
        return server._command(find_bundle(), tmp_path, tmp_path, 0)

    cmd = command(host="0.0.0.0", http_host="127.0.0.1")
    assert {"--http-address=127.0.0.1", "--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0"} <= set(cmd)
    assert {"--model-control-mode=explicit", "--load-model=*"} <= set(cmd)
    # Without a token, model control is guarded by one nobody else knows; shared memory is open.
    guard = next(a for a in cmd if a.startswith("--http-restricted-api="))
    assert guard.startswith("--http-restricted-api=model-repository:hps-api-token=")
    token = "0123456789abcdefXYZ"
    cmd = command(api_token=token)
    guard = f"model-repository,shared-memory:hps-api-token={token}"
    assert {f"--http-restricted-api={guard}", f"--grpc-restricted-protocol={guard}"} <= set(cmd)
    # A control mode of the caller's replaces explicit control.
    cmd = command(extra_args=["--model-control-mode=none"])
    assert "--load-model=*" not in cmd and cmd.count("--model-control-mode=none") == 1


def test_a_start_removes_staging_folders_whose_server_is_gone(tmp_path: Path) -> None:
    """A SIGKILLed hps serve (or TritonServer) cannot remove its staging folder; the next start
    removes those whose owner is gone, never a live server's, nor a folder naming no owner."""
    from hps_core.db.shm_store import process_start, this_process
    from hps_core.serving import remove_orphaned_staging

    dead = subprocess.Popen(["sleep", "30"])
    dead_start = process_start(dead.pid)
    dead.kill()
    dead.wait()
    folders = {name: tmp_path / f"hps-triton-{name}" for name in ("dead", "live", "unowned")}
    for folder in folders.values():
        (folder / "backends").mkdir(parents=True)
    (folders["dead"] / ".owner").write_text(f"{dead.pid} {dead_start}\n")
    pid, start = this_process()
    (folders["live"] / ".owner").write_text(f"{pid} {start}\n")
    (tmp_path / "other").mkdir()
    assert remove_orphaned_staging(tmp_path) == [folders["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hps-triton-live", "hps-triton-unowned", "other"]


def test_cuda_pool_reads_a_relative_backend_config_json_as_the_stubs_do(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``--backend-config hps,ps=conf/hps.json`` is relative to where hps serve runs (the stubs get
    it made absolute), not to the model's folder."""
    from hps_core.serving import DEFAULT_CUDA_POOL_BYTES, cuda_pool_bytes

    model = tmp_path / "repo" / "emb"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text('name: "emb"\nbackend: "hps"\n')  # no hps_config: the ps= one
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "hps.json").write_text(json.dumps({"models": [{
        "model": "emb", "sparse_files": ["a"], "embedding_vecsize_per_table": [256],
        "maxnum_catfeature_query_per_table_per_sample": [1], "max_batch_size": 1 << 20}]}))
    monkeypatch.chdir(tmp_path)
    assert cuda_pool_bytes(tmp_path / "repo", ["hps,ps=conf/hps.json"]) == 4 * (8 * (1 << 20) + 4 * (1 << 20) * 256)
    assert cuda_pool_bytes(tmp_path / "repo") == DEFAULT_CUDA_POOL_BYTES


def test_a_port_picked_for_triton_is_none_named_for_another_endpoint_or_reserved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A free port is only free until someone binds it: hps serve picked Triton's internal HTTP
    port equal to the metrics port it was given (not bound yet), and Triton refused to start."""
    import hps_core.serving as serving

    offered = iter([9102, 9101, 9103, 9104])  # the metrics port, a reserved one, then free ones
    monkeypatch.setattr(serving, "free_port", lambda host="127.0.0.1": next(offered))
    server = TritonServer(tmp_path, http_port=0, grpc_port=9100, metrics_port=9102, reserved_ports=(9101,))
    server._assign_ports()
    assert server.ports == {"http": 9103, "grpc": 9100, "metrics": 9102}
    server._assign_ports()  # a restart keeps the ports it has
    assert server.ports["http"] == 9103
