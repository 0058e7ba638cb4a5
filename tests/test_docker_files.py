"""docker/: the compose file parses and names its services; the Dockerfile copies paths that exist.

No Docker engine runs here (nor in CI): this checks what can be checked without one.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[1] / "docker"
REPO = DOCKER.parent


def test_dockerfile_builds_on_triton_2_51_and_copies_existing_paths() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:24\.10-py3$", text, re.MULTILINE)
    assert "HPS_TRITON_HOME=/opt/tritonserver" in text
    copied = re.findall(r"^COPY (\S+) ", text, re.MULTILINE)
    assert copied and all((REPO / path).exists() for path in copied), copied
    assert '"hps", "serve"' in text


def test_compose_file_parses_with_redis_cluster_kafka_and_server() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis-1", "redis-2", "redis-3", "redis-init", "kafka", "hps-load", "hps"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert all("--cluster-enabled yes" in services[f"redis-{i}"]["command"] for i in (1, 2, 3))
    build = services["hps-load"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    for volume in services["redis-init"]["volumes"]:
        assert (DOCKER / volume.split(":")[0]).is_file()


def test_redis_cluster_init_script_is_valid_sh() -> None:
    done = subprocess.run(["sh", "-n", str(DOCKER / "redis-cluster-init.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
