"""Loads the cache kernels: ``.cu`` sources shipped in ``kernels/``, compiled by CuPy.

One helper, :func:`get_module`, resolves the C++ template arguments from NumPy dtypes and
the vector shape, compiles ``cupy.RawModule(code=..., options=..., name_expressions=[...])``
once per (device, file, key type, value type, VEC, NV) and memoizes it. The same
:func:`name_expressions` feed the CI test that compiles every source with nvcc to PTX, so
what CI compiles is exactly what the loader asks NVRTC for.

Template arguments:
  K    ``long long`` (int64 keys) or ``unsigned int`` (uint32)
  V    ``float`` or ``hps_half`` (float16 bits, see kernels/common.cuh)
  VEC  elements per load/store: 4 (float4, or 4 halves in 8 bytes), 2, or 1
  NV   VEC-groups per lane: ceil(dim / (32 * VEC)) rounded up to a power of two, with
       NV * VEC <= 32 floats of registers per lane, hence dim <= 1024 on the GPU.

CuPy is imported lazily: importing this module costs nothing on a machine without it.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hps_core.errors import ConfigError

__all__ = [
    "COMPILE_OPTIONS",
    "FAMILIES",
    "MAX_GPU_DIM",
    "all_variants",
    "get_module",
    "kernel_dir",
    "name_expressions",
    "vector_shape",
]

#: Largest vector width the GPU kernels stage in registers (32 lanes x 32 floats).
MAX_GPU_DIM = 1024
COMPILE_OPTIONS = ("-std=c++17",)
#: family -> (source file, kernels templated on <K, V, VEC, NV>, kernels templated on <K>,
#: plain extern "C" kernels)
FAMILIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "dynamic": ("dynamic_cache.cu", ("dc_query", "dc_write"), ("dc_dump",), ("dc_clear",)),
    "static": ("static_table.cu", ("st_query", "st_write"), ("st_find",), ()),
}
_KEY_CTYPES: dict[np.dtype[Any], str] = {np.dtype(np.int64): "long long", np.dtype(np.uint32): "unsigned int"}
_VALUE_CTYPES: dict[np.dtype[Any], str] = {np.dtype(np.float32): "float", np.dtype(np.float16): "hps_half"}


def kernel_dir() -> Path:
    """Folder of the .cu sources (a real directory: the package ships them as files)."""
    return Path(str(importlib.resources.files("hps_core.cache") / "kernels"))


def vector_shape(dim: int, value_dtype: Any, *pointers: int) -> tuple[int, int]:
    """(VEC, NV) for rows of ``dim`` elements: the widest load that divides ``dim`` and
    keeps every pointer (bytes) aligned for both float32 rows and storage rows."""
    if dim > MAX_GPU_DIM:
        raise ConfigError(f"GPU caches hold vectors of at most {MAX_GPU_DIM} floats, got dim {dim}")
    # Storage rows start at slot * dim elements of a 256-byte aligned allocation, so
    # dim % VEC == 0 aligns them for any storage dtype; float32 rows passed in must be too.
    vec = 4
    while vec > 1 and (dim % vec or any(p % (4 * vec) for p in pointers)):
        vec //= 2
    groups = -(-dim // (32 * vec))
    nv = 1 << (groups - 1).bit_length()
    return vec, nv


def name_expressions(family: str, key_dtype: Any, value_dtype: Any, vec: int, nv: int) -> list[str]:
    """The kernel names (template instantiations) of ``family`` for one dtype/shape combo."""
    _, row_kernels, key_kernels, plain = FAMILIES[family]
    k, v = _KEY_CTYPES[np.dtype(key_dtype)], _VALUE_CTYPES[np.dtype(value_dtype)]
    names = [f"{name}<{k}, {v}, {vec}, {nv}>" for name in row_kernels]
    names += [f"{name}<{k}>" for name in key_kernels]
    return names + list(plain)


def all_variants() -> Iterator[tuple[str, np.dtype[Any], np.dtype[Any], int, int]]:
    """Every (family, key dtype, value dtype, VEC, NV) the loader can request."""
    for family in FAMILIES:
        for kdt in _KEY_CTYPES:
            for vdt in _VALUE_CTYPES:
                for vec in (4, 2, 1):
                    nv = 1
                    while nv * vec <= 32:
                        yield family, kdt, vdt, vec, nv
                        nv *= 2


@functools.lru_cache(maxsize=None)
def _compile(device: int, family: str, key_dtype: np.dtype, value_dtype: np.dtype, vec: int, nv: int) -> Any:
    import cupy  # lazy: only GPU caches get here

    source = (kernel_dir() / FAMILIES[family][0]).read_text()
    with cupy.cuda.Device(device):
        module = cupy.RawModule(
            code=source,
            options=(*COMPILE_OPTIONS, f"-I{kernel_dir()}"),
            name_expressions=name_expressions(family, key_dtype, value_dtype, vec, nv),
        )
        module.compile()  # compile now, on this device, not at the first launch
    return module


def get_module(family: str, key_dtype: Any, value_dtype: Any, vec: int, nv: int, device: int) -> Any:
    """The compiled ``cupy.RawModule`` of ``family`` for these template arguments on
    ``device``; fetch kernels with ``module.get_function(name)`` using a name from
    :func:`name_expressions`."""
    return _compile(int(device), family, np.dtype(key_dtype), np.dtype(value_dtype), int(vec), int(nv))
