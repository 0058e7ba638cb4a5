"""The embedding-cache contract shared by the GPU caches and their CPU twins.

An embedding cache maps ``key -> vector`` for one table, with a fixed capacity in rows.
Two kinds exist, as in HugeCTR (``embedding_cache_type``):

* **dynamic** — set-associative (``num_sets`` sets of :data:`WAYS` slots; a key lives in
  the set ``mix64(key) % num_sets``); inserting into a full set evicts one slot per the
  policy (``lru``: oldest access; ``lfu``: fewest accesses, ties by age).
* **static** — the whole table resident: open addressing key -> row, no eviction; an
  insert that would exceed the capacity raises :class:`CacheFullError` before writing.

Array conventions (every implementation, every call)::

    keys     (n,)        int64 or uint32, host (NumPy) for CPU caches, device (CuPy) for GPU
                         ones (host arrays are accepted and copied over); a uint32 cache
                         refuses keys outside [0, 2**32) with RequestError
    values   (n, dim)    float32, same array module; stored as value_dtype
    out      (n, dim)    float32, C-contiguous, writeable; query writes hit rows only

GPU calls take an optional ``stream`` (a ``cupy.cuda.Stream``) last; CPU twins accept and
ignore it so call sites do not branch.

Duplicate keys in one ``replace``/``update`` batch: exactly one of the duplicates' vectors
is stored. CPU twins keep the last one; GPU kernels (one warp per key, racing for the set
lock) keep an unspecified one. Callers that care de-duplicate first (LookupSession does).

Concurrency: ``query``, ``replace``, ``update``, ``dump``, ``size`` may run at the same time
from several threads (and, on the GPU, streams). A query returns, for each key, either a
miss or a complete vector that was stored under that key at some moment during the call:
never a mix of two writes, never another key's vector. ``clear`` is safe beside queries on
the dynamic caches; on static tables it must not overlap other calls (see docs/cache.md).

Errors (all from :mod:`hps_core.errors`, plus the one defined here)::

    HPSError
     ├── ConfigError     bad constructor argument (dim, capacity, policy, dtype, device)
     ├── RequestError    bad call argument (dtype, shape, key out of uint32 range)
     └── CacheFullError  a static table has no room for the new keys of a replace
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from hps_core.errors import ConfigError, HPSError, RequestError

__all__ = [
    "CacheFullError",
    "EmbeddingCache",
    "KEY_DTYPES",
    "POLICIES",
    "VALUE_DTYPES",
    "WAYS",
    "capacity_for_bytes",
    "check_batch",
    "check_cache_args",
    "normalize_keys",
]

#: Slots per set of a dynamic cache: one warp's lanes probe one set in one step.
WAYS = 32
POLICIES = ("lru", "lfu")
VALUE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
KEY_DTYPES = (np.dtype(np.int64), np.dtype(np.uint32))

Array = Any  # numpy.ndarray on CPU caches, cupy.ndarray on GPU caches


class CacheFullError(HPSError):
    """A static table cannot take the new keys of a replace: nothing was written."""


@runtime_checkable
class EmbeddingCache(Protocol):
    """Batched, fixed-capacity ``key -> vector`` cache of one table.

    Attributes: ``dim`` (vector width), ``capacity`` (rows it can hold; dynamic caches
    round the request up to whole sets), ``value_dtype`` (storage: float32, or float16 to
    hold twice the rows in the same bytes; outputs are float32 either way), ``key_dtype``
    (int64 or uint32), ``num_sets`` (dynamic; 1 for static tables), ``kind``
    (``"dynamic"``/``"static"``) and ``device`` (``"cpu"`` or a CUDA ordinal).
    """

    dim: int
    capacity: int
    value_dtype: np.dtype
    key_dtype: np.dtype
    num_sets: int
    kind: str

    @property
    def device(self) -> str | int:  # read-only here, so a twin may narrow it to "cpu"
        ...

    def query(self, keys: Array, out: Array, stream: Any = None) -> tuple[Array, Array]:
        """Write the vector of every cached key into its row of ``out``.

        keys: (n,) key dtype. out: (n, dim) float32, C-contiguous; rows of missing keys are
        left untouched. Returns ``(missing_keys (m,) key dtype, missing_positions (m,)
        int64)``, same array module as the cache. Order of misses: ascending positions on
        CPU, unspecified on GPU. A hit counts as an access for the eviction policy.
        """
        ...

    def replace(self, keys: Array, values: Array, stream: Any = None) -> None:
        """Insert or overwrite ``values[i]`` under ``keys[i]`` (HugeCTR gpu_cache Replace).

        keys: (n,). values: (n, dim) float32. A dynamic cache evicts per policy when a set
        is full; a static table raises CacheFullError (writing nothing) if the new keys do
        not fit.
        """
        ...

    def update(self, keys: Array, values: Array, stream: Any = None) -> int:
        """Overwrite the keys already cached; never inserts. Returns the number of batch
        positions whose key was cached (a duplicated key counts once per occurrence)."""
        ...

    def dump(self, start_set: int, end_set: int, stream: Any = None) -> Array:
        """Keys held in sets ``[start_set, end_set)`` (dynamic); static: all keys.

        Returns (k,) key dtype, same array module; order unspecified."""
        ...

    def set_of(self, keys: Array) -> Array:
        """(n,) int64: the set each key maps to (all zeros for a static table)."""
        ...

    def clear(self, stream: Any = None) -> None:
        """Remove every key."""
        ...

    def size(self, stream: Any = None) -> int:
        """Number of keys cached now."""
        ...


# --------------------------------------------------------------------------- helpers


def capacity_for_bytes(nbytes: int, dim: int, value_dtype: Any = np.float32) -> int:
    """Rows of ``dim``-wide vectors that fit in ``nbytes`` of value storage: float16
    storage gives twice the rows of float32 for the same budget."""
    itemsize = np.dtype(value_dtype).itemsize
    return max(0, int(nbytes) // (int(dim) * itemsize))


def check_cache_args(
    kind: str, capacity: object, dim: object, policy: str, value_dtype: Any, key_dtype: Any
) -> tuple[int, int, np.dtype[Any], np.dtype[Any]]:
    """Validate constructor arguments common to every cache; returns normalised
    ``(capacity, dim, value_dtype, key_dtype)`` or raises ConfigError naming the argument."""
    if kind not in ("dynamic", "static"):
        raise ConfigError(f"cache kind must be 'dynamic' or 'static', got {kind!r}")
    if policy not in POLICIES:
        raise ConfigError(f"cache policy must be one of {POLICIES}, got {policy!r}")
    try:
        vdt, kdt = np.dtype(value_dtype), np.dtype(key_dtype)
    except TypeError as exc:
        raise ConfigError(f"cache dtypes not understood: {value_dtype!r}, {key_dtype!r}") from exc
    if vdt not in VALUE_DTYPES:
        raise ConfigError(f"cache value_dtype must be float32 or float16, got {vdt}")
    if kdt not in KEY_DTYPES:
        raise ConfigError(f"cache key_dtype must be int64 or uint32, got {kdt}")
    return _positive_int("capacity", capacity), _positive_int("dim", dim), vdt, kdt


def _positive_int(name: str, val: object) -> int:
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
        raise ConfigError(f"cache {name} must be a positive integer, got {val!r}")
    return int(val)


def check_batch(xp: Any, keys: Any, values: Any, dim: int, name: str = "values") -> None:
    """Shape and dtype checks of a (keys, values-or-out) pair; ``xp`` is numpy or cupy."""
    if keys.ndim != 1:
        raise RequestError(f"keys must be 1-D, got shape {keys.shape}")
    if values.dtype != np.float32:
        raise RequestError(f"{name} must be float32, got {values.dtype}")
    if values.ndim != 2 or values.shape != (keys.shape[0], dim):
        raise RequestError(f"{name} must have shape ({keys.shape[0]}, {dim}), got {values.shape}")
    if name == "out" and not values.flags.c_contiguous:
        raise RequestError("out must be C-contiguous: hits are written into it in place")


def normalize_keys(xp: Any, keys: Any, key_dtype: np.dtype) -> Any:
    """Keys as a contiguous array of the cache's key dtype.

    An int64 cache widens uint32 keys. A uint32 cache takes int64 (or any integer) keys
    only when all lie in [0, 2**32): a silent wrap would alias two keys onto one vector.
    """
    if keys.dtype.kind not in "iu":
        raise RequestError(f"keys must be an integer array (int64 or uint32), got {keys.dtype}")
    if keys.dtype == key_dtype:
        return xp.ascontiguousarray(keys)
    if key_dtype == np.uint32 and keys.size:
        lo, hi = int(keys.min()), int(keys.max())
        if lo < 0 or hi > 0xFFFFFFFF:
            bad = lo if lo < 0 else hi
            raise RequestError(
                f"key {bad} is outside the uint32 range of this cache (key_dtype uint32, "
                "HugeCTR supportlonglong: false); use an int64 cache for such keys"
            )
    if key_dtype == np.int64 and keys.dtype == np.uint64 and keys.size and int(keys.max()) >= 2**63:
        raise RequestError("uint64 keys at or above 2**63 do not fit an int64 cache")
    return xp.ascontiguousarray(keys.astype(key_dtype))
