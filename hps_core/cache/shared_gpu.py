"""A GPU cache's device state as one allocation: private to a process, or one per GPU shared
by every process that serves the model there (CUDA IPC), with the host store's lifetime rules.

:class:`Region` is the state a GPU cache's kernels share between calls (values, slots, locks,
row counters), carved as aligned views out of ONE device allocation (CUDA IPC names a whole
``cudaMalloc`` allocation, and CuPy's pool sub-allocates, so the shared arrays cannot come from
the pool). :func:`local_region` allocates it in this process; :func:`shared_region` maps the one
of its GPU, creating it first if needed. Both carve and fill the arrays with the same code; the
cache classes (gpu.py) do not know which they got, except that writers of a shared region
wait for their kernels before they let go of the writer lock (below).

Where: a metadata file ``<shm root>/hps.<namespace>/gpu-<PCI bus id>.<name>`` beside the host
store's files (same namespace: ``volatile_db.shared_memory_name`` or the JSON's path), holding
the IPC handle, the shape of the cache (JSON), the users and the static tables' row counts.

Ownership and lifetime (the host store's rules, hps_core.db.shm_store):

- **The exporter outlives the users.** Memory exported through CUDA IPC is freed when the
  exporting process frees it or exits, so no user process exports it: the first user spawns a
  *GPU keeper* (``python -m hps_core.cache.gpu_keeper <file> <fd>``, its own session, given
  the file open on a descriptor so it never adopts another file at the path) that allocates
  the region, writes its handle into the file and then only watches. Users map it with
  ``ipcOpenMemHandle`` and unmap it with ``ipcCloseMemHandle`` on close.
- **Create and attach** under ``flock(LOCK_EX)`` on the metadata file: the first process writes
  the shape (state ``creating``), starts the keeper, waits for its handle, fills the arrays
  with their initial values, registers and sets ``ready``; the others block on the lock, find
  it ready and attach. A file found ``creating``, or whose keeper is dead, is stale: removed
  and built again. A handle that does not open is stale only when its keeper is dead or no
  live process uses it; otherwise the newcomer raises DeviceError (file, users, CUDA error)
  and leaves the file to its users. A file of another shape (kind, capacities,
  dims, formats, key dtype, policy, device) is refused by name while a live process uses it,
  rebuilt when none does.
- **Users** hold a slot (pid, start time: a reused pid is not mistaken for a live user) in the
  same words as the host store's files; a process that dies is reaped by whoever looks next.
  The last user to close removes the file unless ``hps serve`` keeps it (``HPS_STORE_KEEPER``,
  recorded as the host store records it). The keeper exits, freeing the GPU memory, when no
  live user remains and either its file is gone or replaced or no live ``hps serve`` keeps
  it: never under a live user, whose mapping would then point at freed memory; so under
  ``hps serve`` the cache outlives stub crashes and Triton restarts, and ``hps serve``'s clean
  stop (``remove_kept_stores``, which judges these files by the same words) removes the file
  and the keeper follows within :data:`POLL_S`.
- **Writers** (inserts, updates, dumps and clears: every call that takes a set lock or writes
  a row) of a shared region are one at a time per host: a thread lock plus ``flock(LOCK_EX)``
  on the metadata file, held until their kernels are done. The holder writes itself (pid,
  start) into the file before its kernels start and clears it after they end. Readers
  (queries, sizes) take no lock, as in a private cache (the kernels' seqlocks). A process
  forked after the open gets a descriptor and a thread lock of its own (a ``flock`` belongs
  to the open file description a fork shares), and its close leaves the parent's mapping,
  user slot and lock alone.
- **A writer killed inside its kernels** (on a GPU its context is torn down mid-kernel): it may
  leave a set lock held, a slot or row marked busy, a slot claimed. The kernel drops its
  ``flock``; the next writer finds the dead writer's mark and repairs before anything else
  (:meth:`SharedRegion.locked`, the cache's ``_repair``): every set lock is released (no live
  writer holds one, they are serialised) and the cache is emptied with the kernels' own clear,
  which readers tolerate. A kill costs the cache's contents, never a stuck lock or a torn row.
  A write that fails in a live process where its kernels may not have finished (its sync
  raises: the context died mid-kernel) sets a dirty word, and the next writer repairs at
  once. A marked writer still alive after :data:`DEAD_WRITER_WAIT_S` is not repaired beside:
  the writer raises DeviceError naming it.
  Until a writer comes, readers are not blocked by what the dead writer left: a busy slot or
  row reads as a miss.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from hps_core.db import shm_store as shm
from hps_core.errors import ConfigError, DeviceError, TierError

__all__ = ["Field", "GpuCacheInfo", "HostClock", "Region", "SharedName", "list_caches", "local_region",
           "shared_region", "POLL_S"]

#: How often a GPU keeper looks at its users (seconds).
POLL_S = 0.2
#: How long a creator waits for its keeper's handle (the keeper imports CuPy and allocates).
KEEPER_START_S = 60.0
#: How long the writer that repairs waits for a dead writer's process to be gone.
DEAD_WRITER_WAIT_S = 10.0
#: How long an insert (best effort: a cache fill) waits for a shared cache's writer lock before
#: it is skipped and counted; updates and clears wait as long as it takes.
INSERT_WAIT_S = 0.05
_ALIGN = 256  # CuPy's allocations are 256-byte aligned; the kernels' float4 loads need 16
_MAGIC = 0x5550474853504800  # "\0HPSHGPU" little-endian
_LAYOUT = 1
_FILE_BYTES = 32768
_META_OFFSET = 16384
MAX_TABLES = 1024

# words of the metadata file (int64); H_KEEPER(16, 17) and the users (from 64) are the host
# store's, so shm_store.remove_kept_stores judges these files as it judges its own
W_MAGIC, W_LAYOUT, W_STATE, W_GKEEPER, W_GKEEPER_START, W_BYTES, W_DEVICE = range(7)
W_WRITER, W_WRITER_START, W_REPAIRS, W_CREATOR, W_CREATOR_START, W_META_LEN, W_HANDLE_LEN = range(7, 14)
W_DIRTY = 14  # a write failed in a live process (its sync raised): the next writer repairs at once
W_SKIPPED = 15  # inserts skipped because the writer lock stayed busy past INSERT_WAIT_S (approximate)
W_HANDLE = 24  # 64 bytes: words 24..31
W_ROWS = 512  # static tables' row counts, MAX_TABLES words
CREATING, READY = 1, 2


@dataclass(frozen=True)
class Field:
    """One array of a region: ``count`` elements of ``dtype``, every byte ``fill`` at creation."""

    name: str
    dtype: Any
    count: int
    fill: int = 0


@dataclass(frozen=True)
class SharedName:
    """Which shared cache: the host store's ``namespace`` and a ``name`` (the model's), and
    the ``source`` its rows come from (a fingerprint of the model's sparse files, part of the
    cache's identity: a cache made from other files is refused while in use, rebuilt when not,
    so a restart after the files changed never re-attaches old rows)."""

    namespace: str
    name: str
    source: str = ""


def _layout(fields: Sequence[Field]) -> tuple[dict[str, int], int]:
    offsets, at = {}, 0
    for f in fields:
        offsets[f.name] = at
        at += -(-max(1, f.count * np.dtype(f.dtype).itemsize) // _ALIGN) * _ALIGN
    return offsets, max(at, _ALIGN)


class HostClock:
    """LRU stamps every process on the host agrees on: ``CLOCK_MONOTONIC`` nanoseconds (one
    clock for the whole host, increasing), made strictly increasing within this process. The
    private caches keep :class:`~hps_core.cache.base.AccessClock` (one tick per call)."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def tick(self) -> int:
        with self._lock:
            self._last = max(time.monotonic_ns(), self._last + 1)
            return self._last


class Region:
    """A cache's device arrays (``arrays[name]``, CuPy views of one allocation), the static
    tables' row counters (``rows``, host int64 (T,)) and the writers' lock (:meth:`locked`).
    Private: a thread lock when ``exclusive`` (static tables), none otherwise (dynamic caches
    lock sets on the device)."""

    shared = False
    path: Path | None = None

    def __init__(self, cp: Any, mem: Any, fields: Sequence[Field], tables: int, exclusive: bool) -> None:
        offsets, _ = _layout(fields)
        self._cp = cp
        self._mem = mem
        self.arrays = {f.name: cp.ndarray((f.count,), f.dtype, memptr=cp.cuda.MemoryPointer(mem, offsets[f.name]))
                       for f in fields}
        self.rows: npt.NDArray[np.int64] = np.zeros(tables, np.int64)
        self._thread_lock: Any = threading.Lock() if exclusive else contextlib.nullcontext()
        self.repair: Callable[[], None] | None = None  # set by the cache: what a dead writer's mark calls for

    def fill(self, fields: Sequence[Field]) -> None:
        """Every array to its initial bytes (on the legacy default stream; waits for it)."""
        runtime = self._cp.cuda.runtime
        for f in fields:
            a = self.arrays[f.name]
            if f.count:
                runtime.memsetAsync(a.data.ptr, f.fill, a.nbytes, 0)
        runtime.deviceSynchronize()

    @contextlib.contextmanager
    def locked(self, wait_s: float | None = None) -> Iterator[bool]:
        """The writers' lock, held while the block runs; yields whether it was taken (a
        private region's always is; a shared one's waits at most ``wait_s`` when given)."""
        with self._thread_lock:
            yield True

    def write_failed(self) -> None:
        """A write failed where its kernels may not have finished: nothing to do in a private
        region (its process is the only user; see SharedRegion)."""

    def close(self) -> None:
        self.arrays = {}
        self._mem = None


def local_region(cp: Any, fields: Sequence[Field], tables: int, *, exclusive: bool) -> Region:
    """A region allocated in this process (on the current device), filled."""
    _, nbytes = _layout(fields)
    region = Region(cp, cp.cuda.Memory(nbytes), fields, tables, exclusive)
    region.fill(fields)
    return region


# --------------------------------------------------------------------------- shared


def gpu_path(name: SharedName, bus_id: str) -> Path:
    """The metadata file of cache ``name`` on the GPU of PCI bus id ``bus_id`` (the physical
    GPU: two processes that see it under different CUDA ordinals share it, and the same ordinal
    under different ``CUDA_VISIBLE_DEVICES`` names different caches)."""
    return shm.namespace_dir(name.namespace) / shm.file_name(f"gpu-{_bus_part(bus_id)}.{name.name}")


def _bus_part(bus_id: str) -> str:
    """``0000:3B:00.0`` -> ``0000-3b-00-0`` (no dot: the model name follows the first one)."""
    return bus_id.strip().lower().replace(":", "-").replace(".", "-")


def pci_bus_id(cp: Any, device: int) -> str:
    """The PCI bus id of CUDA device ``device`` of this process (``domain:bus:device.function``)."""
    return str(cp.cuda.runtime.deviceGetPCIBusId(device))


class _MetaFile:
    """The mapped metadata file: ``words`` int64[4096] (header, users, row counts)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd
        if os.fstat(fd).st_size < _FILE_BYTES:
            os.ftruncate(fd, _FILE_BYTES)
        self._mm = mmap.mmap(fd, _FILE_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.words = np.frombuffer(self._mm, np.int64, _FILE_BYTES // 8)
        self.inode = os.fstat(fd).st_ino
        self.pid = os.getpid()  # the process that opened it (a forked child's close leaves its state alone)
        self.thread_lock = threading.Lock()  # writers of this process (a fresh one in a forked child)
        self.closed = False
        _open_files.add(self)

    def meta(self) -> dict[str, Any]:
        n = int(self.words[W_META_LEN])
        if not 0 < n <= _FILE_BYTES - _META_OFFSET:
            return {}
        with contextlib.suppress(ValueError):
            got = json.loads(bytes(self._mm[_META_OFFSET : _META_OFFSET + n]))
            return got if isinstance(got, dict) else {}
        return {}

    def write_meta(self, meta: dict[str, Any]) -> None:
        raw = json.dumps(meta, sort_keys=True).encode()
        if len(raw) > _FILE_BYTES - _META_OFFSET:
            raise TierError(f"{self.path}: shared GPU cache metadata too long ({len(raw)} bytes)")
        self._mm[_META_OFFSET : _META_OFFSET + len(raw)] = raw
        self.words[W_META_LEN] = len(raw)

    def handle(self) -> bytes:
        n = int(self.words[W_HANDLE_LEN])
        return bytes(self._mm[W_HANDLE * 8 : W_HANDLE * 8 + n]) if 0 < n <= 64 else b""

    def set_handle(self, handle: bytes) -> None:
        self._mm[W_HANDLE * 8 : W_HANDLE * 8 + len(handle)] = handle
        self.words[W_HANDLE_LEN] = len(handle)

    def keeper_alive(self) -> bool:
        return shm.alive(int(self.words[W_GKEEPER]), int(self.words[W_GKEEPER_START]))

    def is_current(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            return False

    def reopen_in_child(self) -> None:
        """A description of this process's own for the same inode (through /proc, so a
        replaced path does not matter), under the same descriptor number; a fresh thread lock."""
        own = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        os.dup2(own, self.fd, inheritable=False)
        os.close(own)
        self.thread_lock = threading.Lock()

    def close(self) -> None:
        self.closed = True
        del self.words
        with contextlib.suppress(BufferError):
            self._mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


_open_files: weakref.WeakSet[_MetaFile] = weakref.WeakSet()


def _own_descriptors_after_fork() -> None:
    """In a forked child: a descriptor and a thread lock of its own for every open metadata
    file (as hps_core.db.shm_store does for the host stores). The child inherits its parent's
    open file description, and a ``flock`` belongs to the description: without this, the
    child's writer lock would be the parent's (taken "again" beside a parent writer, released
    under it by the child's unlock or close). The child takes no user slot and maps nothing
    (CUDA does not survive a fork): its close only drops its own descriptor and mapping."""
    for meta in [m for m in _open_files if not m.closed]:
        meta.reopen_in_child()


os.register_at_fork(after_in_child=_own_descriptors_after_fork)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def _flocked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


class SharedRegion(Region):
    """A region mapped from its GPU keeper (see the module doc); :meth:`locked` is the
    host-wide writer lock, which repairs after a writer that died holding it."""

    shared = True

    def __init__(self, cp: Any, ptr: int, nbytes: int, device: int, fields: Sequence[Field], tables: int,
                 meta: _MetaFile) -> None:
        self._ptr = ptr
        self._file = meta
        self.path = meta.path
        super().__init__(cp, cp.cuda.UnownedMemory(ptr, nbytes, self, device), fields, tables, True)
        self.rows = meta.words[W_ROWS : W_ROWS + tables]
        self._closed = False

    @property
    def repairs(self) -> int:
        """Writers found dead inside a write, and repaired after, since the cache was made."""
        return int(self._file.words[W_REPAIRS])

    @property
    def skipped_inserts(self) -> int:
        """Inserts skipped, by every process, because the writer lock stayed busy."""
        return int(self._file.words[W_SKIPPED])

    @contextlib.contextmanager
    def locked(self, wait_s: float | None = None) -> Iterator[bool]:
        """The host-wide writer lock (repairing first after a failed or dead writer); yields
        True once held. With ``wait_s`` (a best-effort insert), a lock still busy after that
        long yields False instead, counted in :attr:`skipped_inserts`, and nothing is held."""
        meta = self._file
        if wait_s is None:
            with meta.thread_lock, _flocked(meta.fd), self._marked():
                yield True
            return
        deadline = time.monotonic() + wait_s
        if not meta.thread_lock.acquire(timeout=wait_s):
            meta.words[W_SKIPPED] += 1
            yield False
            return
        try:
            while not _try_flock(meta.fd):
                if time.monotonic() >= deadline:
                    meta.words[W_SKIPPED] += 1
                    break
                time.sleep(0.002)
            else:
                try:
                    with self._marked():
                        yield True
                finally:
                    fcntl.flock(meta.fd, fcntl.LOCK_UN)
                return
        finally:
            meta.thread_lock.release()
        yield False

    @contextlib.contextmanager
    def _marked(self) -> Iterator[None]:
        """Under the writer lock: repair what a failed or dead writer left, then mark this
        process the writer while the block runs."""
        meta = self._file
        words = meta.words
        if words[W_DIRTY] or words[W_WRITER]:  # a write failed, or its writer died inside it
            pid, start = int(words[W_WRITER]), int(words[W_WRITER_START])
            if pid and not words[W_DIRTY] and not _wait_gone(pid, start):
                raise DeviceError(
                    f"{meta.path}: the writer mark names pid {pid}, which does not hold the writer lock "
                    f"yet is still alive after {DEAD_WRITER_WAIT_S:.0f} s; not repaired beside a live writer "
                    "(stop that process)")
            if self.repair is not None:
                self.repair()
            words[W_REPAIRS] += 1
            words[W_DIRTY] = 0
        words[W_WRITER], words[W_WRITER_START] = shm.this_process()
        try:
            yield
        finally:
            words[W_WRITER] = words[W_WRITER_START] = 0  # a failed write sets W_DIRTY (write_failed)

    def write_failed(self) -> None:
        """A write of this process failed after its kernels may have started (its sync raised:
        the context died mid-kernel, a set lock may be left held): the next writer, of any
        process, repairs at once (the caller holds the writer lock). A failed write is its own
        proof; nobody waits for this live process to die."""
        self._file.words[W_DIRTY] = 1

    def close(self) -> None:
        """Unmap, give back this process's user slot, and remove the file when it was the last
        user and no ``hps serve`` keeps it (the keeper then exits). In a process forked after
        the open, only the child's own descriptor and mapping go: the mapping and the user slot
        are the parent's."""
        if self._closed:
            return
        self._closed = True
        super().close()
        meta = self._file
        if meta.pid != os.getpid():
            meta.close()
            return
        with contextlib.suppress(Exception):
            self._cp.cuda.runtime.ipcCloseMemHandle(self._ptr)
        with contextlib.suppress(OSError), _flocked(meta.fd):
            left = shm.deregister_user(meta.words)
            kept = shm.alive(int(meta.words[shm.H_KEEPER]), int(meta.words[shm.H_KEEPER_START]))
            if not left and not kept and meta.is_current():
                _unlink(meta.path)
        meta.close()


def _wait_gone(pid: int, start: int, timeout: float | None = None) -> bool:
    """Wait until the dead writer has finished dying; whether it has. Its ``flock`` goes when
    the kernel closes its descriptors, which may come before the one of its GPU context; a
    process that is gone or a zombie has closed them all, so its kernels no longer run.
    Bounded: a marked writer still alive after ``timeout`` is not repaired beside (the caller
    raises)."""
    end = time.monotonic() + (DEAD_WRITER_WAIT_S if timeout is None else timeout)
    while shm.alive(pid, start):
        if time.monotonic() >= end:
            return False
        time.sleep(0.01)
    return True


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only when empty


def _python() -> str:
    """The interpreter for the keeper: this one, unless it is not a Python (an embedding
    process such as Triton's stub may report its own binary); ``HPS_PYTHON`` overrides."""
    if os.environ.get("HPS_PYTHON"):
        return os.environ["HPS_PYTHON"]
    if sys.executable and os.path.basename(sys.executable).startswith("python"):
        return sys.executable
    return shutil.which("python3") or "python3"


def _spawn_keeper(meta: _MetaFile) -> None:
    """Start the keeper of ``meta``, detached: ``gpu_keeper`` forks the keeper off and exits
    at once (so it is no child of this process, never its zombie), in a session of its own,
    with this process's ``hps_core`` first on its path. The keeper gets the file by
    descriptor, not by path (it reopens it as a description of its own): a slow keeper never
    adopts another file that replaced this one. DeviceError when it cannot start."""
    path = meta.path
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    try:
        done = subprocess.run(  # noqa: S603 - our own module
            [_python(), "-m", "hps_core.cache.gpu_keeper", str(path), str(meta.fd)], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True, pass_fds=(meta.fd,), timeout=KEEPER_START_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeviceError(f"{path}: cannot start the GPU keeper ({exc}); set HPS_PYTHON to the server's Python") from exc
    if done.returncode != 0:
        raise DeviceError(f"{path}: the GPU keeper did not start (exit status {done.returncode}): "
                          f"{done.stderr.decode(errors='replace').strip()[-2000:]}")


def shared_region(cp: Any, fields: Sequence[Field], tables: int, *, device: int, name: SharedName,
                  shape: dict[str, Any]) -> SharedRegion:
    """Map the shared region ``name`` of GPU ``device`` (create it if absent or stale); its
    arrays must be ``fields`` and its cache of ``shape`` (compared by every key), else it is
    refused while in use (ConfigError naming the file and the differences) or rebuilt."""
    if tables > MAX_TABLES:
        raise ConfigError(f"a shared GPU cache holds at most {MAX_TABLES} tables, got {tables}")
    _, nbytes = _layout(fields)
    directory = shm.namespace_dir(name.namespace)
    bus_id = pci_bus_id(cp, device)
    path = gpu_path(name, bus_id)
    want = {**shape, "device": bus_id.lower(), "bytes": nbytes, "fields": [[f.name, np.dtype(f.dtype).str, f.count]
                                                                     for f in fields]}
    for _ in range(8):  # a file replaced or removed between open and lock is opened again
        shm.ensure_dir(directory)
        try:
            fd = shm.open_fd(path, create=True)
        except FileNotFoundError:  # the last user of another cache removed the folder meanwhile
            continue
        meta = _MetaFile(path, fd)
        try:
            with _flocked(meta.fd):
                region = _attach_or_create(cp, meta, fields, tables, device, nbytes, want) if meta.is_current() else None
        except BaseException:
            meta.close()
            raise
        if region is not None:
            return region
        meta.close()
    raise TierError(f"{path}: the shared GPU cache file kept being replaced")


def _attach_or_create(cp: Any, meta: _MetaFile, fields: Sequence[Field], tables: int, device: int, nbytes: int,
                      want: dict[str, Any]) -> SharedRegion | None:
    """Under the file's lock: attach to a ready region of this shape, build it in a new file,
    or remove a stale one and return None (the caller opens the path again)."""
    w = meta.words
    if w[W_MAGIC] == 0 and w[W_GKEEPER] == 0:
        return _create(cp, meta, fields, tables, device, nbytes, want)  # a new file
    if w[W_MAGIC] == _MAGIC and w[W_STATE] == READY and meta.keeper_alive():
        have = meta.meta()
        if have == want:
            try:
                ptr = cp.cuda.runtime.ipcOpenMemHandle(meta.handle(), 1)  # cudaIpcMemLazyEnablePeerAccess
            except cp.cuda.runtime.CUDARuntimeError as exc:
                ptr = None  # stale only when its keeper is gone or nobody uses it
                users = [p for p, _ in shm.live_users(w)]
                if meta.keeper_alive() and users:
                    raise DeviceError(
                        f"{meta.path}: cannot map the shared GPU cache that pids {users} use (keeper pid "
                        f"{int(w[W_GKEEPER])}): {exc}; the file is left to them (set gpu_cache_shared to false "
                        "for a private cache per process)") from exc
            if ptr is not None:
                region = SharedRegion(cp, ptr, nbytes, device, fields, tables, meta)
                shm.register_user(w, meta.path)
                return region
        elif shm.live_users(w):
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            if diff == ["source"]:
                raise ConfigError(
                    f"{meta.path}: the shared GPU cache in use by pids {[p for p, _ in shm.live_users(w)]} was "
                    "made from other sparse files (their fingerprint differs); stop them, or set "
                    "gpu_cache_shared to false for this model")
            raise ConfigError(
                f"{meta.path}: a shared GPU cache of another shape is in use by pids "
                f"{[p for p, _ in shm.live_users(w)]} ({', '.join(diff)} differ: {[have.get(k) for k in diff]} there, "
                f"{[want.get(k) for k in diff]} here); stop them, or set gpu_cache_shared to false for this model"
            )
    # stale (creating, keeper dead, handle gone) or of another shape nobody uses: a new file, so
    # a keeper still alive for this one sees it replaced and exits
    _unlink(meta.path)
    return None


def _create(cp: Any, meta: _MetaFile, fields: Sequence[Field], tables: int, device: int, nbytes: int,
            want: dict[str, Any]) -> SharedRegion:
    """Build the region of a new file (the caller holds its lock): the keeper allocates and
    exports, this process fills, registers and marks it ready."""
    w = meta.words
    w[W_LAYOUT], w[W_STATE], w[W_BYTES], w[W_DEVICE] = _LAYOUT, CREATING, nbytes, device
    w[W_CREATOR], w[W_CREATOR_START] = shm.this_process()
    meta.write_meta(want)
    w[W_MAGIC] = _MAGIC
    try:
        _spawn_keeper(meta)
        deadline = time.monotonic() + KEEPER_START_S
        while not meta.handle():
            if time.monotonic() > deadline:
                raise DeviceError(f"{meta.path}: the GPU keeper did not export the cache within {KEEPER_START_S:.0f} s")
            if w[W_STATE] != CREATING:  # the keeper could not allocate: it says why in the metadata
                raise DeviceError(f"{meta.path}: the GPU keeper failed: {meta.meta().get('error', 'unknown error')} "
                                  "(set gpu_cache_shared to false for a private cache per process)")
            if w[W_GKEEPER] and not meta.keeper_alive():
                raise DeviceError(f"{meta.path}: the GPU keeper (pid {int(w[W_GKEEPER])}) died before exporting the cache")
            time.sleep(0.01)
        ptr = cp.cuda.runtime.ipcOpenMemHandle(meta.handle(), 1)
        region = SharedRegion(cp, ptr, nbytes, device, fields, tables, meta)
        region.fill(fields)
        shm.register_user(w, meta.path)
    except BaseException:
        _unlink(meta.path)  # a half-made cache: its keeper sees the file gone and exits
        raise
    w[W_STATE] = READY
    return region


def keep(path: Path, fd: int) -> int:
    """The GPU keeper's life (``python -m hps_core.cache.gpu_keeper``): adopt the file open on
    ``fd`` (the creator's, passed down: reopened as a description of its own, so its locks are
    its own), write its pid, allocate the region the file describes on its device, export it,
    then watch; exit (freeing it, removing the file when it is still the one at the path) when
    no live user remains and the file is gone or replaced or no live ``hps serve`` keeps it.
    An error before the export (CuPy does not import, the allocation fails) is written into
    the file at once, for the creator to raise. Returns the exit status."""
    try:
        own = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return 1
    os.close(fd)
    meta = _MetaFile(path, own)
    w = meta.words
    w[W_GKEEPER], w[W_GKEEPER_START] = shm.this_process()
    device, nbytes = int(w[W_DEVICE]), int(w[W_BYTES])
    try:
        import cupy as cp  # the keeper is a GPU process by definition

        with cp.cuda.Device(device):
            mem = cp.cuda.Memory(nbytes)
            handle = cp.cuda.runtime.ipcGetMemHandle(mem.ptr)
    except BaseException as exc:  # noqa: BLE001 - reported to the creator through the file
        meta.write_meta({**meta.meta(), "error": f"{type(exc).__name__}: {exc}"[:2000]})
        w[W_STATE] = 0
        return 1
    meta.set_handle(handle)
    while True:
        time.sleep(POLL_S)
        with _flocked(meta.fd):
            users = shm.live_users(w)
            if not meta.is_current():  # replaced or removed: nobody attaches any more, but the
                if users:              # processes still listed map this memory; free it after them
                    continue
                break
            state = int(w[W_STATE])
            creator = shm.alive(int(w[W_CREATOR]), int(w[W_CREATOR_START]))
            if state == CREATING and creator:
                continue
            kept = shm.alive(int(w[shm.H_KEEPER]), int(w[shm.H_KEEPER_START]))
            if not users and not kept:
                _unlink(path)
                break
    del mem
    meta.close()
    return 0


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class GpuCacheInfo:
    """What a listing shows of one shared GPU cache (read without its lock)."""

    path: str
    namespace: str
    name: str  # the model (its version included)
    device: int
    kind: str
    bytes: int  # device bytes of the region
    ready: bool
    users: tuple[int, ...]  # live attached pids
    keeper: int  # pid of the live GPU keeper, 0 when none
    kept_by: int  # pid of the live hps serve that keeps it, 0 when none
    repairs: int  # writers found dead inside a write, and repaired after
    skipped_inserts: int = 0  # inserts skipped because the writer lock stayed busy (approximate)
    pci_bus_id: str = ""  # the physical GPU (device is its CUDA ordinal in the creating process)


def list_caches(namespace: str | None = None) -> list[GpuCacheInfo]:
    """Every shared GPU cache on this host (or of one namespace)."""
    root = shm.shm_root()
    dirs = [shm.namespace_dir(namespace)] if namespace else sorted(root.glob("hps.*"))
    found = []
    for directory in dirs:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, PermissionError):
            for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                if not entry.name.startswith("gpu") or not entry.is_file(follow_symlinks=False):
                    continue
                with contextlib.suppress(OSError, ValueError):
                    raw = Path(entry.path).read_bytes()
                    w = np.frombuffer(raw[:_META_OFFSET], np.int64).copy()
                    if len(raw) < _FILE_BYTES or w[W_MAGIC] != _MAGIC:
                        continue
                    meta = json.loads(raw[_META_OFFSET : _META_OFFSET + int(w[W_META_LEN])])
                    keeper = int(w[W_GKEEPER]) if shm.alive(int(w[W_GKEEPER]), int(w[W_GKEEPER_START])) else 0
                    kept = int(w[shm.H_KEEPER]) if shm.alive(int(w[shm.H_KEEPER]), int(w[shm.H_KEEPER_START])) else 0
                    found.append(GpuCacheInfo(
                        path=entry.path, namespace=directory.name[len("hps."):],
                        name=entry.name.split(".", 1)[1], device=int(w[W_DEVICE]), kind=str(meta.get("kind", "")),
                        bytes=int(w[W_BYTES]), ready=int(w[W_STATE]) == READY,
                        users=tuple(p for p, _ in shm.live_users(w)), keeper=keeper, kept_by=kept,
                        repairs=int(w[W_REPAIRS]),
                        skipped_inserts=int(w[W_SKIPPED]), pci_bus_id=str(meta.get("device", "")),
                    ))
    return found
