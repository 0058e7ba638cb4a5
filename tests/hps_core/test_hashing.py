"""The one key hash: numba and NumPy agree with splitmix64's finaliser written out in Python,
and the partition formula is the same for the hash map (numba) and the Redis layout (NumPy)."""

from __future__ import annotations

import numpy as np
from numba import njit

from hps_core.db import _redis_layout
from hps_core.hashing import MIX_M1, MIX_M2, mix64, mix64_array, partition, partition_array

KEYS = np.array([0, 1, 2, 2**40, -5, np.iinfo(np.int64).min, np.iinfo(np.int64).max], np.int64)


def reference(key: int) -> int:
    mask = (1 << 64) - 1
    x = key & mask
    x = ((x ^ (x >> 30)) * MIX_M1) & mask
    x = ((x ^ (x >> 27)) * MIX_M2) & mask
    return x ^ (x >> 31)


@njit
def _numba_mix(keys):  # type: ignore[no-untyped-def]
    out = np.empty(keys.shape[0], np.uint64)
    parts = np.empty(keys.shape[0], np.int64)
    for i in range(keys.shape[0]):
        out[i] = mix64(keys[i])
        parts[i] = partition(out[i], 7)
    return out, parts


def test_numba_numpy_and_python_agree() -> None:
    expected = [reference(int(k)) for k in KEYS]
    mixed, parts = _numba_mix(KEYS)
    assert mixed.tolist() == expected
    assert mix64_array(KEYS).tolist() == expected
    assert parts.tolist() == [(h >> 32) % 7 for h in expected]
    assert partition_array(KEYS, 7).tolist() == parts.tolist()
    assert _redis_layout.partition_of(KEYS, 7).tolist() == parts.tolist()


def test_uint32_keys_mix_as_their_int64_values() -> None:
    small = np.array([0, 1, 2**32 - 1], np.uint32)
    assert mix64_array(small).tolist() == [reference(int(k)) for k in small]
