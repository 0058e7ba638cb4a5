"""Host/device array helpers shared by the lookup path, and the process's allocator setting.

The lookup runs on numpy arrays (CPU path, CPU twin caches) or cupy arrays (GPU caches); it
asks a cache for its array module and moves only what must cross (the missing keys down,
their rows up) between host and device. The host array types of the batched calls (``Keys``,
``Vectors``, ``Flat``, ``Mask``, ``Int64s``) are named here, once, for the tiers, the updates
and the lookup.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from types import ModuleType
from typing import Any, ContextManager

import numpy as np
import numpy.typing as npt

__all__ = [
    "Flat",
    "Int64s",
    "Keys",
    "Mask",
    "Vectors",
    "array_module",
    "device_context",
    "is_device_array",
    "retain_freed_memory",
    "to_host",
]

# The host array types of the batched calls, named once for every package (shapes are in each
# signature's docstring).
Int64s = npt.NDArray[np.int64]  # table ids, offsets, counts, widths
Keys = Int64s  # (n,) int64 keys (uint32-range keys are widened to int64)
Vectors = npt.NDArray[np.float32]  # (n, dim) rows of one table
Flat = npt.NDArray[np.float32]  # (m,) rows of several widths, see hps_core.rows
Mask = npt.NDArray[np.bool_]  # (n,) per key: found, selected


def array_module(cache: Any) -> ModuleType:
    """The array module a cache works in: numpy for no cache or a CPU cache, cupy for a GPU one."""
    if cache is None or cache.device == "cpu":
        return np
    import cupy  # only reached with a GPU cache, which needed cupy to exist

    return cupy  # type: ignore[no-any-return]


def device_context(cache: Any) -> ContextManager[Any]:
    """Where a cache's arrays are made: its GPU (``cupy.cuda.Device``), or nothing to enter for
    no cache or a CPU cache. CuPy's current device is per thread, so every thread that works
    with a GPU cache (the request's, the background queue's, the refresher's, the update
    stream's) enters this first; otherwise its arrays land on GPU 0."""
    if cache is None or cache.device == "cpu":
        return contextlib.nullcontext()
    import cupy

    return cupy.cuda.Device(cache.device)  # type: ignore[no-any-return]


def to_host(array: Any) -> npt.NDArray[Any]:
    """``array`` as a host numpy array (a copy only when it lives on a GPU)."""
    if isinstance(array, np.ndarray):
        return array
    if is_device_array(array):
        return array.get()  # type: ignore[no-any-return]
    return np.asarray(array)


def is_device_array(array: Any) -> bool:
    """Whether ``array`` is a CuPy array. Never imports CuPy: an array of it can only exist
    where CuPy was imported already."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(array, cupy.ndarray)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1 << 30
_TRIM_THRESHOLD_BYTES = 1 << 30


def retain_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of returning it to the OS at once.

    A lookup allocates and frees arrays of a few MB per request. With glibc's defaults those
    are fresh ``mmap`` pages (or a trimmed heap top) every time, and on the virtual machines
    measured here each page fault costs ~1.5 us: allocating and filling three 850 KB arrays
    took 0.92 ms, against 0.03 ms once freed memory stays in the heap; a 26-table, 16,384-sample
    lookup at dim 128 (a 218 MB output) took 110 ms with a 64 MiB threshold and 72 ms with
    this one. This raises glibc's mmap and trim thresholds to 1 GiB (RSS then stays near its
    peak, as with jemalloc or tcmalloc). Process-wide, so it is the serving process's choice: the
    Triton backend calls it when a model loads, the benchmarks when they start. Returns
    False where the C library is not glibc (nothing changes).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    )
