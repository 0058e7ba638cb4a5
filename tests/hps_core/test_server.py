"""HierarchicalParameterServer: loading sparse files into the tiers and sharing RocksDB."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hps_core.config import load_config
from hps_core.db import RocksDBPersistentDB
from hps_core.errors import UnknownTableError
from hps_core.formats import write_sparse_model
from hps_core.server import HierarchicalParameterServer


def _write_config(tmp_path: Path, *, initial_cache_rate: float, rows: int = 50, volatile: dict | None = None,
                  persistent: dict | None = None) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    tables = {}
    for name, dim in (("a", 5), ("b", 2)):
        keys = rng.choice(1 << 30, size=rows, replace=False).astype(np.int64)
        vectors = rng.normal(size=(rows, dim)).astype(np.float32)
        write_sparse_model(tmp_path / f"{name}.model", keys, vectors)
        tables[name] = (keys, vectors)
    config = {
        "volatile_db": {"type": "hash_map", **(volatile or {}), "initial_cache_rate": initial_cache_rate},
        "persistent_db": persistent or {"type": "rocks_db", "path": "rocksdb"},
        "models": [
            {
                "model": "m",
                "sparse_files": ["a.model", "b.model"],
                "embedding_table_names": ["a", "b"],
                "embedding_vecsize_per_table": [5, 2],
                "maxnum_catfeature_query_per_table_per_sample": [1, 1],
                "max_batch_size": max(64, rows),  # a lookup of every row in one request
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


# --------------------------------------------------------------------------- Redis node lost


def _lines_per_cause(records: list[logging.LogRecord]) -> dict[str, list[float]]:
    """Times of the hps_core log lines, per cause. The cause is approximated from above: the
    message with its numbers blanked (so the lines about one node, or one count, share it) cut
    at 60 characters, which can only merge causes, never split one."""
    lines: dict[str, list[float]] = {}
    for record in records:
        if record.name.startswith("hps_core") and record.levelno >= logging.INFO:
            cause = re.sub(r"\b\d+\b", "#", record.getMessage())[:60]
            lines.setdefault(f"{record.name}: {cause}", []).append(record.created)
    return lines


@pytest.mark.redis
@pytest.mark.slow
def test_redis_node_restarted_empty_is_refilled_under_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No persistent tier: one node of three killed during a run of lookups and restarted
    empty. The refill monitor puts its partitions back from the sparse files, so that every
    key of the files answers its row again (never the default for good); the outage shows in
    tier_errors; log lines stay at most one per second per cause."""
    from tests.redis_servers import RedisProcesses

    caplog.set_level(logging.INFO, logger="hps_core")
    with RedisProcesses.cluster(tmp_path / "redis", nodes=3) as cluster:
        path, tables = _write_config(
            tmp_path, initial_cache_rate=1.0, rows=3000, persistent={"type": "disabled"},
            volatile={"type": "redis_cluster", "address": cluster.address, "num_partitions": 8},
        )
        expected = _expected(tables)
        with HierarchicalParameterServer(load_config(path), refill_interval_s=0.5) as server:
            answers: list[tuple[float, int]] = []  # (time, values differing from the files)
            failures: list[BaseException] = []
            stop = threading.Event()

            def lookups() -> None:
                while not stop.is_set():
                    try:
                        out = _lookup_all(server, tables)
                    except BaseException as exc:  # noqa: BLE001 - the test asserts there are none
                        failures.append(exc)
                        return
                    answers.append((time.monotonic(), int((out != expected).sum())))

            runner = threading.Thread(target=lookups)
            runner.start()
            try:
                time.sleep(0.3)
                cluster.servers[1].kill()
                time.sleep(1.5)
                assert not failures and any(wrong for _, wrong in answers), (failures, "the outage shows as defaults")
                cluster.servers[1].restart()
                cluster.wait_ok()
                restarted = time.monotonic()
                deadline = restarted + 60
                while not any(at > restarted and wrong == 0 for at, wrong in answers[-5:]):
                    assert time.monotonic() < deadline and not failures, (failures, answers[-3:])
                    time.sleep(0.05)
            finally:
                stop.set()
                runner.join(timeout=30)
            assert not failures, failures
            np.testing.assert_array_equal(_lookup_all(server, tables), expected)
            counters = server.session("m").counters()
            assert counters["a"]["tier_errors"] > 0 and counters["b"]["tier_errors"] > 0
            assert server.refill is not None and server.refill.refills > 0
            assert server.lost_partitions("m") == {"a": 0, "b": 0}
    for cause, times in _lines_per_cause(caplog.records).items():
        gaps = np.diff(times)
        assert (gaps >= 1.0).all(), (cause, times)
