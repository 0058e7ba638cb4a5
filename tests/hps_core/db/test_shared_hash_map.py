"""The host store (``SharedHashMapVolatileDB`` over ``shm_store``) between real processes:
sharing one copy, the store file's lifetime (users, keeper, auto-remove), stores left behind
by dead processes (half filled, complete, of another shape or source), growth under a reader
in another process, writers killed at chosen points of a growth, size limits and full
memory, a namespace folder of another user, and ``list_stores``.

Every test runs on real files under ``HPS_SHM_DIR`` = a folder of ``tmp_path`` (never the
real /dev/shm) and real forked processes (:class:`Peer`), never a stand-in for the store.
The random-kill torture test is ``test_shared_hash_map_torture.py``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import fcntl
import mmap
import os
import threading
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hps_core.config import VolatileDBConfig
from hps_core.db import shm_store as shm
from hps_core.db.shared_hash_map import SharedHashMapVolatileDB
from hps_core.errors import ConfigError, TierError
from hps_core.row_formats import RowFormat

CTX = mp.get_context("fork")  # children inherit the compiled kernels and HPS_SHM_DIR
NS = "unit"
T = "hps_et.model.table"
ANSWER_S = 120.0  # liveness: a peer that does not answer by then is stuck


def config(**overrides: Any) -> VolatileDBConfig:
    return VolatileDBConfig(**{"shared_memory_name": NS, "num_partitions": 4, "max_batch_size": 64, **overrides})


def vectors(keys: np.ndarray, dim: int, salt: float = 0.0) -> np.ndarray:
    """(n, dim) float32 rows that encode their key (and ``salt``), exact in float32."""
    keys = np.asarray(keys, np.int64)
    rows = (keys[:, None] % 1_000_000).astype(np.float64) + np.arange(dim) * 0.5 + salt
    return np.ascontiguousarray(rows, np.float32)


def header_of(path: Path) -> np.ndarray:
    return np.fromfile(path, np.int64, shm.HEADER_WORDS)


def fetch(db: SharedHashMapVolatileDB, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((keys.shape[0], db.dim(table)), np.float32)
    return db.fetch(table, keys, out), out


# --------------------------------------------------------------------------- peers


class PeerError(Exception):
    """What a peer's call raised: ``kind`` is the exception's class name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


def _peer_main(conn: Any, cfg: VolatileDBConfig) -> None:
    try:
        db = SharedHashMapVolatileDB(cfg)
        while True:
            msg = conn.recv()
            if msg is None:
                break
            fn, args = msg
            try:
                conn.send((True, fn(db, *args)))
            except Exception as exc:  # reported to the test, which decides
                conn.send((False, (type(exc).__name__, str(exc))))
        db.close()
        conn.send((True, "closed"))
    finally:
        os._exit(0)


class Peer:
    """Another process with its own ``SharedHashMapVolatileDB``, driven over a pipe:
    ``peer(fn, *args)`` runs ``fn(db, *args)`` there (``fn`` a module-level function)."""

    def __init__(self, cfg: VolatileDBConfig) -> None:
        self._conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=_peer_main, args=(child, cfg), daemon=True)
        self.proc.start()
        child.close()
        self.pid = self.proc.pid

    def send(self, fn: Callable[..., Any], *args: Any) -> None:
        self._conn.send((fn, args))

    def answered(self, timeout: float) -> bool:
        return self._conn.poll(timeout)

    def result(self, timeout: float = ANSWER_S) -> Any:
        assert self._conn.poll(timeout), f"peer {self.pid} did not answer in {timeout} s"
        ok, value = self._conn.recv()
        if not ok:
            raise PeerError(*value)
        return value

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.send(fn, *args)
        return self.result()

    def died(self, timeout: float = ANSWER_S) -> bool:
        """Whether the peer died (SIGKILL) instead of answering its last call."""
        self.proc.join(timeout)
        return self.proc.exitcode == -signal.SIGKILL

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.join()

    def close(self) -> None:
        """Close its handle and let it exit."""
        self._conn.send(None)
        assert self.result() == "closed"
        self.proc.join(ANSWER_S)


# functions run inside a peer: (db, *args)


def p_open(db: SharedHashMapVolatileDB, table: str, dim: int, fmt: str = "fp32", rows: int = 0,
           source: str = "") -> bool:
    return db.open_table(table, dim, RowFormat(fmt), rows=rows, source=source)


def p_insert(db: SharedHashMapVolatileDB, table: str, keys: np.ndarray, salt: float = 0.0) -> int:
    for start in range(0, keys.shape[0], 1000):
        chunk = keys[start : start + 1000]
        db.insert(table, chunk, vectors(chunk, db.dim(table), salt))
    return db.count(table)


def p_remove(db: SharedHashMapVolatileDB, table: str, keys: np.ndarray) -> int:
    return db.remove(table, keys)


def p_fetch(db: SharedHashMapVolatileDB, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return fetch(db, table, keys)


def p_count(db: SharedHashMapVolatileDB, table: str) -> int:
    return db.count(table)


def p_store(db: SharedHashMapVolatileDB, table: str) -> tuple[str, int]:
    path = db.store_path(table)
    return str(path), path.stat().st_ino


def p_fill(db: SharedHashMapVolatileDB, table: str, dim: int, rows: int, source: str, salt: float,
           die_after: int | None = None, ready: str = "") -> bool:
    """open_table with a fill of keys 0..rows-1; with ``die_after``, SIGKILL itself once that
    many rows are written (with ``ready``: first create that file and wait to be killed)."""

    def fill(write: Callable[[np.ndarray, np.ndarray], None]) -> None:
        for start in range(0, rows, 1000):
            keys = np.arange(start, min(rows, start + 1000), dtype=np.int64)
            write(keys, vectors(keys, dim, salt))
            if die_after is not None and start + 1000 >= die_after:
                if ready:
                    Path(ready).touch()
                    time.sleep(ANSWER_S)
                os.kill(os.getpid(), signal.SIGKILL)

    return db.open_table(table, dim, rows=rows, source=source, fill=fill)


def p_insert_killed_at_rename(db: SharedHashMapVolatileDB, table: str, keys: np.ndarray, when: str) -> None:
    """Insert ``keys`` (enough to grow the table) and SIGKILL this process at the growth's
    rename: just before it (``when`` = "c_call") or just after (``"c_return"``)."""

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event == when and arg is os.rename:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.setprofile(hook)
    try:
        db.insert(table, keys, vectors(keys, db.dim(table)))
    finally:
        sys.setprofile(None)


def p_read_while(db: SharedHashMapVolatileDB, table: str, stop: str, progress: str, steady: np.ndarray,
                 later: np.ndarray) -> dict[str, int]:
    """Read ``steady`` (always there, never rewritten) and a sample of ``later`` (being added)
    until the file ``stop`` exists, a byte appended to ``progress`` per round; every row must
    be exact, every steady key found; at the end every one of ``later``."""
    rng = np.random.default_rng(7)
    reads = found_later = 0
    while not os.path.exists(stop):
        found, out = fetch(db, table, steady)
        if not found.all() or not np.array_equal(out, vectors(steady, out.shape[1])):
            raise AssertionError(f"steady keys wrong on read {reads}: {int((~found).sum())} missing")
        sample = rng.choice(later, size=256, replace=False)
        found, out = fetch(db, table, sample)
        if not np.array_equal(out[found], vectors(sample[found], out.shape[1])):
            raise AssertionError(f"a key being added read back wrong on read {reads}")
        reads += 1
        found_later += int(found.sum())
        with open(progress, "ab") as fh:
            fh.write(b".")
    found, out = fetch(db, table, later)  # only in the file(s) grown since this reader attached
    if not found.all() or not np.array_equal(out, vectors(later, out.shape[1])):
        raise AssertionError(f"after the growth {int((~found).sum())} of {later.shape[0]} new keys missing or wrong")
    return {"reads": reads, "found_later": found_later}


def p_limit_fsize(db: SharedHashMapVolatileDB, nbytes: int) -> None:
    """Cap this process's file size (the kernel then refuses fallocate beyond it, EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def p_setuid(db: SharedHashMapVolatileDB, uid: int) -> None:
    os.setgid(uid)
    os.setuid(uid)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def warm_kernels(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Load every kernel here once, so forked peers start without compiling."""
    old = os.environ.get(shm.SHM_DIR_ENV)
    os.environ[shm.SHM_DIR_ENV] = str(tmp_path_factory.mktemp("warm"))
    try:
        db = SharedHashMapVolatileDB(config(shared_memory_name="warm"))
        keys = np.arange(300, dtype=np.int64)

        def fill(write: Callable[[np.ndarray, np.ndarray], None]) -> None:
            write(keys, vectors(keys, 4))

        db.open_table("warm.fill", 4, rows=300, fill=fill)
        db.open_table("warm.t", 4)
        db.insert("warm.t", keys, vectors(keys, 4))  # grows
        fetch(db, "warm.t", keys)
        db.remove("warm.t", keys[:10])
        db.close()
    finally:
        if old is None:
            del os.environ[shm.SHM_DIR_ENV]
        else:
            os.environ[shm.SHM_DIR_ENV] = old


@pytest.fixture
def shm_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``HPS_SHM_DIR``: a fresh folder, mode 1777 like /dev/shm; no keeper."""
    root = tmp_path / "shm"
    root.mkdir()
    root.chmod(0o1777)
    monkeypatch.setenv(shm.SHM_DIR_ENV, str(root))
    monkeypatch.delenv(shm.KEEPER_ENV, raising=False)
    return root


@pytest.fixture
def peer(shm_root: Path) -> Iterator[Callable[..., Peer]]:
    """``peer(**config_overrides)`` starts a :class:`Peer`; all are killed at teardown."""
    started: list[Peer] = []

    def start(**overrides: Any) -> Peer:
        p = Peer(config(**overrides))
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


@pytest.fixture
def keeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process to name in HPS_STORE_KEEPER (as ``hps serve`` names itself)."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


# --------------------------------------------------------------------------- sharing


def test_two_processes_share_one_copy(shm_root: Path, peer: Callable[..., Peer]) -> None:
    db = SharedHashMapVolatileDB(config())
    db.open_table(T, 4)
    other = peer()
    assert other(p_open, T, 4) is False  # attached, not created
    path = db.store_path(T)
    assert other(p_store, T) == (str(path), path.stat().st_ino)

    keys = np.arange(100, 600, dtype=np.int64)
    assert other(p_insert, T, keys) == 500
    found, out = fetch(db, T, keys)  # written there, read here
    assert found.all() and np.array_equal(out, vectors(keys, 4))
    mine = np.arange(1000, 1100, dtype=np.int64)
    db.insert(T, mine, vectors(mine, 4, salt=0.25))
    found, out = other(p_fetch, T, mine)  # written here, read there
    assert found.all() and np.array_equal(out, vectors(mine, 4, salt=0.25))
    assert db.count(T) == other(p_count, T) == 600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # one copy
    [info] = shm.list_stores(NS)
    assert sorted(info.users) == sorted([os.getpid(), other.pid])
    other.close()
    db.close()


def test_last_close_removes_the_file_and_folder(shm_root: Path, peer: Callable[..., Peer]) -> None:
    db = SharedHashMapVolatileDB(config())
    db.open_table(T, 4)
    path = db.store_path(T)
    first, second = peer(), peer()
    first(p_open, T, 4)
    second(p_open, T, 4)
    first.close()
    second.kill()  # a user that dies without closing counts no more
    assert path.exists()  # this process still uses it
    assert shm.list_stores(NS)[0].users == (os.getpid(),)
    db.close()
    assert not path.exists() and not path.parent.exists()


def test_auto_remove_false_keeps_the_store(shm_root: Path, peer: Callable[..., Peer]) -> None:
    db = SharedHashMapVolatileDB(config(shared_memory_auto_remove=False))
    db.open_table(T, 4)
    keys = np.arange(50, dtype=np.int64)
    db.insert(T, keys, vectors(keys, 4))
    path = db.store_path(T)
    db.close()
    assert path.exists()
    later = peer(shared_memory_auto_remove=False)
    assert later(p_open, T, 4) is False
    found, out = later(p_fetch, T, keys)
    assert found.all() and np.array_equal(out, vectors(keys, 4))


def test_keeper_keeps_the_store_until_remove_kept_stores(
    shm_root: Path, peer: Callable[..., Peer], keeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(shm.KEEPER_ENV, str(keeper.pid))
    db = SharedHashMapVolatileDB(config())
    db.open_table(T, 4)
    keys = np.arange(200, dtype=np.int64)
    db.insert(T, keys, vectors(keys, 4))
    path = db.store_path(T)
    db.close()  # the last user, but the keeper is alive
    assert path.exists()
    [info] = shm.list_stores(NS)
    assert info.keeper == keeper.pid and info.users == () and info.rows == 200

    restarted = peer()  # e.g. Triton restarted under the same hps serve: the rows are there
    assert restarted(p_open, T, 4) is False
    found, out = restarted(p_fetch, T, keys)
    assert found.all() and np.array_equal(out, vectors(keys, 4))
    assert shm.remove_kept_stores(keeper.pid) == []  # a live user: kept
    assert shm.remove_kept_stores(keeper.pid + 1_000_000) == []  # not that keeper's
    restarted.close()
    assert path.exists()
    assert shm.remove_kept_stores(keeper.pid + 1_000_000) == []
    assert shm.remove_kept_stores(keeper.pid) == [str(path)]
    assert not path.exists() and not path.parent.exists()


def test_a_dead_keeper_keeps_nothing(shm_root: Path, keeper: subprocess.Popen[bytes],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(shm.KEEPER_ENV, str(keeper.pid))
    db = SharedHashMapVolatileDB(config())
    db.open_table(T, 4)
    path = db.store_path(T)
    keeper.kill()
    keeper.wait()
    db.close()
    assert not path.exists() and not path.parent.exists()


# --------------------------------------------------------------------------- stores left behind


def test_a_store_left_filling_is_removed_and_built_again(
    shm_root: Path, peer: Callable[..., Peer], caplog: pytest.LogCaptureFixture
) -> None:
    filler = peer()
    filler.send(p_fill, T, 4, 5000, "files-v1", 0.0, 2000)
    assert filler.died()
    path = shm_root / f"hps.{NS}" / T
    [info] = shm.list_stores(NS)
    assert not info.complete and info.rows >= 2000

    calls = []

    def fill(write: Callable[[np.ndarray, np.ndarray], None]) -> None:
        calls.append(1)
        keys = np.arange(5000, dtype=np.int64)
        write(keys, vectors(keys, 4, salt=0.5))

    db = SharedHashMapVolatileDB(config())
    with caplog.at_level(logging.WARNING, logger="hps_core"):
        assert db.open_table(T, 4, rows=5000, source="files-v1", fill=fill) is True
    assert calls == [1]
    assert any("filler died" in r.getMessage() for r in caplog.records)
    keys = np.arange(5000, dtype=np.int64)
    found, out = fetch(db, T, keys)
    assert found.all() and np.array_equal(out, vectors(keys, 4, salt=0.5))
    assert db.count(T) == 5000 and shm.list_stores(NS)[0].complete
    db.close()


def test_an_opener_waiting_on_a_filler_that_dies_builds_the_store(
    shm_root: Path, tmp_path: Path, peer: Callable[..., Peer]
) -> None:
    ready = tmp_path / "ready"
    filler, waiter = peer(), peer()
    filler.send(p_fill, T, 4, 5000, "src", 0.0, 2000, str(ready))
    deadline = time.monotonic() + ANSWER_S
    while not ready.exists():
        assert time.monotonic() < deadline and filler.proc.is_alive()
        time.sleep(0.01)
    waiter.send(p_fill, T, 4, 5000, "src", 0.5)
    assert not waiter.answered(0.5)  # blocked on the filler's lock
    filler.kill()
    assert waiter.result() is True  # it found the file half filled and built it itself
    found, out = waiter(p_fetch, T, np.arange(5000, dtype=np.int64))
    assert found.all() and np.array_equal(out, vectors(np.arange(5000), 4, salt=0.5))


def test_openers_racing_a_fill_fill_once_and_attach(shm_root: Path, peer: Callable[..., Peer]) -> None:
    first, second = peer(), peer()
    first.send(p_fill, T, 4, 100_000, "src", 0.0)
    second.send(p_fill, T, 4, 100_000, "src", 0.5)
    filled = (first.result(), second.result())
    assert sorted(filled) == [False, True]  # exactly one filled; the other waited and attached
    salt = 0.0 if filled[0] else 0.5
    keys = np.arange(0, 100_000, 997, dtype=np.int64)
    for p in (first, second):
        found, out = p(p_fetch, T, keys)
        assert found.all() and np.array_equal(out, vectors(keys, 4, salt))


def test_a_complete_store_left_by_a_dead_process_is_reused(shm_root: Path, peer: Callable[..., Peer]) -> None:
    rows = 200_000
    filler = peer()
    t0 = time.monotonic()
    assert filler(p_fill, T, 16, rows, "files-v1", 0.0) is True
    fill_s = time.monotonic() - t0
    path, inode = filler(p_store, T)
    filler.kill()  # never closed: its slot is left, its pid dead

    def fill(write: Callable[[np.ndarray, np.ndarray], None]) -> None:
        raise AssertionError("a complete store of the same source must not be filled again")

    db = SharedHashMapVolatileDB(config())
    t0 = time.monotonic()
    assert db.open_table(T, 16, rows=rows, source="files-v1", fill=fill) is False
    attach_s = time.monotonic() - t0
    assert db.store_path(T).stat().st_ino == inode and str(db.store_path(T)) == path
    assert db.count(T) == rows
    keys = np.arange(0, rows, 101, dtype=np.int64)
    found, out = fetch(db, T, keys)
    assert found.all() and np.array_equal(out, vectors(keys, 16))
    assert shm.list_stores(NS)[0].users == (os.getpid(),)
    assert attach_s < 10.0, f"attaching took {attach_s:.2f} s (filling took {fill_s:.2f} s)"  # liveness only
    print(f"\nfilled {rows} rows in {fill_s:.3f} s, attached in {attach_s:.4f} s")
    db.close()


def test_a_forked_child_does_not_share_its_parents_writer_lock(shm_root: Path) -> None:
    """flock belongs to the open file description a fork shares: without a description of its
    own, a child would take the lock its parent holds and write beside it."""
    db = SharedHashMapVolatileDB(config())
    db.open_table(T, 4)
    store = db._store(T)
    store.acquire()  # the parent writes
    try:
        pid = os.fork()
        if pid == 0:  # the child: its try must fail while the parent holds the lock
            try:
                fcntl.flock(store.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os._exit(1)
            except BlockingIOError:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child took the lock its parent holds"
    finally:
        store.release()
    keys = np.arange(10, dtype=np.int64)
    db.insert(T, keys, vectors(keys, 4))  # the parent's own lock still works
    db.close()


def test_a_child_forked_during_a_lookup_is_not_left_waiting_on_its_parents_locks(shm_root: Path) -> None:
    """A thread of the parent inside a lookup holds this process's map lock at the fork; the
    child (which has no such thread) must still grow and remap its store."""
    db = SharedHashMapVolatileDB(config())
    db.open_table(T, 4)
    inside, leave = threading.Event(), threading.Event()

    def lookup_in_progress() -> None:
        with db._maps.read_locked(0):
            inside.set()
            leave.wait(30)

    reader = threading.Thread(target=lookup_in_progress)
    reader.start()
    try:
        assert inside.wait(30)
        pid = os.fork()
        if pid == 0:  # the child: enough rows to grow the store, which remaps under the map lock
            signal.alarm(30)
            keys = np.arange(20_000, dtype=np.int64)
            db.insert(T, keys, vectors(keys, 4))
            os._exit(0 if db.count(T) == 20_000 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the forked child hung on (or failed past) its parent's lock"
    finally:
        leave.set()
        reader.join()
    db.close()


def test_a_namespace_folder_removed_under_a_creator_is_made_again(shm_root: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process's sweep (hps serve's stop removes empty namespace folders) may remove the
    folder between its creation and the store's: the creator makes it again, not "no such table"."""
    db = SharedHashMapVolatileDB(config())
    real_open = shm.open_fd
    swept = []

    def open_after_a_sweep(path: Path, create: bool) -> int:
        if not swept:
            swept.append(path.parent)
            path.parent.rmdir()  # empty: as the other process's sweep finds it
        return real_open(path, create)

    monkeypatch.setattr(shm, "open_fd", open_after_a_sweep)
    db.open_table(T, 4)
    assert swept and db.store_path(T).exists()
    keys = np.arange(10, dtype=np.int64)
    db.insert(T, keys, vectors(keys, 4))
    assert db.count(T) == 10
    db.close()


def test_orphaned_stores_are_swept_but_not_those_in_use_kept_or_kept_on_purpose(
    shm_root: Path, peer: Callable[..., Peer], keeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Servers that all die without a keeper (Triton started directly) leave their stores; the
    sweep (hps serve's start, hps inspect --stores --remove-orphans) removes exactly those."""
    orphan, on_purpose, used = (peer(shared_memory_name=n, shared_memory_auto_remove=n != "purpose")
                                for n in ("orphan", "purpose", "used"))
    for p in (orphan, on_purpose, used):
        p(p_open, T, 4)
    paths = {name: Path(p(p_store, T)[0]) for name, p in (("orphan", orphan), ("purpose", on_purpose), ("used", used))}
    orphan.kill()  # died without closing: no user, no keeper
    on_purpose.kill()  # auto_remove false: kept on purpose, e.g. filled ahead by hps load
    monkeypatch.setenv(shm.KEEPER_ENV, str(keeper.pid))
    db = SharedHashMapVolatileDB(config(shared_memory_name="kept"))  # kept by a live hps serve
    db.open_table(T, 4)
    paths["kept"] = db.store_path(T)
    db.close()
    older = peer(shared_memory_name="older")  # a store of an earlier version: no auto_remove recorded
    older(p_open, T, 4)
    paths["older"] = Path(older(p_store, T)[0])
    older.kill()
    with open(paths["older"], "r+b") as f, mmap.mmap(f.fileno(), shm.HEADER_WORDS * 8) as mm:
        header = np.frombuffer(mm, np.int64, shm.HEADER_WORDS)
        meta = shm.read_meta(header)
        del meta["auto_remove"]
        shm._write_meta(header, meta)
        del header
    assert all(path.exists() for path in paths.values())
    assert shm.remove_orphaned_stores() == [str(paths["orphan"])]
    assert not paths["orphan"].exists() and not paths["orphan"].parent.exists()
    assert all(paths[name].exists() for name in ("purpose", "used", "kept", "older"))


@pytest.mark.parametrize("dim, fmt", [(8, "fp32"), (4, "fp16")], ids=["dim", "format"])
def test_a_store_of_another_shape_is_rebuilt_when_unused(
    shm_root: Path, peer: Callable[..., Peer], caplog: pytest.LogCaptureFixture, dim: int, fmt: str
) -> None:
    old = peer()
    old(p_open, T, dim, fmt)
    old(p_insert, T, np.arange(100, dtype=np.int64))
    old.kill()
    db = SharedHashMapVolatileDB(config())
    with caplog.at_level(logging.WARNING, logger="hps_core"):
        assert db.open_table(T, 4) is False
    assert db.dim(T) == 4 and db.row_format(T) is RowFormat.FP32 and db.count(T) == 0
    assert any("removing it and building it again" in r.getMessage() for r in caplog.records)
    [info] = shm.list_stores(NS)
    assert (info.dim, info.row_format) == (4, "fp32")
    db.close()


@pytest.mark.parametrize("dim, fmt, says", [(8, "fp32", "dim 8"), (4, "fp16", "fp16")], ids=["dim", "format"])
def test_a_store_of_another_shape_in_use_is_refused_by_name(
    shm_root: Path, peer: Callable[..., Peer], dim: int, fmt: str, says: str
) -> None:
    user = peer()
    user(p_open, T, dim, fmt)
    keys = np.arange(100, dtype=np.int64)
    user(p_insert, T, keys)
    path, inode = user(p_store, T)
    db = SharedHashMapVolatileDB(config())
    with pytest.raises(ConfigError) as err:
        db.open_table(T, 4)
    message = str(err.value)
    assert path in message and says in message and str(user.pid) in message and "shared_memory_name" in message
    assert Path(path).stat().st_ino == inode  # untouched
    found, _ = user(p_fetch, T, keys)
    assert found.all()
    db.close()


def test_a_store_of_another_source_is_rebuilt_when_unused_refused_when_used(
    shm_root: Path, peer: Callable[..., Peer]
) -> None:
    old = peer()
    assert old(p_fill, T, 4, 3000, "files-v1", 0.0) is True
    old.kill()
    new = peer()
    assert new(p_fill, T, 4, 3000, "files-v2", 0.5) is True  # unused: built again from v2
    found, out = new(p_fetch, T, np.arange(3000, dtype=np.int64))
    assert found.all() and np.array_equal(out, vectors(np.arange(3000), 4, 0.5))
    path, inode = new(p_store, T)

    db = SharedHashMapVolatileDB(config())
    with pytest.raises(ConfigError) as err:  # v1 again while a process uses the v2 store
        db.open_table(T, 4, rows=3000, source="files-v1", fill=lambda write: None)
    assert path in str(err.value) and "other sparse files" in str(err.value) and str(new.pid) in str(err.value)
    assert Path(path).stat().st_ino == inode
    assert db.open_table(T, 4) is False  # without a fill, any complete store of the shape will do
    found, out = fetch(db, T, np.arange(3000, dtype=np.int64))
    assert found.all() and np.array_equal(out, vectors(np.arange(3000), 4, 0.5))
    db.close()


@pytest.mark.parametrize("when", ["c_call", "c_return"], ids=["before", "after"])
def test_a_grower_killed_at_its_rename_loses_nothing(shm_root: Path, peer: Callable[..., Peer], when: str) -> None:
    """Killed just before the rename (the old file stays, flagged superseded, a half-built
    larger file beside it) or just after (the larger file is the store): either way every
    row is there, readers go on, the next writer grows it, and nothing is left behind."""
    db = SharedHashMapVolatileDB(config())
    db.open_table(T, 4)
    base = np.arange(200, dtype=np.int64)
    db.insert(T, base, vectors(base, 4))
    path = db.store_path(T)
    inode = path.stat().st_ino
    grower = peer()
    grower(p_open, T, 4)
    more = np.arange(10_000, 10_000 + 2000, dtype=np.int64)  # needs a larger file
    grower.send(p_insert_killed_at_rename, T, more, when)
    assert grower.died(), f"the grower was not killed at its rename (exit code {grower.proc.exitcode})"
    leftovers = [p.name for p in path.parent.iterdir() if shm._TMP_MARK in p.name]
    if when == "c_call":
        assert path.stat().st_ino == inode and header_of(path)[shm.H_SUPERSEDED] == 1
        assert leftovers == [f"{T}{shm._TMP_MARK}{grower.pid}"]
    else:
        assert path.stat().st_ino != inode and header_of(path)[shm.H_SUPERSEDED] == 0
        assert leftovers == []
    found, out = fetch(db, T, base)  # this process remaps or clears the flag, and reads on
    assert found.all() and np.array_equal(out, vectors(base, 4))
    assert header_of(path)[shm.H_SUPERSEDED] == 0
    found, out = fetch(db, T, more)  # rows of the killed insert: whole when there
    assert np.array_equal(out[found], vectors(more[found], 4))
    db.insert(T, more, vectors(more, 4))  # the next writer grows it
    found, out = fetch(db, T, np.concatenate([base, more]))
    assert found.all() and db.count(T) == 2200
    db.close()
    assert not path.exists()
    assert not path.parent.exists(), f"left behind: {sorted(p.name for p in path.parent.iterdir())}"


# --------------------------------------------------------------------------- growth


def test_growth_under_a_reader_in_another_process(shm_root: Path, tmp_path: Path, peer: Callable[..., Peer]) -> None:
    db = SharedHashMapVolatileDB(config())
    db.open_table(T, 8)  # 64 rows per partition
    steady = np.arange(150, dtype=np.int64)
    db.insert(T, steady, vectors(steady, 8))
    path = db.store_path(T)
    start_bytes = path.stat().st_size
    later = np.arange(100_000, 100_000 + 30_000, dtype=np.int64)
    stop, progress = tmp_path / "stop", tmp_path / "progress"
    progress.touch()
    reader = peer()
    reader(p_open, T, 8)
    reader.send(p_read_while, T, str(stop), str(progress), steady, later)
    batches = 0
    for start in range(0, later.shape[0], 500):  # 64 -> 8192 rows per partition: reads between all batches
        rounds = progress.stat().st_size
        deadline = time.monotonic() + ANSWER_S
        while progress.stat().st_size == rounds:  # the reader read since the last batch
            assert time.monotonic() < deadline and not reader.answered(0), "the reader stopped"
            time.sleep(0.001)
        chunk = later[start : start + 500]
        db.insert(T, chunk, vectors(chunk, 8))
        batches += 1
    stop.touch()
    stats = reader.result()
    assert stats["reads"] >= batches
    assert path.stat().st_size > 16 * start_bytes
    assert [p.name for p in path.parent.iterdir()] == [T]  # every older file is gone
    assert reader(p_count, T) == db.count(T) == 30_150
    print(f"\nreader: {stats}, {start_bytes} -> {path.stat().st_size} bytes")
    db.close()
    reader.close()
    assert not path.parent.exists()


@pytest.mark.parametrize("first", ["count", "close"])
def test_a_process_that_missed_a_growth_counts_and_leaves_the_current_file(
    shm_root: Path, peer: Callable[..., Peer], first: str
) -> None:
    """This process attached before another one grew the table and has not read since: its
    count and sizes are the current file's, and its close gives up its slot there (so the
    last close removes the store)."""
    db = SharedHashMapVolatileDB(config())
    db.open_table(T, 4)
    path = db.store_path(T)
    grower = peer()
    grower(p_open, T, 4)
    assert grower(p_insert, T, np.arange(5000, dtype=np.int64)) == 5000  # grows several times
    if first == "count":
        assert db.count(T) == 5000
        assert db.memory_bytes(T) == db.memory_bytes() == path.stat().st_size
    db.close()
    assert shm.list_stores(NS)[0].users == (grower.pid,)
    grower.close()
    assert not path.exists() and not path.parent.exists()


# --------------------------------------------------------------------------- limits


def test_shared_memory_size_too_small_names_the_field(shm_root: Path) -> None:
    db = SharedHashMapVolatileDB(config(shared_memory_size=10_000))
    with pytest.raises(TierError, match="shared_memory_size") as err:
        db.open_table(T, 4)
    assert str(shm_root / f"hps.{NS}" / T) in str(err.value)
    assert not (shm_root / f"hps.{NS}" / T).exists()
    db.close()


def test_growth_beyond_shared_memory_size_fails_cleanly(shm_root: Path) -> None:
    probe = SharedHashMapVolatileDB(config(shared_memory_name="probe"))
    probe.open_table(T, 4)
    size = probe.memory_bytes(T)
    probe.close()
    db = SharedHashMapVolatileDB(config(shared_memory_size=size + 4096))  # room to create, not to grow
    db.open_table(T, 4)
    first = np.arange(100, dtype=np.int64)
    db.insert(T, first, vectors(first, 4))
    more = np.arange(1000, 3000, dtype=np.int64)
    with pytest.raises(TierError, match="shared_memory_size"):
        db.insert(T, more, vectors(more, 4))
    path = db.store_path(T)
    assert [p.name for p in path.parent.iterdir()] == [T]  # no half-built larger file
    found, out = fetch(db, T, first)
    assert found.all() and np.array_equal(out, vectors(first, 4))
    db.remove(T, more)  # the lock was given back (chunks before the failure, if any, stay)
    few = first[:4]  # (a chunk that might not fit its partition grows it first, overwrites or not)
    db.insert(T, few, vectors(few, 4, 0.5))
    expected = vectors(first, 4)
    expected[:4] = vectors(few, 4, 0.5)
    found, out = fetch(db, T, first)
    assert found.all() and np.array_equal(out, expected)
    db.close()
    assert not path.parent.exists()


def test_full_memory_on_create_and_on_growth(shm_root: Path, peer: Callable[..., Peer]) -> None:
    """fallocate refused (here by RLIMIT_FSIZE: EFBIG, which the store handles like ENOSPC):
    a clear error with the bytes needed, no file left, the store still usable."""
    small = peer()
    small(p_limit_fsize, 64 * 1024)
    with pytest.raises(PeerError, match="too small for this table") as err:
        small(p_open, "hps_et.model.big", 16, "fp32", 100_000)
    assert err.value.kind == "TierError" and "--shm-size=" in err.value.message
    assert not (shm_root / f"hps.{NS}" / "hps_et.model.big").exists()
    small(p_open, T, 4)  # 28 KiB: fits
    first = np.arange(100, dtype=np.int64)
    small(p_insert, T, first)
    more = np.arange(1000, 20_000, dtype=np.int64)
    with pytest.raises(PeerError, match="too small for this table"):
        small(p_insert, T, more)
    assert sorted(p.name for p in (shm_root / f"hps.{NS}").iterdir()) == [T]  # no half-built file
    found, out = small(p_fetch, T, first)
    assert found.all() and np.array_equal(out, vectors(first, 4))
    small(p_remove, T, more)  # the lock was given back (chunks before the failure, if any, stay)
    assert small(p_insert, T, first, 0.5) == 100
    found, out = small(p_fetch, T, first)
    assert found.all() and np.array_equal(out, vectors(first, 4, 0.5))


@pytest.fixture
def tiny_tmpfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real 256 KiB tmpfs as HPS_SHM_DIR, where this process may mount one (root with
    CAP_SYS_ADMIN); skipped elsewhere."""
    mount = shutil.which("mount")
    where = tmp_path / "tiny"
    where.mkdir()
    if os.geteuid() != 0 or mount is None or subprocess.run(
            [mount, "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN)")
    monkeypatch.setenv(shm.SHM_DIR_ENV, str(where))
    monkeypatch.delenv(shm.KEEPER_ENV, raising=False)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_tmpfs_gives_a_clear_error(tiny_tmpfs: Path) -> None:
    db = SharedHashMapVolatileDB(config())
    with pytest.raises(TierError, match="too small for this table") as err:
        db.open_table("hps_et.model.big", 16, rows=100_000)
    assert "--shm-size=" in str(err.value)
    assert os.statvfs(tiny_tmpfs).f_bavail * os.statvfs(tiny_tmpfs).f_frsize > 200 * 1024  # given back
    db.open_table(T, 4)
    first = np.arange(100, dtype=np.int64)
    db.insert(T, first, vectors(first, 4))
    with pytest.raises(TierError, match="too small for this table"):
        more = np.arange(1000, 30_000, dtype=np.int64)
        db.insert(T, more, vectors(more, 4))
    found, out = fetch(db, T, first)
    assert found.all() and np.array_equal(out, vectors(first, 4))
    db.close()
    assert not (tiny_tmpfs / f"hps.{NS}").exists()


def test_a_namespace_folder_of_another_user_is_a_clear_error(
    shm_root: Path, peer: Callable[..., Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a folder of another uid")
    folder = shm_root / f"hps.{NS}"
    folder.mkdir(mode=0o700)
    os.chown(folder, 12345, 12345)
    db = SharedHashMapVolatileDB(config())
    with pytest.raises(TierError) as err:
        db.open_table(T, 4)
    message = str(err.value)
    assert str(folder) in message and "uid 12345" in message and "shared_memory_name" in message
    db.close()

    # the other way round: a server of another uid meets root's namespace, in a folder it
    # can reach as it would /dev/shm (tmp_path's parents are private to root)
    reachable = Path(tempfile.mkdtemp(prefix="hps-shm-test-", dir="/tmp"))
    try:
        reachable.chmod(0o1777)
        monkeypatch.setenv(shm.SHM_DIR_ENV, str(reachable))
        (reachable / f"hps.{NS}").mkdir(mode=0o700)
        other = peer()
        other(p_setuid, 12345)
        with pytest.raises(PeerError) as err2:
            other(p_open, T, 4)
        message = err2.value.message
        assert err2.value.kind == "TierError" and str(reachable / f"hps.{NS}") in message and "uid 0" in message
        other.kill()
    finally:
        shutil.rmtree(reachable)


# --------------------------------------------------------------------------- listing


def test_list_stores_reports_rows_dim_format_and_users(shm_root: Path, peer: Callable[..., Peer]) -> None:
    db = SharedHashMapVolatileDB(config())
    db.open_table(T, 4)
    db.insert(T, np.arange(300, dtype=np.int64), vectors(np.arange(300), 4))
    other = peer()
    other(p_open, T, 4)
    other(p_open, "hps_et.model.half", 8, "fp16")
    other(p_insert, "hps_et.model.half", np.arange(40, dtype=np.int64))
    elsewhere = SharedHashMapVolatileDB(config(shared_memory_name="elsewhere"))
    elsewhere.open_table(T, 2)

    infos = {(i.namespace, i.table): i for i in shm.list_stores()}
    assert set(infos) == {(NS, T), (NS, "hps_et.model.half"), ("elsewhere", T)}
    main, half = infos[NS, T], infos[NS, "hps_et.model.half"]
    assert (main.rows, main.dim, main.row_format, main.complete) == (300, 4, "fp32", True)
    assert sorted(main.users) == sorted([os.getpid(), other.pid])
    assert (half.rows, half.dim, half.row_format, half.users) == (40, 8, "fp16", (other.pid,))
    assert main.bytes == Path(main.path).stat().st_size and main.keeper == 0 and main.recoveries == 0
    assert infos["elsewhere", T].dim == 2
    assert {i.table for i in shm.list_stores(NS)} == {T, "hps_et.model.half"}
    other.kill()
    infos = {i.table: i for i in shm.list_stores(NS)}
    assert infos[T].users == (os.getpid(),) and infos["hps_et.model.half"].users == ()  # the dead are not listed
    elsewhere.close()
    db.close()
