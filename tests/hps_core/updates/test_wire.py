"""HugeCTR's update wire format, key partitioning and the tier applier, without a broker.

The expected bytes are built independently with ``struct`` from the layout in HugeCTR's
``HugeCTR/src/hps/kafka_message.cpp``; XXH3 is checked against the system libxxhash.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import hps_core.updates as updates
from hps_core.config import PersistentDBConfig, VolatileDBConfig
from hps_core.db import HashMapVolatileDB, RocksDBPersistentDB
from hps_core.errors import (
    ConfigError,
    DeviceError,
    DeviceMemoryError,
    HPSError,
    RequestError,
    RowValueError,
    TierBusyError,
    UpdateError,
)
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack, unpack
from hps_core.updates import MalformedMessage, TierUpdateApplier, decode, encode, parse_topic, topic_name
from hps_core.updates.source import consumer_group_id
from hps_core.updates.wire import MAGIC, key_groups, partitions_for_keys, xxh3_64


def _reference_message(keys: list[int], rows: list[list[float]], key_fmt: str = "<q") -> bytes:
    value_size = 4 * len(rows[0]) if rows else 0
    out = struct.pack("<4sI", b"HCTR", value_size)
    for key, row in zip(keys, rows):
        out += struct.pack(key_fmt, key) + struct.pack(f"<{len(row)}f", *row)
    return out


# --------------------------------------------------------------------------- layout
def test_magic_is_hctr_little_endian() -> None:
    assert struct.pack("<I", MAGIC) == b"HCTR"


@pytest.mark.parametrize("key_dtype, key_fmt", [(np.int64, "<q"), (np.uint32, "<I")])
def test_encode_matches_hugectr_layout(key_dtype: type, key_fmt: str) -> None:
    keys = [7, 0, 123456789]
    rows = [[1.0, 2.0, 3.0], [0.5, -0.5, 0.25], [9.0, 8.0, 7.0]]
    payload = encode(np.array(keys), np.array(rows, np.float32), key_dtype)
    assert payload == _reference_message(keys, rows, key_fmt)
    assert payload[:4] == b"HCTR" and struct.unpack_from("<I", payload, 4) == (12,)


@pytest.mark.parametrize("dim", [1, 3, 16, 128])
@pytest.mark.parametrize("key_dtype", [np.int64, np.uint32])
def test_round_trip(dim: int, key_dtype: type) -> None:
    rng = np.random.default_rng(dim)
    high = 2**62 if key_dtype is np.int64 else 2**32
    keys = rng.integers(0, high, 1000, dtype=np.int64)
    if key_dtype is np.int64:
        keys[:3] = [-1, -(2**63), 2**63 - 1]  # signed int64 keys survive too
    values = rng.standard_normal((1000, dim)).astype(np.float32)
    got_keys, got_values = decode(encode(keys, values, key_dtype), dim, key_dtype)
    assert got_keys.dtype == np.int64 and got_values.dtype == np.float32
    assert got_values.flags.c_contiguous and got_values.flags.writeable
    np.testing.assert_array_equal(got_keys, keys)
    np.testing.assert_array_equal(got_values, values)


def test_decode_reads_a_hand_built_message() -> None:
    payload = _reference_message([5, 5, 9], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    keys, values = decode(payload, 2)
    np.testing.assert_array_equal(keys, [5, 5, 9])
    np.testing.assert_array_equal(values, [[1, 2], [3, 4], [5, 6]])


def test_beacon_decodes_to_nothing_whatever_its_value_size() -> None:
    beacon = struct.pack("<4sI", b"HCTR", 8)  # HugeCTR's beacon: value_size = sizeof(size_t)
    keys, values = decode(beacon, 16)
    assert keys.shape == (0,) and values.shape == (0, 16)


# --------------------------------------------------------------------------- malformed
_GOOD = _reference_message([1, 2], [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"", "truncated"),
        (b"HCTR\x10\x00", "truncated"),
        (b"HCTX" + _GOOD[4:], "magic"),
        (b"\x00" * len(_GOOD), "magic"),
        (_GOOD[:-1], "truncated"),
        (_GOOD[:-20], "truncated"),
        (_GOOD + b"\x00" * 5, "truncated"),
        (_reference_message([1], [[1.0, 2.0]]), "value size"),
    ],
    ids=["empty", "short-header", "bad-magic", "zeros", "cut-1", "cut-pair", "trailing", "wrong-dim"],
)
def test_malformed_payloads_raise(payload: bytes, words: str) -> None:
    with pytest.raises(MalformedMessage, match=words) as info:
        decode(payload, 4)
    assert isinstance(info.value, UpdateError) and isinstance(info.value, HPSError)


def test_encode_refuses_bad_inputs() -> None:
    with pytest.raises(RequestError):
        encode(np.array([1.5]), np.zeros((1, 2), np.float32))
    with pytest.raises(RequestError):
        encode(np.array([1, 2]), np.zeros((3, 2), np.float32))
    with pytest.raises(RequestError, match="uint32"):
        encode(np.array([2**32]), np.zeros((1, 2), np.float32), np.uint32)
    with pytest.raises(RequestError, match="uint32"):
        encode(np.array([-1]), np.zeros((1, 2), np.float32), np.uint32)


# --------------------------------------------------------------------------- topics, groups
def test_topic_names() -> None:
    assert topic_name("dlrm", "cat_0") == "hps_et.dlrm.cat_0"
    assert parse_topic("hps_et.dlrm.cat_0") == ("dlrm", "cat_0")
    assert parse_topic("hps_et.dlrm") is None and parse_topic("other.dlrm.t") is None
    for bad in ("", "a.b", "x" * 121, "sp ace"):
        with pytest.raises(RequestError):
            topic_name(bad, "t")


def test_consumer_group_names_follow_hugectr() -> None:
    assert consumer_group_id("volatile", shared=True) == "hps.volatile"
    assert consumer_group_id("persistent", shared=False, hostname="node1") == "hps.persistent.node1"
    assert consumer_group_id("volatile", shared=False, hostname="n", instance="p42") == "hps.volatile.n.p42"
    with pytest.raises(HPSError):
        consumer_group_id("cache", shared=True)


# --------------------------------------------------------------------------- partitioning
def _libxxhash() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("xxhash") or "libxxhash.so.0"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.XXH3_64bits.restype = ctypes.c_uint64
    lib.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    return lib


@pytest.mark.parametrize("key_dtype, width", [(np.int64, 8), (np.uint32, 4)])
def test_xxh3_matches_libxxhash(key_dtype: type, width: int) -> None:
    lib = _libxxhash()
    if lib is None:
        pytest.skip("libxxhash not installed (Debian: libxxhash0)")
    rng = np.random.default_rng(1)
    if key_dtype is np.int64:
        keys = np.concatenate([rng.integers(-(2**63), 2**63 - 1, 500, dtype=np.int64), [0, 1, -1]])
        raw = [int(k).to_bytes(8, "little", signed=True) for k in keys]
    else:
        keys = rng.integers(0, 2**32, 500, dtype=np.int64).astype(np.uint32)
        raw = [int(k).to_bytes(4, "little") for k in keys]
    expected = np.array([lib.XXH3_64bits(b, width) for b in raw], dtype=np.uint64)
    np.testing.assert_array_equal(xxh3_64(keys, key_dtype), expected)


def test_partitions_follow_key_groups() -> None:
    keys = np.arange(10_000, dtype=np.int64)
    groups = key_groups(keys, 8)
    assert groups.min() >= 0 and groups.max() <= 7
    assert np.bincount(groups, minlength=8).min() > 1000  # spread evenly
    parts = partitions_for_keys(keys, 3, 8)
    np.testing.assert_array_equal(parts, groups % 3)
    np.testing.assert_array_equal(partitions_for_keys(keys, 3, 8), parts)  # deterministic


# --------------------------------------------------------------------------- applier
def test_applier_inserts_creates_tables_and_calls_hook() -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))
    seen: list[tuple[str, int]] = []
    applier = TierUpdateApplier(db, {"hps_et.m.t": 4}, lambda t, k, v: seen.append((t, k.shape[0])))
    assert applier.dim("hps_et.m.t") == 4 and applier.dim("hps_et.m.other") is None
    keys = np.array([3, 1, 3], np.int64)
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    applier.apply("hps_et.m.t", keys, values)
    out = np.zeros((2, 4), np.float32)
    assert db.fetch("hps_et.m.t", np.array([1, 3]), out).all()
    np.testing.assert_array_equal(out, [values[1], values[2]])  # the last duplicate wins
    assert seen == [("hps_et.m.t", 3)] and applier.applied_updates == 3


def test_applier_hook_failure_is_counted_not_raised() -> None:
    def hook(table: str, keys: np.ndarray, values: np.ndarray) -> None:
        raise RuntimeError("cache refresh failed")

    applier = TierUpdateApplier(HashMapVolatileDB(), {"hps_et.m.t": 2}, hook)
    applier.apply("hps_et.m.t", np.array([1]), np.ones((1, 2), np.float32))
    assert applier.hook_errors == 1 and applier.applied_updates == 1


@pytest.mark.parametrize("error", [DeviceMemoryError("GPU 0: refresh failed (OutOfMemoryError)"),
                                   DeviceError("GPU 0: refresh failed (illegal memory access)")])
def test_applier_hook_device_error_propagates_for_the_source_to_retry(error: DeviceError) -> None:
    """A cache refresh the GPU failed is not swallowed: the source retries the batch (out of
    memory) or stops, else the cache would keep stale rows; the tier holds the rows either way."""
    def hook(table: str, keys: np.ndarray, values: np.ndarray) -> None:
        raise error

    db = HashMapVolatileDB()
    applier = TierUpdateApplier(db, {"hps_et.m.t": 2}, hook)
    with pytest.raises(DeviceError, match="refresh failed"):
        applier.apply("hps_et.m.t", np.array([1]), np.ones((1, 2), np.float32))
    assert applier.hook_errors == 0
    assert db.fetch("hps_et.m.t", np.array([1]), np.zeros((1, 2), np.float32)).all()


def test_applier_factory_opens_per_batch_and_waits_for_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "rocks"
    holder = RocksDBPersistentDB(PersistentDBConfig(path=str(path)))  # another process's writer, in effect
    opened: list[int] = []

    def factory() -> RocksDBPersistentDB:
        db = RocksDBPersistentDB(PersistentDBConfig(path=str(path)))
        opened.append(1)
        return db

    applier = TierUpdateApplier.opening(factory, {"hps_et.m.t": 2}, busy_retries=100, busy_backoff_ms=20)
    release = threading.Timer(0.3, holder.close)
    release.start()
    started = time.monotonic()
    applier.apply("hps_et.m.t", np.array([1, 2]), np.ones((2, 2), np.float32))
    assert time.monotonic() - started >= 0.25  # it waited for the lock instead of failing
    applier.apply("hps_et.m.t", np.array([2]), np.full((1, 2), 5, np.float32))
    assert len(opened) == 2
    reader = RocksDBPersistentDB(PersistentDBConfig(path=str(path), read_only=True))
    out = np.zeros((2, 2), np.float32)
    assert reader.fetch("hps_et.m.t", np.array([1, 2]), out).all()
    np.testing.assert_array_equal(out, [[1, 1], [5, 5]])
    reader.close()


def test_applier_factory_gives_up_with_tier_busy(tmp_path: Path) -> None:
    holder = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "rocks")))
    try:
        applier = TierUpdateApplier.opening(lambda: RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "rocks"))),
                                            {"hps_et.m.t": 2}, busy_retries=2, busy_backoff_ms=1)
        with pytest.raises(TierBusyError):
            applier.apply("hps_et.m.t", np.array([1]), np.ones((1, 2), np.float32))
    finally:
        holder.close()


# --------------------------------------------------------------------------- applier: row formats
def _fp8_rows(n: int, dim: int) -> np.ndarray:
    return (np.random.default_rng(5).standard_normal((n, dim)) * np.logspace(-2, 2, n)[:, None]).astype(np.float32)


def test_applier_creates_a_table_in_its_format_and_the_tier_packs_the_float32_updates(tmp_path: Path) -> None:
    """Updates are float32 on the wire; the table an update creates is in the model's format
    (fp8 here), and what is read back is the fp8 reference, in the hash map and in RocksDB."""
    keys, values = np.arange(40, dtype=np.int64), _fp8_rows(40, 6)
    expected = unpack(RowFormat.FP8, pack(RowFormat.FP8, values), 6)
    path = str(tmp_path / "rocks")
    volatile = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))
    seen: list[np.ndarray] = []
    appliers = [
        TierUpdateApplier(volatile, {"hps_et.m.t": 6}, lambda t, k, v: seen.append(v),
                          row_formats={"hps_et.m.t": RowFormat.FP8}),
        TierUpdateApplier.opening(lambda: RocksDBPersistentDB(PersistentDBConfig(path=path)), {"hps_et.m.t": 6},
                                  row_formats={"hps_et.m.t": RowFormat.FP8}),
    ]
    for applier in appliers:
        assert applier.row_formats == {"hps_et.m.t": RowFormat.FP8}
        applier.apply("hps_et.m.t", keys, values)
    assert len(seen) == 1 and seen[0] is values  # the hook (a cache refresh) gets the float32 rows
    reader = RocksDBPersistentDB(PersistentDBConfig(path=path, read_only=True))
    try:
        for db in (volatile, reader):
            assert db.row_format("hps_et.m.t") is RowFormat.FP8
            out = np.zeros((40, 6), np.float32)
            assert db.fetch("hps_et.m.t", keys, out).all()
            np.testing.assert_array_equal(out, expected)
    finally:
        reader.close()


def test_applier_refuses_a_row_its_format_cannot_store_naming_the_key() -> None:
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))
    hooked: list[str] = []
    applier = TierUpdateApplier(db, {"hps_et.m.t": 3}, lambda t, k, v: hooked.append(t),
                                row_formats={"hps_et.m.t": RowFormat.FP8})
    values = np.ones((4, 3), np.float32)
    values[2, 1] = np.inf
    with pytest.raises(RowValueError) as info:
        applier.apply("hps_et.m.t", np.array([10, 11, 12, 13], np.int64), values)
    assert isinstance(info.value, RequestError)  # refused and counted by the source, never retried
    assert info.value.position == 2
    message = str(info.value)
    assert message.startswith("update of hps_et.m.t (fp8): the row of key 12 cannot be stored: "), message
    assert "infinity" in message, message
    assert not db.fetch("hps_et.m.t", np.array([10, 11, 12, 13]), np.zeros((4, 3), np.float32)).any()
    assert hooked == [] and applier.applied_updates == 0


def test_applier_into_a_table_stored_in_another_format_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "rocks")
    db = RocksDBPersistentDB(PersistentDBConfig(path=path))
    db.create_table("hps_et.m.t", 2, RowFormat.INT8)
    db.close()
    applier = TierUpdateApplier.opening(lambda: RocksDBPersistentDB(PersistentDBConfig(path=path)),
                                        {"hps_et.m.t": 2}, row_formats={"hps_et.m.t": RowFormat.FP8})
    with pytest.raises(ConfigError, match="int8.*fp8"):
        applier.apply("hps_et.m.t", np.array([1]), np.ones((1, 2), np.float32))


def test_applier_row_formats_must_name_tables_it_applies() -> None:
    with pytest.raises(ConfigError, match="hps_et.m.other"):
        TierUpdateApplier(HashMapVolatileDB(), {"hps_et.m.t": 2}, row_formats={"hps_et.m.other": RowFormat.FP8})
    with pytest.raises(ConfigError, match="row_format must be a RowFormat"):
        TierUpdateApplier(HashMapVolatileDB(), {"hps_et.m.t": 2}, row_formats={"hps_et.m.t": "fp8"})  # type: ignore[dict-item]
    assert TierUpdateApplier(HashMapVolatileDB(), {"hps_et.m.t": 2}).row_formats == {"hps_et.m.t": RowFormat.FP32}


def test_exported_names() -> None:
    assert sorted(updates.__all__) == sorted([
        "FlushResult", "MalformedMessage", "OnApplied", "TierUpdateApplier", "UpdateApplier", "UpdateError",
        "UpdateSink", "UpdateSource", "consumer_group_id", "decode", "encode", "parse_topic",
        "topic_name",
    ])
    for name in updates.__all__:
        assert hasattr(updates, name)
