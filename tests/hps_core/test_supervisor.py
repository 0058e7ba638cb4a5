"""``hps serve`` under failure: restarts, leftovers, restart limit, access control, clean stop.

The fast tests cover the restart policy, the metrics text and the token's sources. The marked
ones run ``hps serve`` as a subprocess (tests/hps_serve.py) over a repository with an HPS
model on RocksDB and a Python model that marks its ``finalize``, and check what each Triton
leaves behind when it dies: live processes of its group, stubs, /dev/shm regions, staging.
"""

from __future__ import annotations

import http.client
import json
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hps_core.cli.serve import _api_token
from hps_core.config import load_config
from hps_core.db.shm_store import list_stores, namespace_dir, namespace_of
from hps_core.errors import ConfigError, ServingError
from hps_core.serving import (
    API_TOKEN_ENV,
    API_TOKEN_HEADER,
    GRPC_API_TOKEN_HEADER,
    TritonServer,
    exit_cause,
    group_processes,
)
from hps_core.supervisor import MetricsEndpoint, RestartPolicy, ServeMetrics
from tests.hps_serve import (
    FINALIZE_DIR_ENV,
    NOTHING_LEFT,
    Ready,
    Repository,
    ServeProcess,
    Trace,
    build_repository,
    echo_ok,
    hps_ok,
    infer_body,
    kill_in_flight,
    leftovers,
    send,
    restarts,
    scrape,
    send_crash,
    serving,
    trace,
    wait_until,
)

RECOVERY_S = 180.0  # generous: a deadline to give up at, never a timing asserted


# --------------------------------------------------------------------------- fast
def test_restart_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(backoff_s=0.5, backoff_max_s=3.0)
    assert [policy.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_exit_cause_names_the_signal() -> None:
    assert exit_cause(-signal.SIGSEGV) == "SIGSEGV"
    assert exit_cause(-signal.SIGKILL) == "SIGKILL"
    assert exit_cause(1) == "exit_1"


def test_metrics_endpoint_serves_restarts_by_cause() -> None:
    metrics = ServeMetrics()
    metrics.count_restart("SIGSEGV")
    metrics.count_restart("SIGSEGV")
    metrics.count_restart("exit_1")
    metrics.set_up(True)
    with MetricsEndpoint(metrics, "127.0.0.1", 0) as endpoint:
        text = scrape(endpoint.url)
    assert 'hps_serve_restarts_total{cause="SIGSEGV"} 2\n' in text
    assert 'hps_serve_restarts_total{cause="exit_1"} 1\n' in text
    assert "# TYPE hps_serve_restarts_total counter" in text and "hps_serve_up 1\n" in text


def test_api_token_from_file_else_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_TOKEN_ENV, "from-the-environment")
    assert _api_token(None) == "from-the-environment"
    path = tmp_path / "token"
    path.write_text("from-the-file-0123456789\n")
    assert _api_token(str(path)) == "from-the-file-0123456789"
    monkeypatch.setenv(API_TOKEN_ENV, "")
    assert _api_token(None) is None
    path.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        _api_token(str(path))


@pytest.mark.parametrize("token", ["short", "has:colon-0123456789", "has space 0123456789"])
def test_a_token_triton_cannot_parse_is_refused(tmp_path: Path, token: str) -> None:
    with pytest.raises(ServingError, match="at least 16 characters"):
        TritonServer(tmp_path, api_token=token)


# --------------------------------------------------------------------------- real hps serve
@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    return build_repository(tmp_path_factory.mktemp("supervised"))


def _assert_recovered(serve: ServeProcess, first: Ready, dead: Trace, cause: str) -> None:
    """After ``first`` died of ``cause``: the next Triton serves on the same ports, nothing of
    ``first`` is left, one restart is counted; and a stop then leaves nothing either."""
    second = serve.wait_ready(2)
    assert (second.http, second.grpc) == (first.http, first.grpc)  # clients reconnect where they were
    assert wait_until(lambda: serving(second), RECOVERY_S)  # hps_multi too: RocksDB's lock was freed
    assert leftovers(dead) == NOTHING_LEFT
    assert second.restarts_url is not None and restarts(second.restarts_url, cause) == 1
    assert f"tritonserver died ({cause}" in serve.output
    running = trace(second)
    assert serve.stop() == 0
    assert leftovers(running) == NOTHING_LEFT


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_crashing_json_request_restarts_triton_and_leaves_nothing(repository: Repository) -> None:
    # Without the HTTP guard, which refuses the request (tests/hps_core/test_http_guard.py).
    with ServeProcess(repository, "--no-http-guard") as serve:
        first = serve.wait_ready()
        assert serving(first)
        dead = trace(first)
        send_crash(first.http)
        _assert_recovered(serve, first, dead, "SIGSEGV")
    assert "Signal (11) received" in serve.output  # Triton's error lines are in the restart's log line


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_triton_with_requests_in_flight_is_restarted_and_leaves_nothing(repository: Repository) -> None:
    with ServeProcess(repository) as serve, ThreadPoolExecutor(8) as pool:
        first = serve.wait_ready()
        dead = trace(first)
        in_flight = kill_in_flight(first, pool)
        _assert_recovered(serve, first, dead, "SIGKILL")
        for future in in_flight:
            future.exception(timeout=120)  # every one ended, answered or failed


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hung_triton_is_killed_and_restarted(repository: Repository) -> None:
    """A stopped process answers nothing but stays alive: only the liveness check sees it."""
    with ServeProcess(repository, "--hang-timeout", "3") as serve:
        first = serve.wait_ready()
        dead = trace(first)
        os.kill(first.pid, signal.SIGSTOP)
        _assert_recovered(serve, first, dead, "unresponsive")
    assert "/v2/health/live unanswered for" in serve.output


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_restart_limit_ends_hps_serve_with_a_clear_message(repository: Repository) -> None:
    with ServeProcess(repository, "--max-restarts", "1", "--on-restart-limit", "exit", "--no-http-guard") as serve:
        first = serve.wait_ready()
        traces = [trace(first)]
        send_crash(first.http)
        second = serve.wait_ready(2)
        traces.append(trace(second))
        send_crash(second.http)
        assert serve.wait() == 1
    assert "restart limit reached (--max-restarts 1), not restarting" in serve.output, serve.output
    assert [leftovers(t) for t in traces] == [NOTHING_LEFT, NOTHING_LEFT]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses listening on TCP ``port`` (from /proc/net/tcp and tcp6), IPv4-mapped ones as IPv4."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:
                    v6 = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                    found.add(str(v6.ipv4_mapped or v6))  # gRPC listens on ::ffff:127.0.0.1
    return found


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_binds_loopback_and_the_token_guards_model_control_and_shared_memory(repository: Repository) -> None:
    token = secrets.token_urlsafe(24)
    with ServeProcess(repository, env={API_TOKEN_ENV: token}) as serve:
        ready = serve.wait_ready()
        assert ready.restarts_url is not None
        ports = [int(a.rsplit(":", 1)[1]) for a in (ready.http, ready.grpc, ready.restarts_url.split("/")[2])]
        for port in ports:
            assert _listening_addresses(port) == {"127.0.0.1"}, port
        # The token reaches Triton through its command line only, not its (inherited) environment.
        assert token.encode() not in Path(f"/proc/{ready.pid}/environ").read_bytes()

        header = {API_TOKEN_HEADER: token}
        for path in ("/v2/repository/index", "/v2/repository/models/echo/unload", "/v2/systemsharedmemory/register"):
            status, body = send(ready.http, path, "{}")
            assert status == 403 and API_TOKEN_HEADER.encode() in body, (path, status, body)
        assert send(ready.http, "/v2/repository/index", "{}", header)[0] == 200
        assert send(ready.http, "/v2/systemsharedmemory/status", headers=header, method="GET")[0] == 200
        assert send(ready.http, "/v2/repository/models/echo/unload", "{}", header)[0] == 200
        assert wait_until(lambda: not echo_ok(ready.http), RECOVERY_S)
        assert send(ready.http, "/v2/repository/models/echo/load", "{}", header)[0] == 200
        assert echo_ok(ready.http) and hps_ok(ready.http)  # inference needs no token

        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(ready.grpc)
        try:
            with pytest.raises(InferenceServerException, match=GRPC_API_TOKEN_HEADER):
                client.get_model_repository_index()
            assert client.get_model_repository_index(headers={GRPC_API_TOKEN_HEADER: token}) is not None
            assert client.is_model_ready("echo")  # inference side: no token
        finally:
            client.close()
        assert serve.stop() == 0


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_clean_stop_runs_finalize_despite_an_idle_keep_alive_client(repository: Repository, tmp_path: Path) -> None:
    finalized = tmp_path / "finalized"
    finalized.mkdir()
    with ServeProcess(repository, env={FINALIZE_DIR_ENV: str(finalized)}) as serve:
        ready = serve.wait_ready()
        running = trace(ready)
        host, port = ready.http.rsplit(":", 1)
        idle = http.client.HTTPConnection(host, int(port), timeout=60)
        idle.request("POST", "/v2/models/echo/infer", infer_body([1]))
        assert idle.getresponse().read()  # answered; the connection stays open and idle
        try:
            assert serve.stop() == 0
        finally:
            idle.close()
    assert list(finalized.glob("finalized-echo-*")), serve.output
    assert leftovers(running) == NOTHING_LEFT


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stop_after_a_crash_kills_the_surviving_stubs(repository: Repository) -> None:
    server = TritonServer(repository.path, http_port=0, grpc_port=0, metrics_port=0,
                          backend_config=[f"hps,ps={repository.hps_json}"], exit_timeout=3)
    with server:
        assert server.process is not None and server.staging is not None
        dead = Trace(server.process.pid, server.shm_prefix, server.staging)
        threading.Thread(target=send_crash, args=(server.http_url,), daemon=True).start()
        assert server.wait(RECOVERY_S) == -signal.SIGSEGV
        report = server.exit_report()
        assert report is not None and report.cause == "SIGSEGV"
        assert any("Signal (11) received" in line for line in report.errors)
        # The stubs are still alive here, reparented (PLATFORM.md); stop() must kill them.
    assert leftovers(dead) == NOTHING_LEFT


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_host_store_outlives_a_triton_restart_and_the_clean_stop_removes_it(repository: Repository) -> None:
    """The hash map of ``hps_multi`` is a host store kept by ``hps serve``: a Triton killed
    with SIGKILL leaves the store's files, the next Triton attaches to them (same files, not
    filled again), and ``hps serve``'s stop removes them: nothing stays in /dev/shm."""
    config = load_config(repository.hps_json)
    namespace = namespace_of(config.volatile_db, config.source)
    tables = sorted(t.qualified_name for t in config.model("hps_multi").tables)
    with ServeProcess(repository) as serve:
        first = serve.wait_ready()
        assert serving(first)
        stores = {s.table: s for s in list_stores(namespace)}
        assert sorted(stores) == tables
        assert all(s.complete and s.keeper == serve.process.pid and s.users for s in stores.values())
        inodes = {s.path: os.stat(s.path).st_ino for s in stores.values()}
        dead = trace(first)
        os.kill(first.pid, signal.SIGKILL)
        second = serve.wait_ready(2)
        assert wait_until(lambda: serving(second), RECOVERY_S)
        assert leftovers(dead) == NOTHING_LEFT
        assert {s.path: os.stat(s.path).st_ino for s in list_stores(namespace)} == inodes  # attached, not rebuilt
        assert all(s.users and set(s.users).isdisjoint(group_processes(dead.pgid)) for s in list_stores(namespace))
        assert serve.stop() == 0
    assert f"removed {len(tables)} host store file(s)" in serve.output
    assert not namespace_dir(namespace).exists()


def test_a_process_adopted_by_hps_serve_is_reaped_when_it_exits() -> None:
    """hps serve is a subreaper: a shared GPU cache's keeper (detached from the stub that started
    it) becomes its child, and one that exits while hps serve runs must not stay a zombie; Triton
    itself (in ``keep``) is left to its Popen."""
    script = """
import json, os, subprocess, sys, time
from pathlib import Path
from hps_core.supervisor import adopt_orphans, reap_adopted
adopt_orphans()
triton = subprocess.Popen(["true"])
# a detached grandchild, as gpu_keeper forks off: its parent exits, so it is adopted by us
subprocess.run(["sh", "-c", "(sleep 0.3; exit 0) & exit 0"], check=True)
def zombies():
    me = str(os.getpid())
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                state, parent = (p / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            if state == "Z" and parent == me:
                found.append(int(p.name))
    return sorted(found)
end = time.monotonic() + 20
while len(zombies()) < 2 and time.monotonic() < end:
    time.sleep(0.05)
before = zombies()
reaped = reap_adopted(keep=(triton.pid,))
print(json.dumps([before, reaped, zombies(), triton.wait(), triton.pid]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    before, reaped, after, triton_code, triton_pid = json.loads(done.stdout)
    assert len(before) == 2 and triton_pid in before  # Triton and the adopted keeper, both zombies
    assert reaped == [pid for pid in before if pid != triton_pid]
    assert after == [triton_pid] and triton_code == 0  # Triton's status was left to its Popen
