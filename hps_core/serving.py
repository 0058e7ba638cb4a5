"""Launch and supervise a real Triton Inference Server binary serving HPS models.

No Triton Python package is imported here: the server is the ``tritonserver`` binary from the
bundle that ``scripts/setup.sh`` extracts into ``.venv/triton`` (from the nvidia-pytriton
0.7.0 wheel, Triton 2.51), or any Triton install named by ``HPS_TRITON_HOME`` (for example
``/opt/tritonserver`` in NVIDIA's container).

What this module arranges so that Python-based backends work:

* a staging backend directory: ``python/`` (``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and the stub built for *this* Python version) and one
  folder per Python-based backend (``hps/model.py``, ``dlrm/model.py``, found in the installed
  ``backend`` package); a model selects one with ``backend: "hps"`` in its config.pbtxt;
* ``LD_LIBRARY_PATH`` with the bundle's libraries (the stub's RPATH is relative and breaks
  once copied: the model load then hangs instead of failing) and the interpreter's LIBDIR
  (so the stub embeds the same libpython as the venv);
* ``PATH`` with this interpreter's ``bin/`` first: the stub runs ``python3`` from PATH, which
  is how the models see the venv's packages;
* on a machine without GPU, a staged copy of the model repository whose ``KIND_GPU`` instance
  groups are rewritten to ``KIND_CPU`` (Triton otherwise fails those models).

And so that a stop leaves nothing behind and runs every model's ``finalize``:

* explicit model control (``--load-model=*``): :meth:`TritonServer.stop` unloads every model
  through the repository API before SIGTERM, because Triton's own graceful exit spends its
  ``--exit-timeout-secs`` waiting for idle keep-alive HTTP clients and then kills the stubs
  without ``finalize``. Explicit control would let any client load a model (with its files
  in the request: code execution), so the repository API always requires the header
  :data:`API_TOKEN_HEADER`: the caller's token, or a random one only this object knows;
* the whole process group is SIGKILLed after Triton exits: its Python stubs outlive a crashed
  or killed server and ignore SIGTERM; then its ``/dev/shm`` regions and staging folder go.

Use :class:`TritonServer` as a context manager; ``hps serve`` wraps it for the command line and
restarts it when it dies (:mod:`hps_core.supervisor`).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import json
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from hps_core.errors import HPSError, ServingError
from hps_core.repository import (
    HPS_JSON,
    PS_ENV,
    hps_models,
    link_to,
    pbtxt_string_parameter,
    served_file,
    stage_model_repository,
    sync_model_repository,
    version_numbers,
)

__all__ = [
    "API_TOKEN_ENV",
    "API_TOKEN_HEADER",
    "GRPC_API_TOKEN_HEADER",
    "ServerExit",
    "TritonBundle",
    "TritonServer",
    "find_bundle",
    "find_python_backends",
    "backend_config_environment",
    "free_port",
    "gpu_count",
    "group_processes",
    "kill_group",
    "remove_orphaned_staging",
    "server_environment",
    "stage_backend_directory",
]

log = logging.getLogger(__name__)

#: Environment variable naming a Triton install to use instead of ``.venv/triton``.
TRITON_HOME_ENV = "HPS_TRITON_HOME"
#: Triton's CUDA memory pool per GPU. Its 64 MB default is too small for large lookups
#: (PLATFORM.md: the stub died on a 32 MB output with 2 concurrent requests).
DEFAULT_CUDA_POOL_BYTES = 512 * 1024 * 1024
_SHM_DIR = Path("/dev/shm")
#: Environment variable holding the token for model control and shared-memory registration.
API_TOKEN_ENV = "HPS_API_TOKEN"
#: HTTP header that carries the token.
API_TOKEN_HEADER = "hps-api-token"
#: gRPC metadata key that carries it: Triton prefixes the key of --grpc-restricted-protocol.
GRPC_API_TOKEN_HEADER = f"triton-grpc-protocol-{API_TOKEN_HEADER}"
# Triton's names of the APIs a token guards; its value is also the header value's alphabet
# (Triton parses `<apis>:<header>=<value>`, so no ':', '=' or ',' in it).
_RESTRICTED_APIS = ("model-repository", "shared-memory")
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]{16,}")


# --------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class TritonBundle:
    """Paths of one Triton install: the server, the Python backend and its libraries."""

    home: Path
    server: Path
    python_backend: Path  # folder holding libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for the running Python version
    lib_dirs: tuple[Path, ...]


def _default_homes() -> list[Path]:
    """Candidate Triton homes, most specific first."""
    if env := os.environ.get(TRITON_HOME_ENV):
        return [Path(env)]
    return [
        Path(sys.prefix) / "triton",  # .venv/triton, built by scripts/setup.sh
        Path(__file__).resolve().parent.parent / ".venv" / "triton",  # another venv, same checkout
        Path("/opt/tritonserver"),  # NVIDIA's container
    ]


def _find_stub(home: Path, python_backend: Path) -> Path | None:
    """The stub for this Python: pytriton ships one per version, the container one beside the backend."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (
        home / "python_backend_stubs" / version / "triton_python_backend_stub",
        python_backend / "triton_python_backend_stub",
    ):
        if candidate.is_file():
            return candidate
    return None


def _bundle_at(home: Path) -> TritonBundle | None:
    """Describe the Triton install at ``home``, or None when it is incomplete."""
    server = home / "bin" / "tritonserver"
    python_backend = home / "backends" / "python"
    if not (server.is_file() and (python_backend / "libtriton_python.so").is_file()):
        return None
    stub = _find_stub(home, python_backend)
    if stub is None:
        return None
    # .venv/triton/lib (setup.sh), or an installed wheel's site-packages/nvidia_pytriton.libs.
    libs = [d for d in (home / "lib", home.parent.parent / "nvidia_pytriton.libs") if d.is_dir()]
    return TritonBundle(home, server, python_backend, stub, tuple(libs))


def find_bundle(home: str | Path | None = None) -> TritonBundle:
    """Locate the Triton install: ``home``, else ``$HPS_TRITON_HOME``, else ``.venv/triton``."""
    homes = [Path(home)] if home is not None else _default_homes()
    for candidate in homes:
        if bundle := _bundle_at(candidate):
            return bundle
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    raise ServingError(
        f"no Triton server found in {', '.join(str(h) for h in homes)} (need bin/tritonserver, "
        f"backends/python/libtriton_python.so and a Python {version} backend stub); "
        f"run scripts/setup.sh or set {TRITON_HOME_ENV}"
    )


def find_python_backends() -> dict[str, Path]:
    """Python-based backends of the installed ``backend`` package: ``{name: .../<name>/model.py}``."""
    spec = importlib.util.find_spec("backend")
    if spec is None or not spec.submodule_search_locations:
        log.debug("no 'backend' package installed: only the plain python backend is staged")
        return {}
    found: dict[str, Path] = {}
    for location in spec.submodule_search_locations:
        for model_py in sorted(Path(location).glob("*/model.py")):
            found.setdefault(model_py.parent.name, model_py.resolve())
    return found


def gpu_count() -> int:
    """Number of NVIDIA GPUs usable here (0 when nvidia-smi is missing or fails)."""
    if os.environ.get("HPS_FORCE_CPU") == "1":
        return 0
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        # Containers sometimes expose the device without the tool.
        return len(list(Path("/dev").glob("nvidia[0-9]*")))
    try:
        out = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it; another process may race for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- staging
def stage_backend_directory(
    bundle: TritonBundle, dest: Path, python_backends: Mapping[str, Path]
) -> Path:
    """Build ``dest`` as Triton's ``--backend-directory``; returns ``dest``.

    ``python_backends`` maps a backend name to its ``model.py``. The stub is placed beside
    ``libtriton_python.so`` because that is where the Python backend looks for it.
    """
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    # A copy, not a symlink: for a Python-based backend, Triton resolves the library's real
    # path and refuses one outside the backend folder ("... escapes backend directory").
    shutil.copy2(bundle.python_backend / "libtriton_python.so", python_dir / "libtriton_python.so")
    link_to(bundle.python_backend / "triton_python_backend_utils.py", python_dir / "triton_python_backend_utils.py")
    link_to(bundle.stub, python_dir / "triton_python_backend_stub")
    for name, model_py in python_backends.items():
        if name == "python":
            raise ServingError(f"a Python-based backend may not be named 'python' ({model_py})")
        link_to(Path(model_py), dest / name / "model.py")
    return dest


_POOL_REQUESTS_IN_FLIGHT = 4  # a request's KEYS and OUTPUT0, for a few requests at once


def cuda_pool_bytes(repository: Path, backend_config: Sequence[str] = ()) -> int:
    """Triton's CUDA memory pool per GPU, sized for the HPS models of ``repository``.

    The largest request an HPS model accepts is ``max_batch_size`` samples of
    ``maxnum_catfeature_query_per_table_per_sample`` keys per table: its KEYS (8 bytes a key)
    and OUTPUT0 (4 bytes a float) must fit in the pool, for a few requests in flight, or
    Triton moves GPU tensors through host memory (and the stub fails, see PLATFORM.md).
    """
    from hps_core.config import load_config  # local: the launcher itself needs no config

    largest = 0
    for path in _hps_config_paths(repository, backend_config):
        try:
            config = load_config(path)
        except HPSError as exc:  # the model's load reports it; size for what can be read
            log.warning("sizing the CUDA memory pool: %s", exc)
            continue
        for model in config.models:
            keys = sum(model.maxnum_catfeature_query_per_table_per_sample) * model.max_batch_size
            floats = sum(t.max_keys_per_sample * t.dim for t in model.tables) * model.max_batch_size
            largest = max(largest, 8 * keys + 4 * floats)
    return max(DEFAULT_CUDA_POOL_BYTES, _POOL_REQUESTS_IN_FLIGHT * largest)


def _hps_config_paths(repository: Path, backend_config: Sequence[str]) -> list[Path]:
    """The HPS JSON of every version of every HPS model of ``repository``, as the backend
    picks it (:func:`hps_core.repository.served_file`)."""
    default = backend_config_environment(backend_config).get(PS_ENV)  # as the stubs get it: absolute
    paths = []
    for folder, text in hps_models(repository):
        parameter = pbtxt_string_parameter(text, "hps_config")
        versions: list[int | None] = [*version_numbers(folder)] or [None]
        for version in versions:
            path = served_file(folder, version, HPS_JSON, parameter, default)
            if path is not None and path.is_file() and path not in paths:
                paths.append(path)
    return paths


_STAGING_PREFIX = "hps-triton-"  # a started server's staging folder, in the temp folder
_STAGING_OWNER = ".owner"  # in it: "<pid> <start time>" of the process that staged it


def _claim_staging(folder: Path) -> None:
    from hps_core.db.shm_store import this_process  # (pid, start): a reused pid is not its owner

    pid, start = this_process()
    (folder / _STAGING_OWNER).write_text(f"{pid} {start}\n")


def remove_orphaned_staging(root: Path | None = None) -> list[Path]:
    """Remove the staging folders (``hps-triton-*`` under ``root``, default the temp folder)
    whose owner process is gone: a ``TritonServer`` killed with SIGKILL (``hps serve`` included)
    cannot remove its own, and every start would leave another behind. Folders of live owners,
    and those naming no owner, are left alone. Returns the folders removed."""
    from hps_core.db.shm_store import alive

    removed = []
    for folder in sorted(Path(root or tempfile.gettempdir()).glob(f"{_STAGING_PREFIX}*")):
        try:
            pid, start = (int(field) for field in (folder / _STAGING_OWNER).read_text().split())
        except (OSError, ValueError):
            continue
        if not alive(pid, start):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d staging folder(s) of servers that are gone: %s", len(removed),
                 ", ".join(str(f) for f in removed))
    return removed


def server_environment(bundle: TritonBundle, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for ``tritonserver`` so the Python stub finds its libraries and the venv."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR")
    lib_dirs = [str(d) for d in bundle.lib_dirs] + ([libdir] if libdir else [])
    env["LD_LIBRARY_PATH"] = _prepend_paths(lib_dirs, env.get("LD_LIBRARY_PATH"))
    # Not resolved: in a venv, bin/python is a symlink and only its folder has pyvenv.cfg.
    env["PATH"] = _prepend_paths([str(Path(sys.executable).parent)], env.get("PATH"))
    return env


def backend_config_environment(entries: Iterable[str]) -> dict[str, str]:
    """``<backend>,<key>=<value>`` entries as ``<BACKEND>_BACKEND_CONFIG_<KEY>`` variables.

    Triton hands ``--backend-config`` only to C++ backends; a Python-based backend's model
    never sees it. The server's environment is inherited by the Python stubs, so this is how
    ``backend/hps/model.py`` reads HugeCTR's ``--backend-config=hps,ps=PATH`` (as
    ``HPS_BACKEND_CONFIG_PS``). A value naming an existing relative path is made absolute.
    """
    env: dict[str, str] = {}
    for entry in entries:
        backend, sep, setting = entry.partition(",")
        key, eq, value = setting.partition("=")
        if not (sep and eq and backend and key):
            raise ServingError(f"backend config {entry!r}: expected BACKEND,KEY=VALUE (e.g. hps,ps=/path/hps.json)")
        if value and not os.path.isabs(value) and os.path.exists(value):
            value = os.path.abspath(value)
        env[_env_name(f"{backend}_BACKEND_CONFIG_{key}")] = value
    return env


def _env_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", text).upper()


def _prepend_paths(first: Iterable[str], rest: str | None) -> str:
    parts = list(dict.fromkeys([*first, *(rest.split(os.pathsep) if rest else [])]))
    return os.pathsep.join(p for p in parts if p)


# --------------------------------------------------------------------------- the server
def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the server when its parent dies, so a crashed test leaves none."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class ServerExit:
    """Why a tritonserver process ended: read before :meth:`TritonServer.stop` cleans up."""

    cause: str  # metric label: the signal's name ("SIGSEGV"), "exit_<code>" or "start_failed"
    code: int | None  # the process's return code (negative: killed by that signal)
    errors: tuple[str, ...]  # Triton's error lines from its log

    def describe(self) -> str:
        """One line for a log: the cause and the return code."""
        return self.cause if self.code is None else f"{self.cause} (return code {self.code})"


def exit_cause(code: int) -> str:
    """``"SIGSEGV"`` for a process killed by SIGSEGV (code -11), else ``"exit_<code>"``."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
        return f"signal_{-code}"
    return f"exit_{code}"


class TritonServer:
    """A ``tritonserver`` process serving one model repository.

    Ports given as 0 are picked free at the first :meth:`start` and kept for later starts.
    Every endpoint listens on ``host``, HTTP on ``http_host`` when given: :meth:`start` and
    :meth:`stop` talk to it, so it cannot be turned off, only kept on loopback.
    ``backend_config`` entries are Triton's ``<backend>,<key>=<value>`` strings
    (``"hps,ps=/path/hps.json"``). ``python_backends`` overrides the Python-based backends to
    stage (default: every ``backend/<name>/model.py`` of the installed ``backend`` package).
    ``gpu=None`` detects. ``exit_timeout`` is Triton's ``--exit-timeout-secs``;
    ``stop_timeout`` how long :meth:`stop` waits for the models to unload, and then after
    SIGTERM before SIGKILL (default ``exit_timeout + 15``). ``api_token``: clients must send
    it in the :data:`API_TOKEN_HEADER` header (:data:`GRPC_API_TOKEN_HEADER` over gRPC) for
    model control and shared-memory registration; without one, model control is refused to every client and
    shared-memory registration is open (Triton's default). An ``extra_args`` entry
    ``--model-control-mode=...`` replaces explicit control (stop then unloads only when it is
    ``explicit``).
    """

    def __init__(
        self,
        model_repository: str | Path,
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        host: str = "127.0.0.1",
        http_host: str | None = None,
        backend_config: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        log_file: str | Path | None = None,
        log_verbose: int = 0,
        python_backends: Mapping[str, Path] | None = None,
        gpu: bool | None = None,
        cuda_memory_pool_byte_size: int | None = None,
        triton_home: str | Path | None = None,
        startup_timeout: float = 120.0,
        exit_timeout: int = 10,
        stop_timeout: float | None = None,
        die_with_parent: bool = True,
        api_token: str | None = None,
        reserved_ports: Sequence[int] = (),
    ) -> None:
        self.model_repository = Path(model_repository).absolute()
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        # ports the caller will bind itself (hps serve's HTTP guard, its metrics): a free port
        # picked for an endpoint left at 0 is none of them, nor another endpoint's
        self.reserved_ports = frozenset(reserved_ports)
        # Per endpoint: HTTP may stay on loopback while gRPC is exposed (docs/deployment.md).
        self.hosts = {"http": http_host or host, "grpc": host, "metrics": host}
        self.backend_config = list(backend_config)
        self.extra_args = list(extra_args)
        self.log_file = Path(log_file).absolute() if log_file is not None else None
        self.log_verbose = log_verbose
        self.python_backends = python_backends
        self.gpu = gpu
        self.cuda_memory_pool_byte_size = cuda_memory_pool_byte_size
        self.triton_home = triton_home
        self.startup_timeout = startup_timeout
        # Triton's graceful exit waits this long for in-flight requests *and* for open HTTP
        # connections: an idle keep-alive client holds it for the whole period, after which
        # it exits with code 1. Triton's own default is 30 s.
        self.exit_timeout = exit_timeout
        self.stop_timeout = stop_timeout if stop_timeout is not None else exit_timeout + 15.0
        # PR_SET_PDEATHSIG fires when the *thread* that started the server exits: turn it off
        # when starting from a short-lived thread.
        self.die_with_parent = die_with_parent
        if api_token is not None and not _TOKEN.fullmatch(api_token):
            raise ServingError(
                "the API token must be at least 16 characters from A-Z a-z 0-9 . _ ~ + / - "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        self.api_token = api_token
        self._control_token = api_token or secrets.token_urlsafe(32)
        self.process: subprocess.Popen[bytes] | None = None
        self.staging: Path | None = None
        self.served_repository: Path | None = None
        self.cpu_rewritten_models: list[str] = []
        self._shm_prefix = ""

    # ---- addresses
    def _client_host(self, kind: str) -> str:
        host = self.hosts[kind]
        return "127.0.0.1" if host in ("0.0.0.0", "") else host

    @property
    def urls(self) -> dict[str, str]:
        """``host:port`` of the HTTP, gRPC and metrics endpoints (what tritonclient takes)."""
        return {kind: f"{self._client_host(kind)}:{port}" for kind, port in self.ports.items()}

    @property
    def http_url(self) -> str:
        return self.urls["http"]

    @property
    def grpc_url(self) -> str:
        return self.urls["grpc"]

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus endpoint."""
        return f"http://{self.urls['metrics']}/metrics"

    @property
    def log_path(self) -> Path | None:
        """Where the server's output goes (the staging folder unless ``log_file`` was given)."""
        if self.log_file is not None:
            return self.log_file
        return self.staging / "tritonserver.log" if self.staging else None

    @property
    def shm_prefix(self) -> str:
        """Name prefix of this start's ``/dev/shm`` regions (a new one at each start)."""
        return self._shm_prefix

    @property
    def control_token(self) -> str:
        """The value of the token header this server's repository API takes (the API token, or
        one made up for ``hps serve``'s own calls when clients get none)."""
        return self._control_token

    @property
    def control_mode(self) -> str:
        """Triton's ``--model-control-mode``: ``explicit`` unless ``extra_args`` says otherwise."""
        modes = [a.partition("=")[2] for a in self.extra_args if a.startswith("--model-control-mode=")]
        return modes[-1] if modes else "explicit"

    # ---- lifecycle
    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> TritonServer:
        """Stage, launch, and wait until ``/v2/health/ready`` answers 200."""
        if self.process is not None:
            raise ServingError("server already started")
        if not self.model_repository.is_dir():
            raise ServingError(f"model repository {self.model_repository} does not exist or is not a folder")
        bundle = find_bundle(self.triton_home)
        remove_orphaned_staging()
        self.staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX))
        _claim_staging(self.staging)
        # A new prefix per start: regions a dead predecessor left can never be taken for ours.
        self._shm_prefix = f"hps_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        try:
            command = self._prepare(bundle)
            env = server_environment(bundle)
            env.update(backend_config_environment(self.backend_config))
            env.pop(API_TOKEN_ENV, None)  # Triton gets it on its command line; its stubs need none
            self._launch(command, env)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _prepare(self, bundle: TritonBundle) -> list[str]:
        """Stage the backend folder and (without GPU) the repository; build the command line."""
        assert self.staging is not None
        gpus = gpu_count() if self.gpu is None else (1 if self.gpu else 0)
        self.gpu = gpus > 0
        backends = find_python_backends() if self.python_backends is None else dict(self.python_backends)
        backend_dir = stage_backend_directory(bundle, self.staging / "backends", backends)
        repository = self.model_repository
        if not self.gpu:
            repository, self.cpu_rewritten_models = stage_model_repository(
                self.model_repository, self.staging / "model_repository"
            )
            if self.cpu_rewritten_models:
                log.warning(
                    "no GPU here: serving %s with instance_group KIND_CPU instead of KIND_GPU",
                    ", ".join(self.cpu_rewritten_models),
                )
        self.served_repository = repository
        self._assign_ports()
        return self._command(bundle, backend_dir, repository, gpus)

    def _assign_ports(self) -> None:
        """A free port for each endpoint left at 0 (kept across restarts): never one named for
        another endpoint or reserved by the caller, which may not be bound yet (a port free
        now was once picked for Triton's HTTP while the test's own metrics port was unbound)."""
        taken = {p for p in self.ports.values() if p} | self.reserved_ports
        for kind, port in self.ports.items():
            while not port or (port in taken and not self.ports[kind]):
                port = free_port(self._client_host(kind))
            taken.add(port)
            self.ports[kind] = port

    def _command(self, bundle: TritonBundle, backend_dir: Path, repository: Path, gpus: int) -> list[str]:
        cmd = [
            str(bundle.server),
            f"--model-repository={repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={self.hosts['http']}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={self.hosts['grpc']}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.hosts['metrics']}",
            f"--metrics-port={self.ports['metrics']}",
            f"--log-verbose={self.log_verbose}",
            f"--exit-timeout-secs={self.exit_timeout}",
            # A known prefix lets stop() remove exactly this server's /dev/shm regions.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            *self._access_args(),
        ]
        if gpus:
            pool = self.cuda_memory_pool_byte_size or cuda_pool_bytes(repository, self.backend_config)
            cmd += [f"--cuda-memory-pool-byte-size={i}:{pool}" for i in range(gpus)]
        else:
            # Without GPU, skip DCGM probing and the pinned host pool (needs a CUDA driver).
            cmd += ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]
        cmd += [f"--backend-config={entry}" for entry in self.backend_config]
        return cmd + self.extra_args

    def _access_args(self) -> list[str]:
        """Explicit model control (so stop can unload) and the header token guarding it."""
        apis = ",".join(_RESTRICTED_APIS if self.api_token else _RESTRICTED_APIS[:1])
        guard = f"{apis}:{API_TOKEN_HEADER}={self._control_token}"
        args = [f"--http-restricted-api={guard}", f"--grpc-restricted-protocol={guard}"]
        if not any(a.startswith("--model-control-mode=") for a in self.extra_args):
            args += ["--model-control-mode=explicit", "--load-model=*"]
        return args

    def _launch(self, command: list[str], env: dict[str, str]) -> None:
        log_path = self.log_path
        assert log_path is not None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s", " ".join(a.replace(self._control_token, "***") for a in command))
        with open(log_path, "ab") as log_handle:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                # Own process group: a Ctrl-C at the terminal reaches us, and we stop it in
                # order; and stop() can kill every stub at once through the group.
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.urls['http']}/v2/health/ready"
        while time.monotonic() < deadline:
            if (code := self.process.poll()) is not None:
                errors = self.error_lines()
                raise ServingError(
                    f"tritonserver exited with code {code} before it was ready"
                    + (":\n" + "\n".join(errors) if errors else "")
                    + f"\n--- last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if _http_ok(url):
                log.info("Triton ready: %s", self.urls)
                return
            time.sleep(0.1)
        raise ServingError(f"tritonserver not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def is_ready(self) -> bool:
        return self.is_running() and _http_ok(f"http://{self.urls['http']}/v2/health/ready")

    def is_live(self) -> bool:
        """Whether the server runs and its HTTP front end answers ``/v2/health/live``."""
        return self.is_running() and _http_ok(f"http://{self.urls['http']}/v2/health/live")

    def metrics_text(self) -> str | None:
        """Triton's Prometheus text now (None when it does not answer within a second)."""
        if not self.is_running():
            return None
        try:
            with _OPENER.open(self.metrics_url, timeout=1.0) as response:
                return bytes(response.read()).decode(errors="replace")
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return None

    def kill(self) -> None:
        """SIGKILL the server's whole process group now (a hung server); :meth:`stop` cleans up."""
        if self.process is not None:
            kill_group(self.process.pid)
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's output (for error messages)."""
        path = self.log_path
        if path is None or not path.is_file():
            return "(no log)"
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def error_lines(self, limit: int = 20) -> list[str]:
        """Triton's error lines, fatal signals and unavailable models, which the tail may have scrolled past."""
        path = self.log_path
        if path is None or not path.is_file():
            return []
        found = [
            line.strip(" |")
            for line in path.read_text(errors="replace").splitlines()
            if _ERROR_LINE.search(line)
        ]
        return found[-limit:]

    def exit_report(self) -> ServerExit | None:
        """How the server ended (None while it runs or before a start); read it before :meth:`stop`."""
        if self.process is None or (code := self.process.poll()) is None:
            return None
        return ServerExit(exit_cause(code), code, tuple(self.error_lines(limit=10)))

    def stop(self) -> int | None:
        """Unload the models, SIGTERM, SIGKILL what is left of the group; clean staging and /dev/shm.

        Safe on a server that already died: its surviving stubs are killed all the same.
        Returns the server's exit code (None if it was never started).
        """
        code = None
        if self.process is not None:
            self._unload_models()
            code = _terminate(self.process, self.stop_timeout)
            log.info("tritonserver exited with code %s", code)
            # Stubs outlive a crashed server, reparented, ignoring SIGTERM, holding RocksDB
            # files and /dev/shm regions: kill them before anything is removed or restarted.
            kill_group(self.process.pid)
        self._remove_shm_regions()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        self.process = None
        self.staging = None
        return code

    def sync_staged_repository(self) -> None:
        """Bring the staged mirror of the repository (served without GPU) in step with the
        original (:func:`sync_model_repository`); nothing to do when the original is served."""
        served = self.served_repository
        # not once stop() removed the staging folder: a sync would create it again
        if served is not None and served != self.model_repository and served.is_dir() and self.model_repository.is_dir():
            sync_model_repository(self.model_repository, served)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the server exits by itself; returns its exit code."""
        if self.process is None:
            raise ServingError("server not started")
        return self.process.wait(timeout)

    def _unload_models(self) -> None:
        """Unload every model through the repository API, so that each runs ``finalize``.

        Triton's graceful exit first waits ``--exit-timeout-secs`` for open HTTP connections;
        an idle keep-alive client uses it all up and the stubs are then killed without
        ``finalize``. Unloading does not wait for connections, only for in-flight requests.
        """
        if self.control_mode != "explicit" or not self.is_running():
            return
        deadline = time.monotonic() + self.stop_timeout
        try:
            for name in self._model_names({"READY"}):
                self._repository_post(f"models/{urllib.parse.quote(name, safe='')}/unload")
            while self.is_running() and time.monotonic() < deadline:
                if not self._model_names({"READY", "UNLOADING"}):
                    return
                time.sleep(0.1)
        except (OSError, ValueError) as exc:  # URLError is an OSError; ValueError: bad JSON
            log.warning("could not unload the models before stopping (%s): finalize may not run", exc)
            return
        if self.is_running():
            log.warning("models still unloading after %.0f s: stopping anyway", self.stop_timeout)

    def _model_names(self, states: set[str]) -> set[str]:
        index = json.loads(self._repository_post("index") or b"[]")
        return {entry["name"] for entry in index if entry.get("state") in states}

    def _repository_post(self, path: str) -> bytes:
        request = urllib.request.Request(
            f"http://{self.urls['http']}/v2/repository/{path}", data=b"{}", method="POST",
            headers={API_TOKEN_HEADER: self._control_token, "Content-Type": "application/json"},
        )
        with _OPENER.open(request, timeout=self.stop_timeout) as response:
            return bytes(response.read())

    def _remove_shm_regions(self) -> None:
        # A killed server (or stub) leaves its 1 MiB-per-instance regions behind.
        if not self._shm_prefix:
            return
        for region in _SHM_DIR.glob(f"{self._shm_prefix}*"):
            with contextlib.suppress(OSError):
                region.unlink()


# Triton's error lines ("E1202 ..."), a model that failed, a fatal signal, a C++ abort.
_ERROR_LINE = re.compile(r"^E\d{4} |UNAVAILABLE:|^Signal \(\d+\) received|terminate called|what\(\):")


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> int:
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("tritonserver ignored SIGTERM for %.0f s: killing it", timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def group_processes(pgid: int) -> dict[int, tuple[str, int]]:
    """Processes of group ``pgid``: ``{pid: (state, parent pid)}`` from ``/proc`` (zombies included)."""
    found: dict[int, tuple[str, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it exited while we looked
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:
            found[int(text.split(" ", 1)[0])] = (fields[0], int(fields[1]))
    return found


def kill_group(pgid: int, timeout: float = 30.0) -> None:
    """SIGKILL every process of group ``pgid`` and wait until none is alive.

    Those that are our children (``hps serve`` adopts orphaned stubs, see
    :func:`hps_core.supervisor.adopt_orphans`) are reaped, so no zombie keeps the group.
    The group id is not reused while a member exists, so this never hits a stranger.
    """
    deadline = time.monotonic() + timeout
    while members := group_processes(pgid):
        for pid, (_, parent) in members.items():
            if parent == os.getpid():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        if all(state == "Z" for state, _ in members.values()):
            return  # dead; their parent (not us) reaps them
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.warning("processes %s of group %d still alive %.0f s after SIGKILL", sorted(members), pgid, timeout)
            return
        time.sleep(0.05)


# No proxies: an http_proxy in the environment must not intercept a loopback health check.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_ok(url: str) -> bool:
    try:
        with _OPENER.open(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False
