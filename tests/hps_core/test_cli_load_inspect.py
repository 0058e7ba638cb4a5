"""``hps load`` then ``hps inspect``, through the installed console script."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hps_core.config import PersistentDBConfig
from hps_core.db import RocksDBPersistentDB
from hps_core.formats import write_npy_pair, write_sparse_model
from hps_core.row_formats import RowFormat

REPO = Path(__file__).resolve().parents[2]
HPS = REPO / ".venv" / "bin" / "hps"
DIM = 4

pytestmark = pytest.mark.skipif(not HPS.exists(), reason="console script .venv/bin/hps not installed")


def hps(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HPS), *args], capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, n in (("cat0", 3_000), ("cat1", 1_200)):
        write_sparse_model(tmp_path / "dlrm" / name, np.arange(n, dtype=np.int64) * 7,
                           rng.random((n, DIM), dtype=np.float32))
    doc = {
        "supportlonglong": True,
        "volatile_db": {"type": "parallel_hash_map", "initial_cache_rate": 0.5},
        "persistent_db": {"type": "rocks_db", "path": "rocksdb"},
        "models": [{
            "model": "dlrm", "sparse_files": ["dlrm/cat0", "dlrm/cat1"],
            "embedding_table_names": ["cat0", "cat1"],
            "embedding_vecsize_per_table": [DIM, DIM],
            "maxnum_catfeature_query_per_table_per_sample": [1, 1],
        }],
    }
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(doc))
    return path


def test_load_then_inspect(config: Path) -> None:
    first = hps("load", "--config", str(config), "--tables", "cat0", "--chunk-rows", "1000")
    assert first.returncode == 0, first.stderr
    assert "hps_et.dlrm.cat0: 3000 rows written" in first.stdout
    everything = hps("load", "--config", str(config))
    assert everything.returncode == 0, everything.stderr
    assert "hps_et.dlrm.cat0: already loaded" in everything.stdout
    assert "hps_et.dlrm.cat1: 1200 rows written" in everything.stdout

    report = hps("inspect", "--config", str(config), "--json")
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    rows = {r["table"]: r for r in data["tables"]}
    assert rows["hps_et.dlrm.cat0"]["file_rows"] == 3_000
    assert rows["hps_et.dlrm.cat0"]["rocksdb_rows"] == 3_000
    assert rows["hps_et.dlrm.cat1"]["load"] == "complete"
    assert rows["hps_et.dlrm.cat1"]["rocksdb_bytes"] > 1_200 * DIM * 4 * 0.5
    assert rows["hps_et.dlrm.cat0"]["volatile_rows"] == 1_500
    assert rows["hps_et.dlrm.cat0"]["volatile_bytes"] > 1_500 * DIM * 4
    assert data["rocksdb"]["exists"] and data["rocksdb"]["dir_bytes"] > 0
    assert data["redis"] is None and "redis_rows" not in rows["hps_et.dlrm.cat0"]
    assert rows["hps_et.dlrm.cat0"]["cache_bytes_per_row"] == 4 * DIM  # gpucache: its value store's stride

    text = hps("inspect", "--config", str(config))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split()[:5] == ["table", "dim", "format", "row", "size"]
    assert any(line.startswith("hps_et.dlrm.cat1") and "complete" in line for line in lines)
    assert len({len(line) for line in lines[:3]}) == 1  # aligned columns


def test_load_npy_and_inspect_rocksdb_alone(tmp_path: Path) -> None:
    keys = np.arange(500, dtype=np.int64)
    vectors = np.random.default_rng(1).random((500, DIM), dtype=np.float32)
    write_npy_pair(tmp_path / "table", keys, vectors)
    db_path = tmp_path / "db"
    result = hps("load", "--npy", str(tmp_path / "table"), "--table", "hps_et.m.t", "--dim", str(DIM),
                 "--rocksdb", str(db_path))
    assert result.returncode == 0, result.stderr
    assert "hps_et.m.t: 500 rows written" in result.stdout
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(db_path), read_only=True))
    out = np.zeros((500, DIM), np.float32)
    assert db.fetch("hps_et.m.t", keys, out).all()
    np.testing.assert_array_equal(out, vectors)
    db.close()
    report = hps("inspect", "--rocksdb", str(db_path), "--json")
    assert report.returncode == 0, report.stderr
    (row,) = json.loads(report.stdout)["tables"]
    assert (row["table"], row["dim"], row["rocksdb_rows"]) == ("hps_et.m.t", DIM, 500)
    assert (row["format"], row["rocksdb_format"], row["row_bytes"]) == ("fp32", "fp32", 4 * DIM)


def test_load_and_inspect_compact_formats(config: Path, tmp_path: Path) -> None:
    """Tables load in their configured formats; inspect shows, per table and tier, the format
    and the bytes per row (packed, and the hash map's estimate with its overhead), and names a
    table RocksDB stores in another format than the config's, which a load then refuses."""
    from hps_core.config import load_config
    from hps_core.db.hash_map import estimate_bytes_per_row

    doc = json.loads(config.read_text())
    doc["models"][0]["embedding_format_per_table"] = ["int8", "fp16"]
    config.write_text(json.dumps(doc))
    loaded = hps("load", "--config", str(config))
    assert loaded.returncode == 0, loaded.stderr
    report = hps("inspect", "--config", str(config), "--json")
    assert report.returncode == 0, report.stderr
    rows = {r["table"]: r for r in json.loads(report.stdout)["tables"]}
    overflow = load_config(config).volatile_db.overflow
    for table, fmt in (("hps_et.dlrm.cat0", RowFormat.INT8), ("hps_et.dlrm.cat1", RowFormat.FP16)):
        assert (rows[table]["format"], rows[table]["rocksdb_format"]) == (fmt.value, fmt.value)
        assert rows[table]["row_bytes"] == fmt.row_bytes(DIM)
        assert rows[table]["volatile_bytes_per_row"] == round(estimate_bytes_per_row(DIM, fmt, overflow))
    assert rows["hps_et.dlrm.cat0"]["row_bytes"] == 8 + DIM

    doc["models"][0]["embedding_format_per_table"] = "fp16"  # cat0 is stored as int8
    config.write_text(json.dumps(doc))
    text = hps("inspect", "--config", str(config))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    cat0 = next(line.split() for line in lines if line.startswith("hps_et.dlrm.cat0"))
    assert cat0[:5] == ["hps_et.dlrm.cat0", str(DIM), "fp16", "8", "B"] and "int8" in cat0
    assert ("format mismatch: hps_et.dlrm.cat0 is int8 in rocksdb but fp16 in the config: a server refuses to "
            "load it") in text.stdout
    refused = hps("load", "--config", str(config))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith(f"hps load: error: {config}: table 'hps_et.dlrm.cat0' "), refused.stderr
    assert "int8" in refused.stderr and "fp16" in refused.stderr, refused.stderr

    npy = hps("load", "--npy", str(tmp_path / "dlrm" / "cat1"), "--table", "hps_et.other.t", "--dim", str(DIM),
              "--format", "fp8", "--rocksdb", str(tmp_path / "db"))
    assert npy.returncode == 0, npy.stderr
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "db"), read_only=True))
    try:
        assert db.row_format("hps_et.other.t") is RowFormat.FP8
    finally:
        db.close()


def test_load_format_is_the_configs_for_npy_tables(config: Path, tmp_path: Path) -> None:
    """``--format`` is for ``--npy`` only; an --npy table the config declares is loaded in the
    config's format, and a --format saying otherwise is refused naming both."""
    doc = json.loads(config.read_text())
    doc["models"][0]["embedding_format_per_table"] = ["int8", "fp16"]
    config.write_text(json.dumps(doc))
    alone = hps("load", "--config", str(config), "--format", "fp8")
    assert alone.returncode == 1 and "Traceback" not in alone.stderr
    assert "--format fp8 is for --npy tables" in alone.stderr, alone.stderr
    npy = ("load", "--config", str(config), "--npy", str(tmp_path / "dlrm" / "cat1"), "--table", "hps_et.dlrm.cat1",
           "--dim", str(DIM))
    differing = hps(*npy, "--format", "int8")
    assert differing.returncode == 1 and "Traceback" not in differing.stderr
    assert f"--format int8: {config} declares hps_et.dlrm.cat1 as fp16" in differing.stderr, differing.stderr
    assert not (config.parent / "rocksdb").exists()  # refused before any tier was opened
    for extra in ((), ("--format", "fp16")):
        loaded = hps(*npy, *extra)
        assert loaded.returncode == 0, loaded.stderr
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(config.parent / "rocksdb"), read_only=True))
    try:
        assert db.row_format("hps_et.dlrm.cat1") is RowFormat.FP16
    finally:
        db.close()


@pytest.mark.redis
def test_inspect_shows_redis_and_cache_formats_and_bytes_per_row(config: Path, tmp_path: Path) -> None:
    """Per tier the format and bytes per row: Redis's stored format (a mismatch with the
    config's named) and its memory per row, and the cache's row stride for a model with one."""
    from hps_core.cache.base import row_stride
    from tests.redis_servers import RedisProcesses

    doc = json.loads(config.read_text())
    doc["models"][0]["embedding_format_per_table"] = ["int8", "fp16"]
    config.write_text(json.dumps(doc))
    with RedisProcesses.single(tmp_path / "redis") as server:
        loaded = hps("load", "--config", str(config), "--redis", server.address, "--tier", "volatile")
        assert loaded.returncode == 0, loaded.stderr  # initial_cache_rate 0.5: half of each table
        report = hps("inspect", "--config", str(config), "--redis", server.address, "--json")
        assert report.returncode == 0, report.stderr
        data = json.loads(report.stdout)
        assert data["redis"] == {"address": server.address, "error": None}
        rows = {r["table"]: r for r in data["tables"]}
        for table, fmt, n in (("hps_et.dlrm.cat0", RowFormat.INT8, 1_500), ("hps_et.dlrm.cat1", RowFormat.FP16, 600)):
            row = rows[table]
            assert (row["redis_rows"], row["redis_format"]) == (n, fmt.value)
            assert fmt.row_bytes(DIM) + 8 <= row["redis_bytes_per_row"] == round(row["redis_bytes"] / n)
            assert row["cache_bytes_per_row"] == row_stride(fmt, DIM)
        assert rows["hps_et.dlrm.cat0"]["cache_bytes_per_row"] == 12  # 8 + 4 bytes: already a multiple of 4

        doc["models"][0]["embedding_format_per_table"] = "fp16"  # cat0 is stored as int8 in Redis
        doc["models"][0]["gpucache"] = False
        config.write_text(json.dumps(doc))
        text = hps("inspect", "--config", str(config), "--redis", server.address)
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert "redis format" in lines[0] and "redis row~" in lines[0] and "cache row" not in lines[0]
        assert len({len(line) for line in lines[:3]}) == 1  # aligned columns
        assert ("format mismatch: hps_et.dlrm.cat0 is int8 in redis but fp16 in the config: a server refuses to "
                "load it") in text.stdout
        alone = hps("inspect", "--redis", server.address, "--json")
        assert alone.returncode == 0, alone.stderr
        assert [(r["table"], r["format"], r["redis_format"]) for r in json.loads(alone.stdout)["tables"]] == [
            ("hps_et.dlrm.cat0", "int8", "int8"), ("hps_et.dlrm.cat1", "fp16", "fp16")]
    gone = hps("inspect", "--config", str(config), "--redis", server.address, "--json")
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["redis"]["error"]  # unreachable: said, the rest reported


def test_errors_are_one_line_with_a_fix(config: Path) -> None:
    result = hps("load", "--config", str(config), "--tier", "volatile")
    assert result.returncode == 1
    assert "in host shared memory" in result.stderr and "Traceback" not in result.stderr
    result = hps("load", "--npy", "x", "--rocksdb", "y")
    assert result.returncode == 1 and "--table" in result.stderr


def test_inspect_opens_rocksdb_through_the_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """inspect builds its tier with hps_core.db.open_persistent_db (read-only, one thread),
    like every other caller, not by naming RocksDBPersistentDB."""
    import hps_core.db
    from hps_core.config import ParameterServerConfig, TierType
    from hps_core.inspection import inspect_tiers

    settings = PersistentDBConfig(type=TierType.ROCKS_DB, path=str(tmp_path / "db"))
    writer = RocksDBPersistentDB(settings)
    writer.create_table("hps_et.m.t", DIM)
    writer.insert("hps_et.m.t", np.arange(10, dtype=np.int64), np.ones((10, DIM), np.float32))
    writer.close()
    opened: list[PersistentDBConfig] = []
    factory = hps_core.db.open_persistent_db

    def recording(cfg: PersistentDBConfig, **kwargs: object) -> object:
        opened.append(cfg)
        return factory(cfg, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hps_core.db, "open_persistent_db", recording)
    report = inspect_tiers(ParameterServerConfig(persistent_db=settings))
    assert [(c.path, c.read_only, c.num_threads) for c in opened] == [(settings.path, True, 1)]
    (row,) = report["tables"]
    assert (row["table"], row["dim"], row["rocksdb_rows"]) == ("hps_et.m.t", DIM, 10)
