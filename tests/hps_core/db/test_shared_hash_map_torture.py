"""Torture test of the host store (``hps_core/db/shared_hash_map.py``): writer processes are
SIGKILLed at random moments, over a thousand times, while reader processes check every row
they read; then the whole table is checked against what the writers were told was written.

What it proves (see the module doc of ``shared_hash_map``: seqlocked lock-free readers, one
flock'd writer, a journal the next lock holder repairs, growth by rename):

- **no torn row**: a row is (key, epoch, local) followed by residues of that triple, so a
  row mixing two writes, or a row of another key, fails the readers' check;
- **no phantom version**: a row's (epoch, local) names the op that wrote it; the readers check
  that op was an insert covering that key, and that a key's version never goes back;
- **no lost update, no lost key**: after the run, every key holds the version of its last
  acknowledged op, or of an op in flight when its writer was killed (never an older one);
  a key whose last acknowledged op removed it is absent unless an in-flight insert re-added it;
  ``count`` equals the keys found (no duplicate or stray row);
- **no stuck lock**: afterwards the store's flock is free and an insert goes through;
- **kills landed mid-write**: the header's recovery counter (``shm.H_RECOVERIES``) went up;
- **growth under kills**: the table starts at 64 rows per partition and grows several times
  while writers are being killed; readers remap as it grows;
- the last close removes the store, although hundreds of dead writers held user slots.

Kills: each incarnation is killed at a random instant after 0-12 acknowledged ops, or, when
the parent sees a live writer's half-built larger file (``<table>.growing-<pid>``), usually
right then; half of the incarnations also kill themselves at a random point of a growth
(:func:`arm_growth_kill`), which a random instant would rarely hit. Rows are wide (256
floats) so that a good share of kills land inside a kernel's copy: about one kill in five
leaves something to repair. (Checked by hand: breaking the undo restore or the removal's redo
in ``recover``, the repair before a write, or the readers' seqlock re-check each made this
test fail.)

Ops are a pure function of (writer, epoch, local): epoch numbers each writer incarnation
(increasing over the run), local numbers its ops. So a writer logs only (epoch, local) after
an op returns (its acknowledgement), and the readers and the final check recompute which keys
any version covers. Each writer owns its own key range, so a key's ops are totally ordered by
(epoch, local).
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import random
import signal
import sys
import time
import traceback
from multiprocessing.sharedctypes import RawArray, RawValue
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hps_core.config import VolatileDBConfig
from hps_core.db import shm_store as shm
from hps_core.db.shared_hash_map import SharedHashMapVolatileDB

CTX = mp.get_context("fork")  # a fork is milliseconds; spawn would re-import numba per restart
TABLE = "torture.model.table"
NAMESPACE = "torture"
DIM = 256  # key, epoch, local, then 253 residues of (key, epoch, local)
WRITERS = 3
READERS = 2
KEYS_PER_WRITER = 1500  # 4,500 keys: the table starts at 4 x 64 rows and grows ~5 times
INSERT_BATCH = 64
REMOVE_BATCH = 16
REMOVE_EVERY = 5  # about one op in five removes a block
KILLS = 1000
GROWTH_KILLERS = 0.5  # share of incarnations that kill themselves at a random point of a growth
BITS = 14  # epoch and local each < 2**14 (float32 holds integers < 2**24 exactly)
LIVENESS_S = 400.0  # the whole run's deadline: a stuck lock or reader fails instead of hanging


def _moduli(n: int) -> np.ndarray:
    """``n`` distinct primes just below 2**24: residues modulo them are exact in float32, and
    13 of them together identify x = (key, epoch, local) packed in 41 bits."""
    found: list[int] = []
    c = (1 << 24) - 1
    while len(found) < n:
        if all(c % d for d in range(3, int(c**0.5) + 1, 2)) and c % 2:
            found.append(c)
        c -= 1
    return np.array(found, np.int64)


MODULI = np.resize(_moduli(13), DIM - 3)  # column 3 + c holds x * (c + 1) mod MODULI[c]


def config() -> VolatileDBConfig:
    return VolatileDBConfig(shared_memory_name=NAMESPACE, num_partitions=4, max_batch_size=16)


# --------------------------------------------------------------------------- the ops


def is_remove(epoch: Any, local: Any) -> Any:
    """Whether op (epoch, local) removes (else inserts); scalars or int64 arrays."""
    return (epoch * 31 + local * 17) % REMOVE_EVERY == 0


def block_start(epoch: Any, local: Any) -> Any:
    """Offset in its writer's range of the first key op (epoch, local) covers."""
    return (epoch * 7919 + local * 104729) % KEYS_PER_WRITER


def op_keys(writer: int, epoch: int, local: int) -> np.ndarray:
    width = REMOVE_BATCH if is_remove(epoch, local) else INSERT_BATCH
    offsets = (block_start(epoch, local) + np.arange(width)) % KEYS_PER_WRITER
    return (writer * KEYS_PER_WRITER + offsets).astype(np.int64)


def covers_insert(keys: np.ndarray, epoch: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Whether insert op (epoch, local) of the key's writer wrote ``keys`` (vectorised)."""
    offset = (keys % KEYS_PER_WRITER - block_start(epoch, local)) % KEYS_PER_WRITER
    return ~is_remove(epoch, local) & (offset < INSERT_BATCH)


def encode(keys: np.ndarray, epoch: np.ndarray, local: np.ndarray) -> np.ndarray:
    """(n, DIM) float32 rows: key, epoch, local, then x * (c + 1) mod MODULI[c] for x the three
    packed in 41 bits (every element exact in float32, each one a function of all three)."""
    x = (keys << (2 * BITS)) | (epoch << BITS) | local
    rows = np.empty((keys.shape[0], DIM), np.float32)
    rows[:, 0], rows[:, 1], rows[:, 2] = keys, epoch, local
    rows[:, 3:] = (x[:, None] * np.arange(1, DIM - 2)) % MODULI[None, :]
    return rows


def bad_rows(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Indices of rows that are torn, belong to another key, or carry a version no insert of
    that key wrote."""
    epoch = rows[:, 1].astype(np.int64)
    local = rows[:, 2].astype(np.int64)
    in_range = (epoch >= 1) & (epoch < 1 << BITS) & (local >= 1) & (local < 1 << BITS)
    epoch, local = np.where(in_range, epoch, 1), np.where(in_range, local, 1)
    exact = (rows == encode(keys, epoch, local)).all(axis=1)
    return np.flatnonzero(~(in_range & exact & covers_insert(keys, epoch, local)))


def describe(keys: np.ndarray, rows: np.ndarray, bad: np.ndarray) -> str:
    """The first bad rows: key, the (key, epoch, local) the row claims, and the columns that
    do not match that claim."""
    parts = []
    for i in bad[:5]:
        claim = rows[i, :3].astype(np.int64)
        expect = encode(keys[i : i + 1], claim[1:2], claim[2:3])[0]
        wrong = np.flatnonzero(rows[i] != expect)
        parts.append(f"key {int(keys[i])} holds (key, epoch, local) {claim.tolist()}, "
                     f"{wrong.size} columns disagree (from {wrong[:1].tolist()})")
    return "; ".join(parts)


def version(epoch: Any, local: Any) -> Any:
    return (epoch << BITS) | local


# --------------------------------------------------------------------------- processes


def _fail(path: Path, message: str) -> None:
    path.write_text(message)
    os._exit(3)


def arm_growth_kill(k: int) -> None:
    """SIGKILL this process at the k-th C call (os, fcntl, numpy, a kernel...) it makes while
    a growth (``_grow``, and what it calls) runs: a kill at a random point inside a growth,
    where the parent's random instant would rarely fall."""
    grow = SharedHashMapVolatileDB._grow.__code__
    state = {"in": False, "calls": 0}

    def hook(frame: Any, event: str, arg: Any) -> None:
        if frame.f_code is grow and event in ("call", "return"):
            state["in"] = event == "call"
        elif event == "c_call" and state["in"]:
            state["calls"] += 1
            if state["calls"] > k:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.setprofile(hook)


def writer_main(writer: int, epoch: int, work: str, acked: Any, growth_kill: int) -> None:
    """One incarnation: attach, then run ops (epoch, 1), (epoch, 2), ... logging each one
    after it returned, until killed (with ``growth_kill`` >= 0: by itself, inside a growth)."""
    try:
        if growth_kill >= 0:
            arm_growth_kill(growth_kill)
        db = SharedHashMapVolatileDB(config())
        db.open_table(TABLE, DIM)
        fd = os.open(f"{work}/log-{writer}-{epoch}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        e = np.int64(epoch)
        for local in range(1, 1 << BITS):
            keys = op_keys(writer, epoch, local)
            if is_remove(epoch, local):
                db.remove(TABLE, keys)
            else:
                n = keys.shape[0]
                db.insert(TABLE, keys, encode(keys, np.full(n, e), np.full(n, local, np.int64)))
            os.write(fd, np.array([epoch, local], np.int64).tobytes())  # the acknowledgement
            acked[writer] += 1
        os._exit(0)  # out of versions: the parent starts the next incarnation
    except BaseException:
        _fail(Path(work) / f"error-writer-{writer}-{epoch}", traceback.format_exc())


def reader_main(reader: int, work: str, stop: Any, rows_read: Any) -> None:
    """Read random keys until told to stop; every row must be whole, of its key, written by an
    insert of that key, and no older than what this reader saw of that key before."""
    try:
        db = SharedHashMapVolatileDB(config())
        db.open_table(TABLE, DIM)
        total = WRITERS * KEYS_PER_WRITER
        seen = np.zeros(total, np.int64)  # newest version seen per key
        rng = np.random.default_rng(reader)
        out = np.empty((256, DIM), np.float32)
        while not stop.value:
            keys = rng.choice(total, size=out.shape[0], replace=False).astype(np.int64)
            found = db.fetch(TABLE, keys, out)
            keys_found, rows = keys[found], out[found]
            bad = bad_rows(keys_found, rows)
            if bad.size:
                _fail(Path(work) / f"error-reader-{reader}", f"bad rows: {describe(keys_found, rows, bad)}")
            v = version(rows[:, 1].astype(np.int64), rows[:, 2].astype(np.int64))
            older = np.flatnonzero(v < seen[keys_found])
            if older.size:
                i = older[0]
                _fail(Path(work) / f"error-reader-{reader}",
                      f"key {keys_found[i]} went back from version {seen[keys_found[i]]} to {v[i]}")
            seen[keys_found] = v
            rows_read[reader] += int(found.sum())
        db.close()
        os._exit(0)
    except BaseException:
        _fail(Path(work) / f"error-reader-{reader}", traceback.format_exc())


def errors_in(work: Path) -> str:
    return "\n".join(f"{p.name}:\n{p.read_text()}" for p in sorted(work.glob("error-*")))


# --------------------------------------------------------------------------- the check


def check_final_state(db: SharedHashMapVolatileDB, work: Path, incarnations: list[tuple[int, int]]) -> dict[str, int]:
    """Every key against the acknowledged ops (see the module doc); returns statistics."""
    total = WRITERS * KEYS_PER_WRITER
    keys = np.arange(total, dtype=np.int64)
    out = np.empty((total, DIM), np.float32)
    found = db.fetch(TABLE, keys, out)
    bad = bad_rows(keys[found], out[found])
    assert not bad.size, f"torn or foreign rows: {describe(keys[found], out[found], bad)}"
    stored = np.full(total, -1, np.int64)
    stored[found] = version(out[found, 1].astype(np.int64), out[found, 2].astype(np.int64))
    assert db.count(TABLE) == int(found.sum()), "rows counted that no key finds (a duplicate or stray row)"

    last_insert = np.full(total, -1, np.int64)  # newest acknowledged insert per key
    last_remove = np.full(total, -1, np.int64)  # newest acknowledged removal per key
    in_flight: dict[int, list[tuple[int, bool]]] = {}  # key -> (version, removes) of unacknowledged ops
    acks = 0
    for writer, epoch in incarnations:
        log = work / f"log-{writer}-{epoch}"
        raw = log.read_bytes() if log.exists() else b""
        locals_ = np.frombuffer(raw[: len(raw) // 16 * 16], np.int64).reshape(-1, 2)
        assert (locals_[:, 0] == epoch).all()
        locals_ = locals_[:, 1]
        assert np.array_equal(locals_, np.arange(1, locals_.shape[0] + 1)), "acknowledgements out of order"
        acks += locals_.shape[0]
        for removes, width, last in ((False, INSERT_BATCH, last_insert), (True, REMOVE_BATCH, last_remove)):
            ops = locals_[is_remove(epoch, locals_) == removes]
            if not ops.size:
                continue
            offsets = (block_start(epoch, ops)[:, None] + np.arange(width)[None, :]) % KEYS_PER_WRITER
            np.maximum.at(last, writer * KEYS_PER_WRITER + offsets.ravel(),
                          np.repeat(version(epoch, ops), width))
        nxt = int(locals_.shape[0]) + 1  # the op it may have been in when killed
        if nxt < 1 << BITS:
            removes = bool(is_remove(epoch, nxt))
            for key in op_keys(writer, epoch, nxt).tolist():
                in_flight.setdefault(key, []).append((int(version(epoch, nxt)), removes))

    last = np.maximum(last_insert, last_remove)
    problems = []
    for key in range(total):
        v, l_ins, l_rm = int(stored[key]), int(last_insert[key]), int(last_remove[key])
        lastv = max(l_ins, l_rm)
        pending = in_flight.get(key, [])
        if v >= 0:
            ok = (v == l_ins and l_ins > l_rm) or ((v, False) in pending and v > lastv)
            if not ok:
                kind = "lost update" if v < l_ins else "resurrected" if l_rm > l_ins else "unknown version"
                problems.append(f"key {key}: {kind}: holds {v}, last acknowledged insert {l_ins}, removal {l_rm}")
        elif l_ins > l_rm:
            if not any(removes and w > lastv for w, removes in pending):
                problems.append(f"key {key}: missing although insert {l_ins} was acknowledged")
    assert not problems, f"{len(problems)} keys wrong, e.g.:\n" + "\n".join(problems[:10])
    return {"acks": acks, "present": int(found.sum()), "acked_keys": int((last >= 0).sum())}


# --------------------------------------------------------------------------- the test


def _warm_kernels() -> None:
    """Load every kernel in this process before forking, so no child compiles or reads the
    numba cache in its first milliseconds (a scratch namespace, removed on close)."""
    db = SharedHashMapVolatileDB(VolatileDBConfig(shared_memory_name="warm", num_partitions=4, max_batch_size=16))
    db.open_table("warm.t", DIM)
    keys = np.arange(300, dtype=np.int64)
    db.insert("warm.t", keys, np.zeros((300, DIM), np.float32))  # grows once
    db.fetch("warm.t", keys, np.empty((300, DIM), np.float32))
    db.remove("warm.t", keys[:10])
    db.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_writers_killed_at_random_never_tear_lose_or_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(shm.SHM_DIR_ENV, str(tmp_path / "shm"))
    monkeypatch.delenv(shm.KEEPER_ENV, raising=False)
    (tmp_path / "shm").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    _warm_kernels()

    db = SharedHashMapVolatileDB(config())
    db.open_table(TABLE, DIM)  # 64 rows per partition: growth happens under fire
    path = db.store_path(TABLE)
    start_bytes = path.stat().st_size

    stop = RawValue("i", 0)
    acked = RawArray("q", WRITERS)  # ops the current incarnation of each writer acknowledged
    rows_read = RawArray("q", READERS)
    rnd = random.Random(20240518)
    readers = [CTX.Process(target=reader_main, args=(r, str(work), stop, rows_read)) for r in range(READERS)]
    for p in readers:
        p.start()

    incarnations: list[tuple[int, int]] = []
    writers: list[Any] = [None] * WRITERS
    targets = [0] * WRITERS
    epoch = 0

    def start(w: int) -> None:
        nonlocal epoch
        epoch += 1
        assert epoch < 1 << BITS
        acked[w] = 0
        targets[w] = rnd.randint(0, 12)  # kill after this many acknowledged ops, at a random instant
        growth_kill = rnd.randint(0, 130) if rnd.random() < GROWTH_KILLERS else -1  # a growth: ~125 C calls
        writers[w] = CTX.Process(target=writer_main, args=(w, epoch, str(work), acked, growth_kill))
        writers[w].start()
        incarnations.append((w, epoch))

    t0 = time.monotonic()
    kills = killed_growing = killed_in_growth = 0
    try:
        for w in range(WRITERS):
            start(w)
        while kills < KILLS:
            assert time.monotonic() - t0 < LIVENESS_S, f"only {kills} kills in {LIVENESS_S} s: something is stuck"
            for p in readers:
                assert p.is_alive(), f"a reader exited early:\n{errors_in(work)}"
            growing = {name for name in os.listdir(path.parent) if shm._TMP_MARK in name}
            for w in range(WRITERS):
                p = writers[w]
                if not p.is_alive():
                    assert p.exitcode in (0, -signal.SIGKILL), f"writer {w} failed:\n{errors_in(work)}"
                    if p.exitcode:  # killed itself inside a growth
                        kills += 1
                        killed_in_growth += 1
                        killed_growing += (path.parent / f"{path.name}{shm._TMP_MARK}{p.pid}").exists()
                    start(w)
                elif (acked[w] >= targets[w] and rnd.random() < 0.5) or (
                        f"{path.name}{shm._TMP_MARK}{p.pid}" in growing and rnd.random() < 0.85):
                    os.kill(p.pid, signal.SIGKILL)
                    p.join()
                    kills += 1
                    killed_growing += (path.parent / f"{path.name}{shm._TMP_MARK}{p.pid}").exists()
                    start(w)
            time.sleep(0.0005)
    finally:
        stop.value = 1
        for p in writers:
            if p is not None and p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join()
        for p in readers:
            p.join(60)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join()
    elapsed = time.monotonic() - t0
    assert not errors_in(work), errors_in(work)
    assert all(p.exitcode == 0 for p in readers)
    assert min(rows_read) > 0, "a reader never found a row"

    # no stuck lock: the writer lock is free at once
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

    stats = check_final_state(db, work, incarnations)
    header = np.fromfile(path, np.int64, shm.HEADER_WORDS)
    recoveries = int(header[shm.H_RECOVERIES])
    assert recoveries > 0, "no kill landed inside a write (nothing was ever repaired)"
    assert path.stat().st_size > start_bytes, "the table never grew"
    [info] = shm.list_stores(NAMESPACE)
    assert info.recoveries == recoveries and info.complete and info.users == (os.getpid(),)

    # the lock still works: an insert (repairing whatever the last kill left) and its row
    key = np.array([WRITERS * KEYS_PER_WRITER + 7], np.int64)
    row = encode(key, np.array([1]), np.array([1]))
    db.insert(TABLE, key, row)
    out = np.empty((1, DIM), np.float32)
    assert db.fetch(TABLE, key, out).all() and np.array_equal(out, row)

    db.close()  # the last live user: the store and its folder go, dead writers' slots notwithstanding
    assert not path.parent.exists(), list(path.parent.iterdir())
    print(f"\n{kills} kills ({killed_in_growth} self-inflicted inside a growth; {killed_growing} left a "
          f"half-built larger file), "
          f"{recoveries} recoveries, {len(incarnations)} "
          f"incarnations, {stats['acks']} acknowledged ops, rows read {list(rows_read)}, "
          f"{stats['present']} keys present, {start_bytes} -> {info.bytes} bytes, {elapsed:.1f} s")
