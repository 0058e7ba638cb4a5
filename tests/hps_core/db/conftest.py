"""Fixtures for the storage-tier tests: every implementation, for real.

``tier`` yields each implementation of the EmbeddingTier contract in turn; RocksDB runs on
a real database in ``tmp_path`` (never a stand-in). ``make_tier`` builds one by name with
keyword overrides, for tests that need specific settings.

The host store (``host_store``) runs in the real /dev/shm, in a namespace of its own per tier
that its close removes. The Redis tiers (``redis_cluster``: a 3-node cluster, ``redis_single``: one server) run
against real ``redis-server`` processes started once per session (``redis_servers``, see
tests/redis_servers.py) and emptied with FLUSHALL before each tier is built; their
parameters are marked ``redis`` and skipped when redis-server is not installed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hps_core.config import PersistentDBConfig, RedisConfig, VolatileDBConfig
from hps_core.db import (
    EmbeddingTier,
    HashMapVolatileDB,
    RedisClusterVolatileDB,
    RedisVolatileDB,
    RocksDBPersistentDB,
    SharedHashMapVolatileDB,
)
from tests.redis_servers import RedisProcesses

IMPLEMENTATIONS = (
    "hash_map",
    "host_store",
    "rocks_db",
    pytest.param("redis_cluster", marks=pytest.mark.redis),
    pytest.param("redis_single", marks=pytest.mark.redis),
)
REDIS_KINDS = ("redis_cluster", "redis_single")

TierFactory = Callable[..., Any]


def _encode(keys: np.ndarray, dim: int) -> np.ndarray:
    """(n, dim) float32 vectors that encode their key, so any mix-up is visible.

    Column 0 holds the key's low 24 bits (exact in float32), column c adds c, and a second
    word of the key (bits 24..47) goes into column 1 when there is one.
    """
    keys = np.asarray(keys).astype(np.int64)
    low = (keys & 0xFFFFFF).astype(np.float32)
    rows = low[:, None] + np.arange(dim, dtype=np.float32)
    if dim > 1:
        rows[:, 1] = ((keys >> 24) & 0xFFFFFF).astype(np.float32)
    return np.ascontiguousarray(rows, dtype=np.float32)


@pytest.fixture
def encode() -> Callable[[np.ndarray, int], np.ndarray]:
    """The key → vector encoding of these tests (a fixture: conftest is not imported)."""
    return _encode


@pytest.fixture(scope="session")
def redis_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RedisProcesses]]:
    """Started on first use, stopped at the end of the session: "redis_cluster" → a 3-node
    cluster, "redis_single" → one server (each call of ``get`` starts what is missing)."""
    started: dict[str, RedisProcesses] = {}
    yield started
    for processes in started.values():
        processes.stop()


@pytest.fixture
def redis_for(
    redis_servers: dict[str, RedisProcesses], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], RedisProcesses]:
    """``redis_for("redis_cluster" | "redis_single")`` → the session's running servers, emptied."""

    def get(kind: str) -> RedisProcesses:
        processes = redis_servers.get(kind)
        if processes is None or not all(s.is_running() for s in processes.servers):
            if processes is not None:
                processes.stop()
            folder = tmp_path_factory.mktemp(kind)
            if kind == "redis_cluster":
                processes = RedisProcesses.cluster(folder, nodes=3)
            else:
                processes = RedisProcesses.single(folder)
            redis_servers[kind] = processes
        processes.flushall()
        return processes

    return get


@pytest.fixture
def make_tier(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TierFactory]:
    made: list[Any] = []

    def factory(kind: str, **fields: Any) -> Any:
        """``fields``: fields of the tier's config section (``num_partitions=8``, ...)."""
        if kind == "hash_map":
            db: Any = HashMapVolatileDB(VolatileDBConfig(**{"num_partitions": 4, **fields}))
        elif kind == "host_store":  # in the real /dev/shm, a namespace of its own per tier
            name = f"test-{uuid.uuid4().hex[:12]}"
            db = SharedHashMapVolatileDB(VolatileDBConfig(**{"num_partitions": 4, "shared_memory_name": name,
                                                             **fields}))
        elif kind == "rocks_db":
            db = RocksDBPersistentDB(PersistentDBConfig(**{"path": str(tmp_path / "rocksdb"), **fields}))
        elif kind in REDIS_KINDS:
            servers = request.getfixturevalue("redis_for")(kind)
            cls = RedisClusterVolatileDB if kind == "redis_cluster" else RedisVolatileDB
            redis_cfg = RedisConfig(address=servers.address)
            db = cls(VolatileDBConfig(**{"redis": redis_cfg, "num_partitions": 4, **fields}))
        else:
            raise ValueError(kind)
        made.append(db)
        return db

    yield factory
    for db in reversed(made):
        db.close()


@pytest.fixture(params=IMPLEMENTATIONS)
def tier(request: pytest.FixtureRequest, make_tier: TierFactory) -> EmbeddingTier:
    db: EmbeddingTier = make_tier(request.param)
    return db
