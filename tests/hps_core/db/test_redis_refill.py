"""Redis hardening against real redis-server processes: the stored partition count, the load
markers of each partition, and the refill of a node that restarted empty
(hps_core/db/redis_refill.py).

Node failures are real (``kill()`` a node of a 3-node cluster, ``restart()`` it empty: the
servers run without persistence). Tests that kill a node get a cluster of their own.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import redis

from hps_core.config import PersistentDBConfig, RedisConfig, VolatileDBConfig
from hps_core.db import RedisClusterVolatileDB
from hps_core.db import _redis_layout as layout
from hps_core.db.base import PartitionMarkers
from hps_core.db.redis_refill import RefillMonitor, RefillSource
from hps_core.errors import ConfigError, PartialTierError, TierError
from hps_core.formats import write_sparse_model
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack, unpack
from tests.redis_servers import RedisProcesses

pytestmark = pytest.mark.redis

T = "hps_et.model.table"
P = 8
DIM = 4


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisProcesses]:
    with RedisProcesses.cluster(tmp_path / "redis", nodes=3) as cluster:
        yield cluster


def _rows(keys: np.ndarray, dim: int = DIM) -> np.ndarray:
    """Rows that tell keys apart, in float32's exact integers (below 2^24), so that an update
    of ``+ 5`` is a different row (``key * 10`` of a 40-bit key would round it away)."""
    return ((keys[:, None] % 1_000_000) * 10 + np.arange(dim)).astype(np.float32)


def _partition_ports(address: str, table: str = T, num_partitions: int = P) -> np.ndarray:
    """(P,) the port of the node holding each partition of ``table``, asked of the cluster."""
    host, port = address.split(",")[0].split(":")
    client = redis.RedisCluster(host=host, port=int(port))
    try:
        return np.array([client.get_node_from_key(layout.value_hkey(table, p)).port for p in range(num_partitions)])
    finally:
        client.close()


def _fetch(db: RedisClusterVolatileDB, keys: np.ndarray, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((keys.size, dim), np.float32)
    try:
        found = db.fetch(T, keys, out)
    except PartialTierError as exc:
        found = exc.found
    return found, out


def _poll(done: Callable[[], object], timeout: float = 30.0) -> None:
    """Call ``done`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def _restart_empty(cluster: RedisProcesses, index: int) -> None:
    cluster.servers[index].kill()
    cluster.servers[index].restart()  # same port and nodes.conf, no data
    cluster.wait_ok()


def _load_then_lose_every_node(
    cluster: RedisProcesses, db: RedisClusterVolatileDB, tables: Sequence[str], keys: np.ndarray, values: np.ndarray
) -> None:
    """Load ``keys`` into each of ``tables`` with their markers, then restart every node empty."""
    for name in tables:
        db.create_table(name, DIM)
        db.insert(name, keys, values)
        db.mark_loaded(name)
    for i in range(len(cluster.servers)):
        _restart_empty(cluster, i)


# --------------------------------------------------------------------------- partition count


def test_partition_count_is_stored_and_a_mismatch_refused(redis_for: Callable[[str], RedisProcesses]) -> None:
    cluster = redis_for("redis_cluster")
    first = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=cluster.address), num_partitions=4))
    other = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=cluster.address), num_partitions=8))
    same = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=cluster.address), num_partitions=4))
    raw = redis.RedisCluster(host="127.0.0.1", port=cluster.servers[0].port)
    try:
        first.create_table(T, 2)
        first.insert(T, np.arange(10, dtype=np.int64), _rows(np.arange(10), 2))
        assert raw.hget(layout.PARTITIONS_KEY, T) == b"4"
        message = r"volatile_db\.num_partitions: table .* stored in .* with 4 partitions, but this server uses 8.*Fix: set volatile_db\.num_partitions to 4"
        with pytest.raises(ConfigError, match=message):
            other.create_table(T, 2)
        with pytest.raises(ConfigError, match=message):  # a table learnt from the metadata
            other.fetch(T, np.arange(3, dtype=np.int64), np.zeros((3, 2), np.float32))
        assert same.fetch(T, np.arange(10, dtype=np.int64), np.zeros((10, 2), np.float32)).all()

        # a table without a stored count (HugeCTR's, or an older version's) is accepted, and
        # never stamped: the first process to create it must not decide its count for the others
        old = "hps_et.model.old"
        raw.hset(layout.META_KEY, old, 2)
        other.create_table(old, 2)
        found = other.fetch(old, np.arange(3, dtype=np.int64), np.zeros((3, 2), np.float32))
        assert not found.any()
        assert raw.hget(layout.PARTITIONS_KEY, old) is None
        same.create_table(old, 2)  # a process with another count is accepted too
        assert raw.hget(layout.PARTITIONS_KEY, old) is None
    finally:
        raw.close()
        for db in (first, other, same):
            db.close()


# --------------------------------------------------------------------------- markers


def test_markers_find_exactly_the_partitions_of_a_node_that_came_back_empty(own_cluster: RedisProcesses) -> None:
    db = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=own_cluster.address), num_partitions=P), retry_after=0.1)
    try:
        assert isinstance(db, PartitionMarkers)
        db.create_table(T, DIM)
        db.mark_loaded(T)
        state = db.check_markers([T])
        assert state.missing == {} and not state.meta_missing and state.unknown == 0

        ports = _partition_ports(own_cluster.address)
        victim = own_cluster.servers[1]
        on_victim = np.flatnonzero(ports == victim.port).tolist()
        assert 0 < len(on_victim) < P
        victim.kill()
        down = db.check_markers([T])  # a node that does not answer is not (yet) a loss
        assert down.missing == {} and down.unknown >= len(on_victim)

        victim.restart()
        own_cluster.wait_ok()
        states = []  # the node is skipped for retry_after after its failure
        _poll(lambda: states.append(db.check_markers([T])) or not states[-1].unknown)
        assert states[-1].missing == {T: on_victim}
    finally:
        db.close()


def test_claim_lets_one_process_refill(redis_for: Callable[[str], RedisProcesses]) -> None:
    cluster = redis_for("redis_cluster")
    a = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=cluster.address), num_partitions=P))
    b = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=cluster.address), num_partitions=P))
    try:
        a.create_table(T, DIM)
        ta, tb = a.new_token(), b.new_token()
        assert a.claim_partitions(T, [0, 1, 2], ta, 10.0) == [0, 1, 2]
        assert b.claim_partitions(T, [1, 2, 3], tb, 10.0) == [3]  # 1, 2 are a's
        a.mark_loaded(T, [0, 1])
        a.release_partitions(T, [0, 1, 2], ta)
        # free again, but 0 and 1 are loaded: nothing to refill there, and their locks are let go
        assert b.claim_partitions(T, [0, 1, 2], tb, 10.0) == [2]
        assert a.claim_partitions(T, [0, 1], ta, 10.0) == []
        b.release_partitions(T, [2], ta)  # not b's token: the lock stays
        assert a.claim_partitions(T, [2], ta, 10.0) == []
    finally:
        a.close()
        b.close()


def test_insert_missing_keeps_rows_already_there(redis_for: Callable[[str], RedisProcesses]) -> None:
    db = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=redis_for("redis_cluster").address), num_partitions=P, max_set_batch_size=7))
    try:
        db.create_table(T, DIM)
        keys = np.arange(100, dtype=np.int64)
        db.insert(T, keys[:50], _rows(keys[:50]) + 1000)  # newer rows
        db.insert_missing(T, keys, _rows(keys))
        found, out = _fetch(db, keys)
        assert found.all()
        np.testing.assert_array_equal(out[:50], _rows(keys[:50]) + 1000)
        np.testing.assert_array_equal(out[50:], _rows(keys[50:]))
    finally:
        db.close()


# --------------------------------------------------------------------------- refill


def _sparse(tmp_path: Path, n: int = 3000) -> tuple[RefillSource, np.ndarray, np.ndarray]:
    keys = np.random.default_rng(1).choice(1 << 40, size=n, replace=False).astype(np.int64)
    values = _rows(keys)
    write_sparse_model(tmp_path / "t.model", keys, values)
    return RefillSource(T, DIM, str(tmp_path / "t.model"), 0.5), keys, values


def test_refill_restores_the_lost_partitions_only(own_cluster: RedisProcesses, tmp_path: Path) -> None:
    source, keys, values = _sparse(tmp_path)
    loaded = keys.size // 2  # initial_cache_rate 0.5: the leading half
    db = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=own_cluster.address), num_partitions=P, max_set_batch_size=100), retry_after=0.1)
    monitor = RefillMonitor(db, [source], chunk_rows=500)
    try:
        db.create_table(T, DIM)
        db.insert(T, keys[:loaded], values[:loaded])
        db.mark_loaded(T)
        assert monitor.check_once() == {T: 0} and monitor.refills == 0

        parts = layout.partition_of(keys, P)
        ports = _partition_ports(own_cluster.address)
        victim = own_cluster.servers[2]
        lost = ports[parts] == victim.port
        healthy_updated = np.flatnonzero(~lost[:loaded])[:5]  # an update on a healthy node
        db.insert(T, keys[healthy_updated], values[healthy_updated] + 7)

        _restart_empty(own_cluster, 2)
        lost_updated = np.flatnonzero(lost[:loaded])[:5]  # an update since the node came back

        def update() -> bool:
            try:
                db.insert(T, keys[lost_updated], values[lost_updated] + 9)
                return True
            except TierError:  # marked down for retry_after
                return False

        _poll(update)
        found, _ = _fetch(db, keys[:loaded])
        assert (~found).sum() == lost[:loaded].sum() - lost_updated.size

        _poll(lambda: monitor.check_once() == {T: 0} and monitor.refills)
        assert monitor.refills == len(set(parts[lost].tolist())) and monitor.rows_refilled == lost[:loaded].sum()
        want = values.copy()
        want[healthy_updated] += 7  # not rewritten from the file: its partition was not lost
        want[lost_updated] += 9  # written after the node came back: kept (HSETNX)
        found, out = _fetch(db, keys[:loaded])
        assert found.all()
        np.testing.assert_array_equal(out, want[:loaded])
        assert not _fetch(db, keys[loaded:])[0].any()  # beyond initial_cache_rate: not loaded
        assert db.check_markers([T]).missing == {}
    finally:
        monitor.stop()
        db.close()


def test_refill_of_an_int8_table_restores_packed_rows(own_cluster: RedisProcesses, tmp_path: Path) -> None:
    """Every node restarts empty (the metadata hashes too): the refill writes the table's
    rows packed in its format (``8 + dim`` bytes) and its metadata with that format."""
    source, keys, values = _sparse(tmp_path, 400)
    source = dataclasses.replace(source, fraction=1.0, row_format=RowFormat.INT8)
    db = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=own_cluster.address), num_partitions=P), retry_after=0.1)
    monitor = RefillMonitor(db, [source])
    raw = redis.RedisCluster(host="127.0.0.1", port=own_cluster.servers[0].port)
    try:
        db.create_table(T, DIM, RowFormat.INT8)
        db.insert(T, keys, values)
        db.mark_loaded(T)
        for i in range(len(own_cluster.servers)):
            _restart_empty(own_cluster, i)
        _poll(lambda: monitor.check_once() == {T: 0} and monitor.refills == P)
        packed = pack(RowFormat.INT8, values)
        parts = layout.partition_of(keys, P)
        for i in (0, 123, 399):
            stored = raw.hget(layout.value_hkey(T, int(parts[i])), int(keys[i]).to_bytes(8, "little", signed=True))
            assert len(stored) == 8 + DIM and stored == packed[i].tobytes()
        assert raw.hget(layout.FORMATS_KEY, T) == b"3"
        fresh = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=own_cluster.address), num_partitions=P))
        try:
            assert fresh.row_format(T) is RowFormat.INT8
            found, out = _fetch(fresh, keys)
            assert found.all()
            np.testing.assert_array_equal(out, unpack(RowFormat.INT8, packed, DIM))
        finally:
            fresh.close()
    finally:
        raw.close()
        monitor.stop()
        db.close()


def test_refill_prefers_the_persistent_tiers_rows(own_cluster: RedisProcesses, tmp_path: Path) -> None:
    from hps_core.db import HashMapVolatileDB

    source, keys, values = _sparse(tmp_path, 400)
    persistent = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))  # stands for RocksDB: a tier with fresher rows
    persistent.create_table(T, DIM)
    persistent.insert(T, keys[:10], values[:10] + 5)  # updated there by the update stream
    db = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=own_cluster.address), num_partitions=P), retry_after=0.1)
    monitor = RefillMonitor(db, [source], persistent=persistent)
    try:
        _load_then_lose_every_node(own_cluster, db, [T], keys[:200], values[:200])
        _poll(lambda: monitor.check_once() == {T: 0} and monitor.refills == P)
        _assert_first_ten_updated(db, keys[:200], values[:200])
        assert db.dim(T) == DIM and db.table_names() == [T]  # the metadata came back too
        raw = redis.RedisCluster(host="127.0.0.1", port=own_cluster.servers[0].port)
        try:
            assert raw.hget(layout.META_KEY, T) == b"4" and raw.hget(layout.PARTITIONS_KEY, T) == b"8"
        finally:
            raw.close()
    finally:
        monitor.stop()
        db.close()
        persistent.close()


def _assert_first_ten_updated(db: RedisClusterVolatileDB, keys: np.ndarray, values: np.ndarray) -> None:
    """Every key is back; the first ten with the persistent tier's update (``+ 5``)."""
    found, out = _fetch(db, keys)
    assert found.all()
    np.testing.assert_array_equal(out[:10], values[:10] + 5)
    np.testing.assert_array_equal(out[10:], values[10:])


def test_refill_catches_the_rocksdb_secondary_up_before_reading_it(own_cluster: RedisProcesses, tmp_path: Path) -> None:
    """A server's persistent tier is a RocksDB secondary, behind its writer until it catches
    up: the refill catches it up first, so it does not put back rows older than RocksDB's."""
    from hps_core.db import RocksDBPersistentDB

    source, keys, values = _sparse(tmp_path, 400)
    writer = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "rocksdb")))
    writer.create_table(T, DIM)
    writer.insert(T, keys, values)
    secondary = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "rocksdb"), read_only=True), secondary_path=tmp_path / "secondary")
    writer.insert(T, keys[:10], values[:10] + 5)  # an update the secondary has not seen yet
    db = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=own_cluster.address), num_partitions=P), retry_after=0.1)
    monitor = RefillMonitor(db, [source], persistent=secondary, catch_up=secondary.refresh)
    try:
        _load_then_lose_every_node(own_cluster, db, [T], keys[:200], values[:200])
        _poll(lambda: monitor.check_once() == {T: 0} and monitor.refills == P)
        _assert_first_ten_updated(db, keys[:200], values[:200])
    finally:
        monitor.stop()
        db.close()
        secondary.close()
        writer.close()


def test_one_failing_table_does_not_stop_the_others(
    own_cluster: RedisProcesses, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error of one table (here a failed claim) is logged and that table stays
    counted as lost; the other table is refilled in the same pass."""
    source, keys, values = _sparse(tmp_path, 1000)
    other = RefillSource("hps_et.model.other", DIM, source.path, source.fraction)

    class FailingClaims(RedisClusterVolatileDB):
        def claim_partitions(self, table: str, partitions: Sequence[int], token: str, lock_s: float) -> list[int]:
            if table == T:
                raise TierError("claim refused (test)")
            return super().claim_partitions(table, partitions, token, lock_s)

    db = FailingClaims(VolatileDBConfig(redis=RedisConfig(address=own_cluster.address), num_partitions=P), retry_after=0.1)
    monitor = RefillMonitor(db, [source, other])
    try:
        for name in (T, other.table):
            db.create_table(name, DIM)
            db.insert(name, keys[:500], values[:500])
            db.mark_loaded(name)
        lost = int((_partition_ports(own_cluster.address) == own_cluster.servers[1].port).sum())
        _restart_empty(own_cluster, 1)
        caplog.set_level(logging.WARNING, logger="hps_core")
        _poll(lambda: monitor.check_once()[other.table] == 0 and monitor.refills)
        assert monitor.lost_partitions() == {T: lost, other.table: 0}
        assert monitor.refills == lost
        out = np.zeros((500, DIM), np.float32)
        assert db.fetch(other.table, keys[:500], out).all()
        assert any("claim refused (test)" in r.getMessage() for r in caplog.records)
    finally:
        monitor.stop()
        db.close()


def test_metadata_refused_does_not_stop_the_refill(
    own_cluster: RedisProcesses, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every node restarted empty, and restoring the table metadata raises ConfigError (as it
    does when another process stored another partition count or width meanwhile): logged as
    an error, and both tables are refilled all the same."""
    source, keys, values = _sparse(tmp_path, 600)
    other = RefillSource("hps_et.model.other", DIM, source.path, source.fraction)
    refused = False

    class RefusingMetadata(RedisClusterVolatileDB):
        def create_table(self, table: str, dim: int, row_format: RowFormat = RowFormat.FP32) -> None:
            if refused:
                raise ConfigError("volatile_db.num_partitions: refused (test)")
            super().create_table(table, dim, row_format)

    db = RefusingMetadata(VolatileDBConfig(redis=RedisConfig(address=own_cluster.address), num_partitions=P), retry_after=0.1)
    monitor = RefillMonitor(db, [source, other])
    try:
        _load_then_lose_every_node(own_cluster, db, [T, other.table], keys[:300], values[:300])
        refused = True
        caplog.set_level(logging.WARNING, logger="hps_core")
        _poll(lambda: monitor.check_once() == {T: 0, other.table: 0} and monitor.refills == 2 * P)
        for name in (T, other.table):
            out = np.zeros((300, DIM), np.float32)
            assert db.fetch(name, keys[:300], out).all()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("restoring the table metadata: ConfigError: volatile_db.num_partitions" in m for m in errors), errors
    finally:
        monitor.stop()
        db.close()


def test_two_monitors_refill_each_partition_once(own_cluster: RedisProcesses, tmp_path: Path) -> None:
    source, keys, values = _sparse(tmp_path, 1000)
    dbs = [RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=own_cluster.address), num_partitions=P), retry_after=0.1) for _ in range(2)]
    monitors = [RefillMonitor(db, [source], interval_s=0.05) for db in dbs]
    try:
        dbs[0].create_table(T, DIM)
        dbs[0].insert(T, keys[:500], values[:500])
        dbs[0].mark_loaded(T)
        lost = int((_partition_ports(own_cluster.address) == own_cluster.servers[0].port).sum())
        _restart_empty(own_cluster, 0)
        for monitor in monitors:
            monitor.start()
        _poll(lambda: sum(m.refills for m in monitors) >= lost)
        time.sleep(0.3)  # a few more probes of both
        assert sum(m.refills for m in monitors) == lost  # each lost partition refilled once
        assert _fetch(dbs[1], keys[:500])[0].all()
    finally:
        for monitor in monitors:
            monitor.stop()
        for db in dbs:
            db.close()


def test_nowhere_to_refill_from_is_loud_and_counted(
    own_cluster: RedisProcesses, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source, keys, values = _sparse(tmp_path, 500)
    db = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=own_cluster.address), num_partitions=P), retry_after=0.1)
    monitor = RefillMonitor(db, [source])
    try:
        db.create_table(T, DIM)
        db.insert(T, keys[:250], values[:250])
        db.mark_loaded(T)
        lost = int((_partition_ports(own_cluster.address) == own_cluster.servers[1].port).sum())
        shutil.rmtree(source.path)
        _restart_empty(own_cluster, 1)
        caplog.set_level(logging.INFO, logger="hps_core")
        _poll(lambda: monitor.check_once()[T])  # until the restarted node answers
        for _ in range(5):
            assert monitor.check_once() == {T: lost}
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]  # rate-limited: one line, not one per pass
        assert "cannot refill" in errors[0].getMessage() and source.path in errors[0].getMessage()
        assert db.check_markers([T]).missing[T]  # still lost: the markers were not written
    finally:
        monitor.stop()
        db.close()
