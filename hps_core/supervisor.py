"""Keep one Triton server serving: restart it when it dies, count why, give up past a limit.

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

A server that dies more than ``max_restarts`` times within ``window_s`` is not started again:
:meth:`Supervisor.run` raises :class:`~hps_core.errors.ServingError`, with nothing left behind.

The counts are served as Prometheus text by :class:`MetricsEndpoint` on a port of its own:
Triton's ``/metrics`` port belongs to the process that just died, and its counters restart
with it. Families::

    hps_serve_restarts_total{cause}  counter  Triton restarts, by the cause of the death
    hps_serve_up                     gauge    1 while Triton is serving, 0 while it is restarted
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from hps_core.errors import ServingError
from hps_core.serving import ServerExit, TritonServer

__all__ = ["MetricsEndpoint", "RestartPolicy", "ServeMetrics", "Supervisor", "adopt_orphans"]

log = logging.getLogger(__name__)

_POLL_S = 0.2  # how often the server's process is checked: bounds the time to notice a death
_LIVENESS_S = 2.0  # how often its HTTP front end is asked /v2/health/live (1 s timeout each)


@dataclass(frozen=True, kw_only=True)
class RestartPolicy:
    """When to restart a dead server, and when to stop trying."""

    max_restarts: int = 5  # restarts allowed within window_s; one more death ends `hps serve`
    window_s: float = 600.0  # the sliding window over which restarts are counted
    backoff_s: float = 1.0  # wait before the first restart of a window; doubles for each later one
    backoff_max_s: float = 30.0  # the longest wait
    # A running server whose /v2/health/live has not answered for this long is hung: killed and
    # restarted. Long enough for a stalled moment (a model loading, swap); 0 turns it off.
    hang_s: float = 60.0

    def delay(self, recent: int) -> float:
        """Seconds to wait before a restart, given ``recent`` restarts already in the window."""
        return float(min(self.backoff_max_s, self.backoff_s * 2.0 ** recent))


class ServeMetrics:
    """The supervisor's counters, rendered as Prometheus text (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._restarts: Counter[str] = Counter()
        self._up = 0

    def count_restart(self, cause: str) -> None:
        with self._lock:
            self._restarts[cause] += 1

    def set_up(self, up: bool) -> None:
        with self._lock:
            self._up = int(up)

    def restarts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._restarts)

    def render(self) -> str:
        """Prometheus text exposition of both families."""
        with self._lock:
            restarts, up = sorted(self._restarts.items()), self._up
        lines = [
            "# HELP hps_serve_restarts_total Triton restarts by hps serve, by the cause of the death",
            "# TYPE hps_serve_restarts_total counter",
            *(f'hps_serve_restarts_total{{cause="{cause}"}} {n}' for cause, n in restarts),
            "# HELP hps_serve_up 1 while Triton is serving, 0 while hps serve restarts it",
            "# TYPE hps_serve_up gauge",
            f"hps_serve_up {up}",
        ]
        return "\n".join(lines) + "\n"


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

    def run(self, stop: threading.Event) -> int | None:
        """Serve until ``stop`` is set; returns Triton's exit code of the final, requested stop.

        Raises :class:`ServingError` when the first start fails (a configuration error is not
        retried) or when the server dies once more than the policy allows.
        """
        adopt_orphans()
        self.server.start()
        self._serving()
        while not stop.wait(_POLL_S):
            death = self._death()
            if death is None:
                self._sync_repository()
            elif not self._recover(death, stop):
                break
        self.metrics.set_up(False)
        return self.server.stop()

    def _serving(self) -> None:
        self._live_at = time.monotonic()
        self.metrics.set_up(True)
        self.on_ready(self.server)

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
        if len(self._restarts) >= self.policy.max_restarts:
            raise ServingError(
                f"tritonserver died ({death.describe()}) after {len(self._restarts)} restarts within "
                f"{self.policy.window_s:.0f} s: restart limit reached (--max-restarts "
                f"{self.policy.max_restarts}), not restarting. Triton's last errors:{errors}"
            )
        delay = self.policy.delay(len(self._restarts))
        self._restarts.append(now)
        self.metrics.count_restart(death.cause)
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
