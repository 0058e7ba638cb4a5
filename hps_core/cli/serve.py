"""``hps serve``: Triton on a model repository, supervised (hps_core/serving.py, hps_core/supervisor.py)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from hps_core.cli import keyword_defaults
from hps_core.errors import ConfigError

__all__ = ["add_serve", "run_serve"]


def add_serve(parser: argparse.ArgumentParser) -> None:
    """Set up ``hps serve``."""
    parser.description = (
            "Start the Triton Inference Server bundled by scripts/setup.sh (or $HPS_TRITON_HOME) "
            "on MODEL_REPOSITORY, with the Python-based backends 'hps' and 'dlrm' available. "
            "Without a GPU, models asking for KIND_GPU instances are served on CPU (a warning "
            "says which). Prints the endpoints once every model is ready, then runs until "
            "SIGINT (Ctrl-C) or SIGTERM, which unload every model (each runs its finalize) and "
            "stop the server (exit code 0). When Triton dies, its process group is killed, its "
            "/dev/shm regions and staging folder removed, and it is started again on the same "
            "ports after a backoff (1 s, doubling), each restart logged with its cause; past "
            "--max-restarts within --restart-window it keeps restarting every --restart-backoff-max with an alarm "
            "(or exits with code 1: --on-restart-limit exit). When a Python stub of a model dies "
            "or hangs (Triton would answer INTERNAL for it forever), the model is unloaded, so it "
            "is not ready, and loaded again, with the ensembles using it. Model control "
            "and shared-memory registration need the header 'hps-api-token: TOKEN' when a token "
            "is given ($HPS_API_TOKEN or --api-token-file); without one, model control is "
            "refused to every client."
        )
    parser.add_argument("--model-repository", required=True, metavar="DIR",
                        help="Triton model repository (one folder per model with a config.pbtxt)")
    server = _server_defaults()
    parser.add_argument("--host", default=server["host"],
                        help="address the endpoints listen on; 0.0.0.0 exposes them on every interface "
                             "(default: %(default)s, this machine only)")
    parser.add_argument("--http-host", metavar="HOST",
                        help="address of the HTTP endpoint alone (default: --host); e.g. --host 0.0.0.0 "
                             "--http-host 127.0.0.1 exposes gRPC but keeps HTTP/JSON, which a crafted request "
                             "crashes in Triton 2.51, on this machine (hps serve itself needs HTTP)")
    parser.add_argument("--http-port", type=int, default=server["http_port"], metavar="N", help="HTTP port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--no-http-guard", dest="http_guard", action="store_false",
                        help="let clients reach Triton's HTTP endpoint directly. By default hps serve's HTTP guard "
                             "(hps_core/http_guard.py) listens on --http-host/--http-port, forwards every request to "
                             "Triton's HTTP on a free loopback port, and refuses (400) JSON inference requests whose "
                             "declared shapes would crash Triton 2.51; it answers 503 while Triton restarts")
    parser.add_argument("--grpc-port", type=int, default=server["grpc_port"], metavar="N", help="gRPC port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=server["metrics_port"], metavar="N",
                        help="Triton's Prometheus metrics port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--serve-metrics-port", type=int, metavar="N",
                        help="serve hps serve's own metrics (hps_serve_restarts_total{cause}, hps_serve_up) "
                             "on this port, at /metrics; 0 picks a free one (default: not served)")
    parser.add_argument("--api-token-file", metavar="FILE",
                        help="file holding the token that model control and shared-memory registration require "
                             "(header hps-api-token); default: $HPS_API_TOKEN if set. Triton gets it on its "
                             "command line, which local users can read (ps)")
    restarts = _restart_defaults()
    from hps_core.supervisor import ON_LIMIT  # lazy, as _restart_defaults
    parser.add_argument("--max-restarts", type=int, default=restarts.max_restarts, metavar="N",
                        help="restarts allowed within --restart-window; 0 never restarts (default: %(default)s)")
    parser.add_argument("--restart-window", type=float, default=restarts.window_s, metavar="SECONDS",
                        help="the sliding window over which restarts are counted (default: %(default)s)")
    parser.add_argument("--restart-backoff", type=float, default=restarts.backoff_s, metavar="SECONDS",
                        help="wait before the first restart in the window, doubled for each later one, "
                             "at most --restart-backoff-max (default: %(default)s)")
    parser.add_argument("--restart-backoff-max", type=float, default=restarts.backoff_max_s, metavar="SECONDS",
                        help="the longest wait before a restart, and the wait between restarts past "
                             "--max-restarts (default: %(default)s)")
    parser.add_argument("--on-restart-limit", choices=ON_LIMIT, default=restarts.on_limit,
                        help="past --max-restarts within --restart-window: 'backoff' keeps restarting, every "
                             "--restart-backoff-max, with an alarm (an ERROR line, the metric "
                             "hps_serve_restart_limit_reached 1), so a client that crashes Triton on purpose cannot "
                             "stop the service; 'exit' gives up with code 1 (default: %(default)s)")
    parser.add_argument("--stub-hang-timeout", type=float, default=restarts.stub_hang_s, metavar="SECONDS",
                        help="a model version with requests pending and no execution completing for this long has a "
                             "hung Python stub: its stubs are killed and the model reloaded, as when a stub dies; "
                             "0 turns the check off (default: %(default)s)")
    parser.add_argument("--hang-timeout", type=float, default=restarts.hang_s, metavar="SECONDS",
                        help="a running Triton whose /v2/health/live stays unanswered this long is killed and "
                             "restarted (cause 'unresponsive'); 0 turns the check off (default: %(default)s)")
    parser.add_argument("--backend-config", action="append", default=[], metavar="BACKEND,KEY=VALUE",
                        help="passed to Triton as --backend-config, e.g. hps,ps=/path/hps.json (repeatable)")
    parser.add_argument("--log-file", metavar="FILE",
                        help="file for Triton's log (default: a file in the staging folder, removed at exit)")
    parser.add_argument("--log-verbose", type=int, default=server["log_verbose"], metavar="N", help="Triton's verbose log level (default: %(default)s)")
    parser.add_argument("--exit-timeout", type=int, default=server["exit_timeout"], metavar="SECONDS",
                        help="how long a stop waits for in-flight requests and open connections (default: %(default)s)")
    parser.add_argument("--startup-timeout", type=float, default=server["startup_timeout"], metavar="SECONDS",
                        help="how long to wait for every model to be ready (default: %(default)s)")
    parser.add_argument("--python-backend", action="append", default=[], metavar="NAME=MODEL_PY",
                        help="stage another Python-based backend: models with backend: \"NAME\" run MODEL_PY "
                             "(repeatable; hps and dlrm come from the installed backend package)")
    parser.add_argument("--triton-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for tritonserver, e.g. --triton-arg=--allow-http=false (repeatable)")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Start the server, print its endpoints, restart it when it dies, stop it on a signal."""
    # lazy: keep `hps --help` fast
    from hps_core.serving import TritonServer, find_python_backends
    from hps_core.supervisor import RestartPolicy, ServeMetrics, Supervisor

    backends = {**find_python_backends(), **_parse_python_backends(args.python_backend)}
    server = TritonServer(
        args.model_repository,
        host=args.host,
        # With the guard, Triton's HTTP is on a free loopback port and the guard on the user's.
        http_host="127.0.0.1" if args.http_guard else args.http_host,
        http_port=0 if args.http_guard else args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        backend_config=args.backend_config,
        extra_args=args.triton_arg,
        log_file=args.log_file,
        log_verbose=args.log_verbose,
        exit_timeout=args.exit_timeout,
        startup_timeout=args.startup_timeout,
        python_backends=backends,
        api_token=_api_token(args.api_token_file),
        # the guard's and hps serve's own ports, which a port picked for Triton must not take
        reserved_ports=(args.http_port, args.serve_metrics_port),
    )
    policy = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window, backoff_s=args.restart_backoff,
                           backoff_max_s=args.restart_backoff_max, hang_s=args.hang_timeout,
                           on_limit=args.on_restart_limit, stub_hang_s=args.stub_hang_timeout)
    metrics = ServeMetrics()
    stop_requested = threading.Event()
    with _stop_on_signals(stop_requested), _metrics_endpoint(metrics, args.host, args.serve_metrics_port) as endpoint, \
            _keeping_host_stores(), _http_guard(args, server) as guard:
        supervisor = Supervisor(server, policy, metrics, on_ready=lambda s: _print_ready(s, endpoint, guard))
        code = supervisor.run(stop_requested)
    if code not in (0, None):
        # Still a clean stop on request: Triton returns 1 when its exit timeout expired
        # (for instance, a client kept an idle connection open).
        print(f"hps serve: tritonserver exited with code {code} (exit timeout expired?)", file=sys.stderr)
    print("hps serve: stopped", flush=True)
    return 0


@contextlib.contextmanager
def _keeping_host_stores() -> Iterator[None]:
    """Tell the stubs they are supervised (backend/stub_watchdog.py), and keep the host stores
    Triton's models create for as long as ``hps serve`` runs, so a stub
    crash or a Triton restart re-attaches instead of reloading (the stubs inherit the keeper's
    pid through the environment), and remove them once Triton is gone, so nothing stays in
    /dev/shm after a stop."""
    from hps_core.db.shm_store import KEEPER_ENV, remove_kept_stores

    from hps_core.stub_watch import SUPERVISED_ENV

    os.environ[KEEPER_ENV] = str(os.getpid())
    # The supervisor reloads a model whose stub died: the backends' own watchdog stays off.
    os.environ[SUPERVISED_ENV] = str(os.getpid())
    try:
        yield
    finally:
        removed = remove_kept_stores(os.getpid())
        if removed:
            print(f"hps serve: removed {len(removed)} host store file(s) from /dev/shm", flush=True)


def _server_defaults() -> dict[str, Any]:
    """TritonServer's keyword defaults, which are the server options' defaults."""
    from hps_core.serving import TritonServer  # lazy: keep `hps --help` fast

    return keyword_defaults(TritonServer)


def _restart_defaults() -> Any:
    """The default RestartPolicy, whose fields are the restart options' defaults."""
    from hps_core.supervisor import RestartPolicy  # lazy: keep `hps --help` fast

    return RestartPolicy()


def _api_token(path: str | None) -> str | None:
    """The token from ``path`` (whitespace around it stripped), else ``$HPS_API_TOKEN``, else None."""
    from hps_core.model_control import api_token

    return api_token(path)


def _metrics_endpoint(metrics: Any, host: str, port: int | None) -> contextlib.AbstractContextManager[Any]:
    from hps_core.supervisor import MetricsEndpoint

    return contextlib.nullcontext() if port is None else MetricsEndpoint(metrics, host, port)


def _parse_python_backends(entries: Sequence[str]) -> dict[str, Path]:
    backends: dict[str, Path] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        model_py = Path(path).absolute()
        if not sep or not name or not model_py.is_file():
            raise ConfigError(f"--python-backend {entry!r}: expected NAME=PATH with PATH an existing model.py")
        backends[name] = model_py
    return backends


def _http_guard(args: argparse.Namespace, server: Any) -> contextlib.AbstractContextManager[Any]:
    """The HTTP guard on the user's HTTP address, forwarding to wherever Triton's HTTP is now
    (it outlives Triton's restarts); nothing with --no-http-guard."""
    if not args.http_guard:
        return contextlib.nullcontext()
    from hps_core.http_guard import HttpGuard

    return HttpGuard(args.http_host or args.host, args.http_port, lambda: server.urls["http"])


def _print_ready(server: Any, endpoint: Any, guard: Any = None) -> None:
    urls = server.urls
    lines = [
        f"hps serve: Triton ready (pid {server.process.pid})",
        f"  HTTP     {guard.url if guard is not None else urls['http']}",
        f"  gRPC     {urls['grpc']}",
        f"  metrics  {server.metrics_url}",
        f"  log      {server.log_path}",
    ]
    if guard is not None:
        lines.append(f"  guarded  {urls['http']} (Triton's own HTTP, loopback: the HTTP guard forwards to it)")
    if endpoint is not None:
        lines.append(f"  restarts {endpoint.url}")
    if server.cpu_rewritten_models:
        lines.append(f"  on CPU instead of GPU: {', '.join(server.cpu_rewritten_models)}")
    print("\n".join(lines), flush=True)


class _stop_on_signals:
    """Within the block, SIGINT and SIGTERM set ``event`` instead of killing the process."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.event.set()

    def __enter__(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
