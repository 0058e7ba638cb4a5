"""Optional tier capabilities (hps_core/db/base.py): each declared protocol, its conformance
suite run over every tier that claims it, and the claims themselves.

A tier claims a capability by implementing its protocol; callers check ``isinstance``, never
``hasattr`` or a type name. ``CLAIMS`` is the expected map: a tier that starts (or stops)
declaring a capability fails ``test_claims`` until this table says so, and then runs the
capability's suite.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hps_core.config import (
    PERSISTENT_TYPES,
    VOLATILE_TYPES,
    PersistentDBConfig,
    RedisConfig,
    TierType,
    VolatileDBConfig,
)
from hps_core.db import (
    HashMapVolatileDB,
    SharedHashMapVolatileDB,
    RedisClusterVolatileDB,
    RocksDBPersistentDB,
    open_persistent_db,
    open_volatile_db,
)
from hps_core.db.base import (
    BulkLoad,
    DiskUsage,
    DropTable,
    HostSharedTables,
    MemoryUsage,
    PartitionMarkers,
    Refreshable,
    SharedTier,
    TableMetadata,
)
from hps_core.errors import TierError, UnknownTableError
from hps_core.row_formats import RowFormat
from tests.hps_core.db.conftest import IMPLEMENTATIONS, TierFactory

Encode = Callable[[np.ndarray, int], np.ndarray]
T = "hps_et.model.table"

CAPABILITIES: tuple[type[Any], ...] = (BulkLoad, TableMetadata, Refreshable, SharedTier, PartitionMarkers, DropTable,
                                       HostSharedTables, DiskUsage, MemoryUsage)
CLAIMS: dict[str, set[type[Any]]] = {
    "hash_map": {DropTable, MemoryUsage},
    "host_store": {DropTable, HostSharedTables, MemoryUsage},
    "rocks_db": {BulkLoad, TableMetadata, Refreshable, DropTable, DiskUsage},
    "redis_cluster": {SharedTier, PartitionMarkers, DropTable, MemoryUsage},
    "redis_single": {SharedTier, PartitionMarkers, DropTable, MemoryUsage},
}
# the tier type behind each implementation the fixtures build
TYPE_OF = {"hash_map": TierType.HASH_MAP, "host_store": TierType.PARALLEL_HASH_MAP, "rocks_db": TierType.ROCKS_DB,
           "redis_cluster": TierType.REDIS_CLUSTER, "redis_single": TierType.REDIS_CLUSTER}


def _kind(param: Any) -> str:
    return param if isinstance(param, str) else param.values[0]


def claiming(capability: type[Any]) -> list[Any]:
    """The implementations (pytest params, marks kept) that claim ``capability``."""
    return [p for p in IMPLEMENTATIONS if capability in CLAIMS[_kind(p)]]


def test_claims_cover_every_implementation() -> None:
    assert {_kind(p) for p in IMPLEMENTATIONS} == set(CLAIMS)
    # parallel_hash_map is hash_map's implementation with another partition count
    built = set(TYPE_OF.values()) | {TierType.PARALLEL_HASH_MAP}
    assert built == (set(VOLATILE_TYPES) | set(PERSISTENT_TYPES)) - {TierType.DISABLED}


@pytest.mark.parametrize("kind", [*(t for t in TierType if t is not TierType.REDIS_CLUSTER),
                                  pytest.param(TierType.REDIS_CLUSTER, marks=pytest.mark.redis)])
def test_factories_build_every_tier_type(kind: TierType, tmp_path: Path,
                                         request: pytest.FixtureRequest) -> None:
    """Every member of TierType, in each role that accepts it, is built by the factory."""
    expected = {TierType.HASH_MAP: SharedHashMapVolatileDB, TierType.PARALLEL_HASH_MAP: SharedHashMapVolatileDB,
                TierType.REDIS_CLUSTER: RedisClusterVolatileDB, TierType.ROCKS_DB: RocksDBPersistentDB}
    roles = 0
    if kind in VOLATILE_TYPES:
        roles += 1
        address = request.getfixturevalue("redis_for")("redis_cluster").address if kind.shared else "127.0.0.1:7000"
        db: Any = open_volatile_db(VolatileDBConfig(type=kind, redis=RedisConfig(address=address)))
        assert db is None if kind is TierType.DISABLED else type(db) is expected[kind]
        if kind.in_process:  # host_shared: false keeps the private map of each process
            private = open_volatile_db(VolatileDBConfig(type=kind, host_shared=False))
            assert type(private) is HashMapVolatileDB
            private.close()  # type: ignore[union-attr]
    if kind in PERSISTENT_TYPES:
        roles += 1
        db = open_persistent_db(PersistentDBConfig(type=kind, path=str(tmp_path / "db")))
        assert db is None if kind is TierType.DISABLED else type(db) is expected[kind]
    if db is not None:
        db.close()
    assert roles >= 1


def test_factory_builds_the_rocksdb_secondary(tmp_path: Path) -> None:
    cfg = PersistentDBConfig(type=TierType.ROCKS_DB, path=str(tmp_path / "db"))
    writer = open_persistent_db(cfg)
    assert writer is not None
    writer.create_table(T, 2)
    secondary = open_persistent_db(cfg, secondary_path=tmp_path / "secondary")
    try:
        assert isinstance(secondary, RocksDBPersistentDB) and isinstance(secondary, Refreshable)
        assert secondary.secondary_path == str(tmp_path / "secondary") and secondary.read_only
        writer.insert(T, np.arange(3, dtype=np.int64), np.ones((3, 2), np.float32))
        secondary.refresh()
        assert secondary.count(T) == 3
    finally:
        assert secondary is not None
        secondary.close()
        writer.close()


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_claims(make_tier: TierFactory, kind: str) -> None:
    db = make_tier(kind)
    assert {c for c in CAPABILITIES if isinstance(db, c)} == CLAIMS[kind]
    # the tier type says "shared" before a tier is opened; the tier declares it once open
    assert TYPE_OF[kind].shared == isinstance(db, SharedTier)


# --------------------------------------------------------------------------- BulkLoad


@pytest.mark.parametrize("kind", claiming(BulkLoad))
def test_bulk_load(make_tier: TierFactory, encode: Encode, kind: str) -> None:
    db = make_tier(kind)
    db.create_table(T, 3)
    keys = np.array([5, 1, 9, 1, -4], dtype=np.int64)  # key 1 twice: the last row wins
    values = encode(keys, 3)
    values[3] += 100.0
    assert db.bulk_load(T, keys, values) == 4
    out = np.zeros((4, 3), np.float32)
    found = db.fetch(T, np.array([1, 5, 9, -4], np.int64), out)
    assert found.all()
    np.testing.assert_array_equal(out[0], values[3])
    np.testing.assert_array_equal(out[1:], encode(np.array([5, 9, -4]), 3))
    assert db.bulk_load(T, keys[:0], values[:0]) == 0  # empty: nothing written
    assert db.count(T) == 4


# --------------------------------------------------------------------------- DiskUsage, MemoryUsage


@pytest.mark.parametrize("kind", claiming(MemoryUsage))
def test_memory_bytes_grow_with_the_rows_a_table_holds(make_tier: TierFactory, encode: Encode, kind: str) -> None:
    db = make_tier(kind)
    db.create_table(T, 8)
    db.insert(T, np.arange(10, dtype=np.int64), encode(np.arange(10), 8))
    few = db.memory_bytes(T)
    db.insert(T, np.arange(10, 4000, dtype=np.int64), encode(np.arange(10, 4000), 8))
    assert 0 < few < db.memory_bytes(T)


@pytest.mark.parametrize("kind", claiming(DiskUsage))
def test_disk_usage_estimates_a_tables_rows_and_bytes(make_tier: TierFactory, encode: Encode, kind: str) -> None:
    db = make_tier(kind)
    db.create_table(T, 8)
    db.insert(T, np.arange(5000, dtype=np.int64), encode(np.arange(5000), 8))
    db.close()  # the estimates come from what was flushed
    db = make_tier(kind)
    assert db.estimate_rows(T) > 0 and db.disk_bytes(T) > 0


# --------------------------------------------------------------------------- TableMetadata


@pytest.mark.parametrize("kind", claiming(TableMetadata))
def test_metadata_round_trip(make_tier: TierFactory, kind: str) -> None:
    db = make_tier(kind)
    assert db.read_only is False
    assert db.get_meta("load.x") is None
    db.put_meta("load.x", b"\x00one")
    db.put_meta("load.y", b"two")
    db.put_meta("load.x", b"three")  # overwrites
    assert (db.get_meta("load.x"), db.get_meta("load.y")) == (b"three", b"two")
    db.delete_meta("load.x")
    db.delete_meta("load.x")  # absent: nothing to do
    assert db.get_meta("load.x") is None and db.get_meta("load.y") == b"two"


@pytest.mark.parametrize("kind", claiming(TableMetadata))
def test_metadata_refused_when_read_only(make_tier: TierFactory, kind: str) -> None:
    writer = make_tier(kind)
    writer.put_meta("load.x", b"kept")
    writer.close()
    reader = make_tier(kind, read_only=True)
    assert reader.read_only is True
    assert reader.get_meta("load.x") == b"kept"
    with pytest.raises(TierError):
        reader.put_meta("load.x", b"changed")
    assert reader.get_meta("load.x") == b"kept"


# --------------------------------------------------------------------------- Refreshable


@pytest.mark.parametrize("kind", claiming(Refreshable))
def test_refresh_sees_a_writers_tables_and_rows(make_tier: TierFactory, encode: Encode, kind: str) -> None:
    writer = make_tier(kind)
    writer.create_table(T, 2)
    reader = make_tier(kind, read_only=True)
    writer.refresh()  # a handle that sees its own writes: nothing to do, no error
    keys = np.arange(10, dtype=np.int64)
    writer.insert(T, keys, encode(keys, 2))
    writer.create_table(T + "2", 4)
    reader.refresh()
    out = np.zeros((10, 2), np.float32)
    assert reader.fetch(T, keys, out).all()
    np.testing.assert_array_equal(out, encode(keys, 2))
    assert T + "2" in reader.table_names() and reader.dim(T + "2") == 4


# --------------------------------------------------------------------------- SharedTier


@pytest.mark.parametrize("kind", claiming(SharedTier))
def test_shared_tier_is_one_store_for_every_handle(make_tier: TierFactory, encode: Encode, kind: str) -> None:
    first = make_tier(kind)
    assert isinstance(first.address, str) and first.address
    first.create_table(T, 2)
    keys = np.arange(7, dtype=np.int64)
    first.insert(T, keys, encode(keys, 2))
    second = type(first)(VolatileDBConfig(redis=RedisConfig(address=first.address), num_partitions=4))
    try:  # another server's handle, opened from the same address, sees the rows
        out = np.zeros((7, 2), np.float32)
        assert second.fetch(T, keys, out).all()
        np.testing.assert_array_equal(out, encode(keys, 2))
    finally:
        second.close()


# --------------------------------------------------------------------------- DropTable


@pytest.mark.parametrize("kind", claiming(DropTable))
def test_drop_table_removes_rows_and_metadata_and_leaves_the_others(
    make_tier: TierFactory, encode: Encode, kind: str
) -> None:
    db = make_tier(kind)
    kept = T + "_kept"
    for table in (T, kept):
        db.create_table(table, 4)
        keys = np.arange(100, dtype=np.int64)
        db.insert(table, keys, encode(keys, 4))
    if isinstance(db, TableMetadata):
        db.put_meta(f"load.{T}", b"marker")  # the loader's progress marker goes with the table
        db.put_meta(f"load.{kept}", b"kept")
    if isinstance(db, PartitionMarkers):
        db.mark_loaded(T)
    dropped = db.drop_table(T)
    assert dropped == 100 or (kind == "rocks_db" and dropped > 0)  # RocksDB: its estimate
    assert T not in db.table_names() and kept in db.table_names()
    with pytest.raises(UnknownTableError):
        db.dim(T)
    with pytest.raises(UnknownTableError):
        db.drop_table(T)
    out = np.zeros((100, 4), np.float32)
    assert db.fetch(kept, np.arange(100, dtype=np.int64), out).all()
    np.testing.assert_array_equal(out, encode(np.arange(100), 4))
    if isinstance(db, TableMetadata):
        assert db.get_meta(f"load.{T}") is None and db.get_meta(f"load.{kept}") == b"kept"
    # Gone for a handle opened afterwards too (another server sharing the tier).
    if kind == "rocks_db":
        db.close()
        db = make_tier(kind)
    elif isinstance(db, SharedTier):
        db = type(db)(VolatileDBConfig(redis=RedisConfig(address=db.address), num_partitions=4))
    assert T not in db.table_names()
    # Created again: empty, in another width and format.
    db.create_table(T, 8, RowFormat.INT8)
    assert (db.count(T), db.dim(T), db.row_format(T)) == (0, 8, RowFormat.INT8)
    if isinstance(db, PartitionMarkers):
        assert db.check_markers([T]).missing == {T: [0, 1, 2, 3]}  # no marker survived
    if kind in ("redis_cluster", "redis_single"):
        db.close()


@pytest.mark.parametrize("kind", [k for k in claiming(DropTable) if _kind(k) == "rocks_db"])
def test_drop_table_refused_when_read_only(make_tier: TierFactory, kind: str) -> None:
    writer = make_tier(kind)
    writer.create_table(T, 2)
    writer.close()
    reader = make_tier(kind, read_only=True)
    with pytest.raises(TierError, match="read-only"):
        reader.drop_table(T)
    assert T in reader.table_names()
