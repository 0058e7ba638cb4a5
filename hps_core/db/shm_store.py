"""The host store's files: one table's shared-memory hash map in one file under /dev/shm.

Every process on a host that serves a table maps the same file (``mmap(MAP_SHARED)``), so N
Triton instances, ``hps inspect`` and the next Triton after a restart share one copy of the
rows. This module owns the file: its layout, who may create, fill, write and remove it, and
how a file a dead process left behind is judged. The kernels that read and write the hash map
inside it live in :mod:`hps_core.db.shared_hash_map`.

Where: ``<root>/hps.<namespace>/<table>`` with ``root`` = ``/dev/shm`` (``HPS_SHM_DIR``
overrides it) and ``namespace`` = ``volatile_db.shared_memory_name`` when the HPS JSON sets
it, else ``cfg-`` + a hash of the JSON's real path (so two repositories on one host never
share by accident, while every instance of one model, every version folder's own JSON, and
``hps inspect`` on the same file agree), else ``pid<pid>`` for a config built in memory.

Layout (all offsets 64-byte aligned; int64 words unless said)::

    header   4 KiB   magic, layout, state (filling | complete), dim, format code, access stat,
                     partitions P, slots per partition S, rows per partition R, row stride,
                     logical clock, superseded flag, the write journal (op, partition, a, b),
                     keeper (pid, start), recoveries, created (ns; kept by growth: the
                     store's identity), users[128] (pid, start), JSON metadata
    parts    P x 64  per partition: seq (a seqlock: odd while a writer changes it), n_rows
    undo     stride  the row an overwrite is replacing (the journal's OVERWRITE restores it)
    slots    P x S x (key, row)    open addressing, row -1 = empty, load <= 1/2
    rows     P x R x stride        rows [0, n_rows) live, dense, each header-then-packed row

Ownership and the commit point (LMDB's spirit, STYLE.md 14):

- **Creating and filling** happens under ``flock(LOCK_EX)`` on the file itself: the first
  process creates it (state ``filling``), fills it from the sparse files, sets ``complete``
  and unlocks; the others block on the lock, then find it complete and attach. A file found
  ``filling`` by whoever gets the lock was left by a filler that died: it is removed and built
  again. ``flock`` is released by the kernel when its holder dies, so no lock is ever stuck.
- **Writers** (updates, copy-ups, evictions) take the same ``flock``: one writer per table
  per host at a time. Each change is journaled in the header before it starts and its commit
  is one 8-byte store (a partition's ``n_rows``, a journal op cleared); the next holder of the
  lock that finds a journal entry, or a partition whose seqlock is odd, repairs it
  (:func:`hps_core.db.shared_hash_map.recover`) before anything else. So a writer SIGKILLed at
  any instruction leaves either the old or the new row, never a torn one.
- **Readers** take no lock at all: a seqlock per partition tells them to read a group again
  when a writer changed the partition meanwhile (``shared_hash_map``).
- **Growth** writes a larger file beside the old one, renames it over the path and marks the
  old one ``superseded``; every process remaps at its next call. Which file is current is
  always the one at the path: a lock holder checks its inode before it trusts its mapping.
- **Users**: each attached process has a slot (pid and start time, so a reused pid is not
  mistaken for a live user). A store is removed when its last user closes it, unless a
  *keeper* is alive (``hps serve`` names itself in ``HPS_STORE_KEEPER``: the store then
  outlives Triton restarts and stub crashes, and ``hps serve``'s clean stop removes what it
  kept, :func:`remove_kept_stores`) or ``volatile_db.shared_memory_auto_remove`` is false.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hps_core.config import VolatileDBConfig, entry_version
from hps_core.errors import ConfigError, TierError
from hps_core.row_formats import RowFormat

__all__ = [
    "KEEPER_ENV",
    "SHM_DIR_ENV",
    "StoreFile",
    "StoreInfo",
    "StoreSpec",
    "alive",
    "deregister_user",
    "huge_pages",
    "keeper_from_env",
    "list_stores",
    "live_users",
    "namespace_dir",
    "namespace_of",
    "process_start",
    "read_meta",
    "register_user",
    "remove_if_unused",
    "remove_kept_stores",
    "remove_orphaned_stores",
    "shm_root",
    "this_process",
]

SHM_DIR_ENV = "HPS_SHM_DIR"  # where namespaces live (default /dev/shm)
KEEPER_ENV = "HPS_STORE_KEEPER"  # pid of the process (hps serve) that keeps stores past their users
_DIR_PREFIX = "hps."
_TMP_MARK = ".growing-"  # a larger file being built; its writer's pid follows

_MAGIC = 0x45524F5453535048  # b"HPSSTORE" little-endian
_LAYOUT = 1
_HEADER_BYTES = 4096
_META_OFFSET = 2560  # JSON metadata: table, namespace, source fingerprint, created
MAX_USERS = 128
_ALIGN = 64

# header words
H_MAGIC, H_LAYOUT, H_STATE, H_DIM, H_CODE, H_STAT, H_PARTS, H_SLOTS, H_ROWS, H_STRIDE = range(10)
H_CLOCK, H_SUPERSEDED, H_JOP, H_JPART, H_JA, H_JB = range(10, 16)
H_KEEPER, H_KEEPER_START, H_RECOVERIES, H_META_LEN, H_CREATED = range(16, 21)
H_USERS = 64  # users: (pid, start) pairs from here
HEADER_WORDS = _HEADER_BYTES // 8
# per-partition words (8 per partition: one cache line each)
P_SEQ, P_ROWS = 0, 1
PART_WORDS = 8

FILLING, COMPLETE = 1, 2
_MADV_POPULATE_WRITE = 23  # linux/mman.h; Python 3.11's mmap module does not name it


def shm_root() -> Path:
    """Where the namespaces live: ``HPS_SHM_DIR`` or ``/dev/shm``."""
    return Path(os.environ.get(SHM_DIR_ENV) or "/dev/shm")


def namespace_of(cfg: VolatileDBConfig, source: str) -> str:
    """The store namespace of a volatile_db section read from ``source`` (see the module doc)."""
    if cfg.shared_memory_name:  # checked where the config is read
        return cfg.shared_memory_name
    if source:
        return "cfg-" + hashlib.sha256(os.path.realpath(source).encode()).hexdigest()[:16]
    return f"pid{os.getpid()}"


def huge_pages(root: Path | None = None) -> str:
    """Whether files under ``root`` (default :func:`shm_root`) can get transparent huge pages:
    the ``huge=`` option of the tmpfs holding it (``advise`` counts: every store asks with
    ``MADV_HUGEPAGE``), unless the host's ``shmem_enabled`` is ``force`` or ``deny``, the two
    values that override a mount's option (the others govern only the kernel's internal shm
    mount). "never" costs lookups their TLB reach: 0.72-0.86x a private map's keys/s, against
    1.01-1.16x with huge pages (docs/benchmarks.md)."""
    root = Path(os.path.realpath(shm_root() if root is None else root))
    with contextlib.suppress(OSError):
        chosen = re.search(r"\[(\w+)\]", Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text())
        if chosen and chosen.group(1) in ("force", "deny"):
            return "shmem_enabled=force" if chosen.group(1) == "force" else "never"
    mount, option = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():  # the last of stacked mounts wins
            fields = line.split()
            if len(fields) < 4 or fields[2] != "tmpfs":
                continue
            at = Path(fields[1])
            if (root == at or at in root.parents) and len(fields[1]) >= len(mount):
                mount = fields[1]
                option = next((o.split("=", 1)[1] for o in fields[3].split(",") if o.startswith("huge=")), "never")
    return f"tmpfs huge={option}" if option and option != "never" else "never"


def namespace_dir(namespace: str) -> Path:
    return shm_root() / f"{_DIR_PREFIX}{namespace}"


def file_name(table: str) -> str:
    """A table's store file name: its qualified name, which tiers already restrict to safe
    characters; anything else is replaced so a name can never leave the folder."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", table).lstrip(".") or "_"


# --------------------------------------------------------------------------- processes


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` (clock ticks since boot), or None when it is gone: a
    (pid, start) pair names one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields and fields[0] == b"Z":  # a zombie holds no mapping any more
        return None
    return int(fields[19])


def alive(pid: int, start: int) -> bool:
    """Whether the process (pid, start) still runs (a reused pid has another start)."""
    return pid > 0 and process_start(pid) == start



_starts: dict[int, int] = {}


def this_process() -> tuple[int, int]:
    """This process as (pid, start); looked up again after a fork."""
    pid = os.getpid()
    if pid not in _starts:
        _starts[pid] = process_start(pid) or 0
    return pid, _starts[pid]


def keeper_from_env() -> tuple[int, int]:
    """The keeper ``HPS_STORE_KEEPER`` names, as (pid, start); (0, 0) when none or gone."""
    raw = os.environ.get(KEEPER_ENV, "")
    if not raw.isdigit():
        return 0, 0
    pid = int(raw)
    start = process_start(pid)
    return (pid, start) if start is not None else (0, 0)


# --------------------------------------------------------------------------- users
# A header (int64 words, mapped shared) holds the keeper (pid, start) at H_KEEPER and
# MAX_USERS (pid, start) user pairs from H_USERS; the host store's files and the shared GPU
# caches' metadata files (hps_core.cache.shared_gpu) both use these words, so
# remove_kept_stores judges either alike. The caller holds the file's lock.


def _pairs(header: Any) -> Any:
    return header[H_USERS : H_USERS + 2 * MAX_USERS].reshape(-1, 2)


def live_users(header: Any) -> list[tuple[int, int]]:
    """Live attached processes as (pid, start)."""
    return [(int(p), int(s)) for p, s in _pairs(header) if p > 0 and alive(int(p), int(s))]


def register_user(header: Any, path: Path) -> None:
    """Take a user slot for this process (a process with two handles holds two), and record
    the live keeper ``HPS_STORE_KEEPER`` names when the recorded one is gone."""
    pid, start = this_process()
    pairs = _pairs(header)
    free = next((i for i, (p, s) in enumerate(pairs) if p <= 0 or not alive(int(p), int(s))), -1)
    if free < 0:
        raise TierError(f"{path}: {MAX_USERS} live handles already use this store")
    pairs[free] = (pid, start)
    keeper = keeper_from_env()
    if keeper[0] and not alive(int(header[H_KEEPER]), int(header[H_KEEPER_START])):
        header[H_KEEPER], header[H_KEEPER_START] = keeper


def deregister_user(header: Any) -> list[tuple[int, int]]:
    """Give back one slot of this process (and those of dead ones); returns the live users left."""
    pid, start = this_process()
    mine = True
    pairs = _pairs(header)
    for i, (p, s) in enumerate(pairs):
        if p <= 0:
            continue
        if mine and p == pid and s == start:
            pairs[i] = (0, 0)
            mine = False
        elif not alive(int(p), int(s)):
            pairs[i] = (0, 0)
    return live_users(header)


# --------------------------------------------------------------------------- layout


def _align(n: int, to: int = _ALIGN) -> int:
    return -(-n // to) * to


def pow2_at_least(n: int) -> int:
    return 1 << max(4, (max(n, 1) - 1).bit_length())


@dataclass(frozen=True)
class StoreSpec:
    """The shape of one table's store: what two processes must agree on to share it."""

    table: str
    dim: int
    row_format: RowFormat
    stat: int  # which access stat rows keep (hash_map's _NO_STAT / _STAMP_STAT / _COUNT_STAT)
    partitions: int
    rows_per_partition: int
    stride: int  # bytes per stored row: header + packed row, a multiple of 8

    @property
    def slots_per_partition(self) -> int:
        return pow2_at_least(2 * self.rows_per_partition)  # load factor <= 1/2

    def offsets(self) -> tuple[int, int, int, int, int]:
        """Byte offsets of parts, undo, slots, rows, and the file's size."""
        parts = _HEADER_BYTES
        undo = _align(parts + self.partitions * PART_WORDS * 8)
        slots = _align(undo + self.stride, 4096)
        rows = _align(slots + self.partitions * self.slots_per_partition * 16)
        size = _align(rows + self.partitions * self.rows_per_partition * self.stride, 4096)
        return parts, undo, slots, rows, size

    @property
    def nbytes(self) -> int:
        return self.offsets()[4]

    def grown(self, rows_per_partition: int) -> StoreSpec:
        return StoreSpec(self.table, self.dim, self.row_format, self.stat, self.partitions,
                         rows_per_partition, self.stride)


class StoreFile:
    """One mapped store file and the numpy views a kernel needs of it.

    Views: ``header`` int64[512], ``parts`` int64[P * 8], ``undo`` uint8[stride], ``slots``
    int64[P, S, 2], ``rows`` uint8[P, R, stride]. ``lock()`` is the host-wide writer lock
    (``flock`` on this file, plus a thread lock: ``flock`` does not exclude threads that share
    one descriptor).
    """

    def __init__(self, path: Path, fd: int, spec: StoreSpec) -> None:
        self.path, self.fd, self.spec = path, fd, spec
        self._mm = mmap.mmap(fd, spec.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with contextlib.suppress(OSError):
            # huge pages where the tmpfs allows them (mounted huge=advise; huge_pages() tells): fewer TLB misses per lookup
            self._mm.madvise(mmap.MADV_HUGEPAGE)
        buf = memoryview(self._mm)
        parts, undo, slots, rows, _ = spec.offsets()
        p, s, r = spec.partitions, spec.slots_per_partition, spec.rows_per_partition
        self.header = np.frombuffer(buf, np.int64, HEADER_WORDS, 0)
        self.parts = np.frombuffer(buf, np.int64, p * PART_WORDS, parts)
        self.undo = np.frombuffer(buf, np.uint8, spec.stride, undo)
        self.slots = np.frombuffer(buf, np.int64, p * s * 2, slots).reshape(p, s, 2)
        self.rows = np.frombuffer(buf, np.uint8, p * r * spec.stride, rows).reshape(p, r, spec.stride)
        self.inode = os.fstat(fd).st_ino
        self._thread_lock = threading.Lock()
        self.closed = False  # set by close(); a thread that waited on the lock then retries
        _open_stores.add(self)

    # -- identity ---------------------------------------------------------------------------
    @property
    def address(self) -> int:
        """Address of the header (the kernels find every region from the directory)."""
        return int(self.header.ctypes.data)

    def is_current(self) -> bool:
        """Whether this file is still the one at its path (not grown over, not removed)."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            return False

    def populate(self, partition: int) -> None:
        """Take the memory of one partition's slots and rows (and, for partition 0, of the
        header) from the tmpfs and map it now, in one call per region (``MADV_POPULATE_WRITE``,
        Linux 5.14+; ``posix_fallocate`` where unknown), so a full /dev/shm fails here, naming
        the bytes needed, instead of a SIGBUS at the first write to a page it cannot give.
        One thread per partition: much faster than one page fault per 4 KiB during a fill."""
        spec = self.spec
        _, _, slots, rows, _ = spec.offsets()
        slot_bytes, row_bytes = spec.slots_per_partition * 16, spec.rows_per_partition * spec.stride
        regions = [(slots + partition * slot_bytes, slot_bytes), (rows + partition * row_bytes, row_bytes)]
        if partition == 0:
            regions.append((0, slots))
        for start, length in regions:
            first = start // mmap.PAGESIZE * mmap.PAGESIZE
            try:
                try:
                    self._mm.madvise(_MADV_POPULATE_WRITE, first, start + length - first)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: a kernel without it
                        raise
                    os.posix_fallocate(self.fd, first, start + length - first)
            except OSError as exc:
                if exc.errno not in _FULL:
                    raise TierError(f"{self.path}: cannot map the host store ({exc.strerror})") from exc
                raise shm_full(self.path, spec.nbytes) from exc

    def n_rows(self) -> int:
        return int(self.parts[P_ROWS::PART_WORDS].sum())

    def metadata(self) -> dict[str, Any]:
        return read_meta(self.header)

    # -- locking ----------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the writer lock: this process's thread lock, then the host-wide ``flock``
        (which the kernel drops if this process dies). A closed store takes only the thread
        lock (see :attr:`closed`): the caller releases it and uses the current store."""
        self._thread_lock.acquire()
        if self.closed:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def hold(self) -> None:
        """Take only the thread lock (the caller already holds the ``flock``)."""
        self._thread_lock.acquire()

    def release(self) -> None:
        if not self.closed:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    # -- users (caller holds the lock) ------------------------------------------------------
    def users(self) -> list[tuple[int, int]]:
        """Live attached processes as (pid, start)."""
        return live_users(self.header)

    def register(self) -> None:
        """Take a user slot for this handle (a process with two handles holds two)."""
        register_user(self.header, self.path)

    def deregister(self) -> list[tuple[int, int]]:
        """Give back one slot of this process (and those of dead ones); returns the live users left."""
        return deregister_user(self.header)

    def keeper_alive(self) -> bool:
        return alive(int(self.header[H_KEEPER]), int(self.header[H_KEEPER_START]))

    def close(self) -> None:
        """Drop the views and the mapping (callers make sure no kernel uses them any more)."""
        if self.closed:
            return
        self.closed = True
        with self._thread_lock:  # a thread inside acquire() or release() is done with the fd first
            self._unmap()

    def _unmap(self) -> None:
        del self.header, self.parts, self.undo, self.slots, self.rows
        with contextlib.suppress(BufferError):
            self._mm.close()  # a view still held elsewhere unmaps with its last reference
        with contextlib.suppress(OSError):
            os.close(self.fd)


_open_stores: weakref.WeakSet[StoreFile] = weakref.WeakSet()


def _own_descriptors_after_fork() -> None:
    """In a forked child: a descriptor and a thread lock of its own for every open store.

    A child inherits its parent's open file descriptions, and a ``flock`` belongs to the
    description: a child writer would find the lock its parent holds already "held" and write
    beside it. Reopening the same file (``/proc/self/fd``, so the same inode even if the path
    was replaced) gives the child its own description, so the two exclude each other again; the
    thread lock may have been held by a parent thread that does not exist in the child. The
    child takes no user slot: its parent's counts for it (the parent must outlive it, or the
    child opens the tier itself)."""
    for store in list(_open_stores):
        if store.closed:
            continue
        store._thread_lock = threading.Lock()
        try:
            fd = os.open(f"/proc/self/fd/{store.fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # no /proc, no descriptor left: the child must not write beside its parent
            store.closed = True  # its writers take the thread lock alone, then find the store closed
            continue
        os.dup2(fd, store.fd, inheritable=False)
        os.close(fd)


os.register_at_fork(after_in_child=_own_descriptors_after_fork)


# --------------------------------------------------------------------------- creation


def read_meta(header: Any) -> dict[str, Any]:
    """The JSON metadata a store's header carries (table, namespace, source); {} when unreadable."""
    length = int(header[H_META_LEN])
    if not 0 < length <= _HEADER_BYTES - _META_OFFSET:
        return {}
    raw = header.view(np.uint8)[_META_OFFSET : _META_OFFSET + length].tobytes()
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _write_meta(header: Any, meta: dict[str, Any]) -> None:
    raw = json.dumps(meta, sort_keys=True).encode()
    if len(raw) > _HEADER_BYTES - _META_OFFSET:
        raise TierError(f"store metadata too long ({len(raw)} bytes): {meta!r}")
    header.view(np.uint8)[_META_OFFSET : _META_OFFSET + len(raw)] = np.frombuffer(raw, np.uint8)
    header[H_META_LEN] = len(raw)


def spec_of(header: Any, table: str) -> StoreSpec | None:
    """The spec a file's header records, or None when it is not a store of this layout."""
    if header[H_MAGIC] != _MAGIC or header[H_LAYOUT] != _LAYOUT:
        return None
    try:
        row_format = RowFormat.from_code(int(header[H_CODE]))
    except ConfigError:
        return None
    return StoreSpec(table, int(header[H_DIM]), row_format, int(header[H_STAT]),
                     int(header[H_PARTS]), int(header[H_ROWS]), int(header[H_STRIDE]))


def open_fd(path: Path, create: bool) -> int:
    """A read-write descriptor of ``path``; errors that name the owner and the fix."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o600)
    except PermissionError as exc:
        owner = _owner(path)
        raise TierError(
            f"{path}: cannot open the host store ({exc.strerror}); it belongs to {owner}: run the "
            "server as that user, or give this one its own namespace with "
            "volatile_db.shared_memory_name"
        ) from exc


def _owner(path: Path) -> str:
    for p in (path, path.parent):
        with contextlib.suppress(OSError):
            st = p.stat()
            return f"uid {st.st_uid} (mode {stat.filemode(st.st_mode)})"
    return "another user"


def ensure_dir(directory: Path) -> None:
    """Create the namespace folder (mode 0700); one of another user is a clear error."""
    try:
        directory.mkdir(mode=0o700, parents=False, exist_ok=True)
    except FileNotFoundError as exc:
        raise TierError(
            f"{directory.parent} does not exist: the host store needs a tmpfs there "
            f"(/dev/shm), or set {SHM_DIR_ENV} to one"
        ) from exc
    except PermissionError as exc:
        raise TierError(f"{directory}: cannot create the host store folder ({exc.strerror})") from exc
    st = directory.stat()
    if st.st_uid != os.geteuid():
        raise TierError(
            f"{directory}: the host store folder belongs to uid {st.st_uid}, not to this process's "
            f"uid {os.geteuid()}: run as that user, or set volatile_db.shared_memory_name to a "
            "namespace of your own"
        )


def reserve(fd: int, path: Path, nbytes: int, limit: int, namespace_bytes: int) -> None:
    """Size ``fd`` to ``nbytes`` after checking ``volatile_db.shared_memory_size`` and the free
    space of the tmpfs (the pages are taken by :meth:`StoreFile.populate`, one thread per
    partition, which fails as clearly should another process take the space meanwhile)."""
    if namespace_bytes + nbytes > limit:
        raise TierError(
            f"{path}: the host store needs {nbytes:,} more bytes, but its namespace already holds "
            f"{namespace_bytes:,} of volatile_db.shared_memory_size = {limit:,}: raise "
            "shared_memory_size in the HPS JSON"
        )
    if _free_bytes(path.parent) < nbytes:
        raise shm_full(path, nbytes, namespace_bytes)
    try:
        os.ftruncate(fd, nbytes)
    except OSError as exc:
        if exc.errno not in _FULL:
            raise TierError(f"{path}: cannot size the host store ({exc.strerror})") from exc
        raise shm_full(path, nbytes, namespace_bytes) from exc


_FULL = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EFAULT)  # EFAULT: a fault on a full tmpfs


def shm_full(path: Path, nbytes: int, namespace_bytes: int = 0) -> TierError:
    """The error of a table that does not fit the tmpfs: the bytes needed and free, the fix."""
    return TierError(
        f"{path}: /dev/shm is too small for this table: it needs {nbytes:,} bytes and "
        f"{_free_bytes(path.parent):,} are free; give the container more shared memory (docker run "
        f"--shm-size={_suggest(nbytes + namespace_bytes)}), or set volatile_db.host_shared "
        "to false to keep a private map in each process"
    )


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _suggest(nbytes: int) -> str:
    gib = -(-int(nbytes * 1.25) // 1024**3)
    return f"{gib}g"


def namespace_bytes(directory: Path, but: Path | None = None) -> int:
    """Bytes the store files of a namespace take (``but`` excluded)."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.is_file(follow_symlinks=False) and Path(entry.path) != but:
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def initialise(store: StoreFile, meta: dict[str, Any]) -> None:
    """Write a fresh file's header (state ``filling``) and zero its partitions' counters; the
    caller empties the slots (one thread per partition: a table's slots are large)."""
    spec, h = store.spec, store.header
    h[:] = 0
    h[H_LAYOUT], h[H_STATE], h[H_DIM], h[H_CODE] = _LAYOUT, FILLING, spec.dim, spec.row_format.code
    h[H_STAT], h[H_PARTS], h[H_SLOTS] = spec.stat, spec.partitions, spec.slots_per_partition
    h[H_ROWS], h[H_STRIDE] = spec.rows_per_partition, spec.stride
    h[H_CREATED] = time.time_ns()
    _write_meta(h, meta)
    store.parts[:] = 0
    h[H_MAGIC] = _MAGIC  # last: a half-written header is not a store


def remove_stale_growth(directory: Path) -> None:
    """Remove larger files a writer that died was building (``.growing-<pid>``)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            mark = entry.name.find(_TMP_MARK)
            if mark < 0:
                continue
            pid = entry.name[mark + len(_TMP_MARK):]
            if not pid.isdigit() or process_start(int(pid)) is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def growth_path(path: Path) -> Path:
    return path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}")


# --------------------------------------------------------------------------- listing, removal


@dataclass(frozen=True)
class StoreInfo:
    """What ``hps inspect`` shows of one store file."""

    path: str
    namespace: str
    table: str
    dim: int
    row_format: str
    rows: int
    bytes: int
    complete: bool
    users: tuple[int, ...]  # live attached pids
    keeper: int  # pid of a live keeper, 0 when none
    recoveries: int  # writers' deaths repaired

    @property
    def version(self) -> str:
        """The model version the table belongs to (``hps_et.<model>_v<N>.<table>``), or "1"."""
        return str(entry_version(self.table.split(".")[1]) if self.table.count(".") >= 2 else 1)


def _info(path: Path) -> StoreInfo | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < _HEADER_BYTES:
            return None
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            header = np.frombuffer(mm, np.int64, HEADER_WORDS).copy()
            meta = read_meta(header)
            spec = spec_of(header, str(meta.get("table", path.name)))
            if spec is None:
                return None
            parts = np.frombuffer(mm, np.int64, spec.partitions * PART_WORDS, _HEADER_BYTES).copy()
    finally:
        os.close(fd)
    pairs = header[H_USERS : H_USERS + 2 * MAX_USERS].reshape(-1, 2)
    users = tuple(int(p) for p, s in pairs if p > 0 and alive(int(p), int(s)))
    keeper = int(header[H_KEEPER]) if alive(int(header[H_KEEPER]), int(header[H_KEEPER_START])) else 0
    return StoreInfo(
        path=str(path), namespace=path.parent.name[len(_DIR_PREFIX):], table=spec.table, dim=spec.dim,
        row_format=spec.row_format.value, rows=int(parts[P_ROWS::PART_WORDS].sum()), bytes=size,
        complete=int(header[H_STATE]) == COMPLETE, users=users, keeper=keeper,
        recoveries=int(header[H_RECOVERIES]),
    )


def list_stores(namespace: str | None = None) -> list[StoreInfo]:
    """Every store file on this host (or of one namespace), read without taking a lock."""
    root = shm_root()
    dirs = [namespace_dir(namespace)] if namespace else sorted(root.glob(f"{_DIR_PREFIX}*"))
    found = []
    for directory in dirs:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, PermissionError):
            for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                if _TMP_MARK not in entry.name and entry.is_file(follow_symlinks=False):
                    info = _info(Path(entry.path))
                    if info is not None:
                        found.append(info)
    return found


def remove_kept_stores(keeper_pid: int) -> list[str]:
    """Remove the stores ``keeper_pid`` kept and nobody uses any more (``hps serve``'s clean
    stop, after Triton is gone), and namespace folders left empty; returns the paths removed."""
    return _remove_unused(lambda header: int(header[H_KEEPER]) == keeper_pid, wait=True)


def remove_orphaned_stores() -> list[str]:
    """Remove the stores (and shared GPU caches' files) on this host that no live process uses
    and no live keeper keeps: left by servers that all died without a keeper (Triton started
    directly, every stub killed) in namespaces nobody will start again. Only on an operator's
    word (``hps inspect --stores --remove-orphans``), never at a server's start: such a store is
    also what the next start of a crashed server re-attaches to. A host store is an orphan only
    when it says it is removed with its last user (``shared_memory_auto_remove: true``, recorded
    since that field was kept in the file; one made with ``false``, or by an earlier version,
    is kept). Processes are judged by pid in this PID namespace: do not run it where another
    container shares /dev/shm. Returns the paths removed."""

    def orphaned(header: Any) -> bool:
        is_host_store = header[H_MAGIC] == _MAGIC
        if is_host_store and read_meta(header).get("auto_remove") is not True:
            return False
        return not alive(int(header[H_KEEPER]), int(header[H_KEEPER_START]))

    return _remove_unused(orphaned, wait=False)


def remove_if_unused(path: Path) -> bool:
    """Remove one file of this module's layout of users (a host store, a shared GPU cache's
    metadata file) when no live process uses it, whoever keeps it (a retired version), and its
    namespace folder when left empty; False when it is in use (or locked: being written)."""
    if not _remove_if_unused(path, lambda header: True, wait=False):
        return False
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only when empty
    return True


def _remove_unused(removable: Callable[[Any], bool], *, wait: bool) -> list[str]:
    removed = []
    for directory in sorted(shm_root().glob(f"{_DIR_PREFIX}*")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            for entry in os.scandir(directory):
                path = Path(entry.path)
                if _TMP_MARK in entry.name or not entry.is_file(follow_symlinks=False):
                    continue
                if _remove_if_unused(path, removable, wait):
                    removed.append(str(path))
        remove_stale_growth(directory)
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when empty
    return removed


def _remove_if_unused(path: Path, removable: Callable[[Any], bool], wait: bool) -> bool:
    """Remove ``path`` when no live process uses it and ``removable(header)``. Without ``wait``
    a locked file (being filled or written, so in use) is left alone at once."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        if os.fstat(fd).st_size < _HEADER_BYTES:
            os.unlink(path)
            return True
        with mmap.mmap(fd, _HEADER_BYTES, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            header = np.frombuffer(mm, np.int64, HEADER_WORDS).copy()
        if live_users(header) or not removable(header):
            return False
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
                return True
        return False
    finally:
        os.close(fd)
