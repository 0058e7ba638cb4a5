"""One GPU cache per GPU shared by processes through CUDA IPC (hps_core.cache.shared_gpu):
attach, one allocation and one keeper for N processes, concurrent query and insert from two
processes (rows never torn), a process SIGKILLed under load (the others go on, a writer that
died inside a write is repaired, nothing is left once the last user closes), stale files and
caches of another shape, and the server's path.

Real processes (``subprocess``, the interpreter running the tests): on the emulated GPU
(HPS_EMULATED_GPU=1) the children get the emulated CuPy through tests/cuda_emulator/site; on a
real GPU (scripts/gpu_check.sh) they use CuPy and CUDA IPC. Every process a test starts is
stopped by its pid, and every test checks that no file and no keeper is left behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hps_core.arrays import to_host
from hps_core.cache import SharedName, make_multi_table_cache
from hps_core.cache import shared_gpu
from hps_core.config import load_config
from hps_core.db import shm_store
from hps_core.errors import ConfigError, DeviceError
from hps_core.formats import write_sparse_model
from hps_core.server import HierarchicalParameterServer

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[3]
DIM = 8
KEYS = 512  # keys each test writes (static capacity fits them all)

# A user process: maps the shared cache, then runs its mode, prints one JSON line.
WORKER = r"""
import json, os, select, sys, time
import numpy as np
from hps_core.cache import SharedName, make_multi_table_cache
namespace, kind, mode, seconds, seed = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
cache = make_multi_table_cache(kind, device=0, capacities=[%(keys)d], dims=[%(dim)d],
                               shared=SharedName(namespace, "m"))
import cupy as cp
dim, nkeys = %(dim)d, %(keys)d
print(json.dumps({"ready": os.getpid()}), flush=True)

def rows(keys, version):  # every float of a row encodes (key, version): a torn row is not uniform
    return np.repeat((keys * 1000 + version).astype(np.float32), dim)

def query(keys):
    out = cp.zeros(keys.shape[0] * dim, cp.float32)
    offs = np.arange(keys.shape[0], dtype=np.int64) * dim
    miss = cp.asnumpy(cache.query_tables(np.zeros(keys.shape[0], np.int64), keys, out, offs))
    got = cp.asnumpy(out).reshape(-1, dim)
    hit = np.ones(keys.shape[0], bool)
    hit[miss] = False
    return got, hit

rng = np.random.default_rng(seed)
stats = {"queries": 0, "inserts": 0, "hits": 0, "bad": 0}
if mode.startswith("hold"):
    sys.stdin.readline()
    if mode == "hold-use":  # then use the device memory (freed under it, the launches fail)
        keys = np.arange(64, dtype=np.int64)
        cache.replace_tables(np.zeros(64, np.int64), keys, rows(keys, 9), np.arange(64, dtype=np.int64) * dim)
        got, hit = query(keys)
        stats["hits"] = int(hit.sum())
        stats["bad"] = int((got[hit] != rows(keys, 9).reshape(-1, dim)[hit]).any(axis=1).sum())
else:
    end = time.monotonic() + seconds
    version = 0
    while time.monotonic() < end:
        if mode == "serve" and select.select([sys.stdin], [], [], 0)[0]:  # run until told to stop
            break
        version = version %% 999 + 1
        keys = rng.choice(nkeys, 64, replace=False).astype(np.int64)
        cache.replace_tables(np.zeros(64, np.int64), keys, rows(keys, version), np.arange(64, dtype=np.int64) * dim)
        stats["inserts"] += 1
        if mode == "write":  # inserts only: a kill lands inside a write more often
            continue
        keys = rng.choice(nkeys, 128, replace=False).astype(np.int64)
        got, hit = query(keys)
        h = got[hit]
        stats["hits"] += int(hit.sum())
        stats["queries"] += 1
        ok = (h == h[:, :1]).all(axis=1) & (np.floor(h[:, 0] / 1000) == keys[hit])
        stats["bad"] += int((~ok).sum())
stats["repairs"] = cache._region.repairs
print(json.dumps(stats), flush=True)
cache.close()
""" % {"keys": KEYS, "dim": DIM}


def _start(namespace: str, kind: str, mode: str, seconds: float = 0.0, seed: int = 0,
           env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", WORKER, namespace, kind, mode, str(seconds), str(seed)],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    line = proc.stdout.readline() if proc.stdout else ""
    if '"ready"' not in line:
        proc.kill()
        raise AssertionError(f"worker did not start: {line!r} {proc.communicate()[1][-3000:]}")
    return proc


def _finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> dict[str, Any]:
    try:
        out, err = proc.communicate("\n", timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"worker {proc.pid} hung") from None
    assert proc.returncode == 0, err[-3000:]
    return dict(json.loads(out.strip().splitlines()[-1]))


def _path(namespace: str) -> Path:
    """The metadata file of cache "m" of ``namespace`` on device 0 (named by its PCI bus id)."""
    import cupy as cp

    return shared_gpu.gpu_path(SharedName(namespace, "m"), shared_gpu.pci_bus_id(cp, 0))


def _keepers(path: Path) -> list[int]:
    """Pids of the GPU keepers of ``path``, or of every file in ``path`` when it is a
    namespace's folder (from /proc, by their command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            mine = str(path).encode()
            if b"hps_core.cache.gpu_keeper" in cmd and any(a == mine or a.startswith(mine + b"/") for a in cmd):
                found.append(int(entry))
    return found


def _words(path: Path) -> np.ndarray:
    return np.frombuffer(path.read_bytes()[: 4096 * 8], np.int64)


def _gone(path: Path, timeout: float = 5.0) -> bool:
    """Whether the file, its folder and its keepers are gone (waiting up to ``timeout``);
    ``path`` a namespace's folder: the folder and the keepers of every file in it."""
    folder = path if path.name.startswith("hps.") else path.parent
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not folder.exists() and not _keepers(path):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture()
def namespace() -> Iterator[str]:
    """A namespace of this test's own; afterwards nothing of it may be left (a keeper left
    is stopped by its pid, and the test fails)."""
    name = f"test-gpu-{uuid.uuid4().hex[:10]}"
    yield name
    directory = shm_store.namespace_dir(name)
    ok = _gone(directory)
    left = _keepers(directory)  # found by command line now, so a pid is never a reused one
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    if directory.exists():
        for f in directory.iterdir():
            f.unlink()
        directory.rmdir()
    assert ok, f"left behind: {directory} keepers {left}"


def _rows(keys: np.ndarray, version: int) -> np.ndarray:
    return np.repeat((keys * 1000 + version).astype(np.float32), DIM)


def _query(cache: Any, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import cupy as cp

    out = cp.zeros(keys.shape[0] * DIM, cp.float32)
    miss = cache.query_tables(np.zeros(keys.shape[0], np.int64), keys, out, np.arange(keys.shape[0]) * DIM)
    hit = np.ones(keys.shape[0], bool)
    hit[cp.asnumpy(miss)] = False
    return cp.asnumpy(out).reshape(-1, DIM), hit


def _open(namespace: str, kind: str = "dynamic", **kwargs: Any) -> Any:
    args: dict[str, Any] = dict(device=0, capacities=[KEYS], dims=[DIM])
    args.update(kwargs)
    return make_multi_table_cache(kind, shared=SharedName(namespace, "m"), **args)


def _insert(cache: Any, keys: np.ndarray, version: int) -> None:
    cache.replace_tables(np.zeros(keys.shape[0], np.int64), keys, _rows(keys, version),
                         np.arange(keys.shape[0], dtype=np.int64) * DIM)


def _assert_round_trip(cache: Any, keys: np.ndarray, version: int) -> None:
    """Insert ``keys``' rows of ``version``, then every one reads back bit-exact."""
    _insert(cache, keys, version)
    got, hit = _query(cache, keys)
    assert hit.all()
    np.testing.assert_array_equal(got.ravel(), _rows(keys, version))


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_processes_attach_to_one_allocation_and_one_keeper(namespace: str, kind: str) -> None:
    cache = _open(namespace, kind)
    path = cache._region.path
    keys = np.arange(100, dtype=np.int64)
    _insert(cache, keys, 7)
    workers = [_start(namespace, kind, "hold") for _ in range(3)]
    try:
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # one cache, one file
        keepers = _keepers(path)
        assert len(keepers) == 1
        words = _words(path)
        assert int(words[shared_gpu.W_GKEEPER]) == keepers[0]
        assert sorted(p for p, _ in shm_store.live_users(words.copy())) == sorted([os.getpid(), *(w.pid for w in workers)])
        if kind == "static":
            assert cache.sizes().tolist() == [100]  # the row count is the file's, every process sees it
        (info,) = shared_gpu.list_caches(namespace)
        assert (info.name, info.device, info.kind, info.ready, info.keeper) == ("m", 0, kind, True, keepers[0])
        assert sorted(info.users) == sorted([os.getpid(), *(w.pid for w in workers)])
        assert shm_store.list_stores(namespace) == []  # not a host store: hps inspect's listing skips it
    finally:
        stats = [_finish(w) for w in workers]
    assert all(s["bad"] == 0 for s in stats)
    got, hit = _query(cache, keys)  # what this process inserted, read here after the others left
    assert hit.all()
    np.testing.assert_array_equal(got.ravel(), _rows(keys, 7))
    second = _open(namespace, kind)  # a second handle in one process maps the same memory
    got2, hit2 = _query(second, keys)
    assert hit2.all() and np.array_equal(got2, got)
    second.close()
    cache.close()
    assert _gone(path)


def test_a_second_process_reads_what_the_first_inserted(namespace: str) -> None:
    cache = _open(namespace)
    keys = np.arange(KEYS, dtype=np.int64)
    _insert(cache, keys, 3)
    code = (
        "import sys, numpy as np, cupy as cp\n"
        "from hps_core.cache import SharedName, make_multi_table_cache\n"
        f"c = make_multi_table_cache('dynamic', device=0, capacities=[{KEYS}], dims=[{DIM}], "
        "shared=SharedName(sys.argv[1], 'm'))\n"
        f"k = np.arange({KEYS}, dtype=np.int64); out = cp.zeros(k.shape[0] * {DIM}, cp.float32)\n"
        f"miss = c.query_tables(np.zeros(k.shape[0], np.int64), k, out, k * {DIM})\n"
        "sys.stdout.buffer.write(np.int64(miss.shape[0]).tobytes() + cp.asnumpy(out).tobytes()); c.close()\n"
    )
    done = subprocess.run([sys.executable, "-c", code, namespace], cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    misses = np.frombuffer(done.stdout[:8], np.int64)[0]
    cached = int(cache.sizes()[0])
    assert misses == KEYS - cached  # every row the first process holds, the second reads
    got = np.frombuffer(done.stdout[8:], np.float32).reshape(-1, DIM)
    mine, hit = _query(cache, keys)
    np.testing.assert_array_equal(got[hit], mine[hit])  # bit for bit the same rows
    np.testing.assert_array_equal(mine[hit].ravel(), _rows(keys[hit], 3))
    cache.close()


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_two_processes_query_and_insert_at_once(namespace: str, kind: str) -> None:
    cache = _open(namespace, kind)  # this process holds it while the two run
    workers = [_start(namespace, kind, "run", seconds=4.0, seed=s) for s in (1, 2)]
    stats = [_finish(w) for w in workers]
    for s in stats:
        assert s["bad"] == 0, stats  # no torn row, no row of another key, ever
        assert s["queries"] > 5 and s["inserts"] > 5 and s["hits"] > 0, stats
    keys = np.arange(KEYS, dtype=np.int64)
    got, hit = _query(cache, keys)
    h = got[hit]
    assert ((h == h[:, :1]).all(axis=1) & (np.floor(h[:, 0] / 1000) == keys[hit])).all()
    _insert(cache, keys[:64], 999)
    got, hit = _query(cache, keys[:64])
    assert hit.all()
    np.testing.assert_array_equal(got.ravel(), _rows(keys[:64], 999))
    path = cache._region.path
    cache.close()
    assert _gone(path)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_killed_process_does_not_hurt_the_others(namespace: str, kind: str) -> None:
    """SIGKILL users under load (inside a write kernel, often): the survivor goes on (no
    stuck lock), reads no torn row, its dead peers' slots are reaped, and once the last user
    closes the file and the keeper are gone."""
    survivor = _start(namespace, kind, "serve", seconds=60.0, seed=1)
    path = _path(namespace)
    kills = 0
    while kills < 4 or (_words(path)[shared_gpu.W_REPAIRS] == 0 and kills < 40):  # until one lands inside a write
        victim = _start(namespace, kind, "write", seconds=30.0, seed=10 + kills)
        time.sleep(0.2 + 0.05 * (kills % 7))
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate()
        kills += 1
        time.sleep(0.1)  # the survivor's next write repairs
    stats = _finish(survivor)
    assert stats["bad"] == 0 and stats["inserts"] > 5, stats
    assert stats["repairs"] >= 1, f"{kills} kills, none inside a write"
    assert _gone(path)  # the survivor was the last live user: it removed the file, the keeper left


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_writer_dead_inside_a_write_is_repaired(namespace: str, kind: str) -> None:
    """What a writer killed inside its kernel leaves (its mark in the file, a lock or a claim
    held on the device) is repaired by the next writer: it does not hang, and the cache is
    emptied rather than left with a torn row."""
    cache = _open(namespace, kind)
    keys = np.arange(64, dtype=np.int64)
    _insert(cache, keys, 1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    words = cache._region._file.words
    words[shared_gpu.W_WRITER], words[shared_gpu.W_WRITER_START] = int(dead.stdout), 12345
    if kind == "dynamic":
        cache._set_locks[cache.sets_of(np.zeros(1, np.int64), keys[:1])] = 1  # the lock it held
        cache._slot_ver[:] = cache._slot_ver | 1  # and slots it was writing (busy: reads miss)
        assert not _query(cache, keys)[1].any()
    else:
        cache._row_ver[:3] = cache._row_ver[:3] | 1  # rows it was writing
        cache._slot_rows[:2] = -2  # slots it had claimed
    _insert(cache, keys[:8], 2)  # would spin forever on the held lock without the repair
    assert cache._region.repairs == 1
    got, hit = _query(cache, keys)
    assert hit[:8].all() and not hit[8:].any()  # emptied, then the new rows
    np.testing.assert_array_equal(got[:8].ravel(), _rows(keys[:8], 2))
    _insert(cache, keys, 3)  # every row usable again
    got, hit = _query(cache, keys)
    assert hit.all() if kind == "static" else hit.sum() == int(cache.sizes()[0])
    np.testing.assert_array_equal(got[hit].ravel(), _rows(keys[hit], 3))
    cache.close()


def test_another_shape_is_refused_while_in_use_and_rebuilt_when_not(namespace: str) -> None:
    cache = _open(namespace)
    with pytest.raises(ConfigError, match=r"gpu-[0-9a-f-]+\.m.*another shape.*dims"):
        _open(namespace, dims=[DIM * 2])
    with pytest.raises(ConfigError, match="another shape.*kind"):
        _open(namespace, "static")
    cache.close()
    other = _open(namespace, dims=[DIM * 2])  # nobody uses the old one: a new cache
    assert other.dims.tolist() == [DIM * 2]
    other.close()


def test_a_file_left_by_dead_processes_is_rebuilt(namespace: str) -> None:
    holder = _start(namespace, "dynamic", "hold")
    path = _path(namespace)
    keeper = _keepers(path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate()
    for pid in keeper:
        os.kill(pid, signal.SIGKILL)  # a host crash's leftovers: the file without its processes
    time.sleep(0.2)
    assert path.exists()
    cache = _open(namespace)
    assert _keepers(path) and _keepers(path) != keeper
    keys = np.arange(16, dtype=np.int64)
    _assert_round_trip(cache, keys, 5)
    cache.close()


def _server_config(tmp_path: Path, namespace: str, keys: np.ndarray, **model: Any) -> dict[str, Any]:
    """hps.json in ``tmp_path`` for model "m", table "t" of ``keys`` (rows of version 1),
    with the host store in ``namespace``; returns the document."""
    write_sparse_model(tmp_path / "t.model", keys, _rows(keys, 1).reshape(-1, DIM))
    doc: dict[str, Any] = {
        "volatile_db": {"type": "hash_map", "shared_memory_name": namespace},
        "persistent_db": {"type": "disabled"},
        "models": [{"model": "m", "sparse_files": ["t.model"], "embedding_table_names": ["t"],
                    "embedding_vecsize_per_table": [DIM], **model}],
    }
    (tmp_path / "hps.json").write_text(json.dumps(doc))
    return doc


def test_servers_of_one_model_share_one_cache(tmp_path: Path, namespace: str) -> None:
    keys = np.arange(200, dtype=np.int64)
    doc = _server_config(tmp_path, namespace, keys, maxnum_catfeature_query_per_table_per_sample=[100],
                         gpucacheper=0.5)
    path = _path(namespace)
    with HierarchicalParameterServer(load_config(tmp_path / "hps.json"), cache_device=0) as one, \
            HierarchicalParameterServer(load_config(tmp_path / "hps.json"), cache_device=0) as two:
        a, b = one.session("m").caches["t"], two.session("m").caches["t"]
        assert a.multi.shared and b.multi.shared
        assert len(_keepers(path)) == 1
        assert a.size() == b.size() > 0  # the warm-up of the first is the second's
    assert _gone(path)
    doc["models"][0]["gpu_cache_shared"] = False  # type: ignore[index]
    (tmp_path / "hps.json").write_text(json.dumps(doc))
    with HierarchicalParameterServer(load_config(tmp_path / "hps.json"), cache_device=0) as private:
        assert not private.session("m").caches["t"].multi.shared
        assert not path.exists()


def test_hps_serve_keeps_the_cache_past_its_users_and_its_clean_stop_removes_it(
        namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``hps serve`` (HPS_STORE_KEEPER) the cache outlives its last user (a Triton
    restart re-attaches to the rows), and the clean stop's remove_kept_stores removes it (the
    keeper follows); with no user left, hps serve's death alone lets the keeper go too."""
    serve = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        monkeypatch.setenv(shm_store.KEEPER_ENV, str(serve.pid))
        cache = _open(namespace)
        path = cache._region.path
        keys = np.arange(32, dtype=np.int64)
        _insert(cache, keys, 4)
        cache.close()
        time.sleep(3 * shared_gpu.POLL_S)
        assert path.exists() and len(_keepers(path)) == 1  # kept, with its rows
        again = _open(namespace)
        got, hit = _query(again, keys)
        assert hit.all()
        np.testing.assert_array_equal(got.ravel(), _rows(keys, 4))
        assert shm_store.remove_kept_stores(serve.pid) == []  # in use: not removed
        again.close()
        assert shm_store.remove_kept_stores(serve.pid) == [str(path)]  # the clean stop
        assert _gone(path)
        _open(namespace).close()  # kept again; then hps serve dies without a clean stop
        assert path.exists()
    finally:
        serve.kill()
        serve.communicate()
    assert _gone(path)


def test_a_keeper_that_cannot_start_fails_the_open_and_leaves_nothing(
        namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPS_PYTHON", "false")
    with pytest.raises(DeviceError, match="GPU keeper did not start"):
        _open(namespace)
    assert not shm_store.namespace_dir(namespace).exists()
    monkeypatch.delenv("HPS_PYTHON")
    _open(namespace).close()  # and the next open builds it


def _inject_open_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    import cupy as cp

    def fail(handle: bytes, flags: int = 1) -> int:
        raise cp.cuda.runtime.CUDARuntimeError(999, "cudaErrorInjected: the test refuses this handle")

    monkeypatch.setattr(cp.cuda.runtime, "ipcOpenMemHandle", fail)


def test_a_handle_that_does_not_open_while_in_use_is_refused_and_left_alone(
        namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A handle that fails to open in a newcomer while live users map it is not a stale file:
    the newcomer raises (naming the file, the users and the CUDA error), the file and its
    keeper stay, and the users go on using the memory (freed under them, their launches fail)."""
    holder = _start(namespace, "dynamic", "hold-use")
    path = _path(namespace)
    keeper = _keepers(path)
    _inject_open_failure(monkeypatch)
    with pytest.raises(DeviceError, match=rf"gpu-[0-9a-f-]+\.m.*\[{holder.pid}\].*cudaErrorInjected"):
        _open(namespace)
    monkeypatch.undo()
    assert path.exists() and _keepers(path) == keeper
    time.sleep(3 * shared_gpu.POLL_S)
    stats = _finish(holder)
    assert stats["hits"] == 64 and stats["bad"] == 0, stats


def test_the_keeper_outlives_the_users_of_a_removed_file(namespace: str) -> None:
    """The keeper never frees the memory while a listed user lives, even when its file was
    removed or replaced (a later open builds a new cache beside); it leaves after the last."""
    holder = _start(namespace, "dynamic", "hold-use")
    path = _path(namespace)
    keeper = _keepers(path)
    path.unlink()
    other = _open(namespace)  # a new file and keeper; the old users keep the old memory
    assert _keepers(path) != keeper and set(keeper) <= set(_keepers(path))
    time.sleep(3 * shared_gpu.POLL_S)
    assert set(keeper) <= set(_keepers(path))
    stats = _finish(holder)
    assert stats["hits"] == 64 and stats["bad"] == 0, stats
    end = time.monotonic() + 5
    while set(keeper) & set(_keepers(path)) and time.monotonic() < end:
        time.sleep(0.05)
    assert not set(keeper) & set(_keepers(path))  # its last user gone, the old keeper left
    other.close()


def test_a_write_whose_sync_fails_is_repaired_by_the_next_writer(
        namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write whose sync raises (its context died mid-kernel, a set lock left held) leaves
    its failure in the file: another process's next insert repairs at once instead of
    spinning on the lock (with the host-wide writer lock held)."""
    import cupy as cp

    cache = _open(namespace)
    keys = np.arange(64, dtype=np.int64)
    _insert(cache, keys, 1)

    def dying(self: Any) -> None:
        cache._set_locks[:] = 1  # what a kernel killed mid-way leaves
        raise cp.cuda.runtime.CUDARuntimeError(700, "cudaErrorIllegalAddress: injected")

    monkeypatch.setattr(cp.cuda.Stream, "synchronize", dying)
    with pytest.raises(Exception, match="injected"):
        _insert(cache, keys, 2)
    monkeypatch.undo()
    code = (
        "import sys, numpy as np\n"
        "from hps_core.cache import SharedName, make_multi_table_cache\n"
        f"c = make_multi_table_cache('dynamic', device=0, capacities=[{KEYS}], dims=[{DIM}], "
        "shared=SharedName(sys.argv[1], 'm'))\n"
        f"k = np.arange(64, dtype=np.int64)\n"
        f"c.replace_tables(np.zeros(64, np.int64), k, np.ones(64 * {DIM}, np.float32), k * {DIM})\n"
        "print(c._region.repairs); c.close()\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code, namespace], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the next writer spun on the lock the failed write left") from None
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 1
    got, hit = _query(cache, keys)
    assert hit.sum() == int(cache.sizes()[0]) > 0
    cache.close()


def test_a_marked_writer_still_alive_is_not_repaired_beside(
        namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _open(namespace)
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        monkeypatch.setattr(shared_gpu, "DEAD_WRITER_WAIT_S", 0.3)
        words = cache._region._file.words
        words[shared_gpu.W_WRITER] = sleeper.pid
        words[shared_gpu.W_WRITER_START] = shm_store.process_start(sleeper.pid)
        with pytest.raises(DeviceError, match=rf"pid {sleeper.pid}.*still alive"):
            _insert(cache, np.arange(8, dtype=np.int64), 1)
        assert cache._region.repairs == 0
    finally:
        sleeper.kill()
        sleeper.communicate()
    _insert(cache, np.arange(8, dtype=np.int64), 1)  # gone now: repaired
    assert cache._region.repairs == 1
    cache.close()


def test_a_forked_child_has_a_writer_lock_of_its_own_and_its_close_leaves_the_parent_alone(
        namespace: str) -> None:
    cache = _open(namespace)
    region = cache._region
    path = region.path
    with region.locked():  # the parent is writing
        pid = os.fork()
        if pid == 0:  # the child: the writer lock is not its own; closing leaves the parent's state
            code = 3
            try:
                try:
                    fcntl.flock(region._file.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    code = 1
                except BlockingIOError:
                    code = 0
                cache.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0  # 1: the child took the lock its parent holds
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # the parent still holds it
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert path.exists()
    assert os.getpid() in [p for p, _ in shm_store.live_users(_words(path).copy())]
    keys = np.arange(16, dtype=np.int64)
    _assert_round_trip(cache, keys, 6)
    cache.close()


def test_a_cache_made_from_other_sparse_files_is_refused_in_use_and_rebuilt_when_not(namespace: str) -> None:
    cache = make_multi_table_cache("dynamic", device=0, capacities=[KEYS], dims=[DIM],
                                   shared=SharedName(namespace, "m", source="one"))
    _insert(cache, np.arange(16, dtype=np.int64), 1)
    with pytest.raises(ConfigError, match=r"gpu-[0-9a-f-]+\.m.*made from other sparse files"):
        make_multi_table_cache("dynamic", device=0, capacities=[KEYS], dims=[DIM],
                               shared=SharedName(namespace, "m", source="two"))
    cache.close()
    other = make_multi_table_cache("dynamic", device=0, capacities=[KEYS], dims=[DIM],
                                   shared=SharedName(namespace, "m", source="two"))
    assert int(other.sizes()[0]) == 0  # rebuilt: none of the old rows
    other.close()


def test_a_restart_under_hps_serve_after_the_sparse_files_changed_serves_the_new_rows(
        tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """hps serve keeps the GPU cache past its users; a server started after the model's sparse
    files changed must not re-attach the cache of the old files."""
    keys = np.arange(200, dtype=np.int64)
    _server_config(tmp_path, namespace, keys, maxnum_catfeature_query_per_table_per_sample=[200],
                   gpucacheper=1.0, init_ec=False)  # the cache holds what lookups put in it
    path = _path(namespace)
    serve = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        monkeypatch.setenv(shm_store.KEEPER_ENV, str(serve.pid))
        with HierarchicalParameterServer(load_config(tmp_path / "hps.json"), cache_device=0) as one:
            one.session("m").lookup(keys, np.array([200], np.int32))  # misses are cached
            got, hit = _query(one.session("m").caches["t"].multi, keys)
            assert hit.sum() > 0
            np.testing.assert_array_equal(got[hit].ravel(), _rows(keys[hit], 1))
        assert path.exists()  # kept
        time.sleep(0.05)  # a new mtime for the fingerprint even on a coarse clock
        write_sparse_model(tmp_path / "t.model", keys, _rows(keys, 2).reshape(-1, DIM))
        with HierarchicalParameterServer(load_config(tmp_path / "hps.json"), cache_device=0) as two:
            lookup = to_host(two.session("m").lookup(keys, np.array([200], np.int32))).reshape(-1, DIM)
            multi = two.session("m").caches["t"].multi
            got, hit = _query(multi, keys)
            assert hit.sum() > 0
            np.testing.assert_array_equal(got[hit].ravel(), _rows(keys[hit], 2))  # never an old row
            served = np.abs(lookup).sum(axis=1) > 0  # rows the host store holds (others: the default)
            np.testing.assert_array_equal(lookup[served].ravel(), _rows(keys[served], 2))
        assert str(path) in shm_store.remove_kept_stores(serve.pid)
    finally:
        serve.kill()
        serve.communicate()
    assert _gone(path)


def test_a_keeper_that_cannot_import_cupy_fails_the_open_at_once_with_its_error(
        tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("raise ImportError('injected: no CuPy for the keeper')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("HPS_EMULATED_GPU", raising=False)  # the keeper does not get the emulated CuPy
    start = time.monotonic()
    with pytest.raises(DeviceError, match="GPU keeper failed: ImportError: injected: no CuPy"):
        _open(namespace)
    assert time.monotonic() - start < 10  # not the 60 s wait for a handle
    monkeypatch.undo()
    assert not shm_store.namespace_dir(namespace).exists()


def test_a_slow_keeper_adopts_its_own_file_not_the_one_now_at_the_path(namespace: str) -> None:
    """The keeper gets the file by descriptor: a file that replaced it at the path meanwhile
    is left alone (opened by path, the keeper wrote its pid and handle into the other one)."""
    directory = shm_store.namespace_dir(namespace)
    shm_store.ensure_dir(directory)
    path = _path(namespace)
    meta = shared_gpu._MetaFile(path, shm_store.open_fd(path, create=True))
    w = meta.words
    w[shared_gpu.W_STATE], w[shared_gpu.W_BYTES], w[shared_gpu.W_DEVICE] = shared_gpu.CREATING, 4096, 0
    w[shared_gpu.W_CREATOR], w[shared_gpu.W_CREATOR_START] = shm_store.this_process()
    w[shared_gpu.W_MAGIC] = 1
    os.unlink(path)
    path.write_bytes(bytes(32768))  # another file at the path before the keeper opens it
    shared_gpu._spawn_keeper(meta)
    end = time.monotonic() + 30
    while not meta.handle() and time.monotonic() < end:
        time.sleep(0.02)
    assert meta.handle() and int(w[shared_gpu.W_GKEEPER]) > 0  # it wrote into its own file
    assert not any(path.read_bytes())  # and left the other one untouched
    path.unlink()
    meta.close()  # no user, its file replaced: the keeper leaves
    directory.rmdir()


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_an_insert_skips_a_busy_writer_lock_and_an_update_waits(namespace: str, kind: str) -> None:
    """Inserts (cache fills of missed rows) wait for the host-wide writer lock at most
    INSERT_WAIT_S, then write nothing and count it; updates and clears wait (skipping them
    would serve stale rows)."""
    import threading

    cache = _open(namespace, kind)
    keys = np.arange(32, dtype=np.int64)
    _insert(cache, keys, 1)
    fd = os.open(cache._region.path, os.O_RDWR)  # another writer holds the lock
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        inserting = threading.Thread(target=_insert, args=(cache, np.arange(32, 64, dtype=np.int64), 2), daemon=True)
        inserting.start()
        inserting.join(5)
        assert not inserting.is_alive(), "the insert waited for the busy lock"
        assert cache.skipped_inserts == 1
        updating = threading.Thread(target=cache.update_tables, daemon=True,
                                    args=(np.zeros(32, np.int64), keys, _rows(keys, 3), np.arange(32) * DIM))
        updating.start()
        updating.join(0.5)
        assert updating.is_alive()  # the update waits for the lock
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    updating.join(10)
    assert not updating.is_alive()
    got, hit = _query(cache, np.arange(64, dtype=np.int64))
    assert not hit[32:].any()  # the skipped insert wrote nothing
    assert hit[:32].all() if kind == "static" else hit[:32].sum() == int(cache.sizes()[0])
    np.testing.assert_array_equal(got[:32][hit[:32]].ravel(), _rows(keys[hit[:32]], 3))
    cache.close()


@pytest.mark.skipif(not os.environ.get("HPS_EMULATED_GPU"), reason="needs two emulated GPUs behind one ordinal")
def test_caches_are_keyed_by_the_physical_gpu_not_the_cuda_ordinal(namespace: str) -> None:
    """Two processes whose device 0 is another physical GPU (CUDA_VISIBLE_DEVICES=0 and =1;
    the emulator shifts its bus ids) get a cache each; the same GPU, one."""
    cache = _open(namespace)
    other = _start(namespace, "dynamic", "hold", env={"HPS_EMU_BUS_OFFSET": "1"})
    same = _start(namespace, "dynamic", "hold")
    try:
        files = sorted(p.name for p in shm_store.namespace_dir(namespace).iterdir())
        assert len(files) == 2 and _path(namespace).name in files, files
        assert len(_keepers(shm_store.namespace_dir(namespace))) == 2
        infos = {i.pci_bus_id: sorted(i.users) for i in shared_gpu.list_caches(namespace)}
        assert infos == {"0000:41:00.0": sorted([os.getpid(), same.pid]), "0000:42:00.0": [other.pid]}
    finally:
        for proc in (other, same):
            _finish(proc)
    cache.close()
