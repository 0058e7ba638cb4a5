"""The EmbeddingTier contract, run against every implementation (fixture ``tier``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import hps_core.db
from hps_core.db import EmbeddingTier
from hps_core.errors import ConfigError, RequestError, TierError, UnknownTableError

Encode = Callable[[np.ndarray, int], np.ndarray]
T = "hps_et.model.table"

EXTREME_KEYS = np.array(
    [np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0, -1, 1, np.iinfo(np.int64).min + 1],
    dtype=np.int64,
)


def fetch(tier: EmbeddingTier, table: str, keys: np.ndarray, fill: float = -7.0) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((len(keys), tier.dim(table)), fill, dtype=np.float32)
    found = tier.fetch(table, keys, out)
    return out, found


def test_exported_names() -> None:
    assert sorted(hps_core.db.__all__) == [
        "EmbeddingTier",
        "HashMapVolatileDB",
        "PersistentDB",
        "RedisClusterVolatileDB",
        "RedisVolatileDB",
        "RocksDBPersistentDB",
        "SharedHashMapVolatileDB",
        "VolatileDB",
        "open_persistent_db",
        "open_volatile_db",
    ]


def test_satisfies_protocol(tier: EmbeddingTier) -> None:
    assert isinstance(tier, EmbeddingTier)


@pytest.mark.parametrize("dim", [1, 3, 16, 128])
def test_round_trip(tier: EmbeddingTier, encode: Encode, dim: int) -> None:
    tier.create_table(T, dim)
    keys = np.arange(0, 3000, 3, dtype=np.int64)
    tier.insert(T, keys, encode(keys, dim))
    out, found = fetch(tier, T, keys[::-1].copy())
    assert found.dtype == np.bool_ and found.all()
    np.testing.assert_array_equal(out, encode(keys[::-1], dim))
    assert tier.dim(T) == dim
    assert tier.count(T) == len(keys)


def test_misses_leave_out_untouched(tier: EmbeddingTier, encode: Encode) -> None:
    tier.create_table(T, 5)
    tier.insert(T, np.array([10, 20], np.int64), encode(np.array([10, 20]), 5))
    keys = np.array([11, 10, 21, 20, 99], np.int64)
    out, found = fetch(tier, T, keys, fill=-7.0)
    np.testing.assert_array_equal(found, [False, True, False, True, False])
    np.testing.assert_array_equal(out[found], encode(keys[found], 5))
    assert (out[~found] == -7.0).all()


def test_fetch_from_empty_table(tier: EmbeddingTier) -> None:
    tier.create_table(T, 4)
    out, found = fetch(tier, T, np.arange(100, dtype=np.int64))
    assert not found.any() and (out == -7.0).all()


def test_duplicate_keys_in_fetch(tier: EmbeddingTier, encode: Encode) -> None:
    tier.create_table(T, 3)
    tier.insert(T, np.array([1, 2], np.int64), encode(np.array([1, 2]), 3))
    keys = np.array([2, 2, 5, 1, 2, 5, 1], np.int64)
    out, found = fetch(tier, T, keys)
    np.testing.assert_array_equal(found, keys != 5)
    np.testing.assert_array_equal(out[found], encode(keys[found], 3))


def test_duplicate_keys_in_insert_last_wins(tier: EmbeddingTier) -> None:
    tier.create_table(T, 2)
    keys = np.array([7, 8, 7, 9, 7], np.int64)
    values = np.arange(10, dtype=np.float32).reshape(5, 2)
    tier.insert(T, keys, values)
    out, found = fetch(tier, T, np.array([7, 8, 9], np.int64))
    assert found.all()
    np.testing.assert_array_equal(out, values[[4, 1, 3]])
    assert tier.count(T) == 3


def test_empty_batches(tier: EmbeddingTier) -> None:
    tier.create_table(T, 6)
    tier.insert(T, np.zeros(0, np.int64), np.zeros((0, 6), np.float32))
    found = tier.fetch(T, np.zeros(0, np.int64), np.zeros((0, 6), np.float32))
    assert found.shape == (0,) and found.dtype == np.bool_
    assert tier.count(T) == 0


def test_overwrite(tier: EmbeddingTier) -> None:
    tier.create_table(T, 4)
    keys = np.array([3, 1, 4], np.int64)
    tier.insert(T, keys, np.ones((3, 4), np.float32))
    tier.insert(T, keys[:2], np.full((2, 4), 2.0, np.float32))
    out, found = fetch(tier, T, keys)
    assert found.all()
    np.testing.assert_array_equal(out[:, 0], [2.0, 2.0, 1.0])
    assert tier.count(T) == 3


def test_extreme_int64_keys(tier: EmbeddingTier) -> None:
    tier.create_table(T, 3)
    values = np.arange(len(EXTREME_KEYS) * 3, dtype=np.float32).reshape(-1, 3)
    tier.insert(T, EXTREME_KEYS, values)
    order = np.array([3, 0, 5, 1, 4, 2])
    out, found = fetch(tier, T, EXTREME_KEYS[order])
    assert found.all()
    np.testing.assert_array_equal(out, values[order])
    assert tier.count(T) == len(EXTREME_KEYS)


def test_uint32_keys_are_widened(tier: EmbeddingTier, encode: Encode) -> None:
    tier.create_table(T, 3)
    keys32 = np.array([0, 1, 2**31, 2**32 - 1], np.uint32)
    tier.insert(T, keys32, encode(keys32, 3))
    out, found = fetch(tier, T, keys32.astype(np.int64))
    assert found.all()
    np.testing.assert_array_equal(out, encode(keys32, 3))
    out, found = fetch(tier, T, keys32)  # and uint32 on the way in, too
    assert found.all()
    # uint32 max is a different key from int64 -1: no sign confusion
    _, found = fetch(tier, T, np.array([-1], np.int64))
    assert not found.any()


def test_wrong_width_is_refused_and_nothing_written(tier: EmbeddingTier) -> None:
    tier.create_table(T, 4)
    keys = np.arange(5, dtype=np.int64)
    with pytest.raises(RequestError, match=r"hps_et\.model\.table.*4"):
        tier.insert(T, keys, np.zeros((5, 3), np.float32))
    with pytest.raises(RequestError, match="5 keys"):
        tier.insert(T, keys, np.zeros((4, 4), np.float32))
    assert tier.count(T) == 0
    with pytest.raises(RequestError, match=r"hps_et\.model\.table.*4"):
        tier.fetch(T, keys, np.zeros((5, 8), np.float32))


@pytest.mark.parametrize(
    "keys",
    [
        np.arange(3, dtype=np.int32),
        np.arange(3, dtype=np.uint64),
        np.arange(3, dtype=np.float64),
        np.arange(3, dtype=np.int64).reshape(3, 1),
        [0, 1, 2],
    ],
    ids=["int32", "uint64", "float64", "2-D", "list"],
)
def test_wrong_key_type_is_refused(tier: EmbeddingTier, keys: object) -> None:
    tier.create_table(T, 2)
    with pytest.raises(RequestError, match="keys"):
        tier.insert(T, keys, np.zeros((3, 2), np.float32))  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="keys"):
        tier.fetch(T, keys, np.zeros((3, 2), np.float32))  # type: ignore[arg-type]
    assert tier.count(T) == 0


def test_wrong_value_dtype_is_refused(tier: EmbeddingTier) -> None:
    tier.create_table(T, 2)
    keys = np.arange(3, dtype=np.int64)
    with pytest.raises(RequestError, match="float32"):
        tier.insert(T, keys, np.zeros((3, 2), np.float64))
    with pytest.raises(RequestError, match="float32"):
        tier.fetch(T, keys, np.zeros((3, 2), np.float16))
    assert tier.count(T) == 0


def test_out_must_be_writeable_and_contiguous(tier: EmbeddingTier) -> None:
    tier.create_table(T, 2)
    keys = np.arange(3, dtype=np.int64)
    with pytest.raises(RequestError, match="contiguous"):
        tier.fetch(T, keys, np.zeros((2, 3), np.float32).T)
    frozen = np.zeros((3, 2), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(RequestError, match="writeable"):
        tier.fetch(T, keys, frozen)


def test_non_contiguous_input_values_are_accepted(tier: EmbeddingTier) -> None:
    tier.create_table(T, 2)
    values = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    tier.insert(T, np.arange(3, dtype=np.int64)[::-1], values)
    out, found = fetch(tier, T, np.array([2, 1, 0], np.int64))
    assert found.all()
    np.testing.assert_array_equal(out, values)


def test_unknown_table(tier: EmbeddingTier) -> None:
    tier.create_table(T, 2)
    keys = np.arange(3, dtype=np.int64)
    calls = [
        lambda: tier.insert("hps_et.model.nope", keys, np.zeros((3, 2), np.float32)),
        lambda: tier.fetch("hps_et.model.nope", keys, np.zeros((3, 2), np.float32)),
        lambda: tier.count("hps_et.model.nope"),
        lambda: tier.dim("hps_et.model.nope"),
    ]
    for call in calls:
        with pytest.raises(UnknownTableError, match=r"nope.*hps_et\.model\.table"):
            call()


def test_create_table_is_idempotent_and_checks_dim(tier: EmbeddingTier, encode: Encode) -> None:
    tier.create_table(T, 8)
    tier.insert(T, np.array([1], np.int64), encode(np.array([1]), 8))
    tier.create_table(T, 8)
    assert tier.count(T) == 1
    with pytest.raises(ConfigError, match="dim 8"):
        tier.create_table(T, 4)
    for bad in (0, -1, 2.0, True, "8"):
        with pytest.raises(ConfigError):
            tier.create_table("hps_et.model.other", bad)  # type: ignore[arg-type]
    with pytest.raises(RequestError):
        tier.create_table("", 4)


def test_tables_are_independent(tier: EmbeddingTier) -> None:
    tier.create_table("hps_et.m.b", 2)
    tier.create_table("hps_et.m.a", 3)
    keys = np.array([1, 2], np.int64)
    tier.insert("hps_et.m.a", keys, np.ones((2, 3), np.float32))
    tier.insert("hps_et.m.b", keys[:1], np.full((1, 2), 5.0, np.float32))
    assert tier.table_names() == ["hps_et.m.a", "hps_et.m.b"]
    assert (tier.count("hps_et.m.a"), tier.count("hps_et.m.b")) == (2, 1)
    out, found = fetch(tier, "hps_et.m.b", keys)
    np.testing.assert_array_equal(found, [True, False])
    assert (out[0] == 5.0).all()


def test_large_random_batch_against_dict_model(tier: EmbeddingTier) -> None:
    rng = np.random.default_rng(7)
    dim = 5
    tier.create_table(T, dim)
    model: dict[int, np.ndarray] = {}
    for _ in range(3):  # three rounds: later ones overwrite part of the earlier keys
        keys = rng.integers(-(2**62), 2**62, 100_000, dtype=np.int64)
        keys[:20_000] = rng.choice(np.fromiter(model, np.int64) if model else keys, 20_000)
        values = rng.standard_normal((len(keys), dim)).astype(np.float32)
        tier.insert(T, keys, values)
        for k, v in zip(keys.tolist(), values):
            model[k] = v
    probe = np.concatenate(
        [rng.choice(np.fromiter(model, np.int64), 60_000), rng.integers(-(2**62), 2**62, 40_000)]
    )
    rng.shuffle(probe)
    out, found = fetch(tier, T, probe)
    expected_found = np.array([k in model for k in probe.tolist()])
    np.testing.assert_array_equal(found, expected_found)
    expected = np.stack([model[k] for k in probe[found].tolist()])
    np.testing.assert_array_equal(out[found], expected)
    assert tier.count(T) == len(model)


def test_close_is_final_and_idempotent(tier: EmbeddingTier) -> None:
    tier.create_table(T, 2)
    tier.close()
    tier.close()
    with pytest.raises(TierError, match="closed"):
        tier.fetch(T, np.arange(2, dtype=np.int64), np.zeros((2, 2), np.float32))
    with pytest.raises(TierError, match="closed"):
        tier.create_table("hps_et.m.x", 2)
