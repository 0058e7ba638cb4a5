"""GPU embedding caches: CuPy RawKernels from ``kernels/*.cu`` behind the EmbeddingCache contract.

* :class:`GpuEmbeddingCache` — dynamic, set-associative (32 ways = one warp), LRU or LFU,
  kernels in ``kernels/dynamic_cache.cu``.
* :class:`StaticEmbeddingTable` — whole table resident, open addressing, no eviction,
  kernels in ``kernels/static_table.cu``.

Arrays are CuPy arrays on the cache's device (host NumPy keys/values are copied over;
``out`` must be a device array because hits are written into it in place). Every call
takes ``stream`` (a ``cupy.cuda.Stream``) last and runs on it, or on the current stream.

Synchronisation with the host: ``query`` reads the number of misses (4 bytes) to size its
results, ``update``/``dump`` read a count; ``replace`` on the dynamic cache is fully
asynchronous. The static table's ``replace`` counts new keys first (it must refuse a batch
that does not fit before writing) and waits for its kernel, so a ``clear`` on another
stream cannot overlap it.

The concurrency scheme (set locks for writers, a seqlock per slot/row for lock-free
readers) is described in the .cu files and docs/cache.md. GPU verification of this module
is pending: it is compiled to PTX in CI but has not run on a GPU yet.

CuPy is imported when a GPU cache is constructed, never at import time.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Any

import numpy as np

from hps_core.cache import _kernels
from hps_core.cache.base import (
    WAYS,
    CacheFullError,
    check_batch,
    check_cache_args,
    normalize_keys,
)
from hps_core.errors import ConfigError, RequestError

__all__ = ["GpuEmbeddingCache", "StaticEmbeddingTable"]

_BLOCK = 256  # 8 warps per block
_WARPS_PER_BLOCK = _BLOCK // 32
_BLOCKS_PER_SM = 16  # enough resident warps to hide DRAM latency; the loops are grid-stride
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ConfigError("GPU embedding caches need CuPy (pip install cupy-cuda12x or cupy-cuda13x)") from exc
    return cupy


def _read_count(arr: Any, stream: Any) -> int:
    """arr[0] on the host, after every earlier work on ``stream`` (a 4-byte copy)."""
    host = arr.get(stream=stream)
    stream.synchronize()
    return int(host[0])


class _GpuCacheBase:
    """Device placement, argument conversion and launch helpers shared by both GPU caches."""

    kind = ""
    _family = ""

    def __init__(self, device: int, value_dtype: np.dtype, key_dtype: np.dtype, dim: int) -> None:
        cp = _cupy()
        if isinstance(device, bool) or not isinstance(device, (int, np.integer)) or device < 0:
            raise ConfigError(f"GPU cache device must be a CUDA ordinal (int >= 0), got {device!r}")
        self._cp = cp
        self.device = int(device)
        self.dim, self.value_dtype, self.key_dtype = dim, value_dtype, key_dtype
        _kernels.vector_shape(dim, value_dtype)  # refuses dims the kernels cannot stage
        with cp.cuda.Device(self.device):
            sms = cp.cuda.Device(self.device).attributes["MultiProcessorCount"]
        self._max_blocks = int(sms) * _BLOCKS_PER_SM
        self._storage = np.uint16 if value_dtype == np.float16 else np.float32
        self._clock = itertools.count(1)

    # -- conversion

    @contextlib.contextmanager
    def _on(self, stream: Any) -> Any:
        """Run on this cache's device and on ``stream`` (or the current stream)."""
        with self._cp.cuda.Device(self.device):
            with stream if stream is not None else contextlib.nullcontext():
                yield self._cp.cuda.get_current_stream()

    def _keys(self, keys: Any) -> Any:
        cp = self._cp
        if not isinstance(keys, (np.ndarray, cp.ndarray)):
            raise RequestError(f"keys must be a numpy or cupy array, got {type(keys).__name__}")
        return normalize_keys(cp, cp.asarray(keys), self.key_dtype)

    def _rows(self, keys: Any, values: Any) -> Any:
        cp = self._cp
        if not isinstance(values, (np.ndarray, cp.ndarray)):
            raise RequestError(f"values must be a numpy or cupy array, got {type(values).__name__}")
        values = cp.ascontiguousarray(cp.asarray(values))
        check_batch(cp, keys, values, self.dim)
        return values

    def _out(self, keys: Any, out: Any) -> Any:
        if not isinstance(out, self._cp.ndarray):
            raise RequestError("out must be a cupy array on the cache's device (hits are written in place)")
        check_batch(self._cp, keys, out, self.dim, "out")
        return out

    def _module(self, *arrays: Any) -> tuple[Any, list[str]]:
        """Module and kernel names for rows aligned like ``arrays`` (float32, device)."""
        vec, nv = _kernels.vector_shape(self.dim, self.value_dtype, *(a.data.ptr for a in arrays))
        module = _kernels.get_module(self._family, self.key_dtype, self.value_dtype, vec, nv, self.device)
        return module, _kernels.name_expressions(self._family, self.key_dtype, self.value_dtype, vec, nv)

    def _launch(self, kernel: Any, warps: int, args: tuple[Any, ...], stream: Any) -> None:
        if warps <= 0:
            return
        blocks = min(-(-warps // _WARPS_PER_BLOCK), self._max_blocks)
        kernel((blocks,), (_BLOCK,), args, stream=stream)

    def _tick(self) -> np.uint32:
        return np.uint32(next(self._clock) & 0xFFFFFFFF)  # wraps after 2**32 calls: LRU only

    def _query(self, keys: Any, out: Any, tail: tuple[Any, ...], stream: Any) -> tuple[Any, Any]:
        cp = self._cp
        with self._on(stream) as s:
            keys = self._keys(keys)
            out = self._out(keys, out)
            n = keys.shape[0]
            miss_keys = cp.empty(n, self.key_dtype)
            miss_pos = cp.empty(n, cp.int64)
            count = cp.zeros(1, cp.uint32)
            module, names = self._module(out)
            args = (keys, np.int64(n), out, np.int32(self.dim), miss_keys, miss_pos, count, *tail)
            self._launch(module.get_function(names[0]), n, args, s)
            m = _read_count(count, s)
            return miss_keys[:m], miss_pos[:m]

    def set_of(self, keys: Any) -> Any:
        raise NotImplementedError


# --------------------------------------------------------------------------- dynamic


class GpuEmbeddingCache(_GpuCacheBase):
    """Set-associative GPU cache (HugeCTR gpu_cache's operations), LRU or LFU eviction.

    ``capacity`` rows are rounded up to whole sets of :data:`WAYS` slots.
    """

    kind = "dynamic"
    _family = "dynamic"

    def __init__(
        self,
        capacity: int,
        dim: int,
        *,
        device: int = 0,
        policy: str = "lru",
        value_dtype: Any = np.float32,
        key_dtype: Any = np.int64,
    ) -> None:
        capacity, dim, vdt, kdt = check_cache_args("dynamic", capacity, dim, policy, value_dtype, key_dtype)
        super().__init__(device, vdt, kdt, dim)
        self.policy = policy
        self.num_sets = -(-capacity // WAYS)
        self.capacity = self.num_sets * WAYS
        cp = self._cp
        with cp.cuda.Device(self.device):
            self._slot_keys = cp.zeros(self.capacity, kdt)
            self._slot_ver = cp.zeros(self.capacity, cp.uint32)
            self._slot_ts = cp.zeros(self.capacity, cp.uint32)
            self._slot_freq = cp.zeros(self.capacity, cp.uint32)
            self._set_locks = cp.zeros(self.num_sets, cp.int32)
            self._values = cp.zeros((self.capacity, dim), self._storage)

    def __repr__(self) -> str:
        return (
            f"GpuEmbeddingCache(capacity={self.capacity}, dim={self.dim}, policy={self.policy!r}, "
            f"value_dtype={self.value_dtype}, key_dtype={self.key_dtype}, device={self.device})"
        )

    def set_of(self, keys: Any) -> Any:
        cp = self._cp
        with cp.cuda.Device(self.device):
            x = self._keys(keys).astype(cp.uint64)
            x = (x ^ (x >> cp.uint64(30))) * cp.uint64(_M1)
            x = (x ^ (x >> cp.uint64(27))) * cp.uint64(_M2)
            x = x ^ (x >> cp.uint64(31))
            return (x % cp.uint64(self.num_sets)).astype(cp.int64)

    def query(self, keys: Any, out: Any, stream: Any = None) -> tuple[Any, Any]:
        tail = (self._slot_keys, self._slot_ver, self._slot_ts, self._slot_freq, self._values,
                np.uint64(self.num_sets), self._tick())
        return self._query(keys, out, tail, stream)

    def replace(self, keys: Any, values: Any, stream: Any = None) -> None:
        self._write(keys, values, insert=True, stream=stream)

    def update(self, keys: Any, values: Any, stream: Any = None) -> int:
        with self._on(stream) as s:
            return _read_count(self._write(keys, values, insert=False, stream=s), s)

    def dump(self, start_set: int, end_set: int, stream: Any = None) -> Any:
        cp = self._cp
        lo, hi = max(0, int(start_set)), min(self.num_sets, int(end_set))
        with self._on(stream) as s:
            if lo >= hi:
                return cp.empty(0, self.key_dtype)
            out = cp.empty((hi - lo) * WAYS, self.key_dtype)
            count = cp.zeros(1, cp.uint32)
            module, names = self._module()
            kernel = module.get_function(names[2])  # dc_dump<K>
            args = (self._slot_keys, self._slot_ver, self._set_locks, np.int64(lo), np.int64(hi), out, count)
            self._launch(kernel, hi - lo, args, s)
            return out[: _read_count(count, s)]

    def clear(self, stream: Any = None) -> None:
        with self._on(stream) as s:
            module, names = self._module()
            kernel = module.get_function(names[3])  # dc_clear
            args = (self._slot_ver, self._slot_ts, self._slot_freq, self._set_locks, np.int64(self.num_sets))
            self._launch(kernel, self.num_sets, args, s)

    def size(self, stream: Any = None) -> int:
        cp = self._cp
        with self._on(stream):
            return int(cp.count_nonzero(self._slot_ver & cp.uint32(2)))

    def _write(self, keys: Any, values: Any, *, insert: bool, stream: Any) -> Any:
        cp = self._cp
        with self._on(stream) as s:
            keys = self._keys(keys)
            values = self._rows(keys, values)
            found = cp.zeros(1, cp.uint32)
            module, names = self._module(values)
            args = (keys, np.int64(keys.shape[0]), values, np.int32(self.dim), self._slot_keys,
                    self._slot_ver, self._slot_ts, self._slot_freq, self._set_locks, self._values,
                    np.uint64(self.num_sets), self._tick(), np.int32(self.policy == "lfu"),
                    np.int32(insert), found)
            self._launch(module.get_function(names[1]), keys.shape[0], args, s)
            return found


# --------------------------------------------------------------------------- static


class StaticEmbeddingTable(_GpuCacheBase):
    """Whole table resident on the GPU: open addressing key -> row, no eviction.

    ``replace`` inserts new keys while room remains and raises CacheFullError (writing
    nothing) for a batch whose new keys do not fit. Writes (replace, update, clear) are
    serialised by a host lock and wait for their kernel; queries never wait.
    """

    kind = "static"
    _family = "static"
    num_sets = 1

    def __init__(
        self,
        capacity: int,
        dim: int,
        *,
        device: int = 0,
        policy: str = "lru",  # accepted for a uniform factory; nothing is ever evicted
        value_dtype: Any = np.float32,
        key_dtype: Any = np.int64,
    ) -> None:
        capacity, dim, vdt, kdt = check_cache_args("static", capacity, dim, policy, value_dtype, key_dtype)
        if capacity >= 2**31:
            raise ConfigError(f"static GPU tables index rows with int32: capacity {capacity} is too large")
        super().__init__(device, vdt, kdt, dim)
        self.capacity, self.policy = capacity, policy
        nslots = 1 << max(6, (2 * capacity - 1).bit_length())  # load factor <= 1/2
        self._mask = np.uint64(nslots - 1)
        self._lock = threading.Lock()
        self._n_rows = 0
        cp = self._cp
        with cp.cuda.Device(self.device):
            self._slot_keys = cp.zeros(nslots, kdt)
            self._slot_rows = cp.full(nslots, -1, cp.int32)
            self._row_keys = cp.zeros(capacity, kdt)
            self._row_ver = cp.zeros(capacity, cp.uint32)
            self._values = cp.zeros((capacity, dim), self._storage)
            self._dev_rows = cp.zeros(1, cp.uint32)

    def __repr__(self) -> str:
        return (
            f"StaticEmbeddingTable(capacity={self.capacity}, dim={self.dim}, "
            f"value_dtype={self.value_dtype}, key_dtype={self.key_dtype}, device={self.device})"
        )

    def set_of(self, keys: Any) -> Any:
        with self._cp.cuda.Device(self.device):
            return self._cp.zeros(self._keys(keys).shape[0], self._cp.int64)

    def query(self, keys: Any, out: Any, stream: Any = None) -> tuple[Any, Any]:
        tail = (self._slot_keys, self._slot_rows, self._row_keys, self._row_ver, self._values, self._mask)
        return self._query(keys, out, tail, stream)

    def replace(self, keys: Any, values: Any, stream: Any = None) -> None:
        self._write(keys, values, insert=True, stream=stream)

    def update(self, keys: Any, values: Any, stream: Any = None) -> int:
        return self._write(keys, values, insert=False, stream=stream)

    def dump(self, start_set: int = 0, end_set: int = 1, stream: Any = None) -> Any:
        with self._on(stream):
            return self._slot_keys[self._slot_rows >= 0]

    def clear(self, stream: Any = None) -> None:
        cp = self._cp
        with self._lock, self._on(stream) as s:
            self._slot_rows.fill(-1)
            self._row_ver += cp.uint32(2)  # readers copying across the clear reject their copy
            self._dev_rows.fill(0)
            s.synchronize()
            self._n_rows = 0

    def size(self, stream: Any = None) -> int:
        return self._n_rows

    def _find(self, keys: Any, stream: Any) -> Any:
        cp = self._cp
        rows = cp.empty(keys.shape[0], cp.int32)
        module, names = self._module()
        kernel = module.get_function(names[2])  # st_find<K>
        args = (keys, np.int64(keys.shape[0]), self._slot_keys, self._slot_rows, self._mask, rows)
        self._launch(kernel, keys.shape[0], args, stream)
        return rows

    def _write(self, keys: Any, values: Any, *, insert: bool, stream: Any) -> int:
        cp = self._cp
        with self._lock, self._on(stream) as s:
            keys = self._keys(keys)
            values = self._rows(keys, values)
            new = 0
            if insert:
                new = int(cp.unique(keys[self._find(keys, s) < 0]).shape[0])  # syncs
                if self._n_rows + new > self.capacity:
                    raise CacheFullError(
                        f"static embedding table is full: it holds {self._n_rows} of {self.capacity} "
                        f"rows and the batch brings {new} new keys; size the table for the whole "
                        "model (static tables never evict) or use a dynamic cache"
                    )
            found = cp.zeros(1, cp.uint32)
            module, names = self._module(values)
            args = (keys, np.int64(keys.shape[0]), values, np.int32(self.dim), self._slot_keys,
                    self._slot_rows, self._row_keys, self._row_ver, self._values, self._mask,
                    self._dev_rows, np.int32(insert), found)
            self._launch(module.get_function(names[1]), keys.shape[0], args, s)
            result = _read_count(found, s)  # also waits for the kernel
            self._n_rows += new
            return result
