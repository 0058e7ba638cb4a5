"""The MultiTableCache contract, run against every implementation (GPU ones need a GPU and CuPy).

Several tables of different widths, capacities and row formats in one structure, answered
by one call: the same key in two tables is two rows; a call touches only the tables its ids
name; rows land at the flat offsets given, each as its table's format stores it
(``unpack(pack(row))``, bit for bit). The cases run per format mix (all fp32, each compact
format everywhere, and tables of different formats side by side). A seeded random sequence
over all tables is checked against a dict model of the contract, as test_conformance.py
does for one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from hps_core.cache import MultiTableCache, TableView, make_multi_table_cache
from hps_core.cache.base import WAYS, capacity_for_bytes, row_stride
from hps_core.cache.cpu import CpuDynamicCache
from hps_core.errors import CacheFullError, ConfigError, RequestError, RowValueError
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack, unpack
from hps_core.rows import row_offsets

IMPLS = [
    pytest.param(("cpu", "dynamic"), id="cpu-dynamic"),
    pytest.param(("cpu", "static"), id="cpu-static"),
    pytest.param((0, "dynamic"), id="gpu-dynamic", marks=pytest.mark.gpu),
    pytest.param((0, "static"), id="gpu-static", marks=pytest.mark.gpu),
]
DIMS = (8, 3, 16)
CAPACITIES = (300, 200, 500)
FP32, FP16, FP8, INT8 = RowFormat.FP32, RowFormat.FP16, RowFormat.FP8, RowFormat.INT8
#: Row formats of the three tables: the same format everywhere, and mixes.
FORMAT_MIXES = [
    pytest.param((FP32,) * 3, id="fp32"),
    pytest.param((FP16,) * 3, id="fp16"),
    pytest.param((FP8,) * 3, id="fp8"),
    pytest.param((INT8,) * 3, id="int8"),
    pytest.param((INT8, FP16, FP8), id="int8-fp16-fp8"),
    pytest.param((FP32, INT8, FP16), id="fp32-int8-fp16"),
]


@dataclass
class Impl:
    device: str | int
    kind: str
    xp: Any

    def make(self, capacities: tuple[int, ...] = CAPACITIES, dims: tuple[int, ...] = DIMS, **kwargs: Any) -> MultiTableCache:
        return make_multi_table_cache(self.kind, device=self.device, capacities=capacities, dims=dims, **kwargs)

    def get(self, arr: Any) -> np.ndarray:
        return arr if isinstance(arr, np.ndarray) else arr.get()

    def put(self, arr: np.ndarray) -> Any:
        return self.xp.asarray(arr)

    def query(self, cache: MultiTableCache, ids: np.ndarray, keys: np.ndarray, fill: float = -7.0) -> tuple[list[np.ndarray], np.ndarray]:
        """(rows as a list of host arrays, hit mask) for host ``ids``/``keys``."""
        offsets, size = row_offsets(ids, np.asarray(cache.dims))
        out = self.xp.full(size, fill, np.float32)
        missing = np.sort(self.get(cache.query_tables(self.put(ids), self.put(keys), out, self.put(offsets))))
        hit = np.ones(len(keys), bool)
        hit[missing] = False
        host = self.get(out)
        return [host[o : o + cache.dims[t]] for o, t in zip(offsets, ids)], hit

    def replace(self, cache: MultiTableCache, ids: np.ndarray, keys: np.ndarray, rows: list[np.ndarray]) -> None:
        offsets, _ = row_offsets(ids, np.asarray(cache.dims))
        flat = np.concatenate(rows).astype(np.float32) if rows else np.empty(0, np.float32)
        cache.replace_tables(self.put(ids), self.put(keys), self.put(flat), self.put(offsets))

    def update(self, cache: MultiTableCache, ids: np.ndarray, keys: np.ndarray, rows: list[np.ndarray]) -> int:
        offsets, _ = row_offsets(ids, np.asarray(cache.dims))
        flat = np.concatenate(rows).astype(np.float32)
        return cache.update_tables(self.put(ids), self.put(keys), self.put(flat), self.put(offsets))

    def held(self, cache: MultiTableCache) -> set[tuple[int, int]]:
        ids, keys = cache.dump_sets(0, cache.total_sets)
        return set(zip(self.get(ids).tolist(), self.get(keys).astype(np.int64).tolist()))


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> Impl:
    device, kind = request.param
    if device == "cpu":
        return Impl(device, kind, np)
    return Impl(device, kind, pytest.importorskip("cupy", reason="GPU caches need CuPy"))


def rows_for(ids: np.ndarray, keys: np.ndarray, version: float = 0.0) -> list[np.ndarray]:
    """A row per (table, key) that names both, so a row of another table or key shows."""
    return [np.arange(DIMS[t], dtype=np.float32) + 1000.0 * t + 10.0 * (k % 97) + version
            for t, k in zip(ids.tolist(), keys.tolist())]


def stored_rows(ids: np.ndarray, rows: list[np.ndarray], formats: tuple[RowFormat, ...]) -> list[np.ndarray]:
    """Each row as its table's format stores it: ``unpack(pack(row))``."""
    return [unpack(formats[t], pack(formats[t], r[None, :]), r.shape[0])[0] for t, r in zip(ids.tolist(), rows)]


def assert_rows_equal(got: list[np.ndarray], expected: list[np.ndarray], msg: str = "") -> None:
    """Bit-for-bit equality of every row (tells -0.0 from 0.0)."""
    assert len(got) == len(expected), msg
    for i, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(g.view(np.uint32), np.asarray(e, np.float32).view(np.uint32),
                                      err_msg=f"{msg} row {i}")


@pytest.mark.parametrize("formats", FORMAT_MIXES)
def test_layout_attributes(impl: Impl, formats: tuple[RowFormat, ...]) -> None:
    cache = impl.make(row_formats=formats)
    assert isinstance(cache, MultiTableCache)
    assert cache.row_formats == formats
    assert [TableView(cache, t).row_format for t in range(3)] == list(formats)
    assert np.asarray(cache.dims).tolist() == list(DIMS)
    assert (np.asarray(cache.capacities) >= CAPACITIES).all()
    assert np.asarray(cache.set_base).tolist() == np.concatenate([[0], np.cumsum(cache.num_sets)[:-1]]).tolist()
    assert cache.total_sets == int(np.sum(cache.num_sets))
    assert np.asarray(cache.sizes()).tolist() == [0, 0, 0]


@pytest.mark.parametrize("formats", FORMAT_MIXES)
def test_same_key_in_three_tables_is_three_rows(impl: Impl, formats: tuple[RowFormat, ...]) -> None:
    cache = impl.make(row_formats=formats)
    ids = np.array([0, 1, 2, 1], np.int64)
    keys = np.array([5, 5, 5, 6], np.int64)
    impl.replace(cache, ids, keys, rows_for(ids, keys))
    got, hit = impl.query(cache, ids[::-1].copy(), keys[::-1].copy())
    assert hit.all()
    assert_rows_equal(got, stored_rows(ids[::-1], rows_for(ids[::-1], keys[::-1]), formats))
    assert np.asarray(cache.sizes()).tolist() == [1, 2, 1]
    assert impl.held(cache) == {(0, 5), (1, 5), (2, 5), (1, 6)}


def test_misses_leave_rows_untouched_and_are_positions(impl: Impl) -> None:
    cache = impl.make()
    ids = np.array([0, 2], np.int64)
    keys = np.array([1, 2], np.int64)
    impl.replace(cache, ids, keys, rows_for(ids, keys))
    probe_ids = np.array([2, 0, 0, 1, 2], np.int64)
    probe_keys = np.array([2, 2, 1, 1, 9], np.int64)  # (0,2) and (1,1) exist in other tables only
    got, hit = impl.query(cache, probe_ids, probe_keys)
    np.testing.assert_array_equal(hit, [True, False, True, False, False])
    for row, h in zip(got, hit):
        if not h:
            assert (row == -7.0).all()


@pytest.mark.parametrize("formats", FORMAT_MIXES)
def test_update_never_inserts_and_counts(impl: Impl, formats: tuple[RowFormat, ...]) -> None:
    cache = impl.make(row_formats=formats)
    ids = np.array([0, 1, 2], np.int64)
    keys = np.array([10, 11, 12], np.int64)
    impl.replace(cache, ids, keys, rows_for(ids, keys))
    upd_ids = np.array([0, 1, 1, 2], np.int64)
    upd_keys = np.array([10, 10, 11, 99], np.int64)
    assert impl.update(cache, upd_ids, upd_keys, rows_for(upd_ids, upd_keys, version=0.5)) == 2
    assert impl.held(cache) == {(0, 10), (1, 11), (2, 12)}
    got, hit = impl.query(cache, upd_ids, upd_keys)
    np.testing.assert_array_equal(hit, [True, False, True, False])
    assert_rows_equal(got[:1], stored_rows(upd_ids[:1], rows_for(upd_ids[:1], upd_keys[:1], 0.5), formats))


def test_clear_one_table_or_all(impl: Impl) -> None:
    cache = impl.make()
    ids = np.repeat(np.arange(3, dtype=np.int64), 20)
    keys = np.tile(np.arange(20, dtype=np.int64), 3)
    impl.replace(cache, ids, keys, rows_for(ids, keys))
    cache.clear(1)
    assert np.asarray(cache.sizes()).tolist() == [20, 0, 20]
    _, hit = impl.query(cache, ids, keys)
    np.testing.assert_array_equal(hit, ids != 1)
    cache.clear()
    assert np.asarray(cache.sizes()).tolist() == [0, 0, 0]


def test_dump_sets_and_sets_of_agree(impl: Impl) -> None:
    cache = impl.make()
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 3, 150).astype(np.int64)
    keys = rng.choice(10_000, 150, replace=False).astype(np.int64)
    impl.replace(cache, ids, keys, rows_for(ids, keys))
    sets = impl.get(cache.sets_of(impl.put(ids), impl.put(keys)))
    base, count = np.asarray(cache.set_base), np.asarray(cache.num_sets)
    assert ((sets >= base[ids]) & (sets < base[ids] + count[ids])).all()  # a table's keys stay in its sets
    for s in np.unique(sets)[:20].tolist():
        dumped_ids, dumped = (impl.get(a) for a in cache.dump_sets(s, s + 1))
        expected = {(int(t), int(k)) for t, k, ks in zip(ids, keys, sets) if ks == s}
        assert set(zip(dumped_ids.tolist(), dumped.astype(np.int64).tolist())) == expected


@pytest.mark.parametrize("formats", FORMAT_MIXES)
def test_views_share_the_structure(impl: Impl, formats: tuple[RowFormat, ...]) -> None:
    cache = impl.make(row_formats=formats)
    view = TableView(cache, 2)
    assert (view.dim, view.kind) == (16, cache.kind)
    keys = np.array([1, 2, 3], np.int64)
    view.replace(impl.put(keys), impl.put(np.ones((3, 16), np.float32)))
    assert np.asarray(cache.sizes()).tolist() == [0, 0, 3] and view.size() == 3
    _, hit = impl.query(cache, np.full(3, 2, np.int64), keys)
    assert hit.all()
    _, hit = impl.query(cache, np.zeros(3, np.int64), keys)
    assert not hit.any()


def test_copy_rows_moves_rows_of_every_width(impl: Impl) -> None:
    cache = impl.make()
    ids = np.array([2, 0, 1], np.int64)
    src = impl.put(np.arange(40, dtype=np.float32))
    dst = impl.xp.zeros(40, np.float32)
    cache.copy_rows(src, impl.put(np.array([0, 16, 24], np.int64)), dst, impl.put(np.array([20, 0, 36], np.int64)),
                    impl.put(ids))
    host = impl.get(dst)
    np.testing.assert_array_equal(host[20:36], np.arange(16))
    np.testing.assert_array_equal(host[0:8], np.arange(16, 24))
    np.testing.assert_array_equal(host[36:39], np.arange(24, 27))
    assert (host[8:20] == 0).all()


def test_rows_that_do_not_fit_are_refused(impl: Impl) -> None:
    cache = impl.make()
    keys = impl.put(np.array([1, 2], np.int64))
    out = impl.xp.zeros(20, np.float32)
    with pytest.raises(RequestError):
        cache.query_tables(impl.put(np.array([0, 2], np.int64)), keys, out, impl.put(np.array([0, 8], np.int64)))
    with pytest.raises(RequestError):
        cache.query_tables(impl.put(np.array([0, 3], np.int64)), keys, out, impl.put(np.array([0, 8], np.int64)))
    # Host ids and offsets are checked before anything is written, on every device (a GPU's
    # asynchronous replace skips a bad row of device arrays instead: it cannot wait to raise).
    with pytest.raises(RequestError):
        cache.replace_tables(np.array([0, 1], np.int64), keys, out, np.array([0, -1], np.int64))
    assert np.asarray(cache.sizes()).tolist() == [0, 0, 0]


@pytest.mark.parametrize("formats", FORMAT_MIXES)
def test_static_table_full_writes_nothing_in_any_table(impl: Impl, formats: tuple[RowFormat, ...]) -> None:
    if impl.kind != "static":
        pytest.skip("only static tables refuse inserts")
    cache = impl.make(capacities=(4, 50, 50), row_formats=formats)
    ids = np.array([1, 0, 0, 0, 0, 0], np.int64)  # table 0 gets 5 new keys for 4 rows
    keys = np.array([9, 1, 2, 3, 4, 5], np.int64)
    with pytest.raises(CacheFullError, match="table 0"):
        impl.replace(cache, ids, keys, rows_for(ids, keys))
    assert np.asarray(cache.sizes()).tolist() == [0, 0, 0]
    impl.replace(cache, ids[:5], keys[:5], rows_for(ids[:5], keys[:5]))
    assert np.asarray(cache.sizes()).tolist() == [4, 1, 0]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_eviction_order_holds_across_the_32_bit_clock_wrap(impl: Impl, policy: str) -> None:
    """Key 0 is touched last, at tick 2**32: a 32-bit stamp would wrap to 0, make it look
    the oldest and evict it. With equal access counts LFU falls back to the stamps too."""
    if impl.kind != "dynamic":
        pytest.skip("static tables never evict")
    capacities, dims = (WAYS, WAYS), (1, 2)  # table 0: one set
    if impl.device == "cpu":
        cache: MultiTableCache = CpuDynamicCache(capacities, dims, policy=policy, clock_start=2**32 - 2)
    else:
        from hps_core.cache.gpu import GpuDynamicCache

        cache = GpuDynamicCache(capacities, dims, device=int(impl.device), policy=policy, clock_start=2**32 - 2)
    keys = np.arange(WAYS, dtype=np.int64)
    ids = np.zeros(WAYS, np.int64)
    impl.replace(cache, ids, keys, rows_for(ids, keys))  # tick 2**32 - 2
    assert impl.query(cache, ids[1:], keys[1:])[1].all()  # tick 2**32 - 1
    assert impl.query(cache, ids[:1], keys[:1])[1].all()  # tick 2**32
    impl.replace(cache, ids[:1], np.array([100], np.int64), rows_for(ids[:1], np.array([100])))  # 2**32 + 1
    held = {key for table, key in impl.held(cache) if table == 0}
    assert 0 in held and 100 in held and len(held) == WAYS


def test_clock_start_is_checked() -> None:
    with pytest.raises(ConfigError, match="clock_start"):
        CpuDynamicCache((WAYS,), (1,), clock_start=0)


@pytest.mark.parametrize("bad", [dict(capacities=(10, 0, 10)), dict(dims=(8, 3)), dict(policy="fifo"),
                                 dict(row_formats=(FP32, FP16)), dict(row_formats=(FP32, "fp4", FP8)),
                                 dict(row_formats="fp16")])
def test_bad_construction_names_the_problem(impl: Impl, bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        impl.make(**bad)


def test_row_formats_default_to_fp32_and_take_names(impl: Impl) -> None:
    assert impl.make().row_formats == (FP32,) * 3
    assert impl.make(row_formats=("int8", "fp32", "fp8")).row_formats == (INT8, FP32, FP8)


def test_stored_rows_are_packed_and_aligned() -> None:
    """A row takes its packed size (fp8 and int8 rounded up to 4 bytes); every table starts
    16-byte aligned in the one byte-addressed store."""
    assert [row_stride(f, 16) for f in (FP32, FP16, FP8, INT8)] == [64, 32, 20, 24]
    assert [row_stride(f, 128) for f in (FP32, FP16, FP8, INT8)] == [512, 256, 132, 136]
    assert [row_stride(f, 3) for f in (FP32, FP16, FP8, INT8)] == [12, 6, 8, 12]
    budget = 1 << 20
    assert [capacity_for_bytes(budget, 128, f) for f in (FP32, FP16, FP8, INT8)] == \
        [2048, 4096, budget // 132, budget // 136]
    assert capacity_for_bytes(budget, 128) == 2048 and capacity_for_bytes(budget, 16, "int8") == budget // 24
    for cls_kind in ("dynamic", "static"):
        cache = make_multi_table_cache(cls_kind, device="cpu", capacities=CAPACITIES, dims=DIMS,
                                       row_formats=(INT8, FP16, FP8))
        base = np.asarray(cache.value_base)
        assert (base % 16 == 0).all() and base[0] == 0
        strides = [row_stride(f, d) for f, d in zip(cache.row_formats, DIMS)]
        assert (np.diff(base) >= np.asarray(cache.capacities)[:-1] * strides[:-1]).all()


@pytest.mark.parametrize("formats", [(INT8, FP16, FP8), (FP8, FP32, INT8)], ids=["int8-fp16-fp8", "fp8-fp32-int8"])
def test_a_row_its_table_cannot_store_refuses_the_batch(impl: Impl, formats: tuple[RowFormat, ...]) -> None:
    """One NaN in a compact table's row refuses the whole batch, every table's rows included
    (host arrays, on both twins); fp32 tables store NaN as given."""
    cache = impl.make(row_formats=formats)
    ids = np.array([0, 1, 2], np.int64)
    keys = np.array([1, 2, 3], np.int64)
    rows = rows_for(ids, keys)
    compact = next(t for t, f in enumerate(formats) if f is not FP32)
    rows[compact][1] = np.nan
    with pytest.raises(RowValueError, match=f"position {compact} \\(table {compact}\\)"):
        impl.replace(cache, ids, keys, rows)
    assert np.asarray(cache.sizes()).tolist() == [0, 0, 0]
    if FP32 in formats:
        t = formats.index(FP32)
        nan_row = rows_for(ids[t : t + 1], keys[t : t + 1])[0]
        nan_row[0] = np.nan
        impl.replace(cache, ids[t : t + 1], keys[t : t + 1], [nan_row])
        got, hit = impl.query(cache, ids[t : t + 1], keys[t : t + 1])
        assert hit.all() and np.isnan(got[0][0])


@pytest.mark.parametrize("formats", [(INT8, FP16, FP8), (FP8, FP32, INT8), (FP16,) * 3],
                         ids=["int8-fp16-fp8", "fp8-fp32-int8", "fp16"])
@pytest.mark.parametrize("write", ["replace", "update"])
def test_a_batch_in_the_caches_memory_with_an_unstorable_row_changes_nothing(
        impl: Impl, formats: tuple[RowFormat, ...], write: str) -> None:
    """Arrays in the cache's own memory (device arrays on a GPU, where the check pass runs
    before the write): a batch holding a row its table's format cannot store is refused
    whole, with the CPU twin's RowValueError naming the first such position, before any row
    is written: every cached key keeps its old row, no key is inserted, no table changes."""
    ids = np.array([0, 1, 2, 2, 1, 0], np.int64)
    keys = np.array([1, 2, 3, 4, 5, 6], np.int64)
    old = rows_for(ids[:3], keys[:3])

    def prepared(on: Impl) -> MultiTableCache:  # keys 1, 2, 3 cached, one per table
        cache = on.make(row_formats=formats)
        on.replace(cache, ids[:3], keys[:3], old)
        return cache

    new = rows_for(ids, keys, version=0.5)
    compact = [i for i, t in enumerate(ids.tolist()) if formats[t] is not FP32]
    first, later = compact[0], compact[-1]
    new[later][0] = np.nan
    new[first][-1] = np.inf  # two unstorable rows: the first is named
    cache = prepared(impl)
    held, sizes = impl.held(cache), np.asarray(cache.sizes()).tolist()
    with pytest.raises(RowValueError, match=f"position {first} \\(table {ids[first]}\\)") as info:
        getattr(impl, write)(cache, ids, keys, new)
    assert info.value.position == first
    twin = Impl("cpu", impl.kind, np)
    with pytest.raises(RowValueError) as on_twin:
        getattr(twin, write)(prepared(twin), ids, keys, new)
    assert str(info.value) == str(on_twin.value)
    assert impl.held(cache) == held and np.asarray(cache.sizes()).tolist() == sizes == [1, 1, 1]
    got, hit = impl.query(cache, ids, keys)
    np.testing.assert_array_equal(hit, [True] * 3 + [False] * 3)
    assert_rows_equal(got[:3], stored_rows(ids[:3], old, formats))
    assert all((g == -7.0).all() for g in got[3:])


@pytest.mark.parametrize("formats", FORMAT_MIXES)
@pytest.mark.parametrize("key_dtype", [np.int64, np.uint32])
def test_random_operations_across_tables(impl: Impl, formats: tuple[RowFormat, ...], key_dtype: Any) -> None:
    rng = np.random.default_rng(sum(f.code << (2 * t) for t, f in enumerate(formats)) * 2 + int(key_dtype == np.uint32))
    capacities = (96, 64, 128) if impl.kind == "dynamic" else (400, 400, 400)
    cache = impl.make(capacities=capacities, row_formats=formats, key_dtype=key_dtype)
    model: dict[tuple[int, int], np.ndarray] = {}
    universe = 300
    for step in range(40):
        n = int(rng.integers(1, 90))
        ids = rng.integers(0, 3, n).astype(np.int64)
        keys = rng.integers(0, universe, n).astype(np.int64) + (2**32 - 400 if key_dtype == np.uint32 else 2**40)
        pairs = list(zip(ids.tolist(), keys.tolist()))
        first = np.array(sorted({p: i for i, p in reversed(list(enumerate(pairs)))}.values()))  # one per pair
        ids, keys = ids[first], keys[first]
        rows = [r * np.float32(rng.standard_normal()) for r in rows_for(ids, keys, version=float(step))]
        expected = stored_rows(ids, rows, formats)
        op = rng.choice(["replace", "update", "query"])
        if op == "replace":
            impl.replace(cache, ids, keys, rows)
            model.update({(int(t), int(k)): r for t, k, r in zip(ids, keys, expected)})
        elif op == "update":
            held = impl.held(cache)
            present = np.array([(int(t), int(k)) in held for t, k in zip(ids, keys)])
            assert impl.update(cache, ids, keys, rows) == present.sum()
            model.update({(int(t), int(k)): r for t, k, r, p in zip(ids, keys, expected, present) if p})
            assert impl.held(cache) == held
        got, hit = impl.query(cache, ids, keys)
        for t, k, row, h in zip(ids.tolist(), keys.tolist(), got, hit):
            if h:
                assert_rows_equal([row], [model[(t, k)]], msg=f"step {step} table {t} key {k}")
            if impl.kind == "static":
                assert h == ((t, k) in model)
        sizes = np.asarray(cache.sizes())
        assert (sizes <= np.asarray(cache.capacities)).all()
        assert sizes.sum() == len(impl.held(cache))
