"""The one key hash of the project: splitmix64's finaliser, for numba kernels and for NumPy.

Every place that spreads keys — hash-map partitions and slots, cache sets, Redis partitions,
the de-duplication of a batch — mixes them with this function, so that a key lands in the
same partition and set whichever tier or process computes it; :func:`partition` is the one
partition formula. ``kernels/common.cuh`` (``hps_mix64``) is the device copy of the mixer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit

__all__ = ["MIX_M1", "MIX_M2", "mix64", "mix64_array", "partition", "partition_array"]

#: splitmix64 finaliser multipliers (Steele, Lea, Flood 2014), as Python ints.
MIX_M1 = 0xBF58476D1CE4E5B9
MIX_M2 = 0x94D049BB133111EB

# Typed uint64 so numba stays in unsigned 64-bit arithmetic (a Python int would promote).
_M1 = np.uint64(MIX_M1)
_M2 = np.uint64(MIX_M2)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S32 = np.uint64(32)


@njit(nogil=True, cache=True, inline="always")
def mix64(key: Any) -> Any:
    """splitmix64 finaliser of one key (any integer), as uint64: neighbouring keys spread."""
    x = np.uint64(key)
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def mix64_array(keys: npt.NDArray[Any]) -> npt.NDArray[np.uint64]:
    """:func:`mix64` of every key of an int64 or uint32 array (NumPy; uint64 arithmetic wraps)."""
    x = np.asarray(keys).astype(np.int64, copy=False).view(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> _S30)) * _M1
        x = (x ^ (x >> _S27)) * _M2
        return x ^ (x >> _S31)


@njit(nogil=True, cache=True, inline="always")
def partition(hashed: Any, num_partitions: Any) -> Any:
    """The partition (int64 in ``[0, num_partitions)``) of a key whose :func:`mix64` is
    ``hashed``: its high half, modulo the partitions. The hash map and the Redis layout place
    keys with it (the low half picks a hash map's slot, so the two stay independent)."""
    return np.int64((hashed >> _S32) % np.uint64(num_partitions))


def partition_array(keys: npt.NDArray[Any], num_partitions: int) -> npt.NDArray[np.int64]:
    """:func:`partition` of every key of an int64 array (NumPy)."""
    return ((mix64_array(keys) >> _S32) % np.uint64(num_partitions)).astype(np.int64)
