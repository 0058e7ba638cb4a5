"""HierarchicalParameterServer: loading sparse files into the tiers and sharing RocksDB."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from hps_core.config import PersistentDBConfig, load_config
from hps_core.db import RocksDBPersistentDB
from hps_core.errors import ConfigError, UnknownTableError
from hps_core.formats import write_sparse_model
from hps_core.logs import RateLimitedLog
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack, unpack
from hps_core.server import HierarchicalParameterServer


def _write_config(tmp_path: Path, *, initial_cache_rate: float, rows: int = 50, volatile: dict | None = None,
                  persistent: dict | None = None, model: dict | None = None) -> tuple[Path, dict]:
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
                **(model or {}),
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
    writer = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "rocksdb")))
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


# --------------------------------------------------------------------------- row formats


@pytest.mark.parametrize("cache_device", [None, "cpu"])
def test_compact_tables_are_served_as_their_packed_rows(tmp_path: Path, cache_device: str | None) -> None:
    """int8 and fp8 tables: every tier (hash map, RocksDB) and the cache store packed rows, and
    the answers are the format's reference ``unpack(pack(rows))`` wherever the row is found."""
    path, tables = _write_config(tmp_path, initial_cache_rate=0.4,
                                 model={"embedding_format_per_table": ["int8", "fp8"], "gpucacheper": 0.5})
    expected = {name: (keys, unpack(fmt, pack(fmt, vectors), vectors.shape[1]))
                for (name, (keys, vectors)), fmt in zip(tables.items(), (RowFormat.INT8, RowFormat.FP8))}
    with HierarchicalParameterServer(load_config(path), cache_device=cache_device) as server:
        assert server.persistent.row_format("hps_et.m.a") is RowFormat.INT8
        assert server.volatile.row_format("hps_et.m.b") is RowFormat.FP8
        for _ in range(2):  # cold, then from the cache where there is one
            np.testing.assert_array_equal(_lookup_all(server, tables), _expected(expected))
        counters = server.session("m").counters()["a"]
        if cache_device is None:  # each lookup: the volatile tier's 40 %, RocksDB's rest
            assert (counters["volatile_hits"], counters["persistent_hits"]) == (40, 60)
        else:  # the cache, warmed from the file (init_ec), then filled from both tiers
            assert counters["cache_hits"] > 0 and counters["persistent_hits"] > 0


@pytest.mark.parametrize("read_only", [False, True])
def test_a_table_stored_in_another_format_fails_the_servers_load(tmp_path: Path, read_only: bool) -> None:
    """RocksDB keeps the format a table was loaded in: a server whose config asks for another
    fails to construct, naming the config file, the table and both formats (the loading
    writer, or the read-only handle of a server that loads nothing)."""
    path, _ = _write_config(tmp_path, initial_cache_rate=0.0, model={"embedding_format_per_table": "int8"})
    HierarchicalParameterServer(load_config(path)).close()
    path, _ = _write_config(tmp_path, initial_cache_rate=0.0,
                            persistent={"type": "rocks_db", "path": "rocksdb", "read_only": read_only},
                            model={"embedding_format_per_table": ["int8", "fp32"]})
    with pytest.raises(ConfigError) as info:
        HierarchicalParameterServer(load_config(path))
    message = str(info.value)
    assert message.startswith(f"{path}: table 'hps_et.m.b' "), message
    assert "stores int8 rows, but fp32 was asked for" in message and "embedding_format_per_table" in message, message
    with HierarchicalParameterServer(load_config(path), models=[]):  # nothing left holding RocksDB
        pass


# --------------------------------------------------------------------------- Redis node lost


def _poll(done: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Wait until ``done()`` is true; fail naming ``what`` after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


class _LinesPerCause:
    """Records each line a :class:`~hps_core.logs.RateLimitedLog` writes, under the cause its
    caller gave and the limiter that took it (exactly what the limiter counts by, so two causes
    are never merged), with the time it was written."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.times: dict[str, list[float]] = {}
        self.warnings = 0  # lines written at WARNING or above
        real = RateLimitedLog.log
        lock = threading.Lock()

        def spy(log: RateLimitedLog, level: int, cause: str, message: str, *, exc: BaseException | None = None) -> bool:
            wrote = real(log, level, cause, message, exc=exc)
            if wrote:
                with lock:
                    self.times.setdefault(f"{cause} (limiter {id(log):x})", []).append(time.monotonic())
                    self.warnings += level >= logging.WARNING
            return wrote

        monkeypatch.setattr(RateLimitedLog, "log", spy)


@pytest.mark.redis
@pytest.mark.slow
def test_redis_node_restarted_empty_is_refilled_under_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No persistent tier: one node of three killed during a run of lookups and restarted
    empty. The refill monitor puts its partitions back from the sparse files, so that every
    key of the files answers its row again (never the default for good); the outage shows in
    tier_errors; log lines stay at most one per second per cause.

    No step waits a fixed time: each polls for what it needs, with a generous deadline."""
    from tests.redis_servers import RedisProcesses

    lines = _LinesPerCause(monkeypatch)
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
                _poll(lambda: failures or len(answers) >= 3, "lookups running")
                assert not failures and all(wrong == 0 for _, wrong in answers), (failures, answers)
                cluster.servers[1].kill()
                _poll(lambda: failures or any(wrong for _, wrong in answers), "the outage shows as defaults")
                assert not failures, failures
                cluster.servers[1].restart()
                cluster.wait_ok()
                restarted = time.monotonic()
                _poll(
                    lambda: failures or any(at > restarted and wrong == 0 for at, wrong in answers[-5:]),
                    "every key answers its row again after the restart",
                )
            finally:
                stop.set()
                runner.join(timeout=30)
            assert not failures, failures
            np.testing.assert_array_equal(_lookup_all(server, tables), expected)
            counters = server.session("m").counters()
            assert counters["a"]["tier_errors"] > 0 and counters["b"]["tier_errors"] > 0
            assert server.refill is not None and server.refill.refills > 0
            assert server.lost_partitions("m") == {"a": 0, "b": 0}
    # Every warning of the run went through a rate limiter (a line per request would not): its
    # lines, and at most one summary per cause of what it held back...
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("hps_core") and r.levelno >= logging.WARNING]
    assert len(warnings) <= lines.warnings + len(lines.times), warnings
    # ... and lines of one cause (the limiter's own key, so two causes are never merged) are at
    # least a second apart. This is a minimum gap, which slow scheduling does not narrow: the
    # limiter writes a cause's next line only once its clock is DEFAULT_LOG_INTERVAL_S (10 s)
    # past the last, so a timestamp here would have to come 9 s late to make a gap under 1 s.
    for cause, times in lines.times.items():
        gaps = np.diff(times)
        assert (gaps >= 1.0).all(), (cause, times)
