#!/usr/bin/env python
"""Host store benchmark of issue 18: the hash map in /dev/shm next to the private one, in one run.

    .venv/bin/python scripts/bench_host_store.py                      # 1M..32M rows, ~3 min on 2 cores
    .venv/bin/python scripts/bench_host_store.py --sizes 1M 4M --parts fill
    .venv/bin/python scripts/bench_host_store.py --quick              # tiny smoke run, < 1 min

What one run measures (dim ``--dim`` = 32, fp32, ``volatile_db`` defaults otherwise; every
process below is a fresh ``python`` running this file with ``--worker``, so its peak RSS is its
own):

fill    For each ``--sizes`` row count, the leading rows of one HugeCTR sparse model folder
        written here (``hps_core.formats.write_sparse_model``) are loaded through
        ``hps_core.loader.load_table(db, table, rows=n)``, as a server does:
        (a) private  ``HashMapVolatileDB`` (``host_shared: false``, the old path): rows/s and
            peak RSS (VmHWM of /proc/self/status), over the raw bytes of the rows read;
        (b) host     ``SharedHashMapVolatileDB`` created and filled: rows/s, peak RSS, the store
            file's size, peak RSS / store bytes (targets: >= 8 M rows/s, <= 1.15x), and where the
            fill's time went (reading the files, creating the file: fallocate + header + empty
            slots, the ``_fill`` kernels (``_fill_chunk``: one thread per partition), the rest), timed by wrapping those three in the worker;
        (c) attach   a second fresh process that calls ``load_table`` on the complete store while
            (b) still holds it: seconds to attach (target <= 1 s), then ``--sample`` random rows
            looked up and compared with the file (keys past ``n`` checked absent).
        ``--repeats`` runs per size alternate private and host; the best rate of each is reported
        (the machine may be shared). Before anything is timed each worker warms the numba kernels
        by loading a 1,000-row table into a tier of its own kind and looking it up (the kernels are
        cached on disk with ``cache=True``, but loading them from the cache still costs ~0.5 s),
        and reads the file once (so both sides find it in the page cache); fill rates exclude
        both. Every worker calls ``retain_freed_memory()`` first, as the Triton backend does
        before it loads tables.
pss     Memory with N processes (``--procs`` 1 2 4): N plain Python processes (not Triton) each
        holding one ``--pss-rows``-row table (loaded with ``load_table``, then every row looked up
        once in 65,536-key chunks, as a server would touch them), private map vs host store (the
        first process fills it, the others attach), and "bare": processes that only imported
        hps_core and warmed the kernels. PSS = sum of ``Pss`` in /proc/PID/smaps_rollup over the
        N processes, read while all of them are alive; ratio = PSS(N) / PSS(1) of the same kind.
lookup  keys/s of ``fetch_tables`` of the private map and the host store in one process, side by
        side (interleaved rounds, medians, ``harness.interleaved``): ``--lookup-tables``
        tables x ``--lookup-rows`` rows (a request's keys table-major, uniform rows) and one table
        holding the same rows; batches ``--batches`` (1,024 and 16,384 keys); answers of both
        checked equal to the stored rows. Ratio host / private.

Page size matters to both fill and lookup: numpy asks for transparent huge pages for large
arrays (the private map's), while a /dev/shm mapping gets them only where the kernel's
``shmem_enabled`` or the tmpfs mount allows (``HPS_SHM_DIR`` can point at a ``huge=`` tmpfs).
The report names both settings; ``--numpy-hugepages off`` puts the private map on 4 KiB pages
too, to tell the page size's share of a difference apart.

The writer-kill torture at benchmark size is a test (``tests/hps_core/db/test_shared_hash_map_
torture.py``), not part of this script; the same comparison under ``hps serve`` (real Triton)
is ``scripts/bench_host_store_serve.py``. Stores go in a namespace of their own
(``shared_memory_name`` = ``bench-host-store-<pid>-<random>``, auto-removed by the last process
that closes them; whatever a failed run leaves there is removed at the end).

Prints the machine, the command line and one markdown table per part; ``--out FILE`` writes the
same markdown to FILE, ``--json DIR`` the numbers to ``DIR/bench_host_store_<time>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hps_core.loader as loader  # noqa: E402
from hps_core.arrays import retain_freed_memory  # noqa: E402
from hps_core.config import TableConfig, VolatileDBConfig  # noqa: E402
from hps_core.db import HashMapVolatileDB, SharedHashMapVolatileDB  # noqa: E402
from hps_core.db.base import HostSharedTables  # noqa: E402
from hps_core.db import shm_store as shm  # noqa: E402
from hps_core.formats import sparse_model_rows, stream_table, write_sparse_model  # noqa: E402
from hps_core.formats.hugectr import EMB_VECTOR_FILE, KEY_FILE  # noqa: E402
from hps_core.row_formats import RowFormat  # noqa: E402
from hps_demo.bench.harness import Row, command_line, interleaved, machine, markdown, write_report  # noqa: E402

SCRIPT = Path(__file__).resolve()
PREFIX = "HPSBENCH "  # a worker's messages on its stdout
TABLE = "hps_et.bench.t"
WARM_ROWS = 1_000
TARGET_FILL = 8e6  # rows/s
TARGET_RSS = 1.15  # peak RSS / store bytes
TARGET_ATTACH = 1.0  # seconds
KIND_LABEL = {"private": "private HashMapVolatileDB", "host": "host store (SharedHashMapVolatileDB)",
              "bare": "bare (imports + warm-up, no table)"}
_KEY_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: i -> i * M mod 2**62 is a bijection
_KEY_MASK = np.uint64((1 << 62) - 1)
MIB = 1024.0**2


# --------------------------------------------------------------------------- data


def keys_of(rows: np.ndarray) -> np.ndarray:
    """Key of each row index: distinct, positive, scattered over 62 bits."""
    return ((rows.astype(np.uint64) * _KEY_MULT) & _KEY_MASK).astype(np.int64)


def write_table(folder: Path, n: int, dim: int, seed: int) -> None:
    """A HugeCTR sparse model folder of ``n`` rows (``keys_of(arange(n))``, standard normal rows);
    one of at least ``n`` rows already there (``<folder>.json`` says what it holds) is reused: the
    parts load leading rows only."""
    stamp = folder.with_suffix(".json")
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        had = json.loads(stamp.read_text())
        if (had["dim"], had["seed"]) == (dim, seed) and had["rows"] >= n and \
                sparse_model_rows(folder, dim) == (had["rows"], dim):
            return
    wanted = {"rows": n, "dim": dim, "seed": seed}
    rng = np.random.default_rng(seed)
    vectors = np.empty((n, dim), np.float32)
    for lo in range(0, n, 1 << 20):
        rng.standard_normal(out=vectors[lo : lo + (1 << 20)], dtype=np.float32)
    write_sparse_model(folder, keys_of(np.arange(n)), vectors)
    stamp.write_text(json.dumps(wanted))


def table_config(folder: str, dim: int, name: str = TABLE) -> TableConfig:
    return TableConfig(name=name.rsplit(".", 1)[-1], dim=dim, default_value=0.0, max_keys_per_sample=1,
                       sparse_file=folder, qualified_name=name)


def store_estimate(rows: int, dim: int) -> int:
    """Bytes of the host store file ``load_table`` would create for ``rows`` rows."""
    probe = SharedHashMapVolatileDB(VolatileDBConfig(shared_memory_name="bench-host-store-estimate"))
    try:  # the tier's own sizing rule (it creates nothing)
        return probe._spec(TABLE, dim, RowFormat.FP32, rows).nbytes
    finally:
        probe.close()


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- process memory


def status_bytes(pid: int | str = "self") -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssShmem of /proc/PID/status, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[name] = int(value.split()[0]) * 1024
    return out


def smaps_rollup(pid: int) -> dict[str, int]:
    """Rss, Pss, Pss_Anon, Pss_File, Pss_Shmem of /proc/PID/smaps_rollup, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        if name in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
            out[name] = int(value.split()[0]) * 1024
    return out


# --------------------------------------------------------------------------- workers (fresh processes)


def open_tier(kind: str, namespace: str) -> Any:
    if kind == "private":
        return HashMapVolatileDB(VolatileDBConfig(host_shared=False))
    db = SharedHashMapVolatileDB(VolatileDBConfig(shared_memory_name=namespace))
    if not isinstance(db, HostSharedTables):  # load_table would create it empty and insert row by row
        missing = [m for m in HostSharedTables.__dict__ if not m.startswith("_") and not hasattr(db, m)]
        db.close()
        raise TypeError(f"SharedHashMapVolatileDB lacks HostSharedTables.{', '.join(missing) or '?'}: load_table "
                        "would not fill it through open_table (the path this benchmark measures)")
    return db


def warm_up(kind: str, spec: Row) -> float:
    """Load the tiny table into a tier of ``kind`` (own namespace) and look it up: every kernel
    the timed part runs is loaded from numba's cache (or compiled) here. Returns seconds."""
    started = time.perf_counter()
    db = open_tier(kind, f"{spec['namespace']}-warm-{os.getpid()}")
    try:
        loader.load_table(db, table_config(spec["warm_folder"], spec["dim"]))
        keys = keys_of(np.arange(WARM_ROWS))
        db.fetch(TABLE, keys, np.empty((WARM_ROWS, spec["dim"]), np.float32))
        if kind == "host":  # the lookup kernel's other callers (fetch_tables over several rows)
            db.fetch_tables((TABLE,), np.zeros(8, np.int64), keys[:8], np.empty(8 * spec["dim"], np.float32),
                            np.arange(0, 8 * spec["dim"], spec["dim"], dtype=np.int64))
    finally:
        db.close()
    return time.perf_counter() - started


def read_pass(spec: Row) -> float:
    """Seconds to stream the rows to load from the files alone (the loader's reads)."""
    started = time.perf_counter()
    for _ in stream_table(spec["folder"], spec["dim"], 0, spec["rows"], loader.DEFAULT_CHUNK_ROWS):
        pass
    return time.perf_counter() - started


def check_sample(db: Any, spec: Row, count: int, seed: int) -> int:
    """``count`` random loaded rows looked up and compared with the file; keys past the loaded
    rows must be absent. Returns the rows checked."""
    n, dim, folder = spec["rows"], spec["dim"], Path(spec["folder"])
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(count, n), replace=False))
    keys = np.memmap(folder / KEY_FILE, np.int64, "r")
    vectors = np.memmap(folder / EMB_VECTOR_FILE, np.float32, "r").reshape(-1, dim)
    expected_keys, expected = np.array(keys[rows]), np.array(vectors[rows])
    del keys, vectors
    if not np.array_equal(expected_keys, keys_of(rows)):
        raise AssertionError("the sparse file's keys are not the ones this script wrote")
    got = np.empty_like(expected)
    found = db.fetch(TABLE, expected_keys, got)
    if not found.all() or not np.array_equal(got, expected):
        raise AssertionError(f"{int((~found).sum())} of {rows.size} sampled keys missing or rows differ")
    absent = keys_of(np.arange(n, n + 100))
    if db.fetch(TABLE, absent, np.empty((100, dim), np.float32)).any():
        raise AssertionError("keys past the loaded rows were found")
    return int(rows.size)


@contextlib.contextmanager
def timed(owner: Any, name: str, into: dict[str, float]) -> Iterator[None]:
    """Wrap ``owner.name`` (a function or a generator function) to add its seconds to ``into[name]``."""
    original = getattr(owner, name)
    into.setdefault(name, 0.0)

    def call(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into[name] += time.perf_counter() - started

    def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
        source = original(*args, **kwargs)
        while True:
            started = time.perf_counter()
            try:
                item = next(source)
            except StopIteration:
                into[name] += time.perf_counter() - started
                return
            into[name] += time.perf_counter() - started
            yield item

    setattr(owner, name, stream if name == "stream_table" else call)
    try:
        yield
    finally:
        setattr(owner, name, original)


def role_fill(spec: Row) -> tuple[Row, list[Any]]:
    """(a) or (b): fill a tier of ``spec['kind']`` with ``rows`` rows through ``load_table``."""
    kind, n = spec["kind"], spec["rows"]
    warm_s = warm_up(kind, spec)
    read_s = read_pass(spec)
    before = status_bytes()
    db = open_tier(kind, spec["namespace"])
    parts: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(timed(loader, "stream_table", parts))
        if kind == "host":
            stack.enter_context(timed(SharedHashMapVolatileDB, "_create", parts))
            stack.enter_context(timed(SharedHashMapVolatileDB, "_fill_chunk", parts))
        started = time.perf_counter()
        written = loader.load_table(db, table_config(spec["folder"], spec["dim"]), rows=n)
        fill_s = time.perf_counter() - started
    after = status_bytes()
    if written != n or db.count(TABLE) != n:
        raise AssertionError(f"load_table wrote {written} rows, the table counts {db.count(TABLE)}, not {n}")
    result: Row = {
        "role": "fill", "kind": kind, "rows": n, "warm_s": warm_s, "read_alone_s": read_s, "fill_s": fill_s,
        "rows_per_s": n / fill_s, "rss_before": before["VmRSS"], "peak_rss": after["VmHWM"],
        "rss_after": after["VmRSS"], "rss_shmem_after": after.get("RssShmem", 0),
        "tier_bytes": db.memory_bytes(TABLE), "parts_s": parts,
    }
    if kind == "host":
        stat = os.stat(db.store_path(TABLE))
        result["store_bytes"], result["store_allocated"] = stat.st_size, stat.st_blocks * 512
    result["checked_rows"] = check_sample(db, spec, spec["sample"], seed=1)
    return result, [db]


def role_attach(spec: Row) -> tuple[Row, list[Any]]:
    """(c): attach to the complete store another process holds, then check a sample."""
    n = spec["rows"]
    warm_s = warm_up("host", spec)
    started = time.perf_counter()
    db = open_tier("host", spec["namespace"])
    written = loader.load_table(db, table_config(spec["folder"], spec["dim"]), rows=n)
    attach_s = time.perf_counter() - started
    if written != 0 or db.count(TABLE) != n:
        raise AssertionError(f"attach wrote {written} rows (expected 0) and counts {db.count(TABLE)} of {n}")
    started = time.perf_counter()
    checked = check_sample(db, spec, spec["sample"], seed=2)
    first_lookup_s = time.perf_counter() - started
    status = status_bytes()
    return {"role": "attach", "rows": n, "warm_s": warm_s, "attach_s": attach_s, "checked_rows": checked,
            "sample_lookup_s": first_lookup_s, "peak_rss": status["VmHWM"]}, [db]


def role_hold(spec: Row) -> tuple[Row, list[Any]]:
    """A process holding one table (or none: kind bare), every row looked up once."""
    kind, n, dim = spec["kind"], spec["rows"], spec["dim"]
    for warm in ("private", "host") if kind == "bare" else (kind,):
        warm_up(warm, spec)
    if kind == "bare":
        return {"role": "hold", "kind": kind, "pid": os.getpid()}, []
    db = open_tier(kind, spec["namespace"])
    started = time.perf_counter()
    written = loader.load_table(db, table_config(spec["folder"], dim), rows=n)
    load_s = time.perf_counter() - started
    step = 65_536
    out = np.empty((step, dim), np.float32)
    for lo in range(0, n, step):
        keys = keys_of(np.arange(lo, min(lo + step, n)))
        if not db.fetch(TABLE, keys, out[: keys.size]).all():
            raise AssertionError(f"rows {lo}.. of the {kind} table are missing")
    return {"role": "hold", "kind": kind, "pid": os.getpid(), "written": written, "load_s": load_s}, [db]


def role_lookup(spec: Row) -> tuple[Row, list[Any]]:
    """fetch_tables keys/s, private map vs host store, in this one process."""
    retain_freed_memory()
    dim, tables, rows = spec["dim"], spec["tables"], spec["table_rows"]
    rng = np.random.default_rng(spec["seed"])
    results = []
    for setup, n_tables, n_rows in ((f"{tables} tables x {rows:,} rows", tables, rows),
                                    (f"1 table x {tables * rows:,} rows", 1, tables * rows)):
        names = tuple(f"{TABLE}{t}" for t in range(n_tables))
        values = [rng.standard_normal((n_rows, dim), dtype=np.float32) for _ in range(n_tables)]
        private = open_tier("private", "")
        host = open_tier("host", f"{spec['namespace']}-lookup")
        try:
            for t, name in enumerate(names):
                keys = keys_of(np.arange(t * n_rows, (t + 1) * n_rows))
                private.create_table(name, dim)
                for lo in range(0, n_rows, 1 << 18):
                    private.insert(name, keys[lo : lo + (1 << 18)], values[t][lo : lo + (1 << 18)])
                host.open_table(name, dim, rows=n_rows, fill=lambda write, k=keys, v=values[t]: write(k, v))
            for batch in spec["batches"]:
                requests = []
                for _ in range(spec["request_sets"]):
                    table_ids = (np.arange(batch, dtype=np.int64) * n_tables) // batch  # table-major
                    picked = rng.integers(0, n_rows, batch)
                    keys = keys_of(table_ids * n_rows + picked)
                    expected = np.stack([values[t][r] for t, r in zip(table_ids.tolist(), picked.tolist())])
                    requests.append((table_ids, keys, expected))
                offsets = np.arange(0, batch * dim, dim, dtype=np.int64)
                outs = {"private": np.empty(batch * dim, np.float32), "host": np.empty(batch * dim, np.float32)}
                for which, db in (("private", private), ("host", host)):
                    for table_ids, keys, expected in requests:
                        outs[which][:] = np.nan
                        found = db.fetch_tables(names, table_ids, keys, outs[which], offsets)
                        if not found.all() or not np.array_equal(outs[which].reshape(batch, dim), expected):
                            raise AssertionError(f"{which} fetch_tables answered wrong rows ({setup}, batch {batch})")

                def candidate(db: Any, out: np.ndarray) -> Callable[[], Any]:
                    turn = [0]

                    def call() -> Any:
                        table_ids, keys, _ = requests[turn[0] % len(requests)]
                        turn[0] += 1
                        return db.fetch_tables(names, table_ids, keys, out, offsets)

                    return call

                timing = interleaved({"private": candidate(private, outs["private"]),
                                      "host": candidate(host, outs["host"])},
                                     spec["min_seconds"], spec["min_reps"], spec["max_seconds"])
                p, h = batch / timing["private"]["median_s"], batch / timing["host"]["median_s"]
                results.append({"setup": setup, "tables": n_tables, "batch": batch, "private_keys_per_s": p,
                                "host_keys_per_s": h, "host_vs_private": h / p, "checked_equal": True,
                                "reps": timing["private"]["reps"]})
        finally:
            private.close()
            host.close()
        del values
    return {"role": "lookup", "results": results}, []


ROLES: dict[str, Callable[[Row], tuple[Row, list[Any]]]] = {
    "fill": role_fill, "attach": role_attach, "hold": role_hold, "lookup": role_lookup}


def emit(message: Row) -> None:
    sys.stdout.write(PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


def worker_main(spec: Row) -> int:
    """Run one role; with ``hold`` keep its tiers open until stdin closes, then close them."""
    if spec["role"] != "lookup":
        retain_freed_memory()  # as the Triton backend does before it loads its tables
    if not spec.get("numpy_hugepages", True):
        getattr(np.core.multiarray, "_set_madvise_hugepage")(False)  # private arrays on 4 KiB pages, like /dev/shm
    dbs: list[Any] = []
    try:
        result, dbs = ROLES[spec["role"]](spec)
        emit(result)
        if spec.get("hold"):
            sys.stdin.read()
    finally:
        for db in dbs:
            db.close()
    emit({"closed": True})
    return 0


class Worker:
    """This script in a fresh interpreter, running one role; messages come on its stdout."""

    def __init__(self, spec: Row) -> None:
        self.spec = spec
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def message(self, timeout: float) -> Row:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(PREFIX):
                    return json.loads(text[len(PREFIX):])  # type: ignore[no-any-return]
                print(text, file=sys.stderr)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"worker {self.spec['role']} ({self.spec.get('kind', '')}) said nothing "
                                   f"for {timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise RuntimeError(f"worker {self.spec['role']} ({self.spec.get('kind', '')}) exited with "
                                       f"status {self.proc.wait()} before reporting (its stderr is above)")
                self._buffer += chunk

    def finish(self, timeout: float) -> None:
        """Let it close its tiers and exit (hold workers wait for this)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.message(timeout)
        if self.proc.wait(timeout) != 0:
            raise RuntimeError(f"worker {self.spec['role']} exited with status {self.proc.returncode}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def workers() -> Iterator[list[Worker]]:
    """Workers started in the block are killed (by their own handles) if the block fails."""
    started: list[Worker] = []
    try:
        yield started
    finally:
        for w in started:
            w.kill()


# --------------------------------------------------------------------------- parts (parent side)


def bench_fill(args: argparse.Namespace, base: Row, record: Callable[[str, Row], None]) -> None:
    for n in args.sizes:
        spec = {**base, "rows": n, "hold": False}
        need_shm = store_estimate(n, args.dim)
        free_shm = shutil.disk_usage(shm.shm_root()).free
        need_ram = max(3 * n * (8 + 4 * args.dim), int(1.2 * need_shm))  # private peak ~2.3x raw
        if need_shm > 0.9 * free_shm or need_ram > 0.9 * mem_available():
            record("fill", {"rows": n, "skipped": f"needs ~{need_ram / 2**30:.1f} GiB RAM and {need_shm / 2**30:.1f} "
                                                  f"GiB of /dev/shm ({mem_available() / 2**30:.1f} and "
                                                  f"{free_shm / 2**30:.1f} free)"})
            continue
        row: Row = {"rows": n, "raw_bytes": n * (8 + 4 * args.dim)}
        runs: dict[str, list[Row]] = {"private": [], "host": [], "attach": []}
        for rep in range(args.repeats):  # private, host, private, host, ...: best of each (shared machine)
            namespace = f"{base['namespace']}-fill{n}-{rep}"
            with workers() as started:
                started.append(Worker({**spec, "role": "fill", "kind": "private"}))
                runs["private"].append(started[-1].message(args.timeout))
                started[-1].finish(args.timeout)
                filler = Worker({**spec, "role": "fill", "kind": "host", "namespace": namespace, "hold": True})
                started.append(filler)
                runs["host"].append(filler.message(args.timeout))
                started.append(Worker({**spec, "role": "attach", "namespace": namespace}))
                runs["attach"].append(started[-1].message(args.timeout))
                started[-1].finish(args.timeout)
                filler.finish(args.timeout)  # the last user: its close removes the store
            if shm.namespace_dir(namespace).exists():
                raise AssertionError(f"{shm.namespace_dir(namespace)} outlived its last user")
        row["private"] = max(runs["private"], key=lambda r: r["rows_per_s"])
        row["host"] = max(runs["host"], key=lambda r: r["rows_per_s"])
        row["attach"] = min(runs["attach"], key=lambda r: r["attach_s"])
        row["runs"] = runs
        record("fill", row)
        p, h, a = row["private"], row["host"], row["attach"]
        print(f"  {n:>11,} rows: private {p['rows_per_s'] / 1e6:.2f} M rows/s peak {p['peak_rss'] / MIB:,.0f} MiB; "
              f"host {h['rows_per_s'] / 1e6:.2f} M rows/s peak {h['peak_rss'] / MIB:,.0f} MiB store "
              f"{h['store_bytes'] / MIB:,.0f} MiB; attach {a['attach_s']:.3f} s", flush=True)


def bench_pss(args: argparse.Namespace, base: Row, record: Callable[[str, Row], None]) -> None:
    for kind in ("bare", "private", "host"):
        one = 0
        for count in args.procs:
            spec = {**base, "role": "hold", "kind": kind, "rows": args.pss_rows, "hold": True,
                    "namespace": f"{base['namespace']}-pss-{kind}{count}"}
            with workers() as started:
                loads = []
                for _ in range(count):  # one after another: the first host process fills, the others attach
                    started.append(Worker(spec))
                    loads.append(started[-1].message(args.timeout))
                memory = [smaps_rollup(w.pid) for w in started]
                for w in started:
                    w.finish(args.timeout)
            row = {"kind": kind, "processes": count, "rows": args.pss_rows if kind != "bare" else 0,
                   **{f"{k.lower()}_sum": sum(m.get(k, 0) for m in memory)
                      for k in ("Pss", "Rss", "Pss_Anon", "Pss_File", "Pss_Shmem")},
                   "filled_by": sum(1 for x in loads if x.get("written"))}
            one = one or row["pss_sum"]  # args.procs starts with 1
            row["pss_vs_one"] = row["pss_sum"] / one
            record("pss", row)
            print(f"  {kind:>7} x{count}: PSS {row['pss_sum'] / MIB:,.0f} MiB", flush=True)


def bench_lookup_speed(args: argparse.Namespace, base: Row, record: Callable[[str, Row], None]) -> None:
    spec = {**base, "role": "lookup", "tables": args.lookup_tables, "table_rows": args.lookup_rows,
            "batches": args.batches, "request_sets": 3, "min_seconds": args.min_seconds,
            "min_reps": args.min_reps, "max_seconds": 20.0, "seed": args.seed}
    with workers() as started:
        started.append(Worker(spec))
        got = started[-1].message(args.timeout)
        started[-1].finish(args.timeout)
    for row in got["results"]:
        record("lookup", row)
        print(f"  {row['setup']}, batch {row['batch']:,}: host/private {row['host_vs_private']:.2f}", flush=True)


# --------------------------------------------------------------------------- report


def _mib(value: float) -> str:
    return f"{value / MIB:,.0f}"


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def report(results: dict[str, list[Row]], args: argparse.Namespace, info: Row, command: str) -> str:
    out = [f"# Host store benchmark (issue 18)", "",
           f"- command: `{command}`",
           f"- machine: {info['cpu']}, {info['cpus']} CPUs, {mem_available_total() / 2**30:.0f} GiB RAM, "
           f"{info['platform']}, Python {info['python']}, numpy {info['numpy']}",
           f"- tables: dim {args.dim}, fp32, `volatile_db` defaults ({args.num_partitions} partitions); every "
           "number below from this run",
           f"- pages: stores in {pages_text()}; numpy's huge-page madvise of large arrays (the private map's): "
           f"{args.numpy_hugepages}", ""]
    fills = [r for r in results.get("fill", []) if "skipped" not in r]
    if "fill" in results:
        out += ["## Fill and attach", "",
                f"One fresh process per cell, best of {args.repeats} run(s) alternating private and host (peak RSS = "
                "the best run's VmHWM); `load_table(db, table, rows=n)` from one "
                "HugeCTR sparse folder; numba kernels warmed in each process on a 1,000-row table and the file "
                "read once before the timed load (rates exclude both). Raw = n x (8 + 4 x dim) bytes; peak-base "
                "= peak RSS minus the RSS just before the load (interpreter, numpy, numba, warm-up).", ""]
        header = ["rows", "raw MiB", "read alone M rows/s", "private M rows/s", "private peak RSS MiB",
                  "private peak / raw", "host M rows/s", "host / private", "host peak RSS MiB", "store MiB",
                  "host peak / store", "host (peak-base) / store", "attach s", "rows checked"]
        rows = []
        for r in results["fill"]:
            if "skipped" in r:
                rows.append([f"{r['rows']:,}", "skipped: " + r["skipped"], *[""] * (len(header) - 2)])
                continue
            p, h, a = r["private"], r["host"], r["attach"]
            rows.append([
                f"{r['rows']:,}", _mib(r["raw_bytes"]), f"{r['rows'] / h['read_alone_s'] / 1e6:.1f}",
                f"{p['rows_per_s'] / 1e6:.2f}", _mib(p["peak_rss"]), f"{p['peak_rss'] / r['raw_bytes']:.2f}",
                f"{h['rows_per_s'] / 1e6:.2f}", f"{h['rows_per_s'] / p['rows_per_s']:.2f}", _mib(h["peak_rss"]),
                _mib(h["store_bytes"]), f"{h['peak_rss'] / h['store_bytes']:.2f}",
                f"{(h['peak_rss'] - h['rss_before']) / h['store_bytes']:.2f}", f"{a['attach_s']:.3f}",
                f"{p['checked_rows']:,} / {h['checked_rows']:,} / {a['checked_rows']:,}"])
        out += [markdown(header, rows), "",
                "rows checked: sampled rows looked up and compared with the file by the private filler / the "
                "host filler / the attaching process (and 100 keys past the loaded rows found absent).", ""]
        if fills:
            out += ["Where the fill's time goes (seconds, wrapped in the worker):", ""]
            header = ["rows", "private: reads", "private: insert + rest", "host: reads", "host: create file",
                      "host: `_fill` kernels (threads)", "host: rest", "host total", "kernel alone M rows/s"]
            rows = []
            for r in fills:
                p, h = r["private"], r["host"]
                hp = h["parts_s"]
                rest = h["fill_s"] - hp["stream_table"] - hp["_create"] - hp["_fill_chunk"]
                rows.append([f"{r['rows']:,}", f"{p['parts_s']['stream_table']:.2f}",
                             f"{p['fill_s'] - p['parts_s']['stream_table']:.2f}", f"{hp['stream_table']:.2f}",
                             f"{hp['_create']:.2f}", f"{hp['_fill_chunk']:.2f}", f"{rest:.2f}", f"{h['fill_s']:.2f}",
                             f"{r['rows'] / hp['_fill_chunk'] / 1e6:.1f}"])
            out += [markdown(header, rows), ""]
            targets = (
                (f"host fill >= {TARGET_FILL / 1e6:.0f} M rows/s", lambda r: r["host"]["rows_per_s"] >= TARGET_FILL),
                (f"host peak RSS <= {TARGET_RSS}x store bytes (whole process)",
                 lambda r: r["host"]["peak_rss"] <= TARGET_RSS * r["host"]["store_bytes"]),
                (f"attach <= {TARGET_ATTACH:.0f} s", lambda r: r["attach"]["attach_s"] <= TARGET_ATTACH),
            )
            out += ["Targets:", ""]
            for label, met in targets:
                missed = [f"{r['rows']:,}" for r in fills if not met(r)]
                verdict = f"**missed** at {', '.join(missed)} rows" if missed else "met at every size"
                out.append(f"- {label}: {verdict}")
            out.append("")
    if "pss" in results:
        out += ["## Memory with N processes", "",
                f"Plain Python processes (not Triton), each holding one {args.pss_rows:,}-row dim-{args.dim} table "
                "(`load_table`, then every row looked up once) until all N are measured; the host store is filled "
                "by the first and attached by the others. PSS = sum of `Pss` in /proc/PID/smaps_rollup over the N "
                "processes; ratio = PSS(N) / PSS(1) of the same kind. bare = processes with hps_core imported and "
                "the kernels warmed, no table (the interpreter's share).", ""]
        header = ["kind", "processes", "PSS MiB", "PSS / process MiB", "PSS(N) / PSS(1)", "of which shmem MiB",
                  "anon MiB", "RSS sum MiB"]
        rows = [[KIND_LABEL[r["kind"]], str(r["processes"]), _mib(r["pss_sum"]), _mib(r["pss_sum"] / r["processes"]),
                 f"{r['pss_vs_one']:.2f}", _mib(r["pss_shmem_sum"]),
                 _mib(r["pss_anon_sum"]), _mib(r["rss_sum"])] for r in results["pss"]]
        out += [markdown(header, rows), ""]
    if "lookup" in results:
        out += ["## Lookup speed", "",
                "`fetch_tables` keys/s in one process, private map and host store interleaved (medians of "
                f">= {args.min_reps} reps, >= {args.min_seconds} s each), keys drawn uniformly from the stored rows, "
                "table-major; answers checked equal to the stored rows.", ""]
        header = ["setup", "batch", "private keys/s", "host keys/s", "host / private"]
        rows = [[r["setup"], f"{r['batch']:,}", f"{r['private_keys_per_s']:,.0f}", f"{r['host_keys_per_s']:,.0f}",
                 f"{r['host_vs_private']:.2f}"] for r in results["lookup"]]
        out += [markdown(header, rows), ""]
    return "\n".join(out)


def pages_text() -> str:
    """Where the stores live and what pages they get: the mount and transparent huge pages."""
    root = shm.shm_root()
    mount = max((line.split() for line in Path("/proc/mounts").read_text().splitlines()
                 if root.resolve().as_posix().startswith(line.split()[1])), key=lambda f: len(f[1]), default=None)
    where = f"{root} ({mount[2]}, {mount[3]})" if mount else str(root)

    def thp(name: str) -> str:
        with contextlib.suppress(OSError):
            text = Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text()
            return text[text.index("[") + 1 : text.index("]")] if "[" in text else text.strip()
        return "unknown"

    return f"{where}; transparent huge pages: anonymous {thp('enabled')}, shmem {thp('shmem_enabled')}"


def mem_available_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- main


def _count(text: str) -> int:
    """``1M``, ``500k``, ``2_000_000`` -> rows."""
    text = text.strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=["fill", "pss", "lookup"], default=["fill", "pss", "lookup"])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (small tables, short timing)")
    p.add_argument("--sizes", type=_count, nargs="+", default=None,
                   help="fill: rows per table (default 1M 4M 16M 32M, sizes that do not fit this machine's "
                        "RAM or /dev/shm skipped; quick 20k)")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None,
                   help="fill: runs per size, private and host alternating; the best of each is reported (2; quick 1)")
    p.add_argument("--sample", type=int, default=None, help="rows checked per fill/attach (10,000; quick 500)")
    p.add_argument("--procs", type=int, nargs="+", default=None, help="pss: process counts (1 2 4; quick 1 2)")
    p.add_argument("--pss-rows", type=_count, default=None, help="pss: rows of the table (2M; quick 20k)")
    p.add_argument("--lookup-tables", type=int, default=26)
    p.add_argument("--lookup-rows", type=_count, default=None, help="lookup: rows per table (100k; quick 2k)")
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 16384])
    p.add_argument("--min-seconds", type=float, default=None,
                   help="lookup: timed seconds per candidate (0.5; quick 0.02)")
    p.add_argument("--min-reps", type=int, default=None, help="lookup: repetitions per candidate (30; quick 5)")
    p.add_argument("--numpy-hugepages", choices=["on", "off"], default="on",
                   help="off: workers turn numpy's madvise(MADV_HUGEPAGE) of large arrays off, so the private "
                        "map's arrays sit on 4 KiB pages like a /dev/shm mapping (where transparent huge pages "
                        "for shmem are off, the kernel's default); on: numpy's default")
    p.add_argument("--data", type=Path, default=None,
                   help="folder for the sparse files (kept and reused; default: a temporary folder under "
                        "$TMPDIR, removed at the end)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a worker may stay silent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report to this file")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to DIR/bench_host_store_<time>.json")
    args = p.parse_args(None if argv is None else [str(a) for a in argv])
    q = args.quick

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if q else full)

    args.sizes = pick(args.sizes, [1_000_000, 4_000_000, 16_000_000, 32_000_000], [20_000])
    args.sample = pick(args.sample, 10_000, 500)
    args.repeats = max(1, pick(args.repeats, 2, 1))
    args.procs = pick(args.procs, [1, 2, 4], [1, 2])
    args.pss_rows = pick(args.pss_rows, 2_000_000, 20_000)
    args.lookup_rows = pick(args.lookup_rows, 100_000, 2_000)
    args.min_seconds = pick(args.min_seconds, 0.5, 0.02)
    args.min_reps = pick(args.min_reps, 30, 5)
    args.num_partitions = VolatileDBConfig().num_partitions
    args.procs = sorted({1, *args.procs})  # the ratios are to one process
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker_main(json.loads(sys.argv[2]))
    args = parse_args(argv)
    command = command_line(".venv/bin/python scripts/bench_host_store.py", argv)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cpus']} CPUs, {info['platform']}, numpy {info['numpy']}")
    print(f"command: {command}", flush=True)
    namespace = f"bench-host-store-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    results: dict[str, list[Row]] = {part: [] for part in args.parts}
    errors: list[str] = []

    def record(part: str, row: Row) -> None:
        results[part].append(row)

    scratch = None if args.data else tempfile.mkdtemp(prefix="bench_host_store_")
    data = args.data or Path(scratch)  # type: ignore[arg-type]
    try:
        data.mkdir(parents=True, exist_ok=True)
        folder, warm = data / f"table-d{args.dim}", data / f"warm-d{args.dim}"
        rows_needed = max([*(args.sizes if "fill" in args.parts else []),
                           args.pss_rows if "pss" in args.parts else 0]) + 100  # + keys checked absent
        started = time.perf_counter()
        write_table(folder, rows_needed, args.dim, args.seed)  # lookup makes its rows in its worker
        write_table(warm, WARM_ROWS, args.dim, args.seed + 1)
        print(f"[data: {rows_needed:,} rows in {folder} ({time.perf_counter() - started:.1f} s)]", flush=True)
        base = {"dim": args.dim, "folder": str(folder), "warm_folder": str(warm), "namespace": namespace,
                "sample": args.sample, "numpy_hugepages": args.numpy_hugepages == "on"}
        for part, run in (("fill", bench_fill), ("pss", bench_pss), ("lookup", bench_lookup_speed)):
            if part not in args.parts:
                continue
            started = time.perf_counter()
            print(f"[{part}]", flush=True)
            try:
                run(args, base, record)
            except Exception as exc:  # noqa: BLE001 - recorded; the other parts still run
                traceback.print_exc()
                errors.append(f"{part}: {type(exc).__name__}: {exc}")
            print(f"[{part}: {time.perf_counter() - started:.1f} s]", flush=True)
    finally:
        for left in shm.shm_root().glob(f"{shm.namespace_dir(namespace).name}*"):
            print(f"removing {left}, which a failed worker left behind", file=sys.stderr)
            shutil.rmtree(left, ignore_errors=True)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    text = report(results, args, info, command)
    if errors:
        text += "\n## Failed parts\n\n" + "\n".join(f"- {e}" for e in errors) + "\n"
    print()
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    if args.json:
        write_report("bench_host_store", argv, str(args.json), machine=info, command_line=command,
                     args={k: v if isinstance(v, (int, float, str, list)) else str(v) for k, v in vars(args).items()},
                     results=results, errors=errors)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
