"""hps_core.loader: resumable, idempotent loads into real RocksDB and the hash map."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rocksdict import AccessType, Options, Rdict

from hps_core.config import (
    PersistentDBConfig,
    RedisConfig,
    TableConfig,
    VolatileDBConfig,
    load_config,
)
from hps_core.db import HashMapVolatileDB, RocksDBPersistentDB
from hps_core.errors import ConfigError, FormatError, RowValueError
from hps_core.formats import write_npz, write_sparse_model
from hps_core.loader import (
    LoadMarker,
    fingerprint,
    load_config_tables,
    load_table,
    read_marker,
    select_tables,
)
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack, unpack

REPO = Path(__file__).resolve().parents[2]
DIM = 8


def make_table(folder: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.permutation(np.arange(n, dtype=np.int64) * 3 - n)
    vectors = rng.random((n, DIM), dtype=np.float32)
    write_sparse_model(folder, keys, vectors)
    return keys, vectors


def table_config(folder: Path, name: str = "cat0") -> TableConfig:
    return TableConfig(name=name, dim=DIM, default_value=0.0, max_keys_per_sample=1,
                       sparse_file=str(folder), qualified_name=f"hps_et.m.{name}")


def all_rows(path: Path, table: str) -> dict[bytes, bytes]:
    raw = Rdict(str(path), Options(raw_mode=True), access_type=AccessType.read_only())
    cf = raw.get_column_family(table)
    try:
        return dict(cf.items())
    finally:
        cf.close()
        raw.close()


def test_load_then_rerun_writes_nothing(tmp_path: Path) -> None:
    keys, vectors = make_table(tmp_path / "cat0", 20_000)
    table = table_config(tmp_path / "cat0")
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    assert load_table(db, table, chunk_rows=3_000) == 20_000
    out = np.zeros((len(keys), DIM), np.float32)
    assert db.fetch(table.qualified_name, keys, out).all()
    np.testing.assert_array_equal(out, vectors)
    marker = read_marker(db, table.qualified_name)
    assert marker == LoadMarker(20_000, 20_000, fingerprint(tmp_path / "cat0"))
    seq = db._db.latest_sequence_number()
    start = time.perf_counter()
    assert load_table(db, table, chunk_rows=3_000) == 0
    assert time.perf_counter() - start < 0.5
    assert db._db.latest_sequence_number() == seq  # not one write
    db.close()


def test_changed_source_is_loaded_again(tmp_path: Path) -> None:
    make_table(tmp_path / "cat0", 1_000, seed=1)
    table = table_config(tmp_path / "cat0")
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    load_table(db, table)
    keys, vectors = make_table(tmp_path / "cat0", 1_000, seed=2)
    assert load_table(db, table) == 1_000
    out = np.zeros((len(keys), DIM), np.float32)
    assert db.fetch(table.qualified_name, keys, out).all()
    np.testing.assert_array_equal(out, vectors)
    db.close()


def test_partial_marker_resumes_where_it_stopped(tmp_path: Path) -> None:
    make_table(tmp_path / "cat0", 10_000)
    table = table_config(tmp_path / "cat0")
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    db.create_table(table.qualified_name, DIM)
    db.put_meta(f"load.{table.qualified_name}",
                LoadMarker(4_000, 10_000, fingerprint(tmp_path / "cat0")).encode())
    assert load_table(db, table, chunk_rows=1_000) == 6_000
    db.close()


def test_killed_load_resumes_to_the_same_content(tmp_path: Path) -> None:
    """A real process kill (SIGKILL) in the middle of a load, then a rerun: the database
    ends byte-for-byte equal to a clean load, and the rerun skipped what was committed."""
    n, chunk = 120_000, 2_000
    make_table(tmp_path / "cat0", n)
    table = table_config(tmp_path / "cat0")
    script = textwrap.dedent(f"""
        import sys, time
        from hps_core.config import PersistentDBConfig, TableConfig
        from hps_core.db import RocksDBPersistentDB
        from hps_core.loader import load_table
        db = RocksDBPersistentDB(PersistentDBConfig(path={str(tmp_path / "db")!r}))
        put = db.put_meta
        def put_meta(name, value):
            put(name, value)
            print("committed", flush=True)
            time.sleep(0.02)  # give the parent time to kill mid-load
        db.put_meta = put_meta
        table = TableConfig(name="cat0", dim={DIM}, default_value=0.0, max_keys_per_sample=1,
                            sparse_file={str(tmp_path / "cat0")!r}, qualified_name="hps_et.m.cat0")
        load_table(db, table, chunk_rows={chunk})
        print("done", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for _ in range(10):
        assert proc.stdout.readline().strip() == "committed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))  # the killed writer's lock is gone
    marker = read_marker(db, table.qualified_name)
    assert marker is not None and 10 * chunk <= marker.rows < n
    written = load_table(db, table, chunk_rows=chunk)
    assert written == n - marker.rows
    db.close()
    clean = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "clean")))
    load_table(clean, table, chunk_rows=chunk)
    clean.close()
    assert all_rows(tmp_path / "db", "hps_et.m.cat0") == all_rows(tmp_path / "clean", "hps_et.m.cat0")


def test_hash_map_load_takes_the_leading_share(tmp_path: Path) -> None:
    keys, vectors = make_table(tmp_path / "cat0", 5_000)
    table = table_config(tmp_path / "cat0")
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))
    assert load_table(db, table, fraction=0.4, chunk_rows=700) == 2_000
    out = np.zeros((5_000, DIM), np.float32)
    found = db.fetch(table.qualified_name, keys, out)
    assert found[:2_000].all() and not found[2_000:].any()
    np.testing.assert_array_equal(out[:2_000], vectors[:2_000])
    assert load_table(db, table, rows=10) == 10  # no markers in the hash map: it just upserts


def test_npz_table(tmp_path: Path) -> None:
    keys = np.arange(300, dtype=np.int64)
    vectors = np.random.default_rng(0).random((300, DIM), dtype=np.float32)
    write_npz(tmp_path / "t.npz", keys, vectors)
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    table = table_config(tmp_path / "t.npz", "npz")
    assert load_table(db, table) == 300
    assert load_table(db, table) == 0
    out = np.zeros((300, DIM), np.float32)
    assert db.fetch(table.qualified_name, keys, out).all()
    np.testing.assert_array_equal(out, vectors)
    db.close()


def write_config(tmp_path: Path, volatile: dict[str, object] | None = None) -> Path:
    make_table(tmp_path / "m" / "cat0", 1_000, seed=3)
    make_table(tmp_path / "m" / "cat1", 500, seed=4)
    doc = {
        "volatile_db": volatile or {"type": "hash_map", "initial_cache_rate": 0.5},
        "persistent_db": {"type": "rocks_db", "path": "rocksdb"},
        "models": [{
            "model": "m", "sparse_files": ["m/cat0", "m/cat1"],
            "embedding_table_names": ["cat0", "cat1"],
            "embedding_vecsize_per_table": [DIM, DIM],
            "maxnum_catfeature_query_per_table_per_sample": [1, 1],
        }],
    }
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(doc))
    return path


def test_load_config_tables_and_selection(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    assert [t.name for t in select_tables(config, ["m"], ["hps_et.m.cat1"])] == ["cat1"]
    with pytest.raises(ConfigError, match="nope"):
        select_tables(config, None, ["nope"])
    report = load_config_tables(config, select_tables(config), tier="persistent")
    assert report == {"persistent": {"hps_et.m.cat0": 1_000, "hps_et.m.cat1": 500}}
    again = load_config_tables(config, select_tables(config), tier="persistent")
    assert again == {"persistent": {"hps_et.m.cat0": 0, "hps_et.m.cat1": 0}}
    with pytest.raises(ConfigError, match="in host shared memory, filled by the first serving process"):
        load_config_tables(config, select_tables(config), tier="volatile")


@pytest.mark.redis
def test_volatile_load_writes_the_partition_markers_before_the_rows(tmp_path: Path) -> None:
    """``hps load --tier volatile`` marks the partitions it loads, so that a server's refill
    monitor does not take them for lost (and its own advice to run it is sound); the markers
    go in before the rows, so a node emptied after the load loses them with its rows."""
    from hps_core.db import RedisVolatileDB
    from hps_core.db.base import PartitionMarkers
    from tests.redis_servers import RedisProcesses

    marked_at_first_insert: list[dict[str, list[int]]] = []

    class Spy(RedisVolatileDB):
        def insert(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
            if not marked_at_first_insert:
                marked_at_first_insert.append(self.check_markers([table]).missing)
            super().insert(table, keys, values)

    with RedisProcesses.single(tmp_path / "redis") as server:
        config = load_config(write_config(
            tmp_path, {"type": "redis_cluster", "address": server.address, "num_partitions": 4,
                       "initial_cache_rate": 0.5},
        ))
        report = load_config_tables(config, select_tables(config), tier="volatile")
        assert report == {"volatile": {"hps_et.m.cat0": 500, "hps_et.m.cat1": 250}}
        db = RedisVolatileDB(VolatileDBConfig(redis=RedisConfig(address=server.address), num_partitions=4))
        try:
            assert isinstance(db, PartitionMarkers)
            assert db.check_markers(["hps_et.m.cat0", "hps_et.m.cat1"]).missing == {}
            spy = Spy(VolatileDBConfig(redis=RedisConfig(address=server.address), num_partitions=4))
            try:
                load_table(spy, table_config(tmp_path / "m" / "cat0", "spied"), fraction=0.5)
            finally:
                spy.close()
            assert marked_at_first_insert == [{}]  # every marker was there before the first row
        finally:
            db.close()


# --------------------------------------------------------------------------- row formats


def open_tier(kind: str, tmp_path: Path) -> Any:
    if kind == "rocksdb":  # bulk_load: the rows are packed into SST files
        return RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db")))
    return HashMapVolatileDB(VolatileDBConfig(num_partitions=2))  # insert


@pytest.mark.parametrize("kind", ["rocksdb", "hash_map"])
@pytest.mark.parametrize("fmt", list(RowFormat))
def test_a_table_is_loaded_in_its_row_format(tmp_path: Path, kind: str, fmt: RowFormat) -> None:
    keys, vectors = make_table(tmp_path / "cat0", 3_000)
    vectors *= np.linspace(-50, 50, DIM, dtype=np.float32)  # signs and magnitudes for the scales
    write_sparse_model(tmp_path / "cat0", keys, vectors)
    table = dataclasses.replace(table_config(tmp_path / "cat0"), row_format=fmt)
    db = open_tier(kind, tmp_path)
    try:
        assert load_table(db, table, chunk_rows=1_000) == 3_000
        assert db.row_format(table.qualified_name) is fmt
        out = np.zeros((len(keys), DIM), np.float32)
        assert db.fetch(table.qualified_name, keys, out).all()
        np.testing.assert_array_equal(out, unpack(fmt, pack(fmt, vectors), DIM))  # the tier's packing, bit for bit
    finally:
        db.close()


@pytest.mark.parametrize("fmt", [RowFormat.INT8, RowFormat.FP32])  # fp32 tiers store any float: the load checks
@pytest.mark.parametrize("kind", ["rocksdb", "hash_map"])
def test_a_nan_in_a_sparse_file_fails_the_load_naming_file_table_and_key(tmp_path: Path, kind: str,
                                                                          fmt: RowFormat) -> None:
    keys, vectors = make_table(tmp_path / "cat0", 3_000)
    bad = 2_345  # in the third chunk of 1,000
    vectors[bad, 3] = np.nan
    write_sparse_model(tmp_path / "cat0", keys, vectors)
    table = dataclasses.replace(table_config(tmp_path / "cat0"), row_format=fmt)
    db = open_tier(kind, tmp_path)
    try:
        with pytest.raises(RowValueError) as info:
            load_table(db, table, chunk_rows=1_000)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / 'cat0'}: table 'hps_et.m.cat0' ({fmt}): "), message
        assert f"the row of key {keys[bad]} (row {bad} of the file)" in message, message
        assert "NaN" in message, message
        assert info.value.position == bad
        found = db.fetch(table.qualified_name, keys, np.zeros((len(keys), DIM), np.float32))
        assert found[:2_000].all() and not found[2_000:].any()  # the chunks before it, nothing of its own
        if kind == "rocksdb":
            assert read_marker(db, table.qualified_name) == LoadMarker(2_000, 3_000, fingerprint(tmp_path / "cat0"))
    finally:
        db.close()


def test_a_table_stored_in_another_format_fails_the_load_naming_both(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    doc = json.loads(path.read_text())
    doc["models"][0]["embedding_format_per_table"] = "int8"
    path.write_text(json.dumps(doc))
    config = load_config(path)
    assert load_config_tables(config, select_tables(config))["persistent"]["hps_et.m.cat0"] == 1_000
    doc["models"][0]["embedding_format_per_table"] = ["int8", "fp32"]  # cat1 was stored as int8
    path.write_text(json.dumps(doc))
    config = load_config(path)
    with pytest.raises(ConfigError) as info:
        load_config_tables(config, select_tables(config))
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "'hps_et.m.cat1'" in message and "int8" in message and "fp32" in message, message
    assert "embedding_format_per_table" in message, message


# --------------------------------------------------------------------------- duplicate keys
# One rule at every entry point (hps_core/formats/hugectr.py): a table file's keys are unique.
# The writer and publish-model refuse duplicates (tests/hps_core/formats, test_publishing.py);
# here every load that writes rows does, before writing any: load_table into each tier kind,
# `hps load`, and a server's start (the serving path, in-process).


def _duplicated_table(folder: Path, n: int = 3_000) -> tuple[np.ndarray, int]:
    """A table file whose rows 2,500 and 2,900 repeat the keys of rows 10 and 20 (written raw:
    the writer refuses it); its keys and the smallest repeated key."""
    keys, vectors = make_table(folder, n)
    keys[2_500], keys[2_900] = keys[10], keys[20]
    keys.astype("<i8").tofile(folder / "key")
    return keys, int(min(keys[10], keys[20]))


def _open_host_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from hps_core.db import shm_store as shm
    from hps_core.db.shared_hash_map import SharedHashMapVolatileDB

    root = tmp_path / "shm"
    root.mkdir()
    monkeypatch.setenv(shm.SHM_DIR_ENV, str(root))
    monkeypatch.delenv(shm.KEEPER_ENV, raising=False)
    return SharedHashMapVolatileDB(VolatileDBConfig(shared_memory_name="dups", num_partitions=2))


@pytest.mark.parametrize("kind", ["rocksdb", "hash_map", "host_store"])
def test_a_sparse_file_with_duplicate_keys_fails_the_load_before_writing_anything(
        tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    keys, repeated = _duplicated_table(tmp_path / "cat0")
    table = table_config(tmp_path / "cat0")
    db = _open_host_store(tmp_path, monkeypatch) if kind == "host_store" else open_tier(kind, tmp_path)
    try:
        with pytest.raises(FormatError) as info:
            load_table(db, table, chunk_rows=1_000)
        assert str(info.value).startswith(
            f"{tmp_path / 'cat0'}: table 'hps_et.m.cat0': 2 duplicate key(s), e.g. {repeated}; "
            "each key may appear once"), info.value
        if kind == "host_store":  # the store the refused fill created is gone
            assert table.qualified_name not in db.table_names()
            assert not list((tmp_path / "shm").rglob("*hps_et.m.cat0*"))
        else:
            assert not db.fetch(table.qualified_name, keys, np.zeros((len(keys), DIM), np.float32)).any()
        if kind == "rocksdb":
            assert read_marker(db, table.qualified_name) is None
    finally:
        db.close()


def test_only_the_share_a_tier_loads_must_be_unique(tmp_path: Path) -> None:
    """A tier loading the leading rows never serves the others: the check covers what it reads."""
    keys, _ = _duplicated_table(tmp_path / "cat0")
    table = table_config(tmp_path / "cat0")
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=2))
    assert load_table(db, table, rows=2_500) == 2_500  # rows 0..2,499: unique
    with pytest.raises(FormatError, match=r"\(its first 2501 rows, the share this tier loads\): 1 duplicate"):
        load_table(db, table, rows=2_501)


def test_hps_load_and_a_servers_start_refuse_duplicate_keys_naming_the_file(tmp_path: Path) -> None:
    from hps_core.server import HierarchicalParameterServer

    path = write_config(tmp_path)
    _, repeated = _duplicated_table(tmp_path / "m" / "cat1", n=3_000)
    expected = f"{tmp_path / 'm' / 'cat1'}: table 'hps_et.m.cat1': 2 duplicate key(s), e.g. {repeated}"
    hps = subprocess.run([str(REPO / ".venv" / "bin" / "hps"), "load", "--config", str(path), "--tier", "persistent"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert hps.returncode != 0 and expected in hps.stderr, hps.stderr
    config = load_config(path)
    with pytest.raises(FormatError, match=re.escape(expected)):
        HierarchicalParameterServer(config, cache_device="cpu")
