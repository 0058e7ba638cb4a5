"""HashMapVolatileDB beyond the shared contract: growth, chunking, threads, config,
overflow policies, removal, packed rows."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from hps_core.config import OverflowConfig, TierType, VolatileDBConfig
from hps_core.db import HashMapVolatileDB, VolatileDB, open_volatile_db
from hps_core.db.hash_map import _NO_STAT, estimate_bytes_per_row
from hps_core.errors import ConfigError, RowValueError, TierError, UnknownTableError
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack, unpack

Encode = Callable[[np.ndarray, int], np.ndarray]
T = "hps_et.model.table"


def check_all(db: HashMapVolatileDB, keys: np.ndarray, encode: Encode, dim: int) -> None:
    out = np.zeros((len(keys), dim), np.float32)
    found = db.fetch(T, keys, out)
    assert found.all()
    np.testing.assert_array_equal(out, encode(keys, dim))


def test_growth_across_many_inserts(encode: Encode) -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=3), initial_capacity=0)
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
    # key 8 B + vector 16 B per row, rows grown x2 at most, slots at load 1/4..1/2
    assert 24 + 2 * 16 <= db.bytes_per_row(T) < 2 * 24 + 4 * 16


def test_initial_capacity_avoids_rehash(encode: Encode) -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=2), initial_capacity=10_000)
    db.create_table(T, 2)
    before = [p.slots for p in db._table(T).partitions]
    keys = np.arange(8_000, dtype=np.int64)
    db.insert(T, keys, encode(keys, 2))
    assert all(p.slots is b for p, b in zip(db._table(T).partitions, before))
    check_all(db, keys, encode, 2)


def test_small_batch_limits_chunk_without_changing_results(encode: Encode) -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=2, max_get_batch_size=7, max_set_batch_size=5))
    db.create_table(T, 3)
    keys = np.array([5, 9, 5, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 5], np.int64)
    values = encode(keys, 3)
    values[-1] += 100  # the last duplicate of 5 must win across chunk boundaries
    db.insert(T, keys, values)
    out = np.zeros((3, 3), np.float32)
    assert db.fetch(T, np.array([5, 9, 11], np.int64), out).all()
    np.testing.assert_array_equal(out, values[[13, 10, 12]])


def test_single_partition(encode: Encode) -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=1))
    db.create_table(T, 2)
    keys = np.arange(-500, 500, dtype=np.int64)
    db.insert(T, keys, encode(keys, 2))
    check_all(db, keys, encode, 2)


def test_concurrent_readers_and_writers_never_see_a_wrong_vector(encode: Encode) -> None:
    """Writers keep adding keys (forcing rehashes and value-array growth) and rewriting
    old ones with a new version; readers check every row they get back: it must encode its
    key, and all of it must come from one write (version added to every column)."""
    dim = 32
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=4, max_set_batch_size=2_000))
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
    [
        {"num_partitions": 0},
        {"max_get_batch_size": 0},
        {"max_get_batch_size": -1},
        {"max_set_batch_size": 0},
        {"max_set_batch_size": 1.5},
        {"initial_capacity": -3},
        {"overflow_margin": 0},
        {"overflow_policy": "evict_newest"},
        {"overflow_resolution_target": 1.0},
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict[str, object]) -> None:
    (name, value), = kwargs.items()
    with pytest.raises(ConfigError, match=name):
        if name == "initial_capacity":
            HashMapVolatileDB(initial_capacity=value)  # type: ignore[arg-type]
        elif name.startswith("overflow_"):  # HugeCTR's flat name → the nested overflow section
            HashMapVolatileDB(VolatileDBConfig(overflow=OverflowConfig(**{name[len("overflow_"):]: value})))  # type: ignore[arg-type]
        else:
            HashMapVolatileDB(VolatileDBConfig(**kwargs))  # type: ignore[arg-type]


def test_reads_its_config_section() -> None:
    cfg = VolatileDBConfig(
        type=TierType.HASH_MAP, num_partitions=3, max_get_batch_size=11, max_set_batch_size=13,
        overflow=OverflowConfig(margin=100, policy="evict_least_used", resolution_target=0.5),
    )
    db = HashMapVolatileDB(cfg)
    assert (db._num_partitions, db._max_get, db._max_set) == (3, 11, 13)
    assert (db.overflow_margin, db.overflow_policy, db.overflow_resolution_target) == (
        100, "evict_least_used", 0.5
    )


def test_config_defaults_never_evict() -> None:
    db = HashMapVolatileDB(VolatileDBConfig())
    assert db.overflow_margin == 2**64 - 1 and db.overflow_policy == "evict_random"
    assert db._stat == _NO_STAT  # no margin: rows keep no access stat, fetch skips the bookkeeping


@pytest.mark.parametrize("kind", ["hash_map", "parallel_hash_map"])
def test_open_volatile_db(kind: str) -> None:
    db = open_volatile_db(VolatileDBConfig(type=TierType(kind), num_partitions=2, host_shared=False))
    assert isinstance(db, HashMapVolatileDB)


def test_open_volatile_db_disabled_and_unsupported() -> None:
    assert open_volatile_db(VolatileDBConfig(type=TierType.DISABLED)) is None
    with pytest.raises(ConfigError, match="volatile_db.type"):
        open_volatile_db(VolatileDBConfig(type="memcached"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="volatile_db.type"):
        open_volatile_db(VolatileDBConfig(type=TierType.ROCKS_DB))  # a persistent tier


# --------------------------------------------------------------------------- removal


def test_remove_returns_count_and_leaves_others_intact(encode: Encode) -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=3, max_set_batch_size=17))
    db.create_table(T, 5)
    keys = np.random.default_rng(2).permutation(20_000).astype(np.int64) - 10_000
    db.insert(T, keys, encode(keys, 5))
    gone = keys[::3].copy()
    absent = np.array([10**12, 10**12 + 1], np.int64)
    assert db.remove(T, np.concatenate([gone, absent, gone[:5]])) == len(gone)
    assert db.count(T) == len(keys) - len(gone)
    out = np.full((len(gone), 5), -1, np.float32)
    assert not db.fetch(T, gone, out).any()
    assert (out == -1).all()  # a removed key is a clean miss
    kept = np.setdiff1d(keys, gone)
    check_all(db, kept, encode, 5)
    # re-inserting reuses the freed rows: no growth of the value arrays
    sizes = [p.values.shape[0] for p in db._table(T).partitions]
    db.insert(T, gone, encode(gone, 5) + 1)
    assert [p.values.shape[0] for p in db._table(T).partitions] == sizes
    out = np.zeros((len(gone), 5), np.float32)
    assert db.fetch(T, gone, out).all()
    np.testing.assert_array_equal(out, encode(gone, 5) + 1)


def test_remove_keeps_probe_chains_intact() -> None:
    """Keys that collide in a tiny table form long probe runs that wrap around the slot
    array; backward-shift deletion must keep every remaining key reachable."""
    rng = np.random.default_rng(3)
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=1))
    db.create_table(T, 1)
    alive: set[int] = set()
    for _ in range(300):
        batch = rng.integers(0, 64, 8).astype(np.int64)
        if rng.random() < 0.5:
            db.insert(T, batch, batch[:, None].astype(np.float32))
            alive.update(batch.tolist())
        else:
            db.remove(T, batch)
            alive.difference_update(batch.tolist())
        probe = np.arange(64, dtype=np.int64)
        out = np.full((64, 1), -1, np.float32)
        found = db.fetch(T, probe, out)
        assert set(probe[found].tolist()) == alive
        np.testing.assert_array_equal(out[found, 0], probe[found])
        assert db.count(T) == len(alive)


def test_evict_and_drop_table(encode: Encode) -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))
    db.create_table(T, 3)
    keys = np.arange(100, dtype=np.int64)
    db.insert(T, keys, encode(keys, 3))
    assert db.memory_bytes() == db.memory_bytes(T) > 100 * 12
    assert db.evict_table(T) == 100
    assert db.count(T) == 0 and db.dim(T) == 3
    assert not db.fetch(T, keys, np.zeros((100, 3), np.float32)).any()
    db.insert(T, keys, encode(keys, 3))
    assert db.drop_table(T) == 100
    assert db.table_names() == []
    assert db.memory_bytes() == 0
    with pytest.raises(UnknownTableError):
        db.count(T)


# --------------------------------------------------------------------------- overflow


def sizes(db: HashMapVolatileDB) -> list[int]:
    return [p.n_rows for p in db._table(T).partitions]


@pytest.mark.parametrize("policy", ["evict_random", "evict_least_used", "evict_oldest"])
def test_overflow_keeps_each_partition_within_margin(policy: str, encode: Encode) -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=4, max_set_batch_size=300, overflow=OverflowConfig(margin=1_000, policy=policy, resolution_target=0.6)))
    db.create_table(T, 8)
    rng = np.random.default_rng(4)
    inserted = np.empty(0, np.int64)
    for step in range(40):
        keys = rng.integers(0, 1 << 40, 700).astype(np.int64)
        db.insert(T, keys, encode(keys, 8))
        inserted = np.concatenate([inserted, keys])
        assert all(n <= 1_000 for n in sizes(db)), sizes(db)
        probe = rng.choice(inserted, 2_000)
        out = np.full((len(probe), 8), np.nan, np.float32)
        found = db.fetch(T, probe, out)
        np.testing.assert_array_equal(out[found], encode(probe[found], 8))  # no wrong vector
        assert np.isnan(out[~found]).all()  # an evicted key is a clean miss
    assert db.count(T) == sum(sizes(db)) and db.count(T) < len(np.unique(inserted))
    # every row left is reachable, and each partition's slots agree with its rows
    for part in db._table(T).partitions:
        assert (part.slots[:, 1] >= 0).sum() == part.n_rows
        assert part.values.shape[0] <= 2 * 1_000  # value slots recycled, not grown


@pytest.mark.parametrize("policy", ["evict_random", "evict_least_used", "evict_oldest"])
def test_overflow_shrinks_to_resolution_target(policy: str, encode: Encode) -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=1, overflow=OverflowConfig(margin=100, policy=policy, resolution_target=0.7)))
    db.create_table(T, 2)
    keys = np.arange(100, dtype=np.int64)
    db.insert(T, keys, encode(keys, 2))
    assert db.count(T) == 100  # at the margin, not over it: nothing evicted
    db.insert(T, np.array([100], np.int64), encode(np.array([100]), 2))
    assert db.count(T) == 70  # floor(100 * 0.7)
    one_big = np.arange(1_000, 1_250, dtype=np.int64)  # a batch larger than the margin
    db.insert(T, one_big, encode(one_big, 2))
    assert db.count(T) <= 100


def test_evict_oldest_evicts_least_recently_touched(encode: Encode) -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=1, overflow=OverflowConfig(margin=100, policy="evict_oldest", resolution_target=0.5)))
    db.create_table(T, 2)
    keys = np.arange(100, dtype=np.int64)
    db.insert(T, keys, encode(keys, 2))  # 0..99 in order: 0 is the oldest
    recent = np.arange(0, 30, dtype=np.int64)  # touch 0..29 again: now the newest
    db.fetch(T, recent, np.zeros((30, 2), np.float32))
    db.insert(T, np.array([500], np.int64), encode(np.array([500]), 2))  # 101 rows → keep 50
    # the 51 oldest are 30..80; left: 81..99 (19), 0..29 (30) and 500
    expected = np.concatenate([np.arange(81, 100), recent, [500]])
    stored = np.arange(0, 501, dtype=np.int64)
    found = db.fetch(T, stored, np.zeros((len(stored), 2), np.float32))
    np.testing.assert_array_equal(np.sort(stored[found]), np.sort(expected))


def test_evict_least_used_evicts_fewest_accesses(encode: Encode) -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=1, overflow=OverflowConfig(margin=100, policy="evict_least_used", resolution_target=0.5)))
    db.create_table(T, 2)
    keys = np.arange(100, dtype=np.int64)
    db.insert(T, keys, encode(keys, 2))
    hot = np.arange(50, 99, dtype=np.int64)  # 49 hot keys, fetched 3 times each
    for _ in range(3):
        db.fetch(T, hot, np.zeros((len(hot), 2), np.float32))
    db.fetch(T, keys[:10], np.zeros((10, 2), np.float32))  # recent but used only twice
    db.insert(T, np.array([777], np.int64), encode(np.array([777]), 2))
    # 101 rows → keep 50: the 49 hot keys survive, plus one row of the least-used ties
    found = db.fetch(T, hot, np.zeros((len(hot), 2), np.float32))
    assert found.all()
    assert db.count(T) == 50
    cold = db.fetch(T, keys[:50], np.zeros((50, 2), np.float32))
    assert cold.sum() <= 1


def test_concurrent_inserts_and_fetches_during_evictions(encode: Encode) -> None:
    dim = 16
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=4, max_set_batch_size=500, overflow=OverflowConfig(margin=2_000, policy="evict_oldest", resolution_target=0.5)))
    db.create_table(T, dim)
    errors: list[str] = []
    stop = threading.Event()

    def writer(offset: int) -> None:
        rng = np.random.default_rng(offset)
        for _ in range(200):
            keys = rng.integers(0, 50_000, 1_000).astype(np.int64)
            db.insert(T, keys, encode(keys, dim))

    def reader(seed: int) -> None:
        rng = np.random.default_rng(50 + seed)
        while not stop.is_set():
            keys = rng.integers(0, 50_000, 4_096).astype(np.int64)
            out = np.full((len(keys), dim), np.nan, np.float32)
            found = db.fetch(T, keys, out)
            if not np.array_equal(out[found], encode(keys[found], dim)):
                errors.append("a fetched vector does not belong to its key")
            if not np.isnan(out[~found]).all():
                errors.append("a miss wrote into out")
            for p, part in enumerate(db._table(T).partitions):
                with db._locks.write_locked(p):  # between two lock holds, a partition is within its margin
                    if part.n_rows > 2_000:
                        errors.append("a partition grew beyond the margin")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join()
    stop.set()
    for t in threads[2:]:
        t.join()
    assert not errors, errors[:3]
    assert 0 < db.count(T) <= 4 * 2_000


@pytest.mark.parametrize("max_get", [1, 3, 10_000])
def test_lock_holds_of_any_size_give_the_same_answers(encode: Encode, max_get: int) -> None:
    """fetch_tables releases and retakes a partition's lock every max_get_batch_size keys."""
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=3, max_get_batch_size=max_get))
    names = tuple(f"hps_et.m.t{i}" for i in range(5))
    dims = np.array([1, 3, 8, 2, 5], np.int64)
    for name, dim in zip(names, dims):
        db.create_table(name, int(dim))
        keys = np.arange(0, 200, 2, dtype=np.int64)
        db.insert(name, keys, encode(keys, int(dim)))
    rng = np.random.default_rng(max_get)
    ids = rng.integers(0, 5, 400).astype(np.int64)
    keys = rng.integers(0, 220, 400).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(dims[ids])[:-1]]).astype(np.int64)
    out = np.full(int(dims[ids].sum()), -7.0, np.float32)
    found = db.fetch_tables(names, ids, keys, out, offsets)
    np.testing.assert_array_equal(found, (keys % 2 == 0) & (keys < 200))
    for i in range(400):
        row = out[offsets[i] : offsets[i] + dims[ids[i]]]
        if found[i]:
            np.testing.assert_array_equal(row, encode(keys[i : i + 1], int(dims[ids[i]]))[0])
        else:
            assert (row == -7.0).all()


def test_tables_created_and_grown_while_readers_fetch(encode: Encode) -> None:
    """The lookup kernel finds arrays through a directory of addresses: creating tables (the
    directory grows) and growing partitions (arrays replaced) beside readers must never hand a
    reader a stale address."""
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))
    db.create_table("hps_et.m.t0", 4)
    base = np.arange(50, dtype=np.int64)
    db.insert("hps_et.m.t0", base, encode(base, 4))
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        offsets = np.arange(0, 200, 4, dtype=np.int64)
        while not stop.is_set():
            out = np.zeros(200, np.float32)
            found = db.fetch_tables(("hps_et.m.t0",), np.zeros(50, np.int64), base, out, offsets)
            if not found.all() or not np.array_equal(out.reshape(50, 4), encode(base, 4)):
                errors.append("a reader saw a wrong or missing row")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(1, 150):  # the directory starts with room for 64 entries (32 tables here)
        db.create_table(f"hps_et.m.t{i}", 4)
        more = np.arange(50, 50 + 40 * i, dtype=np.int64)  # t0 grows too: its arrays are replaced
        db.insert("hps_et.m.t0", more[-40:], encode(more[-40:], 4))
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert db.count("hps_et.m.t0") == 50 + 40 * 149


def test_close_beside_readers_raises_tier_error_not_a_crash(encode: Encode) -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))
    db.create_table(T, 4)
    keys = np.arange(2000, dtype=np.int64)
    db.insert(T, keys, encode(keys, 4))
    outcomes: list[str] = []

    def reader() -> None:
        for _ in range(2000):
            try:
                db.fetch(T, keys, np.zeros((2000, 4), np.float32))
            except TierError:
                outcomes.append("closed")
                return
        outcomes.append("finished")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    db.close()
    for t in threads:
        t.join()
    assert len(outcomes) == 2 and set(outcomes) <= {"closed", "finished"}
    with pytest.raises(TierError):
        db.fetch(T, keys, np.zeros((2000, 4), np.float32))


def test_close_during_a_long_fetch_that_retakes_its_lock() -> None:
    """A fetch of more than max_get_batch_size keys per partition releases and retakes the
    partition's lock; a close in between must stop it with a TierError, never let it read the
    freed arrays (a segfault before the check moved after every acquire)."""
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=1, max_get_batch_size=64))
    db.create_table(T, 64)
    keys = np.arange(200_000, dtype=np.int64)  # arrays large enough to be returned to the OS
    db.insert(T, keys, np.ones((keys.size, 64), np.float32))
    out = np.zeros((keys.size, 64), np.float32)
    outcome: list[str] = []
    started = threading.Event()

    def reader() -> None:
        try:
            for _ in range(100):
                started.set()
                db.fetch(T, keys, out)
            outcome.append("finished")
        except TierError:
            outcome.append("closed")

    thread = threading.Thread(target=reader)
    thread.start()
    started.wait()
    db.close()
    thread.join()
    assert outcome in (["closed"], ["finished"])


def test_an_insert_racing_evict_table_never_brings_evicted_arrays_back(encode: Encode) -> None:
    """An insert holds its partition while evict_table swaps in fresh ones: when it grows its
    (now detached) partition, the directory must keep pointing at the fresh arrays."""
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=1))
    db.create_table(T, 4)
    keys = np.arange(100, dtype=np.int64)
    db.insert(T, keys, encode(keys, 4))
    old = db._table(T).partitions[0]  # what a racing insert holds
    db.evict_table(T)
    with db._locks.write_locked(0):  # the racing insert grows and publishes its partition
        assert old.reserve(10_000)
        db._directory.refresh(0, old)
    assert not db.fetch(T, keys, np.zeros((100, 4), np.float32)).any()  # the evicted rows stay gone
    db.insert(T, keys[:3], encode(keys[:3], 4))
    np.testing.assert_array_equal(db.fetch(T, keys[:5], np.zeros((5, 4), np.float32)), [1, 1, 1, 0, 0])


# --------------------------------------------------------------------------- packed rows


def served(fmt: RowFormat, values: np.ndarray) -> np.ndarray:
    """What a table in ``fmt`` serves for ``values``: the format's reference round trip."""
    return unpack(fmt, pack(fmt, values), values.shape[1])


@pytest.mark.parametrize("dim", [16, 128])
def test_stored_bytes_per_row_shrink_with_the_format(dim: int) -> None:
    """Each row is stored packed: its key (8 B) and the format's row, padded to 8 bytes, so
    int8 rows take 144 B at dim 128 where fp32 rows take 520 B (0.28x; 0.44x at dim 16)."""
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=2), initial_capacity=6_000)
    keys = np.arange(3_000, dtype=np.int64)
    values = np.random.default_rng(dim).normal(size=(3_000, dim)).astype(np.float32)
    stored: dict[RowFormat, int] = {}
    for fmt in RowFormat:
        name = f"hps_et.m.{fmt}"
        db.create_table(name, dim, fmt)
        db.insert(name, keys, values)
        assert db.row_format(name) is fmt
        parts = db._table(name).partitions
        stored[fmt] = parts[0].values.shape[1]
        assert stored[fmt] == 8 + -(-fmt.row_bytes(dim) // 8) * 8
        assert all(p.values.shape[0] == 3_000 for p in parts)  # preallocated: nothing grew
        assert db.bytes_per_row(name) == db.memory_bytes(name) / 3_000
        out = np.zeros((3_000, dim), np.float32)
        assert db.fetch(name, keys, out).all()
        np.testing.assert_array_equal(out, served(fmt, values))
    assert stored[RowFormat.FP32] > stored[RowFormat.FP16] > stored[RowFormat.FP8] >= stored[RowFormat.INT8]
    assert stored[RowFormat.INT8] / stored[RowFormat.FP32] <= (0.3 if dim == 128 else 0.5)
    sizes = [db.memory_bytes(f"hps_et.m.{fmt}") for fmt in RowFormat]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    for fmt in RowFormat:  # the estimate counts the same row and the slots at load 1/2..1/4
        assert estimate_bytes_per_row(dim, fmt) == stored[fmt] + 3 * 16


def test_rows_keep_only_the_access_stat_their_policy_reads() -> None:
    for policy, header in (("evict_random", 8), ("evict_oldest", 16), ("evict_least_used", 16)):
        overflow = OverflowConfig(margin=100, policy=policy)
        db = HashMapVolatileDB(VolatileDBConfig(overflow=overflow))
        db.create_table(T, 16, RowFormat.INT8)
        assert db._table(T).partitions[0].values.shape[1] == header + 8 + 16
        assert estimate_bytes_per_row(16, RowFormat.INT8, overflow) == header + 24 + 3 * 16
    assert estimate_bytes_per_row(16, RowFormat.INT8) == 8 + 24 + 3 * 16  # no margin: no stat


@pytest.mark.parametrize("policy", ["evict_random", "evict_least_used", "evict_oldest"])
def test_overflow_evicts_packed_int8_rows_whole(policy: str) -> None:
    """Evictions move packed rows (swap-remove of header and row together): every row left is
    the int8 row of its own key, an evicted key is a clean miss, partitions stay in bounds."""
    dim = 12
    db = HashMapVolatileDB(VolatileDBConfig(
        num_partitions=3, max_set_batch_size=250,
        overflow=OverflowConfig(margin=500, policy=policy, resolution_target=0.6)))
    db.create_table(T, dim, RowFormat.INT8)
    rng = np.random.default_rng(5)
    expected: dict[int, np.ndarray] = {}
    for _ in range(25):
        keys = rng.integers(0, 1 << 40, 400).astype(np.int64)
        values = (rng.normal(size=(400, dim)) * rng.choice([1e-3, 1.0, 50.0], size=(400, 1))).astype(np.float32)
        db.insert(T, keys, values)
        for key, row in zip(keys.tolist(), served(RowFormat.INT8, values)):
            expected[key] = row  # the last duplicate wins
        assert all(n <= 500 for n in sizes(db)), sizes(db)
        probe = np.array(list(expected), np.int64)
        out = np.full((len(probe), dim), np.nan, np.float32)
        found = db.fetch(T, probe, out)
        np.testing.assert_array_equal(out[found], np.stack([expected[k] for k in probe[found].tolist()]))
        assert np.isnan(out[~found]).all()
        assert found.sum() == db.count(T)
    assert db.count(T) < len(expected)
    for part in db._table(T).partitions:
        assert (part.slots[:, 1] >= 0).sum() == part.n_rows
        # every live row's header holds its key, reachable through the slots
        live = part.meta[: part.n_rows, 0]
        assert set(live.tolist()) == set(part.slots[part.slots[:, 1] >= 0, 0].tolist())


def test_a_refused_batch_writes_no_chunk() -> None:
    """The whole batch is packed before any chunk is written: a bad row at the end of a batch
    of many chunks and partitions leaves the table as it was."""
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=3, max_set_batch_size=10))
    db.create_table(T, 4, RowFormat.FP16)
    keys = np.arange(200, dtype=np.int64)
    values = np.ones((200, 4), np.float32)
    db.insert(T, keys[:5], values[:5])
    values[199, 3] = 1e6  # beyond float16
    with pytest.raises(RowValueError, match="row 199 .*float16"):
        db.insert(T, keys, values * 2)
    assert db.count(T) == 5
    out = np.zeros((5, 4), np.float32)
    assert db.fetch(T, keys[:5], out).all() and (out == 1).all()


def test_a_table_keeps_its_format_through_evict_and_drop() -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))
    db.create_table(T, 8, RowFormat.FP8)
    values = np.random.default_rng(6).normal(size=(50, 8)).astype(np.float32)
    keys = np.arange(50, dtype=np.int64)
    db.insert(T, keys, values)
    db.evict_table(T)
    assert db.row_format(T) is RowFormat.FP8
    with pytest.raises(ConfigError, match="stores fp8 rows, but int8 was asked for"):
        db.create_table(T, 8, RowFormat.INT8)
    db.insert(T, keys, values)
    out = np.zeros((50, 8), np.float32)
    assert db.fetch(T, keys, out).all()
    np.testing.assert_array_equal(out, served(RowFormat.FP8, values))
    db.drop_table(T)
    db.create_table(T, 8, RowFormat.INT8)  # a new table: any format
    assert db.row_format(T) is RowFormat.INT8
    assert db.bytes_per_row(T) == 8 + 8 + 8 + 2 * 16  # empty: key, int8 row, two slots
