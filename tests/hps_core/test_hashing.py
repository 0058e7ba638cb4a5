"""The one key hash: numba, NumPy and the device copy (``hps_mix64`` in kernels/common.cuh)
agree with splitmix64's finaliser written out in Python, and the partition formula is the same
for the hash map (numba) and the Redis layout (NumPy)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from numba import njit

from hps_core.cache import _kernels
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


def _device_mixer() -> tuple[list[tuple[int, int]], int]:
    """(shift, multiplier) of each step of ``hps_mix64`` and its last shift, read from the header."""
    header = (_kernels.kernel_dir() / _kernels.HEADER).read_text()
    body = re.search(r"unsigned long long hps_mix64\(unsigned long long x\) \{(.*?)\n\}", header, re.S)
    assert body is not None, "hps_mix64 not found in common.cuh"
    steps = [(int(shift), int(mult, 16)) for shift, mult in
             re.findall(r"x = \(x \^ \(x >> (\d+)\)\) \* (0x[0-9A-Fa-f]+)ull;", body.group(1))]
    last = re.findall(r"return x \^ \(x >> (\d+)\);", body.group(1))
    assert len(last) == 1, body.group(1)
    return steps, int(last[0])


def test_device_mixer_is_the_same_formula() -> None:
    """CPU check of the .cu copy: its constants and shifts are the reference's (a GPU runs it below)."""
    steps, last = _device_mixer()
    assert steps == [(30, MIX_M1), (27, MIX_M2)] and last == 31
    mask = (1 << 64) - 1

    def header_formula(key: int) -> int:
        x = key & mask
        for shift, mult in steps:
            x = ((x ^ (x >> shift)) * mult) & mask
        return x ^ (x >> last)

    assert [header_formula(int(k)) for k in KEYS] == mix64_array(KEYS).tolist()


_DEVICE_MIX = r"""
template <typename K>
__global__ void hps_test_mix(const K* keys, unsigned long long* out, long long n) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = hps_mix64(hps_key_bits(keys[i]));
}
"""


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.int64, np.uint32])
def test_device_mixer_agrees_with_numba_and_numpy(dtype: Any) -> None:
    cp = pytest.importorskip("cupy", reason="the device mixer runs through CuPy")
    keys = KEYS if dtype == np.int64 else np.array([0, 1, 2, 2**31, 2**32 - 1], np.uint32)
    keys = np.concatenate([keys, np.random.default_rng(0).integers(0, 2**31, 1000).astype(dtype)])
    ctype = "long long" if dtype == np.int64 else "unsigned int"
    header = (_kernels.kernel_dir() / _kernels.HEADER).read_text()
    module = cp.RawModule(code=header + _DEVICE_MIX, options=_kernels.COMPILE_OPTIONS,
                          name_expressions=[f"hps_test_mix<{ctype}>"])
    kernel = module.get_function(f"hps_test_mix<{ctype}>")
    keys_d, out = cp.asarray(keys), cp.empty(keys.shape[0], np.uint64)
    kernel((-(-keys.shape[0] // 128),), (128,), (keys_d, out, np.int64(keys.shape[0])))
    expected = mix64_array(keys)
    assert cp.asnumpy(out).tolist() == expected.tolist()
    assert _numba_mix(keys.astype(np.int64))[0].tolist() == expected.tolist()
