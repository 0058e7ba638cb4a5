"""Model versions through a real Triton (issue 13): version 2 of a small DLRM published with
``hps publish-model`` to ``hps serve`` while a client thread sends requests continuously.

One server: version 1 serves; three broken exports are refused before anything changes (the
third's dense weights do not fit the network its dense.json describes: validation loads them
into it, as Triton's dense model would; before that check such an export was loaded as a
version, failed in Triton and was taken back; nothing an export holds fails only in Triton
any more, so the take-back path is covered by tests/hps_core/test_publishing.py); then version 2
(other sparse rows AND other dense weights than version 1's) is published — the command
SIGKILLed once after its bulk load and run again, which resumes — switched in, version 1
unloaded.
Every answer must be version 1's or version 2's expected scores, never one of the two mixes
(embeddings of one version through the other's dense network: hps_demo/versions.py makes the
four combinations distinguishable), none may fail, and after the switch only version 2 answers.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hps_core.config import PersistentDBConfig
from hps_core.db import RocksDBPersistentDB
from hps_core.model_control import ModelControl
from hps_core.serving import API_TOKEN_ENV
from hps_demo.client import dlrm_request
from hps_demo.versions import (
    LoadThread,
    build_repository,
    classify,
    distinguishable,
    make_version,
    request_keys,
    version_combinations,
    write_export,
)
from tests.hps_serve import Repository, ServeProcess

pytestmark = pytest.mark.triton

TABLES, ROWS, DIM, BATCH, REQUESTS = 4, 64, 8, 4, 8
MODELS = ("hps_embedding", "dlrm_dense")


def _publish_command(repository: Path, export: Path, url: str) -> list[str]:
    return [sys.executable, "-m", "hps_core.cli", "publish-model", str(export), "--model-repository", str(repository),
            "--url", url, "--drain", "1", "--no-progress"]


def _publish(repository: Path, export: Path, url: str, token: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_publish_command(repository, export, url), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HPS_API_TOKEN": token})


def _publish_killed_after_bulk_load(repository: Path, export: Path, url: str, token: str) -> None:
    """``hps publish-model`` SIGKILLed once its bulk load is done (while Triton loads version 2)."""
    command = _publish_command(repository, export, url)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HPS_API_TOKEN": token})
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "bulk load:" in line:
            process.kill()
            break
    process.wait(60)
    assert any("bulk load:" in line for line in lines), "".join(lines)


def _ready_versions(control: ModelControl, model: str) -> list[int]:
    return sorted(v for v, e in control.versions(model).items() if e.state == "READY")


def test_publish_switches_versions_under_load_with_no_failed_or_mixed_answer(tmp_path: Path) -> None:
    v1, v2 = (make_version(v, tables=TABLES, rows=ROWS, dim=DIM) for v in (1, 2))
    rng = np.random.default_rng(11)
    samples = [(request_keys(v1, BATCH, rng), rng.normal(size=(BATCH, 13)).astype(np.float32)) for _ in range(REQUESTS)]
    expected = version_combinations(v1, v2, samples)
    assert distinguishable(expected)  # a mixed answer cannot pass for a pure one
    # The committed configs (KIND_GPU): on a machine without GPU hps serve serves a staged mirror
    # of the repository, which must follow the version folders publish-model moves in and out.
    repository = build_repository(tmp_path, v1, rocksdb=tmp_path / "rocksdb", cpu=False)
    export = write_export(v2, tmp_path / "export_v2")
    missing = write_export(v2, tmp_path / "export_missing_file")
    (missing / "sparse" / "t2" / "emb_vector").unlink()
    wrong_dims = write_export(v2, tmp_path / "export_wrong_dims")
    document = json.loads((wrong_dims / "hps.json").read_text())
    document["models"][0]["embedding_vecsize_per_table"] = [DIM * 2] * TABLES
    (wrong_dims / "hps.json").write_text(json.dumps(document))
    unloadable = write_export(v2, tmp_path / "export_unloadable")  # passes the file checks, not the load
    hparams = json.loads((unloadable / "dense.json").read_text())
    (unloadable / "dense.json").write_text(json.dumps({**hparams, "bottom": [32, 16]}))  # not dense.pt's shapes
    token = secrets.token_urlsafe(24)
    requests = [dlrm_request(keys, dense).as_dict() for keys, dense in samples]
    served = Repository(repository, repository / "hps_embedding" / "hps.json")
    with ServeProcess(served, env={API_TOKEN_ENV: token}) as serve:
        url = serve.wait_ready().http
        control = ModelControl(url, token)
        with LoadThread(url, requests) as load:
            time.sleep(1.0)
            for broken, words in ((missing, "file 'emb_vector' is missing"), (wrong_dims, "expected"),
                                  (unloadable, "do not load into the network")):
                done = _publish(repository, broken, url, token)
                assert done.returncode == 1, done.stdout + done.stderr
                assert "hps publish-model: error:" in done.stderr and words in done.stderr, done.stderr
                assert [_ready_versions(control, m) for m in MODELS] == [[1], [1]]
                assert not (repository / "hps_embedding" / "2").exists()
            _publish_killed_after_bulk_load(repository, export, url, token)
            done = _publish(repository, export, url, token)  # the same command again: resumes
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert "publishing version 2 (resumed)" in done.stdout and "bulk load: 0 rows written" in done.stdout
            switched = time.monotonic()
            time.sleep(1.0)
        answers = load.answers
        assert [_ready_versions(control, m) for m in MODELS] == [[2], [2]]
        assert not (repository / "hps_embedding" / "1").exists()
    print(done.stdout)
    db = RocksDBPersistentDB(PersistentDBConfig(path=str(tmp_path / "rocksdb"), read_only=True))
    try:  # version 1's tables dropped; version 2's there
        assert sorted(db.table_names()) == [f"hps_et.hps_embedding_v2.t{i}" for i in range(TABLES)]
    finally:
        db.close()
    kinds = [classify(a, expected) for a in answers]
    counts = Counter(kinds)
    assert counts["failed"] == 0, [a.error for a in answers if a.scores is None][:3]
    assert set(counts) <= {"v1", "v2"}, counts  # never a mix, never anything else
    assert counts["v1"] > 0 and counts["v2"] > 0, counts
    first_v2 = kinds.index("v2")
    assert "v1" not in kinds[first_v2:], counts  # one switch, in send order
    assert all(k == "v2" for a, k in zip(answers, kinds) if a.sent > switched), counts
    for phase in ("validate", "write", "bulk_load", "load", "switch", "unload", "serving"):
        assert f"  {phase} " in done.stdout, done.stdout
