"""hps_core.publishing without a server: an export validated, written as the next version,
bulk-loaded into a real RocksDB (resumable), and broken exports refused before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hps_core.config import load_config
from hps_core.db import RocksDBPersistentDB
from hps_core.errors import ConfigError, FormatError
from hps_core.loader import read_marker
from hps_core.publishing import (
    PublishTarget,
    bulk_load,
    drop_tables,
    find_resumable_version,
    install_version,
    next_version,
    serving_hps_json,
    validate_export,
    version_config,
    version_entry_name,
    write_version,
)
from hps_demo.versions import build_repository, make_version, write_export

TABLES, ROWS, DIM = 3, 50, 4


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[PublishTarget, Path]:
    repository = build_repository(tmp_path, make_version(1, tables=TABLES, rows=ROWS, dim=DIM), rocksdb=tmp_path / "rocksdb")
    export = write_export(make_version(2, tables=TABLES, rows=ROWS, dim=DIM), tmp_path / "export_v2")
    return PublishTarget(repository=repository), export


def _validate(target: PublishTarget, export: Path):
    serving = load_config(serving_hps_json(target, 1))
    return validate_export(export, serving=serving, serving_model=serving.model("hps_embedding"))


def test_an_export_is_written_as_the_next_version_with_its_own_table_names(setup: tuple[PublishTarget, Path]) -> None:
    target, folder = setup
    export = _validate(target, folder)
    assert export.rows == (ROWS,) * TABLES and export.dense_weights == folder / "dense.pt"
    assert next_version(target) == 2
    written = write_version(target, export, 2, serving_hps_json(target, 1))
    assert not (target.repository / "hps_embedding" / "2").exists()  # written beside the repository first
    assert next_version(target) == 3
    staged = version_config(target, written)
    assert all(Path(f).is_relative_to(target.work) for f in staged.models[0].sparse_files)
    install_version(target, 2)
    config = version_config(target, written)
    model = config.models[0]
    assert model.model == version_entry_name("hps_embedding", 2) == "hps_embedding_v2"
    assert [t.qualified_name for t in model.tables] == [f"hps_et.hps_embedding_v2.t{i}" for i in range(TABLES)]
    assert all(Path(f).is_relative_to(target.repository / "hps_embedding" / "2") for f in model.sparse_files)
    serving = load_config(serving_hps_json(target, 1))
    assert config.persistent_db.path == serving.persistent_db.path  # the same tiers
    assert serving_hps_json(target, 2) == written.hps_json
    assert written.dense_weights == target.repository / "dlrm_dense" / "2" / "dense.pt"
    assert written.dense_weights.is_file() and written.dense_weights.with_suffix(".json").is_file()
    assert find_resumable_version(target, export) is None  # no publication state recorded


def test_bulk_load_fills_rocksdb_once_and_a_rerun_writes_nothing(setup: tuple[PublishTarget, Path]) -> None:
    target, folder = setup
    written = write_version(target, _validate(target, folder), 2, serving_hps_json(target, 1))
    first = bulk_load(version_config(target, written), progress=False, chunk_rows=16)
    assert first == {"persistent": {f"hps_et.hps_embedding_v2.t{i}": ROWS for i in range(TABLES)}}
    install_version(target, 2)  # the loader's markers do not depend on where the files are
    assert bulk_load(version_config(target, written), progress=False) == {
        "persistent": {f"hps_et.hps_embedding_v2.t{i}": 0 for i in range(TABLES)}}
    db = RocksDBPersistentDB(load_config(written.hps_json).persistent_db)
    try:
        marker = read_marker(db, "hps_et.hps_embedding_v2.t0")
        assert marker is not None and marker.complete
        v2 = make_version(2, tables=TABLES, rows=ROWS, dim=DIM)
        out = np.zeros((5, DIM), np.float32)
        assert db.fetch("hps_et.hps_embedding_v2.t1", v2.keys[1][:5], out).all()
        np.testing.assert_array_equal(out, v2.vectors[1][:5])
    finally:
        db.close()


@pytest.mark.parametrize("breakage, error, words", [
    ("missing_key_file", FormatError, "file 'key' is missing"),
    ("wrong_dims", FormatError, "expected"),
    ("missing_dense", FormatError, "dense weights dense.pt missing"),
    ("dense_of_other_tables", FormatError, "do not belong to these sparse tables"),
    ("table_count", ConfigError, "cannot change the table count"),
    ("duplicate_keys", FormatError, "duplicate key"),
])
def test_a_broken_export_is_refused_naming_the_problem(setup: tuple[PublishTarget, Path], breakage: str,
                                                      error: type[Exception], words: str) -> None:
    target, folder = setup
    document = json.loads((folder / "hps.json").read_text())
    entry = document["models"][0]
    if breakage == "missing_key_file":
        (folder / "sparse" / "t1" / "key").unlink()
    elif breakage == "wrong_dims":
        entry["embedding_vecsize_per_table"] = [DIM + 1] * TABLES
    elif breakage == "missing_dense":
        (folder / "dense.pt").unlink()
    elif breakage == "dense_of_other_tables":
        write_export(make_version(2, tables=TABLES, rows=ROWS, dim=DIM + 2), folder / "other")
        shutil.copy(folder / "other" / "dense.json", folder / "dense.json")
    elif breakage == "table_count":
        for key in ("sparse_files", "embedding_table_names", "embedding_vecsize_per_table",
                    "default_value_for_each_table", "maxnum_catfeature_query_per_table_per_sample"):
            entry[key] = entry[key][:-1]
    elif breakage == "duplicate_keys":
        keys = np.fromfile(folder / "sparse" / "t0" / "key", dtype=np.int64)
        keys[1] = keys[0]
        keys.tofile(folder / "sparse" / "t0" / "key")
    (folder / "hps.json").write_text(json.dumps(document))
    before = sorted(p.relative_to(target.repository) for p in target.repository.rglob("*"))
    with pytest.raises(error, match=words):
        _validate(target, folder)
    assert sorted(p.relative_to(target.repository) for p in target.repository.rglob("*")) == before


def test_an_unfinished_publication_of_the_same_export_is_resumed(setup: tuple[PublishTarget, Path]) -> None:
    target, folder = setup
    export = _validate(target, folder)
    state = target.state_file(2)
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"version": 2, "fingerprint": export.fingerprint, "phase": "loaded"}))
    assert find_resumable_version(target, export) == 2
    state.write_text(json.dumps({"version": 2, "fingerprint": "another export", "phase": "loaded"}))
    assert find_resumable_version(target, export) is None
    state.write_text(json.dumps({"version": 2, "fingerprint": export.fingerprint, "phase": "done"}))
    assert find_resumable_version(target, export) is None


def test_at_low_priority_runs_in_a_lowered_thread_and_passes_result_and_errors_back() -> None:
    import os
    import threading

    from hps_core.publishing import at_low_priority

    def nice_of_this_thread() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = nice_of_this_thread()
    assert at_low_priority(nice_of_this_thread, 5) == min(mine + 5, 19)
    assert nice_of_this_thread() == mine  # the caller's thread is untouched

    def fail() -> None:
        raise FormatError("broken")

    with pytest.raises(FormatError, match="broken"):
        at_low_priority(fail, 5)


def test_drop_tables_removes_a_versions_tables_and_leaves_the_others(setup: tuple[PublishTarget, Path]) -> None:
    target, folder = setup
    written = write_version(target, _validate(target, folder), 2, serving_hps_json(target, 1))
    config = version_config(target, written)
    bulk_load(config, progress=False)
    v1 = load_config(serving_hps_json(target, 1))
    bulk_load(v1, progress=False)
    names = [f"hps_et.hps_embedding_v2.t{i}" for i in range(TABLES)]
    assert drop_tables(config, "hps_embedding_v2") == {"persistent": names}
    assert drop_tables(config, "hps_embedding_v2") == {"persistent": []}  # again: nothing left to drop
    db = RocksDBPersistentDB(v1.persistent_db)
    try:
        assert db.table_names() == [f"hps_et.hps_embedding.t{i}" for i in range(TABLES)]
    finally:
        db.close()


@pytest.mark.redis
def test_a_shared_redis_is_bulk_loaded_ahead_and_the_version_dropped_from_it(tmp_path: Path) -> None:
    from hps_core.config import RedisConfig, VolatileDBConfig
    from hps_core.db import RedisVolatileDB
    from tests.redis_servers import RedisProcesses

    with RedisProcesses.single(tmp_path / "redis") as server:
        volatile = {"type": "redis_cluster", "address": server.address, "num_partitions": 4, "initial_cache_rate": 1.0}
        repository = build_repository(tmp_path, make_version(1, tables=TABLES, rows=ROWS, dim=DIM),
                                      rocksdb=tmp_path / "rocksdb", volatile=volatile)
        target = PublishTarget(repository=repository)
        export = write_export(make_version(2, tables=TABLES, rows=ROWS, dim=DIM), tmp_path / "export_v2")
        written = write_version(target, _validate(target, export), 2, serving_hps_json(target, 1))
        config = version_config(target, written)
        names = [f"hps_et.hps_embedding_v2.t{i}" for i in range(TABLES)]
        assert bulk_load(config, progress=False) == {tier: dict.fromkeys(names, ROWS) for tier in ("persistent", "volatile")}
        db = RedisVolatileDB(VolatileDBConfig(redis=RedisConfig(address=server.address), num_partitions=4))
        try:
            assert sorted(db.table_names()) == names and db.count(names[0]) == ROWS
            assert drop_tables(config, "hps_embedding_v2") == {"persistent": names, "volatile": names}
            assert db.table_names() == []
        finally:
            db.close()
