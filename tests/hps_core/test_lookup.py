"""LookupSession: request checks and the volatile → persistent → default cascade.

The tiers are the real in-process hash map and a real RocksDB on disk; a tier that fails is a
small class here, since only its failure matters to the cascade.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from hps_core.config import PersistentDBConfig, RedisConfig, VolatileDBConfig, parse_config
from hps_core.db import HashMapVolatileDB, RocksDBPersistentDB
from hps_core.errors import RequestError, TierError
from hps_core.lookup import LookupSession

DIMS = (4, 3)
DEFAULTS = (-1.0, 2.5)


def _model(tmp_path: Path, max_batch_size: int = 8):
    config = parse_config(
        {
            "models": [
                {
                    "model": "m",
                    "sparse_files": [str(tmp_path / "a"), str(tmp_path / "b")],
                    "embedding_table_names": ["a", "b"],
                    "embedding_vecsize_per_table": list(DIMS),
                    "default_value_for_each_table": list(DEFAULTS),
                    "maxnum_catfeature_query_per_table_per_sample": [2, 1],
                    "max_batch_size": max_batch_size,
                }
            ]
        },
        "test.json",
    )
    return config.model("m")


def _rows(keys: np.ndarray, dim: int) -> np.ndarray:
    """Vectors that encode their key, so a wrong row is visible."""
    return (keys[:, None] * 10 + np.arange(dim)).astype(np.float32)


class FailingTier:
    """A tier whose every fetch fails, as a Redis node that is down."""

    def fetch_tables(self, tables, table_ids, keys, out, offsets) -> np.ndarray:
        raise TierError("node down")


@pytest.fixture()
def tiers(tmp_path: Path):
    model = _model(tmp_path)
    volatile = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))
    persistent = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "rocksdb")))
    for table in model.tables:
        volatile.create_table(table.qualified_name, table.dim)
        persistent.create_table(table.qualified_name, table.dim)
    # keys 0..9 in RocksDB, 0..4 also in the hash map; 10+ nowhere
    for table in model.tables:
        all_keys = np.arange(10, dtype=np.int64)
        persistent.insert(table.qualified_name, all_keys, _rows(all_keys, table.dim))
        volatile.insert(table.qualified_name, all_keys[:5], _rows(all_keys[:5], table.dim))
    yield model, volatile, persistent
    persistent.close()


def _expected(keys_a: np.ndarray, keys_b: np.ndarray, found_below: int = 10) -> np.ndarray:
    parts = []
    for keys, dim, default in zip((keys_a, keys_b), DIMS, DEFAULTS):
        rows = _rows(keys, dim)
        rows[keys >= found_below] = default
        parts.append(rows.ravel())
    return np.concatenate(parts)


def test_cascade_returns_rows_from_each_tier_and_defaults(tiers) -> None:
    model, volatile, persistent = tiers
    session = LookupSession(model, volatile=volatile, persistent=persistent)
    a = np.array([1, 7, 12, 1, 9], dtype=np.int64)
    b = np.array([3, 11, 6], dtype=np.int64)
    out = session.lookup(np.concatenate([a, b]), np.array([5, 3], dtype=np.int32))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, _expected(a, b))
    counters = session.counters()
    assert counters["a"]["keys"] == 5 and counters["a"]["unique_keys"] == 4
    assert counters["a"]["volatile_hits"] == 1 and counters["a"]["persistent_hits"] == 2
    assert counters["a"]["defaults"] == 1
    assert counters["b"]["volatile_hits"] == 1 and counters["b"]["persistent_hits"] == 1


def test_counters_seen_mid_lookup_never_hold_more_answers_than_keys(tiers) -> None:
    """Metrics are scraped while requests run: a snapshot must never show a tier's hits
    ahead of the unique keys they answered (a hit rate above 1 in the end-to-end benchmark)."""
    model, volatile, persistent = tiers
    session = LookupSession(model, volatile=volatile, persistent=persistent)
    stop = threading.Event()

    def serve() -> None:
        request = np.array([1, 7, 12, 9, 3], dtype=np.int64)
        while not stop.is_set():
            session.lookup(request, np.array([3, 2], dtype=np.int32))

    workers = [threading.Thread(target=serve) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        for _ in range(20_000):
            for c in session.counters().values():
                answered = c["volatile_hits"] + c["persistent_hits"] + c["defaults"]
                assert answered == c["unique_keys"], c
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert session.counters()["a"]["unique_keys"] > 0


def test_failing_tier_falls_through_to_the_next(tiers) -> None:
    model, _, persistent = tiers
    session = LookupSession(model, volatile=FailingTier(), persistent=persistent)  # type: ignore[arg-type]
    a = np.array([1, 2, 15], dtype=np.int64)
    b = np.array([4], dtype=np.int64)
    out = session.lookup(np.concatenate([a, b]), np.array([3, 1], dtype=np.int32))
    np.testing.assert_array_equal(out, _expected(a, b))
    assert session.counters()["a"]["tier_errors"] == 1


def test_no_tiers_gives_defaults(tmp_path: Path) -> None:
    session = LookupSession(_model(tmp_path), volatile=None, persistent=None)
    out = session.lookup(np.array([1, 2, 3], dtype=np.int64), np.array([2, 1], dtype=np.int32))
    np.testing.assert_array_equal(out, np.array([-1.0] * 8 + [2.5] * 3, dtype=np.float32))


def test_uint32_keys_are_accepted(tiers) -> None:
    model, volatile, persistent = tiers
    session = LookupSession(model, volatile=volatile, persistent=persistent)
    keys = np.array([1, 8, 3], dtype=np.uint32)
    out = session.lookup(keys, np.array([2, 1], dtype=np.int32))
    np.testing.assert_array_equal(out, _expected(keys[:2].astype(np.int64), keys[2:].astype(np.int64)))


def test_batched_request_answers_each_row(tiers) -> None:
    model, volatile, persistent = tiers
    session = LookupSession(model, volatile=volatile, persistent=persistent)
    keys = np.array([[1, 2, 3], [4, 12, 8]], dtype=np.int64)
    numkeys = np.array([[2, 1], [2, 1]], dtype=np.int32)
    out = session.lookup(keys, numkeys)
    assert out.shape == (2, 2 * 4 + 3)
    np.testing.assert_array_equal(out[1], _expected(keys[1, :2], keys[1, 2:]))


class CountingTier:
    """A real tier, with its calls counted (the tier itself answers)."""

    def __init__(self, tier) -> None:
        self.tier = tier
        self.calls: list[str] = []

    def fetch_tables(self, tables, table_ids, keys, out, offsets) -> np.ndarray:
        self.calls.append("fetch_tables")
        return self.tier.fetch_tables(tables, table_ids, keys, out, offsets)

    def fetch(self, table, keys, out) -> np.ndarray:  # pragma: no cover - must not be called
        self.calls.append("fetch")
        return self.tier.fetch(table, keys, out)


def _wide_model(tmp_path: Path, tables: int):
    config = parse_config(
        {
            "models": [
                {
                    "model": "wide",
                    "sparse_files": [str(tmp_path / f"t{i}") for i in range(tables)],
                    "embedding_table_names": [f"t{i}" for i in range(tables)],
                    "embedding_vecsize_per_table": [(3, 8, 1)[i % 3] for i in range(tables)],
                    "maxnum_catfeature_query_per_table_per_sample": [2] * tables,
                    "max_batch_size": 64,
                }
            ]
        },
        "test.json",
    )
    return config.model("wide")


@pytest.mark.parametrize("tables", [1, 26])
def test_one_call_per_tier_per_batch_whatever_the_table_count(tmp_path: Path, tables: int) -> None:
    model = _wide_model(tmp_path, tables)
    volatile = HashMapVolatileDB(VolatileDBConfig(num_partitions=4))
    persistent = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "rocksdb")))
    rng = np.random.default_rng(tables)
    for table in model.tables:
        keys = np.arange(100, dtype=np.int64)
        for db, held in ((persistent, keys), (volatile, keys[:50])):
            db.create_table(table.qualified_name, table.dim)
            db.insert(table.qualified_name, held, _rows(held, table.dim))
    counted_v, counted_p = CountingTier(volatile), CountingTier(persistent)
    session = LookupSession(model, volatile=counted_v, persistent=counted_p)  # type: ignore[arg-type]
    requests = []
    for _ in range(3):  # three requests answered in one pass, as one execute() with dynamic batching
        samples = int(rng.integers(1, 20))
        numkeys = np.full(tables, samples, np.int32)
        requests.append((rng.integers(0, 120, size=tables * samples).astype(np.int64), numkeys))
    answers = session.lookup_requests(requests)
    assert counted_v.calls == ["fetch_tables"] and counted_p.calls == ["fetch_tables"]
    for (keys, numkeys), answer in zip(requests, answers):
        parts = np.split(keys, np.cumsum(numkeys)[:-1])
        expected = []
        for table, part in zip(model.tables, parts):
            rows = _rows(part, table.dim)
            rows[part >= 100] = table.default_value
            expected.append(rows.ravel())
        np.testing.assert_array_equal(answer, np.concatenate(expected))
    persistent.close()


def test_a_bad_request_fails_alone_in_a_batch(tiers) -> None:
    model, volatile, persistent = tiers
    session = LookupSession(model, volatile=volatile, persistent=persistent)
    good = (np.array([1, 7, 3], np.int64), np.array([2, 1], np.int32))
    bad = (np.array([1, 7, 3], np.int64), np.array([2, 2], np.int32))
    answers = session.lookup_requests([good, bad, good])
    assert isinstance(answers[1], RequestError) and "sums to 4" in str(answers[1])
    np.testing.assert_array_equal(answers[0], _expected(good[0][:2], good[0][2:]))
    np.testing.assert_array_equal(answers[2], answers[0])


@pytest.mark.redis
def test_partial_redis_failure_serves_healthy_rows_and_counts_only_the_tables_it_hit(tmp_path: Path) -> None:
    """One node of a real 3-node cluster killed: the rows of the other nodes are served from
    Redis, the dead node's from RocksDB, and a tier error is counted for the table that had
    keys on it, not for the one whose keys all live on healthy nodes."""
    import redis

    from hps_core.db import RedisClusterVolatileDB
    from hps_core.db import _redis_layout as layout
    from tests.redis_servers import RedisProcesses

    model = _model(tmp_path)
    names = [t.qualified_name for t in model.tables]
    with RedisProcesses.cluster(tmp_path / "redis", nodes=3) as cluster:
        volatile = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=cluster.address), num_partitions=8), retry_after=60.0)
        persistent = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "rocksdb")))
        raw = redis.RedisCluster(host="127.0.0.1", port=cluster.servers[0].port)
        try:
            victim = cluster.servers[1].port
            candidates = np.arange(200, dtype=np.int64)
            on_victim = {
                name: np.array([raw.get_node_from_key(layout.value_hkey(name, p)).port == victim for p in range(8)])[
                    layout.partition_of(candidates, 8)]
                for name in names
            }
            a = np.concatenate([candidates[on_victim[names[0]]][:3], candidates[~on_victim[names[0]]][:4]])
            b = candidates[~on_victim[names[1]]][:5]
            for table, keys in zip(model.tables, (a, b)):
                for db, shift in ((volatile, 100), (persistent, 0)):
                    db.create_table(table.qualified_name, table.dim)
                    db.insert(table.qualified_name, keys, _rows(keys, table.dim) + shift)
            session = LookupSession(model, volatile=volatile, persistent=persistent)
            cluster.servers[1].kill()
            for _ in range(2):  # the failure, then the node skipped while marked down
                out = session.lookup(np.concatenate([a, b]), np.array([a.size, b.size], np.int32))
                want_a = _rows(a, DIMS[0]) + np.where(on_victim[names[0]][a], 0, 100)[:, None]
                want_b = _rows(b, DIMS[1]) + 100
                np.testing.assert_array_equal(out, np.concatenate([want_a.ravel(), want_b.ravel()]))
            counters = session.counters()
            assert counters["a"]["tier_errors"] == 2 and counters["b"]["tier_errors"] == 0
            assert counters["a"]["volatile_hits"] == 2 * 4 and counters["a"]["persistent_hits"] == 2 * 3
            assert counters["b"]["volatile_hits"] == 2 * 5 and counters["a"]["defaults"] == 0
            session.close()
        finally:
            raw.close()
            volatile.close()
            persistent.close()
