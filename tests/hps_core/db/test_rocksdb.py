"""RocksDBPersistentDB beyond the shared contract, on real databases in tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from rocksdict import Options, Rdict

from hps_core.db import PersistentDB, RocksDBPersistentDB, open_persistent_db
from hps_core.errors import ConfigError, TierBusyError, TierError

Encode = Callable[[np.ndarray, int], np.ndarray]
T = "hps_et.model.table"
REPO = Path(__file__).resolve().parents[3]


def loaded(path: Path, encode: Encode, dim: int = 4, n: int = 1_000, **kwargs: object) -> RocksDBPersistentDB:
    db = RocksDBPersistentDB(path=path, **kwargs)  # type: ignore[arg-type]
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
    db = RocksDBPersistentDB(path=tmp_path / "db")
    assert db.table_names() == ["hps_et.model.empty", T]
    assert (db.dim(T), db.dim("hps_et.model.empty")) == (3, 7)
    check_all(db, np.arange(1_000, dtype=np.int64), encode, 3)
    with pytest.raises(ConfigError, match="dim 3"):
        db.create_table(T, 4)
    db.close()


def test_column_family_naming_and_on_disk_format(tmp_path: Path) -> None:
    db = RocksDBPersistentDB(path=tmp_path / "db")
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
    db = RocksDBPersistentDB(path=tmp_path / "db", read_only=True)
    assert db.table_names() == ["hps_et.legacy.emb"]  # the empty one's dim is unknown yet
    db.create_table("hps_et.legacy.empty", 3)  # an existing family: learnt, not written
    assert db.dim("hps_et.legacy.empty") == 3
    out = np.zeros((1, 5), np.float32)
    assert db.fetch("hps_et.legacy.emb", np.array([42], np.int64), out).all()
    np.testing.assert_array_equal(out[0], np.arange(5))
    db.close()


def test_read_only_beside_a_writer_in_another_process(tmp_path: Path, encode: Encode) -> None:
    writer = loaded(tmp_path / "db", encode, dim=4, n=500)
    script = textwrap.dedent(
        f"""
        import numpy as np
        from hps_core.db import RocksDBPersistentDB
        db = RocksDBPersistentDB(path={str(tmp_path / "db")!r}, read_only=True)
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


def test_read_only_refuses_writes_clearly(tmp_path: Path, encode: Encode) -> None:
    loaded(tmp_path / "db", encode).close()
    db = RocksDBPersistentDB(path=tmp_path / "db", read_only=True)
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
        RocksDBPersistentDB(path=tmp_path / "missing", read_only=True)
    assert not (tmp_path / "missing").exists()


def test_second_writer_is_refused_with_a_hint(tmp_path: Path) -> None:
    first = RocksDBPersistentDB(path=tmp_path / "db")
    with pytest.raises(TierBusyError, match="read_only"):
        RocksDBPersistentDB(path=tmp_path / "db")
    first.close()
    RocksDBPersistentDB(path=tmp_path / "db").close()  # the lock is released on close


def test_small_batch_limits_chunk_without_changing_results(tmp_path: Path, encode: Encode) -> None:
    db = loaded(tmp_path / "db", encode, dim=3, n=1_003, max_get_batch_size=10, max_set_batch_size=7)
    check_all(db, np.arange(1_003, dtype=np.int64)[::-1].copy(), encode, 3)
    db.close()


def test_disable_wal_still_persists_after_close(tmp_path: Path, encode: Encode) -> None:
    loaded(tmp_path / "db", encode, dim=2, n=100, disable_wal=True).close()
    db = RocksDBPersistentDB(path=tmp_path / "db")
    check_all(db, np.arange(100, dtype=np.int64), encode, 2)
    db.close()


def test_stored_width_disagreeing_with_dim_is_a_tier_error(tmp_path: Path) -> None:
    db = RocksDBPersistentDB(path=tmp_path / "db")
    db.create_table(T, 4)
    db.close()
    raw = Rdict(str(tmp_path / "db"), Options(raw_mode=True))
    cf = raw.get_column_family(T)
    cf[(9).to_bytes(8, "little", signed=True)] = b"\x00" * 12  # 3 floats, not 4
    cf.close()
    raw.close()
    db = RocksDBPersistentDB(path=tmp_path / "db")
    with pytest.raises(TierError, match="4 float32"):
        db.fetch(T, np.array([9], np.int64), np.zeros((1, 4), np.float32))
    db.close()


def test_is_a_persistent_db(tmp_path: Path) -> None:
    db = RocksDBPersistentDB(path=tmp_path / "db")
    assert isinstance(db, PersistentDB)
    db.close()


@pytest.mark.parametrize("kwargs", [{"num_threads": 0}, {"max_get_batch_size": 0}, {"max_set_batch_size": "9"}])
def test_bad_settings_are_config_errors(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        RocksDBPersistentDB(path=tmp_path / "db", **kwargs)  # type: ignore[arg-type]


def test_open_persistent_db_from_config(tmp_path: Path) -> None:
    cfg = SimpleNamespace(
        type="rocks_db", path=str(tmp_path / "db"), read_only=False, num_threads=2,
        max_get_batch_size=100, max_set_batch_size=50,
    )
    db = open_persistent_db(cfg)
    assert isinstance(db, RocksDBPersistentDB)
    assert (db.path, db._max_get, db._max_set) == (cfg.path, 100, 50)
    db.close()
    assert open_persistent_db(SimpleNamespace(type="disabled")) is None
    with pytest.raises(ConfigError, match="persistent_db.type"):
        open_persistent_db(SimpleNamespace(type="leveldb"))
