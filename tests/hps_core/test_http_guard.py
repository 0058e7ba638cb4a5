"""``hps serve``'s HTTP guard (hps_core/http_guard.py): the rules, the forwarding, real Triton.

The fast tests check :func:`check_inference_header` and the guard's HTTP framing against a
small upstream written here with the standard library (it records what reached it): bodies
and headers forwarded unchanged, keep-alive, chunked bodies, ``Expect: 100-continue``,
compressed bodies, pipelined requests answered in order, 503 while the upstream is down.
The marked tests run ``hps serve`` (tests/hps_serve.py) with real Triton 2.51 and send it the
requests that crash Triton's HTTP/JSON front end: each is refused (400), Triton never restarts;
tritonclient and perf_analyzer work through the guard; the guard outlives a Triton restart.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hps_core.errors import RequestError, ServingError
from hps_core.http_guard import DEFAULT_MAX_INPUT_BYTES, HttpGuard, check_inference_header
from tests.hps_serve import (
    CRASH_BODY,
    Repository,
    ServeProcess,
    build_repository,
    echo_ok,
    restarts,
    send,
    serving,
    wait_until,
)

RECOVERY_S = 180.0  # a deadline to give up at, never a timing asserted


def _header(*inputs: dict[str, Any]) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def _json_input(shape: list[Any], data: Any, datatype: str = "INT64", name: str = "INPUT0") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


# --------------------------------------------------------------------------- the rules
@pytest.mark.parametrize("shape", [[1, 2**62], [2**31, 2**31], [1, 2**32], [1, 2**29], [2**32, 2**32]])
def test_the_shapes_that_crash_triton_are_refused_naming_input_and_shape(shape: list[int]) -> None:
    with pytest.raises(RequestError, match=rf"input 'INPUT0' declares shape \[{shape[0]}, {shape[1]}\]"):
        check_inference_header(_header(_json_input(shape, [1])))


def test_the_byte_limit_is_named() -> None:
    shape = [1, DEFAULT_MAX_INPUT_BYTES // 8 + 1]
    with pytest.raises(RequestError, match=rf"above this server's limit of {DEFAULT_MAX_INPUT_BYTES} bytes"):
        check_inference_header(_header({"name": "K", "datatype": "INT64", "shape": shape,
                                         "parameters": {"binary_data_size": shape[1] * 8}}))
    check_inference_header(_header(_json_input([2, 3], [1, 2, 3, 4, 5, 6])), max_input_bytes=48)
    with pytest.raises(RequestError, match="limit of 47 bytes"):
        check_inference_header(_header(_json_input([2, 3], [1, 2, 3, 4, 5, 6])), max_input_bytes=47)


@pytest.mark.parametrize("shape", [[1, -1], [-5], [1.0], [True], ["3"], [2**63], None, 7])
def test_a_shape_not_of_non_negative_integers_is_refused(shape: Any) -> None:
    with pytest.raises(RequestError, match="a shape is a list of integers from 0 to 2\\*\\*63-1"):
        check_inference_header(_header(_json_input(shape, [1])))


def test_json_data_must_hold_as_many_elements_as_the_shape() -> None:
    check_inference_header(_header(_json_input([2, 3], [1, 2, 3, 4, 5, 6])))
    check_inference_header(_header(_json_input([2, 3], [[1, 2, 3], [4, 5, 6]])))  # nested: flattened
    check_inference_header(_header(_json_input([1], 5)))  # a scalar counts one
    check_inference_header(_header(_json_input([0], [])))
    check_inference_header(_header(_json_input([2], ["a", "bc"], "BYTES")))
    with pytest.raises(RequestError, match=r"declares shape \[2, 3\] \(6 elements\) but its JSON data holds 5"):
        check_inference_header(_header(_json_input([2, 3], [[1, 2, 3], [4, 5]])))
    with pytest.raises(RequestError, match="input 'NUMKEYS'.*holds 0"):
        check_inference_header(_header(_json_input([1], [1]), {"name": "NUMKEYS", "datatype": "INT32", "shape": [1]}))


def test_binary_and_shared_memory_inputs_are_checked_by_size_not_data() -> None:
    good = {"name": "KEYS", "datatype": "INT64", "shape": [1, 4], "parameters": {"binary_data_size": 32}}
    check_inference_header(_header(good))
    check_inference_header(_header({"name": "S", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": 19}}))
    check_inference_header(_header({"name": "M", "datatype": "FP32", "shape": [4, 4],
                                    "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 64}}))
    with pytest.raises(RequestError, match=r"input 'KEYS' declares shape \[1, 4\] of INT64 \(32 bytes\) but binary_data_size 31"):
        check_inference_header(_header({**good, "parameters": {"binary_data_size": 31}}))


def test_what_triton_could_read_differently_is_refused() -> None:
    # rapidjson takes the first of duplicate keys, Python the last: the crashing shape hides first.
    hidden = b'{"inputs": [{"name": "INPUT0", "datatype": "INT64", "shape": [1, 4611686018427387904], "shape": [1], "data": [1]}]}'
    with pytest.raises(RequestError, match="duplicate key 'shape'"):
        check_inference_header(hidden)
    with pytest.raises(RequestError, match="not valid JSON"):
        check_inference_header(b'{"inputs": [')
    check_inference_header(b'{"outputs": []}')  # no inputs: Triton answers that itself
    check_inference_header(b"[1, 2]")
    with pytest.raises(RequestError, match="nests JSON arrays or objects too deeply"):
        check_inference_header(b"[" * 100_000)  # a RecursionError in json.loads: a 400, not a traceback


# --------------------------------------------------------------------------- framing, against a stdlib upstream
class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with JSON describing what arrived: method, path, headers, body digest."""

    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]] = []

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                data += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            return data
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _answer(self) -> None:
        body = self._body()
        record = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                  "length": len(body), "sha": hashlib.sha256(body).hexdigest()}
        type(self).seen.append(record)
        answer = json.dumps(record).encode()
        self.send_response(200 if not self.path.startswith("/status/") else int(self.path.split("/")[2]))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST = _answer  # noqa: N815 - the names http.server dispatches to

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return


@pytest.fixture()
def upstream() -> Iterator[http.server.ThreadingHTTPServer]:
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def guard(upstream: http.server.ThreadingHTTPServer) -> Iterator[HttpGuard]:
    with HttpGuard("127.0.0.1", 0, lambda: f"127.0.0.1:{upstream.server_port}") as running:
        yield running


def _connect(guard: HttpGuard) -> http.client.HTTPConnection:
    host, port = guard.url.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=30)


def _exchange(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    conn.request(method, path, body, headers or {})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def _binary_request(header: bytes, tensor: bytes) -> tuple[bytes, dict[str, str]]:
    return header + tensor, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def test_requests_are_forwarded_unchanged_on_one_kept_connection(guard: HttpGuard) -> None:
    conn = _connect(guard)
    tensor = np.arange(4, dtype=np.int64).tobytes()
    header = _header({"name": "KEYS", "datatype": "INT64", "shape": [1, 4], "parameters": {"binary_data_size": 32}})
    body, headers = _binary_request(header, tensor)
    for _ in range(3):  # keep-alive: one client connection, one upstream connection
        status, seen = _exchange(conn, "GET", "/v2/health/ready", headers={"hps-api-token": "t" * 20})
        assert status == 200 and seen["method"] == "GET" and seen["headers"]["hps-api-token"] == "t" * 20
        status, seen = _exchange(conn, "POST", "/v2/models/m/versions/2/infer", body, headers)
        assert status == 200 and seen["sha"] == hashlib.sha256(body).hexdigest()
        assert seen["headers"]["Inference-Header-Content-Length"] == str(len(header))
    status, seen = _exchange(conn, "POST", "/v2/repository/index", b"{}")
    assert status == 200 and seen["path"] == "/v2/repository/index"
    large = os.urandom(3 * 2**20 + 17)  # streamed through in pieces, not inspected (not an infer path)
    status, seen = _exchange(conn, "POST", "/v2/systemsharedmemory/region/r/register", large)
    assert seen["length"] == len(large) and seen["sha"] == hashlib.sha256(large).hexdigest()
    conn.close()


def test_upstream_errors_are_relayed_as_they_are(guard: HttpGuard) -> None:
    conn = _connect(guard)
    status, seen = _exchange(conn, "GET", "/status/404")
    assert status == 404 and seen["path"] == "/status/404"


def test_crashing_requests_are_refused_in_every_encoding_and_the_connection_goes_on(guard: HttpGuard) -> None:
    conn = _connect(guard)
    status, answer = _exchange(conn, "POST", "/v2/models/echo/infer", CRASH_BODY)
    assert status == 400 and "input 'INPUT0' declares shape [1, 4611686018427387904]" in answer["error"]
    status, answer = _exchange(conn, "POST", "/v2/models/echo/infer", gzip.compress(CRASH_BODY.encode()),
                               {"Content-Encoding": "gzip"})
    assert status == 400 and "4611686018427387904" in answer["error"]
    status, answer = _exchange(conn, "POST", "/v2/models/echo/%69nfer", CRASH_BODY)  # percent-encoded path
    assert status == 400
    body, headers = _binary_request(_header(_json_input([1, 2**62], [1])), b"\0" * 64)
    status, answer = _exchange(conn, "POST", "/v2/models/echo/infer", body, headers)
    assert status == 400
    conn.putrequest("POST", "/v2/models/echo/infer")  # chunked, in two chunks
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    half = len(CRASH_BODY) // 2
    for piece in (CRASH_BODY[:half], CRASH_BODY[half:]):
        conn.send(f"{len(piece):x}\r\n{piece}\r\n".encode())
    conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    assert response.status == 400 and b"4611686018427387904" in response.read()
    assert _Recorder.seen == []  # none of them reached the upstream
    status, seen = _exchange(conn, "POST", "/v2/models/echo/infer", json.dumps({"inputs": [_json_input([1], [1])]}))
    assert status == 200 and len(_Recorder.seen) == 1  # the same connection still serves


def test_chunked_and_expect_continue_bodies_arrive_whole(guard: HttpGuard) -> None:
    good = json.dumps({"inputs": [_json_input([3], [1, 2, 3])]})
    conn = _connect(guard)
    conn.putrequest("POST", "/v2/models/echo/infer")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(f"{len(good):x}\r\n{good}\r\n0\r\n\r\n".encode())
    response = conn.getresponse()
    seen = json.loads(response.read())
    assert response.status == 200 and seen["sha"] == hashlib.sha256(good.encode()).hexdigest()

    with socket.create_connection(guard.url.rsplit(":", 1)) as raw:  # curl's way for large bodies
        raw.sendall(f"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(good)}\r\n"
                    f"Expect: 100-continue\r\n\r\n".encode())
        assert raw.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        raw.sendall(good.encode())
        reply = raw.makefile("rb").read1(65536)
    assert reply.startswith(b"HTTP/1.1 200") and hashlib.sha256(good.encode()).hexdigest().encode() in reply
    assert "Expect" not in _Recorder.seen[-1]["headers"]


def test_pipelined_requests_are_answered_in_order_around_a_refusal(guard: HttpGuard) -> None:
    good = json.dumps({"inputs": [_json_input([1], [7])]})
    requests = b"".join(
        f"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
        for body in (good, CRASH_BODY, good)
    )
    with socket.create_connection(guard.url.rsplit(":", 1)) as raw:
        raw.sendall(requests)
        reader = raw.makefile("rb")
        statuses = []
        for _ in range(3):
            statuses.append(int(reader.readline().split()[1]))
            length = 0
            while (line := reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
    assert statuses == [200, 400, 200]


def test_unreachable_upstream_is_503_and_the_guard_follows_it_back() -> None:
    address = {"now": "127.0.0.1:1"}  # nothing listens on port 1
    with HttpGuard("127.0.0.1", 0, lambda: address["now"]) as running:
        conn = _connect(running)
        status, answer = _exchange(conn, "POST", "/v2/models/echo/infer", b'{"inputs": []}')
        assert status == 503 and "Triton is not reachable" in answer["error"]
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            address["now"] = f"127.0.0.1:{server.server_port}"
            status, _ = _exchange(conn, "GET", "/v2/health/live")  # same client connection
            assert status == 200
        finally:
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize("request_bytes, words", [
    (b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
     b"Content-Length given twice"),
    # int(..., 16) takes these; a negative size once spun the connection's thread forever
    (b"POST /v2/models/m/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nabcdefgh", b"malformed chunk size"),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x10\r\nabcdefgh", b"malformed chunk size"),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\nabcdefgh", b"malformed chunk size"),
])
def test_malformed_framing_is_refused(request_bytes: bytes, words: bytes) -> None:
    with HttpGuard("127.0.0.1", 0, lambda: "127.0.0.1:1") as running, \
            socket.create_connection(running.url.rsplit(":", 1)) as raw:
        raw.settimeout(30)
        raw.sendall(request_bytes)
        reply = raw.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 400") and words in reply, reply


def test_idle_and_slow_connections_are_closed_so_they_cannot_hold_every_slot() -> None:
    """A thread per connection: a client keeping connections idle, or sending a head a byte at a
    time, would hold the slots for good; both are closed after ``idle_s``."""
    with HttpGuard("127.0.0.1", 0, lambda: "127.0.0.1:1", idle_s=0.5) as running, \
            socket.create_connection(running.url.rsplit(":", 1)) as idle, \
            socket.create_connection(running.url.rsplit(":", 1)) as slow:
        idle.settimeout(30)
        slow.settimeout(30)
        assert _trickled(slow, b"") < 299  # the head never completes: closed long before
        assert idle.recv(1) == b""  # closed by the guard, nothing answered
    with HttpGuard("127.0.0.1", 0, lambda: "127.0.0.1:1", idle_s=0.5) as running, \
            socket.create_connection(running.url.rsplit(":", 1)) as slow_body:
        slow_body.settimeout(30)
        head = b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 100000\r\n\r\n"
        assert _trickled(slow_body, head) < 299  # nor does the JSON header the guard must read


def _trickled(sock: socket.socket, first: bytes) -> int:
    """Send ``first``, then a byte every 0.1 s until the peer closes (at most 299); how many went."""
    sent = 0
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(first)
        for sent in range(1, 300):  # each read in time for the idle timeout, the whole never
            sock.sendall(b"G")
            time.sleep(0.1)
    return sent


# --------------------------------------------------------------------------- real Triton, through hps serve
@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    return build_repository(tmp_path_factory.mktemp("guarded"))


def _crash_variants() -> list[tuple[str, bytes, dict[str, str]]]:
    def json_body(shape: list[int], data: Any = None) -> bytes:
        return json.dumps({"inputs": [_json_input(shape, [1] if data is None else data)]}).encode()

    binary, headers = _binary_request(_header(_json_input([1, 2**62], [1])), b"")
    return [
        ("[1, 2**62]", json_body([1, 2**62]), {}),
        ("[2**31, 2**31]", json_body([2**31, 2**31]), {}),
        ("[1, 2**32]", json_body([1, 2**32]), {}),
        ("[1, 2**29]", json_body([1, 2**29]), {}),
        ("[1, -1]", json_body([1, -1]), {}),
        ("gzip [1, 2**62]", gzip.compress(json_body([1, 2**62])), {"Content-Encoding": "gzip"}),
        ("binary header [1, 2**62]", binary, headers),
    ]


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hps_serve_refuses_the_crashing_requests_and_triton_never_restarts(repository: Repository) -> None:
    with ServeProcess(repository) as serve:
        ready = serve.wait_ready()
        assert ready.restarts_url is not None and serving(ready)
        for label, body, headers in _crash_variants():
            status, answer = send(ready.http, "/v2/models/echo/infer", body.decode("latin-1"), headers)
            assert status == 400 and "input 'INPUT0'" in json.loads(answer)["error"], (label, status, answer)
            assert serving(ready), label  # the same Triton, answering
        assert os.path.exists(f"/proc/{ready.pid}") and sum(
            restarts(ready.restarts_url, cause) for cause in ("SIGSEGV", "SIGABRT", "SIGKILL")) == 0
        assert serve.stop() == 0


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tritonclient_and_perf_analyzer_work_through_the_guard_which_outlives_triton(
    repository: Repository, tmp_path: Path
) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    with ServeProcess(repository, "--restart-backoff", "3") as serve:
        ready = serve.wait_ready()
        client = httpclient.InferenceServerClient(ready.http)
        try:
            assert client.is_server_live() and client.is_model_ready("echo")
            assert client.get_model_metadata("echo")["name"] == "echo"
            values = np.arange(1000, dtype=np.int64)
            for binary in (True, False):
                tensor = httpclient.InferInput("INPUT0", [values.size], "INT64")
                tensor.set_data_from_numpy(values, binary_data=binary)
                output = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
                result = client.infer("echo", [tensor], outputs=[output])
                assert np.array_equal(result.as_numpy("OUTPUT0"), values + 1)
            bad = httpclient.InferInput("INPUT0", [1, 2**62], "INT64")
            bad._data = [1]  # what a hostile client sends: the shape and one value
            with pytest.raises(InferenceServerException, match=r"declares shape \[1, 4611686018427387904\]"):
                client.infer("echo", [bad])
            with pytest.raises(InferenceServerException, match="unknown model"):  # Triton's own error, relayed
                client.infer("nope", [tensor])
        finally:
            client.close()
        _perf_analyzer_through(ready.http, tmp_path)

        os.kill(ready.pid, signal.SIGKILL)  # the guard stays; it answers 503 until Triton is back
        assert wait_until(lambda: send(ready.http, "/v2/health/live", method="GET")[0] == 503, RECOVERY_S)
        second = serve.wait_ready(2)
        assert second.http == ready.http and second.pid != ready.pid
        assert wait_until(lambda: serving(second), RECOVERY_S)
        assert serve.stop() == 0


def _perf_analyzer_through(address: str, work: Path) -> None:
    from hps_demo.tools import ToolNotFoundError, find_perf_analyzer

    try:
        tool = find_perf_analyzer()
    except ToolNotFoundError as exc:
        pytest.skip(str(exc))
    data = work / "input.json"
    data.write_text(json.dumps({"data": [{"INPUT0": {"content": [1, 2, 3], "shape": [3]}}]}))
    command = [str(tool.path), "-m", "echo", "-u", address, "-i", "http", "--input-data", str(data),
               "--concurrency-range", "2", "--measurement-interval", "1000", "-s", "50", "--max-trials", "5"]
    result = subprocess.run(command, capture_output=True, text=True, env=tool.environment(), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Throughput:" in result.stdout
    assert echo_ok(address)


def test_a_taken_port_is_a_clear_error(guard: HttpGuard) -> None:
    with pytest.raises(ServingError, match=rf"cannot listen on 127.0.0.1:{guard.port} .*pick a free --http-port"):
        HttpGuard("127.0.0.1", guard.port, lambda: "127.0.0.1:1")
