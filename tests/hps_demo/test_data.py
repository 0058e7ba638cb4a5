"""Synthetic data set: shapes, determinism, power law, opaque keys, AUC."""

from __future__ import annotations

import numpy as np
import pytest

from hps_demo.data import (
    DEMO_ROWS_PER_TABLE,
    auc,
    make_dataset,
    make_key_map,
    power_law_ranks,
    train_test_split,
)

SIZES = (1000, 50, 20_000, 300)


@pytest.fixture(scope="module")
def ds():
    return make_dataset(5000, n_tables=4, rows_per_table=SIZES, seed=3)


def test_shapes_and_dtypes(ds):
    assert len(ds) == 5000
    assert ds.dense.shape == (5000, 13) and ds.dense.dtype == np.float32
    assert ds.keys.shape == (5000, 4) and ds.keys.dtype == np.int64
    assert ds.rows.shape == (5000, 4) and ds.rows.dtype == np.int64
    assert ds.label.shape == (5000,) and ds.label.dtype == np.float32
    assert set(np.unique(ds.label)) <= {0.0, 1.0}
    assert ds.rows_per_table == SIZES and ds.n_tables == 4 and ds.n_dense == 13
    assert np.isfinite(ds.dense).all() and (ds.dense >= 0).all()


def test_rows_in_range_and_keys_map_rows(ds):
    for j, size in enumerate(SIZES):
        assert ds.rows[:, j].min() >= 0 and ds.rows[:, j].max() < size
        np.testing.assert_array_equal(ds.keys[:, j], ds.key_maps[j][ds.rows[:, j]])


def test_keys_are_opaque_distinct_non_negative(ds):
    for j, key_map in enumerate(ds.key_maps):
        assert key_map.dtype == np.int64 and key_map.shape == (SIZES[j],)
        assert np.unique(key_map).shape[0] == SIZES[j]
        assert (key_map >= 0).all()
        assert not np.any(key_map == np.arange(SIZES[j]))  # a key is not its row
    # Per-table key spaces: different tables get different ids.
    assert not np.intersect1d(ds.key_maps[0], ds.key_maps[2]).size


def test_seeded_determinism():
    a = make_dataset(2000, n_tables=3, rows_per_table=500, seed=11)
    b = make_dataset(2000, n_tables=3, rows_per_table=500, seed=11)
    c = make_dataset(2000, n_tables=3, rows_per_table=500, seed=12)
    for field in ("dense", "keys", "rows", "label"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.keys, c.keys)
    assert make_key_map(100, 0, 1).tolist() == make_key_map(100, 0, 1).tolist()


def _top_share(rows: np.ndarray, n_rows: int, fraction: float) -> float:
    counts = np.sort(np.bincount(rows, minlength=n_rows))[::-1]
    return counts[: max(1, int(n_rows * fraction))].sum() / rows.shape[0]


def test_power_law_head_is_hot():
    ds = make_dataset(50_000, n_tables=1, rows_per_table=10_000, alpha=1.2, seed=0)
    # Top 1% of rows take most of the traffic at alpha 1.2 (uniform would give 1%).
    assert _top_share(ds.rows[:, 0], 10_000, 0.01) > 0.6


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.99, 1.0])
def test_power_law_alpha_at_or_below_one(alpha):
    rng = np.random.default_rng(0)
    ranks = power_law_ranks(rng, 10_000, 50_000, alpha)
    assert ranks.min() >= 0 and ranks.max() < 10_000
    share = _top_share(ranks, 10_000, 0.01)
    if alpha == 0.0:
        assert share < 0.03  # uniform
    else:
        assert share > 0.05
    if alpha == 0.99:
        ds = make_dataset(1000, n_tables=2, rows_per_table=100, alpha=0.99, seed=1)
        assert ds.rows.max() < 100


def test_power_law_matches_expected_frequencies():
    rng = np.random.default_rng(5)
    n, alpha = 50, 1.2
    ranks = power_law_ranks(rng, n, 200_000, alpha)
    expected = np.arange(1, n + 1, dtype=float) ** -alpha
    expected /= expected.sum()
    observed = np.bincount(ranks, minlength=n) / ranks.shape[0]
    np.testing.assert_allclose(observed[:5], expected[:5], rtol=0.05)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rows_per_table"):
        make_dataset(10, n_tables=3, rows_per_table=(10, 20))
    with pytest.raises(ValueError, match="alpha"):
        make_dataset(10, n_tables=1, rows_per_table=10, alpha=-1)
    with pytest.raises(ValueError, match="at least one row"):
        make_dataset(10, n_tables=1, rows_per_table=0)


def test_demo_sizes_are_26_tables():
    assert len(DEMO_ROWS_PER_TABLE) == 26
    assert max(DEMO_ROWS_PER_TABLE) <= 100_000


def test_labels_carry_learnable_signal(ds):
    assert 0.15 < ds.label.mean() < 0.6
    # The hidden model's own probabilities rank the labels well: there is signal to learn.
    assert auc(ds.label, ds.click_prob) > 0.7


def test_train_test_split(ds):
    train, test = train_test_split(ds, 0.2, seed=1)
    assert len(train) == 4000 and len(test) == 1000
    both = np.concatenate([train.keys, test.keys])
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, ds.keys.tolist()))
    assert train.key_maps is ds.key_maps
    with pytest.raises(ValueError):
        train_test_split(ds, 1.0)


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),
        ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 0.0),
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),  # the sklearn docs example
        ([0, 1], [0.5, 0.5], 0.5),  # a tie counts one half
        ([1, 0, 1, 0, 1], [0.3, 0.3, 0.7, 0.1, 0.3], 5 / 6),
    ],
)
def test_auc_known_values(labels, scores, expected):
    assert auc(np.array(labels), np.array(scores)) == pytest.approx(expected)


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = np.round(rng.random(300), 2)  # many ties
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(y, s) == pytest.approx(pairwise, abs=1e-12)


def test_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        auc(np.ones(3), np.arange(3))
