"""Row formats on every tier (fixture ``tier``, every format): each tier stores its tables'
rows packed and serves exactly what the format's reference decoder gives for them.

The reference is :func:`hps_core.row_formats.unpack` of :func:`~hps_core.row_formats.pack`:
a tier serves those floats bit for bit (every tier packs and unpacks with the same code), so
a tier that stored float32 under an int8 table, or decoded with the wrong scale, fails here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from hps_core.config import RedisConfig, VolatileDBConfig
from hps_core.db import EmbeddingTier, RedisClusterVolatileDB
from hps_core.errors import ConfigError, RowValueError
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack, unpack

T = "hps_et.model.table"
FORMATS = tuple(RowFormat)


def served(fmt: RowFormat, values: np.ndarray) -> np.ndarray:
    return unpack(fmt, pack(fmt, values), values.shape[1])


def rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = rng.choice([1e-3, 1.0, 30.0], size=(n, 1))
    return (rng.normal(size=(n, dim)) * scale).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dim", [1, 3, 16, 128])
def test_round_trip_is_the_formats_reference(tier: EmbeddingTier, fmt: RowFormat, dim: int) -> None:
    tier.create_table(T, dim, fmt)
    assert tier.row_format(T) is fmt
    keys = np.arange(0, 2000, 2, dtype=np.int64)
    values = rows(len(keys), dim)
    tier.insert(T, keys, values)
    out = np.full((len(keys), dim), -7.0, np.float32)
    found = tier.fetch(T, keys[::-1].copy(), out)
    assert found.all()
    np.testing.assert_array_equal(out, served(fmt, values)[::-1])
    assert tier.count(T) == len(keys)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f is not RowFormat.FP32], ids=str)
def test_unstorable_rows_refuse_the_batch(tier: EmbeddingTier, fmt: RowFormat) -> None:
    tier.create_table(T, 4, fmt)
    values = rows(3, 4)
    values[1, 2] = np.nan
    with pytest.raises(RowValueError, match="row 1 holds a NaN"):
        tier.insert(T, np.array([1, 2, 3], np.int64), values)
    assert tier.count(T) == 0


def test_tables_of_different_formats_in_one_fetch_tables(tier: EmbeddingTier) -> None:
    names = tuple(f"hps_et.model.{fmt}" for fmt in FORMATS)
    dims = np.array([5, 16, 3, 8], np.int64)
    expected = []
    for name, fmt, dim in zip(names, FORMATS, dims.tolist()):
        tier.create_table(name, dim, fmt)
        values = rows(50, dim, seed=dim)
        tier.insert(name, np.arange(50, dtype=np.int64), values)
        expected.append(served(fmt, values))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, len(names), 400).astype(np.int64)
    keys = rng.integers(0, 60, 400).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(dims[ids])[:-1]]).astype(np.int64)
    out = np.full(int(dims[ids].sum()), -7.0, np.float32)
    found = tier.fetch_tables(names, ids, keys, out, offsets)
    np.testing.assert_array_equal(found, keys < 50)
    for i in range(len(keys)):
        row = out[offsets[i]: offsets[i] + dims[ids[i]]]
        if found[i]:
            np.testing.assert_array_equal(row, expected[ids[i]][keys[i]])
        else:
            assert (row == -7.0).all()


def test_create_table_refuses_another_format(tier: EmbeddingTier) -> None:
    tier.create_table(T, 8, RowFormat.INT8)
    tier.create_table(T, 8, RowFormat.INT8)  # idempotent
    with pytest.raises(ConfigError, match=r"stores int8 rows, but fp32 was asked for"):
        tier.create_table(T, 8)
    with pytest.raises(ConfigError, match="row_format"):
        tier.create_table("hps_et.model.other", 8, "int8")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["rocks_db", pytest.param("redis_cluster", marks=pytest.mark.redis)])
def test_the_stored_format_outlives_the_handle(make_tier: Any, kind: str) -> None:
    """A shared or durable tier remembers each table's format: a second process (here a second
    handle) opening the table in another format is refused, naming both."""
    first = make_tier(kind)
    first.create_table(T, 4, RowFormat.FP8)
    values = rows(10, 4)
    first.insert(T, np.arange(10, dtype=np.int64), values)
    if kind == "rocks_db":
        first.close()
        second = make_tier(kind)
    else:  # make_tier would empty the servers: open a second handle on the same cluster
        second = RedisClusterVolatileDB(VolatileDBConfig(redis=RedisConfig(address=first.address), num_partitions=4))
    assert second.row_format(T) is RowFormat.FP8
    with pytest.raises(ConfigError, match=r"stores fp8 rows, but int8 was asked for"):
        second.create_table(T, 4, RowFormat.INT8)
    second.create_table(T, 4, RowFormat.FP8)
    out = np.zeros((10, 4), np.float32)
    assert second.fetch(T, np.arange(10, dtype=np.int64), out).all()
    np.testing.assert_array_equal(out, served(RowFormat.FP8, values))
    if kind != "rocks_db":
        second.close()


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_overwrites_duplicates_and_uint32_keys(tier: EmbeddingTier, fmt: RowFormat) -> None:
    """Upsert semantics hold per format: an overwrite replaces the packed row, the last of a
    batch's duplicates wins, uint32 keys are the same keys widened."""
    tier.create_table(T, 6, fmt)
    first, second = rows(4, 6, seed=1), rows(5, 6, seed=2)
    tier.insert(T, np.array([1, 2, 3, 4], np.uint32), first)
    tier.insert(T, np.array([3, 9, 3, 1, 3], np.int64), second)  # key 3 three times: the last wins
    keys = np.array([1, 2, 3, 4, 9], np.int64)
    out = np.full((5, 6), -7.0, np.float32)
    assert tier.fetch(T, keys, out).all()
    expected = np.stack([second[3], first[1], second[4], first[3], second[1]])
    np.testing.assert_array_equal(out, served(fmt, expected))
    assert tier.count(T) == 5


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_random_batches_against_a_dict_model(tier: EmbeddingTier, fmt: RowFormat) -> None:
    tier.create_table(T, 16, fmt)
    rng = np.random.default_rng(7)
    model: dict[int, np.ndarray] = {}
    for step in range(5):
        keys = rng.integers(-(2**40), 2**40, 300).astype(np.int64)
        keys[:50] = rng.choice(np.array(sorted(model) or [0], np.int64), 50)  # overwrite some
        values = rows(len(keys), 16, seed=10 + step)
        tier.insert(T, keys, values)
        for key, row in zip(keys.tolist(), served(fmt, values)):
            model[key] = row
    probe = np.concatenate([np.array(sorted(model), np.int64), rng.integers(2**41, 2**42, 100)])
    out = np.full((len(probe), 16), -7.0, np.float32)
    found = tier.fetch(T, probe, out)
    np.testing.assert_array_equal(found, [k in model for k in probe.tolist()])
    np.testing.assert_array_equal(out[found], np.stack([model[k] for k in probe[found].tolist()]))
    assert tier.count(T) == len(model)
