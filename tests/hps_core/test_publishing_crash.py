"""``hps publish-model`` SIGKILLed in every phase, through a real Triton under ``hps serve`` and
a real RocksDB (issue 19): every served vector is checked after each kill, and RocksDB opened
afresh; the next run of the same command resumes, and is itself killed at the next point, until
a run completes. Two publications, each killed once per phase at different points (the hook
``HPS_PUBLISH_KILL_AT`` of hps_core/publishing.py names them). After each kill of the first,
and after the drop-phase kill of the second (the reported breakage), ``hps serve`` is restarted
on what was left first (a store that refuses to open, or an ensemble serving each model's newest
folder, a mix of versions, shows there); a restart costs about 10 s on 2 cores, so the second
publication's other kills are checked on the running server.

The run killed in the bulk load is first paused there (``HPS_PUBLISH_PAUSE_AT``), holding the
repository's publication lock, while the same export and another export are published beside
it: both are refused naming its pid (they used to take the same version number and fail with
``staging/.../table0: not a table``, or both succeed and leave a version loaded forever); after
its SIGKILL the next run takes its lock over."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hps_core.config import PersistentDBConfig
from hps_core.db import RocksDBPersistentDB
from hps_core.model_control import ModelControl
from hps_core.publishing import KILL_AT_ENV, PAUSE_AT_ENV, version_entry_name
from hps_core.serving import API_TOKEN_ENV
from hps_demo.client import dlrm_request, hps_request, infer, make_client
from hps_demo.versions import DLRMVersion, build_repository, expected_scores, make_version, write_export
from tests.hps_serve import Repository, ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.triton]

TABLES, ROWS, DIM = 3, 40, 4
MODELS = ("hps_embedding", "dlrm_dense")
#: Where each publication is killed: one point per phase (validate, write, bulk_load, load,
#: switch, unload, drop), other points for the second one. The third is paused, not killed.
KILLS = {
    2: ("validate.dense", "write.pinned", "bulk_load.table#2", "load.install#1", "switch.start", "unload.retired",
        "drop.table#2"),
    3: ("validate.done", "write.done", "bulk_load.done", "load.done", "switch.done", "unload.model#1",
        "drop.table#1"),
}
PAUSED = "bulk_load.table#2"  # the run held there while two others try
#: From these points on the new version serves (the ensemble was switched).
SWITCHED = ("switch.done", "unload.", "drop.")


def _command(repository: Path, export: Path, url: str) -> list[str]:
    return [sys.executable, "-m", "hps_core.cli", "publish-model", str(export), "--model-repository", str(repository),
            "--url", url, "--drain", "0.2", "--no-progress"]


def _publish(repository: Path, export: Path, url: str, token: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(repository, export, url), capture_output=True, text=True, timeout=300,
                          env={**os.environ, API_TOKEN_ENV: token, **env})


def _paused_publish(repository: Path, export: Path, url: str, token: str) -> subprocess.Popen[str]:
    """A publication paused at :data:`PAUSED`, holding the lock (returns once it says so)."""
    process = subprocess.Popen(_command(repository, export, url), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, API_TOKEN_ENV: token, PAUSE_AT_ENV: PAUSED})
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if f"paused at {PAUSED}" in line:
            return process
    process.wait(60)
    raise AssertionError("publish-model never reached its pause point: " + "".join(seen))


def _served_version(control: ModelControl) -> int:
    """The version the ensemble serves: each step's pinned version, or its model's newest READY
    one at -1 (the committed config, before a publication pinned it); one for both steps."""
    steps = control.config("dlrm")["ensemble_scheduling"]["step"]
    served = set()
    for step in (s for s in steps if s["model_name"] in MODELS):
        ready = [v for v, e in control.versions(step["model_name"]).items() if e.state == "READY"]
        served.add(int(step["model_version"]) if int(step["model_version"]) > 0 else max(ready))
    assert len(served) == 1, (steps, served)  # never a mix
    return served.pop()


def _restarted(serve: ServeProcess, served: Repository, token: str) -> ServeProcess:
    serve.stop()
    return ServeProcess(served, env={API_TOKEN_ENV: token})


def _check_served(url: str, token: str, expected: DLRMVersion, rocksdb: Path, serve: ServeProcess) -> None:
    """The server serves ``expected``: the ensemble pinned to it, every vector of every table
    through its HPS version, scores of its own dense network (never a mix), and RocksDB, opened
    afresh as a serving process opens it, holding every one of its rows (``hps serve``'s output
    shown when not)."""
    try:
        _check_answers(url, token, expected)
        # the unloads a publication does are never taken for a dead stub (hps_core/stub_watch.py)
        assert "reloading the model" not in serve.output
    except Exception:
        print(serve.output[-6000:])
        raise
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(rocksdb), read_only=True))
    try:
        out = np.zeros((ROWS, DIM), np.float32)
        for table in range(TABLES):
            name = f"hps_et.{version_entry_name('hps_embedding', expected.version)}.t{table}"
            assert db.fetch(name, expected.keys[table], out).all(), name
            np.testing.assert_array_equal(out, expected.vectors[table])
    finally:
        db.close()


def _check_answers(url: str, token: str, expected: DLRMVersion) -> None:
    control = ModelControl(url, token)
    assert _served_version(control) == expected.version
    client = make_client("http", url)
    keys = np.stack(expected.keys, axis=1)  # (ROWS, TABLES): every key of every table
    module = sys.modules[type(client).__module__.rpartition(".")[0]]
    inputs = []
    for name, array in hps_request(keys).items():
        tensor = module.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "INT32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer("hps_embedding", inputs, model_version=str(expected.version),
                          outputs=[module.InferRequestedOutput("OUTPUT0")])
    served = result.as_numpy("OUTPUT0").reshape(TABLES, ROWS, DIM)
    for table in range(TABLES):
        np.testing.assert_array_equal(served[table], expected.vectors[table])
    features = np.random.default_rng(expected.version).normal(size=(ROWS, 13)).astype(np.float32)
    scores = infer(client, "dlrm", dlrm_request(keys, features).as_dict(), "SCORE").reshape(-1)
    np.testing.assert_allclose(scores, expected_scores(expected, keys, features), atol=1e-5)
    client.close()  # no keep-alive connection holding a graceful stop to its timeout


def test_publish_model_killed_in_every_phase_leaves_a_store_that_opens_serves_and_resumes(tmp_path: Path) -> None:
    models = {v: make_version(v, tables=TABLES, rows=ROWS, dim=DIM) for v in (1, 2, 3)}
    rocksdb = tmp_path / "rocksdb"
    repository = build_repository(tmp_path, models[1], rocksdb=rocksdb)
    exports = {v: write_export(models[v], tmp_path / f"export_v{v}") for v in (2, 3)}
    token = secrets.token_urlsafe(24)
    served = Repository(repository, repository / "hps_embedding" / "hps.json")
    serve = ServeProcess(served, env={API_TOKEN_ENV: token})
    serving = 1
    try:
        url = serve.wait_ready().http
        _check_served(url, token, models[1], rocksdb, serve)
        for version, points in KILLS.items():
            for point in points:
                if point == PAUSED:
                    holder = _paused_publish(repository, exports[version], url, token)
                    for other in (exports[version], exports[3]):  # the same export, and another one
                        refused = _publish(repository, other, url, token)
                        assert refused.returncode == 1, refused.stdout + refused.stderr
                        assert "another hps publish-model is publishing" in refused.stderr
                        assert f"pid {holder.pid} on host" in refused.stderr, refused.stderr
                    holder.send_signal(signal.SIGKILL)
                    assert holder.wait(60) == -signal.SIGKILL
                else:
                    killed = _publish(repository, exports[version], url, token, **{KILL_AT_ENV: point})
                    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
                    assert f"killed at {point}" in killed.stderr, killed.stderr
                if point.startswith(SWITCHED):
                    serving = version
                if version == 2 or point.startswith("drop."):
                    serve = _restarted(serve, served, token)  # what was left, opened afresh
                    url = serve.wait_ready().http
                _check_served(url, token, models[serving], rocksdb, serve)
            done = _publish(repository, exports[version], url, token)  # the same command: resumes, completes
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert f"publishing version {version} (resumed)" in done.stdout, done.stdout
            serving = version
            _check_served(url, token, models[version], rocksdb, serve)
            control = ModelControl(url, token)
            assert [sorted(v for v, e in control.versions(m).items() if e.state == "READY") for m in MODELS] == \
                [[version], [version]]
    finally:
        serve.stop()
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(rocksdb), read_only=True))
    try:  # every retired version's tables dropped, none twice, none left behind
        assert db.table_names() == [f"hps_et.hps_embedding_v3.t{i}" for i in range(TABLES)]
    finally:
        db.close()
