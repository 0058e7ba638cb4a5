"""Request checks and the one-pass plan: de-duplication over (table, key) pairs of every
request and table, and the placement of every requested row."""

from __future__ import annotations

import numpy as np
import pytest

from hps_core.config import parse_config
from hps_core.errors import RequestError
from hps_core.request import TableLayout, check_request, plan_batch
from hps_core.rows import copy_rows

DIMS = (4, 3, 1)


def _layout(max_batch_size: int = 8, dims: tuple[int, ...] = DIMS) -> TableLayout:
    config = parse_config(
        {
            "models": [
                {
                    "model": "m",
                    "sparse_files": [f"/unused/{i}" for i in range(len(dims))],
                    "embedding_table_names": [f"t{i}" for i in range(len(dims))],
                    "embedding_vecsize_per_table": list(dims),
                    "default_value_for_each_table": [0.0] * len(dims),
                    "maxnum_catfeature_query_per_table_per_sample": [2] + [1] * (len(dims) - 1),
                    "max_batch_size": max_batch_size,
                }
            ]
        },
        "test.json",
    )
    return TableLayout.of(config.model("m"))


@pytest.mark.parametrize(
    ("keys", "numkeys", "words"),
    [
        (np.zeros(3, np.float32), np.array([2, 1, 0], np.int32), "integers"),
        (np.zeros((1, 3), np.int64), np.array([2, 1, 0], np.int32), "1-D"),
        (np.zeros(3, np.int64), np.array([2, 2, 0], np.int32), "sums to 4"),
        (np.zeros(3, np.int64), np.array([3, 0, 0, 0], np.int32), "3 tables"),
        (np.zeros(3, np.int64), np.array([4, -1, 0], np.int32), "negative"),
        (np.zeros(0, np.int64), np.array([0, 0, 0], np.int32), "no keys"),
        (np.zeros(17, np.int64), np.array([17, 0, 0], np.int32), "16 allows"),
        (np.zeros(3, np.int64), np.array([[2, 1, 0]], np.int32), "NUMKEYS must be a 1-D"),
        (np.zeros(3, np.int64), np.array([2.0, 1.0, 0.0]), "NUMKEYS must be a 1-D integer"),
        (np.zeros((2, 3), np.int64), np.array([[3, 0, 0], [2, 1, 0]], np.int32), "different total sizes"),
        (np.zeros((2, 3), np.int64), np.array([[3, 0, 0], [2, 0, 0]], np.int32), "sums to 2"),
        (np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int32), "batch size 0"),
        (np.zeros((1, 1, 3), np.int64), np.zeros((1, 3), np.int32), "KEYS"),
        (np.array([2**63], np.uint64), np.array([1, 0, 0], np.int32), "int64 range"),
    ],
)
def test_malformed_requests_are_named(keys: np.ndarray, numkeys: np.ndarray, words: str) -> None:
    with pytest.raises(RequestError, match=words):
        check_request(keys, numkeys, _layout())


def _reference(requests: list[tuple[np.ndarray, np.ndarray]], dims: tuple[int, ...], unique_rows: dict) -> list[np.ndarray]:
    """Each request's OUTPUT0 the slow way: for every key, its table's row."""
    outputs = []
    for keys, counts in requests:
        rows = []
        for row_keys, row_counts in zip(np.atleast_2d(keys), np.atleast_2d(counts)):
            parts = np.split(row_keys, np.cumsum(row_counts)[:-1])
            rows.append(np.concatenate([np.concatenate([unique_rows[(t, int(k))] for k in part] or [np.empty(0)])
                                        for t, part in enumerate(parts)]))
        outputs.append(np.stack(rows) if keys.ndim == 2 else rows[0])
    return outputs


def test_plan_deduplicates_pairs_across_requests_rows_and_tables() -> None:
    rng = np.random.default_rng(0)
    layout = _layout()
    requests = []
    for batched in (False, True, False):
        rows = 3 if batched else 1
        counts = np.stack([rng.integers(0, [17, 9, 9]) for _ in range(rows)])
        counts[1:] = counts[0]  # rows of a batched request give outputs of one size
        n = int(counts[0].sum()) or 1
        counts[:, 0] += n - counts[0].sum()
        keys = rng.integers(-3, 6, size=(rows, n)).astype(np.int64)  # many duplicates, also across tables
        requests.append((keys if batched else keys[0], counts.astype(np.int32) if batched else counts[0].astype(np.int32)))
    checked = [check_request(k, c, layout) for k, c in requests]
    plan = plan_batch(checked, layout)

    pairs = list(zip(plan.table_ids.tolist(), plan.keys.tolist()))
    assert len(set(pairs)) == len(pairs) == plan.unique  # each pair once
    all_pairs = {(t, int(k)) for r in checked for row, cnt in zip(r.keys, r.counts)
                 for t, part in enumerate(np.split(row, np.cumsum(cnt)[:-1])) for k in part}
    assert set(pairs) == all_pairs
    np.testing.assert_array_equal(plan.unique_counts, np.bincount(plan.table_ids, minlength=3))
    np.testing.assert_array_equal(plan.key_counts, sum(r.counts.sum(axis=0) for r in checked))
    assert sorted(plan.table_ids.tolist()) == plan.table_ids.tolist()  # grouped by table

    out = np.full(plan.output_size, np.nan, np.float32)
    rows_of = {}
    for u, pair in enumerate(pairs):  # what the levels do: each unique row written once
        row = rng.standard_normal(DIMS[pair[0]]).astype(np.float32)
        out[plan.offsets[u] : plan.offsets[u] + DIMS[pair[0]]] = row
        rows_of[pair] = row
    by_device = out.copy()
    plan.expand(out, layout.dims)
    sources, targets, tables = plan.repeats(layout.dims)  # what the GPU path copies
    assert np.isin(targets, plan.offsets).sum() == 0  # repeats never overwrite a unique row
    copy_rows(by_device, sources, by_device, targets, tables, layout.dims)
    np.testing.assert_array_equal(by_device, out)
    for i, expected in enumerate(_reference(requests, DIMS, rows_of)):
        got = out[plan.bounds[i] : plan.bounds[i + 1]]
        np.testing.assert_array_equal(got, expected.ravel())


def test_unsigned_keys_are_widened() -> None:
    checked = check_request(np.array([7, 8, 9], np.uint32), np.array([2, 1, 0], np.int32), _layout())
    assert checked.keys.dtype == np.int64 and checked.keys.tolist() == [[7, 8, 9]]
