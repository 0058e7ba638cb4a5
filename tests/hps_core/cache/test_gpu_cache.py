"""GPU caches beyond the contract suite: kernel shape selection (runs anywhere), and on a
GPU with CuPy: agreement with the CPU twin, concurrent streams, misaligned buffers."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from hps_core.cache import CpuEmbeddingCache, make_cache
from hps_core.cache._kernels import MAX_GPU_DIM, vector_shape
from hps_core.errors import ConfigError

DIM = 16


@pytest.mark.parametrize(
    ("dim", "dtype", "pointers", "expected"),
    [
        (128, np.float32, (), (4, 1)),
        (256, np.float32, (), (4, 2)),
        (1024, np.float32, (), (4, 8)),
        (130, np.float32, (), (2, 4)),  # 65 half-groups of 2 per 32 lanes -> 3, rounded to 4
        (3, np.float16, (), (1, 1)),
        (64, np.float16, (), (4, 1)),
        (128, np.float32, (8,), (2, 2)),  # out only 8-byte aligned: no float4
        (1023, np.float32, (), (1, 32)),
    ],
)
def test_vector_shape(dim: int, dtype: Any, pointers: tuple[int, ...], expected: tuple[int, int]) -> None:
    vec, nv = vector_shape(dim, dtype, *pointers)
    assert (vec, nv) == expected
    assert vec * nv <= 32 and 32 * vec * nv >= dim


def test_vector_shape_refuses_wide_rows() -> None:
    with pytest.raises(ConfigError, match=str(MAX_GPU_DIM)):
        vector_shape(MAX_GPU_DIM + 1, np.float32)


# --------------------------------------------------------------------------- on a GPU


@pytest.fixture
def cp() -> Any:
    return pytest.importorskip("cupy", reason="GPU caches need CuPy")


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_gpu_and_cpu_twin_hold_keys_in_the_same_sets(cp: Any, policy: str) -> None:
    gpu = make_cache("dynamic", device=0, capacity=4096, dim=8, policy=policy)
    cpu = CpuEmbeddingCache(4096, 8, policy=policy)
    keys = np.random.default_rng(0).choice(2**40, 3000, replace=False).astype(np.int64)
    np.testing.assert_array_equal(gpu.set_of(cp.asarray(keys)).get(), cpu.set_of(keys))
    vals = np.random.default_rng(1).standard_normal((3000, 8)).astype(np.float32)
    gpu.replace(cp.asarray(keys), cp.asarray(vals))
    cpu.replace(keys, vals)
    for s in range(0, gpu.num_sets, 7):  # no set overflowed, so both hold the same keys
        np.testing.assert_array_equal(np.sort(gpu.dump(s, s + 1).get()), np.sort(cpu.dump(s, s + 1)))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_misaligned_out_falls_back_to_narrower_loads(cp: Any, kind: str) -> None:
    cache = make_cache(kind, device=0, capacity=256, dim=DIM)
    keys = cp.arange(10, dtype=cp.int64)
    vals = cp.arange(10 * DIM, dtype=cp.float32).reshape(10, DIM)
    cache.replace(keys, vals)
    flat = cp.zeros(10 * DIM + 1, cp.float32)
    out = flat[1:].reshape(10, DIM)  # 4-byte aligned only
    missing, _ = cache.query(keys, out)
    assert missing.size == 0
    cp.testing.assert_array_equal(out, vals)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("value_dtype", [np.float32, np.float16])
def test_streams_and_threads_never_see_wrong_or_torn_vectors(cp: Any, kind: str, value_dtype: Any) -> None:
    """Writers rewrite keys with vectors naming (key, version) while readers on other
    streams query them: every hit must carry its own key and one version throughout."""
    universe = 20_000
    cache = make_cache(kind, device=0, capacity=4096 if kind == "dynamic" else universe, dim=DIM,
                       value_dtype=value_dtype)
    stop = threading.Event()
    bad: list[int] = []

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        stream = cp.cuda.Stream(non_blocking=True)
        version = 0
        while not stop.is_set():
            keys = rng.choice(universe, 8192, replace=False).astype(np.int64)
            version = (version + 1) % 1000  # exact in float16
            v = np.full((len(keys), DIM), float(version), np.float32)
            v[:, 0] = keys % 2048  # exact in float16
            cache.replace(cp.asarray(keys), cp.asarray(v), stream=stream)
            stream.synchronize()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        stream = cp.cuda.Stream(non_blocking=True)
        wrong = 0
        for _ in range(200):
            keys = rng.integers(0, universe, 65536).astype(np.int64)
            with stream:
                out = cp.zeros((len(keys), DIM), cp.float32)
            _, missing = cache.query(cp.asarray(keys), out, stream=stream)
            host, hit = out.get(stream=stream), np.ones(len(keys), bool)
            stream.synchronize()
            hit[missing.get()] = False
            rows = host[hit]
            wrong += int((rows[:, 0] != keys[hit] % 2048).sum() + (rows[:, 1:] != rows[:, 1:2]).any(axis=1).sum())
        bad.append(wrong)

    writers = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    readers = [threading.Thread(target=reader, args=(s,)) for s in (3, 4)]
    for t in writers + readers:
        t.start()
    for t in readers:
        t.join()
    stop.set()
    for t in writers:
        t.join()
    assert bad == [0, 0]
