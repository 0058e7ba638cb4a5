"""A Python stub that dies or hangs under ``hps serve``: found, its model reloaded, counted.

Triton 2.51 answers ``INTERNAL Stub process ... is not healthy`` for a dead stub forever while
every readiness check says 200 (hps_core/stub_watch.py); these tests hold ``hps serve`` to
bringing the model back with no wrong answer, and to not giving up past its restart limit.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backend.stub_watchdog import start_watchdog
from hps_core.errors import ConfigError
from hps_core.model_control import ModelControl
from hps_core.serving import TritonServer
from hps_core.stub_watch import SUPERVISED_ENV, StubWatch, hung_versions
from tests.hps_serve import (
    Ready,
    Repository,
    ServeProcess,
    Traffic,
    build_repository,
    echo_ok,
    infer_body,
    scrape,
    send,
    send_crash,
    serving,
    stub_pid,
    stub_restarts,
    wait_until,
)

RECOVERY_S = 180.0  # generous: a deadline to give up at, never a timing asserted


# --------------------------------------------------------------------------- pure logic
def _metrics(pending: float, executions: float) -> str:
    return (
        "# TYPE nv_inference_pending_request_count gauge\n"
        f'nv_inference_pending_request_count{{model="m",version="2"}} {pending}\n'
        f'nv_inference_pending_request_count{{model="other",version="1"}} 0\n'
        "# TYPE nv_inference_exec_count counter\n"
        f'nv_inference_exec_count{{model="m",version="2"}} {executions}\n'
        'nv_inference_exec_count{model="other",version="1"} 5\n'
    )


def test_a_version_hangs_when_requests_stay_pending_and_nothing_executes() -> None:
    stuck = [(0.0, _metrics(1, 7)), (5.0, _metrics(3, 7)), (10.0, _metrics(4, 7))]
    assert hung_versions(stuck, hang_s=10.0) == {("m", 2)}
    assert hung_versions(stuck, hang_s=11.0) == set()  # not stuck for that long yet
    moving = [(0.0, _metrics(1, 7)), (5.0, _metrics(3, 8)), (10.0, _metrics(4, 8))]
    assert hung_versions(moving, hang_s=10.0) == set()  # one execution completed
    drained = [(0.0, _metrics(1, 7)), (5.0, _metrics(0, 7)), (10.0, _metrics(4, 7))]
    assert hung_versions(drained, hang_s=10.0) == set()  # idle a moment: no proof of a hang
    assert hung_versions([], hang_s=1.0) == set()


def test_an_unknown_dead_stub_action_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="hps_on_dead_stub 'restart': expected one of stop_server, log"):
        start_watchdog("restart", "m", print)


def test_a_process_that_is_not_a_stub_is_ignored() -> None:
    watch = StubWatch(os.getpid())
    assert watch.dead() == [] and watch.stubs() == []


# --------------------------------------------------------------------------- real hps serve
@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    return build_repository(tmp_path_factory.mktemp("stubs"))


def _stub_restarts(ready: Ready, model: str, cause: str) -> int:
    assert ready.restarts_url is not None
    return stub_restarts(ready.restarts_url, model, cause)


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_stub_under_load_is_replaced_without_a_wrong_answer(repository: Repository) -> None:
    with ServeProcess(repository) as serve:
        ready = serve.wait_ready()
        with Traffic(ready) as traffic:
            assert wait_until(lambda: traffic.right > 10, RECOVERY_S)
            os.kill(stub_pid(ready, "hps_multi_0_0"), signal.SIGKILL)
            assert wait_until(lambda: traffic.failed > 0, RECOVERY_S)  # it was down...
            assert wait_until(traffic.answers_again, RECOVERY_S)  # ...and is back
        assert traffic.wrong == 0
        assert traffic.not_ready  # while it reloaded, its readiness said so
        assert _stub_restarts(ready, "hps_multi", "SIGKILL") == 1
        assert serving(ready)  # the same Triton: no restart
        assert "died: SIGKILL; reloading the model" in serve.output
        assert serve.stop() == 0


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stopped_stub_is_killed_and_its_model_reloaded(repository: Repository) -> None:
    """A stub that answers nothing (SIGSTOP here) makes Triton fail each request after its own
    health check; hps serve kills it after --stub-hang-timeout and reloads the model."""
    with ServeProcess(repository, "--stub-hang-timeout", "2") as serve:
        ready = serve.wait_ready()
        os.kill(stub_pid(ready, "echo_0_0"), signal.SIGSTOP)
        assert wait_until(lambda: _stub_restarts(ready, "echo", "hung") == 1, RECOVERY_S), serve.output
        assert wait_until(lambda: echo_ok(ready.http), RECOVERY_S)
        assert "hangs (stopped for 2 s): killing its stubs" in serve.output
        assert serve.stop() == 0


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_model_stuck_in_an_execution_with_requests_waiting_is_reloaded(repository: Repository) -> None:
    """The hang Triton's metrics show: echo's one instance sleeps in execute (a request of -600000
    holds it 600 s), the next requests queue, no execution completes for --stub-hang-timeout."""
    with ServeProcess(repository, "--stub-hang-timeout", "3") as serve, ThreadPoolExecutor(4) as pool:
        ready = serve.wait_ready()
        stuck = [pool.submit(send, ready.http, "/v2/models/echo/infer", infer_body([-600_000, 1]))]
        time.sleep(0.5)  # the first one holds the instance; these wait behind it
        stuck += [pool.submit(send, ready.http, "/v2/models/echo/infer", infer_body([1, 2])) for _ in range(2)]
        assert wait_until(lambda: _stub_restarts(ready, "echo", "hung") == 1, RECOVERY_S), serve.output
        assert "hangs (requests pending and none executed for 3 s)" in serve.output
        assert wait_until(lambda: echo_ok(ready.http), RECOVERY_S)
        for future in stuck:
            future.exception(timeout=RECOVERY_S)  # each ended, answered or failed, none hangs
        assert serve.stop() == 0


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_past_the_restart_limit_it_keeps_serving_with_an_alarm(repository: Repository, tmp_path: Path) -> None:
    """Each crash is a restart; past --max-restarts the next one comes after the capped
    backoff, with an ERROR line and the alarm metric, instead of ending the service."""
    with ServeProcess(repository, "--max-restarts", "1", "--restart-backoff-max", "1", "--no-http-guard") as serve:
        first = serve.wait_ready()
        send_crash(first.http)
        second = serve.wait_ready(2)
        send_crash(second.http)
        third = serve.wait_ready(3)
        assert wait_until(lambda: serving(third), RECOVERY_S)
        assert third.restarts_url is not None
        assert re.search(r"^hps_serve_restart_limit_reached 1$", scrape(third.restarts_url), re.MULTILINE)
        assert "ALARM: tritonserver died (SIGSEGV" in serve.output
        assert serve.stop() == 0


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_without_hps_serve_a_dead_stub_stops_triton(repository: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launched directly: hps_multi's watchdog sees echo's stub die and stops the server
    (its supervisor, systemd or Kubernetes, starts it again), rather than leaving echo answering
    INTERNAL with readiness 200."""
    monkeypatch.delenv(SUPERVISED_ENV, raising=False)
    server = TritonServer(repository.path, http_port=0, grpc_port=0, metrics_port=0,
                          backend_config=[f"hps,ps={repository.hps_json}"], exit_timeout=3)
    with server:
        assert server.process is not None
        ready = Ready(server.process.pid, server.http_url, server.grpc_url, None, None)
        os.kill(stub_pid(ready, "echo_0_0"), signal.SIGKILL)
        server.wait(RECOVERY_S)  # it exits by itself
        log = server.log_tail(400)
    assert "died: SIGKILL. Triton never replaces it" in log and "stopping Triton (SIGTERM)" in log


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stubs_triton_stops_itself_are_never_taken_for_dead(repository: Repository,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each unload leaves its stub a zombie for the moment before Triton reaps it: a watcher
    looking every millisecond must not call that a death (nor the backends' watchdog, which
    would stop this server)."""
    monkeypatch.delenv(SUPERVISED_ENV, raising=False)
    server = TritonServer(repository.path, http_port=0, grpc_port=0, metrics_port=0,
                          backend_config=[f"hps,ps={repository.hps_json}"], exit_timeout=3)
    with server:
        assert server.process is not None
        watch, deaths, stop = StubWatch(server.process.pid), [], threading.Event()

        def look() -> None:
            while not stop.wait(0.001):
                deaths.extend(watch.dead())

        looking = threading.Thread(target=look)
        looking.start()
        control = ModelControl(server.http_url, server.control_token)
        try:
            for _ in range(8):
                time.sleep(1.2)  # the watcher learns the new stub (it lists children every second)
                control.unload("echo")
                control.wait_gone("echo", timeout=RECOVERY_S)
                control.load("echo", versions=[1], timeout=RECOVERY_S)
        finally:
            stop.set()
            looking.join()
        assert deaths == [] and server.is_running() and echo_ok(server.http_url)
