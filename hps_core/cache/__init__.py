"""Embedding caches: the fast tier in front of the volatile and persistent databases.

The caches of a model's tables live in one multi-table structure (:class:`MultiTableCache`,
``base.py``), answered by one call — one kernel launch on the GPU — whatever the table count::

    kind      device   multi-table class     one-table view              module
    dynamic   GPU      GpuDynamicCache       GpuEmbeddingCache           gpu.py + kernels/dynamic_cache.cu
    static    GPU      GpuStaticCache        StaticEmbeddingTable        gpu.py + kernels/static_table.cu
    dynamic   CPU      CpuDynamicCache       CpuEmbeddingCache           cpu.py (numba), the GPU cache's twin
    static    CPU      CpuStaticCache        CpuStaticEmbeddingTable     cpu.py (numba)

Each table stores its rows in its own row format (:mod:`hps_core.row_formats`: fp32,
fp16, fp8, int8), quantised on write and dequantised into the caller's float32 rows on
query. A one-table view (:class:`TableView`) presents one table behind the single-table
:class:`EmbeddingCache` contract. Build the multi-table structure with
:func:`make_multi_table_cache`, a one-table cache with :func:`make_cache`. The GPU classes
import CuPy only when constructed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hps_core.cache.base import (
    WAYS,
    EmbeddingCache,
    MultiTableCache,
    TableView,
    capacity_for_bytes,
)
from hps_core.cache.cpu import CpuDynamicCache, CpuEmbeddingCache, CpuStaticCache, CpuStaticEmbeddingTable
from hps_core.cache.shared_gpu import SharedName
from hps_core.config import CacheKind, CachePolicy
from hps_core.errors import ConfigError
from hps_core.row_formats import RowFormat

__all__ = [
    "WAYS",
    "CpuDynamicCache",
    "CpuEmbeddingCache",
    "CpuStaticCache",
    "CpuStaticEmbeddingTable",
    "EmbeddingCache",
    "GpuDynamicCache",
    "GpuEmbeddingCache",
    "GpuStaticCache",
    "MultiTableCache",
    "SharedName",
    "StaticEmbeddingTable",
    "TableView",
    "capacity_for_bytes",
    "make_cache",
    "make_multi_table_cache",
    "remove_unused_gpu_caches",
]

_GPU_CLASSES = ("GpuDynamicCache", "GpuStaticCache", "GpuEmbeddingCache", "StaticEmbeddingTable")


def __getattr__(name: str) -> Any:
    # The GPU classes live in gpu.py; importing it is cheap (CuPy loads on construction),
    # but keeping it lazy keeps `import hps_core.cache` free of the kernel loader.
    if name in _GPU_CLASSES:
        from hps_core.cache import gpu

        return getattr(gpu, name)
    raise AttributeError(f"module 'hps_core.cache' has no attribute {name!r}")


def make_multi_table_cache(
    kind: CacheKind | str,
    *,
    device: str | int,
    capacities: Sequence[int],
    dims: Sequence[int],
    policy: CachePolicy | str = CachePolicy.LRU,
    row_formats: Sequence[RowFormat] | None = None,
    key_dtype: Any = np.int64,
    shared: SharedName | None = None,
) -> MultiTableCache:
    """The caches of several tables in one structure: ``kind`` (:class:`~hps_core.config.CacheKind`
    or its name, HugeCTR's ``embedding_cache_type``) on ``device`` (``"cpu"`` or a CUDA ordinal), table t
    holding ``capacities[t]`` rows of ``dims[t]`` floats stored as ``row_formats[t]``.

    ``policy`` (:class:`~hps_core.config.CachePolicy` or its name) applies to dynamic caches; ``row_formats`` one
    :class:`~hps_core.row_formats.RowFormat` per table (None: all fp32; fp16 stores a row in
    half the bytes, int8 in about a quarter); ``key_dtype`` int64 or uint32 (HugeCTR
    ``supportlonglong: false``). ``shared`` (GPU caches only) names the GPU's shared cache
    to map (created by the first process that asks; :mod:`hps_core.cache.shared_gpu`), None
    for a private one. Raises ConfigError for anything else.
    """
    kind = CacheKind.parse(kind, "embedding cache type")
    kwargs: dict[str, Any] = dict(policy=policy, row_formats=row_formats, key_dtype=key_dtype)
    if device == "cpu":
        cpu_cls = CpuDynamicCache if kind is CacheKind.DYNAMIC else CpuStaticCache
        return cpu_cls(capacities, dims, **kwargs)
    if isinstance(device, bool) or not isinstance(device, (int, np.integer)):
        raise ConfigError(f"cache device must be 'cpu' or a CUDA ordinal, got {device!r}")
    from hps_core.cache.gpu import GpuDynamicCache, GpuStaticCache

    gpu_cls = GpuDynamicCache if kind is CacheKind.DYNAMIC else GpuStaticCache
    return gpu_cls(capacities, dims, device=int(device), shared=shared, **kwargs)


def make_cache(
    kind: CacheKind | str,
    *,
    device: str | int,
    capacity: int,
    dim: int,
    policy: CachePolicy | str = CachePolicy.LRU,
    row_format: RowFormat = RowFormat.FP32,
    key_dtype: Any = np.int64,
) -> EmbeddingCache:
    """A one-table cache (arguments as :func:`make_multi_table_cache`, for one table)."""
    multi = make_multi_table_cache(kind, device=device, capacities=[capacity], dims=[dim], policy=policy,
                                   row_formats=[row_format], key_dtype=key_dtype)
    return TableView(multi, 0)


def remove_unused_gpu_caches(retired: Callable[[str], bool], namespace: str | None = None) -> list[str]:
    """Remove the shared GPU caches on this host (of ``namespace``, else every one) of the models
    ``retired(model entry)`` names that no live process uses: a retired version's (``hps models
    unload``, ``publish-model``'s drop), which ``hps serve`` would otherwise keep until it stops.
    Their keepers see the file gone and free the GPU memory. Returns the paths removed."""
    from hps_core.cache.shared_gpu import list_caches
    from hps_core.db.shm_store import remove_if_unused

    return [info.path for info in list_caches(namespace) if retired(info.name) and remove_if_unused(Path(info.path))]

