"""Keep one Triton server serving: restart it when it dies, reload a model whose stub died,
count why, and raise an alarm when deaths come too fast.

``hps serve`` runs a :class:`Supervisor` around a :class:`~hps_core.serving.TritonServer`.
While it serves, a staged mirror of the repository (no GPU) is kept in step with the original
at every poll (:meth:`~hps_core.serving.TritonServer.sync_staged_repository`). When
tritonserver ends without being asked to (a crash, an OOM kill, an operator's
``kill -9``), or hangs (its ``/v2/health/live`` unanswered for ``hang_s``: it is then
SIGKILLed, cause ``unresponsive``), the supervisor

1. reads the cause (the signal, or the exit code) and Triton's error lines from its log;
2. stops what is left (:meth:`TritonServer.stop`): the process group is SIGKILLed, because
   the Python stubs outlive a dead Triton and ignore SIGTERM while they hold RocksDB files,
   and the ``/dev/shm`` regions and the staging folder are removed;
3. logs the death, counts it in ``hps_serve_restarts_total{cause="SIGSEGV"}`` and waits the
   :class:`RestartPolicy`'s backoff;
4. starts a new server on the same ports.

A server that dies more than ``max_restarts`` times within ``window_s`` is restarted every
``backoff_max_s`` from then on, with an ERROR line and ``hps_serve_restart_limit_reached 1``
(a client able to crash Triton must not be able to stop the service); with
``on_limit="exit"`` :meth:`Supervisor.run` raises :class:`~hps_core.errors.ServingError`
instead, with nothing left behind.

A Python stub that dies (or hangs: then it is killed) while Triton lives is seen by a
:class:`~hps_core.stub_watch.StubWatch`; Triton would never replace it, so its model is
unloaded and loaded again (:func:`_reload_model`), or Triton restarted when that fails.

The counts are served as Prometheus text by :class:`MetricsEndpoint` on a port of its own:
Triton's ``/metrics`` port belongs to the process that just died, and its counters restart
with it. Families::

    hps_serve_restarts_total{cause}             counter  Triton restarts, by the cause of the death
    hps_serve_stub_restarts_total{model,cause}  counter  models reloaded for a dead or hung stub
    hps_serve_up                                gauge    1 while Triton is serving, 0 while it is restarted
    hps_serve_restart_limit_reached             gauge    1 when the last restart was past max_restarts
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection
from pathlib import Path
from dataclasses import dataclass

from hps_core.errors import ConfigError, ServingError
from hps_core.model_control import ModelControl
from hps_core.serving import ServerExit, TritonServer
from hps_core.stub_watch import HangWatch, StubDeath, StubWatch

__all__ = ["MetricsEndpoint", "RestartPolicy", "ServeMetrics", "Supervisor", "adopt_orphans", "reap_adopted"]

log = logging.getLogger(__name__)

_POLL_S = 0.2  # how often the server's process is checked: bounds the time to notice a death
_LIVENESS_S = 2.0  # how often its HTTP front end is asked /v2/health/live (1 s timeout each)
_REAP_S = 2.0  # how often zombies this subreaper adopted are reaped
#: What :class:`RestartPolicy` does past its limit.
ON_LIMIT = ("backoff", "exit")


@dataclass(frozen=True, kw_only=True)
class RestartPolicy:
    """When to restart a dead server, and when to stop trying."""

    max_restarts: int = 5  # restarts at the doubling backoff within window_s; past them, on_limit decides
    window_s: float = 600.0  # the sliding window over which restarts are counted
    backoff_s: float = 1.0  # wait before the first restart of a window; doubles for each later one
    backoff_max_s: float = 30.0  # the longest wait
    # A running server whose /v2/health/live has not answered for this long is hung: killed and
    # restarted. Long enough for a stalled moment (a model loading, swap); 0 turns it off.
    hang_s: float = 60.0
    # Past max_restarts: "backoff" keeps restarting, every backoff_max_s, with the alarm raised
    # (a client that crashes Triton on purpose must not stop the service); "exit" gives up.
    on_limit: str = "backoff"
    # A stub stopped this long, or a model version with requests pending and no execution
    # completing for this long, hangs: its stubs are killed and the model reloaded. Generous: a
    # model whose executions legitimately take this long would be killed. 0 turns the check off.
    stub_hang_s: float = 30.0

    def __post_init__(self) -> None:
        if self.on_limit not in ON_LIMIT:
            raise ConfigError(f"on_limit {self.on_limit!r}: expected one of {', '.join(ON_LIMIT)}")

    def delay(self, recent: int) -> float:
        """Seconds to wait before a restart, given ``recent`` restarts already in the window."""
        return float(min(self.backoff_max_s, self.backoff_s * 2.0 ** recent))


class ServeMetrics:
    """The supervisor's counters, rendered as Prometheus text (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._restarts: Counter[str] = Counter()
        self._stub_restarts: Counter[tuple[str, str]] = Counter()
        self._up = 0
        self._limit_reached = 0

    def count_restart(self, cause: str) -> None:
        with self._lock:
            self._restarts[cause] += 1

    def count_stub_restart(self, model: str, cause: str) -> None:
        with self._lock:
            self._stub_restarts[(model, cause)] += 1

    def set_limit_reached(self, reached: bool) -> None:
        with self._lock:
            self._limit_reached = int(reached)

    def set_up(self, up: bool) -> None:
        with self._lock:
            self._up = int(up)

    def restarts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._restarts)

    def stub_restarts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._stub_restarts)

    def render(self) -> str:
        """Prometheus text exposition of both families."""
        with self._lock:
            restarts, up = sorted(self._restarts.items()), self._up
            stubs, limit = sorted(self._stub_restarts.items()), self._limit_reached
        lines = [
            "# HELP hps_serve_restarts_total Triton restarts by hps serve, by the cause of the death",
            "# TYPE hps_serve_restarts_total counter",
            *(f'hps_serve_restarts_total{{cause="{cause}"}} {n}' for cause, n in restarts),
            "# HELP hps_serve_stub_restarts_total Models reloaded by hps serve because a stub died or hung",
            "# TYPE hps_serve_stub_restarts_total counter",
            *(f'hps_serve_stub_restarts_total{{model="{_escape(model)}",cause="{cause}"}} {n}'
              for (model, cause), n in stubs),
            "# HELP hps_serve_up 1 while Triton is serving, 0 while hps serve restarts it",
            "# TYPE hps_serve_up gauge",
            f"hps_serve_up {up}",
            "# HELP hps_serve_restart_limit_reached Whether the last restart was past --max-restarts in the window (1) or not (0)",
            "# TYPE hps_serve_restart_limit_reached gauge",
            f"hps_serve_restart_limit_reached {limit}",
        ]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    """A Prometheus label value (model names are free text in Triton)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsEndpoint:
    """Serves ``GET /metrics`` from a :class:`ServeMetrics` on ``host:port`` (0 picks one), in a thread."""

    def __init__(self, metrics: ServeMetrics, host: str, port: int) -> None:
        self._host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # where a client finds it
        self._server = http.server.ThreadingHTTPServer((host, port), _metrics_handler(metrics))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hps-serve-metrics", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._server.server_port}/metrics"

    def __enter__(self) -> MetricsEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _metrics_handler(metrics: ServeMetrics) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
            return  # one line per scrape would drown the server's own messages

    return Handler


def adopt_orphans() -> None:
    """Make this process the reaper of its orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``).

    Stubs of a dead Triton are then reparented to ``hps serve`` rather than to PID 1, which
    reaps them after the kill; in a container, where ``hps serve`` is PID 1, it must anyway.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def reap_adopted(keep: Collection[int] = ()) -> list[int]:
    """Reap the zombie children of this process but those in ``keep`` (Triton, whose exit its
    ``Popen`` reads); returns their pids. As a subreaper, ``hps serve`` adopts processes that
    exit while it runs (a shared GPU cache's keeper, detached from the stub that started it, or
    a stub of a dead Triton): unreaped, each stays a zombie until ``hps serve`` exits."""
    me, reaped = os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in keep:
            continue
        try:
            state, parent = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state == "Z" and int(parent) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)
                reaped.append(int(entry.name))
    return reaped


class Supervisor:
    """Runs ``server`` until ``stop`` is set, restarting it under ``policy`` when it dies.

    ``on_ready(server)`` is called after each start (the first one and every restart).
    """

    def __init__(
        self,
        server: TritonServer,
        policy: RestartPolicy,
        metrics: ServeMetrics,
        on_ready: Callable[[TritonServer], None] = lambda server: None,
    ) -> None:
        self.server = server
        self.policy = policy
        self.metrics = metrics
        self.on_ready = on_ready
        self._restarts: deque[float] = deque()  # monotonic times of the restarts in the window
        self._live_at = self._checked_at = time.monotonic()  # last answer of /v2/health/live; last ask
        self._sync_warned_at = -float("inf")  # last warning of a failed repository sync
        self._reaped_at = 0.0  # last reap of adopted zombies (reap_adopted)
        self._stubs: StubWatch | None = None  # the stubs of the server started last
        self._hangs = HangWatch(policy.stub_hang_s)
        self._hung: set[int] = set()  # stubs killed here because their model hung
        self._scraped_at = -float("inf")  # last read of Triton's metrics for hangs

    def run(self, stop: threading.Event) -> int | None:
        """Serve until ``stop`` is set; returns Triton's exit code of the final, requested stop.

        Raises :class:`ServingError` when the first start fails (a configuration error is not
        retried) or when the server dies once more than the policy allows.
        """
        adopt_orphans()
        self.server.start()
        self._serving()
        while not stop.wait(_POLL_S):
            death = self._death() or self._stub_faults()
            if death is None:
                self._sync_repository()
                self._reap()
            elif not self._recover(death, stop):
                break
        self.metrics.set_up(False)
        return self.server.stop()

    def _serving(self) -> None:
        self._live_at = time.monotonic()
        assert self.server.process is not None
        self._stubs = StubWatch(self.server.process.pid)
        self._stubs.dead()  # learn the stubs the start created
        self._hangs.reset()
        self.metrics.set_up(True)
        self.on_ready(self.server)

    def _reap(self) -> None:
        now = time.monotonic()
        if now - self._reaped_at >= _REAP_S:
            self._reaped_at = now
            triton = self.server.process
            reap_adopted(keep=() if triton is None else (triton.pid,))

    def _sync_repository(self) -> None:
        """Keep a staged mirror in step with the repository, so that a version folder or a model
        added at runtime is seen by Triton's next load (never fatal: logged, retried next poll)."""
        try:
            self.server.sync_staged_repository()
        except OSError as exc:
            now = time.monotonic()
            if now - self._sync_warned_at > _LIVENESS_S * 30:
                self._sync_warned_at = now
                log.warning("could not bring the staged model repository in step with %s: %s",
                            self.server.model_repository, exc)

    def _death(self) -> ServerExit | None:
        """How the server stopped serving: it exited, or it hung (then it is killed here)."""
        if not self.server.is_running():
            return self.server.exit_report()
        now = time.monotonic()
        if self.policy.hang_s <= 0 or now - self._checked_at < _LIVENESS_S:
            return None
        self._checked_at = now
        if self.server.is_live():
            self._live_at = now
            return None
        if now - self._live_at < self.policy.hang_s:
            return None
        errors = tuple(self.server.error_lines(limit=10))
        self.server.kill()
        return ServerExit("unresponsive", None, (f"/v2/health/live unanswered for {now - self._live_at:.0f} s",
                                                 *errors))

    def _stub_faults(self) -> ServerExit | None:
        """Bring back the models whose stubs died (or hung: then they are killed first);
        a death of the whole server when that is the only way (see :meth:`_reload_models`)."""
        if self._stubs is None:
            return None
        deaths = self._stubs.dead()
        if not deaths:
            self._kill_hung()
            return None
        for death in deaths:
            killed_here = death.stub.pid in self._hung
            self._hung.discard(death.stub.pid)
            log.warning("%s%s; reloading the model", death.describe(), " (killed here: its model hung)" * killed_here)
            self.metrics.count_stub_restart(death.stub.model, "hung" if killed_here else death.cause)
        return self._reload_models(deaths)

    def _kill_hung(self) -> None:
        """Kill the stubs of a model version that hangs (the next poll finds them dead and
        reloads it): one stopped for ``stub_hang_s``, or, read from Triton's metrics every
        ``_LIVENESS_S``, one with requests pending and no execution completing for as long."""
        now = time.monotonic()
        hang_s = self.policy.stub_hang_s
        if hang_s <= 0 or self._stubs is None:
            return
        hung = {(stub.model, stub.version): "stopped" for stub in self._stubs.stopped(hang_s)}
        if now - self._scraped_at >= _LIVENESS_S and (text := self.server.metrics_text()) is not None:
            self._scraped_at = now
            hung.update(dict.fromkeys(self._hangs.add(text, now), "requests pending and none executed"))
        for (model, version), why in sorted(hung.items()):
            killed = self._stubs.kill_model(model, version)
            if killed:
                self._hung.update(stub.pid for stub in killed)
                self._hangs.reset()
                log.warning("model '%s' version %d hangs (%s for %.0f s): killing its stubs %s", model, version,
                            why, hang_s, sorted(stub.pid for stub in killed))

    def _reload_models(self, deaths: list[StubDeath]) -> ServerExit | None:
        """Unload and load again each model with a dead stub (Triton replaces no stub; a reload
        creates every instance anew), and the ensembles using it that did not come back
        (:func:`_reload_model`). While it reloads, the model is not ready. Without explicit
        model control, or when the reload fails, the whole server is restarted instead: the
        death returned."""
        described = tuple(death.describe() for death in deaths)
        if self.server.control_mode != "explicit":
            return ServerExit("stub_died", None, (*described, "model control is not explicit: restarting Triton"))
        control = ModelControl(self.server.http_url, self.server.control_token, timeout=self.server.startup_timeout)
        try:
            for model in sorted({death.stub.model for death in deaths}):
                _reload_model(control, model, timeout=self.server.startup_timeout)
        except ServingError as exc:
            if not self.server.is_running():
                return None  # the server died meanwhile: the next poll sees why
            return ServerExit("stub_reload_failed", None, (*described, *str(exc).splitlines()[:8]))
        return None

    def _recover(self, death: ServerExit | None, stop: threading.Event) -> bool:
        """Bury the dead server and start another; False when ``stop`` came first."""
        self.server.stop()
        self.metrics.set_up(False)
        while death is not None:
            delay = self._admit(death)
            if stop.wait(delay):
                return False
            death = self._start()
        self._serving()
        return True

    def _admit(self, death: ServerExit) -> float:
        """Log and count the restart of ``death``; returns the backoff, or raises past the limit."""
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > self.policy.window_s:
            self._restarts.popleft()
        errors = "".join(f"\n  {line}" for line in death.errors) or "\n  (no error lines in Triton's log)"
        over = len(self._restarts) >= self.policy.max_restarts
        self.metrics.set_limit_reached(over)
        if over and (self.policy.on_limit == "exit" or self.policy.max_restarts == 0):
            raise ServingError(
                f"tritonserver died ({death.describe()}) after {len(self._restarts)} restarts within "
                f"{self.policy.window_s:.0f} s: restart limit reached (--max-restarts "
                f"{self.policy.max_restarts}), not restarting. Triton's last errors:{errors}"
            )
        delay = self.policy.backoff_max_s if over else self.policy.delay(len(self._restarts))
        self._restarts.append(now)
        self.metrics.count_restart(death.cause)
        if over:
            log.error(
                "ALARM: tritonserver died (%s), %d restarts within %.0f s: past the limit (--max-restarts %d); "
                "restarting every %.0f s until the deaths stop (hps_serve_restart_limit_reached 1). Find the cause "
                "in Triton's errors:%s", death.describe(), len(self._restarts), self.policy.window_s,
                self.policy.max_restarts, delay, errors,
            )
            return delay
        log.warning(
            "tritonserver died (%s); restart %d of at most %d within %.0f s, in %.1f s. Triton's errors:%s",
            death.describe(), len(self._restarts), self.policy.max_restarts, self.policy.window_s, delay, errors,
        )
        return delay

    def _start(self) -> ServerExit | None:
        """Start the server again; the failure as a death to count, or None once it serves."""
        try:
            self.server.start()
        except ServingError as exc:  # start() has cleaned up after itself
            return ServerExit("start_failed", None, tuple(str(exc).splitlines()[:10]))
        return None


def _reload_model(control: ModelControl, model: str, *, timeout: float) -> None:
    """Unload ``model`` and load it again (Triton loads every version folder there is; those it
    served must come back); then every ensemble that served with it: Triton unloads an
    ensemble whose step goes and loads it again when the step is back, and one that did not
    come back is loaded here with the config it had. One that is back is left as it is, since a
    publication may have switched it meanwhile (hps serve takes no publication lock: a
    reload must not wait for a bulk load; the publication's own checks see a reload)."""
    versions = control.ready_versions(model)
    ensembles = {name: control.config(name) for name in _ensembles_using(control, model)}
    control.unload(model)
    # Not wait_gone: a version whose stub died stays UNLOADING for good (measured on 2.51: its
    # instance never finalizes), and a load creates the new instances all the same.
    _wait_not_ready(control, model, timeout=timeout)
    control.load(model, versions=versions, timeout=timeout)
    for name, config in ensembles.items():
        if not control.is_ready(name):
            control.load(name, config=config, timeout=timeout)
    log.warning("model '%s' reloaded (versions %s)%s", model, ", ".join(map(str, versions)) or "none",
                f" with the ensembles {', '.join(sorted(ensembles))}" if ensembles else "")


def _wait_not_ready(control: ModelControl, model: str, *, timeout: float) -> None:
    """Until no version of ``model`` is READY (Triton took the unload)."""
    deadline = time.monotonic() + timeout
    while control.ready_versions(model):
        if time.monotonic() > deadline:
            raise ServingError(f"model '{model}' still READY {timeout:.0f} s after its unload was asked")
        time.sleep(_POLL_S)


def _ensembles_using(control: ModelControl, model: str) -> list[str]:
    """The ready ensembles with a step on ``model``."""
    using = []
    for name in sorted({entry.name for entry in control.index(ready_only=True)}):
        config = control.config(name)
        steps = config.get("ensemble_scheduling", {}).get("step", []) if config.get("platform") == "ensemble" else []
        if any(step.get("model_name") == model for step in steps):
            using.append(name)
    return using
