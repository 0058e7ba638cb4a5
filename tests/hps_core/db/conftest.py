"""Fixtures for the storage-tier tests: every implementation, for real.

``tier`` yields each implementation of the EmbeddingTier contract in turn; RocksDB runs on
a real database in ``tmp_path`` (never a stand-in). ``make_tier`` builds one by name with
keyword overrides, for tests that need specific settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hps_core.db import EmbeddingTier, HashMapVolatileDB, RocksDBPersistentDB

IMPLEMENTATIONS = ("hash_map", "rocks_db")

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


@pytest.fixture
def make_tier(tmp_path: Path) -> Iterator[TierFactory]:
    made: list[Any] = []

    def factory(kind: str, **kwargs: Any) -> Any:
        if kind == "hash_map":
            db: Any = HashMapVolatileDB(**{"num_partitions": 4, **kwargs})
        elif kind == "rocks_db":
            db = RocksDBPersistentDB(**{"path": tmp_path / "rocksdb", **kwargs})
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
