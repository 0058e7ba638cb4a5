"""A retired model version's shared GPU cache is removed (``hps models unload``, publish-model's
drop: :func:`hps_core.cache.remove_unused_gpu_caches`) even though ``hps serve`` keeps it, never
while a process still maps it, and its keeper then frees the GPU memory and goes."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hps_core.cache import SharedName, make_multi_table_cache, remove_unused_gpu_caches
from hps_core.cache.shared_gpu import list_caches
from hps_core.db import shm_store

pytestmark = pytest.mark.gpu


def _keeper_running(path: Path) -> bool:
    """Whether a GPU keeper of ``path`` still runs (found by its command line)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"hps_core.cache.gpu_keeper" in cmd and str(path).encode() in cmd:
                return True
    return False


@pytest.fixture()
def namespace() -> Iterator[str]:
    yield f"test-retire-{uuid.uuid4().hex[:10]}"


def test_a_retired_versions_cache_is_removed_under_a_keeping_hps_serve_but_not_while_mapped(
        namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    serve = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        monkeypatch.setenv(shm_store.KEEPER_ENV, str(serve.pid))  # as hps serve names itself
        caches = {entry: make_multi_table_cache("dynamic", device=0, capacities=[64], dims=[4],
                                                shared=SharedName(namespace, entry))
                  for entry in ("m", "m_v2")}
        keys = np.arange(8, dtype=np.int64)
        caches["m_v2"].replace_tables(np.zeros(8, np.int64), keys, np.ones(32, np.float32),
                                      np.arange(8, dtype=np.int64) * 4)
        paths = {info.name: Path(info.path) for info in list_caches(namespace)}
        assert sorted(paths) == ["m", "m_v2"]
        assert remove_unused_gpu_caches(lambda entry: entry == "m_v2", namespace) == []  # still mapped
        caches["m_v2"].close()
        assert paths["m_v2"].exists()  # hps serve keeps it past its last user ...
        assert remove_unused_gpu_caches(lambda entry: entry == "m_v2", namespace) == [str(paths["m_v2"])]
        end = time.monotonic() + 10  # ... until its version is retired: the keeper goes too
        while _keeper_running(paths["m_v2"]) and time.monotonic() < end:
            time.sleep(0.05)
        assert not paths["m_v2"].exists() and not _keeper_running(paths["m_v2"])
        assert paths["m"].exists() and [info.name for info in list_caches(namespace)] == ["m"]  # the other version's
        caches["m"].close()
        assert shm_store.remove_kept_stores(serve.pid) == [str(paths["m"])]  # hps serve's clean stop
    finally:
        serve.kill()
        serve.communicate()
    end = time.monotonic() + 10
    while any(_keeper_running(p) for p in paths.values()) and time.monotonic() < end:
        time.sleep(0.05)
    assert not shm_store.namespace_dir(namespace).exists()
    assert not any(_keeper_running(p) for p in paths.values())
