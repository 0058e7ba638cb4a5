"""Faults around a publication that need no Triton (issue 19): the repository's publication lock
(a second run refused naming the holder, a dead holder's lock taken over), the dense check's
child killed with a SIGKILLed parent, and a full disk named by ``hps load``'s first error.
Real processes throughout; tests/hps_core/test_publishing_crash.py does the rest with Triton."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hps_core.publishing import PAUSE_AT_ENV, PublishTarget
from hps_demo.versions import build_repository, make_version, write_export

TABLES, ROWS, DIM = 2, 40, 4
REPO_ROOT = Path(__file__).resolve().parents[2]


def _hps(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hps_core.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT, env={**os.environ, **(env or {})})


def _gone(pid: int, timeout: float = 60.0) -> bool:
    """Whether process ``pid`` is gone (or a zombie) within ``timeout``: a bound on a wait,
    not a timing under test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.fixture()
def repository(tmp_path: Path) -> Path:
    return build_repository(tmp_path, make_version(1, tables=TABLES, rows=ROWS, dim=DIM), rocksdb=tmp_path / "rocksdb")


def test_a_second_publication_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(
        repository: Path, tmp_path: Path, free_port: object) -> None:
    """While a process holds the repository's publication lock, ``hps publish-model`` exits 1
    naming its pid, host and start time, before asking the server anything; SIGKILLed, its lock is
    free at once (flock), and the next run goes on to the server (here none listens: its error is
    the connection's, not the lock's)."""
    export = write_export(make_version(2, tables=TABLES, rows=ROWS, dim=DIM), tmp_path / "export_v2")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from pathlib import Path\n"
         "from hps_core.publishing import PublishTarget, publication_lock\n"
         "with publication_lock(PublishTarget(repository=Path(sys.argv[1]))):\n"
         "    print('locked', flush=True)\n"
         "    time.sleep(600)\n", str(repository)],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        url = f"127.0.0.1:{free_port()}"  # type: ignore[operator]
        refused = _hps("publish-model", str(export), "--model-repository", str(repository), "--url", url)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "another hps publish-model is publishing" in refused.stderr
        assert f"pid {holder.pid} on host {socket.gethostname()}, started " in refused.stderr, refused.stderr
        lock = PublishTarget(repository=repository).work / "publish.lock"
        assert json.loads(lock.read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait(60)
    taken = _hps("publish-model", str(export), "--model-repository", str(repository), "--url", url)
    assert taken.returncode == 1 and "another hps publish-model" not in taken.stderr, taken.stderr
    assert lock.read_text() == ""  # released by the run that took it over


def test_the_dense_check_child_dies_with_a_killed_publish_model(tmp_path: Path) -> None:
    """The check that loads an export's dense weights runs in a child Python (torch); a parent
    SIGKILLed while it runs takes it along (PR_SET_PDEATHSIG), where it used to go on alone.
    The child is held in its ``import torch`` (a stand-in torch first on its path that says it
    started, then sleeps) and the parent paused at the hook right after starting it."""
    export = write_export(make_version(2, tables=TABLES, rows=ROWS, dim=DIM), tmp_path / "export")
    stall = tmp_path / "stall"
    (stall / "torch").mkdir(parents=True)
    started = tmp_path / "child-started"
    (stall / "torch" / "__init__.py").write_text(
        f"import os, time\nopen({str(started)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pathlib import Path\n"
         "from hps_core.publishing import check_dense_loads\ncheck_dense_loads(Path(sys.argv[1]))\n",
         str(export / "dense.pt")],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        env={**os.environ, PAUSE_AT_ENV: "validate.dense", "PYTHONPATH": str(stall)})
    try:
        deadline = time.monotonic() + 120
        while not started.is_file() or not started.read_text():
            assert parent.poll() is None and time.monotonic() < deadline, "the dense check never started"
            time.sleep(0.05)
        child = int(started.read_text())
        assert _gone(child, timeout=0.5) is False  # alive, in its import
    finally:
        parent.kill()
        parent.wait(60)
    assert _gone(child), f"the dense check's child {child} outlived its killed parent"


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (root only: skipped where mount is refused)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_hps_load_on_a_full_disk_names_the_table_and_the_fix_the_first_time(tmp_path: Path, small_disk: Path) -> None:
    """The first failure used to be 'RocksDB close failed' (the close after the failed load
    replaced its error); a retry named the table."""
    from hps_core.formats import write_sparse_model

    rng = np.random.default_rng(0)
    names = [f"t{i}" for i in range(3)]
    for name in names:
        keys = np.arange(20_000, dtype=np.int64)
        write_sparse_model(tmp_path / name, keys, rng.normal(size=(20_000, 16)).astype(np.float32))
    config = tmp_path / "hps.json"
    config.write_text(json.dumps({
        "supportlonglong": True, "persistent_db": {"type": "rocks_db", "path": str(small_disk / "db")},
        "models": [{"model": "m", "sparse_files": [str(tmp_path / n) for n in names], "embedding_table_names": names,
                    "embedding_vecsize_per_table": [16] * 3, "maxnum_catfeature_query_per_table_per_sample": [1] * 3,
                    "default_value_for_each_table": [0.0] * 3, "gpucache": False}]}))
    for _ in range(2):  # the first error and the retry's say the same
        done = _hps("load", "--config", str(config), "--no-progress")
        assert done.returncode == 1
        error = done.stderr.strip().splitlines()[-1]
        assert "on table 'hps_et.m.t" in error and "is full: free space on it" in error, done.stderr
        assert "resumes" in error
