"""Synthetic Criteo-like click data for the demo, fully vectorised and seeded.

Each sample has ``n_dense`` dense features (log-transformed counts, as Criteo is usually
pre-processed), one categorical key per table for ``n_tables`` tables, and a 0/1 click label.

Keys
    Every table has its own key space: row ``r`` of table ``j`` is known to the outside world
    by an opaque int64 id ``key_maps[j][r]`` (a bijective 64-bit mix of ``(seed, j, r)``,
    masked to be non-negative), so a key never equals its row and tables do not share ids.
    This is what a parameter server sees in production: hashed ids, not dense row numbers.
    ``rows`` keeps the row indices for training; ``keys`` holds the ids that clients send.

Popularity
    Row popularity follows a finite power law, ``P(rank k) ∝ k**-alpha`` for ``k = 1..R``,
    sampled by inverse CDF over the finite ranks. Unlike ``np.random.zipf`` this works for any
    ``alpha >= 0`` (``alpha <= 1`` included) and never returns a rank outside the table. The
    hottest ranks are scattered over the rows by a seeded permutation, so hot rows are not
    simply the first rows of a table.

Labels
    A hidden logistic model: a linear term and one pairwise product over the standardised dense
    features, plus a hidden per-row effect for a few "signal" tables. Hot rows of those tables
    are seen often enough to learn their effect, tail rows are not, so a trained model reaches
    an AUC clearly above 0.5 (about 0.75 at the demo sizes) without the task being trivial.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from hps_core.hashing import mix64_array

__all__ = [
    "DEMO_ROWS_PER_TABLE",
    "Dataset",
    "auc",
    "make_dataset",
    "make_key_map",
    "power_law_ranks",
    "train_test_split",
]

# Rows per table for the demo: a Criteo-like mix of small and large tables, 1k..100k rows,
# about 0.9M rows in all (58 MB of fp32 vectors at dim 16), so training stays fast on 2 cores.
DEMO_ROWS_PER_TABLE: tuple[int, ...] = (
    100_000, 50_000, 2_000, 20_000, 80_000, 1_000, 10_000, 5_000, 60_000, 3_000,
    40_000, 100_000, 8_000, 1_500, 30_000, 70_000, 4_000, 12_000, 25_000, 1_000,
    90_000, 6_000, 15_000, 50_000, 2_500, 100_000,
)

# Tables whose rows carry a hidden effect on the label (indices into the table list; only those
# that exist are used, so small n_tables still works).
_SIGNAL_TABLES = (0, 3, 6, 9)
_MASK63 = np.uint64(0x7FFF_FFFF_FFFF_FFFF)


@dataclass(frozen=True)
class Dataset:
    """A synthetic click log.

    dense:    float32[n, n_dense]  log1p of non-negative counts
    keys:     int64[n, n_tables]   the ids clients send (``key_maps[j][rows[:, j]]``)
    rows:     int64[n, n_tables]   the row of each key in its table (training only)
    label:    float32[n]           0.0 / 1.0
    key_maps: one int64[rows_j] per table: row -> id
    click_prob: float32[n]         the hidden model's probability (its AUC is the ceiling)
    """

    dense: npt.NDArray[np.float32]
    keys: npt.NDArray[np.int64]
    rows: npt.NDArray[np.int64]
    label: npt.NDArray[np.float32]
    key_maps: tuple[npt.NDArray[np.int64], ...]
    click_prob: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def n_dense(self) -> int:
        return int(self.dense.shape[1])

    @property
    def n_tables(self) -> int:
        return len(self.key_maps)

    @property
    def rows_per_table(self) -> tuple[int, ...]:
        return tuple(int(m.shape[0]) for m in self.key_maps)

    def subset(self, index: npt.NDArray[np.integer[Any]] | npt.NDArray[np.bool_]) -> Dataset:
        """The samples at ``index`` (any numpy index), sharing the key maps."""
        return Dataset(
            dense=self.dense[index],
            keys=self.keys[index],
            rows=self.rows[index],
            label=self.label[index],
            key_maps=self.key_maps,
            click_prob=self.click_prob[index],
        )


def make_key_map(n_rows: int, table: int, seed: int) -> npt.NDArray[np.int64]:
    """Distinct non-negative int64 ids for the rows of one table (row -> id).

    ``splitmix64``'s finaliser (:func:`hps_core.hashing.mix64_array`) is a bijection, so
    distinct rows give distinct 64-bit values; masking the sign bit could in principle merge
    two of them (odds about n²/2^64), which is checked.
    """
    salt = mix64_array(np.array([seed * 1_000_003 + table], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        mixed = mix64_array(np.arange(n_rows, dtype=np.uint64) + salt)
    ids = (mixed & _MASK63).astype(np.int64)
    if np.unique(ids).shape[0] != n_rows:  # astronomically unlikely; never serve duplicates
        raise RuntimeError(f"key collision in table {table}; pick another seed")
    return ids


def power_law_ranks(
    rng: np.random.Generator, n_rows: int, n_samples: int, alpha: float
) -> npt.NDArray[np.int64]:
    """``n_samples`` ranks in ``[0, n_rows)`` with ``P(k) ∝ (k + 1) ** -alpha`` (inverse CDF)."""
    if n_rows <= 0:
        raise ValueError(f"a table needs at least one row, got {n_rows}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    weights = np.arange(1, n_rows + 1, dtype=np.float64) ** -float(alpha)
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(n_samples), side="right")
    # Guard the float edge u ~ 1.0 so a rank never falls off the table.
    return np.minimum(ranks, n_rows - 1).astype(np.int64)


def _normalise_rows(rows_per_table: int | Sequence[int], n_tables: int) -> tuple[int, ...]:
    if isinstance(rows_per_table, (int, np.integer)):
        return (int(rows_per_table),) * n_tables
    sizes = tuple(int(r) for r in rows_per_table)
    if len(sizes) != n_tables:
        raise ValueError(f"rows_per_table has {len(sizes)} entries, n_tables is {n_tables}")
    return sizes


def _make_dense(rng: np.random.Generator, n: int, n_dense: int) -> npt.NDArray[np.float32]:
    """Criteo-like dense features: log1p of heavy-tailed counts, some of them zero."""
    scale = rng.uniform(0.5, 3.0, size=n_dense)
    counts = np.floor(rng.lognormal(mean=scale, sigma=1.0, size=(n, n_dense)))
    counts *= rng.random((n, n_dense)) > 0.2  # about 20% zeros, as in Criteo's counters
    dense: npt.NDArray[np.float32] = np.log1p(counts).astype(np.float32)  # NumPy's ufuncs return Any
    return dense


def _hidden_logit(
    rng: np.random.Generator, dense: npt.NDArray[np.float32], rows: npt.NDArray[np.int64], sizes: tuple[int, ...]
) -> npt.NDArray[np.float64]:
    """The hidden model behind the labels (its parameters are drawn from ``rng``)."""
    z = (dense - dense.mean(axis=0)) / (dense.std(axis=0) + 1e-6)
    w = rng.normal(0.0, 1.0, size=dense.shape[1]) / np.sqrt(dense.shape[1])
    logit: npt.NDArray[np.float64] = -1.2 + 0.8 * (z @ w)  # NumPy types z (mean, std) as Any
    if z.shape[1] >= 2:
        logit += 0.5 * z[:, 0] * z[:, 1]  # a pairwise interaction, as DLRM models
    for t in _SIGNAL_TABLES:
        if t < len(sizes):
            effect = rng.normal(0.0, 0.7, size=sizes[t])
            logit += effect[rows[:, t]]
    return logit


def make_dataset(
    n_samples: int,
    *,
    n_dense: int = 13,
    n_tables: int = 26,
    rows_per_table: int | Sequence[int] = DEMO_ROWS_PER_TABLE,
    alpha: float = 1.2,
    seed: int = 0,
) -> Dataset:
    """A seeded synthetic click log (same arguments -> identical arrays)."""
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    sizes = _normalise_rows(rows_per_table, n_tables)
    rng = np.random.default_rng(seed)
    dense = _make_dense(rng, n_samples, n_dense)
    key_maps = tuple(make_key_map(size, j, seed) for j, size in enumerate(sizes))
    rows = np.empty((n_samples, n_tables), dtype=np.int64)
    for j, size in enumerate(sizes):  # per table, not per key
        hot_order = rng.permutation(size)  # rank -> row: hot rows are scattered
        rows[:, j] = hot_order[power_law_ranks(rng, size, n_samples, alpha)]
    keys = np.empty_like(rows)
    for j in range(n_tables):
        keys[:, j] = key_maps[j][rows[:, j]]
    p = 1.0 / (1.0 + np.exp(-_hidden_logit(rng, dense, rows, sizes)))
    label = (rng.random(n_samples) < p).astype(np.float32)
    return Dataset(
        dense=dense,
        keys=keys,
        rows=rows,
        label=label,
        key_maps=key_maps,
        click_prob=p.astype(np.float32),
    )


def train_test_split(
    dataset: Dataset, test_fraction: float = 0.2, *, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """A seeded random split into (train, test)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(dataset))
    n_test = int(round(len(dataset) * test_fraction))
    return dataset.subset(np.sort(order[n_test:])), dataset.subset(np.sort(order[:n_test]))


def auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U from average ranks; ties count one half)."""
    y = np.asarray(labels).ravel() > 0.5
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels has {y.shape[0]} entries, scores has {s.shape[0]}")
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Tied scores share the mean of the 1-based ranks they span.
    first_rank = np.cumsum(counts) - counts + 1
    mean_rank = first_rank + (counts - 1) / 2.0
    rank_sum = float(mean_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
