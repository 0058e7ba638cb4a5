"""LookupSession with embedding caches: the same tests on the CPU twin and on the GPU cache.

The tiers are the real hash map and RocksDB; the cache is each implementation in turn (GPU
ones need a GPU and CuPy, else skipped). Vectors encode their key, so a wrong row shows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hps_core.arrays import to_host
from hps_core.cache import make_multi_table_cache
from hps_core.config import PersistentDBConfig, VolatileDBConfig, load_config, parse_config
from hps_core.db import HashMapVolatileDB, RocksDBPersistentDB
from hps_core.errors import RequestError
from hps_core.formats import write_sparse_model
from hps_core.lookup import LookupSession
from hps_core.refresh import CacheRefresher
from hps_core.server import HierarchicalParameterServer

DIM = 6
ROWS = 4_000
DEFAULT = -3.0

DEVICES = [pytest.param("cpu", id="cpu-twin"), pytest.param(0, id="gpu", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> Any:
    if request.param != "cpu":
        pytest.importorskip("cupy", reason="GPU caches need CuPy")
    return request.param


def _rows(keys: np.ndarray, version: float = 0.0) -> np.ndarray:
    return (keys[:, None] * 8 + np.arange(DIM) + version).astype(np.float32)


def _model(threshold: float):
    config = parse_config(
        {
            "models": [
                {
                    "model": "m",
                    "sparse_files": ["/unused"],
                    "embedding_table_names": ["t"],
                    "embedding_vecsize_per_table": [DIM],
                    "default_value_for_each_table": [DEFAULT],
                    "maxnum_catfeature_query_per_table_per_sample": [ROWS],
                    "max_batch_size": 1,
                    "hit_rate_threshold": threshold,
                }
            ]
        },
        "test.json",
    )
    return config.model("m")


@pytest.fixture()
def tiers(tmp_path: Path):
    volatile = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))
    persistent = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "rocksdb")))
    keys = np.arange(ROWS, dtype=np.int64)
    for db in (volatile, persistent):
        db.create_table("hps_et.m.t", DIM)
    persistent.insert("hps_et.m.t", keys, _rows(keys))
    volatile.insert("hps_et.m.t", keys[: ROWS // 2], _rows(keys[: ROWS // 2]))
    yield volatile, persistent
    persistent.close()


def _session(tiers, device: Any, *, threshold: float, write_back: bool = False, capacity: int = 2048) -> LookupSession:
    volatile, persistent = tiers
    cache = make_multi_table_cache("dynamic", device=device, capacities=[capacity], dims=[DIM])
    return LookupSession(_model(threshold), volatile=volatile, persistent=persistent, cache=cache, write_back=write_back)


def _lookup(session: LookupSession, keys: np.ndarray) -> np.ndarray:
    return to_host(session.lookup(keys, np.array([keys.size], np.int32))).reshape(keys.size, DIM)


def _expected(keys: np.ndarray) -> np.ndarray:
    out = _rows(keys)
    out[keys >= ROWS] = DEFAULT
    return out


def test_misses_are_fetched_and_inserted_synchronously_below_threshold(tiers, device) -> None:
    session = _session(tiers, device, threshold=1.0)  # every batch is "cold": always synchronous
    keys = np.array([5, 3000, 9999, 5, 17], dtype=np.int64)
    np.testing.assert_array_equal(_lookup(session, keys), _expected(keys))
    np.testing.assert_array_equal(_lookup(session, keys), _expected(keys))
    c = session.counters()["t"]
    assert c["cache_hits"] == 3  # the second lookup: 5, 3000, 17 were cached; 9999 exists nowhere
    assert c["volatile_hits"] == 2 and c["persistent_hits"] == 1 and c["defaults"] == 2
    session.close()


def test_warm_cache_returns_defaults_for_misses_and_inserts_in_background(tiers, device) -> None:
    session = _session(tiers, device, threshold=0.5)
    warm = np.arange(10, dtype=np.int64)
    _lookup(session, warm)  # cold batch (hit rate 0 < 0.5): inserted synchronously
    keys = np.concatenate([warm, [100, 3100]]).astype(np.int64)  # hit rate 10/12 >= 0.5
    first = _lookup(session, keys)
    np.testing.assert_array_equal(first[:10], _expected(warm))
    np.testing.assert_array_equal(first[10:], np.full((2, DIM), DEFAULT, np.float32))  # HugeCTR: defaults this once
    session.drain()
    np.testing.assert_array_equal(_lookup(session, keys), _expected(keys))
    c = session.counters()["t"]
    assert c["async_inserts"] == 2  # 100 and 3100: answered with defaults, inserted later
    answered = c["cache_hits"] + c["volatile_hits"] + c["persistent_hits"] + c["defaults"] + c["async_inserts"]
    assert answered == c["unique_keys"]  # each unique key counted once, the background fetch adds no hits
    session.close()


@pytest.mark.parametrize("update_first", [False, True], ids=["update-during-fetch", "tier-lags-the-update"])
def test_a_row_fetched_before_an_update_is_not_cached_after_it(tiers, device, update_first: bool) -> None:
    """The cache must not keep an old row that a concurrent update already replaced.

    update-during-fetch: the tier answers the old row, then the update reaches tier and cache
    (the key is not cached yet, so the cache has nothing to overwrite), then the fetched row
    would be inserted. tier-lags-the-update: a shared Redis written by another server's
    consumer still holds the old row when this server's cache consumer has seen the update.
    """
    volatile, _ = tiers
    session = _session(tiers, device, threshold=1.0)
    table = session.model.tables[0]
    key = np.array([7], dtype=np.int64)
    ids = np.zeros(1, np.int64)
    fresh = _rows(key, version=0.5)
    if update_first:
        session.apply_update("t", key, fresh)
    fetch_started = time.monotonic()
    fetched = session.fetch_from_tiers(ids, key)
    np.testing.assert_array_equal(fetched.values.reshape(1, DIM), _rows(key))  # the old row
    if not update_first:
        session.apply_update("t", key, fresh)
    volatile.insert(table.qualified_name, key, fresh)
    assert session.cache_rows(ids, key, fetched, fetch_started, insert=True) == 0
    for _ in range(2):
        np.testing.assert_array_equal(_lookup(session, key), fresh)
    # fetched from the tier each time: within UPDATE_GRACE_S of its update a key is not cached
    assert session.counters()["t"]["cache_hits"] == 0
    session.close()


def test_rows_fetched_without_updates_are_cached(tiers, device) -> None:
    session = _session(tiers, device, threshold=1.0)
    keys = np.array([3, 9, ROWS + 5], dtype=np.int64)  # the last exists nowhere
    ids = np.zeros(3, np.int64)
    fetch_started = time.monotonic()
    fetched = session.fetch_from_tiers(ids, keys)
    session.apply_update("t", np.array([11], np.int64), _rows(np.array([11]), 0.5))  # another key
    assert session.cache_rows(ids, keys, fetched, fetch_started, insert=True) == 2
    np.testing.assert_array_equal(_lookup(session, keys), _expected(keys))
    assert session.counters()["t"]["cache_hits"] == 2  # 3 and 9; a default is never cached
    session.close()


def test_large_random_trace_never_returns_a_wrong_vector(tiers, device) -> None:
    session = _session(tiers, device, threshold=0.8, capacity=512)  # evicts constantly
    rng = np.random.default_rng(0)
    for _ in range(30):
        keys = (rng.zipf(1.3, size=700) % (ROWS + 300)).astype(np.int64)
        got = _lookup(session, keys)
        expected = _expected(keys)
        is_default = (got == DEFAULT).all(axis=1)
        # a background-insert batch may answer defaults for its misses, never another row
        np.testing.assert_array_equal(got[~is_default], expected[~is_default])
    session.drain()
    keys = np.arange(0, ROWS + 300, 7, dtype=np.int64)
    session_sync = _session(tiers, device, threshold=1.1)
    np.testing.assert_array_equal(_lookup(session_sync, keys), _expected(keys))
    session.close()
    session_sync.close()


def test_cache_missed_embeddings_copies_persistent_rows_up(tiers, device) -> None:
    volatile, _ = tiers
    session = _session(tiers, device, threshold=1.0, write_back=True)
    keys = np.array([3500, 3600], dtype=np.int64)  # only in RocksDB
    _lookup(session, keys)
    session.drain()
    out = np.empty((2, DIM), np.float32)
    assert volatile.fetch("hps_et.m.t", keys, out).all()
    np.testing.assert_array_equal(out, _rows(keys))
    session.close()


def test_refresh_pulls_changed_rows_into_the_cache(tiers, device) -> None:
    volatile, _ = tiers
    session = _session(tiers, device, threshold=1.0)
    keys = np.array([1, 2, 3], dtype=np.int64)
    _lookup(session, keys)
    volatile.insert("hps_et.m.t", keys, _rows(keys, version=0.5))  # changed below the cache
    np.testing.assert_array_equal(_lookup(session, keys), _rows(keys))  # cache still has the old rows
    refresher = CacheRefresher(session, percentage=1.0, interval=0.0)
    assert refresher.step() == 3
    np.testing.assert_array_equal(_lookup(session, keys), _rows(keys, version=0.5))
    session.close()


def test_server_warms_caches_from_the_sparse_files(tmp_path: Path, device) -> None:
    keys = np.arange(100, dtype=np.int64) * 3
    write_sparse_model(tmp_path / "t.model", keys, _rows(keys))
    (tmp_path / "hps.json").write_text(json.dumps({
        "volatile_db": {"type": "hash_map"},
        "persistent_db": {"type": "disabled"},
        "models": [{
            "model": "m", "sparse_files": ["t.model"], "embedding_table_names": ["t"],
            "embedding_vecsize_per_table": [DIM], "maxnum_catfeature_query_per_table_per_sample": [100],
            "gpucacheper": 0.5, "init_ec": True,
        }],
    }))
    with HierarchicalParameterServer(load_config(tmp_path / "hps.json"), cache_device=device) as server:
        session = server.session("m")
        cache = session.caches["t"]
        warmed = cache.size()
        assert 50 <= warmed <= cache.capacity  # 50% of 100 rows, rounded up to whole sets
        np.testing.assert_array_equal(_lookup(session, keys), _rows(keys))
        assert session.counters()["t"]["cache_hits"] == warmed


def test_a_full_static_table_refuses_only_its_own_rows(tmp_path: Path, device) -> None:
    """A static table sized for its sparse file has no room for a key found only in a tier;
    that key is served uncached (counted as cache_full), and the other tables' misses still go
    into the cache."""
    config = parse_config({"models": [{
        "model": "m", "sparse_files": ["/unused/a", "/unused/b"], "embedding_table_names": ["a", "b"],
        "embedding_vecsize_per_table": [DIM, DIM], "maxnum_catfeature_query_per_table_per_sample": [4, 4],
        "max_batch_size": 1, "hit_rate_threshold": 1.0,
    }]}, "test.json")
    model = config.model("m")
    volatile = HashMapVolatileDB(VolatileDBConfig(num_partitions=1))
    keys = np.arange(10, dtype=np.int64)
    for table in model.tables:
        volatile.create_table(table.qualified_name, DIM)
        volatile.insert(table.qualified_name, keys, _rows(keys))
    cache = make_multi_table_cache("static", device=device, capacities=[2, 50], dims=[DIM, DIM])
    session = LookupSession(model, volatile=volatile, persistent=None, cache=cache)
    request = np.array([1, 2, 3, 4, 5, 6, 7, 8], np.int64)  # table a: 4 new keys for 2 rows
    for _ in range(2):
        got = to_host(session.lookup(request, np.array([4, 4], np.int32))).reshape(8, DIM)
        np.testing.assert_array_equal(got, _rows(request))  # answers are right either way
    c = session.counters()
    assert c["a"]["cache_full"] == 8 and c["a"]["cache_hits"] == 0  # both passes: a's 4 keys refused
    assert c["b"]["cache_full"] == 0 and c["b"]["cache_hits"] == 4  # b's 4 keys cached on the first pass
    session.close()


def test_a_key_outside_uint32_fails_its_request_alone(tiers, device) -> None:
    """HugeCTR's supportlonglong: false: the cache holds uint32 keys; a request with a wider key
    is refused before the shared pass, and the other requests of the batch are answered."""
    volatile, persistent = tiers
    cache = make_multi_table_cache("dynamic", device=device, capacities=[512], dims=[DIM], key_dtype=np.uint32)
    session = LookupSession(_model(1.0), volatile=volatile, persistent=persistent, cache=cache)
    good = (np.array([5, 6], np.int64), np.array([2], np.int32))
    bad = (np.array([5, 2**32], np.int64), np.array([2], np.int32))
    answers = session.lookup_requests([good, bad, good])
    assert isinstance(answers[1], RequestError) and "supportlonglong" in str(answers[1])
    for answer in (answers[0], answers[2]):
        np.testing.assert_array_equal(to_host(answer).reshape(2, DIM), _expected(good[0]))
    session.close()


def test_a_cache_in_other_row_formats_than_the_models_is_refused(tiers, device) -> None:
    from hps_core.errors import ConfigError
    from hps_core.row_formats import RowFormat

    volatile, persistent = tiers
    cache = make_multi_table_cache("dynamic", device=device, capacities=[64], dims=[DIM], row_formats=[RowFormat.INT8])
    with pytest.raises(ConfigError, match=r"the cache's row formats \['int8'\] differ from the model's \['fp32'\]"):
        LookupSession(_model(1.0), volatile=volatile, persistent=persistent, cache=cache)
