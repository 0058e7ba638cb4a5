"""The synthetic tables, requests and device of the lookup benchmarks (``scripts/bench_lookup.py``,
``scripts/bench_formats.py``): ``n`` tables held both as keys and as one dense array (the
plain-gather ceiling), requests drawn over them, the host or GPU the answers live on, and the
warming and hit counting of an embedding cache in front of a session.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from hps_core.cache.base import MultiTableCache
from hps_core.lookup import LookupSession
from hps_demo.data import make_key_map, power_law_ranks

Ints = npt.NDArray[np.int64]
Int32s = npt.NDArray[np.int32]
Floats = npt.NDArray[np.float32]

WARM_CHUNK = 262_144  # rows per replace_tables call when the cache is warmed
#: The device plain-gather ceiling (scripts/bench_cache.py measures the cache query against it too).
GATHER_CU = Path(__file__).resolve().parents[2] / "scripts" / "kernels" / "gather.cu"


@dataclass
class Tables:
    """``n`` tables of ``rows`` rows each, held twice: in a hash map and as one dense array.

    key_maps: (n, rows) int64, row -> key of each table (opaque ids, distinct across tables)
    dense:    (n * rows, dim) float32, row r of table t at ``t * rows + r``
    """

    key_maps: Ints
    dense: Floats

    @property
    def n(self) -> int:
        return int(self.key_maps.shape[0])

    @property
    def rows(self) -> int:
        return int(self.key_maps.shape[1])

    @property
    def dim(self) -> int:
        return int(self.dense.shape[1])


def make_tables(n: int, rows: int, dim: int, seed: int) -> Tables:
    rng = np.random.default_rng(seed)
    key_maps = np.stack([make_key_map(rows, t, seed) for t in range(n)])
    if np.unique(key_maps).size != key_maps.size:  # one-table mode puts all keys in one table
        raise RuntimeError("key collision between tables; pick another --seed")
    return Tables(key_maps, rng.standard_normal((n * rows, dim), dtype=np.float32))


def draw_rows(rng: np.random.Generator, tables: Tables, samples: int, dist: str, alpha: float) -> Ints:
    """(n, samples) int64 row of each table's key per sample: power law with hot rows
    scattered by a per-table permutation, or uniform."""
    out = np.empty((tables.n, samples), dtype=np.int64)
    for t in range(tables.n):
        if dist == "uniform":
            out[t] = rng.integers(0, tables.rows, samples)
        else:
            out[t] = rng.permutation(tables.rows)[power_law_ranks(rng, tables.rows, samples, alpha)]
    return out


@dataclass(frozen=True)
class Request:
    """One HugeCTR request and where its rows sit in the dense array."""

    keys: Ints  # (n * samples,) int64, table-major
    numkeys: Int32s  # (n,) int32
    dense_index: Ints  # (n * samples,) int64 rows of Tables.dense, same order
    per_table: list[Ints]  # n arrays (samples,) int64: rows within each table


def make_request(tables: Tables, rows: Ints) -> Request:
    n, samples = rows.shape
    keys = np.take_along_axis(tables.key_maps, rows, axis=1).ravel()
    dense_index = (rows + (np.arange(n, dtype=np.int64) * tables.rows)[:, None]).ravel()
    return Request(keys, np.full(n, samples, dtype=np.int32), dense_index, list(rows))



class Device:
    """Where the session's answers and the plain-gather ceiling live: the host (numpy) or GPU 0
    (CuPy). ``sync()`` waits for the device's work, so host timers bracket finished work."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.xp: Any = np
        if name == "gpu":
            try:
                import cupy
            except ImportError as exc:
                raise SystemExit(f"--device gpu needs CuPy and a GPU ({exc}); use --device cpu (--cache cpu "
                                 "runs the cached path on the CPU twin)") from exc
            self.xp = cupy
            with cupy.cuda.Device(0):
                self._kernel = cupy.RawKernel(GATHER_CU.read_text(), "gather")

    @property
    def gpu(self) -> bool:
        return self.name == "gpu"

    def put(self, array: npt.NDArray[Any]) -> Any:
        """``array`` in the device's memory (the array itself on the host)."""
        return self.xp.asarray(array) if self.gpu else array

    def host(self, array: Any) -> npt.NDArray[Any]:
        return array.get() if self.gpu else np.asarray(array)

    def empty(self, shape: tuple[int, ...]) -> Any:
        return self.xp.empty(shape, dtype=np.float32)

    def sync(self) -> None:
        if self.gpu:
            self.xp.cuda.Device(0).synchronize()

    def gather(self, table: Any, index: Any, out: Any) -> None:
        """``out[i] = table[index[i]]``: numpy ``take`` (clip: no buffered ``out``) on the host,
        one float4 gather kernel on the GPU (``cupy.take`` for rows not 16-byte aligned)."""
        if not self.gpu:
            np.take(table, index, axis=0, out=out, mode="clip")
            return
        n, dim = int(index.shape[0]), int(table.shape[1])
        if n == 0:
            return
        if dim % 4 or table.data.ptr % 16 or out.data.ptr % 16:
            self.xp.take(table, index, axis=0, out=out)
            return
        blocks = min(-(-n // 8), 65535)  # 8 warps (rows) per block of 256 threads, grid-stride
        self._kernel((blocks,), (256,), (table, index, out, np.int64(n), np.int32(dim)))

    def synced(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` followed by a device synchronize (what a timed candidate runs)."""
        if not self.gpu:
            return fn

        def run() -> Any:
            result = fn()
            self.sync()
            return result

        return run

    def describe(self) -> dict[str, Any]:
        if not self.gpu:
            return {"device": "cpu"}
        cupy = self.xp
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        return {"device": "gpu", "gpu": name.decode() if isinstance(name, bytes) else str(name),
                "cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
                "cuda_driver": cupy.cuda.runtime.driverGetVersion()}


def warm_cache(cache: MultiTableCache | None, device: Device, keys: list[Ints],
               values: list[Floats]) -> float | None:
    """Insert every row of every table (``keys[t]`` (rows,), ``values[t]`` (rows, dim)) into
    ``cache``; returns the share of the rows resident afterwards (None without a cache)."""
    if cache is None:
        return None
    xp = device.xp if cache.device != "cpu" else np
    for t, (k, v) in enumerate(zip(keys, values)):
        dim = int(v.shape[1])
        for s in range(0, k.size, WARM_CHUNK):
            kk = np.ascontiguousarray(k[s : s + WARM_CHUNK], dtype=np.int64)
            ids = np.full(kk.size, t, np.int64)
            offsets = np.arange(kk.size, dtype=np.int64) * dim
            flat = np.ascontiguousarray(v[s : s + WARM_CHUNK], dtype=np.float32).reshape(-1)
            cache.replace_tables(xp.asarray(ids), xp.asarray(kk), xp.asarray(flat), xp.asarray(offsets))
    device.sync()
    held = np.asarray(cache.sizes(), np.int64)
    return float(held.sum() / sum(k.size for k in keys))


def cache_hits(session: LookupSession) -> tuple[float, float]:
    """(cache hits, unique keys) over all tables so far."""
    counters = session.counters().values()
    return sum(c["cache_hits"] for c in counters), sum(c["unique_keys"] for c in counters)


def hit_rate_of(session: LookupSession, before: tuple[float, float]) -> float | None:
    """Cache hit rate of the unique keys looked up since ``before`` (None without a cache)."""
    if session.cache is None:
        return None
    hits, unique = cache_hits(session)
    asked = unique - before[1]
    return float((hits - before[0]) / asked) if asked else None
