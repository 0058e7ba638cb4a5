"""GPU embedding caches: the caches of a model's tables in one structure, answered by one
kernel launch per call whatever the table count (FBGEMM's table-batched embeddings are the
model: per-table metadata lives in small device arrays built once, when the cache is made).

* :class:`GpuDynamicCache` — set-associative (32 ways = one warp), LRU or LFU; kernels in
  ``kernels/dynamic_cache.cu``.
* :class:`GpuStaticCache` — whole tables resident, open addressing, no eviction; kernels in
  ``kernels/static_table.cu``.
* :class:`GpuEmbeddingCache`, :class:`StaticEmbeddingTable` — a one-table cache of either
  kind behind the single-table :class:`~hps_core.cache.base.EmbeddingCache` contract
  (:class:`~hps_core.cache.base.TableView`).
* ``copy_rows`` (both kinds): ``kernels/rows.cu``.

Contract, layout, set formula and attributes are the CPU twins' (``cpu.py``), so the same
keys land in the same sets on both and the conformance suites run both.

Arrays are CuPy arrays on the cache's device, or host NumPy arrays, which are copied over
(and whose table ids and offsets are checked on the host first, as the CPU twins check
them). ``out`` and ``dst`` are written in place, so they must be CuPy arrays on the cache's
device; an array on another device is refused with RequestError. Every call takes
``stream`` (a ``cupy.cuda.Stream``) last and runs on the cache's device, on ``stream`` or
else on the cache's own stream.

Ordering of writes is explicit: every call that names no stream runs on the cache's one
stream, so the device runs the cache's work in the order the host issued it, whatever the
thread (the request path, the background inserts, the update stream's writes; the lookup
session orders those on the host with one lock). That stream is a *blocking* one, so it
also waits for work the caller queued on the legacy default stream (the copies of host
arrays to the device, a previous step's output) and such work waits for it: a caller that
works on a non-blocking stream of its own passes that stream.

Kernel launches and host synchronisation per call (device arrays; each count read back is
preceded by a memset of the call's status words)::

    query_tables     1 launch, 1 sync: a 12-byte read-back (miss count, error words)
    replace_tables   dynamic: 1 launch, no sync (+1 launch, 1 sync: the check pass, when a
                     table is not fp32); static: 2 launches (count the new keys per table
                     and check the rows, write), 2 syncs, under a host lock
    update_tables    1 launch, 1 sync (the found count); +1 launch, 1 sync (the check pass)
                     when a table is not fp32
    copy_rows        1 launch, no sync
    dump_sets        1 launch, 1 sync (the key count)
    sizes            dynamic: 1 launch, 1 sync; static: none (a host counter)
    clear            1 launch; dynamic: no sync; static: 1 sync, under the host lock

Shared caches (``shared=``, hps_core.cache.shared_gpu): the state between calls is one
device allocation (a :class:`~hps_core.cache.shared_gpu.Region`, private or mapped from the
GPU's shared cache through CUDA IPC, by the same code); every write (replace, update, dump,
clear) of a shared cache holds the host-wide writer lock and waits for its kernels (one more
sync for a dynamic replace), and the first writer after one that died inside its kernels
repairs (``_repair``: the cache is emptied, every lock released).

Kernels never touch memory outside the caller's buffers: a row whose table id or offset
does not fit is skipped and its position flagged in the call's error word, which the calls
that read a count back turn into RequestError (rows that fit were still served). A dynamic
``replace_tables`` and ``copy_rows`` do not wait for their kernel, so they cannot report:
they skip such rows silently (host arrays were checked before the launch).

Row formats: each table's rows are packed in its format (hps_core.row_formats) in one
byte-addressed value store; the write kernels quantise the caller's float32 rows
(kernels/row_formats.cuh, the bit-exact twin of row_formats.encode_row) and the query
kernels dequantise into ``out``. A batch holding a row its format cannot store is refused
whole, RowValueError naming the first such position, before any row is written, as the CPU
twins refuse it: host rows are checked on the host; device rows by a check pass
(``hps_check_rows``: the writers' own HpsStagedRow::stage, storing nothing) read back before
the write's launch, or by a static replace's counting pass, which checks them anyway. A
cache whose tables are all fp32 skips the check pass (fp32 stores any row), so its writes
cost what they did. The write kernels still skip such a row without touching its set or
slot, should one reach them.

Nothing is allocated per call on the request path but the results (and the device copies
of host arguments), and nothing scales with the capacity: kernels are compiled when the
cache is made and their handles kept on it; a call borrows a workspace (device status words
and the pinned host buffer they are read back into) from a pool on the cache, one per
concurrent call; the static table's de-duplication scratch grows geometrically.
``query_tables`` writes the miss positions straight into the array it returns (allocated
from CuPy's memory pool), so no later call can overwrite a caller's result.

The concurrency scheme (set locks for writers, a seqlock per slot or row for lock-free
readers; 64-bit LRU stamps that cannot wrap) is described in the .cu files and
docs/cache.md. CuPy is imported when a GPU cache is constructed, never at import time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from hps_core.arrays import to_host
from hps_core.cache import _kernels
from hps_core.cache.shared_gpu import INSERT_WAIT_S, Field, HostClock, Region, SharedName, local_region, shared_region
from hps_core.cache.base import (
    WAYS,
    AccessClock,
    CacheLayout,
    TableView,
    check_room,
    check_multi_cache_args,
    check_storable,
    check_table_rows,
    normalize_keys,
)
from hps_core.config import CacheKind, CachePolicy
from hps_core.errors import CacheFullError, ConfigError, DeviceError, DeviceMemoryError, RequestError, RowValueError
from hps_core.row_formats import RowFormat
from hps_core.rows import check_rows_fit

__all__ = ["GpuDynamicCache", "GpuEmbeddingCache", "GpuStaticCache", "StaticEmbeddingTable"]

_BLOCK = 256  # 8 warps per block
_WARPS_PER_BLOCK = _BLOCK // 32
_BLOCKS_PER_SM = 16  # enough resident warps to hide DRAM latency; the loops are grid-stride
#: Status words of a call (HPS_STATUS_WORDS in kernels/common.cuh): [0] its count (misses,
#: found keys, dumped keys), [1] 1 + the position of a row that did not fit (0: none), [2]
#: 1 + the position of a row its table's format cannot store; then one word per table
#: (sizes, new keys).
_STATUS = 3
#: Counts and flagged positions are 32-bit on the device.
_MAX_BATCH = 2**31 - 1
#: A null device pointer as a kernel argument (8 zero bytes; every CuPy version passes a
#: NumPy scalar by value): the status of a call that does not read one back.
_NO_STATUS = np.uint64(0)
#: A static repair's wait between emptying the slots and releasing a dead writer's row
#: (GpuStaticCache._repair): far longer than any query kernel.
_REPAIR_GRACE_S = 0.1


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ConfigError("GPU embedding caches need CuPy (pip install cupy-cuda12x or cupy-cuda13x)") from exc
    return cupy


@contextlib.contextmanager
def translate_cupy(device: int, what: str) -> Iterator[None]:
    """CuPy's and CUDA's errors raised in the block (out of device memory, a CUDA runtime or
    driver failure, a kernel that does not compile) → DeviceError naming the device and
    ``what``, DeviceMemoryError when out of memory (:func:`device_error_type`): where CuPy errors enter hps_core, at a cache's construction and allocation and
    in the update stream's refresh of cached rows (LookupSession.apply_update)."""
    cp = _cupy()
    oom = cp.cuda.memory.OutOfMemoryError
    try:
        yield
    except (oom, cp.cuda.runtime.CUDARuntimeError, cp.cuda.driver.CUDADriverError,
            cp.cuda.compiler.CompileException) as exc:
        kind = device_error_type("OutOfMemoryError" if isinstance(exc, oom) else type(exc).__name__,
                                 getattr(exc, "status", None))
        hint = "; lower gpucacheper or the tables' sizes" if kind is DeviceMemoryError else ""
        raise kind(f"GPU {device}: {what} failed ({type(exc).__name__}: {exc}){hint}") from exc


#: CUDA's out-of-memory status: cudaErrorMemoryAllocation (runtime) and
#: CUDA_ERROR_OUT_OF_MEMORY (driver) are both 2.
_CUDA_OUT_OF_MEMORY = 2


def device_error_type(name: str, status: int | None) -> type[DeviceError]:
    """The DeviceError a CuPy error becomes, from its class name and its CUDA ``status``
    (None when it has none): DeviceMemoryError for CuPy's OutOfMemoryError and for a CUDA
    runtime or driver error whose status is out of memory (a failure that passes, retried by
    the update source); DeviceError for the rest (an illegal memory access, a kernel that does
    not compile: retrying would fail forever)."""
    if name == "OutOfMemoryError":
        return DeviceMemoryError
    if name in ("CUDARuntimeError", "CUDADriverError") and status == _CUDA_OUT_OF_MEMORY:
        return DeviceMemoryError
    return DeviceError


class _Workspace:
    """A call's device status words and the pinned host buffer they are read back into.

    One call uses a workspace at a time (the pool on the cache hands them out), so
    concurrent calls never share status words."""

    def __init__(self, cp: Any, words: int) -> None:
        self._runtime = cp.cuda.runtime
        self.status = cp.zeros(words, cp.uint32)
        self._pinned = cp.cuda.alloc_pinned_memory(4 * words)
        self._host = np.frombuffer(self._pinned, np.uint32, words)

    def reset(self, words: int, stream: Any) -> None:
        """Zero the first ``words`` status words, in stream order."""
        self._runtime.memsetAsync(self.status.data.ptr, 0, 4 * words, stream.ptr)

    def read(self, words: int, stream: Any) -> npt.NDArray[np.int64]:
        """The first ``words`` status words once ``stream``'s earlier work is done (the one
        host synchronisation of a call)."""
        self._runtime.memcpyAsync(self._host.ctypes.data, self.status.data.ptr, 4 * words,
                                  self._runtime.memcpyDeviceToHost, stream.ptr)
        stream.synchronize()
        return self._host[:words].astype(np.int64)


class _GpuMultiCache:
    """Device placement, argument conversion, workspaces and launches shared by both kinds."""

    kind: CacheKind
    _family = ""  # kernels/<family>.cu, see _kernels.FAMILIES
    _query_kernel = ""
    # per table, set by each kind as its CPU twin sets them
    capacities: Any
    num_sets: Any
    set_base: Any
    value_base: Any
    total_sets: int

    def __init__(self, kind: CacheKind, capacities: Sequence[int], dims: Sequence[int], device: int,
                 policy: CachePolicy | str,
                 row_formats: Sequence[RowFormat] | None, key_dtype: Any, shared: SharedName | None) -> None:
        caps, self.dims, self.row_formats, self.key_dtype = check_multi_cache_args(
            kind, capacities, dims, policy, row_formats, key_dtype
        )
        _kernels.vector_shapes(self.dims)  # refuses dims the kernels cannot stage, before CuPy loads
        if isinstance(device, bool) or not isinstance(device, (int, np.integer)) or device < 0:
            raise ConfigError(f"GPU cache device must be a CUDA ordinal (int >= 0), got {device!r}")
        cp = _cupy()
        if device >= cp.cuda.runtime.getDeviceCount():
            raise ConfigError(f"GPU cache device {device} does not exist ({cp.cuda.runtime.getDeviceCount()} GPUs)")
        self._cp = cp
        self.device = int(device)
        self.policy = CachePolicy(policy)
        self.tables = int(self.dims.shape[0])
        self._requested = caps
        self._shared = shared
        self._region: Region | None = None
        self._pool: list[_Workspace] = []
        self._pool_lock = threading.Lock()
        with cp.cuda.Device(self.device), translate_cupy(self.device, "setting up the cache's kernels"):
            self._stream = cp.cuda.Stream(non_blocking=False)  # see "Ordering of writes" above
            self._max_blocks = int(cp.cuda.Device(self.device).attributes["MultiProcessorCount"]) * _BLOCKS_PER_SM
            self._kernels = _kernels.load(self._family, self.key_dtype, self.dims, self.device)
            self._row_kernels = _kernels.load("rows", self.key_dtype, self.dims, self.device)
            self._dims_d = cp.asarray(self.dims)
            self._pool.append(_Workspace(cp, _STATUS + self.tables))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tables={self.tables}, capacities={self.capacities.tolist()}, "
            f"dims={self.dims.tolist()}, row_formats={[str(f) for f in self.row_formats]}, "
            f"key_dtype={self.key_dtype}, device={self.device})"
        )

    def _store(self, layout: CacheLayout, what: str) -> None:
        """Take the layout's per-table attributes (as the CPU twin does) and allocate the
        per-table arrays every row kernel reads (the value store is the region's)."""
        self.capacities, self.num_sets, self.set_base = layout.capacities, layout.num_sets, layout.set_base
        self.total_sets, self.value_base = layout.total_sets, layout.value_base
        self._codes, self._strides = layout.codes, layout.strides
        self._compact = bool(layout.codes.any())  # a table not fp32: device writes run the check pass
        self._value_bytes = layout.value_bytes
        cp = self._cp
        with cp.cuda.Device(self.device), translate_cupy(self.device, what):
            self._codes_d = cp.asarray(self._codes)
            self._strides_d = cp.asarray(self._strides)
            self._value_base_d = cp.asarray(self.value_base)

    def _open_region(self, fields: Sequence[Field], what: str) -> dict[str, Any]:
        """The state every process of a shared cache shares, and a private cache keeps alone:
        ``fields`` (after the value store) as views of one device allocation
        (hps_core.cache.shared_gpu), made here or mapped from the GPU's shared cache;
        returns the arrays by name."""
        cp = self._cp
        fields = [Field("values", np.uint8, self._value_bytes), *fields]
        exclusive = self.kind is CacheKind.STATIC  # static writers are one at a time (see GpuStaticCache)
        with cp.cuda.Device(self.device), translate_cupy(self.device, what):
            if self._shared is None:
                self._region = local_region(cp, fields, self.tables, exclusive=exclusive)
            else:
                shape = {"kind": self.kind, "capacities": self._requested.tolist(), "dims": self.dims.tolist(),
                         "row_formats": [str(f) for f in self.row_formats], "key_dtype": str(self.key_dtype),
                         "policy": self.policy, "source": self._shared.source}
                self._region = shared_region(cp, fields, self.tables, device=self.device, name=self._shared,
                                             shape=shape)
        self._region.repair = self._repair
        arrays = self._region.arrays
        self._values = arrays["values"]
        return arrays

    @property
    def shared(self) -> bool:
        """Whether this cache is the GPU's shared one (every process serving the model maps it)."""
        return self._region is not None and self._region.shared

    def close(self) -> None:
        """Let go of the cache's device state: a private cache frees it; a shared one gives
        back this process's user slot (the last user removes it, unless ``hps serve`` keeps
        it). No call may run on the cache meanwhile or after."""
        if self._region is not None:
            with self._cp.cuda.Device(self.device):
                self._stream.synchronize()
                self._region.close()
            self._region = None

    def _repair(self) -> None:
        """Undo what a writer that died inside its kernels left (a shared cache; the caller
        holds the writer lock, so no live writer runs): see shared_gpu's module doc."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _writing(self, stream: Any, *, best_effort: bool = False) -> Iterator[Any]:
        """A write's device and stream (yielded) under the writers' lock; a shared cache's
        writer waits for its kernels before it lets go (so a writer that dies holding the
        lock died inside them, and the next one repairs). A shared write that fails where its
        kernels may not have finished (its sync raises, or anything but a refused request,
        a full cache or an allocation) tells the region, so the next writer repairs at once.
        ``best_effort`` (an insert: a cache fill) waits for a shared cache's lock at most
        shared_gpu.INSERT_WAIT_S and then yields None: the caller writes nothing (counted in
        :attr:`skipped_inserts`); updates and clears wait."""
        region = self._region
        assert region is not None
        with self._writers(INSERT_WAIT_S if best_effort else None) as held:
            if not held:
                yield None
                return
            with self._on(stream) as s:
                try:
                    yield s
                except (RequestError, CacheFullError, DeviceMemoryError):
                    raise
                except BaseException:
                    region.write_failed()
                    raise
                finally:
                    if self.shared:
                        try:
                            s.synchronize()
                        except BaseException:
                            region.write_failed()
                            raise

    # -- the two calls both kinds implement alike

    def query_tables(self, table_ids: Any, keys: Any, out: Any, offsets: Any, stream: Any = None) -> Any:
        """Write the row of every cached key into ``out``; returns the batch positions of the
        keys not cached, ``(m,) int64`` CuPy, in no particular order."""
        cp = self._cp
        with self._on(stream) as s:
            ids, keys, out, offs = self._rows_args(table_ids, keys, out, offsets, "out")
            n = keys.shape[0]
            missing = cp.empty(n, np.int64)
            if n == 0:
                return missing
            vec, _ = _kernels.vector_shape(self.dims, out.data.ptr)
            with self._workspace() as ws:
                ws.reset(_STATUS, s)
                args = (ids, keys, np.int64(n), out, offs, np.int64(out.shape[0]), missing, ws.status,
                        *self._query_state())
                self._launch(self._kernels.by_vec[vec][self._query_kernel], n, args, s)
                m, flagged, _ = ws.read(_STATUS, s)
            self._check_flag(int(flagged), ids, offs, out.shape[0], "cache out")
            return missing[: int(m)]

    def copy_rows(self, src: Any, src_offsets: Any, dst: Any, dst_offsets: Any, table_ids: Any,
                  stream: Any = None) -> None:
        """``dst[dst_offsets[i] : +w] = src[src_offsets[i] : +w]``, ``w = dims[table_ids[i]]``:
        one launch, no sync. src, dst: flat float32 rows (dst on the cache's device; it may
        be src itself when the rows read and written do not overlap); ids and offsets (n,)
        int64. A row that does not fit either buffer is skipped."""
        cp = self._cp
        with self._on(stream) as s:
            ids = self._array(table_ids, "table_ids")
            src_offs, dst_offs = self._array(src_offsets, "src_offsets"), self._array(dst_offsets, "dst_offsets")
            src, dst = self._array(src, "src"), self._in_place(dst, "dst")
            if ids.ndim != 1 or any(a.dtype != np.int64 or a.shape != ids.shape for a in (ids, src_offs, dst_offs)):
                raise RequestError("copy_rows: table_ids, src_offsets and dst_offsets must be (n,) int64 arrays")
            for buf, name in ((src, "src"), (dst, "dst")):
                if buf.dtype != np.float32 or buf.ndim != 1 or not buf.flags.c_contiguous:
                    raise RequestError(f"copy_rows: {name} must be a 1-D C-contiguous float32 array (flat rows)")
            for offs, buf, name in ((src_offs, src, "src"), (dst_offs, dst, "dst")):
                if self._on_host(ids, offs):
                    check_rows_fit(ids, offs, self.dims, buf.shape[0], f"copy_rows {name}")
            n = ids.shape[0]
            if n == 0:
                return
            ids, src_offs, dst_offs, src = (cp.asarray(a) for a in (ids, src_offs, dst_offs, src))
            vec, _ = _kernels.vector_shape(self.dims, src.data.ptr, dst.data.ptr)
            args = (src, src_offs, np.int64(src.shape[0]), dst, dst_offs, np.int64(dst.shape[0]), ids,
                    np.int64(n), self._dims_d, np.int32(self.tables))
            self._launch(self._row_kernels.by_vec[vec]["copy_rows"], n, args, s)

    # -- helpers

    def _query_state(self) -> tuple[Any, ...]:
        """The query kernel's arguments after the status words: metadata and storage."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _on(self, stream: Any) -> Iterator[Any]:
        """Run on this cache's device and on ``stream`` (or the cache's own); yields it."""
        with self._cp.cuda.Device(self.device):
            stream = self._stream if stream is None else stream
            with stream:
                yield stream

    @contextlib.contextmanager
    def _workspace(self) -> Iterator[_Workspace]:
        """A workspace for this call alone. A new one is made only when more calls than ever
        before run at once; it goes back to the pool when the call is done with it (every
        user reads its status back, so the GPU is done with it too)."""
        with self._pool_lock:
            ws = self._pool.pop() if self._pool else None
        if ws is None:
            ws = _Workspace(self._cp, _STATUS + self.tables)
        try:
            yield ws
        finally:
            with self._pool_lock:
                self._pool.append(ws)

    def _array(self, arr: Any, what: str) -> Any:
        """``arr`` as given when it is a host array or a CuPy array on this cache's device."""
        if isinstance(arr, self._cp.ndarray):
            if arr.device.id != self.device:
                raise RequestError(
                    f"{what} is on GPU {arr.device.id} but this cache lives on GPU {self.device}: "
                    "pass arrays on the cache's device (or host arrays, which are copied over)"
                )
            return arr
        if isinstance(arr, np.ndarray):
            return arr
        raise RequestError(f"{what} must be a numpy or cupy array, got {type(arr).__name__}")

    def _on_host(self, *arrays: Any) -> bool:
        """Whether every one of ``arrays`` (each host or device, see :meth:`_array`) is a host array."""
        return not any(isinstance(a, self._cp.ndarray) for a in arrays)

    def _in_place(self, arr: Any, what: str) -> Any:
        if not isinstance(arr, self._cp.ndarray):
            raise RequestError(f"{what} must be a cupy array on the cache's device (rows are written into it in place)")
        return self._array(arr, what)

    def _rows_args(self, table_ids: Any, keys: Any, buffer: Any, offsets: Any, name: str) -> tuple[Any, Any, Any, Any]:
        """Device arrays of a multi-table call, checked; host table ids and offsets are also
        bounds-checked here, and host rows to write checked storable in their tables' formats,
        as the CPU twins do (the kernels check device ones)."""
        cp = self._cp
        ids, offs = self._array(table_ids, "table_ids"), self._array(offsets, "offsets")
        buf = self._in_place(buffer, name) if name == "out" else self._array(buffer, name)
        keys = self._array(keys, "keys")
        keys = normalize_keys(np if self._on_host(keys) else cp, keys, self.key_dtype)
        check_table_rows(cp, ids, keys, buf, offs, name)
        if keys.shape[0] > _MAX_BATCH:
            raise RequestError(f"a GPU cache call takes at most {_MAX_BATCH} keys, got {keys.shape[0]}")
        if self._on_host(ids, offs):
            check_rows_fit(ids, offs, self.dims, buf.shape[0], f"cache {name}")
            if name == "values" and self._on_host(buf):
                check_storable(ids, buf, offs, self.dims, self._codes, self.row_formats, f"cache {name}")
        return cp.asarray(ids), cp.asarray(keys), cp.asarray(buf), cp.asarray(offs)

    def _write_args(self, table_ids: Any, keys: Any, values: Any, offsets: Any,
                    stream: Any) -> tuple[Any, Any, Any, Any]:
        """:meth:`_rows_args` of a write that has no counting pass (an update, a dynamic
        replace), then its check pass: a batch holding a row its table's format cannot store
        is refused whole (RowValueError), before anything is written, as the CPU twins refuse
        it. Host rows were checked on the host; a cache of fp32 tables needs no check."""
        checked = self._on_host(table_ids, offsets, values)  # then _rows_args checks them
        ids, keys, values, offs = self._rows_args(table_ids, keys, values, offsets, "values")
        if self._compact and not checked and keys.shape[0]:
            self._check_rows(ids, values, offs, stream)
        return ids, keys, values, offs

    def _check_rows(self, ids: Any, values: Any, offs: Any, stream: Any) -> None:
        """The check pass (kernels/row_formats.cuh, hps_check_rows): one launch over the batch,
        one 12-byte read-back; RowValueError naming the first row its table's format cannot
        store. Rows that do not fit ``values`` are left to the write, which reports them."""
        n = ids.shape[0]
        vec, _ = _kernels.vector_shape(self.dims, values.data.ptr)
        with self._workspace() as ws:
            ws.reset(_STATUS, stream)
            args = (ids, np.int64(n), values, offs, np.int64(values.shape[0]), ws.status, self._dims_d,
                    self._codes_d, np.int32(self.tables))
            self._launch(self._kernels.by_vec[vec]["hps_check_rows"], n, args, stream)
            flagged = int(ws.read(_STATUS, stream)[2])
        self._check_storable_flag(flagged, ids, values, offs, "nothing of the batch was cached")

    def _check_flag(self, flagged: int, ids: Any, offsets: Any, size: int, what: str) -> None:
        """Raise RequestError for a row a kernel flagged (``flagged`` = 1 + its position)."""
        if not flagged:
            return
        # The kernel reports one position; the host check names the first, as on the CPU.
        check_rows_fit(to_host(ids), to_host(offsets), self.dims, size, what)
        position = flagged - 1
        raise RequestError(f"{what}: position {position} (table {int(ids[position])}) was refused: "
                           "its table had no free row")

    def _check_storable_flag(self, flagged: int, ids: Any, values: Any, offsets: Any, outcome: str) -> None:
        """Raise RowValueError for a row a kernel found its table's format cannot store
        (``flagged`` = 1 + its position); ``outcome`` says what became of the batch."""
        if not flagged:
            return
        # The kernel reports one position; the host checks name the first, as on the CPU, in
        # the CPU twin's order: a row that does not fit (RequestError), then one not storable.
        ids_h, values_h, offsets_h = to_host(ids), to_host(values), to_host(offsets)
        check_rows_fit(ids_h, offsets_h, self.dims, values_h.shape[0], "cache values")
        check_storable(ids_h, values_h, offsets_h, self.dims, self._codes, self.row_formats, "cache values", outcome)
        position = flagged - 1
        raise RowValueError(f"cache values: position {position} (table {int(ids[position])}) holds a row its "
                            f"table's row format cannot store; {outcome}", position=position)

    def _launch(self, kernel: Any, warps: int, args: tuple[Any, ...], stream: Any) -> None:
        if warps <= 0:
            return
        blocks = min(-(-warps // _WARPS_PER_BLOCK), self._max_blocks)
        kernel((blocks,), (_BLOCK,), args, stream=stream)

    def _keys_and_ids(self, table_ids: Any, keys: Any) -> tuple[Any, Any]:
        """(table_ids int64, keys of the key dtype) on the device, for sets_of."""
        cp = self._cp
        ids, keys = self._array(table_ids, "table_ids"), self._array(keys, "keys")
        keys = normalize_keys(np if self._on_host(keys) else cp, keys, self.key_dtype)
        if ids.ndim != 1 or ids.shape != keys.shape:
            raise RequestError(f"{keys.shape[0]} keys need {keys.shape[0]} table ids, got shape {ids.shape}")
        return cp.asarray(ids).astype(np.int64, copy=False), cp.asarray(keys)


    def update_tables(self, table_ids: Any, keys: Any, values: Any, offsets: Any, stream: Any = None) -> int:
        """Overwrite the cached keys (one launch, after the check pass when a table is not
        fp32); returns how many were cached (one read-back). A batch holding a row its table's
        format cannot store raises RowValueError, nothing written."""
        with self._writing(stream) as s:
            ids, keys, values, offs = self._write_args(table_ids, keys, values, offsets, s)
            if keys.shape[0] == 0:
                return 0
            with self._workspace() as ws:
                ws.reset(_STATUS, s)
                self._write(ids, keys, values, offs, ws.status, insert=False, stream=s)
                found, flagged, _ = ws.read(_STATUS, s)  # the write finds no row the check passed unstorable
            self._check_flag(int(flagged), ids, offs, values.shape[0], "cache values")
            return int(found)

    @property
    def skipped_inserts(self) -> int:
        """Inserts of a shared cache skipped (written nothing) because its writer lock stayed
        busy longer than shared_gpu.INSERT_WAIT_S, by every process on the host (approximate);
        always 0 for a private cache."""
        return getattr(self._region, "skipped_inserts", 0)

    def _writers(self, wait_s: float | None = None) -> Any:
        """What a write holds besides the kernels' own locks: the region's writer lock (a
        private dynamic cache's is nothing: it locks sets on the device; static tables
        serialise their writers on the host; a shared cache's writers are one at a time per
        host, shared_gpu)."""
        assert self._region is not None
        return self._region.locked(wait_s)

    def _write(self, ids: Any, keys: Any, values: Any, offs: Any, status: Any, *, insert: bool, stream: Any) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- dynamic


class GpuDynamicCache(_GpuMultiCache):
    """Set-associative GPU caches of several tables, LRU or LFU; the twin of CpuDynamicCache.

    ``capacities[t]`` rows of ``dims[t]`` floats for table t, rounded up to whole sets of
    :data:`WAYS` slots, stored as ``row_formats[t]`` (None: all fp32). Table t owns global
    sets ``set_base[t] ..``; its packed row of slot s starts at byte ``value_base[t] + (s -
    set_base[t] * WAYS) * strides[t]`` of the value store (CacheLayout).
    """

    kind = CacheKind.DYNAMIC
    _family = "dynamic"
    _query_kernel = "dc_query"

    def __init__(self, capacities: Sequence[int], dims: Sequence[int], *, device: int = 0, policy: CachePolicy | str = CachePolicy.LRU,
                 row_formats: Sequence[RowFormat] | None = None, key_dtype: Any = np.int64,
                 clock_start: int = 1, shared: SharedName | None = None) -> None:
        super().__init__(CacheKind.DYNAMIC, capacities, dims, device, policy, row_formats, key_dtype, shared)
        self._store(CacheLayout.dynamic(self._requested, self.dims, self.row_formats), "allocating a dynamic cache")
        # 64-bit stamps on the device too (dynamic_cache.cu); a shared cache's come from the
        # host's monotonic clock, so stamps of different processes compare
        self._clock: AccessClock | HostClock = AccessClock(clock_start) if shared is None else HostClock()
        cp = self._cp
        slots = self.total_sets * WAYS
        with cp.cuda.Device(self.device), translate_cupy(self.device, f"allocating a dynamic cache of {slots} slots"):
            self._set_base_d = cp.asarray(self.set_base)
            self._num_sets_d = cp.asarray(self.num_sets.astype(np.uint64))
        arrays = self._open_region([
            Field("slot_keys", self.key_dtype, slots),
            Field("slot_ver", np.uint32, slots),
            Field("slot_ts", np.uint64, slots),
            Field("slot_freq", np.uint32, slots),  # saturating LFU counts (dynamic_cache.cu)
            Field("set_locks", np.int32, self.total_sets),
        ], f"allocating a dynamic cache of {slots} slots")
        self._slot_keys, self._slot_ver, self._slot_ts = arrays["slot_keys"], arrays["slot_ver"], arrays["slot_ts"]
        self._slot_freq, self._set_locks = arrays["slot_freq"], arrays["set_locks"]

    def replace_tables(self, table_ids: Any, keys: Any, values: Any, offsets: Any, stream: Any = None) -> None:
        """Insert or overwrite each key's row, evicting per policy from a full set. One
        launch; returns without waiting for it. A cache with a table not fp32 first runs the
        check pass on device rows and waits for its verdict: a batch holding a row its
        table's format cannot store raises RowValueError, nothing written. A shared cache's
        insert is best effort: skipped (counted in skipped_inserts) when its writer lock stays
        busy past shared_gpu.INSERT_WAIT_S."""
        with self._writing(stream, best_effort=True) as s:
            if s is None:
                return
            ids, keys, values, offs = self._write_args(table_ids, keys, values, offsets, s)
            self._write(ids, keys, values, offs, _NO_STATUS, insert=True, stream=s)

    def dump_sets(self, start_set: int, end_set: int, stream: Any = None) -> tuple[Any, Any]:
        cp = self._cp
        lo, hi = max(0, int(start_set)), min(self.total_sets, int(end_set))
        with self._writing(stream) as s:  # it takes set locks
            if lo >= hi:
                return cp.empty(0, np.int64), cp.empty(0, self.key_dtype)
            keys = cp.empty((hi - lo) * WAYS, self.key_dtype)
            tables = cp.empty((hi - lo) * WAYS, np.int64)
            with self._workspace() as ws:
                ws.reset(_STATUS, s)
                args = (self._slot_keys, self._slot_ver, self._set_locks, self._set_base_d, np.int32(self.tables),
                        np.int64(lo), np.int64(hi), keys, tables, ws.status)
                self._launch(self._kernels.no_vec["dc_dump"], hi - lo, args, s)
                count = int(ws.read(1, s)[0])
            return tables[:count], keys[:count]

    def sets_of(self, table_ids: Any, keys: Any) -> Any:
        """(n,) int64 CuPy: the global set of each key (-1 for a table id out of range), by
        the kernels' own formula."""
        with self._on(None) as s:
            ids, keys = self._keys_and_ids(table_ids, keys)
            n = keys.shape[0]
            sets = self._cp.empty(n, np.int64)
            args = (ids, keys, np.int64(n), self._set_base_d, self._num_sets_d, np.int32(self.tables), sets)
            self._launch(self._kernels.no_vec["dc_sets"], -(-n // 32), args, s)
            return sets

    def clear(self, table: int | None = None, stream: Any = None) -> None:
        """Empty every set (of one table, or of all), under each set's lock: safe beside
        queries. Returns without waiting; later calls on the same stream see it done."""
        lo, hi = (0, self.total_sets) if table is None else self._set_range(table)
        with self._writing(stream) as s:
            self._clear_sets(lo, hi, s)

    def _clear_sets(self, lo: int, hi: int, stream: Any) -> None:
        args = (self._slot_ver, self._slot_ts, self._slot_freq, self._set_locks, np.int64(lo), np.int64(hi))
        self._launch(self._kernels.no_vec["dc_clear"], hi - lo, args, stream)

    def _repair(self) -> None:
        """Release every set lock (the dead writer's; no live writer holds one) and empty the
        cache with dc_clear, which also drops the busy mark of a slot it was writing."""
        with self._on(None) as s:
            self._cp.cuda.runtime.memsetAsync(self._set_locks.data.ptr, 0, self._set_locks.nbytes, s.ptr)
            self._clear_sets(0, self.total_sets, s)
            s.synchronize()

    def sizes(self, stream: Any = None) -> npt.NDArray[np.int64]:
        with self._on(stream) as s, self._workspace() as ws:
            ws.reset(_STATUS + self.tables, s)
            args = (self._slot_ver, self._set_base_d, np.int32(self.tables), np.int64(self.total_sets), ws.status)
            self._launch(self._kernels.no_vec["dc_sizes"], self.total_sets, args, s)
            return ws.read(_STATUS + self.tables, s)[_STATUS:]

    def _set_range(self, table: int) -> tuple[int, int]:
        if not 0 <= table < self.tables:
            raise RequestError(f"table {table} is outside the cache's {self.tables} tables")
        return int(self.set_base[table]), int(self.set_base[table] + self.num_sets[table])

    def _query_state(self) -> tuple[Any, ...]:
        return (self._dims_d, self._codes_d, self._strides_d, self._set_base_d, self._num_sets_d, self._value_base_d,
                np.int32(self.tables), self._slot_keys, self._slot_ver, self._slot_ts, self._slot_freq, self._values,
                np.uint64(self._clock.tick()))

    def _write(self, ids: Any, keys: Any, values: Any, offs: Any, status: Any, *, insert: bool, stream: Any) -> None:
        n = keys.shape[0]
        if n == 0:
            return
        vec, _ = _kernels.vector_shape(self.dims, values.data.ptr)
        args = (ids, keys, np.int64(n), values, offs, np.int64(values.shape[0]), status, self._dims_d, self._codes_d,
                self._strides_d, self._set_base_d, self._num_sets_d, self._value_base_d, np.int32(self.tables),
                self._slot_keys, self._slot_ver, self._slot_ts, self._slot_freq, self._set_locks, self._values,
                np.uint64(self._clock.tick()), np.int32(self.policy is CachePolicy.LFU), np.int32(insert))
        self._launch(self._kernels.by_vec[vec]["dc_write"], n, args, stream)


# --------------------------------------------------------------------------- static


class GpuStaticCache(_GpuMultiCache):
    """Whole tables resident on the GPU: per table an open-addressing region key -> row; the
    twin of CpuStaticCache. A replace whose new keys do not fit a table raises
    CacheFullError naming it, before anything is written.

    Writes (replace, update) and clears are serialised by a host lock and wait for their
    kernels; queries and dumps take no lock and never wait for writers.
    """

    kind = CacheKind.STATIC
    _family = "static"
    _query_kernel = "st_query"

    def __init__(self, capacities: Sequence[int], dims: Sequence[int], *, device: int = 0,
                 policy: CachePolicy | str = CachePolicy.LRU,  # accepted for a uniform factory; nothing is ever evicted
                 row_formats: Sequence[RowFormat] | None = None, key_dtype: Any = np.int64,
                 shared: SharedName | None = None) -> None:
        super().__init__(CacheKind.STATIC, capacities, dims, device, policy, row_formats, key_dtype, shared)
        big = np.flatnonzero(self._requested >= 2**31)
        if big.size:
            raise ConfigError(f"static GPU tables index rows with int32: table {int(big[0])} has capacity "
                              f"{int(self._requested[big[0]])}, which is too large")
        layout = CacheLayout.static(self._requested, self.dims, self.row_formats)
        self._store(layout, "allocating a static cache")
        self._slot_base = layout.slot_base
        slots = np.diff(layout.slot_base)
        cp = self._cp
        with cp.cuda.Device(self.device), translate_cupy(self.device, "allocating a static cache"):
            self._slot_base_d = cp.asarray(self._slot_base)
            self._slot_mask_d = cp.asarray((slots - 1).astype(np.uint64))
            self._row_base = layout.row_base
            self._row_base_d = cp.asarray(self._row_base[:-1])
            self._capacities_d = cp.asarray(self.capacities)
            # de-duplication scratch of replace (st_count_new), grown geometrically: per process
            self._scratch_tables = cp.empty(0, cp.int32)
            self._scratch_keys = cp.empty(0, self.key_dtype)
        rows = int(self.capacities.sum())
        arrays = self._open_region([
            Field("slot_keys", self.key_dtype, int(slots.sum())),
            Field("slot_rows", np.int32, int(slots.sum()), 0xFF),  # all -1: empty
            Field("row_keys", self.key_dtype, rows),
            Field("row_ver", np.uint32, rows),
            Field("row_count", np.uint32, self.tables),
        ], "allocating a static cache")
        self._slot_keys, self._slot_rows, self._row_keys = arrays["slot_keys"], arrays["slot_rows"], arrays["row_keys"]
        self._row_ver, self._row_count = arrays["row_ver"], arrays["row_count"]
        assert self._region is not None
        self._n_rows = self._region.rows  # rows per table, kept by the writers (shared: in the metadata file)

    def replace_tables(self, table_ids: Any, keys: Any, values: Any, offsets: Any, stream: Any = None) -> None:
        """Upsert each key's row. Counts each table's new keys first and raises
        CacheFullError (writing nothing) if one does not fit; RequestError, also before
        writing, for a row that does not fit ``values``, RowValueError for one its table's
        format cannot store. A shared cache's insert is best effort: skipped (counted in
        skipped_inserts) when its writer lock stays busy past shared_gpu.INSERT_WAIT_S."""
        with self._writing(stream, best_effort=True) as s:
            if s is None:
                return
            ids, keys, values, offs = self._rows_args(table_ids, keys, values, offsets, "values")
            n = keys.shape[0]
            if n == 0:
                return
            scratch_mask = self._scratch(n, s)
            vec, _ = _kernels.vector_shape(self.dims, values.data.ptr)
            with self._workspace() as ws:
                ws.reset(_STATUS + self.tables, s)
                args = (ids, keys, np.int64(n), values, offs, np.int64(values.shape[0]), ws.status, self._dims_d,
                        self._codes_d, self._slot_base_d, self._slot_mask_d, np.int32(self.tables), self._slot_keys,
                        self._slot_rows, self._scratch_tables, self._scratch_keys, np.uint64(scratch_mask))
                self._launch(self._kernels.by_vec[vec]["st_count_new"], n, args, s)
                status = ws.read(_STATUS + self.tables, s)
                self._check_flag(int(status[1]), ids, offs, values.shape[0], "cache values")
                self._check_storable_flag(int(status[2]), ids, values, offs, "nothing of the batch was cached")
                new = status[_STATUS:]
                self._check_room(new)
                ws.reset(_STATUS, s)
                self._write(ids, keys, values, offs, ws.status, insert=True, stream=s)
                flagged = int(ws.read(_STATUS, s)[1])  # st_write finds no unstorable row st_count_new passed
            self._n_rows += new
            self._check_flag(flagged, ids, offs, values.shape[0], "cache values")

    def dump_sets(self, start_set: int, end_set: int, stream: Any = None) -> tuple[Any, Any]:
        """(table_ids, keys) of tables [start_set, end_set) (a static table is one set)."""
        cp = self._cp
        lo, hi = max(0, int(start_set)), min(self.tables, int(end_set))
        with self._writing(stream) as s:
            held = int(self._n_rows[lo:hi].sum()) if lo < hi else 0
            if held == 0:
                return cp.empty(0, np.int64), cp.empty(0, self.key_dtype)
            keys = cp.empty(held, self.key_dtype)
            tables = cp.empty(held, np.int64)
            first, last = int(self._slot_base[lo]), int(self._slot_base[hi])
            with self._workspace() as ws:
                ws.reset(_STATUS, s)
                args = (self._slot_keys, self._slot_rows, self._slot_base_d, np.int32(self.tables), np.int64(first),
                        np.int64(last), keys, tables, ws.status)
                self._launch(self._kernels.no_vec["st_dump"], -(-(last - first) // 32), args, s)
                count = int(ws.read(1, s)[0])
            return tables[:count], keys[:count]

    def sets_of(self, table_ids: Any, keys: Any) -> Any:
        """(n,) int64 CuPy: a key's set is its table."""
        with self._on(None):
            ids, _ = self._keys_and_ids(table_ids, keys)
            return ids.copy()

    def clear(self, table: int | None = None, stream: Any = None) -> None:
        """Empty every table (or one) and wait for the kernel, under the writers' lock. A
        query overlapping it may find a cleared key or not (see docs/cache.md)."""
        if table is not None and not 0 <= table < self.tables:
            raise RequestError(f"table {table} is outside the cache's {self.tables} tables")
        lo, hi = (0, self.tables) if table is None else (table, table + 1)
        with self._writing(stream) as s:
            self._clear_tables(lo, hi, s)

    def _clear_tables(self, lo: int, hi: int, stream: Any) -> None:
        row_base = self._row_base
        first, last = int(self._slot_base[lo]), int(self._slot_base[hi])
        args = (self._slot_rows, self._row_ver, self._row_count, np.int64(first), np.int64(last),
                np.int64(row_base[lo]), np.int64(row_base[hi]), np.int32(lo), np.int32(hi))
        self._launch(self._kernels.no_vec["st_clear"], -(-(last - first) // 32), args, stream)
        stream.synchronize()
        self._n_rows[lo:hi] = 0

    def _repair(self) -> None:
        """Empty every table with st_clear (a slot the dead writer had claimed becomes empty,
        every row gets a new version), wait :data:`_REPAIR_GRACE_S` for queries that probed a
        slot before the clear to finish, then make even the version of a row it was writing
        (odd: no writer could take it) — its contents may be torn, but no slot leads to it."""
        with self._on(None) as s:
            self._clear_tables(0, self.tables, s)
            time.sleep(_REPAIR_GRACE_S)
            ver = self._row_ver
            ver += ver & 1
            s.synchronize()

    def sizes(self, stream: Any = None) -> npt.NDArray[np.int64]:
        return self._n_rows.copy()

    def _query_state(self) -> tuple[Any, ...]:
        return (self._dims_d, self._codes_d, self._strides_d, self._slot_base_d, self._slot_mask_d, self._value_base_d,
                self._row_base_d, np.int32(self.tables), self._slot_keys, self._slot_rows, self._row_keys,
                self._row_ver, self._values)

    def _scratch(self, n: int, stream: Any) -> int:
        """Empty the first 2^k >= 2n entries of the de-duplication scratch (growing it
        geometrically when too small); returns their mask. Caller holds the lock."""
        size = 1 << max(4, (2 * n - 1).bit_length())
        if self._scratch_tables.shape[0] < size:
            grown = max(size, 2 * self._scratch_tables.shape[0])
            self._scratch_tables = self._cp.empty(grown, self._cp.int32)
            self._scratch_keys = self._cp.empty(grown, self.key_dtype)
        self._cp.cuda.runtime.memsetAsync(self._scratch_tables.data.ptr, 0xFF, 4 * size, stream.ptr)  # all -1
        return size - 1

    def _check_room(self, new: npt.NDArray[np.int64]) -> None:
        """Refuse the whole batch, before writing anything, if a table's new keys do not fit."""
        check_room(self._n_rows, self.capacities, new)

    def _write(self, ids: Any, keys: Any, values: Any, offs: Any, status: Any, *, insert: bool, stream: Any) -> None:
        n = keys.shape[0]
        vec, _ = _kernels.vector_shape(self.dims, values.data.ptr)
        args = (ids, keys, np.int64(n), values, offs, np.int64(values.shape[0]), status, self._dims_d, self._codes_d,
                self._strides_d, self._slot_base_d, self._slot_mask_d, self._value_base_d, self._row_base_d,
                self._capacities_d, np.int32(self.tables), self._slot_keys, self._slot_rows, self._row_keys,
                self._row_ver, self._values, self._row_count, np.int32(insert))
        self._launch(self._kernels.by_vec[vec]["st_write"], n, args, stream)


# --------------------------------------------------------------------------- one table


class GpuEmbeddingCache(TableView):
    """A one-table dynamic GPU cache: :class:`GpuDynamicCache` behind the single-table contract."""

    def __init__(self, capacity: int, dim: int, *, device: int = 0, policy: CachePolicy | str = CachePolicy.LRU,
                 row_format: RowFormat = RowFormat.FP32, key_dtype: Any = np.int64) -> None:
        super().__init__(GpuDynamicCache([capacity], [dim], device=device, policy=policy, row_formats=[row_format],
                                         key_dtype=key_dtype), 0)


class StaticEmbeddingTable(TableView):
    """A one-table static GPU table: :class:`GpuStaticCache` behind the single-table contract."""

    def __init__(self, capacity: int, dim: int, *, device: int = 0, policy: CachePolicy | str = CachePolicy.LRU,
                 row_format: RowFormat = RowFormat.FP32, key_dtype: Any = np.int64) -> None:
        super().__init__(GpuStaticCache([capacity], [dim], device=device, policy=policy, row_formats=[row_format],
                                        key_dtype=key_dtype), 0)
