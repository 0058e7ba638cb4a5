"""A real Triton server, started once per test session, over tests/e2e/models.py's repository."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.models import E2EModels, build_models


@pytest.fixture(scope="session")
def e2e_models(tmp_path_factory: pytest.TempPathFactory) -> E2EModels:
    return build_models(tmp_path_factory.mktemp("e2e"))


@pytest.fixture(scope="session")
def triton(e2e_models: E2EModels) -> Iterator[object]:
    from hps_core.serving import TritonServer

    server = TritonServer(
        e2e_models.repository,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        backend_config=[f"hps,ps={e2e_models.hps_json}"],
    )
    with server:
        yield server


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, triton: object) -> object:
    from hps_demo.client import make_client

    url = triton.http_url if request.param == "http" else triton.grpc_url
    return make_client(request.param, url)
