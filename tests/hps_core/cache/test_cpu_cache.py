"""The CPU twin beyond the contract suite: threads, eviction policy, hit rates."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from hps_core.cache import WAYS, CpuEmbeddingCache, CpuStaticEmbeddingTable
from hps_core.cache.cpu import FREQ_MAX, sets_of
from tests.hps_core.cache.threads import run_writers_and_readers
from tests.hps_core.test_hashing import reference

DIM = 16


def encode(keys: np.ndarray, version: int) -> np.ndarray:
    """Vectors that name their key (column 0) and the writer's version (every other column):
    a torn vector has two versions, another key's vector the wrong column 0."""
    v = np.full((len(keys), DIM), float(version), np.float32)
    v[:, 0] = keys
    return v


def check_vectors(keys: np.ndarray, out: np.ndarray, hit: np.ndarray) -> int:
    rows, ks = out[hit], keys[hit]
    wrong_key = rows[:, 0] != ks
    torn = (rows[:, 1:] != rows[:, 1:2]).any(axis=1)
    return int(wrong_key.sum() + torn.sum())


@pytest.mark.parametrize("cls", [CpuEmbeddingCache, CpuStaticEmbeddingTable])
def test_threads_never_see_wrong_or_torn_vectors(cls: Any) -> None:
    universe = 4000
    # dynamic: a quarter of the keys fit, so writers evict constantly; static: all fit
    cache = CpuEmbeddingCache(1024, DIM, num_stripes=4) if cls is CpuEmbeddingCache else cls(universe, DIM)
    errors: list[int] = []
    stop = threading.Event()

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        version = 0
        while not stop.is_set():
            keys = rng.choice(universe, 512, replace=False).astype(np.int64)
            version += 1
            cache.replace(keys, encode(keys, seed * 1_000_000 + version))
            cache.update(keys[:64], encode(keys[:64], seed * 1_000_000 + version))

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        bad = hits = 0
        for _ in range(300):
            keys = rng.integers(0, universe, 2048).astype(np.int64)
            out = np.zeros((len(keys), DIM), np.float32)
            _, missing = cache.query(keys, out)
            hit = np.ones(len(keys), bool)
            hit[missing] = False
            hits += int(hit.sum())
            bad += check_vectors(keys, out, hit)
        errors.append(bad)
        assert hits > 0

    run_writers_and_readers(writer, reader, stop)
    assert errors == [0, 0]
    assert cache.size() <= cache.capacity


def test_lru_evicts_the_least_recently_used() -> None:
    cache = CpuEmbeddingCache(WAYS, 1, policy="lru")  # one set
    keys = np.arange(WAYS, dtype=np.int64)
    cache.replace(keys, keys[:, None].astype(np.float32))
    cache.query(keys[1:], np.zeros((WAYS - 1, 1), np.float32))  # key 0 is now the oldest
    cache.replace(np.array([100], np.int64), np.zeros((1, 1), np.float32))
    assert 0 not in set(cache.dump(0, 1).tolist()) and cache.size() == WAYS


def test_lfu_evicts_the_least_frequently_used_then_oldest() -> None:
    cache = CpuEmbeddingCache(WAYS, 1, policy="lfu")
    keys = np.arange(WAYS, dtype=np.int64)
    cache.replace(keys, keys[:, None].astype(np.float32))
    for _ in range(3):  # every key but 5 and 9 gets 3 more accesses; 5 is older than 9
        cache.query(keys[(keys != 5) & (keys != 9)], np.zeros((WAYS - 2, 1), np.float32))
    cache.query(np.array([9, 9], np.int64), np.zeros((2, 1), np.float32))
    cache.replace(np.array([100], np.int64), np.zeros((1, 1), np.float32))
    held = set(cache.dump(0, 1).tolist())
    assert 5 not in held and 9 in held


def power_law_trace(rng: np.random.Generator, rows: int, alpha: float, n: int) -> np.ndarray:
    """``n`` keys drawn with P(rank r) ~ 1/r**alpha, ranks shuffled onto random keys."""
    p = 1.0 / np.arange(1, rows + 1) ** alpha
    draws = np.searchsorted(np.cumsum(p / p.sum()), rng.random(n))
    return rng.permutation(rows).astype(np.int64)[np.minimum(draws, rows - 1)] * 7919


def hit_rate(policy: str, trace: np.ndarray, capacity: int, batch: int) -> float:
    """Serve the trace like LookupSession: query a batch, insert its misses, count hits."""
    cache = CpuEmbeddingCache(capacity, 4, policy=policy)
    hits = 0
    for start in range(0, len(trace), batch):
        keys = np.unique(trace[start : start + batch])
        out = np.empty((len(keys), 4), np.float32)
        missing, _ = cache.query(keys, out)
        hits += len(keys) - len(missing)
        cache.replace(missing, np.zeros((len(missing), 4), np.float32))
    return hits


def test_lfu_keeps_more_hits_than_lru_on_skewed_traffic() -> None:
    rng = np.random.default_rng(99)
    rows = 50_000
    trace = power_law_trace(rng, rows, 0.99, 400_000)
    lru = hit_rate("lru", trace, rows // 5, 1024)
    lfu = hit_rate("lfu", trace, rows // 5, 1024)
    assert lfu >= lru, (lfu, lru)
    assert lru > 0


def test_sets_match_the_gpu_formula() -> None:
    keys = np.array([0, 1, 2**40, -5], np.int64)
    # reference: splitmix64's finaliser written out, which tests/hps_core/test_hashing.py
    # checks against kernels/common.cuh (hps_mix64) and hps_core/hashing.py
    assert sets_of(keys, 1000).tolist() == [reference(int(k)) % 1000 for k in keys]


def test_lfu_counts_saturate_instead_of_wrapping() -> None:
    """32-bit LFU counts (4 bytes a slot, as on the GPU) stop at FREQ_MAX: a hot key never
    wraps to a count of 0 and becomes the victim."""
    cache = CpuEmbeddingCache(WAYS, 1, policy="lfu")
    keys = np.arange(WAYS, dtype=np.int64)
    cache.replace(keys, keys[:, None].astype(np.float32))
    freq = cache.multi._freq  # type: ignore[attr-defined]
    freq[0, :] = 5
    s, w = np.argwhere(cache.multi._keys == 7)[0]  # type: ignore[attr-defined]
    for start, end in ((FREQ_MAX - 1, FREQ_MAX), (2**32 - 2, 2**32 - 2)):  # 3 more would wrap to 1
        freq[s, w] = start
        for _ in range(3):
            cache.query(np.array([7], np.int64), np.zeros((1, 1), np.float32))
        assert freq.dtype == np.uint32 and freq[s, w] == end
    cache.replace(np.array([100], np.int64), np.zeros((1, 1), np.float32))
    assert 7 in set(cache.dump(0, 1).tolist())
