"""The embedding-cache contracts shared by the GPU caches and their CPU twins.

The caches of a model's tables live in ONE structure, a :class:`MultiTableCache`: ``T``
tables, each with its own capacity and vector width, answered together by one call (one
kernel launch on the GPU) whatever the table count. Its calls take keys of several tables
in the flat-row layout of :mod:`hps_core.rows` (``table_ids``, ``keys``, a flat float32
buffer, per-key float ``offsets``). :class:`TableView` presents one of its tables behind the
single-table :class:`EmbeddingCache` contract, which the update stream, the tools and the
tests use; a one-table cache (``make_cache``) is such a view.

Each table maps ``key -> vector`` with a fixed capacity in rows, stored in the table's row
format (:mod:`hps_core.row_formats`: fp32, fp16, fp8, int8; ``row_formats[t]``). Writes
take float32 rows and quantise them; queries dequantise into the caller's float32 ``out``,
so a query returns exactly ``unpack(pack(row))`` of the row last written, bit for bit, on
the GPU (kernels/row_formats.cuh) as on the CPU twins (row_formats.encode_row/decode_row).
Two kinds exist, as in HugeCTR (``embedding_cache_type``):

* **dynamic** — set-associative (table t owns ``num_sets[t]`` sets of :data:`WAYS` slots,
  global sets ``set_base[t] ..``; a key lives in set ``set_base[t] + mix64(key) %
  num_sets[t]``); inserting into a full set evicts one slot per the policy (``lru``: oldest
  access; ``lfu``: fewest accesses, ties by age; a slot's count saturates at 2**32 - 2**16
  rather than wrapping).
* **static** — the whole table resident: open addressing key -> row, no eviction; an
  insert that would exceed a table's capacity raises :class:`CacheFullError` before writing.

Array conventions (every implementation, every call)::

    keys     (n,)        int64 or uint32, host (NumPy) for CPU caches, device (CuPy) for GPU
                         ones (host arrays are accepted and copied over); a uint32 cache
                         refuses keys outside [0, 2**32) with RequestError
    values   (n, dim)    float32, same array module; stored in the table's row format
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

A row its table's format cannot store (a NaN or infinity in a compact format, a float16
value beyond ±65504, an int8 row whose range overflows float32) is never written, and the
batch holding it is refused whole: ``replace`` and ``update`` raise RowValueError naming the
first such position before writing any row of the batch (every slot and row of the cache is
left as it was, an already cached key keeps its old row), on every implementation and
whether the arrays are on the host or the device. The CPU twins, and the GPU caches given
host arrays, check on the host; on device arrays the GPU caches run a check pass over the
batch on the device first (kernels/row_formats.cuh, the writers' own check) and read its
verdict back, unless every table is fp32 (fp32 stores any row, NaN and infinities
included, as HugeCTR does). The tiers refuse such rows first, so the lookup never hands one
over.

Errors (all from :mod:`hps_core.errors`)::

    HPSError
     ├── ConfigError     bad constructor argument (dim, capacity, policy, format, dtype, device)
     ├── RequestError    bad call argument (dtype, shape, key out of uint32 range)
     │    └── RowValueError  a row its table's format cannot store
     └── CacheFullError  a static table has no room for the new keys of a replace
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numba import njit

from hps_core.arrays import array_module, device_context
from hps_core.config import CacheKind, CachePolicy
from hps_core.errors import CacheFullError, ConfigError, RequestError, RowValueError
from hps_core.row_formats import RowFormat, format_codes
from hps_core.row_codecs import first_unstorable, unstorable_reason

__all__ = [
    "AccessClock",
    "CacheLayout",
    "EmbeddingCache",
    "MultiTableCache",
    "TableView",
    "KEY_DTYPES",
    "TABLE_ALIGN",
    "WAYS",
    "capacity_for_bytes",
    "check_batch",
    "check_cache_args",
    "check_room",
    "check_multi_cache_args",
    "check_storable",
    "check_table_rows",
    "normalize_keys",
    "row_stride",
]

#: Slots per set of a dynamic cache: one warp's lanes probe one set in one step.
WAYS = 32
KEY_DTYPES = (np.dtype(np.int64), np.dtype(np.uint32))

Array = Any  # numpy.ndarray on CPU caches, cupy.ndarray on GPU caches
#: Every table's stored rows start at a multiple of this many bytes of the value store (a
#: float4 of an fp32 row is one aligned 16-byte load).
TABLE_ALIGN = 16


@runtime_checkable
class EmbeddingCache(Protocol):
    """Batched, fixed-capacity ``key -> vector`` cache of one table.

    Attributes: ``dim`` (vector width), ``capacity`` (rows it can hold; dynamic caches
    round the request up to whole sets), ``row_format`` (how rows are stored:
    :class:`~hps_core.row_formats.RowFormat`; inputs and outputs are float32 whatever it
    is), ``key_dtype`` (int64 or uint32), ``num_sets`` (dynamic; 1 for static tables),
    ``kind`` (:class:`~hps_core.config.CacheKind`) and ``device`` (``"cpu"`` or a CUDA ordinal).
    """

    dim: int
    capacity: int
    row_format: RowFormat
    key_dtype: np.dtype[np.integer[Any]]  # int64 or uint32
    num_sets: int
    kind: CacheKind

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
        not fit. A row the format cannot store: RowValueError, writing nothing.
        """
        ...

    def update(self, keys: Array, values: Array, stream: Any = None) -> int:
        """Overwrite the keys already cached; never inserts. Returns the number of batch
        positions whose key was cached (a duplicated key counts once per occurrence). A row
        the format cannot store: RowValueError, writing nothing."""
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


@runtime_checkable
class MultiTableCache(Protocol):
    """The embedding caches of several tables in one structure (a model's tables, in order).

    Attributes: ``kind``, ``device``, ``key_dtype``, ``policy`` as for
    :class:`EmbeddingCache`; ``row_formats``, a tuple of each table's
    :class:`~hps_core.row_formats.RowFormat`; per table, host int64 arrays of length ``T``:
    ``dims``, ``capacities`` (rows; dynamic tables round up to whole sets), ``num_sets`` (1
    for static tables) and ``set_base`` (first global set of each table); ``total_sets``.

    Arrays of the calls (the layout of :mod:`hps_core.rows`), in the cache's memory (host
    arrays are accepted and copied over)::

        table_ids (n,) int64      index of each key's table, in [0, T)
        keys      (n,) int64 or the key dtype
        out/values (m,) float32   flat rows; row i at [offsets[i], offsets[i] + dims[table_ids[i]])
        offsets   (n,) int64

    Same semantics per table as :class:`EmbeddingCache` (misses leave ``out`` untouched, a
    hit counts as an access, duplicates in a write keep one of their vectors, concurrency
    guarantees). GPU calls take ``stream`` last.
    """

    kind: CacheKind
    row_formats: tuple[RowFormat, ...]
    key_dtype: np.dtype[np.integer[Any]]  # int64 or uint32
    policy: CachePolicy
    dims: Any
    capacities: Any
    num_sets: Any
    set_base: Any
    total_sets: int

    @property
    def device(self) -> str | int:
        ...

    def query_tables(self, table_ids: Array, keys: Array, out: Array, offsets: Array, stream: Any = None) -> Array:
        """Write the row of every cached key into ``out``; returns the batch positions of the
        keys not cached, ``(m,) int64`` in the cache's memory (ascending on CPU)."""
        ...

    def replace_tables(self, table_ids: Array, keys: Array, values: Array, offsets: Array,
                       stream: Any = None) -> None:
        """Insert or overwrite each key's row (read from ``values`` at ``offsets``); dynamic
        tables evict, a static table without room raises CacheFullError, a row its table's
        format cannot store RowValueError (either way nothing written)."""
        ...

    def update_tables(self, table_ids: Array, keys: Array, values: Array, offsets: Array,
                      stream: Any = None) -> int:
        """Overwrite the keys already cached; never inserts. Returns the batch positions whose
        key was cached. A row its table's format cannot store: RowValueError, nothing written."""
        ...

    def dump_sets(self, start_set: int, end_set: int, stream: Any = None) -> tuple[Array, Array]:
        """``(table_ids, keys)`` of the keys held in global sets ``[start_set, end_set)`` (a
        static table is one set); order unspecified."""
        ...

    def sets_of(self, table_ids: Array, keys: Array) -> Array:
        """(n,) int64 global set of each key."""
        ...

    def copy_rows(self, src: Array, src_offsets: Array, dst: Array, dst_offsets: Array, table_ids: Array,
                  stream: Any = None) -> None:
        """Copy flat rows between two buffers in the cache's memory (widths from ``dims``)."""
        ...

    def clear(self, table: int | None = None, stream: Any = None) -> None:
        """Remove every key (of one table, or of all)."""
        ...

    def sizes(self, stream: Any = None) -> Any:
        """(T,) int64 host: keys cached per table."""
        ...


class TableView:
    """Table ``table`` of a :class:`MultiTableCache`, behind the :class:`EmbeddingCache` contract."""

    def __init__(self, cache: MultiTableCache, table: int) -> None:
        if not 0 <= table < len(cache.dims):
            raise ConfigError(f"table index {table} is outside the cache's {len(cache.dims)} tables")
        self.multi = cache
        self.table = int(table)
        self.dim = int(cache.dims[table])
        self.capacity = int(cache.capacities[table])
        self.num_sets = int(cache.num_sets[table])
        self.kind = cache.kind
        self.policy = cache.policy
        self.row_format = cache.row_formats[table]
        self.key_dtype = cache.key_dtype
        self._set_base = int(cache.set_base[table])
        self._xp = array_module(cache)

    @property
    def device(self) -> str | int:
        return self.multi.device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(table {self.table} of {self.multi!r})"

    def query(self, keys: Array, out: Array, stream: Any = None) -> tuple[Array, Array]:
        keys, ids, offsets = self._batch(keys, out, "out")
        missing = self.multi.query_tables(ids, keys, out.reshape(-1), offsets, stream)
        return keys[missing], missing

    def replace(self, keys: Array, values: Array, stream: Any = None) -> None:
        keys, ids, offsets = self._batch(keys, values, "values")
        self.multi.replace_tables(ids, keys, self._xp.ascontiguousarray(values).reshape(-1), offsets, stream)

    def update(self, keys: Array, values: Array, stream: Any = None) -> int:
        keys, ids, offsets = self._batch(keys, values, "values")
        return self.multi.update_tables(ids, keys, self._xp.ascontiguousarray(values).reshape(-1), offsets, stream)

    def dump(self, start_set: int, end_set: int, stream: Any = None) -> Array:
        lo, hi = max(0, int(start_set)), min(self.num_sets, int(end_set))
        if lo >= hi:
            return self._xp.empty(0, self.key_dtype)
        return self.multi.dump_sets(self._set_base + lo, self._set_base + hi, stream)[1]

    def set_of(self, keys: Array) -> Array:
        keys = self._keys(keys)
        ids = self._xp.full(keys.shape[0], self.table, np.int64)
        return self.multi.sets_of(ids, keys) - self._set_base

    def clear(self, stream: Any = None) -> None:
        self.multi.clear(self.table, stream)

    def size(self, stream: Any = None) -> int:
        return int(self.multi.sizes(stream)[self.table])

    def _keys(self, keys: Array) -> Array:
        xp = self._xp
        if not isinstance(keys, (np.ndarray, xp.ndarray)):
            raise RequestError(f"keys must be a numpy or {xp.__name__} array, got {type(keys).__name__}")
        with self._on_device():
            return normalize_keys(xp, xp.asarray(keys), self.key_dtype)

    def _batch(self, keys: Array, rows: Array, name: str) -> tuple[Array, Array, Array]:
        xp = self._xp
        with self._on_device():  # the ids and offsets are made where the cache works
            keys = self._keys(keys)
            if not isinstance(rows, xp.ndarray):
                if name == "out":
                    raise RequestError(f"out must be a {xp.__name__} array in the cache's memory (hits are written in place)")
                rows = xp.asarray(rows)
            check_batch(xp, keys, rows, self.dim, name)
            n = keys.shape[0]
            return keys, xp.full(n, self.table, np.int64), xp.arange(0, n * self.dim, self.dim, dtype=np.int64)

    def _on_device(self) -> Any:
        return device_context(self.multi)


# --------------------------------------------------------------------------- helpers


def row_stride(row_format: RowFormat, dim: int) -> int:
    """Bytes one ``dim``-wide row of ``row_format`` takes in a cache's value store: its packed
    size (:meth:`RowFormat.row_bytes`), fp8 and int8 rounded up to a multiple of 4 so their
    float32 header, and the 1, 2 or 4-byte element groups the GPU kernels move, stay
    aligned. fp32 and fp16 rows are stored unpadded (their width is a multiple of every
    group the dim allows)."""
    packed = row_format.row_bytes(dim)
    return -(-packed // 4) * 4 if row_format.header_bytes else packed


def capacity_for_bytes(nbytes: int, dim: int, row_format: RowFormat | str = RowFormat.FP32) -> int:
    """Rows of ``dim``-wide vectors whose values fit in ``nbytes`` of a cache's value store,
    stored as ``row_format`` (:func:`row_stride` bytes each: fp16 gives twice the rows of
    fp32, int8 at dim 128 almost four times). Slot metadata (keys, versions, LRU stamps) is
    not counted."""
    return max(0, int(nbytes) // row_stride(RowFormat(row_format), int(dim)))


def check_cache_args(
    kind: CacheKind | str, capacity: object, dim: object, policy: CachePolicy | str, row_format: object,
    key_dtype: Any
) -> tuple[int, int, RowFormat, np.dtype[Any]]:
    """Validate constructor arguments common to every cache; returns normalised
    ``(capacity, dim, row_format, key_dtype)`` or raises ConfigError naming the argument.
    ``row_format`` is a :class:`RowFormat` or its name (``"int8"``)."""
    CacheKind.parse(kind, "cache kind")
    CachePolicy.parse(policy, "cache policy")
    try:
        kdt = np.dtype(key_dtype)
    except TypeError as exc:
        raise ConfigError(f"cache key_dtype not understood: {key_dtype!r}") from exc
    if kdt not in KEY_DTYPES:
        raise ConfigError(f"cache key_dtype must be int64 or uint32, got {kdt}")
    fmt = row_format if isinstance(row_format, RowFormat) else RowFormat.parse(row_format, "cache row_format")
    return _positive_int("capacity", capacity), _positive_int("dim", dim), fmt, kdt


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


@dataclass(frozen=True)
class CacheLayout:
    """Where each table of a multi-table cache lives, worked out once from its capacities,
    widths and row formats (host int64 arrays of length T); the CPU twins and the GPU caches
    share it.

    Dynamic: table t owns ``num_sets[t]`` sets of :data:`WAYS` slots from global set
    ``set_base[t]``. Static: table t owns a power-of-two region of ``slot_base[t+1] -
    slot_base[t]`` slots (≥ 2 × capacity, at least 16) and counts as one set. Either way its
    rows are packed in its format (``codes[t]``, :func:`~hps_core.row_formats.format_codes`)
    in one byte-addressed value store: row r (dynamic: slot ``(s - set_base[t]) * WAYS + w``)
    at byte ``value_base[t] + r * strides[t]`` (:func:`row_stride`), every ``value_base``
    a multiple of :data:`TABLE_ALIGN`.
    """

    dims: Any
    capacities: Any
    num_sets: Any
    set_base: Any
    codes: Any
    strides: Any
    value_base: Any
    value_bytes: int  # size of the value store
    slot_base: Any  # (T + 1,) static only (empty for dynamic caches)

    @property
    def row_base(self) -> Any:
        """(T + 1,) int64 first row of each table when their rows follow one another."""
        return np.concatenate([[0], np.cumsum(self.capacities)]).astype(np.int64)

    @property
    def total_sets(self) -> int:
        return int(self.num_sets.sum())

    @classmethod
    def dynamic(cls, requested: Any, dims: Any, formats: Sequence[RowFormat]) -> CacheLayout:
        num_sets = -(-requested // WAYS)
        capacities = num_sets * WAYS
        return cls._build(dims, capacities, num_sets, _starts(num_sets), formats, np.zeros(0, np.int64))

    @classmethod
    def static(cls, requested: Any, dims: Any, formats: Sequence[RowFormat]) -> CacheLayout:
        tables = requested.shape[0]
        slots = np.array([1 << max(4, (2 * int(c) - 1).bit_length()) for c in requested], np.int64)
        slot_base = np.concatenate([[0], np.cumsum(slots)]).astype(np.int64)
        return cls._build(dims, requested, np.ones(tables, np.int64), np.arange(tables, dtype=np.int64), formats,
                          slot_base)

    @classmethod
    def _build(cls, dims: Any, capacities: Any, num_sets: Any, set_base: Any, formats: Sequence[RowFormat],
               slot_base: Any) -> CacheLayout:
        strides = np.array([row_stride(f, int(d)) for f, d in zip(formats, dims)], np.int64)
        region = -(-(capacities * strides) // TABLE_ALIGN) * TABLE_ALIGN
        return cls(dims, capacities, num_sets, set_base, format_codes(formats), strides, _starts(region),
                   int(region.sum()), slot_base)


class AccessClock:
    """The dynamic caches' LRU clock: one tick per call, stamped on the slots a call touches.

    Stamps are 64-bit on both twins, so the clock cannot wrap in service (2**63 ticks); a
    32-bit one wrapped after 2**32 calls, days at production rates, after which eviction
    picked the wrong victims. ``start`` (default 1; 0 marks a slot never stamped) lets a test
    begin next to 2**32 and check the order holds across it.
    """

    def __init__(self, start: int = 1) -> None:
        if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start < 2**62:
            raise ConfigError(f"cache clock_start must be an int in [1, 2**62), got {start!r}")
        self._ticks = itertools.count(start)

    def tick(self) -> int:
        """The next stamp; atomic under the GIL, so concurrent calls get distinct ones."""
        return next(self._ticks)


def _starts(sizes: Any) -> Any:
    """(T,) int64 start of each table's range when ranges of ``sizes`` follow one another."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def check_room(held: Any, capacities: Any, new: Any) -> None:
    """Refuse a static replace whose new keys (``new`` (T,) distinct keys per table) do not fit
    beside the ``held`` rows: CacheFullError naming every table without room."""
    over = np.flatnonzero(held + new > capacities)
    if over.size:
        t = int(over[0])
        raise CacheFullError(
            f"static embedding table {t} is full: it holds {int(held[t])} of {int(capacities[t])} rows "
            f"and the batch brings {int(new[t])} new keys ({over.size} table(s) without room: "
            f"{over.tolist()}); size the table for the whole model (static tables never evict) or use "
            "a dynamic cache",
            over.tolist(),
        )


def check_multi_cache_args(
    kind: CacheKind | str, capacities: Sequence[object], dims: Sequence[object], policy: CachePolicy | str,
    row_formats: Sequence[object] | None, key_dtype: Any
) -> tuple[Any, Any, tuple[RowFormat, ...], np.dtype[Any]]:
    """:func:`check_cache_args` for every table: returns ``(capacities (T,) int64, dims (T,)
    int64, row_formats (one per table; None means all fp32), key_dtype)``; ConfigError names
    the table of a bad value."""
    if len(capacities) != len(dims) or len(dims) == 0:
        raise ConfigError(f"a multi-table cache needs one capacity per table, got {len(capacities)} for {len(dims)}")
    formats: Sequence[object] = [RowFormat.FP32] * len(dims) if row_formats is None else row_formats
    if isinstance(formats, (str, RowFormat)) or len(formats) != len(dims):
        raise ConfigError(f"a multi-table cache needs one row format per table ({len(dims)}), got {formats!r}")
    checked = []
    for t, (capacity, dim, fmt) in enumerate(zip(capacities, dims, formats)):
        try:
            checked.append(check_cache_args(kind, capacity, dim, policy, fmt, key_dtype))
        except ConfigError as exc:
            raise ConfigError(f"table {t}: {exc}") from exc
    caps = np.array([c[0] for c in checked], np.int64)
    widths = np.array([c[1] for c in checked], np.int64)
    return caps, widths, tuple(c[2] for c in checked), checked[0][3]


@njit(nogil=True, cache=True)
def _first_unstorable_row(table_ids: Any, values: Any, offsets: Any, dims: Any, codes: Any) -> int:
    for i in range(table_ids.shape[0]):
        t = table_ids[i]
        if unstorable_reason(values, offsets[i], dims[t], codes[t]):
            return i
    return -1


def check_storable(table_ids: Any, values: Any, offsets: Any, dims: Any, codes: Any, row_formats: Sequence[RowFormat],
                   what: str, outcome: str = "nothing of the batch was cached") -> None:
    """Refuse a write (host arrays, bounds already checked) holding a row its table's format
    cannot store: RowValueError naming the first and the reason, as
    :func:`~hps_core.row_formats.pack` does; ``outcome`` says what became of the batch.
    ``codes`` are the cache's per-table format codes (:attr:`CacheLayout.codes`, worked out
    once: this runs on every write, the lookup's miss fill included)."""
    if not codes.any():
        return  # float32 tables store any row
    bad = _first_unstorable_row(table_ids, values, offsets, dims, codes)
    if bad < 0:
        return
    t = int(table_ids[bad])
    row = np.asarray(values[int(offsets[bad]) : int(offsets[bad]) + int(dims[t])], np.float32)
    reason = first_unstorable(row_formats[t], row[None, :])[1]
    raise RowValueError(
        f"{what}: position {bad} (table {t}) holds {reason}, which the {row_formats[t]} row format cannot store "
        f"(row: {row[:8].tolist()}{'...' if row.shape[0] > 8 else ''}); {outcome}",
        position=int(bad),
    )


def check_table_rows(xp: Any, table_ids: Any, keys: Any, buffer: Any, offsets: Any, name: str) -> None:
    """Shapes and dtypes of a multi-table call's arrays (bounds are the caller's: see
    :func:`hps_core.rows.check_rows_fit`)."""
    n = keys.shape[0]
    if keys.ndim != 1 or table_ids.ndim != 1 or offsets.ndim != 1:
        raise RequestError("keys, table_ids and offsets must be 1-D")
    if table_ids.shape[0] != n or offsets.shape[0] != n:
        raise RequestError(f"{n} keys need {n} table ids and offsets, got {table_ids.shape[0]} and {offsets.shape[0]}")
    if table_ids.dtype != np.int64 or offsets.dtype != np.int64:
        raise RequestError(f"table_ids and offsets must be int64, got {table_ids.dtype} and {offsets.dtype}")
    if buffer.dtype != np.float32 or buffer.ndim != 1 or not buffer.flags.c_contiguous:
        raise RequestError(f"{name} must be a 1-D C-contiguous float32 array (flat rows), got {buffer.dtype} {buffer.shape}")


def normalize_keys(xp: Any, keys: Any, key_dtype: np.dtype[np.integer[Any]]) -> Any:
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
