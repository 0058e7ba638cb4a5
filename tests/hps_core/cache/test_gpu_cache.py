"""GPU caches beyond the contract suites: kernel shape selection and the CuPy-free import
(these run anywhere), and on a GPU with CuPy: agreement with the CPU twins on a 3-table
cache of every row format (the device encoding against row_formats.py bit for bit: the bytes
stored and the floats queried), concurrent streams and threads, misaligned buffers, rows that
do not fit or that a format cannot store, the LRU clock past 2**32, arrays on another
device, and the launches and syncs of each call."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from hps_core.cache import WAYS, CpuDynamicCache, CpuStaticCache, EmbeddingCache, TableView
from hps_core.cache import gpu
from hps_core.cache._kernels import MAX_GPU_DIM, vector_shape, vector_shapes
from hps_core.cache.cpu import FREQ_MAX
from hps_core.errors import CacheFullError, ConfigError, RequestError, RowValueError
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack, unpack
from hps_core.rows import copy_rows, row_offsets
from tests.hps_core.cache.test_multi_table import FORMAT_MIXES, FP8, FP16, FP32, INT8
from tests.hps_core.cache.test_row_formats_cuh import edge_rows
from tests.hps_core.cache.threads import run_writers_and_readers
from tests import cuda_emulator

DIMS = np.array([8, 3, 16], np.int64)  # gcd 1: VEC 1
DIMS4 = np.array([8, 4, 16], np.int64)  # gcd 4: VEC 4 where buffers allow


@pytest.mark.parametrize(
    ("dims", "pointers", "expected"),
    [
        ([128], (), (4, 1)),
        ([256], (), (4, 2)),
        ([1024], (), (4, 8)),
        ([130], (), (2, 4)),  # 65 groups of 2 per 32 lanes -> 3, rounded to 4
        ([3], (), (1, 1)),
        ([64, 128, 32], (), (4, 1)),
        ([8, 3, 16], (), (1, 1)),  # a dim of 3: single floats, whatever the others
        ([8, 6, 16], (), (2, 1)),  # gcd 2
        ([4, 1024], (), (4, 8)),  # NV from the widest table
        ([2, 1000], (), (2, 16)),
        ([128], (8,), (2, 2)),  # a buffer only 8-byte aligned: no float4
        ([128], (256, 4), (1, 4)),  # the least aligned buffer decides
        ([1023], (), (1, 32)),
    ],
)
def test_vector_shape(dims: list[int], pointers: tuple[int, ...], expected: tuple[int, int]) -> None:
    vec, nv = vector_shape(dims, *pointers)
    assert (vec, nv) == expected
    assert vec * nv <= 32 and 32 * vec * nv >= max(dims) and all(d % vec == 0 for d in dims)


def test_vector_shapes_offer_every_narrower_width() -> None:
    """A call on a misaligned buffer narrows VEC: the cache compiles each width up front."""
    assert vector_shapes([128, 64]) == {4: 1, 2: 2, 1: 4}
    assert vector_shapes([6, 10]) == {2: 1, 1: 1}
    assert vector_shapes([7]) == {1: 1}


def test_vector_shape_refuses_wide_rows() -> None:
    with pytest.raises(ConfigError, match=str(MAX_GPU_DIM)):
        vector_shape([4, MAX_GPU_DIM + 1])


def test_gpu_module_imports_without_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI has no CuPy: importing gpu.py must work, constructing a cache must say why not."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    with pytest.raises(ConfigError, match="1024"):  # checked before CuPy is needed
        gpu.GpuDynamicCache([64], [MAX_GPU_DIM + 1])
    with pytest.raises(ConfigError, match="CuPy"):
        gpu.GpuStaticCache([64, 8], [4, 4])


# --------------------------------------------------------------------------- on a GPU


@pytest.fixture
def cp() -> Any:
    return pytest.importorskip("cupy", reason="GPU caches need CuPy")


def make(kind: str, capacities: list[int], dims: Any, **kwargs: Any) -> Any:
    cls = gpu.GpuDynamicCache if kind == "dynamic" else gpu.GpuStaticCache
    return cls(capacities, [int(d) for d in dims], device=0, **kwargs)


def host(arr: Any) -> np.ndarray:
    return arr if isinstance(arr, np.ndarray) else arr.get()


def pairs(tables: Any, keys: Any) -> list[tuple[int, int]]:
    return sorted(zip(host(tables).tolist(), host(keys).astype(np.int64).tolist()))


def batch(rng: np.random.Generator, per_table: list[int], universe: int) -> tuple[np.ndarray, np.ndarray]:
    """(table_ids, keys), tables interleaved, distinct keys per table."""
    ids = np.repeat(np.arange(len(per_table)), per_table).astype(np.int64)
    keys = np.concatenate([rng.choice(universe, k, replace=False) for k in per_table]).astype(np.int64)
    order = rng.permutation(len(keys))
    return ids[order], keys[order]


def bits(arr: Any) -> np.ndarray:
    """A float32 array's bits on the host (tells -0.0 from 0.0, compares NaNs)."""
    return np.ascontiguousarray(host(arr), np.float32).view(np.uint32)


def query_rows(cp: Any, cache: Any, ids: np.ndarray, keys: np.ndarray, dims: np.ndarray,
               stream: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query_tables call on ``stream`` into a zeroed ``out``: (out on the host, which keys
    hit, the rows' offsets in it)."""
    offs, total = row_offsets(ids, dims)
    with stream:
        out = cp.zeros(total, cp.float32)
    missing = cache.query_tables(cp.asarray(ids), cp.asarray(keys), out, cp.asarray(offs), stream=stream)
    hit = np.ones(len(keys), bool)
    hit[missing.get(stream=stream)] = False
    return out.get(stream=stream), hit, offs

    stop.set()
    for t in writers:
        t.join()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("formats", FORMAT_MIXES)
@pytest.mark.parametrize("dims", [DIMS, DIMS4], ids=["vec1", "vec4"])
def test_gpu_and_cpu_twin_agree_on_sets_and_contents(cp: Any, kind: str, policy: str, formats: Any,
                                                     dims: np.ndarray) -> None:
    """3 tables, loaded lightly (no set overflows, so nothing is evicted and both must hold
    exactly the same keys in the same sets with the same rows, bit for bit)."""
    caps = [4096, 2048, 1024]
    cpu_cls = CpuDynamicCache if kind == "dynamic" else CpuStaticCache
    g = make(kind, caps, dims, policy=policy, row_formats=formats)
    c = cpu_cls(caps, dims.tolist(), policy=policy, row_formats=formats)
    for attr in ("dims", "capacities", "num_sets", "set_base", "value_base"):
        np.testing.assert_array_equal(getattr(g, attr), getattr(c, attr), err_msg=attr)
    assert (g.total_sets, g.kind, g.policy, g.row_formats) == (c.total_sets, c.kind, c.policy, c.row_formats)

    rng = np.random.default_rng(0)
    ids, keys = batch(rng, [600, 300, 150], 2**40)
    keys[np.flatnonzero(ids == 1)[:10]] = keys[np.flatnonzero(ids == 0)[:10]]  # same keys in two tables
    offs, total = row_offsets(ids, dims)
    vals = rng.standard_normal(total).astype(np.float32)
    np.testing.assert_array_equal(host(g.sets_of(cp.asarray(ids), cp.asarray(keys))), c.sets_of(ids, keys))
    g.replace_tables(cp.asarray(ids), cp.asarray(keys), cp.asarray(vals), cp.asarray(offs))
    c.replace_tables(ids, keys, vals, offs)

    def same_state() -> None:
        np.testing.assert_array_equal(g.sizes(), c.sizes())
        for lo in range(0, g.total_sets, 7):
            assert pairs(*g.dump_sets(lo, lo + 7)) == pairs(*c.dump_sets(lo, lo + 7)), lo
        probe_ids = np.concatenate([ids, [0, 1, 2]]).astype(np.int64)
        probe_keys = np.concatenate([keys, [2**41] * 3]).astype(np.int64)
        probe_offs, size = row_offsets(probe_ids, dims)
        out_g, out_c = cp.full(size, -7.0, cp.float32), np.full(size, -7.0, np.float32)
        miss_g = g.query_tables(cp.asarray(probe_ids), cp.asarray(probe_keys), out_g, cp.asarray(probe_offs))
        miss_c = c.query_tables(probe_ids, probe_keys, out_c, probe_offs)
        np.testing.assert_array_equal(np.sort(host(miss_g)), miss_c)
        np.testing.assert_array_equal(bits(out_g), bits(out_c))

    same_state()
    upd_ids = np.concatenate([ids[:50], [2]]).astype(np.int64)
    upd_keys = np.concatenate([keys[:50], [2**41]]).astype(np.int64)
    upd_offs, upd_total = row_offsets(upd_ids, dims)
    upd = rng.standard_normal(upd_total).astype(np.float32)
    assert g.update_tables(cp.asarray(upd_ids), cp.asarray(upd_keys), cp.asarray(upd), cp.asarray(upd_offs)) == \
        c.update_tables(upd_ids, upd_keys, upd, upd_offs) == 50
    same_state()
    g.clear(1)
    c.clear(1)
    same_state()


#: Writers cycle through this many versions of each row (see StoredRows).
VERSIONS = 16


def encode(ids: np.ndarray, keys: np.ndarray, version: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows naming their table and key (element 0) and the writer's version (the others): a
    torn row mixes two versions, another key's row has the wrong element 0."""
    offs, total = row_offsets(ids, DIMS)
    vals = np.full(total, float(version % VERSIONS + 1), np.float32)
    vals[offs] = (keys % 512) * 4 + ids
    return vals, offs


class StoredRows:
    """Every row :func:`encode` writes, as tables of ``formats`` store it (``unpack(pack(row))``):
    per table the rows' bytes, sorted, and the key (mod 512) each names. A hit that is not one
    of its own key's rows, bit for bit, is wrong: another key's, or torn (whatever the format
    does to a row, a mix of two versions' packed bytes decodes to neither)."""

    def __init__(self, formats: Any) -> None:
        marks, versions = np.repeat(np.arange(512), VERSIONS), np.tile(np.arange(VERSIONS), 512)
        self.tables = []
        for t, dim in enumerate(DIMS.tolist()):
            rows = np.repeat((versions + 1)[:, None].astype(np.float32), dim, axis=1)
            rows[:, 0] = marks * 4 + t
            as_stored = self.void(unpack(formats[t], pack(formats[t], rows), dim))
            order = np.argsort(as_stored)
            self.tables.append((as_stored[order], marks[order]))

    @staticmethod
    def void(rows: np.ndarray) -> np.ndarray:
        """(n,) opaque items of a (n, dim) float32 array's rows, compared byte by byte."""
        rows = np.ascontiguousarray(rows, np.float32)
        return rows.view(np.dtype((np.void, 4 * rows.shape[1]))).ravel()

    def wrong(self, ids: np.ndarray, keys: np.ndarray, out: np.ndarray, offs: np.ndarray, hit: np.ndarray) -> int:
        wrong = 0
        for t, dim in enumerate(DIMS.tolist()):
            sel = hit & (ids == t)
            got = self.void(out[offs[sel][:, None] + np.arange(dim)])
            known, marks = self.tables[t]
            at = np.minimum(np.searchsorted(known, got), known.shape[0] - 1)
            wrong += int((~((known[at] == got) & (marks[at] == keys[sel] % 512))).sum())
        return wrong


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("formats", [(FP32,) * 3, (FP16,) * 3, (INT8, FP8, FP16)], ids=["fp32", "fp16", "int8-fp8-fp16"])
def test_streams_and_threads_never_see_wrong_or_torn_vectors(cp: Any, kind: str, formats: Any) -> None:
    """Writers rewrite rows of all three tables (and a dynamic cache is cleared now and then)
    while readers on other streams query them: every hit must be one row stored under its own
    table and key, header and elements of the same write."""
    universe = 6000  # keys per table
    # the emulated device runs a key's warp in about 10 us of CPU: fewer, smaller batches
    # there (still thousands of overlapping writes per row format; races are between launches)
    write_batch, read_batch, rounds = (2048, 4096, 12) if cuda_emulator.enabled() else (8192, 65536, 150)
    caps = [1024, 1024, 1024] if kind == "dynamic" else [universe] * 3  # dynamic: constant eviction
    cache = make(kind, caps, DIMS, row_formats=formats)
    expected = StoredRows(formats)
    stop = threading.Event()
    written = threading.Event()  # readers start once rows are stored, however slow the writes
    bad: list[int] = []
    hits: list[int] = []

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        stream = cp.cuda.Stream(non_blocking=True)
        for step in itertools.count(1):
            if stop.is_set():
                return
            flat = rng.choice(3 * universe, write_batch, replace=False)
            ids, keys = (flat // universe).astype(np.int64), (flat % universe).astype(np.int64)
            vals, offs = encode(ids, keys, step)
            args = [cp.asarray(a) for a in (ids, keys, vals, offs)]
            cache.replace_tables(*args, stream=stream)
            cache.update_tables(*args, stream=stream)
            if kind == "dynamic" and seed == 1 and step % 50 == 0:
                cache.clear(step % 3, stream=stream)
            stream.synchronize()
            written.set()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        stream = cp.cuda.Stream(non_blocking=True)
        wrong = found = 0
        written.wait(timeout=600)
        for _ in range(rounds):
            ids = rng.integers(0, 3, read_batch).astype(np.int64)
            keys = rng.integers(0, universe, read_batch).astype(np.int64)
            flat, hit, offs = query_rows(cp, cache, ids, keys, DIMS, stream)
            found += int(hit.sum())
            wrong += expected.wrong(ids, keys, flat, offs, hit)
        bad.append(wrong)
        hits.append(found)

    run_writers_and_readers(writer, reader, stop)
    assert bad == [0, 0]
    assert all(h > 0 for h in hits)
    assert (cache.sizes() <= cache.capacities).all()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_readers_paused_inside_their_seqlock_window_never_accept_a_torn_row(cp: Any, kind: str,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Two writers keep rewriting the same 8 rows (every element of a write the same value,
    naming its key) while two readers query them: every hit must be one whole write of its
    key. On the emulated device every 16th acquire load stops its host thread for 200 us
    right after it read (HPS_EMU_STALL_*): a reader's lane then holds the row's version
    while a whole write lands, so lanes of one warp copy one row across a write. Only the
    reader's re-check of the version (v1 == v2) rejects that copy: without it this test
    sees torn rows, which the streams test above never did (docs/gpu_check.md, mutations)."""
    monkeypatch.setenv("HPS_EMU_STALL_EVERY", "16")
    monkeypatch.setenv("HPS_EMU_STALL_US", "200")
    dims = np.array([64, 128], np.int64)  # rows spread over 16 and 32 lanes (VEC 4)
    ids = np.repeat([0, 1], 4).astype(np.int64)
    keys = np.tile(np.arange(4), 2).astype(np.int64)
    offs, total = row_offsets(ids, dims)
    cache = make(kind, [64, 64], dims)

    def rows(step: int) -> Any:
        flat = np.empty(total, np.float32)
        for i, (t, k) in enumerate(zip(ids.tolist(), keys.tolist())):
            flat[offs[i]: offs[i] + dims[t]] = k * 4096 + step % 4096  # exact in float32
        return cp.asarray(flat)

    args = [cp.asarray(a) for a in (ids, keys)]
    cache.replace_tables(args[0], args[1], rows(0), cp.asarray(offs))
    stop = threading.Event()
    torn: list[int] = []
    hits: list[int] = []

    def writer(first: int) -> None:
        stream = cp.cuda.Stream(non_blocking=True)
        for step in itertools.count(first, 2):
            if stop.is_set():
                return
            cache.replace_tables(args[0], args[1], rows(step), cp.asarray(offs), stream=stream)
            stream.synchronize()
            time.sleep(0.005)  # rows stand still now and then, so readers get clean copies too

    def reader(_seed: int) -> None:
        stream = cp.cuda.Stream(non_blocking=True)
        bad = found = 0
        for _ in range(30):
            flat, hit, _offs = query_rows(cp, cache, ids, keys, dims, stream)
            for i in np.flatnonzero(hit).tolist():
                row = flat[offs[i]: offs[i] + dims[ids[i]]]
                found += 1
                bad += not ((row == row[0]).all() and int(row[0]) // 4096 == keys[i])
        torn.append(bad)
        hits.append(found)

    run_writers_and_readers(writer, reader, stop)
    assert torn == [0, 0]
    assert all(h > 0 for h in hits)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("formats", FORMAT_MIXES)
def test_misaligned_buffers_and_offsets(cp: Any, kind: str, formats: Any) -> None:
    """Buffers 4 bytes past alignment narrow VEC to 1; rows at offsets that are not
    multiples of VEC (with an aligned buffer, VEC 4) move element by element. Same rows, as
    each table's format stores them."""
    cache = make(kind, [256] * 3, DIMS4, row_formats=formats)
    rng = np.random.default_rng(5)
    ids, keys = batch(rng, [10, 10, 10], 1000)
    packed, _ = row_offsets(ids, DIMS4)
    offs = packed + np.arange(len(ids))  # row i shifted by i floats: odd rows misaligned
    size = int(offs[-1] + DIMS4[ids[-1]])
    src_host = rng.standard_normal(size).astype(np.float32)
    ids_d, keys_d, offs_d = cp.asarray(ids), cp.asarray(keys), cp.asarray(offs)
    src = cp.zeros(size + 1, cp.float32)[1:]  # 4-byte aligned only
    src[...] = cp.asarray(src_host)
    cache.replace_tables(ids_d, keys_d, src, offs_d)
    expected = np.full(size, -7.0, np.float32)
    for i, (t, o) in enumerate(zip(ids.tolist(), offs.tolist())):
        row = src_host[None, o : o + DIMS4[t]]
        expected[o : o + DIMS4[t]] = unpack(formats[t], pack(formats[t], row), DIMS4[t])[0]
    for shift in (0, 1):  # an aligned out, then one 4 bytes past alignment
        out = cp.full(size + shift, -7.0, cp.float32)[shift:]
        assert cache.query_tables(ids_d, keys_d, out, offs_d).size == 0
        np.testing.assert_array_equal(bits(out), bits(expected))
    dst_offs = packed + 1  # every destination row misaligned, sources half of them
    dst = cp.full(size, -7.0, cp.float32)
    cache.copy_rows(src, offs_d, dst, cp.asarray(dst_offs), ids_d)
    expected_dst = np.full(size, -7.0, np.float32)
    copy_rows(src_host, offs, expected_dst, dst_offs, ids, DIMS4)
    np.testing.assert_array_equal(host(dst), expected_dst)


@pytest.mark.gpu
def test_copy_rows_within_one_buffer(cp: Any) -> None:
    """The lookup copies a batch's repeated rows within its output: src is dst."""
    cache = gpu.GpuDynamicCache([64] * 3, DIMS.tolist(), device=0)
    ids = np.array([0, 1, 2, 2, 0, 1], np.int64)
    offs, total = row_offsets(ids, DIMS)
    flat = np.random.default_rng(3).standard_normal(2 * total).astype(np.float32)
    buf = cp.asarray(flat)
    cache.copy_rows(buf, offs, buf, offs + total, ids)  # first half's rows onto the second half
    copy_rows(flat, offs, flat, offs + total, ids, DIMS)
    np.testing.assert_array_equal(host(buf), flat)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("overrun", [7, 1], ids=["from-the-last-float", "one-float-past"])
def test_rows_that_do_not_fit_are_refused_and_never_written(cp: Any, kind: str, overrun: int) -> None:
    """A row of 8 floats ending ``overrun`` floats past the buffer (1: the kernels' bound is
    exact, not off by one) is refused wherever it is found, and nothing past the buffer is written."""
    cache = make(kind, [256] * 3, DIMS)
    ids, keys = np.array([0, 1, 2, 0, 1], np.int64), np.arange(5, dtype=np.int64)
    offs, total = row_offsets(ids, DIMS)
    vals = np.ones(total, np.float32)
    cache.replace_tables(ids, keys, vals, offs)
    backing = cp.full(total + 64, -7.0, cp.float32)
    out = backing[:total]
    bad_offs = offs.copy()
    bad_offs[3] = total - DIMS[ids[3]] + overrun  # position 3 is a row of table 0: 8 floats
    with pytest.raises(RequestError, match="position 3"):  # found by the kernel
        cache.query_tables(cp.asarray(ids), cp.asarray(keys), out, cp.asarray(bad_offs))
    with pytest.raises(RequestError, match="position 3"):  # found on the host
        cache.query_tables(ids, keys, out, bad_offs)
    bad_ids = ids.copy()
    bad_ids[1] = 7
    with pytest.raises(RequestError, match="position 1"):
        cache.query_tables(cp.asarray(bad_ids), cp.asarray(keys), out, cp.asarray(offs))
    assert (backing[total:] == -7.0).all()  # nothing past `out`
    with pytest.raises(RequestError, match="position 3"):
        cache.update_tables(cp.asarray(ids), cp.asarray(keys), cp.asarray(vals), cp.asarray(bad_offs))
    fresh = make(kind, [256] * 3, DIMS)
    args = (cp.asarray(ids), cp.asarray(keys + 100), cp.asarray(vals), cp.asarray(bad_offs))
    if kind == "static":  # waits for its kernels: refuses the batch before writing
        with pytest.raises(RequestError, match="position 3"):
            fresh.replace_tables(*args)
        assert fresh.sizes().sum() == 0
    else:  # does not wait: skips the row it cannot read, stores the others
        fresh.replace_tables(*args)
        assert fresh.sizes().sum() == 4


@pytest.mark.gpu
def test_arrays_on_another_device_are_refused(cp: Any) -> None:
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    cache = gpu.GpuDynamicCache([256], [4], device=0)
    ids, keys, offs = np.zeros(2, np.int64), np.arange(2, dtype=np.int64), np.array([0, 4], np.int64)
    with cp.cuda.Device(1):
        out1, keys1 = cp.zeros(8, cp.float32), cp.asarray(keys)
    with pytest.raises(RequestError, match="out is on GPU 1"):
        cache.query_tables(ids, keys, out1, offs)
    with pytest.raises(RequestError, match="keys is on GPU 1"):
        cache.query_tables(ids, keys1, cp.zeros(8, cp.float32), offs)
    with pytest.raises(RequestError, match="dst is on GPU 1"):
        cache.copy_rows(cp.zeros(8, cp.float32), offs, out1, offs, ids)


def count_launches_and_syncs(cache: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the cache's kernel launches (its kernel handles, wrapped) and read-backs."""
    counts = {"launches": 0, "syncs": 0}

    def counting(kernel: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> Any:
            counts["launches"] += 1
            return kernel(*args, **kwargs)
        return launch

    for table in (cache._kernels, cache._row_kernels):  # _kernels.Kernels: per-VEC dicts and one more
        for kernels in (*table.by_vec.values(), table.no_vec):
            for name in kernels:
                kernels[name] = counting(kernels[name])
    read = gpu._Workspace.read

    def counted_read(self: Any, words: int, stream: Any) -> Any:
        counts["syncs"] += 1
        return read(self, words, stream)

    monkeypatch.setattr(gpu._Workspace, "read", counted_read)
    return counts


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_launches_and_syncs_per_call(cp: Any, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One launch per call whatever the table count; query_tables syncs once. fp32 tables:
    no check pass before a write (fp32 stores any row)."""
    cache = make(kind, [1024] * 3, DIMS)
    rng = np.random.default_rng(2)
    ids, keys = batch(rng, [300, 200, 100], 10_000)
    offs, total = row_offsets(ids, DIMS)
    ids_d, keys_d, offs_d = cp.asarray(ids), cp.asarray(keys), cp.asarray(offs)
    vals, out = cp.ones(total, cp.float32), cp.zeros(total, cp.float32)
    counts = count_launches_and_syncs(cache, monkeypatch)

    def cost(call: Any, *args: Any) -> tuple[int, int]:
        counts.update(launches=0, syncs=0)
        call(*args)
        return counts["launches"], counts["syncs"]

    assert cost(cache.replace_tables, ids_d, keys_d, vals, offs_d) == ((1, 0) if kind == "dynamic" else (2, 2))
    assert cost(cache.query_tables, ids_d, keys_d, out, offs_d) == (1, 1)
    assert cost(cache.update_tables, ids_d, keys_d, vals, offs_d) == (1, 1)
    assert cost(cache.copy_rows, vals, offs_d, out, offs_d, ids_d) == (1, 0)
    assert (out == 1.0).all()


@pytest.mark.gpu
def test_static_table_without_room_is_named_and_nothing_is_written(cp: Any) -> None:
    cache = gpu.GpuStaticCache([10, 4, 8], DIMS.tolist(), device=0)
    first = np.array([1, 1, 1], np.int64)
    offs, total = row_offsets(first, DIMS)
    cache.replace_tables(first, np.arange(3, dtype=np.int64), np.ones(total, np.float32), offs)
    ids = np.array([0, 1, 1, 1, 2], np.int64)  # table 1: 2 new keys (and a duplicate), 1 row left
    keys = np.array([50, 7, 8, 8, 50], np.int64)
    offs, total = row_offsets(ids, DIMS)
    with pytest.raises(CacheFullError, match="table 1 is full"):
        cache.replace_tables(ids, keys, np.ones(total, np.float32), offs)
    np.testing.assert_array_equal(cache.sizes(), [0, 3, 0])
    assert pairs(*cache.dump_sets(0, 3)) == [(1, 0), (1, 1), (1, 2)]
    keys[2:4] = [0, 1]  # now one new key for table 1 (7), beside two it holds: fits
    cache.replace_tables(ids, keys, np.ones(total, np.float32), offs)
    np.testing.assert_array_equal(cache.sizes(), [1, 4, 1])


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [gpu.GpuEmbeddingCache, gpu.StaticEmbeddingTable])
def test_one_table_classes_are_views_of_a_multi_table_cache(cp: Any, cls: Any) -> None:
    cache = cls(100, 5, device=0, row_format=FP16, key_dtype=np.uint32)
    assert isinstance(cache, TableView) and isinstance(cache, EmbeddingCache)
    assert (cache.dim, cache.device, cache.row_format, cache.key_dtype) == (5, 0, FP16, np.uint32)
    keys = cp.arange(20, dtype=cp.uint32)
    vals = cp.arange(100, dtype=cp.float32).reshape(20, 5)
    cache.replace(keys, vals)
    out = cp.zeros((21, 5), cp.float32)
    missing_keys, missing = cache.query(cp.concatenate([keys, cp.array([99], cp.uint32)]), out)
    assert host(missing).tolist() == [20] and host(missing_keys).tolist() == [99]
    np.testing.assert_array_equal(host(out[:20]), host(vals))
    assert cache.size() == 20


# --------------------------------------------------------------------------- row formats


def stored_bytes(cache: Any, tables: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(n, stride) uint8: the stored row of each (table, key) a one-table-format cache holds,
    read straight out of its value store (a GPU cache or a CPU twin; every pair is held)."""
    values, strides = host(cache._values), cache._strides
    rows = np.empty(len(keys), np.int64)  # each key's row (dynamic: its slot) within its table
    if cache.kind == "dynamic":
        if isinstance(cache, gpu.GpuDynamicCache):
            slot_keys, held = host(cache._slot_keys), (host(cache._slot_ver) & 2) != 0  # OCC
        else:
            slot_keys, held = cache._keys.reshape(-1), cache._used.reshape(-1) == 1
        for i, (t, k, s) in enumerate(zip(tables.tolist(), keys.tolist(), host(cache.sets_of(tables, keys)).tolist())):
            ways = np.flatnonzero(held[s * WAYS : (s + 1) * WAYS] & (slot_keys[s * WAYS : (s + 1) * WAYS] == k))
            assert ways.size == 1, (t, k)
            rows[i] = (s - int(cache.set_base[t])) * WAYS + int(ways[0])
    else:
        slot_keys, slot_rows = host(cache._slot_keys), host(cache._slot_rows)
        for i, (t, k) in enumerate(zip(tables.tolist(), keys.tolist())):
            region = slice(int(cache._slot_base[t]), int(cache._slot_base[t + 1]))
            found = np.flatnonzero((slot_rows[region] >= 0) & (slot_keys[region] == k))
            assert found.size == 1, (t, k)
            rows[i] = slot_rows[region][found[0]]
    starts = cache.value_base[tables] + rows * strides[tables]
    width = int(strides[tables].max())
    return np.stack([values[start : start + width] for start in starts.tolist()])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("fmt", list(RowFormat), ids=str)
@pytest.mark.parametrize("dim", [1, 3, 4, 16, 128, 1000, 1024])
def test_device_and_cpu_encodings_agree_bit_for_bit(cp: Any, kind: str, fmt: RowFormat, dim: int) -> None:
    """Rows that reach every branch of the encoder (rounding ties, subnormals, ±0, each
    format's limits; tests/hps_core/cache/test_row_formats_cuh.py) written to a GPU cache
    and to its CPU twin: the bytes each stores are row_formats.pack's, and a query returns
    unpack's floats, bit for bit. Device arrays, so the kernels see every row (a host batch
    would be checked on the host first)."""
    rows = edge_rows(fmt, dim, np.random.default_rng(dim))
    n = rows.shape[0]
    tables = np.zeros(n, np.int64)
    keys = np.arange(n, dtype=np.int64) * 7919 + 11
    offs = np.arange(n, dtype=np.int64) * dim
    flat = rows.reshape(-1)
    cpu_cls = CpuDynamicCache if kind == "dynamic" else CpuStaticCache
    g = make(kind, [8 * n], [dim], row_formats=[fmt])  # light load: nothing is evicted
    c = cpu_cls([8 * n], [dim], row_formats=[fmt])
    g.replace_tables(cp.asarray(tables), cp.asarray(keys), cp.asarray(flat), cp.asarray(offs))
    c.replace_tables(tables, keys, flat, offs)
    expected_bytes = pack(fmt, rows)
    width = fmt.row_bytes(dim)
    for cache in (g, c):
        got = stored_bytes(cache, tables, keys)[:, :width]
        bad = np.flatnonzero((got != expected_bytes).any(axis=1))
        assert bad.size == 0, f"{cache!r}: rows {bad[:5]} stored differently, e.g. {rows[bad[0]][:6]}"
    out_g, out_c = cp.full(n * dim, -7.0, cp.float32), np.full(n * dim, -7.0, np.float32)
    assert g.query_tables(cp.asarray(tables), cp.asarray(keys), out_g, cp.asarray(offs)).size == 0
    assert c.query_tables(tables, keys, out_c, offs).size == 0
    expected = unpack(fmt, expected_bytes, dim).reshape(-1)
    np.testing.assert_array_equal(bits(out_g), bits(expected))
    np.testing.assert_array_equal(bits(out_c), bits(expected))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("fmt", [FP16, FP8, INT8], ids=str)
def test_device_rows_a_format_cannot_store_are_never_written(cp: Any, kind: str, fmt: RowFormat) -> None:
    """Device arrays reach the kernels unchecked: the check pass (a replace of a static
    table: its counting pass) refuses a batch holding a row its format cannot store before
    anything is written, replace and update alike, the CPU twin's contract; a key already
    cached keeps its old row. The fp32 table of the same cache stores an infinity as given."""
    dims = [4, 4]
    formats = [fmt, FP32]
    ids = np.array([0, 0, 1, 0], np.int64)
    keys = np.array([1, 2, 3, 4], np.int64)
    offs = np.arange(4, dtype=np.int64) * 4
    vals = np.ones(16, np.float32)
    vals[offs[1] + 2] = np.nan  # key 2 of the compact table
    vals[offs[2]] = np.inf  # table 1 is fp32: stored as given
    dev = lambda *arrays: [cp.asarray(a) for a in arrays]  # noqa: E731

    cache = make(kind, [64, 64], dims, row_formats=formats)
    refused = f"position 1 \\(table 0\\).*{fmt}.*nothing of the batch was cached"
    with pytest.raises(RowValueError, match=refused) as info:
        cache.replace_tables(*dev(ids, keys, vals, offs))
    assert info.value.position == 1
    np.testing.assert_array_equal(cache.sizes(), [0, 0])
    assert pairs(*cache.dump_sets(0, cache.total_sets)) == []

    fixed = vals.copy()
    fixed[offs[1] + 2] = 5.0
    cache.replace_tables(*dev(ids, keys, fixed, offs))
    bad = vals * 2
    bad[offs[3] + 1] = np.nan  # a second unstorable row: the first one is named
    with pytest.raises(RowValueError, match=f"position 1 \\(table 0\\).*{fmt}") as info:
        cache.update_tables(*dev(ids, keys, bad, offs))
    assert info.value.position == 1
    with pytest.raises(RowValueError, match="position 1"):
        cache.replace_tables(*dev(ids, keys, bad, offs))  # over cached keys: the same
    np.testing.assert_array_equal(cache.sizes(), [3, 1])
    out = cp.full(16, -7.0, cp.float32)
    assert cache.query_tables(*dev(ids, keys), out, cp.asarray(offs)).size == 0
    got = host(out).reshape(4, 4)
    stored = lambda row: unpack(fmt, pack(fmt, row[None, :]), 4)[0]  # noqa: E731
    for i in (0, 1, 3):  # every row as it was before the refused writes
        np.testing.assert_array_equal(bits(got[i]), bits(stored(fixed[4 * i : 4 * i + 4])), err_msg=f"row {i}")
    np.testing.assert_array_equal(bits(got[2]), bits(fixed[8:12]))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_format_mix_costs_the_same_launches(cp: Any, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables of several formats are still one launch per call: the format is data, not a
    kernel. A cache with a compact table checks a write of device rows first (one more
    launch and sync; a static replace's counting pass checks them anyway); host rows are
    checked on the host, and a cache of fp32 tables skips the check
    (test_launches_and_syncs_per_call)."""
    formats = (INT8, FP8, FP16)
    cache = make(kind, [1024] * 3, DIMS, row_formats=formats)
    rng = np.random.default_rng(4)
    ids, keys = batch(rng, [300, 200, 100], 10_000)
    offs, total = row_offsets(ids, DIMS)
    args = [cp.asarray(a) for a in (ids, keys)]
    host_vals = rng.standard_normal(total).astype(np.float32)
    vals, out = cp.asarray(host_vals), cp.zeros(total, cp.float32)
    counts = count_launches_and_syncs(cache, monkeypatch)

    def cost(call: Any, *call_args: Any) -> tuple[int, int]:
        counts.update(launches=0, syncs=0)
        call(*call_args)
        return counts["launches"], counts["syncs"]

    assert cost(cache.replace_tables, *args, vals, cp.asarray(offs)) == ((2, 1) if kind == "dynamic" else (2, 2))
    assert cost(cache.query_tables, *args, out, cp.asarray(offs)) == (1, 1)
    assert cost(cache.update_tables, *args, vals, cp.asarray(offs)) == (2, 2)
    assert cost(cache.update_tables, ids, keys, host_vals, offs) == (1, 1)  # checked on the host
    if kind == "dynamic":
        assert cost(cache.replace_tables, ids, keys, host_vals, offs) == (1, 0)


@pytest.mark.gpu
def test_lfu_counts_saturate_on_the_device(cp: Any) -> None:
    """The device's 32-bit LFU counts stop at FREQ_MAX as the CPU twin's do: a hot key never
    wraps to a small count and becomes the victim."""
    cache = gpu.GpuDynamicCache([WAYS], [1], device=0, policy="lfu")  # one set
    keys = np.arange(WAYS, dtype=np.int64)
    ids = np.zeros(WAYS, np.int64)
    cache.replace_tables(ids, keys, keys.astype(np.float32), keys.copy())
    cp.cuda.Device(0).synchronize()
    slot = int(np.flatnonzero(host(cache._slot_keys) == 7)[0])
    cache._slot_freq[:] = 5
    out = cp.zeros(1, cp.float32)
    for start, end in ((FREQ_MAX - 1, FREQ_MAX), (2**32 - 2, 2**32 - 2)):  # 3 more would wrap to 1
        cache._slot_freq[slot] = start
        cp.cuda.Device(0).synchronize()
        for _ in range(3):
            assert cache.query_tables(ids[:1], np.array([7], np.int64), out, ids[:1]).size == 0
        cp.cuda.Device(0).synchronize()
        assert int(cache._slot_freq[slot]) == end
    cache.replace_tables(ids[:1], np.array([100], np.int64), np.zeros(1, np.float32), ids[:1])
    assert 7 in set(host(cache.dump_sets(0, 1)[1]).tolist())
