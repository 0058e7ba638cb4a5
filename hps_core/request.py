"""Requests in HugeCTR's interface, checked, then planned as ONE lookup over all their tables.

A HugeCTR HPS request is ``KEYS`` (every key of every table, table-major) and ``NUMKEYS``
(keys per table), optionally with a leading batch dimension whose rows are requests of their
own. Triton hands the backend several such requests per ``execute`` (dynamic batching).

:func:`check_request` checks one request against its model, vectorised over its rows: a bad
request fails alone with a :class:`~hps_core.errors.RequestError` that names the problem.

:func:`plan_batch` then turns every good request of the batch into one :class:`BatchPlan`: the
(table, key) pairs of all rows and tables de-duplicated in one numba pass (a hash set over the
pairs, first occurrence order), each unique pair given a row in one flat buffer (the layout of
:mod:`hps_core.rows`), and for every requested key the unique row it copies from and the place
in the concatenated outputs it copies to. The lookup asks each level once for the unique pairs
it still lacks, then one :func:`~hps_core.rows.copy_rows` writes every request's output.

:func:`answer_each` is how a batch's requests stay independent when that one pass fails: each
is then answered alone, so only the culprit gets the error (the lookup and both backends).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from numba import njit

from hps_core.arrays import Int64s
from hps_core.config import ModelConfig
from hps_core.errors import RequestError
from hps_core.hashing import mix64

__all__ = ["BatchPlan", "CheckedRequest", "TableLayout", "answer_each", "check_request", "plan_batch"]

_INTEGER_KINDS = ("i", "u")

@dataclass(frozen=True)
class TableLayout:
    """A model's tables as the arrays a lookup needs, built once when the model loads."""

    model: str
    names: tuple[str, ...]  # table names of the config (counters, metrics)
    qualified_names: tuple[str, ...]  # hps_et.<model>.<table>: the tiers' names
    dims: Int64s  # (T,) vector width per table
    defaults: npt.NDArray[np.float32]  # (T,) default_value_for_each_table
    max_keys: Int64s  # (T,) max_batch_size x maxnum_catfeature_query_per_table_per_sample
    max_batch_size: int
    max_keys_per_sample: tuple[int, ...]

    @classmethod
    def of(cls, model: ModelConfig) -> TableLayout:
        tables = model.tables
        per_sample = tuple(t.max_keys_per_sample for t in tables)
        return cls(
            model=model.model,
            names=tuple(t.name for t in tables),
            qualified_names=tuple(t.qualified_name for t in tables),
            dims=np.array([t.dim for t in tables], np.int64),
            defaults=np.array([t.default_value for t in tables], np.float32),
            max_keys=np.array([model.max_batch_size * k for k in per_sample], np.int64),
            max_batch_size=model.max_batch_size,
            max_keys_per_sample=per_sample,
        )

    @property
    def count(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class CheckedRequest:
    """One request that passed :func:`check_request`: ``rows`` HugeCTR requests of ``n`` keys.

    ``keys`` (rows, n) int64 and ``counts`` (rows, T) int64, host, C-contiguous; ``batched``
    says whether it came with a leading batch dimension (its output gets one too).
    """

    keys: Int64s
    counts: Int64s
    batched: bool

    @property
    def rows(self) -> int:
        return int(self.keys.shape[0])


def check_request(keys: npt.NDArray[Any], numkeys: npt.NDArray[Any], layout: TableLayout) -> CheckedRequest:
    """Check ``KEYS`` (n,) or (rows, n) and ``NUMKEYS`` (T,) or (rows, T) against ``layout``.

    Raises RequestError naming the input and the problem. Vectorised over the rows.
    """
    batched = keys.ndim == 2 or numkeys.ndim == 2
    if batched and (keys.ndim != 2 or numkeys.ndim != 2 or keys.shape[0] != numkeys.shape[0]):
        if numkeys.ndim == 2 and keys.ndim == 1:
            raise _numkeys_error(numkeys)
        if keys.ndim == 2 and numkeys.ndim == 1:
            raise _keys_shape_error(keys)
        raise RequestError(
            f"KEYS {keys.shape} and NUMKEYS {numkeys.shape} must both be 1-D, "
            "or both 2-D with the same number of rows"
        )
    if keys.ndim > 2:
        raise _keys_shape_error(keys)
    if batched and keys.shape[0] == 0:
        raise RequestError("the request holds no rows: KEYS has batch size 0")
    keys2 = _as_key_array(keys.reshape(1, -1) if keys.ndim == 1 else keys)
    counts = _counts(numkeys.reshape(1, -1) if numkeys.ndim == 1 else numkeys, layout)
    problem, row, table = _first_bad_count(counts, keys2.shape[1], layout.max_keys, layout.dims)
    if problem:
        raise RequestError(_count_problem(problem, counts, row, table, keys2.shape[1], layout))
    return CheckedRequest(keys2, counts, batched)


def _keys_shape_error(keys: npt.NDArray[Any]) -> RequestError:
    return RequestError(f"KEYS must be 1-D after the batch dimension, got shape {keys.shape}")


def _numkeys_error(numkeys: npt.NDArray[Any]) -> RequestError:
    return RequestError(f"NUMKEYS must be a 1-D integer tensor, got shape {numkeys.shape} dtype {numkeys.dtype}")


def _as_key_array(keys: npt.NDArray[Any]) -> Int64s:
    if keys.dtype.kind not in _INTEGER_KINDS:
        raise RequestError(f"KEYS must hold integers (INT64 or UINT32), got dtype {keys.dtype}")
    if keys.dtype == np.uint64 and keys.size and int(keys.max()) > np.iinfo(np.int64).max:
        raise RequestError("KEYS holds an unsigned key above the int64 range")
    return np.ascontiguousarray(keys, dtype=np.int64)


def _counts(numkeys: npt.NDArray[Any], layout: TableLayout) -> Int64s:
    if numkeys.dtype.kind not in _INTEGER_KINDS:
        raise _numkeys_error(numkeys)
    if numkeys.shape[1] != layout.count:
        raise RequestError(
            f"NUMKEYS has {numkeys.shape[1]} entries but model '{layout.model}' has {layout.count} tables "
            f"({', '.join(layout.names)}): send one count per table"
        )
    return np.ascontiguousarray(numkeys, dtype=np.int64)


_NEGATIVE, _WRONG_SUM, _EMPTY, _TOO_MANY, _UNEVEN_ROWS = 1, 2, 3, 4, 5


@njit(nogil=True, cache=True)
def _first_bad_count(counts: Any, n: int, max_keys: Any, dims: Any) -> tuple[int, int, int]:
    """(problem, row, table) of the first count that breaks a rule, problem 0 when none:
    negative; rows not summing to the ``n`` keys; no keys; above ``max_keys``; rows whose
    outputs differ in size (a batched tensor must be rectangular)."""
    rows, tables = counts.shape
    first_size = 0
    for r in range(rows):
        total = 0
        size = 0
        for t in range(tables):
            c = counts[r, t]
            if c < 0:
                return _NEGATIVE, r, t
            if c > max_keys[t]:
                return _TOO_MANY, r, t
            total += c
            size += c * dims[t]
        if total != n:
            return _WRONG_SUM, r, 0
        if r == 0:
            first_size = size
        elif size != first_size:
            return _UNEVEN_ROWS, r, 0
    if n == 0:
        return _EMPTY, 0, 0
    return 0, 0, 0


def _count_problem(problem: int, counts: Int64s, row: int, i: int, n: int, layout: TableLayout) -> str:
    """The message for a problem :func:`_first_bad_count` found."""
    if problem == _NEGATIVE:
        return f"NUMKEYS holds a negative count: {counts[row].tolist()}"
    if problem == _WRONG_SUM:
        return (f"NUMKEYS sums to {int(counts[row].sum())} but KEYS holds {n} keys: "
                "the counts per table must add up to the number of keys")
    if problem == _EMPTY:
        return "the request holds no keys: KEYS is empty"
    if problem == _TOO_MANY:
        return (f"table '{layout.names[i]}' got {int(counts[row, i])} keys, more than max_batch_size "
                f"({layout.max_batch_size}) x maxnum_catfeature_query_per_table_per_sample "
                f"({layout.max_keys_per_sample[i]}) = {int(layout.max_keys[i])} allows; split the request")
    return "the rows of a batched request give vectors of different total sizes"


@dataclass(frozen=True)
class BatchPlan:
    """Every key of a batch of requests, planned as one lookup (host arrays).

    Unique (table, key) pairs, ``U`` of them, each with a row (the layout of
    :mod:`hps_core.rows`) in the outputs::

        table_ids (U,) int64   keys (U,) int64   offsets (U,) int64

    Every requested key, ``N`` of them (requests in order, rows in order, table-major):
    ``sources`` (N,) int64, the offset of its unique row. ``counts`` (rows, T) are the rows'
    keys per table, so the outputs are laid out one row after another, table-major
    (``output_size`` floats); ``bounds`` (requests + 1,) float offsets of each request's
    output; ``key_counts`` / ``unique_counts`` (T,) keys and unique keys per table.

    The unique rows live IN the outputs: a pair's row is the output row of its first
    occurrence, so the levels write each unique row straight to
    where it is answered, and :meth:`expand` copies only the repeated occurrences — the
    answer costs one row copy per key, as a plain gather does, not two.
    """

    table_ids: Int64s
    keys: Int64s
    offsets: Int64s
    sources: Int64s
    counts: Int64s
    output_size: int
    bounds: Int64s
    key_counts: Int64s
    unique_counts: Int64s

    @property
    def unique(self) -> int:
        return int(self.keys.shape[0])

    def expand(self, out: npt.NDArray[np.float32], dims: Int64s) -> None:
        """Host: copy the unique rows (in ``out``) to every later occurrence of their pair."""
        _expand(self.sources, self.counts, dims, out)

    def repeats(self, dims: Int64s) -> tuple[Int64s, Int64s, Int64s]:
        """The repeated occurrences as ``(sources, targets, table_ids)``, (R,) int64 each: what
        a device copy (``copy_rows``) needs, where the host's :meth:`expand` walks ``counts``."""
        return _repeats(self.sources, self.counts, dims)  # type: ignore[no-any-return]


def plan_batch(requests: Sequence[CheckedRequest], layout: TableLayout) -> BatchPlan:
    """One :class:`BatchPlan` for ``requests`` (checked against ``layout``), in their order."""
    if len(requests) == 1:
        keys, counts = requests[0].keys.reshape(-1), requests[0].counts
        rows = np.array([requests[0].rows], np.int64)
    else:
        keys = np.concatenate([r.keys.reshape(-1) for r in requests])
        counts = np.concatenate([r.counts for r in requests])
        rows = np.array([r.rows for r in requests], np.int64)
    table_ids, unique_keys, offsets, sources, output_size, bounds, key_counts, unique_counts = _plan(
        keys, counts, layout.dims, rows)
    return BatchPlan(table_ids, unique_keys, offsets, sources, counts, output_size, bounds, key_counts,
                     unique_counts)


@njit(nogil=True, cache=True)
def _plan(keys: Any, counts: Any, dims: Any, request_rows: Any) -> Any:
    """De-duplicate the (table, key) pairs of ``keys`` (rows of ``counts`` keys per table,
    table-major) and give each unique pair a row; returns BatchPlan's fields in order.

    Table by table, with one open-addressing hash set per table over that table's keys of
    every row: a set the size of one table's keys stays in the CPU's caches, where one set
    over all pairs would not (3-4x slower at 100k keys). Unique rows come out grouped by
    table, in first-occurrence order within a table.
    """
    n = keys.shape[0]
    rows, tables = counts.shape
    key_start = np.empty((rows, tables), np.int64)  # where each (row, table) segment starts
    target_start = np.empty((rows, tables), np.int64)  # ... and where its output rows start
    row_end = np.empty(rows, np.int64)  # output floats up to the end of each row
    key_counts = np.zeros(tables, np.int64)
    position = 0
    output = 0
    for r in range(rows):
        for t in range(tables):
            key_start[r, t] = position
            target_start[r, t] = output
            position += counts[r, t]
            output += counts[r, t] * dims[t]
            key_counts[t] += counts[r, t]
        row_end[r] = output
    capacity = 16
    while capacity < 2 * key_counts.max():
        capacity *= 2
    slots = np.empty((capacity, 2), np.int64)  # (key, unique id); id -1 marks a free slot
    table_ids = np.empty(n, np.int64)
    unique_keys = np.empty(n, np.int64)
    offsets = np.empty(n, np.int64)
    sources = np.empty(n, np.int64)
    unique_counts = np.zeros(tables, np.int64)
    unique = 0
    for t in range(tables):
        width = dims[t]
        cap = 16
        while cap < 2 * key_counts[t]:
            cap *= 2
        mask = np.uint64(cap - 1)
        slots[:cap, 1] = -1
        first = unique
        for r in range(rows):
            k0 = key_start[r, t]
            for p in range(k0, k0 + counts[r, t]):
                key = keys[p]
                s = mix64(key) & mask
                while True:
                    uid = slots[s, 1]
                    if uid == -1:
                        uid = unique
                        slots[s, 0] = key
                        slots[s, 1] = uid
                        table_ids[uid] = t
                        unique_keys[uid] = key
                        offsets[uid] = target_start[r, t] + (p - k0) * width
                        unique += 1
                        break
                    if slots[s, 0] == key:
                        break
                    s = (s + np.uint64(1)) & mask
                sources[p] = offsets[uid]
        unique_counts[t] = unique - first
    bounds = np.zeros(request_rows.shape[0] + 1, np.int64)
    row = 0
    for q in range(request_rows.shape[0]):
        row += request_rows[q]
        bounds[q + 1] = row_end[row - 1]
    return (table_ids[:unique], unique_keys[:unique], offsets[:unique], sources, output, bounds,
            key_counts, unique_counts)


@njit(nogil=True, cache=True)
def _expand(sources: Any, counts: Any, dims: Any, out: Any) -> None:
    """Copy each key's unique row (the output row of its pair's first occurrence) to its own
    output row, where the two differ."""
    rows, tables = counts.shape
    p = 0
    o = 0
    for r in range(rows):
        for t in range(tables):
            width = dims[t]
            for _ in range(counts[r, t]):
                s = sources[p]
                if s != o:
                    for j in range(width):
                        out[o + j] = out[s + j]
                o += width
                p += 1


@njit(nogil=True, cache=True)
def _repeats(sources: Any, counts: Any, dims: Any) -> Any:
    rows, tables = counts.shape
    n = sources.shape[0]
    src = np.empty(n, np.int64)
    dst = np.empty(n, np.int64)
    ids = np.empty(n, np.int64)
    m = 0
    p = 0
    o = 0
    for r in range(rows):
        for t in range(tables):
            for _ in range(counts[r, t]):
                if sources[p] != o:
                    src[m] = sources[p]
                    dst[m] = o
                    ids[m] = t
                    m += 1
                o += dims[t]
                p += 1
    return src[:m], dst[:m], ids[:m]


Item = TypeVar("Item")
Result = TypeVar("Result")


def answer_each(
    items: Sequence[Item], answer: Callable[[Sequence[Item]], Sequence[Result]]
) -> list[Result | Exception]:
    """``answer(items)``, one result per item in order; should it raise, each item is answered
    alone (``answer([item])``), and an item whose own answer raises gets its exception."""
    try:
        return list(answer(items))
    except Exception as exc:  # noqa: BLE001 - find the item that causes it
        if len(items) == 1:
            return [exc]
        return [_answer_alone(answer, item) for item in items]


def _answer_alone(answer: Callable[[Sequence[Item]], Sequence[Result]], item: Item) -> Result | Exception:
    try:
        return answer([item])[0]
    except Exception as exc:  # noqa: BLE001 - this item's own answer
        return exc
