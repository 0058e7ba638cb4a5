"""Embedding caches: the fast tier in front of the volatile and persistent databases.

One contract (:class:`EmbeddingCache`, in ``base.py``) and four implementations::

    kind      device   class                      module
    dynamic   GPU      GpuEmbeddingCache          gpu.py + kernels/dynamic_cache.cu
    static    GPU      StaticEmbeddingTable       gpu.py + kernels/static_table.cu
    dynamic   CPU      CpuEmbeddingCache          cpu.py (numba), the GPU cache's twin
    static    CPU      CpuStaticEmbeddingTable    cpu.py (numba)

Build one with :func:`make_cache`. The GPU classes import CuPy only when constructed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hps_core.cache.base import (
    WAYS,
    CacheFullError,
    EmbeddingCache,
    capacity_for_bytes,
)
from hps_core.cache.cpu import CpuEmbeddingCache, CpuStaticEmbeddingTable
from hps_core.errors import ConfigError

__all__ = [
    "WAYS",
    "CacheFullError",
    "CpuEmbeddingCache",
    "CpuStaticEmbeddingTable",
    "EmbeddingCache",
    "GpuEmbeddingCache",
    "StaticEmbeddingTable",
    "capacity_for_bytes",
    "make_cache",
]


def __getattr__(name: str) -> Any:
    # The GPU classes live in gpu.py; importing it is cheap (CuPy loads on construction),
    # but keeping it lazy keeps `import hps_core.cache` free of the kernel loader.
    if name in ("GpuEmbeddingCache", "StaticEmbeddingTable"):
        from hps_core.cache import gpu

        return getattr(gpu, name)
    raise AttributeError(f"module 'hps_core.cache' has no attribute {name!r}")


def make_cache(
    kind: str,
    *,
    device: str | int,
    capacity: int,
    dim: int,
    policy: str = "lru",
    value_dtype: Any = np.float32,
    key_dtype: Any = np.int64,
) -> EmbeddingCache:
    """A cache of ``kind`` (``"dynamic"`` | ``"static"``, HugeCTR's ``embedding_cache_type``)
    on ``device`` (``"cpu"`` or a CUDA ordinal) holding ``capacity`` rows of ``dim`` floats.

    ``policy`` (``"lru"`` | ``"lfu"``) applies to dynamic caches; ``value_dtype`` float32 or
    float16 (half the bytes per row); ``key_dtype`` int64 or uint32 (HugeCTR
    ``supportlonglong: false``). Raises ConfigError for anything else.
    """
    if kind not in ("dynamic", "static"):
        raise ConfigError(f"embedding cache type must be 'dynamic' or 'static', got {kind!r}")
    kwargs: dict[str, Any] = dict(policy=policy, value_dtype=value_dtype, key_dtype=key_dtype)
    if device == "cpu":
        cpu_cls = CpuEmbeddingCache if kind == "dynamic" else CpuStaticEmbeddingTable
        return cpu_cls(capacity, dim, **kwargs)
    if isinstance(device, bool) or not isinstance(device, (int, np.integer)):
        raise ConfigError(f"cache device must be 'cpu' or a CUDA ordinal, got {device!r}")
    from hps_core.cache.gpu import GpuEmbeddingCache, StaticEmbeddingTable

    gpu_cls = GpuEmbeddingCache if kind == "dynamic" else StaticEmbeddingTable
    return gpu_cls(capacity, dim, device=int(device), **kwargs)
