"""Run ``hps serve`` as a real subprocess and inspect what each Triton it started left behind.

Test support for tests/hps_core/test_supervisor.py and scripts/bench_recovery.py:

* :func:`build_repository` writes a small repository: ``hps_multi`` (the HPS backend over
  four tables, RocksDB persistent tier: a stub that outlives its Triton keeps RocksDB's lock,
  and the restarted server could not open it) and ``echo`` (``backend: "python"``, adds one,
  sleeps ``-x[0]`` ms when the first element is negative so requests can be held in flight,
  and writes ``finalized-echo-<pid>`` into ``$HPS_TEST_FINALIZE_DIR`` in ``finalize``);
* :class:`ServeProcess` starts ``python -m hps_core.cli serve`` on free ports and parses
  the block it prints at each ready (pid, addresses, staging folder, restarts URL);
* :func:`trace` records a running Triton's process group, ``/dev/shm`` prefix and staging
  folder; :func:`leftovers` counts what of it is still there after it died.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hps_core.serving import group_processes
from hps_core.stub_watch import StubWatch
from tests.e2e.models import HUGECTR_STYLE_CONFIG, MULTI_DEFAULTS, MULTI_DIMS, MULTI_ROWS, _model_entry, _random_table

FINALIZE_DIR_ENV = "HPS_TEST_FINALIZE_DIR"
#: Triton 2.51's HTTP/JSON front end dies of SIGSEGV on this declared shape (PLATFORM.md).
CRASH_BODY = json.dumps(
    {"inputs": [{"name": "INPUT0", "datatype": "INT64", "shape": [1, 4611686018427387904], "data": [1]}]}
)

ECHO_MODEL = '''
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if x.size and x.flat[0] < 0:
                time.sleep(-x.flat[0] / 1000)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.int64))]))
        return responses

    def finalize(self):
        folder = os.environ.get("HPS_TEST_FINALIZE_DIR")
        if folder:
            open(os.path.join(folder, "finalized-echo-%d" % os.getpid()), "w").close()
'''

ECHO_CONFIG = """
backend: "python"
max_batch_size: 0
input [{ name: "INPUT0", data_type: TYPE_INT64, dims: [ -1 ] }]
output [{ name: "OUTPUT0", data_type: TYPE_INT64, dims: [ -1 ] }]
instance_group [{ count: 1, kind: KIND_CPU }]
"""


@dataclass(frozen=True)
class Repository:
    path: Path
    hps_json: Path


def build_repository(root: Path) -> Repository:
    """The ``echo`` and ``hps_multi`` models under ``root``; see the module docstring."""
    rng = np.random.default_rng(3)
    data = root / "data"
    data.mkdir(parents=True)
    tables = tuple(_random_table(rng, MULTI_ROWS, d, v) for d, v in zip(MULTI_DIMS, MULTI_DEFAULTS))
    repo = root / "repository"
    (repo / "hps_multi" / "1").mkdir(parents=True)
    (repo / "hps_multi" / "config.pbtxt").write_text(HUGECTR_STYLE_CONFIG)
    hps_json = repo / "hps.json"
    hps_json.write_text(json.dumps({
        "supportlonglong": True,
        "volatile_db": {"type": "hash_map", "num_partitions": 2, "initial_cache_rate": 0.5},
        "persistent_db": {"type": "rocks_db", "path": str(root / "rocksdb")},
        "models": [_model_entry("hps_multi", data, tables, [2, 1, 3, 1])],
    }))
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return Repository(repo, hps_json)


@dataclass(frozen=True)
class Ready:
    """What ``hps serve`` printed when a Triton became ready."""

    pid: int
    http: str  # host:port
    grpc: str
    staging: Path | None  # the staging folder (None when --log-file put the log elsewhere)
    restarts_url: str | None  # hps serve's own /metrics


_READY = re.compile(r"hps serve: Triton ready \(pid (\d+)\)")


class ServeProcess:
    """``python -m hps_core.cli serve`` on ``repository``, free ports, and ``args``; output collected."""

    def __init__(self, repository: Repository, *args: str, env: dict[str, str] | None = None) -> None:
        command = [
            sys.executable, "-m", "hps_core.cli", "serve", "--model-repository", str(repository.path),
            "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--serve-metrics-port", "0",
            "--backend-config", f"hps,ps={repository.hps_json}", "--exit-timeout", "3",
            "--restart-backoff", "0.2", *args,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._readies: list[Ready] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line)

    @property
    def output(self) -> str:
        self._drain(0)
        return "".join(self.lines)

    def _drain(self, timeout: float) -> bool:
        try:
            self.lines.append(self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait())
        except queue.Empty:
            return False
        while not self._queue.empty():
            self.lines.append(self._queue.get_nowait())
        return True

    def wait_ready(self, count: int = 1, timeout: float = 180.0) -> Ready:
        """The ``count``-th ready block (1: the first start, 2: after the first restart, ...)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readies = _parse_readies(self.lines)
            if len(readies) >= count:
                return readies[count - 1]
            if not self._drain(0.2) and self.process.poll() is not None:
                break
        raise AssertionError(f"ready #{count} not printed within {timeout} s; output:\n{self.output}")

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM ``hps serve``; its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 120.0) -> int:
        code = self.process.wait(timeout)
        time.sleep(0.1)  # let the reader thread take the last lines
        self._drain(0)
        return code

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _parse_readies(lines: list[str]) -> list[Ready]:
    readies = []
    for i, line in enumerate(lines):
        match = _READY.search(line)
        if match is None:
            continue
        block = {}
        for entry in lines[i + 1:i + 8]:
            key, _, value = entry.strip().partition(" ")
            block.setdefault(key, value.strip())
        if "restarts" not in block:  # the block's last line (always asked for) not read yet
            continue
        log = block.get("log")
        readies.append(Ready(
            pid=int(match.group(1)), http=block["HTTP"], grpc=block["gRPC"],
            staging=Path(log).parent if log and "/hps-triton-" in log else None,
            restarts_url=block.get("restarts"),
        ))
    return readies


# --------------------------------------------------------------------------- requests
def send(
    address: str, path: str, body: str = "", headers: dict[str, str] | None = None, method: str = "POST"
) -> tuple[int, bytes]:
    """One HTTP request on a fresh connection: (status, body)."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(method, path, body, headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def infer_body(values: list[int]) -> str:
    return json.dumps({"inputs": [{"name": "INPUT0", "datatype": "INT64", "shape": [len(values)], "data": values}]})


def echo_ok(address: str) -> bool:
    """Whether ``echo`` answers a good request correctly right now."""
    try:
        status, body = send(address, "/v2/models/echo/infer", infer_body([1, 2, 3]))
    except OSError:
        return False
    return status == 200 and json.loads(body)["outputs"][0]["data"] == [2, 3, 4]


def hps_ok(address: str) -> bool:
    """Whether ``hps_multi`` answers a lookup of 2+1+3+1 keys with 2*1+1*3+3*16+1*7 floats."""
    body = json.dumps({"inputs": [
        {"name": "KEYS", "datatype": "INT64", "shape": [1, 7], "data": [1, 2, 3, 4, 5, 6, 7]},
        {"name": "NUMKEYS", "datatype": "INT32", "shape": [1, 4], "data": [2, 1, 3, 1]},
    ]})
    try:
        status, answer = send(address, "/v2/models/hps_multi/infer", body)
    except OSError:
        return False
    return status == 200 and len(json.loads(answer)["outputs"][0]["data"]) == 2 * 1 + 3 + 3 * 16 + 7


def serving(ready: Ready) -> bool:
    """Whether both models answer correctly right now."""
    return echo_ok(ready.http) and hps_ok(ready.http)


def kill_in_flight(ready: Ready, pool: Executor) -> list[Future[object]]:
    """SIGKILL tritonserver while eight requests are in flight; their futures.

    Each ``echo`` request holds the one instance for 2 s: one runs, the others queue.
    """
    in_flight: list[Future[object]] = []
    for _ in range(4):
        in_flight.append(pool.submit(send, ready.http, "/v2/models/echo/infer", infer_body([-2000, 1])))
        in_flight.append(pool.submit(hps_ok, ready.http))
    time.sleep(0.5)  # let them reach the models
    os.kill(ready.pid, signal.SIGKILL)
    return in_flight


def send_crash(address: str) -> None:
    """Send the JSON request that kills Triton 2.51; the connection breaks (or times out)."""
    try:
        send(address, "/v2/models/echo/infer", CRASH_BODY)
    except OSError:
        return
    raise AssertionError("Triton answered the crashing request: is this still Triton 2.51?")


def scrape(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return str(response.read().decode())


def stub_pid(ready: Ready, instance: str) -> int:
    """The pid of the stub running ``instance`` (e.g. ``echo_0_0``) under the Triton of ``ready``."""
    watch = StubWatch(ready.pid)
    watch.dead()
    pids = [stub.pid for stub in watch.stubs() if stub.instance == instance]
    assert len(pids) == 1, watch.stubs()
    return pids[0]


def stub_restarts(url: str, model: str, cause: str) -> int:
    """``hps_serve_stub_restarts_total{model=...,cause=...}`` from ``hps serve``'s own endpoint (0 when absent)."""
    pattern = rf'^hps_serve_stub_restarts_total\{{model="{model}",cause="{cause}"\}} (\d+)$'
    match = re.search(pattern, scrape(url), re.MULTILINE)
    return int(match.group(1)) if match else 0


def restarts(url: str, cause: str) -> int:
    """``hps_serve_restarts_total{cause=...}`` from ``hps serve``'s own endpoint (0 when absent)."""
    match = re.search(rf'^hps_serve_restarts_total\{{cause="{cause}"\}} (\d+)$', scrape(url), re.MULTILINE)
    return int(match.group(1)) if match else 0


HPS_BODY = json.dumps({"inputs": [
    {"name": "KEYS", "datatype": "INT64", "shape": [1, 7], "data": [1, 2, 3, 4, 5, 6, 7]},
    {"name": "NUMKEYS", "datatype": "INT32", "shape": [1, 4], "data": [2, 1, 3, 1]},
]})


class Traffic:
    """Sends the same lookup to ``hps_multi`` in a loop; counts answers equal to the first one,
    different ones (wrong: must stay 0) and failures (with their ``time.monotonic()``), and
    asks the model's readiness every 50 ms (the times it said no)."""

    def __init__(self, ready: Ready) -> None:
        self.ready = ready
        status, self.reference = send(ready.http, "/v2/models/hps_multi/infer", HPS_BODY)
        assert status == 200
        self.right = self.wrong = 0
        self.failures: list[float] = []
        self.not_ready: list[float] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._requests), threading.Thread(target=self._readiness)]

    @property
    def failed(self) -> int:
        return len(self.failures)

    def _requests(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = send(self.ready.http, "/v2/models/hps_multi/infer", HPS_BODY)
            except OSError:
                status, body = 0, b""
            if status != 200:
                self.failures.append(time.monotonic())
            elif body == self.reference:
                self.right += 1
            else:
                self.wrong += 1

    def _readiness(self) -> None:
        while not self._stop.wait(0.05):
            try:
                status, _ = send(self.ready.http, "/v2/models/hps_multi/ready", method="GET")
            except OSError:
                status = 0
            if status != 200:
                self.not_ready.append(time.monotonic())

    def answers_again(self) -> bool:
        """Whether a right answer comes within the next 0.3 s."""
        before = self.right
        time.sleep(0.3)
        return self.right > before

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


# --------------------------------------------------------------------------- leftovers
@dataclass(frozen=True)
class Trace:
    """What identifies one Triton's belongings: its process group, shm prefix and staging folder."""

    pgid: int
    shm_prefix: str
    staging: Path | None


def trace(ready: Ready) -> Trace:
    """Record the belongings of the (running) Triton ``ready`` describes."""
    cmdline = Path(f"/proc/{ready.pid}/cmdline").read_bytes().split(b"\0")
    prefix = next(a.decode().rpartition("=")[2] for a in cmdline if b"shm-region-prefix-name=" in a)
    return Trace(ready.pid, prefix, ready.staging)


def leftovers(dead: Trace) -> dict[str, int]:
    """What is still there of a dead Triton: live processes of its group, stubs using its shm
    prefix (wherever they are), its /dev/shm regions, its staging folder."""
    stubs = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            stubs += dead.shm_prefix.encode() in cmdline.read_bytes()
        except OSError:
            continue
    return {
        "processes": sum(state != "Z" for state, _ in group_processes(dead.pgid).values()),
        "stubs": stubs,
        "shm_regions": len(list(Path("/dev/shm").glob(f"{dead.shm_prefix}*"))),
        "staging": int(dead.staging is not None and dead.staging.exists()),
    }


NOTHING_LEFT = {"processes": 0, "stubs": 0, "shm_regions": 0, "staging": 0}


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` seconds passed; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
