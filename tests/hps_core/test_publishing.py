"""hps_core.publishing without a server: an export validated, written as the next version,
bulk-loaded into a real RocksDB (resumable), and broken exports refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hps_core.config import load_config
from hps_core.db import RocksDBPersistentDB, open_volatile_db
from hps_core.db.shm_store import KEEPER_ENV, list_stores, namespace_of
from hps_core.errors import ConfigError, FormatError
from hps_core.loader import load_table, read_marker
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
    assert find_resumable_version(target, export, 1) is None  # no publication state recorded


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
    ("dense_of_other_shapes", FormatError, "do not load into the network dense.json describes"),
    ("table_count", ConfigError, "cannot change the table count"),
    ("duplicate_keys", FormatError, "duplicate key"),
    ("non_finite_row", FormatError, r"the row of key \d+ \(row 3\) holds NaN or infinity"),
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
    elif breakage == "dense_of_other_shapes":  # what Triton's dense model would fail on
        hparams = json.loads((folder / "dense.json").read_text())
        (folder / "dense.json").write_text(json.dumps({**hparams, "bottom": [32, 16]}))
    elif breakage == "table_count":
        for key in ("sparse_files", "embedding_table_names", "embedding_vecsize_per_table",
                    "default_value_for_each_table", "maxnum_catfeature_query_per_table_per_sample"):
            entry[key] = entry[key][:-1]
    elif breakage == "duplicate_keys":
        keys = np.fromfile(folder / "sparse" / "t0" / "key", dtype=np.int64)
        keys[1] = keys[0]
        keys.tofile(folder / "sparse" / "t0" / "key")
    elif breakage == "non_finite_row":
        vectors = np.fromfile(folder / "sparse" / "t0" / "emb_vector", dtype=np.float32).reshape(-1, DIM)
        vectors[3, 1] = np.inf
        vectors.tofile(folder / "sparse" / "t0" / "emb_vector")
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
    state.write_text(json.dumps({"version": 2, "fingerprint": export.fingerprint, "phase": "loaded", "previous": 1}))
    assert find_resumable_version(target, export, 1) == 2
    assert find_resumable_version(target, export, 2) == 2  # switched already, clean-up cut short
    state.write_text(json.dumps({"version": 2, "fingerprint": "another export", "phase": "loaded", "previous": 1}))
    assert find_resumable_version(target, export, 1) is None
    state.write_text(json.dumps({"version": 2, "fingerprint": export.fingerprint, "phase": "done", "previous": 1}))
    assert find_resumable_version(target, export, 1) is None


def test_a_failed_or_overtaken_publication_is_not_resumed_and_its_number_not_reused(
        setup: tuple[PublishTarget, Path]) -> None:
    """A failed attempt (taken back) is never "resumed": that would switch to a version that
    failed; nor one started over a version that no longer serves (it would switch the ensemble
    back down). State files are compared by number (publish-10 is newer than publish-9)."""
    target, folder = setup
    export = _validate(target, folder)
    target.work.mkdir(parents=True)

    def state(version: int, phase: str, previous: int) -> None:
        target.state_file(version).write_text(json.dumps(
            {"version": version, "fingerprint": export.fingerprint, "phase": phase, "previous": previous}))

    state(2, "failed", 1)  # its folders may be gone from failed/: the state file alone holds the number
    assert find_resumable_version(target, export, 1) is None
    assert next_version(target) == 3
    state(3, "loaded", 1)  # version 4 serves now: 3 was started over version 1
    assert find_resumable_version(target, export, 4) is None
    assert next_version(target) == 4
    state(9, "installed", 8)
    state(10, "loaded", 8)
    assert find_resumable_version(target, export, 8) == 10  # by number, not by name
    assert next_version(target) == 11


class _StandInControl:
    """A stand-in for ModelControl, for failure paths a real Triton cannot be made to exhibit on
    demand: an ensemble override that fails and whose restore fails too, a version that fails to
    load and whose unload Triton never confirms. It records the loads and fails the ones
    ``fail`` names (``(model, "config")`` for a config override, ``(model, version)``)."""

    def __init__(self, *, fail: set[tuple[str, object]] = frozenset(), gone: bool = True,  # type: ignore[assignment]
                 restore_fails: bool = False) -> None:
        self.base = "http://stand-in"
        self.fail, self.gone, self.restore_fails = set(fail), gone, restore_fails
        self.loads: list[tuple[str, object]] = []
        self.ensemble_config = {"name": "dlrm", "ensemble_scheduling": {"step": [
            {"model_name": "hps_embedding", "model_version": -1}, {"model_name": "dlrm_dense", "model_version": -1}]}}

    def versions(self, name: str) -> dict[int, object]:
        from hps_core.model_control import ModelVersionState
        return {1: ModelVersionState(name=name, version=1, state="READY", reason="")}

    def config(self, name: str, version: int | None = None) -> dict[str, object]:
        return json.loads(json.dumps(self.ensemble_config))

    def load(self, name: str, *, config: object = None, versions: tuple[int, ...] | list[int] = (),
             timeout: float | None = None) -> None:
        from hps_core.errors import ServingError
        what: object = "config" if config is not None else (versions[0] if versions else None)
        restoring = config is not None and any((name, "config") == (n, w) for n, w in self.loads)
        self.loads.append((name, what))
        if restoring and self.restore_fails:
            raise ServingError(f"load of model '{name}' failed: restore refused")
        if (name, what) in self.fail and not restoring:
            raise ServingError(f"load of model '{name}' failed: override refused")

    def wait_gone(self, name: str, versions: object = None, *, timeout: float = 600.0) -> None:
        from hps_core.errors import ServingError
        if not self.gone:
            raise ServingError(f"model '{name}' version(s) {versions} still loaded")

    def wait_ready(self, name: str, versions: object = None, *, timeout: float = 600.0) -> None:
        pass


def _publish(target: PublishTarget, folder: Path, control: _StandInControl) -> None:
    from hps_core.publishing import publish_model
    publish_model(target, folder, control, progress=False, drain_s=0.0,  # type: ignore[arg-type]
                  dense_check=lambda weights: None)


def test_a_failed_first_pin_is_restored_and_a_failed_restore_says_the_ensemble_is_unloaded(
        setup: tuple[PublishTarget, Path]) -> None:
    """Protocol logic with the stand-in control (a real Triton cannot be made to refuse an
    override, then its restore, on demand)."""
    from hps_core.errors import ServingError
    target, folder = setup
    control = _StandInControl(fail={("dlrm", "config")})
    with pytest.raises(ServingError, match="override refused"):
        _publish(target, folder, control)
    assert control.loads == [("dlrm", "config"), ("dlrm", "config")]  # the pin, then the restore
    assert not target.staged("hps_embedding", 2).exists()  # nothing written after the failed pin
    control = _StandInControl(fail={("dlrm", "config")}, restore_fails=True)
    with pytest.raises(ServingError) as raised:
        _publish(target, folder, control)
    message = str(raised.value)
    assert "override refused" in message and "restore refused" in message and "UNLOADED" in message
    saved = target.work / "ensemble-dlrm-restore.json"
    assert f"hps models load dlrm --config {saved}" in message
    assert json.loads(saved.read_text()) == control.ensemble_config  # the config it had


def test_a_failed_switch_whose_restore_fails_raises_one_error_naming_both() -> None:
    """_switch with the stand-in control (see :class:`_StandInControl`)."""
    from hps_core.errors import ServingError
    from hps_core.publishing import _switch

    control = _StandInControl(fail={("dlrm", "config")}, restore_fails=True)
    target = PublishTarget(repository=Path("/nonexistent/repository"), work_dir=Path("/nonexistent/work"))
    with pytest.raises(ServingError) as raised:
        _switch(control, target, 2, 1)  # type: ignore[arg-type]
    message = str(raised.value)
    assert "switching it to version 2 failed" in message and "override refused" in message
    assert "restore refused" in message and "UNLOADED" in message and "publish-model command again" in message
    assert "hps models load dlrm --config" in message
    control = _StandInControl(fail={("dlrm", "config")})
    with pytest.raises(ServingError, match="override refused"):
        _switch(control, target, 2, 1)  # type: ignore[arg-type]
    assert control.loads == [("dlrm", "config"), ("dlrm", "config")]


@pytest.mark.parametrize("gone", [True, False])
def test_a_failed_versions_tables_are_dropped_only_once_triton_confirmed_it_gone(
        setup: tuple[PublishTarget, Path], monkeypatch: pytest.MonkeyPatch, gone: bool) -> None:
    """Failure path with the stand-in control (a real Triton cannot be made to leave a failed
    version's unload unconfirmed): version 2 fails to load; its tables, bulk-loaded into the
    real RocksDB, are dropped only when every model's version 2 was confirmed gone."""
    import hps_core.publishing as publishing
    from hps_core.errors import ServingError

    monkeypatch.setattr(publishing, "_TAKE_BACK_TIMEOUT_S", 0.0)
    target, folder = setup
    control = _StandInControl(fail={("dlrm_dense", 2)}, gone=gone)
    with pytest.raises(ServingError, match="version 2 did not load") as raised:
        _publish(target, folder, control)
    assert ("were dropped" if gone else "were kept in the tiers") in str(raised.value)
    assert json.loads(target.state_file(2).read_text())["phase"] == "failed"
    assert (target.work / "failed" / "dlrm_dense" / "2").is_dir()
    db = RocksDBPersistentDB(load_config(serving_hps_json(target, 1)).persistent_db)
    try:
        v2 = [f"hps_et.hps_embedding_v2.t{i}" for i in range(TABLES)]
        assert (set(v2) <= set(db.table_names())) is not gone
    finally:
        db.close()
    assert next_version(target) == 3


def test_drop_tables_keeps_names_another_version_uses(setup: tuple[PublishTarget, Path]) -> None:
    target, _ = setup
    v1 = load_config(serving_hps_json(target, 1))
    bulk_load(v1, progress=False)
    names = [f"hps_et.hps_embedding.t{i}" for i in range(TABLES)]
    assert drop_tables(v1, "hps_embedding", keep=set(names[1:])) == {"persistent": names[:1], "volatile": []}
    assert drop_tables(v1, "hps_embedding", keep=set(names)) == {}


def test_publishing_and_the_backend_pick_a_versions_entry_alike(setup: tuple[PublishTarget, Path]) -> None:
    """One function (hps_core.config.version_model_name) for both: a version JSON without a
    ``_v<N>`` entry serves (and would drop) version 1's names."""
    from hps_core.config import version_model_name
    target, _ = setup
    v1 = load_config(serving_hps_json(target, 1))
    assert version_model_name(v1, "hps_embedding", 3) == "hps_embedding"
    backend_model = Path(__file__).resolve().parents[2] / "backend" / "hps" / "model.py"
    assert "from hps_core.config import gpu_cache_requested, load_config, version_model_name" in backend_model.read_text()


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


def _retired_copy(source: str) -> Path:
    """A copy of a version's folder elsewhere (where retiring moves it); its hps.json."""
    folder = Path(source).parent
    dest = folder.parent / f"{folder.name}-retired"
    shutil.copytree(folder, dest)
    return dest / Path(source).name


def test_drop_tables_removes_a_versions_tables_and_leaves_the_others(setup: tuple[PublishTarget, Path],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    target, folder = setup
    written = write_version(target, _validate(target, folder), 2, serving_hps_json(target, 1))
    config = version_config(target, written)
    bulk_load(config, progress=False)
    v1 = load_config(serving_hps_json(target, 1))
    bulk_load(v1, progress=False)
    names = [f"hps_et.hps_embedding_v2.t{i}" for i in range(TABLES)]
    # the version served under hps serve: its host store files outlive its stubs (a live keeper)
    monkeypatch.setenv(KEEPER_ENV, str(os.getpid()))
    served = open_volatile_db(config.volatile_db, config.source)
    assert served is not None
    for table in config.model("hps_embedding_v2").tables:
        load_table(served, table)
    served.close()
    namespace = namespace_of(config.volatile_db, config.source)
    assert sorted(s.table for s in list_stores(namespace)) == names
    # retiring moves the version's folder, and its JSON with it: the drop names where it was served from
    moved = _retired_copy(config.source)
    retired = load_config(moved)
    assert drop_tables(retired, "hps_embedding_v2", served_from=config.source) == {"persistent": names,
                                                                                   "volatile": names}
    assert list_stores(namespace) == []  # retiring a version frees its host store
    assert drop_tables(config, "hps_embedding_v2") == {"persistent": [], "volatile": []}  # nothing left to drop
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
