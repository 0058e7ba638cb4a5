"""``fetch_tables``: the keys of many tables in one call, on every tier (fixture ``tier``).

A lookup asks each tier once per batch whatever its table count, so these tests check
that one multi-table call answers exactly what per-table ``fetch`` calls would (rows of
different widths landing at arbitrary offsets of one flat buffer, misses untouched), that
bad batches are refused before anything is written, and that the call really is one
call: one pipeline per Redis node, one hand-off per read thread in RocksDB. Redis node
failures are real (a killed ``redis-server``), as in test_redis_cluster.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from hps_core.config import PersistentDBConfig, RedisConfig, VolatileDBConfig
from hps_core.db import EmbeddingTier, RedisClusterVolatileDB, RocksDBPersistentDB
from hps_core.db import _redis_layout as layout
from hps_core.errors import PartialTierError, RequestError, StoredWidthError, TierError, UnknownTableError
from tests.redis_servers import RedisProcesses

DIMS = (1, 3, 16, 7, 128)
FILL = -7.0  # what `out` holds where nothing may be written
INT64 = np.iinfo(np.int64)
EXTREME_KEYS = np.array([INT64.min, INT64.max, 0, -1, 1, INT64.min + 1, 2**32 - 1], dtype=np.int64)


@dataclass
class Loaded:
    """Tables written into a tier, and what each holds (the reference for every check)."""

    names: tuple[str, ...]
    dims: np.ndarray  # (T,) int64
    keys: list[np.ndarray]  # per table, sorted distinct int64
    values: list[np.ndarray]  # per table, (len(keys[t]), dim) float32

    def expected(self, ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Found mask and row (or None) of each (table id, key): a NumPy reference."""
        found = np.zeros(len(keys), np.bool_)
        rows: list[np.ndarray | None] = [None] * len(keys)
        for t in range(len(self.names)):
            mine = np.flatnonzero(ids == t)
            where = np.clip(np.searchsorted(self.keys[t], keys[mine]), 0, max(len(self.keys[t]) - 1, 0))
            hit = (self.keys[t][where] == keys[mine]) if len(self.keys[t]) else np.zeros(len(mine), np.bool_)
            found[mine] = hit
            for i, w in zip(mine[hit].tolist(), where[hit].tolist()):
                rows[i] = self.values[t][w]
        return found, rows


def load(tier: Any, dims: tuple[int, ...], rows_per_table: int, seed: int = 0) -> Loaded:
    """Tables ``hps_et.model.t<i>`` of widths ``dims``; key sets overlap between tables (the
    same key holds a different row in each) and include the extreme int64 keys."""
    rng = np.random.default_rng(seed)
    names = tuple(f"hps_et.model.t{i}" for i in range(len(dims)))
    keys, values = [], []
    for name, dim in zip(names, dims):
        tier.create_table(name, dim)
        drawn = rng.integers(-5_000, 5_000, rows_per_table)
        k = np.unique(np.concatenate([drawn, EXTREME_KEYS])).astype(np.int64)
        v = rng.standard_normal((len(k), dim)).astype(np.float32)
        shuffled = rng.permutation(len(k))  # inserted in random order
        tier.insert(name, k[shuffled], v[shuffled])
        keys.append(k)
        values.append(v)
    return Loaded(names, np.asarray(dims, np.int64), keys, values)


def query(loaded: Loaded, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(table ids, keys) interleaved across tables in random order: stored keys, keys stored
    only in another table, keys stored nowhere, and duplicates."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(loaded.names), n).astype(np.int64)
    pool = np.concatenate([*loaded.keys, rng.integers(10_000, 20_000, 200)])
    keys = rng.choice(pool, n).astype(np.int64)  # with replacement: duplicates
    return ids, keys


def scattered_offsets(dims: np.ndarray, ids: np.ndarray, seed: int = 2) -> tuple[np.ndarray, int]:
    """Non-overlapping row offsets in shuffled order with gaps between rows; returns
    (offsets (n,) int64, buffer size)."""
    rng = np.random.default_rng(seed)
    widths = dims[ids]
    placed = rng.permutation(len(ids))  # placed[j]: the key whose row is j-th in the buffer
    room = widths[placed] + rng.integers(0, 3, len(ids))  # gaps must stay untouched too
    starts = np.concatenate([[0], np.cumsum(room)[:-1]]).astype(np.int64)
    offsets = np.empty(len(ids), np.int64)
    offsets[placed] = starts
    return offsets, int(room.sum()) + 1


def reference_out(
    loaded: Loaded, ids: np.ndarray, keys: np.ndarray, offsets: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The found mask and the buffer fetch_tables must leave (FILL where nothing is found)."""
    found, rows = loaded.expected(ids, keys)
    out = np.full(size, FILL, np.float32)
    for i in np.flatnonzero(found).tolist():
        row = rows[i]
        assert row is not None
        out[offsets[i] : offsets[i] + len(row)] = row
    return found, out


def fetch_all(
    tier: Any, loaded: Loaded, ids: np.ndarray, keys: np.ndarray, offsets: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    out = np.full(size, FILL, np.float32)
    found = tier.fetch_tables(loaded.names, ids, keys, out, offsets)
    return found, out


# --------------------------------------------------------------------------- contract


def test_rows_of_every_width_land_at_their_offsets(tier: EmbeddingTier) -> None:
    loaded = load(tier, DIMS, 300)
    ids, keys = query(loaded, 3_000)
    offsets, size = scattered_offsets(loaded.dims, ids)
    found, out = fetch_all(tier, loaded, ids, keys, offsets, size)
    want_found, want_out = reference_out(loaded, ids, keys, offsets, size)
    assert found.dtype == np.bool_ and found.shape == (len(keys),)
    assert 0 < found.sum() < len(keys)  # hits and misses both
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(out, want_out)  # misses and gaps still hold FILL


def test_equals_per_table_fetch_for_26_tables(tier: EmbeddingTier) -> None:
    dims = tuple(DIMS[i % len(DIMS)] for i in range(26))
    loaded = load(tier, dims, 60, seed=3)
    ids, keys = query(loaded, 2_000, seed=4)
    offsets, size = scattered_offsets(loaded.dims, ids, seed=5)
    found, out = fetch_all(tier, loaded, ids, keys, offsets, size)
    for t, name in enumerate(loaded.names):
        mine = np.flatnonzero(ids == t)
        one = np.full((len(mine), dims[t]), FILL, np.float32)
        np.testing.assert_array_equal(found[mine], tier.fetch(name, keys[mine], one))
        rows = out[offsets[mine][:, None] + np.arange(dims[t])]
        np.testing.assert_array_equal(rows, one)


def test_extreme_and_uint32_keys(tier: EmbeddingTier) -> None:
    loaded = load(tier, DIMS, 10)
    ids = np.repeat(np.arange(len(DIMS), dtype=np.int64), len(EXTREME_KEYS))
    keys = np.tile(EXTREME_KEYS, len(DIMS))
    offsets, size = scattered_offsets(loaded.dims, ids)
    found, out = fetch_all(tier, loaded, ids, keys, offsets, size)
    assert found.all()
    np.testing.assert_array_equal(out, reference_out(loaded, ids, keys, offsets, size)[1])

    wide = np.array([0, 1, 2**32 - 1], np.uint32)  # uint32 accepted; 2**32-1 is not key -1
    ids32 = np.array([0, 2, 4], np.int64)
    offsets32, size32 = scattered_offsets(loaded.dims, ids32)
    found32, out32 = fetch_all(tier, loaded, ids32, wide, offsets32, size32)
    assert found32.all()
    want = reference_out(loaded, ids32, wide.astype(np.int64), offsets32, size32)[1]
    np.testing.assert_array_equal(out32, want)


def test_empty_batch(tier: EmbeddingTier) -> None:
    loaded = load(tier, DIMS, 5)
    out = np.full(4, FILL, np.float32)
    none = np.zeros(0, np.int64)
    found = tier.fetch_tables(loaded.names, none, none, out, none)
    assert found.dtype == np.bool_ and found.shape == (0,)
    assert (out == FILL).all()
    assert tier.fetch_tables((), none, none, out, none).shape == (0,)


def test_tables_as_a_list_and_repeated_calls(tier: EmbeddingTier) -> None:
    loaded = load(tier, DIMS, 50)
    ids, keys = query(loaded, 200)
    offsets, size = scattered_offsets(loaded.dims, ids)
    first = fetch_all(tier, loaded, ids, keys, offsets, size)
    again = tier.fetch_tables(list(loaded.names), ids, keys, out := np.full(size, FILL, np.float32), offsets)
    np.testing.assert_array_equal(first[0], again)
    np.testing.assert_array_equal(first[1], out)


def test_unknown_table(tier: EmbeddingTier) -> None:
    loaded = load(tier, DIMS[:2], 5)
    none = np.zeros(0, np.int64)
    with pytest.raises(UnknownTableError, match=r"hps_et\.model\.nope"):
        tier.fetch_tables((*loaded.names, "hps_et.model.nope"), none, none, np.zeros(1, np.float32), none)


def _bad_batches(dims: np.ndarray) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(case, overrides of the good batch, message fragment)."""
    n = 4
    ids = np.array([0, 1, 2, 3], np.int64)
    size = int(dims[ids].sum())
    yield "table id too big", {"table_ids": np.array([0, 1, 2, len(dims)], np.int64)}, "table id"
    yield "negative table id", {"table_ids": np.array([0, -1, 2, 3], np.int64)}, "table id"
    yield "row past the end", {"offsets": np.array([0, 1, 4, size - 1], np.int64)}, "does not fit"
    yield "negative offset", {"offsets": np.array([0, -1, 4, 20], np.int64)}, "does not fit"
    yield "int32 keys", {"keys": np.arange(n, dtype=np.int32)}, "keys"
    yield "float keys", {"keys": np.arange(n, dtype=np.float64)}, "keys"
    yield "int32 table ids", {"table_ids": ids.astype(np.int32)}, "table_ids"
    yield "float offsets", {"offsets": np.zeros(n, np.float64)}, "offsets"
    yield "short offsets", {"offsets": np.zeros(n - 1, np.int64)}, "offsets"
    yield "float64 out", {"out": np.zeros(size, np.float64)}, "float32"
    yield "2-D out", {"out": np.zeros((size, 1), np.float32)}, "1-D"
    yield "strided out", {"out": np.zeros(2 * size, np.float32)[::2]}, "contiguous"
    frozen = np.zeros(size, np.float32)
    frozen.flags.writeable = False
    yield "read-only out", {"out": frozen}, "writeable"
    yield "list of keys", {"keys": [0, 1, 2, 3]}, "keys"


def test_bad_batches_are_refused(tier: EmbeddingTier) -> None:
    loaded = load(tier, DIMS, 5)
    ids = np.array([0, 1, 2, 3], np.int64)
    widths = loaded.dims[ids]
    good = {
        "table_ids": ids,
        "keys": np.array([0, 1, -1, INT64.max], np.int64),
        "offsets": np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64),
    }
    for case, overrides, fragment in _bad_batches(loaded.dims):
        args = {**good, "out": np.full(int(widths.sum()), FILL, np.float32), **overrides}
        with pytest.raises(RequestError, match=fragment):
            tier.fetch_tables(loaded.names, **args)
        if "out" not in overrides:
            assert (args["out"] == FILL).all(), f"{case}: out was written before the batch was refused"


# --------------------------------------------------------------------------- Redis: one round


def _count_sends(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Ports of every ``send_packed_command`` from now on (pipelines and single commands)."""
    sent: list[int] = []
    real = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(int(self.port))
        real(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return sent


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["redis_cluster", "redis_single"])
def test_one_pipeline_per_node_whatever_the_table_count(
    make_tier: Any, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    # small commands: many HMGETs per node, still one send per node
    db = make_tier(kind, num_partitions=8, max_get_batch_size=7)
    dims = tuple(DIMS[i % len(DIMS)] for i in range(26))
    loaded = load(db, dims, 40)
    ids, keys = query(loaded, 2_000)
    offsets, size = scattered_offsets(loaded.dims, ids)
    fetch_all(db, loaded, ids, keys, offsets, size)  # connections opened, tables resolved

    exchanges: list[int] = []
    real_exchange = db._exchange

    def exchange(groups: list[Any]) -> None:
        exchanges.append(len(groups))
        real_exchange(groups)

    monkeypatch.setattr(db, "_exchange", exchange)
    sent = _count_sends(monkeypatch)
    found, out = fetch_all(db, loaded, ids, keys, offsets, size)
    nodes = 3 if kind == "redis_cluster" else 1  # 26 tables x 8 partitions reach every node
    assert exchanges == [nodes]  # one exchange, one pipeline per node
    assert len(sent) == nodes and len(set(sent)) == nodes, sent  # one send per node
    want_found, want_out = reference_out(loaded, ids, keys, offsets, size)
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(out, want_out)

    exchanges.clear()  # what the same batch cost table by table
    for t, name in enumerate(loaded.names):
        mine = ids == t
        db.fetch(name, keys[mine], np.zeros((int(mine.sum()), dims[t]), np.float32))
    assert len(exchanges) == len(loaded.names)


def _node_ports(address: str, names: tuple[str, ...], num_partitions: int) -> np.ndarray:
    """(T, P) port of the node holding each (table, partition) hash, asked of the cluster."""
    host, port = address.split(",")[0].split(":")
    client = redis.RedisCluster(host=host, port=int(port))
    try:
        return np.array(
            [[client.get_node_from_key(layout.value_hkey(n, p)).port for p in range(num_partitions)] for n in names]
        )
    finally:
        client.close()


@pytest.mark.redis
def test_killed_node_misses_only_its_keys_across_tables(tmp_path: Path) -> None:
    with RedisProcesses.cluster(tmp_path, nodes=3) as cluster:
        db = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=cluster.address), num_partitions=8), retry_after=5.0)
        try:
            dims = tuple(DIMS[i % len(DIMS)] for i in range(12))
            loaded = load(db, dims, 200)
            ids, keys = query(loaded, 4_000)
            offsets, size = scattered_offsets(loaded.dims, ids)
            ports = _node_ports(cluster.address, loaded.names, 8)[ids, layout.partition_of(keys, 8)]
            victim = cluster.servers[1]
            on_victim = ports == victim.port
            assert 0 < on_victim.sum() < len(keys)
            want_found, want_out = reference_out(loaded, ids, keys, offsets, size)

            victim.kill()
            out = np.full(size, FILL, np.float32)
            with pytest.raises(PartialTierError, match="keys are on nodes that failed") as partial:
                db.fetch_tables(loaded.names, ids, keys, out, offsets)
            found = partial.value.found  # the healthy nodes' rows are written, and marked
            np.testing.assert_array_equal(partial.value.failed, on_victim)
            np.testing.assert_array_equal(found, want_found & ~on_victim)
            survivors = np.full(size, FILL, np.float32)
            for i in np.flatnonzero(found).tolist():
                w = int(loaded.dims[ids[i]])
                survivors[offsets[i] : offsets[i] + w] = want_out[offsets[i] : offsets[i] + w]
            np.testing.assert_array_equal(out, survivors)  # the dead node's rows untouched
            assert db.errors == 1 and db.error_keys == on_victim.sum()
            assert db.counters()["down_nodes"] == [f"127.0.0.1:{victim.port}"]

            with pytest.raises(PartialTierError) as skipped:  # skipped: counted, not failed again
                fetch_all(db, loaded, ids, keys, offsets, size)
            np.testing.assert_array_equal(skipped.value.found, found)
            np.testing.assert_array_equal(skipped.value.failed, on_victim)
            assert db.errors == 1 and db.error_keys == 2 * on_victim.sum()
            with pytest.raises(TierError, match="insert"):
                db.insert(loaded.names[0], loaded.keys[0], loaded.values[0])
        finally:
            db.close()


@pytest.mark.redis
def test_redis_wrong_stored_width_names_its_table(make_tier: Any, redis_for: Any) -> None:
    db = make_tier("redis_single", num_partitions=2)
    loaded = load(db, (2, 4), 5)
    raw = redis.Redis.from_url(f"redis://{redis_for('redis_single').address}")
    try:
        key = (9_999_999).to_bytes(8, "little", signed=True)
        part = int(layout.partition_of(np.array([9_999_999], np.int64), 2)[0])
        raw.hset(layout.value_hkey(loaded.names[1], part), key, b"\0" * 12)  # 3 floats, not 4
    finally:
        raw.close()
    ids = np.array([0, 1], np.int64)
    keys = np.array([int(loaded.keys[0][0]), 9_999_999], np.int64)
    with pytest.raises(TierError, match=r"hps_et\.model\.t1.*16"):
        db.fetch_tables(loaded.names, ids, keys, np.zeros(6, np.float32), np.array([0, 2], np.int64))


# --------------------------------------------------------------------------- RocksDB: the read pool


def test_rocksdb_small_tables_share_one_hand_off_per_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db"), num_threads=2))
    try:
        dims = tuple(DIMS[i % len(DIMS)] for i in range(26))
        loaded = load(db, dims, 60)
        ids, keys = query(loaded, 2_600)  # ~100 keys per table: far below a thread's share
        offsets, size = scattered_offsets(loaded.dims, ids)
        pool = db._read_pool()
        submits: list[int] = []
        real_submit = pool.submit

        def submit(fn: Any, *args: Any) -> Any:
            submits.append(len(args[0]))  # pieces (one per table) in this task
            return real_submit(fn, *args)

        monkeypatch.setattr(pool, "submit", submit)
        found, out = fetch_all(db, loaded, ids, keys, offsets, size)
        if db._read_threads >= 2:  # a 1-core machine reads on the calling thread
            assert len(submits) == 2 and sum(submits) >= 26, submits
        want_found, want_out = reference_out(loaded, ids, keys, offsets, size)
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_array_equal(out, want_out)
    finally:
        db.close()


@pytest.mark.parametrize("num_threads, max_get", [(1, 10_000), (2, 10_000), (2, 37), (4, 1)])
def test_rocksdb_same_rows_for_any_threads_and_chunks(tmp_path: Path, num_threads: int, max_get: int) -> None:
    writer = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    loaded = load(writer, DIMS, 400)
    writer.close()
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db"), read_only=True, num_threads=num_threads, max_get_batch_size=max_get))
    try:
        ids, keys = query(loaded, 3_000)
        offsets, size = scattered_offsets(loaded.dims, ids)
        found, out = fetch_all(db, loaded, ids, keys, offsets, size)
        want_found, want_out = reference_out(loaded, ids, keys, offsets, size)
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_array_equal(out, want_out)
    finally:
        db.close()


def test_rocksdb_wrong_stored_width_names_its_table(tmp_path: Path) -> None:
    from rocksdict import Options, Rdict

    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    loaded = load(db, (2, 4), 5)
    db.close()
    raw = Rdict(str(tmp_path / "db"), Options(raw_mode=True))
    cf = raw.get_column_family(loaded.names[1])
    cf[(9_999_999).to_bytes(8, "little", signed=True)] = b"\0" * 12  # 3 floats, not 4
    cf.close()
    raw.close()
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    try:
        ids = np.array([0, 1], np.int64)
        keys = np.array([int(loaded.keys[0][0]), 9_999_999], np.int64)
        with pytest.raises(StoredWidthError, match=r"hps_et\.model\.t1.*12 bytes, not 16 \(a 4-wide fp32 row\)"):
            db.fetch_tables(loaded.names, ids, keys, np.zeros(6, np.float32), np.array([0, 2], np.int64))
    finally:
        db.close()
