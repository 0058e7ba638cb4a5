"""HashMapVolatileDB beyond the shared contract: growth, chunking, threads, config."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest

from hps_core.db import HashMapVolatileDB, VolatileDB, open_volatile_db
from hps_core.errors import ConfigError

Encode = Callable[[np.ndarray, int], np.ndarray]
T = "hps_et.model.table"


def check_all(db: HashMapVolatileDB, keys: np.ndarray, encode: Encode, dim: int) -> None:
    out = np.zeros((len(keys), dim), np.float32)
    found = db.fetch(T, keys, out)
    assert found.all()
    np.testing.assert_array_equal(out, encode(keys, dim))


def test_growth_across_many_inserts(encode: Encode) -> None:
    db = HashMapVolatileDB(num_partitions=3, initial_capacity=0)
    db.create_table(T, 4)
    keys = np.random.default_rng(1).permutation(200_000).astype(np.int64) * 7919
    for start in range(0, len(keys), 997):  # many small batches: many rehashes
        chunk = keys[start : start + 997]
        db.insert(T, chunk, encode(chunk, 4))
    assert db.count(T) == len(keys)
    check_all(db, keys, encode, 4)
    for part in db._table(T).partitions:
        assert 2 * part.n_rows <= part.capacity  # load factor <= 1/2
        assert part.capacity & (part.capacity - 1) == 0  # power of two
        assert part.n_rows > 0  # the hash spreads keys over every partition
    assert 4 * 4 < db.bytes_per_row(T) < 4 * 4 + 4 * 16 + 32


def test_initial_capacity_avoids_rehash(encode: Encode) -> None:
    db = HashMapVolatileDB(num_partitions=2, initial_capacity=10_000)
    db.create_table(T, 2)
    before = [p.slots for p in db._table(T).partitions]
    keys = np.arange(8_000, dtype=np.int64)
    db.insert(T, keys, encode(keys, 2))
    assert all(p.slots is b for p, b in zip(db._table(T).partitions, before))
    check_all(db, keys, encode, 2)


def test_small_batch_limits_chunk_without_changing_results(encode: Encode) -> None:
    db = HashMapVolatileDB(num_partitions=2, max_get_batch_size=7, max_set_batch_size=5)
    db.create_table(T, 3)
    keys = np.array([5, 9, 5, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 5], np.int64)
    values = encode(keys, 3)
    values[-1] += 100  # the last duplicate of 5 must win across chunk boundaries
    db.insert(T, keys, values)
    out = np.zeros((3, 3), np.float32)
    assert db.fetch(T, np.array([5, 9, 11], np.int64), out).all()
    np.testing.assert_array_equal(out, values[[13, 10, 12]])


def test_single_partition(encode: Encode) -> None:
    db = HashMapVolatileDB(num_partitions=1)
    db.create_table(T, 2)
    keys = np.arange(-500, 500, dtype=np.int64)
    db.insert(T, keys, encode(keys, 2))
    check_all(db, keys, encode, 2)


def test_concurrent_readers_and_writers_never_see_a_wrong_vector(encode: Encode) -> None:
    """Writers keep adding keys (forcing rehashes and value-array growth) and rewriting
    old ones with a new version; readers check every row they get back: it must encode its
    key, and all of it must come from one write (version added to every column)."""
    dim = 32
    db = HashMapVolatileDB(num_partitions=4, max_set_batch_size=2_000)
    db.create_table(T, dim)
    seed = np.arange(5_000, dtype=np.int64)
    db.insert(T, seed, encode(seed, dim))
    errors: list[str] = []
    stop = threading.Event()

    def writer(offset: int) -> None:
        rng = np.random.default_rng(offset)
        for step in range(150):
            fresh = np.arange(step * 1_000, (step + 1) * 1_000, dtype=np.int64) * 4 + offset + 10_000
            old = rng.integers(0, 5_000, 2_000).astype(np.int64)
            batch = np.concatenate([fresh, old])
            db.insert(T, batch, encode(batch, dim) + np.float32(step + 1))  # exact: < 2**24

    def reader(seed_: int) -> None:
        rng = np.random.default_rng(100 + seed_)
        while not stop.is_set():
            keys = rng.integers(0, 610_000, 4_096).astype(np.int64)
            keys[:1024] = rng.integers(0, 5_000, 1024)  # always-present keys
            out = np.full((len(keys), dim), np.nan, np.float32)
            found = db.fetch(T, keys, out)
            if not found[:1024].all():
                errors.append("a seeded key was reported missing")
            got, want = out[found], encode(keys[found], dim)
            version = got[:, :1] - want[:, :1]
            if not np.array_equal(got - version, want):
                errors.append("a fetched vector does not match its key or mixes two writes")
            if not np.isnan(out[~found]).all():
                errors.append("a miss wrote into out")

    writers = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    readers = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]
    assert db.count(T) == 5_000 + 2 * 150 * 1_000


def test_is_a_volatile_db() -> None:
    assert isinstance(HashMapVolatileDB(), VolatileDB)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_partitions": 0}, {"max_get_batch_size": -1}, {"max_set_batch_size": 1.5}, {"initial_capacity": -3}],
)
def test_bad_settings_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        HashMapVolatileDB(**kwargs)  # type: ignore[arg-type]


def test_from_config_reads_hugectr_field_names() -> None:
    cfg = SimpleNamespace(type="hash_map", num_partitions=3, max_get_batch_size=11, max_set_batch_size=13)
    db = HashMapVolatileDB.from_config(cfg)
    assert (db._num_partitions, db._max_get, db._max_set) == (3, 11, 13)


@pytest.mark.parametrize("kind", ["hash_map", "parallel_hash_map"])
def test_open_volatile_db(kind: str) -> None:
    db = open_volatile_db(SimpleNamespace(type=kind, num_partitions=2))
    assert isinstance(db, HashMapVolatileDB)


def test_open_volatile_db_disabled_and_unsupported() -> None:
    assert open_volatile_db(SimpleNamespace(type="disabled")) is None
    with pytest.raises(ConfigError, match="not available yet"):
        open_volatile_db(SimpleNamespace(type="redis_cluster"))
    with pytest.raises(ConfigError, match="volatile_db.type"):
        open_volatile_db(SimpleNamespace(type="memcached"))
