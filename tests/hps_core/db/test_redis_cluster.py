"""Redis tiers against real redis-server processes: layout, faults, recovery, auth, config.

The contract itself is covered by test_conformance.py (``redis_cluster``, ``redis_single``).
Tests that kill or stop a node get a cluster of their own (``own_cluster``); the rest use
the session's servers (``redis_for`` in conftest.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from hps_core.config import RedisConfig, TierType, TLSConfig, VolatileDBConfig
from hps_core.db import RedisClusterVolatileDB, RedisVolatileDB, open_volatile_db
from hps_core.db import _redis_layout as layout
from hps_core.errors import ConfigError, PartialTierError, TierError
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack, unpack
from tests.redis_servers import RedisProcesses

pytestmark = pytest.mark.redis

T = "hps_et.model.table"
Encode = Callable[[np.ndarray, int], np.ndarray]


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisProcesses]:
    with RedisProcesses.cluster(tmp_path, nodes=3) as cluster:
        yield cluster


def node_port_of_keys(address: str, keys: np.ndarray, num_partitions: int) -> np.ndarray:
    """The port of the node holding each key, asked of the cluster itself (CLUSTER SLOTS)."""
    host, port = address.split(",")[0].split(":")
    client = redis.RedisCluster(host=host, port=int(port))
    try:
        ports = [
            client.get_node_from_key(layout.value_hkey(T, p)).port for p in range(num_partitions)
        ]
    finally:
        client.close()
    return np.asarray(ports)[layout.partition_of(keys, num_partitions)]


def fetch_found(db: RedisClusterVolatileDB, keys: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The found mask of ``db.fetch``, also when some nodes failed (PartialTierError carries
    it, with the failed keys, which are never found)."""
    try:
        return db.fetch(T, keys, out)
    except PartialTierError as exc:
        assert not (exc.found & exc.failed).any()
        return exc.found


# --------------------------------------------------------------------------- layout


def test_hugectr_layout_one_hash_per_partition(redis_for: Callable[[str], RedisProcesses], encode: Encode) -> None:
    cluster = redis_for("redis_cluster")
    db = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=cluster.address), num_partitions=6))
    db.create_table(T, 4)
    keys = np.arange(-50, 50, dtype=np.int64)
    db.insert(T, keys, encode(keys, 4))
    raw = redis.RedisCluster(host="127.0.0.1", port=cluster.servers[0].port)
    try:
        parts = layout.partition_of(keys, 6)
        for i in (0, 17, 99):
            hkey = f"hps_et{{{T}/p{parts[i]}}}v".encode()
            stored = raw.hget(hkey, int(keys[i]).to_bytes(8, "little", signed=True))
            assert stored == encode(keys[i : i + 1], 4).tobytes()
        assert sum(raw.hlen(layout.value_hkey(T, p)) for p in range(6)) == len(keys)
        assert raw.hget(layout.META_KEY, T) == b"4"
        owners = {raw.get_node_from_key(layout.value_hkey(T, p)).port for p in range(6)}
        assert len(owners) > 1, "partitions should spread over the nodes"
        assert db.memory_bytes(T) > len(keys) * (8 + 16)
    finally:
        raw.close()
        db.close()


def test_small_command_chunks_and_a_second_client(redis_for: Callable[[str], RedisProcesses], encode: Encode) -> None:
    cluster = redis_for("redis_cluster")
    writer = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=cluster.address), num_partitions=4, max_set_batch_size=7))
    reader = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=cluster.servers[2].address), num_partitions=4, max_get_batch_size=5))
    try:
        writer.create_table(T, 3)
        keys = np.arange(1000, dtype=np.int64) * 7919
        writer.insert(T, keys, encode(keys, 3))
        assert reader.dim(T) == 3 and reader.table_names() == [T]  # learnt from the metadata hash
        out = np.zeros((len(keys), 3), np.float32)
        assert reader.fetch(T, keys[::-1].copy(), out).all()
        np.testing.assert_array_equal(out, encode(keys[::-1], 3))
    finally:
        writer.close()
        reader.close()


def test_int8_rows_are_stored_packed_and_the_format_is_shared(redis_for: Callable[[str], RedisProcesses]) -> None:
    """An int8 table's hash values are ``8 + dim`` bytes; its format is in the metadata, so a
    second process learns it and one asking for another format is refused; a table without a
    stored format (HugeCTR's, an older version's) is fp32, and is not stamped."""
    cluster = redis_for("redis_cluster")
    config = VolatileDBConfig(redis=RedisConfig(address=cluster.address), num_partitions=4)
    db, second = RedisClusterVolatileDB(config), RedisClusterVolatileDB(config)
    raw = redis.RedisCluster(host="127.0.0.1", port=cluster.servers[0].port)
    try:
        db.create_table(T, 16, RowFormat.INT8)
        keys = np.arange(-50, 50, dtype=np.int64)
        values = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32)
        db.insert(T, keys, values)
        packed = pack(RowFormat.INT8, values)
        parts = layout.partition_of(keys, 4)
        for i in (0, 42, 99):
            stored = raw.hget(layout.value_hkey(T, int(parts[i])), int(keys[i]).to_bytes(8, "little", signed=True))
            assert len(stored) == 8 + 16 and stored == packed[i].tobytes()
        assert raw.hget(layout.FORMATS_KEY, T) == b"3"
        assert second.row_format(T) is RowFormat.INT8 and second.dim(T) == 16  # learnt from the metadata
        with pytest.raises(ConfigError, match="stores int8 rows, but fp32 was asked for"):
            second.create_table(T, 16)
        second.create_table(T, 16, RowFormat.INT8)
        out = np.zeros((100, 16), np.float32)
        assert second.fetch(T, keys, out).all()
        np.testing.assert_array_equal(out, unpack(RowFormat.INT8, packed, 16))

        old = "hps_et.model.old"
        raw.hset(layout.META_KEY, old, 4)
        assert second.row_format(old) is RowFormat.FP32
        with pytest.raises(ConfigError, match="stores fp32 rows, but fp16 was asked for"):
            db.create_table(old, 4, RowFormat.FP16)
        db.create_table(old, 4)
        assert raw.hget(layout.FORMATS_KEY, old) is None
    finally:
        raw.close()
        db.close()
        second.close()


@pytest.mark.parametrize("kind", ["redis_cluster", "redis_single"])
def test_hugectr_rows_serve_as_fp32_and_refuse_a_compact_format(
    redis_for: Callable[[str], RedisProcesses], kind: str
) -> None:
    """A table HugeCTR wrote (its partition hash of float32 values, no metadata at all) is
    fp32: it serves as fp32, and a compact format is refused, nothing stamped over its rows,
    whose fetches would all fail. A compact table whose metadata was lost (the node holding
    it came back empty) keeps its format: rows of that format's size are not refused."""
    processes = redis_for(kind)
    config = VolatileDBConfig(redis=RedisConfig(address=processes.address), num_partitions=1)
    rows = np.random.default_rng(2).normal(size=(30, 8)).astype("<f4")
    keys = np.arange(-15, 15, dtype=np.int64)
    raw: redis.Redis | redis.RedisCluster = (
        redis.RedisCluster(host="127.0.0.1", port=processes.servers[0].port) if kind == "redis_cluster"
        else redis.Redis(host="127.0.0.1", port=processes.servers[0].port)
    )
    db = open_volatile_db(VolatileDBConfig(type=TierType.REDIS_CLUSTER, redis=config.redis, num_partitions=1))
    try:
        raw.hset(layout.value_hkey(T, 0), mapping={int(k).to_bytes(8, "little", signed=True): r.tobytes()
                                                   for k, r in zip(keys, rows)})
        for fmt in (RowFormat.INT8, RowFormat.FP8):
            with pytest.raises(ConfigError, match=rf"stores fp32 rows \(it holds rows written without a row "
                               rf"format, by HugeCTR.*\), but {fmt} was asked for.*serve it as fp32.*load it again"):
                db.create_table(T, 8, fmt)
        assert all(raw.hget(k, T) is None for k in (layout.META_KEY, layout.FORMATS_KEY, layout.PARTITIONS_KEY))
        db.create_table(T, 8)
        out = np.zeros((30, 8), np.float32)
        assert db.fetch(T, keys, out).all()
        np.testing.assert_array_equal(out, rows)

        compact = "hps_et.model.compact"
        db.create_table(compact, 8, RowFormat.INT8)
        db.insert(compact, keys, rows)
        raw.hdel(layout.META_KEY, compact)
        raw.hdel(layout.FORMATS_KEY, compact)
        raw.hdel(layout.PARTITIONS_KEY, compact)
        restarted = open_volatile_db(VolatileDBConfig(type=TierType.REDIS_CLUSTER, redis=config.redis, num_partitions=1))
        try:
            restarted.create_table(compact, 8, RowFormat.INT8)  # rows of its size: metadata restored
            assert raw.hget(layout.FORMATS_KEY, compact) == b"3"
            assert restarted.fetch(compact, keys, out).all()
            np.testing.assert_array_equal(out, unpack(RowFormat.INT8, pack(RowFormat.INT8, rows), 8))
        finally:
            restarted.close()
    finally:
        raw.close()
        db.close()


# --------------------------------------------------------------------------- faults


def test_killed_node_turns_into_misses_then_recovers(own_cluster: RedisProcesses, encode: Encode) -> None:
    db = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=own_cluster.address), num_partitions=8), retry_after=0.2)
    db.create_table(T, 8)
    keys = np.arange(20_000, dtype=np.int64)
    values = encode(keys, 8)
    db.insert(T, keys, values)
    victim = own_cluster.servers[1]
    on_victim = node_port_of_keys(own_cluster.address, keys, 8) == victim.port
    assert 0 < on_victim.sum() < len(keys)

    results: list[np.ndarray] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def lookups() -> None:  # a steady run of lookups while the node dies
        out = np.zeros((len(keys), 8), np.float32)
        while not stop.is_set():
            try:
                results.append(fetch_found(db, keys, out).copy())
            except BaseException as exc:  # noqa: BLE001 - the test asserts there are none
                failures.append(exc)
                return

    runner = threading.Thread(target=lookups)
    runner.start()
    time.sleep(0.2)
    victim.kill()
    time.sleep(1.0)
    stop.set()
    runner.join(timeout=10)
    assert not failures, failures
    assert results[0].all()
    last = results[-1]
    np.testing.assert_array_equal(last, ~on_victim)  # dead node's keys miss, the others are found
    assert db.errors >= 1 and db.error_keys >= on_victim.sum() and "Connection" in (db.last_error or "")

    # a write must not be lost silently
    with pytest.raises(TierError, match="insert"):
        db.insert(T, keys[on_victim][:10], values[on_victim][:10])
    # a skipped node answers at once, not after a timeout
    started = time.perf_counter()
    out = np.zeros((len(keys), 8), np.float32)
    with pytest.raises(PartialTierError) as partial:
        db.fetch(T, keys, out)
    assert time.perf_counter() - started < 0.5
    found = partial.value.found
    np.testing.assert_array_equal(partial.value.failed, on_victim)
    np.testing.assert_array_equal(out[found], values[found])

    victim.restart()  # same port, same nodes.conf; its data is gone (no persistence)
    own_cluster.wait_ok()
    deadline = time.monotonic() + 10
    while True:  # the node comes back into service once retry_after has passed
        try:
            db.insert(T, keys, values)
            break
        except TierError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    errors = db.errors
    found = db.fetch(T, keys, out)
    assert found.all() and db.errors == errors
    np.testing.assert_array_equal(out, values)
    db.close()


def test_slow_node_times_out_into_misses(own_cluster: RedisProcesses, encode: Encode) -> None:
    db = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=own_cluster.address), num_partitions=8), socket_timeout=0.2, retry_after=0.3)
    db.create_table(T, 2)
    keys = np.arange(5_000, dtype=np.int64)
    db.insert(T, keys, encode(keys, 2))
    frozen = own_cluster.servers[0]
    on_frozen = node_port_of_keys(own_cluster.address, keys, 8) == frozen.port
    out = np.zeros((len(keys), 2), np.float32)
    assert frozen.process is not None
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        started = time.perf_counter()
        found = fetch_found(db, keys, out)
        first = time.perf_counter() - started
        np.testing.assert_array_equal(found, ~on_frozen)
        assert 0.15 < first < 2.0 and "Timeout" in (db.last_error or "")
        started = time.perf_counter()
        np.testing.assert_array_equal(fetch_found(db, keys, out), ~on_frozen)
        assert time.perf_counter() - started < 0.15  # marked down: no second timeout
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)
    time.sleep(0.35)
    deadline = time.monotonic() + 10
    while not fetch_found(db, keys, out).all():
        assert time.monotonic() < deadline, db.counters()
        time.sleep(0.1)
    np.testing.assert_array_equal(out, encode(keys, 2))
    db.close()


def test_unreachable_server_is_a_tier_error(free_port: Callable[[], int]) -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(TierError, match="cannot connect"):
        RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=address)))
    with pytest.raises(TierError, match="cannot connect"):
        RedisVolatileDB(VolatileDBConfig(redis=RedisConfig(address=address)))


# --------------------------------------------------------------------------- auth


def test_password(tmp_path: Path, encode: Encode) -> None:
    with RedisProcesses.single(tmp_path, password="s3cret") as server:
        db = RedisVolatileDB(VolatileDBConfig(redis=RedisConfig(address=server.address, password="s3cret"), num_partitions=2))
        db.create_table(T, 2)
        db.insert(T, np.arange(3, dtype=np.int64), encode(np.arange(3), 2))
        assert db.count(T) == 3
        db.close()
        with pytest.raises(TierError, match="authentication failed.*password"):
            RedisVolatileDB(VolatileDBConfig(redis=RedisConfig(address=server.address, password="wrong")))
        with pytest.raises(TierError, match="authentication failed"):
            RedisVolatileDB(VolatileDBConfig(redis=RedisConfig(address=server.address)))


def test_cluster_password(tmp_path: Path) -> None:
    with RedisProcesses.cluster(tmp_path, nodes=3, password="s3cret") as cluster:
        db = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=cluster.address, password="s3cret")))
        db.create_table(T, 2)
        assert db.table_names() == [T]
        db.close()
        with pytest.raises(TierError, match="authentication failed"):
            RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=cluster.address, password="wrong")))


# --------------------------------------------------------------------------- config


def test_factory_picks_cluster_or_single(redis_for: Callable[[str], RedisProcesses]) -> None:
    cluster, single = redis_for("redis_cluster"), redis_for("redis_single")
    cases = [
        (cluster.address, RedisClusterVolatileDB),
        (cluster.servers[0].address, RedisClusterVolatileDB),  # one node of a cluster
        (single.address, RedisVolatileDB),
    ]
    for address, cls in cases:
        cfg = VolatileDBConfig(type=TierType.REDIS_CLUSTER, redis=RedisConfig(address=address), num_partitions=3,
                               max_batch_size=100)
        db = open_volatile_db(cfg)
        try:
            assert type(db) is cls
            assert (db._num_partitions, db._max_get, db._max_set) == (3, 100, 100)  # type: ignore[union-attr]
        finally:
            assert db is not None
            db.close()


@pytest.mark.parametrize("address", ["", " , ", "host:port", "h:70000", ":7000"])
def test_bad_address_is_a_config_error(address: str) -> None:
    with pytest.raises(ConfigError, match="address"):
        RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=address)))


def test_tls_files_are_checked(tmp_path: Path) -> None:
    tls = TLSConfig(
        enabled=True, ca_certificate=str(tmp_path), client_certificate=str(tmp_path / "missing.pem"),
        client_key=str(tmp_path / "key.pem"), server_name_identification="redis.localhost",
    )
    cfg = VolatileDBConfig(type=TierType.REDIS_CLUSTER, redis=RedisConfig(address="127.0.0.1:7000", tls=tls))
    with pytest.raises(ConfigError, match="tls_client_certificate"):
        RedisClusterVolatileDB(cfg)
