"""Loads the cache kernels: ``.cu`` sources shipped in ``kernels/``, compiled by CuPy.

:func:`load` compiles one family (one ``.cu`` file) for one cache when the cache is made:
``cupy.RawModule(code=source(family), options=..., name_expressions=[...])`` with every
template instantiation the cache can ask for, memoized per (device, family, key type,
vector shapes). It returns the kernels by name: per vector width for those templated on
it, once for the others (:class:`Kernels`)::

    kernels = load("dynamic", np.int64, dims=[8, 3, 16], device=0)
    kernels.by_vec[vec]["dc_query"]  # vec from vector_shape(dims, *buffer pointers)
    kernels.no_vec["dc_dump"]        # templated on the key type only, or extern "C"

``hps_check_rows`` (kernels/row_formats.cuh, templated on VEC and NV only) is in both
cache families: the check pass a write of a cache with a compact table runs first.

:func:`source` is the text handed to NVRTC: the ``.cu`` file with each of
:data:`HEADERS` it includes (``kernels/common.cuh``, ``kernels/row_formats.cuh``) pasted
over its ``#include`` line. CuPy caches compiled code (in memory and on disk) by source
text, so a change to a header must change that text; with an ``-I`` include it would not,
and a stale kernel would load. The CI test (tests/hps_core/cache/test_kernels_compile.py)
compiles the same text with nvcc, with the same name expressions.

Row formats are not template arguments: every table's format is a code in a per-table
device array, dispatched inside the kernels (warp-uniform, one table per warp), so one
launch serves tables of every format and every instantiation holds every format's path.

Template arguments:
  K    ``long long`` (int64 keys) or ``unsigned int`` (uint32)
  VEC  elements per load/store: 4 (a float4 of the caller's rows; 16, 8 or 4 packed bytes
       of a stored row, by format), 2, or 1. It divides every table's dim; a call narrows
       it further when a caller's buffer is not aligned for it (:func:`vector_shape`).
  NV   VEC-groups per lane: ceil(largest dim / (32 * VEC)) rounded up to a power of two,
       with NV * VEC <= 32 floats of registers per lane, hence dim <= 1024 on the GPU.

CuPy is imported lazily: importing this module costs nothing on a machine without it.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from hps_core.errors import ConfigError

__all__ = [
    "COMPILE_OPTIONS",
    "FAMILIES",
    "HEADER",
    "HEADERS",
    "MAX_GPU_DIM",
    "Family",
    "Kernels",
    "all_variants",
    "kernel_dir",
    "kernel_names",
    "load",
    "source",
    "vector_shape",
    "vector_shapes",
]

#: Largest vector width the GPU kernels stage in registers (32 lanes x 32 floats).
MAX_GPU_DIM = 1024
COMPILE_OPTIONS = ("-std=c++17",)
#: The header every kernel family includes, and every header pasted into the sources.
HEADER = "common.cuh"
HEADERS = (HEADER, "row_formats.cuh")
_VECS = (4, 2, 1)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Family:
    """One ``.cu`` file and its kernels, grouped by how they are templated."""

    source: str
    row_kernels: tuple[str, ...] = ()  # <K, VEC, NV>: stage rows in registers
    shape_kernels: tuple[str, ...] = ()  # <VEC, NV>: stage rows, keys unread
    vec_kernels: tuple[str, ...] = ()  # <VEC>
    key_kernels: tuple[str, ...] = ()  # <K>
    plain_kernels: tuple[str, ...] = ()  # extern "C"


FAMILIES: dict[str, Family] = {
    "dynamic": Family("dynamic_cache.cu", row_kernels=("dc_query", "dc_write"), shape_kernels=("hps_check_rows",),
                      key_kernels=("dc_dump", "dc_sets"), plain_kernels=("dc_clear", "dc_sizes")),
    "static": Family("static_table.cu", row_kernels=("st_query", "st_write", "st_count_new"),
                     shape_kernels=("hps_check_rows",), key_kernels=("st_dump",), plain_kernels=("st_clear",)),
    "rows": Family("rows.cu", vec_kernels=("copy_rows",)),
}


@dataclass(frozen=True)
class Kernels(Generic[_T]):
    """The kernels of one family for one cache, by name: their C++ name expressions
    (:func:`kernel_names`) or the compiled ``cupy.RawKernel`` (:func:`load`)."""

    by_vec: dict[int, dict[str, _T]]  # VEC -> name -> kernel: row_, shape_ and vec_kernels
    no_vec: dict[str, _T]  # name -> kernel: key_kernels and plain_kernels (no vector width)

    def expressions(self) -> set[_T]:
        """Every kernel once (the name expressions a module is compiled with)."""
        return {k for per_vec in self.by_vec.values() for k in per_vec.values()} | set(self.no_vec.values())


_KEY_CTYPES: dict[np.dtype[Any], str] = {np.dtype(np.int64): "long long", np.dtype(np.uint32): "unsigned int"}


def kernel_dir() -> Path:
    """Folder of the .cu sources (a real directory: the package ships them as files)."""
    return Path(str(importlib.resources.files("hps_core.cache") / "kernels"))


def source(family: str) -> str:
    """The self-contained source of ``family`` that NVRTC compiles: the ``.cu`` text with each
    of :data:`HEADERS` inlined at its ``#include`` (``#line`` directives keep compiler
    messages pointing at the right file and line)."""
    return _inline(FAMILIES[family].source, set())


def _inline(name: str, seen: set[str]) -> str:
    """``name``'s text with the headers it includes pasted in, each once (later includes of a
    header already pasted are dropped: its guard would empty them anyway)."""
    lines = (kernel_dir() / name).read_text().splitlines(keepends=True)
    out = []
    for number, line in enumerate(lines, start=1):
        header = next((h for h in HEADERS if line.strip() == f'#include "{h}"'), None)
        if header is None:
            out.append(line)
        elif header not in seen:
            seen.add(header)
            text = _inline(header, seen).rstrip("\n")
            out.append(f'#line 1 "{header}"\n{text}\n#line {number + 1} "{name}"\n')
    return "".join(out)


def vector_shapes(dims: Sequence[int]) -> dict[int, int]:
    """VEC -> NV for every vector width a cache of tables ``dims`` may use: the widest VEC
    dividing every dim, and each narrower one (a call narrows VEC for a misaligned buffer).
    Raises ConfigError for a dim the kernels cannot stage."""
    widths = [int(d) for d in dims]
    if max(widths) > MAX_GPU_DIM:
        raise ConfigError(f"GPU caches hold vectors of at most {MAX_GPU_DIM} floats, got dim {max(widths)}")
    common = math.gcd(*widths)
    shapes = {}
    for vec in _VECS:
        if common % vec == 0:
            groups = -(-max(widths) // (32 * vec))
            shapes[vec] = 1 << (groups - 1).bit_length()
    return shapes


def vector_shape(dims: Sequence[int], *pointers: int) -> tuple[int, int]:
    """(VEC, NV) of a call on rows of tables ``dims``: the widest VEC that divides every dim
    and keeps every float32 buffer pointer (bytes) aligned for VEC-wide loads. Stored rows
    need no check: every table's rows are aligned for any VEC its dim allows
    (:func:`~hps_core.cache.base.row_stride`) in a 256-byte aligned allocation. Rows whose
    offsets are not multiples of VEC are handled inside the kernels."""
    shapes = vector_shapes(dims)
    vec = max(shapes)
    while vec > 1 and any(p % (4 * vec) for p in pointers):
        vec //= 2
    return vec, shapes[vec]


def kernel_names(family: str, key_dtype: Any, shapes: dict[int, int]) -> Kernels[str]:
    """The C++ name expression of every kernel of ``family`` for one key dtype and the
    vector shapes ``shapes`` (VEC -> NV)."""
    fam = FAMILIES[family]
    k = _KEY_CTYPES[np.dtype(key_dtype)]
    by_vec = {
        vec: {name: f"{name}<{k}, {vec}, {nv}>" for name in fam.row_kernels}
        | {name: f"{name}<{vec}, {nv}>" for name in fam.shape_kernels}
        | {name: f"{name}<{vec}>" for name in fam.vec_kernels}
        for vec, nv in shapes.items()
    }
    no_vec = {name: f"{name}<{k}>" for name in fam.key_kernels} | {name: name for name in fam.plain_kernels}
    return Kernels(by_vec, no_vec)


def all_variants() -> Iterator[tuple[str, np.dtype[Any], int, int]]:
    """Every (family, key dtype, VEC, NV) the loader can request."""
    for family in FAMILIES:
        for kdt in _KEY_CTYPES:
            for vec in _VECS:
                nv = 1
                while nv * vec <= 32:
                    yield family, kdt, vec, nv
                    nv *= 2


@functools.lru_cache(maxsize=None)
def _compile(device: int, family: str, key_dtype: np.dtype[np.integer[Any]],
             shapes: tuple[tuple[int, int], ...]) -> Kernels[Any]:
    import cupy  # lazy: only GPU caches get here

    names = kernel_names(family, key_dtype, dict(shapes))
    with cupy.cuda.Device(device):
        module = cupy.RawModule(code=source(family), options=COMPILE_OPTIONS,
                                name_expressions=sorted(names.expressions()))
        module.compile()  # compile now, on this device, not at the first launch
        return Kernels(
            {vec: {name: module.get_function(expr) for name, expr in per_vec.items()}
             for vec, per_vec in names.by_vec.items()},
            {name: module.get_function(expr) for name, expr in names.no_vec.items()},
        )


def load(family: str, key_dtype: Any, dims: Sequence[int], device: int) -> Kernels[Any]:
    """The compiled kernels (``cupy.RawKernel``) of ``family`` for a cache of tables ``dims``
    on ``device``, by name: those templated on the vector width for every VEC of
    :func:`vector_shapes`. The dicts are the caller's own (the compiled kernels are shared)."""
    shapes = tuple(sorted(vector_shapes(dims).items(), reverse=True))
    compiled = _compile(int(device), family, np.dtype(key_dtype), shapes)
    return Kernels({vec: dict(kernels) for vec, kernels in compiled.by_vec.items()}, dict(compiled.no_vec))
