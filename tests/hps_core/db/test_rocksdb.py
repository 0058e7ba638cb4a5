"""RocksDBPersistentDB beyond the shared contract, on real databases in tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from rocksdict import AccessType, Options, Rdict

from hps_core.config import PersistentDBConfig, TierType
from hps_core.db import PersistentDB, RocksDBPersistentDB, open_persistent_db
from hps_core.errors import ConfigError, StoredWidthError, TierBusyError, TierError
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack, unpack

Encode = Callable[[np.ndarray, int], np.ndarray]
T = "hps_et.model.table"
REPO = Path(__file__).resolve().parents[3]


def loaded(path: Path, encode: Encode, dim: int = 4, n: int = 1_000, **kwargs: object) -> RocksDBPersistentDB:
    ctor = {k: kwargs.pop(k) for k in ("disable_wal", "secondary_path") if k in kwargs}
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(path), **kwargs), **ctor)  # type: ignore[arg-type]
    db.create_table(T, dim)
    keys = np.arange(n, dtype=np.int64)
    db.insert(T, keys, encode(keys, dim))
    return db


def check_all(db: RocksDBPersistentDB, keys: np.ndarray, encode: Encode, dim: int) -> None:
    out = np.zeros((len(keys), dim), np.float32)
    assert db.fetch(T, keys, out).all()
    np.testing.assert_array_equal(out, encode(keys, dim))


def test_reopen_keeps_data_and_dims(tmp_path: Path, encode: Encode) -> None:
    db = loaded(tmp_path / "db", encode, dim=3)
    db.create_table("hps_et.model.empty", 7)
    db.close()
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    assert db.table_names() == ["hps_et.model.empty", T]
    assert (db.dim(T), db.dim("hps_et.model.empty")) == (3, 7)
    check_all(db, np.arange(1_000, dtype=np.int64), encode, 3)
    with pytest.raises(ConfigError, match="dim 3"):
        db.create_table(T, 4)
    db.close()


def test_column_family_naming_and_on_disk_format(tmp_path: Path) -> None:
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    db.create_table(T, 2)
    db.insert(T, np.array([1, -2], np.int64), np.array([[1.5, 2.5], [3.0, 4.0]], np.float32))
    db.close()
    assert T in Rdict.list_cf(str(tmp_path / "db"))
    raw = Rdict(str(tmp_path / "db"), Options(raw_mode=True))
    cf = raw.get_column_family(T)
    try:
        # HugeCTR's layout: 8-byte little-endian key, float32 row bytes
        assert cf[(1).to_bytes(8, "little", signed=True)] == np.array([1.5, 2.5], "<f4").tobytes()
        assert cf[(-2).to_bytes(8, "little", signed=True)] == np.array([3.0, 4.0], "<f4").tobytes()
    finally:
        cf.close()
        raw.close()


def test_hugectr_written_database_gets_dim_from_values(tmp_path: Path) -> None:
    """A database without our metadata key (written by HugeCTR) is still readable."""
    raw = Rdict(str(tmp_path / "db"), Options(raw_mode=True))
    cf = raw.create_column_family("hps_et.legacy.emb", Options(raw_mode=True))
    cf[(42).to_bytes(8, "little", signed=True)] = np.arange(5, dtype="<f4").tobytes()
    raw.create_column_family("hps_et.legacy.empty", Options(raw_mode=True)).close()
    cf.close()
    raw.close()
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db"), read_only=True))
    assert db.table_names() == ["hps_et.legacy.emb"]  # the empty one's dim is unknown yet
    assert db.row_format("hps_et.legacy.emb") is RowFormat.FP32  # no format key: fp32
    db.create_table("hps_et.legacy.empty", 3)  # an existing family: learnt, not written
    assert db.dim("hps_et.legacy.empty") == 3
    out = np.zeros((1, 5), np.float32)
    assert db.fetch("hps_et.legacy.emb", np.array([42], np.int64), out).all()
    np.testing.assert_array_equal(out[0], np.arange(5))
    db.close()


@pytest.mark.parametrize("read_only", [False, True])
def test_hugectr_rows_serve_as_fp32_and_refuse_a_compact_format(tmp_path: Path, read_only: bool) -> None:
    """A column family HugeCTR wrote (float32 values, no ``hps.format.`` or ``hps.dim.`` key)
    is fp32: it serves as fp32, and a compact format is refused with a message saying why,
    nothing stamped over its rows."""
    path = str(tmp_path / "db")
    rows = np.random.default_rng(1).normal(size=(20, 8)).astype("<f4")
    raw = Rdict(path, Options(raw_mode=True))
    cf = raw.create_column_family(T, Options(raw_mode=True))
    for key, row in enumerate(rows):
        cf[key.to_bytes(8, "little", signed=True)] = row.tobytes()
    cf.close()
    raw.close()
    db = RocksDBPersistentDB(PersistentDBConfig(path=path, read_only=read_only))
    try:
        for fmt in (RowFormat.INT8, RowFormat.FP8):
            with pytest.raises(ConfigError, match=rf"stores fp32 rows \(it holds rows written without a row "
                               rf"format, by HugeCTR.*\), but {fmt} was asked for.*serve it as fp32.*load it again"):
                db.create_table(T, 8, fmt)
        assert db.row_format(T) is RowFormat.FP32
        db.create_table(T, 8)
        out = np.zeros((20, 8), np.float32)
        assert db.fetch(T, np.arange(20, dtype=np.int64), out).all()
        np.testing.assert_array_equal(out, rows)
    finally:
        db.close()
    raw = Rdict(path, Options(raw_mode=True))
    try:
        assert raw.get(b"hps.format." + T.encode()) is None
    finally:
        raw.close()


def test_int8_rows_are_stored_packed_and_the_format_outlives_the_handle(tmp_path: Path) -> None:
    """An int8 table's values are ``8 + dim`` bytes (insert and bulk load alike), its format
    is stored beside its dim, and every later handle (secondary, read-only) serves and
    enforces it."""
    path = str(tmp_path / "db")
    db = RocksDBPersistentDB(PersistentDBConfig(path=path))
    db.create_table(T, 16, RowFormat.INT8)
    keys = np.arange(100, dtype=np.int64) * 7919
    values = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32)
    db.insert(T, keys[:50], values[:50])
    db.bulk_load(T, keys[50:], values[50:])
    secondary = RocksDBPersistentDB(PersistentDBConfig(path=path), secondary_path=tmp_path / "secondary")
    db.create_table("hps_et.model.new", 3, RowFormat.FP16)  # after the secondary opened
    db.close()
    packed = pack(RowFormat.INT8, values)
    raw = Rdict(path, Options(raw_mode=True))
    cf = raw.get_column_family(T)
    try:
        for i in (0, 49, 50, 99):
            stored = cf[int(keys[i]).to_bytes(8, "little", signed=True)]
            assert len(stored) == 8 + 16 and stored == packed[i].tobytes()
        assert raw[b"hps.format." + T.encode()] == b"3" and raw[b"hps.dim." + T.encode()] == b"16"
    finally:
        cf.close()
        raw.close()
    secondary.refresh()
    assert secondary.row_format(T) is RowFormat.INT8
    assert secondary.row_format("hps_et.model.new") is RowFormat.FP16
    reader = RocksDBPersistentDB(PersistentDBConfig(path=path, read_only=True))
    try:
        for handle in (secondary, reader):
            out = np.zeros((100, 16), np.float32)
            assert handle.fetch(T, keys, out).all()
            np.testing.assert_array_equal(out, unpack(RowFormat.INT8, packed, 16))
        with pytest.raises(ConfigError, match="stores int8 rows, but fp32 was asked for"):
            reader.create_table(T, 16)
        reader.create_table(T, 16, RowFormat.INT8)
    finally:
        secondary.close()
        reader.close()


def test_read_only_beside_a_writer_in_another_process(tmp_path: Path, encode: Encode) -> None:
    writer = loaded(tmp_path / "db", encode, dim=4, n=500)
    script = textwrap.dedent(
        f"""
        import numpy as np
        from hps_core.config import PersistentDBConfig
        from hps_core.db import RocksDBPersistentDB
        db = RocksDBPersistentDB(PersistentDBConfig(path={str(tmp_path / "db")!r}, read_only=True))
        out = np.zeros((3, db.dim({T!r})), np.float32)
        found = db.fetch({T!r}, np.array([0, 499, 500], np.int64), out)
        print(found.tolist(), out[1, 0], db.count({T!r}))
        db.close()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[True,", "True,", "False]", "499.0", "500"]
    writer.close()


def test_a_table_created_after_a_read_only_open_is_skipped_not_an_error(tmp_path: Path, encode: Encode) -> None:
    """Two models loading into one database at once: a read-only handle that lists the tables
    after another process's writer created one (its handle opened before) must not fail on it
    (it did: "column name ... does not exist", and the second model did not load)."""
    writer = loaded(tmp_path / "db", encode, dim=4, n=100)
    reader = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db"), read_only=True))
    try:
        writer.create_table("hps_et.other.t0", 8)
        writer.insert("hps_et.other.t0", np.arange(3, dtype=np.int64), np.ones((3, 8), np.float32))
        reader._load_tables()  # what an open does after listing the families; here after the create
        assert reader.dim(T) == 4
        check_all(reader, np.arange(100, dtype=np.int64), encode, 4)
    finally:
        reader.close()
        writer.close()


def test_read_only_refuses_writes_clearly(tmp_path: Path, encode: Encode) -> None:
    loaded(tmp_path / "db", encode).close()
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db"), read_only=True))
    assert db.read_only
    with pytest.raises(TierError, match="read-only"):
        db.insert(T, np.array([1], np.int64), np.zeros((1, 4), np.float32))
    with pytest.raises(TierError, match="read-only"):
        db.create_table("hps_et.model.new", 4)
    assert db.table_names() == [T]
    check_all(db, np.arange(1_000, dtype=np.int64), encode, 4)
    db.close()
    assert "hps_et.model.new" not in Rdict.list_cf(str(tmp_path / "db"))


def test_read_only_needs_an_existing_database(tmp_path: Path) -> None:
    with pytest.raises(TierError, match="no RocksDB database"):
        RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "missing"), read_only=True))
    assert not (tmp_path / "missing").exists()


def test_second_writer_is_refused_with_a_hint(tmp_path: Path) -> None:
    first = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    with pytest.raises(TierBusyError, match="read_only"):
        RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    first.close()
    RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db"))).close()  # the lock is released on close


def test_small_batch_limits_chunk_without_changing_results(tmp_path: Path, encode: Encode) -> None:
    db = loaded(tmp_path / "db", encode, dim=3, n=1_003, max_get_batch_size=10, max_set_batch_size=7)
    check_all(db, np.arange(1_003, dtype=np.int64)[::-1].copy(), encode, 3)
    db.close()


def test_disable_wal_still_persists_after_close(tmp_path: Path, encode: Encode) -> None:
    loaded(tmp_path / "db", encode, dim=2, n=100, disable_wal=True).close()
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    check_all(db, np.arange(100, dtype=np.int64), encode, 2)
    db.close()


def test_stored_width_disagreeing_with_dim_is_a_tier_error(tmp_path: Path) -> None:
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    db.create_table(T, 4)
    db.close()
    raw = Rdict(str(tmp_path / "db"), Options(raw_mode=True))
    cf = raw.get_column_family(T)
    cf[(9).to_bytes(8, "little", signed=True)] = b"\x00" * 12  # 3 floats, not 4
    cf.close()
    raw.close()
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    with pytest.raises(StoredWidthError, match="12 bytes, not 16 \\(a 4-wide fp32 row\\)"):
        db.fetch(T, np.array([9], np.int64), np.zeros((1, 4), np.float32))
    db.close()


def test_is_a_persistent_db(tmp_path: Path) -> None:
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    assert isinstance(db, PersistentDB)
    db.close()


@pytest.mark.parametrize("kwargs", [{"num_threads": 0}, {"max_get_batch_size": 0}, {"max_set_batch_size": -1}, {"max_set_batch_size": "9"}])
def test_bad_settings_are_config_errors(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db"), **kwargs))  # type: ignore[arg-type]


def test_open_persistent_db_from_config(tmp_path: Path) -> None:
    cfg = PersistentDBConfig(
        type=TierType.ROCKS_DB, path=str(tmp_path / "db"), read_only=False, num_threads=2,
        max_get_batch_size=100, max_set_batch_size=50,
    )
    db = open_persistent_db(cfg)
    assert isinstance(db, RocksDBPersistentDB)
    assert (db.path, db._max_get, db._max_set) == (cfg.path, 100, 50)
    db.close()
    assert open_persistent_db(PersistentDBConfig(type=TierType.DISABLED)) is None
    with pytest.raises(ConfigError, match="persistent_db.type"):
        open_persistent_db(PersistentDBConfig(type="leveldb"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="persistent_db.type"):
        open_persistent_db(PersistentDBConfig(type=TierType.HASH_MAP))  # a volatile tier


# --------------------------------------------------------------------------- bulk load


def all_rows(path: Path, table: str) -> dict[bytes, bytes]:
    raw = Rdict(str(path), Options(raw_mode=True), access_type=AccessType.read_only())
    cf = raw.get_column_family(table)
    try:
        return dict(cf.items())
    finally:
        cf.close()
        raw.close()


def test_bulk_load_round_trip_equals_write_batch_content(tmp_path: Path, encode: Encode) -> None:
    rng = np.random.default_rng(5)
    keys = rng.integers(-(1 << 62), 1 << 62, 20_000).astype(np.int64)
    keys[:50] = keys[100:150]  # duplicates inside the batch: the last occurrence wins
    keys[:6] = [0, -1, 1, 255, 256, np.iinfo(np.int64).min]
    values = encode(keys, 6) + rng.random((len(keys), 6), dtype=np.float32)
    by_sst = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "sst")))
    by_sst.create_table(T, 6)
    assert by_sst.bulk_load(T, keys, values) == len(np.unique(keys))
    by_batch = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "batch")))
    by_batch.create_table(T, 6)
    by_batch.insert(T, keys, values)
    for db in (by_sst, by_batch):
        probe = np.unique(keys)
        out = np.zeros((len(probe), 6), np.float32)
        assert db.fetch(T, probe, out).all()
        last = {int(k): i for i, k in enumerate(keys)}
        np.testing.assert_array_equal(out, values[[last[int(k)] for k in probe]])
        assert db.count(T) == len(probe)
    assert by_sst.estimate_rows(T) == len(np.unique(keys))
    by_sst.close()
    by_batch.close()
    assert all_rows(tmp_path / "sst", T) == all_rows(tmp_path / "batch", T)
    assert not any((tmp_path / "sst" / ".hps_ingest").iterdir())  # SST moved in, none left


def test_bulk_load_overwrites_and_empty_and_read_only(tmp_path: Path, encode: Encode) -> None:
    db = loaded(tmp_path / "db", encode, dim=4, n=100)
    keys = np.arange(50, 150, dtype=np.int64)
    db.bulk_load(T, keys, encode(keys, 4) + 1)
    assert db.bulk_load(T, np.empty(0, np.int64), np.empty((0, 4), np.float32)) == 0
    out = np.zeros((150, 4), np.float32)
    assert db.fetch(T, np.arange(150, dtype=np.int64), out).all()
    np.testing.assert_array_equal(out[:50], encode(np.arange(50), 4))
    np.testing.assert_array_equal(out[50:], encode(keys, 4) + 1)
    assert db.disk_bytes(T) > 0
    db.close()
    ro = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db"), read_only=True))
    with pytest.raises(TierError, match="read-only"):
        ro.bulk_load(T, keys, encode(keys, 4))
    with pytest.raises(TierError, match="read-only"):
        ro.put_meta("load.x", b"1")
    ro.close()


def test_meta_round_trip_survives_reopen(tmp_path: Path) -> None:
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    assert db.get_meta("load.t") is None
    db.put_meta("load.t", b"42")
    db.close()
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    assert db.get_meta("load.t") == b"42"
    db.delete_meta("load.t")
    assert db.get_meta("load.t") is None
    db.close()


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize("num_threads", [1, 2, 4])
def test_num_threads_gives_the_same_results(tmp_path: Path, encode: Encode, num_threads: int) -> None:
    writer = loaded(tmp_path / "db", encode, dim=8, n=30_000)
    writer.close()
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db"), read_only=True, num_threads=num_threads, max_get_batch_size=3_000))
    keys = np.random.default_rng(num_threads).integers(0, 40_000, 50_000).astype(np.int64)
    out = np.full((len(keys), 8), -1, np.float32)
    found = db.fetch(T, keys, out)
    np.testing.assert_array_equal(found, keys < 30_000)
    np.testing.assert_array_equal(out[found], encode(keys[found], 8))
    assert (out[~found] == -1).all()
    db.close()


# --------------------------------------------------------------------------- secondary


def test_secondary_refresh_sees_rows_the_writer_added(tmp_path: Path, encode: Encode) -> None:
    writer = loaded(tmp_path / "db", encode, dim=4, n=100)
    writer._family(T).flush(True)
    reader = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")), secondary_path=tmp_path / "secondary")
    assert reader.read_only and reader.secondary_path == str(tmp_path / "secondary")
    frozen = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db"), read_only=True))
    more = np.arange(100, 200, dtype=np.int64)
    writer.insert(T, more, encode(more, 4))  # stays in the WAL / memtable
    bulk = np.arange(200, 300, dtype=np.int64)
    writer.bulk_load(T, bulk, encode(bulk, 4))  # a new SST file
    writer.create_table("hps_et.model.new", 2)
    writer.insert("hps_et.model.new", np.array([7], np.int64), np.ones((1, 2), np.float32))
    probe = np.arange(300, dtype=np.int64)
    for db in (reader, frozen):
        assert db.fetch(T, probe, np.zeros((300, 4), np.float32)).sum() == 100
    reader.refresh()
    check_all(reader, probe, encode, 4)
    assert "hps_et.model.new" in reader.table_names()
    assert frozen.fetch(T, probe, np.zeros((300, 4), np.float32)).sum() == 100  # as opened
    frozen.refresh()  # a read-only handle reopens
    check_all(frozen, probe, encode, 4)
    update = np.arange(0, 10, dtype=np.int64)
    writer.insert(T, update, encode(update, 4) + 5)
    reader.refresh()  # incremental catch-up, no new table
    out = np.zeros((10, 4), np.float32)
    assert reader.fetch(T, update, out).all()
    np.testing.assert_array_equal(out, encode(update, 4) + 5)
    with pytest.raises(TierError, match="read-only"):
        reader.insert(T, update, encode(update, 4))
    for db in (reader, frozen, writer):
        db.close()


# --------------------------------------------------------------------------- error translation


@pytest.mark.parametrize("bug", [TypeError, AttributeError, AssertionError, NameError, KeyError])
def test_programming_errors_are_not_tier_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                bug: type[Exception]) -> None:
    """A bug inside a wrapped rocksdict call propagates as itself: a TierError would be
    retried (the update source) until stopped."""
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    db.create_table(T, 2)

    def broken(**_: object) -> None:
        raise bug("our bug")

    monkeypatch.setattr("hps_core.db.rocksdb.WriteBatch", broken)
    with pytest.raises(bug, match="our bug") as info:
        db.insert(T, np.arange(3, dtype=np.int64), np.ones((3, 2), np.float32))
    assert not isinstance(info.value, TierError)
    db.close()


def test_rocksdict_failures_are_tier_errors(tmp_path: Path) -> None:
    """What rocksdict raises against a real database (a bare Exception for a RocksDB status,
    DbClosedError for a closed handle) enters as a TierError naming the action."""
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    db.create_table(T, 2)
    with pytest.raises(TierBusyError, match="open"):  # the LOCK file is held
        RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    db._handle(T)
    db._db.close()  # the handle closed under the tier: rocksdict's DbClosedError
    with pytest.raises(TierError, match="insert") as info:
        db.insert(T, np.arange(3, dtype=np.int64), np.ones((3, 2), np.float32))
    assert type(info.value.__cause__).__name__ == "DbClosedError"
    with pytest.raises(TierError, match="close"):  # closing it again: the same translation
        db.close()


def test_filesystem_faults_of_rocksdict_are_tier_errors(tmp_path: Path) -> None:
    """rocksdict raises OSError subclasses for filesystem faults (here: its options file is a
    directory, IsADirectoryError; a full disk or a permission alike): a TierError naming the path,
    which the update source retries, not a raw error it would stop on as a bug."""
    path = tmp_path / "db"
    (path / "rocksdict-config.json").mkdir(parents=True)
    with pytest.raises(TierError, match=r"open.*db") as info:
        RocksDBPersistentDB(PersistentDBConfig(path=str(path)))
    assert isinstance(info.value.__cause__, OSError)


# --------------------------------------------------------------------------- crash safety (issue 19)


def _options_file(path: Path) -> Path:
    return max(path.glob("OPTIONS-*"), key=lambda p: int(p.name[8:]))


def _restore_options(path: Path, text: str) -> None:
    """Put an OPTIONS file with ``text`` above the newest one: what RocksDB leaves when a process
    is killed after the MANIFEST recorded a family created or dropped and before it wrote the
    OPTIONS file that says so (a window inside ``drop_column_family`` that Python cannot stop in)."""
    newest = int(_options_file(path).name[8:])
    (path / f"OPTIONS-{newest + 1:06d}").write_text(text)


def _raw_open(path: Path) -> Rdict:
    return Rdict(str(path), Options(raw_mode=True))


@pytest.mark.parametrize("change", ["drop", "create"])
def test_a_store_left_between_manifest_and_options_file_opens_in_every_mode(
        tmp_path: Path, encode: Encode, change: str, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 19: ``hps publish-model`` SIGKILLed while dropping a retired version's tables left
    ``Column family not found: hps_et.hps_embedding.table21`` on every later open (rocksdict opens
    the families of the newest OPTIONS file, written after the MANIFEST). The exact on-disk state
    is made here, shown to break a plain rocksdict open, then opened read-only, as a secondary and
    read-write (which repairs the OPTIONS file and the dropped table's metadata, logged)."""
    path = tmp_path / "db"
    db = loaded(path, encode)
    db.create_table("hps_et.model.gone", 4)
    db.close()
    before = _options_file(path).read_text()
    raw = _raw_open(path)
    if change == "drop":  # the family went, its OPTIONS file and dim key stay
        raw.drop_column_family("hps_et.model.gone")
    else:
        raw.create_column_family("hps_et.model.new", Options(raw_mode=True))
    raw.close()
    _restore_options(path, before)
    with pytest.raises(Exception, match="Column famil"):  # the breakage, as reported
        _raw_open(path)
    keys = np.arange(1_000, dtype=np.int64)
    tables = [T] if change == "drop" else ["hps_et.model.gone", T]  # a family without dim: not a table yet
    for kwargs in ({"read_only": True}, {"secondary_path": tmp_path / "secondary"}):
        reader = RocksDBPersistentDB(PersistentDBConfig(path=str(path), read_only=bool(kwargs.get("read_only"))),
                                     secondary_path=kwargs.get("secondary_path"))  # type: ignore[arg-type]
        assert reader.table_names() == tables
        check_all(reader, keys, encode, 4)
        reader.close()
    with caplog.at_level("WARNING", logger="hps_core.db.rocksdb"):
        writer = RocksDBPersistentDB(PersistentDBConfig(path=str(path)))
    assert "does not match the MANIFEST" in caplog.text
    if change == "drop":
        assert "hps_et.model.gone" in caplog.text and writer.get_meta("dim.hps_et.model.gone") is None
    check_all(writer, keys, encode, 4)
    writer.close()
    _raw_open(path).close()  # the read-write open wrote a fresh OPTIONS file


def test_an_interrupted_drop_is_finished_by_dropping_again_and_never_skips_a_later_load(
        tmp_path: Path, encode: Encode) -> None:
    """drop_table deletes the load marker, then the family, then dim and format. The states a
    kill can leave: (a) marker gone, table still there: it serves, and a second drop finishes;
    (b) the old order's remains, the family gone with its dim, format and a complete marker
    still stored: a read-write open removes them, so loading the same name again really loads."""
    from hps_core.config import TableConfig
    from hps_core.formats import write_sparse_model
    from hps_core.loader import load_table, read_marker

    path = tmp_path / "db"
    keys = np.arange(1_000, dtype=np.int64)
    db = loaded(path, encode)
    db.put_meta(f"load.{T}", b'{"rows": 1000, "total": 1000, "fingerprint": "x"}')
    db.delete_meta(f"load.{T}")  # (a): killed after the first step
    db.close()
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(path)))
    check_all(db, keys, encode, 4)
    db.drop_table(T)
    assert db.table_names() == []
    sparse = tmp_path / "sparse"
    write_sparse_model(sparse, keys, encode(keys, 4))
    table = TableConfig(name="table", dim=4, default_value=0.0, max_keys_per_sample=1, sparse_file=str(sparse),
                        qualified_name=T)
    assert load_table(db, table) == 1_000
    db.close()
    raw = _raw_open(path)  # (b): the family dropped, nothing else (the old order, killed)
    raw.drop_column_family(T)
    raw.close()
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(path)))
    assert db.table_names() == [] and read_marker(db, T) is None and db.get_meta(f"dim.{T}") is None
    assert load_table(db, table) == 1_000  # not skipped as "already loaded"
    check_all(db, keys, encode, 4)
    db.close()


def test_sst_files_of_a_killed_bulk_load_are_removed_by_the_next_writer(tmp_path: Path, encode: Encode) -> None:
    path = tmp_path / "db"
    loaded(path, encode).close()
    leftover = path / ".hps_ingest" / f"{T}.99999.0.sst"
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(b"half an SST file")
    RocksDBPersistentDB(PersistentDBConfig(path=str(path), read_only=True)).close()
    assert leftover.exists()  # a reader never touches a writer's files
    RocksDBPersistentDB(PersistentDBConfig(path=str(path))).close()
    assert not leftover.exists()
