"""The grouping kernels every tier and cache shares: counting sort and (table, key) pair sets."""

from __future__ import annotations

import numpy as np

from hps_core.grouping import first_of_pairs, group_by, pairs_in


def test_group_by_is_a_stable_counting_sort() -> None:
    groups = np.array([2, 0, 2, 1, 0, 2], np.int64)
    order, starts = group_by(groups, 4)
    assert starts.tolist() == [0, 2, 3, 6, 6]
    assert order.tolist() == [1, 4, 3, 0, 2, 5]  # batch order inside each group
    np.testing.assert_array_equal(order, np.argsort(groups, kind="stable"))


def test_first_of_pairs_marks_one_occurrence_per_pair() -> None:
    ids = np.array([0, 1, 0, 0, 1, 2], np.int64)
    keys = np.array([5, 5, 5, 6, 5, -1], np.int64)
    assert first_of_pairs(ids, keys).tolist() == [True, True, False, True, False, True]
    rng = np.random.default_rng(0)
    ids, keys = rng.integers(0, 3, 5000), rng.integers(-50, 50, 5000)
    first = first_of_pairs(ids.astype(np.int64), keys.astype(np.int64))
    assert first.sum() == len(set(zip(ids.tolist(), keys.tolist())))


def test_pairs_in() -> None:
    ids = np.array([0, 1, 0, 2, 1], np.int64)
    keys = np.array([5, 5, 6, -1, 7], np.int64)
    got = pairs_in(ids, keys, np.array([1, 2, 0], np.int64), np.array([5, -1, 7], np.int64))
    assert got.tolist() == [False, True, False, True, False]
    assert not pairs_in(ids, keys, np.empty(0, np.int64), np.empty(0, np.int64)).any()
