"""HierarchicalParameterServer: loading sparse files into the tiers and sharing RocksDB."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hps_core.config import load_config
from hps_core.db import RocksDBPersistentDB
from hps_core.errors import UnknownTableError
from hps_core.formats import write_sparse_model
from hps_core.server import HierarchicalParameterServer


def _write_config(tmp_path: Path, *, initial_cache_rate: float, rows: int = 50) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    tables = {}
    for name, dim in (("a", 5), ("b", 2)):
        keys = rng.choice(1 << 30, size=rows, replace=False).astype(np.int64)
        vectors = rng.normal(size=(rows, dim)).astype(np.float32)
        write_sparse_model(tmp_path / f"{name}.model", keys, vectors)
        tables[name] = (keys, vectors)
    config = {
        "volatile_db": {"type": "hash_map", "initial_cache_rate": initial_cache_rate},
        "persistent_db": {"type": "rocks_db", "path": "rocksdb"},
        "models": [
            {
                "model": "m",
                "sparse_files": ["a.model", "b.model"],
                "embedding_table_names": ["a", "b"],
                "embedding_vecsize_per_table": [5, 2],
                "maxnum_catfeature_query_per_table_per_sample": [1, 1],
            }
        ],
    }
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(config))
    return path, tables


def _lookup_all(server: HierarchicalParameterServer, tables: dict) -> np.ndarray:
    keys = np.concatenate([tables["a"][0], tables["b"][0]])
    return server.session("m").lookup(keys, np.array([len(tables["a"][0]), len(tables["b"][0])], np.int32))


def _expected(tables: dict) -> np.ndarray:
    return np.concatenate([tables["a"][1].ravel(), tables["b"][1].ravel()])


def test_loads_tables_and_serves_every_row(tmp_path: Path) -> None:
    path, tables = _write_config(tmp_path, initial_cache_rate=0.4)
    with HierarchicalParameterServer(load_config(path)) as server:
        np.testing.assert_array_equal(_lookup_all(server, tables), _expected(tables))
        counters = server.session("m").counters()["a"]
        assert counters["volatile_hits"] == 20 and counters["persistent_hits"] == 30
        assert server.persistent.count("hps_et.m.a") == 50
        assert server.volatile.count("hps_et.m.a") == 20


def test_restart_reuses_the_persistent_copy(tmp_path: Path) -> None:
    path, tables = _write_config(tmp_path, initial_cache_rate=0.0)
    HierarchicalParameterServer(load_config(path)).close()
    keys, vectors = tables["a"]
    writer = RocksDBPersistentDB(path=tmp_path / "rocksdb")
    writer.insert("hps_et.m.a", keys[:1], vectors[:1] + 100)  # a row only RocksDB knows
    writer.close()
    with HierarchicalParameterServer(load_config(path)) as server:
        served = _lookup_all(server, tables)
    assert served[0] == np.float32(vectors[0, 0] + 100)  # not reloaded: the sparse file did not change


def test_changed_sparse_file_is_reloaded(tmp_path: Path) -> None:
    path, tables = _write_config(tmp_path, initial_cache_rate=0.0)
    HierarchicalParameterServer(load_config(path)).close()
    keys, vectors = tables["a"]
    write_sparse_model(tmp_path / "a.model", keys, vectors + 1)
    tables["a"] = (keys, vectors + 1)
    with HierarchicalParameterServer(load_config(path)) as server:
        np.testing.assert_array_equal(_lookup_all(server, tables), _expected(tables))


def test_two_servers_share_one_rocksdb(tmp_path: Path) -> None:
    path, tables = _write_config(tmp_path, initial_cache_rate=0.0)
    with HierarchicalParameterServer(load_config(path)) as first, HierarchicalParameterServer(load_config(path)) as second:
        np.testing.assert_array_equal(_lookup_all(first, tables), _expected(tables))
        np.testing.assert_array_equal(_lookup_all(second, tables), _expected(tables))


def test_unknown_model_is_named(tmp_path: Path) -> None:
    path, _ = _write_config(tmp_path, initial_cache_rate=1.0)
    with pytest.raises(UnknownTableError, match="nope"):
        HierarchicalParameterServer(load_config(path), models=["nope"])
    with HierarchicalParameterServer(load_config(path)) as server:
        with pytest.raises(UnknownTableError, match="nope"):
            server.session("nope")
