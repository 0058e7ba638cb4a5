"""Grouping a batch inside numba kernels: one counting sort, and sets of (table, key) pairs.

:func:`group_by` orders batch positions by a small integer (a hash-map partition, a cache
stripe, a (partition, table) pair), stably, so a kernel takes each lock once per batch and
"the last duplicate wins" still holds inside a group. :func:`first_of_pairs` and
:func:`pairs_in` answer "which (table, key) pairs does this batch
repeat / hold" with one open-addressing set over the pairs, where NumPy would need a sort of a
structured array. Every tier and cache that groups or de-duplicates calls these; there is no
second copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from hps_core.hashing import mix64

__all__ = ["first_of_pairs", "group_by", "pairs_in"]


@njit(nogil=True, cache=True)
def group_by(groups: Any, count: int) -> tuple[Any, Any]:
    """Stable counting sort of batch positions by ``groups`` (n,) int64 in ``[0, count)``.

    Returns ``order`` (n,) and ``starts`` (count + 1,): group g owns
    ``order[starts[g]:starts[g+1]]``, in batch order.
    """
    n = groups.shape[0]
    starts = np.zeros(count + 1, np.int64)
    for i in range(n):
        starts[groups[i] + 1] += 1
    for g in range(count):
        starts[g + 1] += starts[g]
    cursor = starts[:-1].copy()
    order = np.empty(n, np.int64)
    for i in range(n):
        g = groups[i]
        order[cursor[g]] = i
        cursor[g] += 1
    return order, starts


@njit(nogil=True, cache=True, inline="always")
def _pair_slot(table: Any, key: Any, mask: Any) -> Any:
    return (mix64(key) + np.uint64(table)) & mask


@njit(nogil=True, cache=True, inline="always")
def _empty_set(n: int, key_dtype: Any) -> Any:
    """(slot tables, slot keys, mask) of an empty set for ``n`` pairs (load <= 1/2)."""
    capacity = 16
    while capacity < 2 * n:
        capacity *= 2
    return np.full(capacity, -1, np.int64), np.empty(capacity, key_dtype), np.uint64(capacity - 1)


@njit(nogil=True, cache=True, inline="always")
def _add(slot_table: Any, slot_key: Any, mask: Any, table: Any, key: Any) -> bool:
    """Put the pair in the set; True when it was not there yet."""
    s = _pair_slot(table, key, mask)
    while slot_table[s] != -1:
        if slot_table[s] == table and slot_key[s] == key:
            return False
        s = (s + np.uint64(1)) & mask
    slot_table[s] = table
    slot_key[s] = key
    return True


@njit(nogil=True, cache=True)
def first_of_pairs(table_ids: Any, keys: Any) -> Any:
    """(n,) bool: True at the first occurrence of each (table_ids[i], keys[i]) pair."""
    slot_table, slot_key, mask = _empty_set(keys.shape[0], keys.dtype)
    first = np.empty(keys.shape[0], np.bool_)
    for i in range(keys.shape[0]):
        first[i] = _add(slot_table, slot_key, mask, table_ids[i], keys[i])
    return first


@njit(nogil=True, cache=True)
def pairs_in(table_ids: Any, keys: Any, set_table_ids: Any, set_keys: Any) -> Any:
    """(n,) bool: whether each (table_ids[i], keys[i]) is among the pairs of the set arrays."""
    slot_table, slot_key, mask = _empty_set(set_keys.shape[0], np.int64)
    for j in range(set_keys.shape[0]):
        _add(slot_table, slot_key, mask, set_table_ids[j], set_keys[j])
    out = np.zeros(keys.shape[0], np.bool_)
    for i in range(keys.shape[0]):
        t, key = table_ids[i], keys[i]
        s = _pair_slot(t, key, mask)
        while slot_table[s] != -1:
            if slot_table[s] == t and slot_key[s] == key:
                out[i] = True
                break
            s = (s + np.uint64(1)) & mask
    return out
