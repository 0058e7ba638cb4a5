"""Shared pytest fixtures and marker handling.

Fixtures:
* ``free_port`` — a callable returning a TCP port free right now (``free_port()``).
* ``triton_server`` — session-scoped factory ``triton_server(repo, **kwargs) -> TritonServer``:
  starts a real Triton (ports picked free) on ``repo`` once per distinct arguments, reuses it
  for the rest of the session and stops it at the end. ``kwargs`` go to
  :class:`hps_core.serving.TritonServer` (``backend_config=[...]``, ``python_backends={...}``).
  Use the server's ``http_url`` / ``grpc_url`` / ``metrics_url`` with tritonclient.

Markers (declared in pyproject.toml): ``gpu`` tests are skipped without an NVIDIA GPU, unless
``HPS_EMULATED_GPU=1`` runs them on the emulated device (tests/cuda_emulator: the CUDA
kernels compiled for the CPU behind a CuPy stand-in, installed here before any test module
imports CuPy); ``redis`` tests are skipped without a ``redis-server`` binary; ``triton`` tests
fail loudly when the Triton bundle is missing (run scripts/setup.sh), because hiding that would hide the end-to-end path.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hps_core.serving import TritonServer, free_port as _free_port, gpu_count
from tests import cuda_emulator

if cuda_emulator.enabled():
    cuda_emulator.install()  # before collection imports any test module that imports cupy


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port()`` -> a TCP port on 127.0.0.1 that is free right now."""
    return _free_port


@pytest.fixture(scope="session")
def triton_server() -> Iterator[Callable[..., TritonServer]]:
    """Factory that starts (once per repository and arguments) a Triton server for the session."""
    servers: dict[str, TritonServer] = {}

    def start(model_repository: str | Path, **kwargs: Any) -> TritonServer:
        key = repr((str(Path(model_repository).absolute()), sorted(kwargs.items(), key=lambda kv: kv[0])))
        server = servers.get(key)
        if server is None or not server.is_running():
            kwargs.setdefault("http_port", 0)
            kwargs.setdefault("grpc_port", 0)
            kwargs.setdefault("metrics_port", 0)
            server = TritonServer(model_repository, **kwargs).start()
            servers[key] = server
        return server

    yield start
    for server in servers.values():
        server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests whose hardware or binaries are absent, saying why."""
    no_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi -L lists none)")
    no_redis = pytest.mark.skip(reason="needs redis-server on PATH (scripts/setup.sh installs it)")
    # get_closest_marker, not `in item.keywords`: keywords also hold folder names (tests/gpu/).
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    have_gpu = bool(gpu_items) and (cuda_emulator.enabled() or gpu_count() > 0)  # nvidia-smi only when asked
    have_redis = shutil.which("redis-server") is not None
    for item in gpu_items:
        if not have_gpu:
            item.add_marker(no_gpu)
    for item in items:
        if item.get_closest_marker("redis") and not have_redis:
            item.add_marker(no_redis)
