"""One contract suite for every EmbeddingCache implementation (GPU ones need a GPU and CuPy).

Every case runs per row format (fp32, fp16, fp8, int8) where the format matters. Besides
targeted cases, a seeded random sequence of replace/update/query/clear batches is checked
against a plain-Python model of the contract: a dict key -> the last vector written. A
dynamic cache may have evicted any key, so the model checks what the contract promises:
every hit returns exactly the last row written for that key as its format stores it
(``unpack(pack(row))`` of hps_core.row_formats, bit for bit), keys replaced into sets with
room are present, update never inserts, size stays within capacity, clear empties; a static
table additionally hits every written key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from hps_core.cache import WAYS, EmbeddingCache, make_cache
from hps_core.errors import CacheFullError, ConfigError, RequestError, RowValueError
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack, unpack

IMPLS = [
    pytest.param(("cpu", "dynamic"), id="cpu-dynamic"),
    pytest.param(("cpu", "static"), id="cpu-static"),
    pytest.param((0, "dynamic"), id="gpu-dynamic", marks=pytest.mark.gpu),
    pytest.param((0, "static"), id="gpu-static", marks=pytest.mark.gpu),
]
FORMATS = list(RowFormat)


@dataclass
class Impl:
    """Builds caches of one implementation and moves arrays to and from its device."""

    device: str | int
    kind: str
    xp: Any  # numpy or cupy

    def make(self, capacity: int, dim: int, **kwargs: Any) -> EmbeddingCache:
        return make_cache(self.kind, device=self.device, capacity=capacity, dim=dim, **kwargs)

    def put(self, arr: np.ndarray) -> Any:
        return self.xp.asarray(arr)

    def get(self, arr: Any) -> np.ndarray:
        return arr if isinstance(arr, np.ndarray) else arr.get()

    def out(self, n: int, dim: int, fill: float = -7.0) -> Any:
        return self.xp.full((n, dim), fill, dtype=np.float32)

    def query(self, cache: EmbeddingCache, keys: np.ndarray, fill: float = -7.0) -> tuple[np.ndarray, np.ndarray]:
        """(out rows on host, hit mask) for host ``keys``."""
        out = self.out(len(keys), cache.dim, fill)
        mk, mp = cache.query(self.put(keys), out)
        mk, mp = self.get(mk), self.get(mp)
        hit = np.ones(len(keys), bool)
        hit[mp] = False
        np.testing.assert_array_equal(np.sort(mk.astype(np.int64)), np.sort(keys[mp].astype(np.int64)))
        return self.get(out), hit

    def all_keys(self, cache: EmbeddingCache) -> np.ndarray:
        return np.sort(self.get(cache.dump(0, cache.num_sets)).astype(np.int64))


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> Impl:
    device, kind = request.param
    if device == "cpu":
        return Impl(device, kind, np)
    cupy = pytest.importorskip("cupy", reason="GPU caches need CuPy")
    return Impl(device, kind, cupy)


def stored(values: np.ndarray, row_format: RowFormat) -> np.ndarray:
    """(n, dim) float32 rows as a cache of ``row_format`` answers them."""
    return unpack(row_format, pack(row_format, values), values.shape[1])


def assert_bits_equal(got: np.ndarray, expected: np.ndarray, msg: str = "") -> None:
    """Bit-for-bit equality (tells -0.0 from 0.0)."""
    np.testing.assert_array_equal(np.ascontiguousarray(got).view(np.uint32),
                                  np.ascontiguousarray(expected, np.float32).view(np.uint32), err_msg=msg)


def vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    return rng.standard_normal((n, dim)).astype(np.float32)


# --------------------------------------------------------------------------- targeted


@pytest.mark.parametrize("dim", [1, 3, 16, 128])
@pytest.mark.parametrize("key_dtype", [np.int64, np.uint32])
@pytest.mark.parametrize("row_format", FORMATS, ids=str)
def test_replace_then_query_round_trip(impl: Impl, dim: int, key_dtype: Any, row_format: RowFormat) -> None:
    rng = np.random.default_rng(dim)
    cache = impl.make(1024, dim, key_dtype=key_dtype, row_format=row_format)
    assert (cache.dim, cache.key_dtype, cache.row_format) == (dim, np.dtype(key_dtype), row_format)
    assert cache.capacity >= 1024 and cache.size() == 0
    keys = rng.choice(2**31, 300, replace=False).astype(key_dtype)
    vals = vectors(rng, 300, dim)
    cache.replace(impl.put(keys), impl.put(vals))
    probe = np.concatenate([keys, np.array([2**31 + 5], key_dtype)])
    out, hit = impl.query(cache, probe)
    assert not hit[-1] and (out[-1] == -7.0).all()  # a miss leaves its row untouched
    if cache.kind == "static":
        assert hit[:-1].all()
    assert_bits_equal(out[:-1][hit[:-1]], stored(vals, row_format)[hit[:-1]])
    assert hit[:-1].mean() > 0.9  # 300 keys in 32 sets of 32: almost never a full set
    assert cache.size() == len(impl.all_keys(cache)) <= cache.capacity


@pytest.mark.parametrize("row_format", FORMATS, ids=str)
def test_update_never_inserts(impl: Impl, row_format: RowFormat) -> None:
    cache = impl.make(256, 4, row_format=row_format)
    keys = np.arange(10, dtype=np.int64)
    cache.replace(impl.put(keys), impl.put(np.ones((10, 4), np.float32)))
    upd = np.array([3, 100, 4, 200], np.int64)
    new = np.arange(16, dtype=np.float32).reshape(4, 4) - 5.5
    assert cache.update(impl.put(upd), impl.put(new)) == 2
    assert cache.size() == 10
    out, hit = impl.query(cache, upd)
    np.testing.assert_array_equal(hit, [True, False, True, False])
    assert_bits_equal(out[hit], stored(new, row_format)[hit])


@pytest.mark.parametrize("row_format", FORMATS, ids=str)
def test_duplicate_keys_in_one_replace(impl: Impl, row_format: RowFormat) -> None:
    """One of the duplicates' vectors is stored; the CPU twins keep the last one."""
    cache = impl.make(256, 2, row_format=row_format)
    keys = np.array([7, 8, 7, 7, 9], np.int64)
    vals = np.arange(10, dtype=np.float32).reshape(5, 2)
    cache.replace(impl.put(keys), impl.put(vals))
    assert cache.size() == 3
    out, hit = impl.query(cache, np.array([7], np.int64))
    assert hit[0]
    candidates = stored(vals, row_format)[keys == 7]
    assert any((out[0] == c).all() for c in candidates)
    if impl.device == "cpu":
        assert_bits_equal(out[0], candidates[-1])


def test_clear_empties(impl: Impl) -> None:
    cache = impl.make(512, 8)
    keys = np.arange(100, dtype=np.int64)
    cache.replace(impl.put(keys), impl.put(np.ones((100, 8), np.float32)))
    cache.clear()
    assert cache.size() == 0 and len(impl.all_keys(cache)) == 0
    _, hit = impl.query(cache, keys)
    assert not hit.any()
    cache.replace(impl.put(keys[:5]), impl.put(np.full((5, 8), 2.0, np.float32)))
    out, hit = impl.query(cache, keys[:6])
    np.testing.assert_array_equal(hit, [True] * 5 + [False])
    assert (out[:5] == 2.0).all()


def test_uint32_cache_refuses_wide_keys(impl: Impl) -> None:
    cache = impl.make(64, 2, key_dtype=np.uint32)
    for bad in (2**32, -1):
        with pytest.raises(RequestError, match="uint32"):
            cache.replace(impl.put(np.array([1, bad], np.int64)), impl.put(np.zeros((2, 2), np.float32)))
    assert cache.size() == 0
    cache.replace(impl.put(np.array([2**32 - 1], np.int64)), impl.put(np.ones((1, 2), np.float32)))
    _, hit = impl.query(cache, np.array([2**32 - 1], np.int64))
    assert hit.all()


def test_malformed_calls_raise_request_error(impl: Impl) -> None:
    cache = impl.make(64, 4)
    keys = impl.put(np.arange(3, dtype=np.int64))
    with pytest.raises(RequestError):
        cache.replace(keys, impl.put(np.zeros((3, 5), np.float32)))  # wrong width
    with pytest.raises(RequestError):
        cache.replace(keys, impl.put(np.zeros((3, 4), np.float64)))  # wrong dtype
    with pytest.raises(RequestError):
        cache.query(keys, impl.out(2, 4))  # wrong row count
    with pytest.raises(RequestError):
        cache.query(impl.put(np.zeros(3, np.float32)), impl.out(3, 4))  # float keys


@pytest.mark.parametrize("bad", [dict(dim=0), dict(capacity=0), dict(policy="fifo"), dict(row_format="bf16"),
                                 dict(row_format=np.float16), dict(key_dtype=np.int32)])
def test_bad_construction_raises_config_error(impl: Impl, bad: dict[str, Any]) -> None:
    args: dict[str, Any] = dict(capacity=64, dim=4) | bad
    with pytest.raises(ConfigError):
        impl.make(**args)


@pytest.mark.parametrize("row_format", FORMATS, ids=str)
def test_static_table_full_writes_nothing(impl: Impl, row_format: RowFormat) -> None:
    if impl.kind != "static":
        pytest.skip("only static tables refuse inserts")
    cache = impl.make(10, 2, row_format=row_format)
    cache.replace(impl.put(np.arange(8, dtype=np.int64)), impl.put(np.ones((8, 2), np.float32)))
    with pytest.raises(CacheFullError, match="full"):
        cache.replace(impl.put(np.arange(5, 10, dtype=np.int64) * 3), impl.put(np.ones((5, 2), np.float32)))
    assert cache.size() == 8
    # existing keys plus exactly the room left fits
    cache.replace(impl.put(np.array([0, 1, 100, 101], np.int64)), impl.put(np.ones((4, 2), np.float32)))
    assert cache.size() == 10


@pytest.mark.parametrize("row_format", FORMATS, ids=str)
def test_dynamic_eviction_and_dump_by_set(impl: Impl, row_format: RowFormat) -> None:
    if impl.kind != "dynamic":
        pytest.skip("only dynamic caches evict")
    cache = impl.make(64, 2, row_format=row_format)  # 2 sets
    assert (cache.num_sets, cache.capacity) == (2, 2 * WAYS)
    keys = np.arange(1000, dtype=np.int64)
    rows = np.stack([keys, -keys / 7], axis=1).astype(np.float32)  # each key's own row
    for chunk in np.array_split(keys, 10):
        cache.replace(impl.put(chunk), impl.put(rows[chunk]))
    assert cache.size() == cache.capacity
    per_set = [np.sort(impl.get(cache.dump(s, s + 1)).astype(np.int64)) for s in range(2)]
    assert all(len(p) == WAYS for p in per_set)
    for s, held in enumerate(per_set):
        assert (impl.get(cache.set_of(impl.put(held))) == s).all()
    out, hit = impl.query(cache, keys)
    assert hit.sum() == cache.capacity
    assert_bits_equal(out[hit], stored(rows, row_format)[hit])  # never another key's vector


@pytest.mark.parametrize("row_format", [RowFormat.FP16, RowFormat.FP8, RowFormat.INT8], ids=str)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("arrays", ["host", "cache"])
def test_a_row_the_format_cannot_store_is_refused_before_writing(impl: Impl, row_format: RowFormat,
                                                                 bad: float, arrays: str) -> None:
    """The whole batch is refused with RowValueError naming the row, before anything is
    written, on both twins: host arrays (a GPU cache checks them on the host, as the CPU
    twin does) and arrays in the cache's memory (a GPU cache's check pass on the device)."""
    cache = impl.make(64, 4, row_format=row_format)
    keys = np.arange(5, dtype=np.int64)
    vals = np.ones((5, 4), np.float32)
    cache.replace(impl.put(keys[:2]), impl.put(vals[:2]))
    vals[3, 2] = bad
    put = impl.put if arrays == "cache" else np.asarray
    for write in (cache.replace, cache.update):
        with pytest.raises(RowValueError, match=f"position 3 .*{row_format}") as info:
            write(put(keys), put(vals + 1))
        assert info.value.position == 3
    assert cache.size() == 2
    out, hit = impl.query(cache, keys)
    np.testing.assert_array_equal(hit, [True, True, False, False, False])
    assert_bits_equal(out[:2], stored(vals[:2], row_format))  # the update wrote nothing either


@pytest.mark.parametrize("row_format", [RowFormat.FP16, RowFormat.INT8], ids=str)
def test_rows_beyond_a_formats_range_are_refused(impl: Impl, row_format: RowFormat) -> None:
    """fp16 holds at most ±65504; int8 a row whose max - min fits float32."""
    cache = impl.make(64, 2, row_format=row_format)
    big = np.float32(7e4) if row_format is RowFormat.FP16 else np.float32(3e38)
    with pytest.raises(RowValueError, match="position 1"):
        cache.replace(np.arange(2, dtype=np.int64), np.array([[1, 2], [big, -big]], np.float32))
    assert cache.size() == 0


def test_float32_tables_store_any_row(impl: Impl) -> None:
    """HugeCTR's behaviour: fp32 rows are stored as given, NaN and infinities included."""
    cache = impl.make(64, 3)
    vals = np.array([[np.nan, np.inf, -0.0], [3e38, -np.inf, 1e-45]], np.float32)
    cache.replace(np.arange(2, dtype=np.int64), vals)
    out, hit = impl.query(cache, np.arange(2, dtype=np.int64))
    assert hit.all()
    assert_bits_equal(out, vals)


# --------------------------------------------------------------------------- randomized


class Model:
    """The contract as a dict: key -> last vector written (as its row format stores it)."""

    def __init__(self, row_format: RowFormat) -> None:
        self.row_format = row_format
        self.data: dict[int, np.ndarray] = {}

    def write(self, keys: np.ndarray, vals: np.ndarray) -> None:
        for k, v in zip(keys.tolist(), stored(vals, self.row_format)):
            self.data[k] = v


def check_query(impl: Impl, cache: EmbeddingCache, model: Model, keys: np.ndarray) -> None:
    out, hit = impl.query(cache, keys)
    for i in np.flatnonzero(hit).tolist():
        k = int(keys[i])
        assert k in model.data, f"hit for key {k} that was never written"
        assert_bits_equal(out[i], model.data[k], msg=f"key {k}")
    assert (out[~hit] == -7.0).all()
    if cache.kind == "static":
        expected = np.array([int(k) in model.data for k in keys])
        np.testing.assert_array_equal(hit, expected)


def do_replace(impl: Impl, cache: EmbeddingCache, model: Model, keys: np.ndarray, vals: np.ndarray) -> None:
    before = impl.all_keys(cache)
    cache.replace(impl.put(keys), impl.put(vals))
    model.write(keys, vals)
    after = set(impl.all_keys(cache).tolist())
    if cache.kind == "static":
        assert set(keys.tolist()) <= after
        return
    # Keys of a set whose room (free ways) covered its new keys must all be present.
    sets_before = impl.get(cache.set_of(impl.put(before.astype(cache.key_dtype)))) if len(before) else np.zeros(0, int)
    occupancy = np.bincount(sets_before, minlength=cache.num_sets)
    new = keys[~np.isin(keys.astype(np.int64), before)]
    new_sets = impl.get(cache.set_of(impl.put(new)))
    incoming = np.bincount(new_sets, minlength=cache.num_sets)
    batch_sets = impl.get(cache.set_of(impl.put(keys)))
    roomy = occupancy + incoming <= WAYS
    must = keys[roomy[batch_sets]]
    assert set(must.astype(np.int64).tolist()) <= after


def do_update(impl: Impl, cache: EmbeddingCache, model: Model, keys: np.ndarray, vals: np.ndarray) -> None:
    present_before = impl.all_keys(cache)
    mask = np.isin(keys.astype(np.int64), present_before)
    assert cache.update(impl.put(keys), impl.put(vals)) == mask.sum()
    model.write(keys[mask], vals[mask])
    np.testing.assert_array_equal(impl.all_keys(cache), present_before)  # never inserts


@pytest.mark.parametrize("dim", [1, 3, 16, 128])
@pytest.mark.parametrize("key_dtype", [np.int64, np.uint32])
@pytest.mark.parametrize("row_format", FORMATS, ids=str)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_random_operation_sequence(impl: Impl, dim: int, key_dtype: Any, row_format: RowFormat, policy: str) -> None:
    if impl.kind == "static" and policy == "lfu":
        pytest.skip("the policy does not apply to static tables")
    seed = dim * 1000 + (key_dtype == np.uint32) * 100 + row_format.code * 10 + (policy == "lfu")
    rng = np.random.default_rng(seed)
    capacity, universe = (256, 700) if impl.kind == "dynamic" else (800, 700)
    cache = impl.make(capacity, dim, key_dtype=key_dtype, row_format=row_format, policy=policy)
    base = np.uint64(2**32 - 1000) if key_dtype == np.uint32 else np.uint64(2**40)  # exercise high bits
    model = Model(row_format)
    for step in range(60):
        op = rng.choice(["replace", "replace", "update", "query", "query", "clear"], p=[0.3, 0.1, 0.2, 0.2, 0.17, 0.03])
        n = int(rng.integers(1, 120))
        keys = (rng.choice(universe, n, replace=False).astype(np.uint64) + base).astype(key_dtype)
        vals = vectors(rng, n, dim)
        if op == "replace":
            do_replace(impl, cache, model, keys, vals)
        elif op == "update":
            do_update(impl, cache, model, keys, vals)
        elif op == "query":
            check_query(impl, cache, model, keys)
        else:
            cache.clear()
            model.data.clear()
            assert cache.size() == 0
        size = cache.size()
        assert size <= cache.capacity and size == len(impl.all_keys(cache)), f"step {step}"
        if cache.kind == "static":
            assert size == len(model.data)
    everything = (np.arange(universe, dtype=np.uint64) + base).astype(key_dtype)
    check_query(impl, cache, model, everything)
