#!/usr/bin/env python3
"""The served half of issue 18's benchmark: the host store against the private hash map, under
``hps serve`` (the real Triton 2.51, CPU instances, the HPS backend).

One HPS model (``hps_embedding``'s config, ``instance_group { count: N kind: KIND_CPU }``) over
one dim-32 table of ``--rows`` rows, ``volatile_db`` a hash map with ``host_shared`` true (the
host store) or false (a private map in each stub), no persistent tier. Side by side, in one run:

* **memory**: PSS of the whole server (``hps serve``, tritonserver and its stubs, summed from
  ``/proc/PID/smaps_rollup``) with 1, 2 and 4 instances, and each count's ratio to 1 instance;
* **recovery**: tritonserver SIGKILLed under ``hps serve`` with 4 instances: seconds from the
  kill until the model answers a lookup correctly again, at ``--small-rows`` and ``--rows``
  (the restart backoff, 0.2 s here, included), and their ratio (issue 18's target: <= 1.3);
* **throughput**: perf_analyzer, gRPC, concurrency 8, ``--keys`` keys per request, with 1 and 2
  instances, and the 2-instance / 1-instance ratio.

Run from the repository root (prints a markdown table; ``--out`` also writes it to a file)::

    .venv/bin/python scripts/bench_host_store_serve.py --rows 8000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hps_core.formats import write_sparse_model  # noqa: E402
from hps_demo.bench.harness import command_line  # noqa: E402
from hps_demo.client import hps_request  # noqa: E402
from hps_demo.tools import find_perf_analyzer  # noqa: E402
from tests.hps_serve import Repository, ServeProcess, wait_until  # noqa: E402

MODEL = "hps_embedding"
DIM = 32
DEADLINE_S = 600.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000, help="rows of the large table (default: %(default)s)")
    p.add_argument("--small-rows", type=int, default=20_000, help="rows of the small table for recovery")
    p.add_argument("--keys", type=int, default=256, help="keys per perf_analyzer request")
    p.add_argument("--counts", default="1,2,4", help="instance counts for the memory column")
    p.add_argument("--modes", default="host,private", help="host (the host store) and/or private")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: memory,recovery,throughput")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the repository


def _sparse(work: Path, rows: int) -> Path:
    path = work / f"table_{rows}"
    if not path.is_dir():
        rng = np.random.default_rng(rows)
        keys = np.arange(rows, dtype=np.int64)
        vectors = np.empty((rows, DIM), np.float32)
        for lo in range(0, rows, 1 << 20):  # bounded memory while writing
            hi = min(rows, lo + (1 << 20))
            vectors[lo:hi] = rng.standard_normal((hi - lo, DIM), dtype=np.float32)
        write_sparse_model(path, keys, vectors)
    return path


def _repository(work: Path, sparse: Path, count: int, host_shared: bool) -> Repository:
    root = work / f"repo_{sparse.name}_{count}_{'host' if host_shared else 'private'}"
    model = root / MODEL
    (model / "1").mkdir(parents=True, exist_ok=True)
    config = (REPO / "model_repository" / MODEL / "config.pbtxt").read_text()
    config = re.sub(r"instance_group \[.*?\n\]\n", f"instance_group [ {{ count: {count} kind: KIND_CPU }} ]\n",
                    config, flags=re.S)
    (model / "config.pbtxt").write_text(config)
    hps_json = model / "hps.json"
    hps_json.write_text(json.dumps({
        "supportlonglong": True,
        "volatile_db": {"type": "hash_map", "num_partitions": 4, "initial_cache_rate": 1.0,
                        "host_shared": host_shared},
        "models": [{
            "model": MODEL, "sparse_files": [str(sparse)], "embedding_table_names": ["table0"],
            "embedding_vecsize_per_table": [DIM], "maxnum_catfeature_query_per_table_per_sample": [1],
            "default_value_for_each_table": [0.0], "max_batch_size": 1024, "gpucache": False,
        }],
    }, indent=2))
    return Repository(root, hps_json)


# --------------------------------------------------------------------------- measurements


def _tree(pid: int) -> list[int]:
    """``pid`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def _pss_bytes(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        match = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
        total += int(match.group(1)) * 1024 if match else 0
    return total


def _lookup_ok(http: str, sparse: Path) -> bool:
    """One lookup of a few keys through HTTP answers the file's rows."""
    keys = np.array([0, 7, 12_345 % max(1, _rows_of(sparse)), _rows_of(sparse) - 1], np.int64)
    request = hps_request(keys.reshape(-1, 1))
    body = json.dumps({"inputs": [
        {"name": "KEYS", "datatype": "INT64", "shape": list(request["KEYS"].shape), "data": request["KEYS"].ravel().tolist()},
        {"name": "NUMKEYS", "datatype": "INT32", "shape": list(request["NUMKEYS"].shape),
         "data": request["NUMKEYS"].ravel().tolist()},
    ]}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(
                f"http://{http}/v2/models/{MODEL}/infer", body, {"Content-Type": "application/json"}), timeout=10) as r:
            out = json.loads(r.read())["outputs"][0]["data"]
    except (OSError, ValueError, KeyError):
        return False
    vectors = np.memmap(sparse / "emb_vector", np.float32, "r").reshape(-1, DIM)
    return bool(np.allclose(np.asarray(out, np.float32).reshape(-1, DIM), vectors[keys]))


def _rows_of(sparse: Path) -> int:
    return (sparse / "key").stat().st_size // 8


def _memory(work: Path, sparse: Path, counts: list[int], modes: list[str], log: Any) -> dict[str, dict[int, int]]:
    result: dict[str, dict[int, int]] = {}
    for mode in modes:
        for count in counts:
            with ServeProcess(_repository(work, sparse, count, mode == "host")) as serve:
                ready = serve.wait_ready(timeout=DEADLINE_S)
                assert wait_until(lambda: _lookup_ok(ready.http, sparse), DEADLINE_S)
                time.sleep(1.0)  # let the stubs' start-up garbage settle
                pss = _pss_bytes(serve.process.pid)
                result.setdefault(mode, {})[count] = pss
                log(f"memory: {mode}, {count} instance(s): PSS {pss / 2**30:.2f} GiB")
                assert serve.stop() == 0
    return result


def _recovery(work: Path, sparse: Path, mode: str, log: Any) -> float:
    """Seconds from SIGKILL of tritonserver (4 instances) until a lookup answers right again."""
    with ServeProcess(_repository(work, sparse, 4, mode == "host")) as serve:
        first = serve.wait_ready(timeout=DEADLINE_S)
        assert wait_until(lambda: _lookup_ok(first.http, sparse), DEADLINE_S)
        killed = time.monotonic()
        os.kill(first.pid, signal.SIGKILL)
        second = serve.wait_ready(2, timeout=DEADLINE_S)
        assert wait_until(lambda: _lookup_ok(second.http, sparse), DEADLINE_S, interval=0.02)
        seconds = time.monotonic() - killed
        log(f"recovery: {mode}, {_rows_of(sparse):,} rows: {seconds:.2f} s")
        assert serve.stop() == 0
    return seconds


def _cpu_seconds(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) each of ``pids`` used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used[pid] = (int(fields[11]) + int(fields[12])) / tick
    return used


def _throughput(work: Path, sparse: Path, count: int, mode: str, keys: int, log: Any) -> tuple[float, dict[str, float]]:
    """perf_analyzer's requests/s, and where the cores went meanwhile (share of the machine's
    CPU time: tritonserver, its stubs, perf_analyzer)."""
    tool = find_perf_analyzer()
    data = work / f"perf_input_{keys}.json"
    rng = np.random.default_rng(5)
    requests = [hps_request(rng.integers(0, _rows_of(sparse), (keys, 1))) for _ in range(4)]
    data.write_text(json.dumps({"data": [{k: {"content": v.ravel().tolist(), "shape": [v.shape[-1]]}
                                          for k, v in r.items()} for r in requests]}))
    with ServeProcess(_repository(work, sparse, count, mode == "host")) as serve:
        ready = serve.wait_ready(timeout=DEADLINE_S)
        assert wait_until(lambda: _lookup_ok(ready.http, sparse), DEADLINE_S)
        cmd = [str(tool.path), "-m", MODEL, "-u", ready.grpc, "-i", "grpc", "--input-data", str(data),
               "--concurrency-range", "8", "-p", "4000", "-s", "25", "--max-trials", "5"]
        server = _tree(ready.pid)
        before, children, started = _cpu_seconds(server), os.times(), time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, env=tool.environment(),
                              timeout=DEADLINE_S)
        wall, after, children_after = time.monotonic() - started, _cpu_seconds(server), os.times()
        machine = wall * (os.cpu_count() or 1)
        stubs = sum(after[p] - before.get(p, 0.0) for p in after if p != ready.pid)
        cpu = {"tritonserver": (after.get(ready.pid, 0.0) - before.get(ready.pid, 0.0)) / machine,
               "stubs": stubs / machine,
               "perf_analyzer": (children_after.children_user + children_after.children_system
                                 - children.children_user - children.children_system) / machine}
        found = re.findall(r"throughput: ([\d.]+) infer/sec", done.stdout)
        if not found:
            raise RuntimeError(f"perf_analyzer failed:\n{done.stdout}\n{done.stderr}")
        assert serve.stop() == 0
    rate = float(found[-1])
    log(f"throughput: {mode}, {count} instance(s): {rate:.0f} requests/s of {keys} keys; CPU "
        + ", ".join(f"{k} {v:.0%}" for k, v in cpu.items()))
    return rate, cpu


# --------------------------------------------------------------------------- report


def _table(args: argparse.Namespace, memory: dict[str, dict[int, int]], recovery: dict[str, dict[int, float]],
           throughput: dict[str, dict[int, tuple[float, dict[str, float]]]]) -> str:
    lines = [f"`{command_line('scripts/bench_host_store_serve.py', None)}` — {platform.node()}, "
             f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
             "hps serve, real Triton 2.51, CPU instances, one dim-32 fp32 table", ""]
    if memory:
        counts = sorted({c for m in memory.values() for c in m})
        lines += [f"PSS of the whole server ({args.rows:,} rows)", "",
                  "| volatile tier | " + " | ".join(f"{c} instance(s)" for c in counts) + " |",
                  "|---|" + "---|" * len(counts)]
        for mode, by_count in memory.items():
            base = by_count.get(1)
            cells = [f"{by_count[c] / 2**30:.2f} GiB" + (f" ({by_count[c] / base:.2f}x)" if base else "") for c in counts]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    if recovery:
        lines += ["Recovery after SIGKILL of tritonserver, 4 instances (s from the kill to a right answer)", "",
                  f"| volatile tier | {args.small_rows:,} rows | {args.rows:,} rows | ratio |", "|---|---|---|---|"]
        for mode, by_rows in recovery.items():
            small, large = by_rows[args.small_rows], by_rows[args.rows]
            lines.append(f"| {mode} | {small:.2f} | {large:.2f} | {large / small:.2f}x |")
        lines.append("")
    if throughput:
        lines += [f"perf_analyzer gRPC, concurrency 8, {args.keys} keys per request ({args.rows:,} rows; requests/s)", "",
                  "| volatile tier | 1 instance | 2 instances | ratio | machine's CPU, 1 instance: triton / stubs / "
                  "perf_analyzer | 2 instances |", "|---|---|---|---|---|---|"]
        for mode, by_count in throughput.items():
            (one, cpu1), (two, cpu2) = by_count[1], by_count[2]
            share = lambda c: " / ".join(f"{c[k]:.0%}" for k in ("tritonserver", "stubs", "perf_analyzer"))  # noqa: E731
            lines.append(f"| {mode} | {one:.0f} | {two:.0f} | {two / one:.2f}x | {share(cpu1)} | {share(cpu2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    modes = [m for m in args.modes.split(",") if m]
    skip = set(args.skip.split(","))
    counts = [int(c) for c in args.counts.split(",")]
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bench-host-store-serve-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        large = _sparse(work, args.rows)
        memory = {} if "memory" in skip else _memory(work, large, counts, modes, log)
        recovery: dict[str, dict[int, float]] = {}
        if "recovery" not in skip:
            small = _sparse(work, args.small_rows)
            for mode in modes:
                recovery[mode] = {args.small_rows: _recovery(work, small, mode, log),
                                  args.rows: _recovery(work, large, mode, log)}
        throughput: dict[str, dict[int, tuple[float, dict[str, float]]]] = {}
        if "throughput" not in skip:
            for mode in modes:
                throughput[mode] = {c: _throughput(work, large, c, mode, args.keys, log) for c in (1, 2)}
    table = _table(args, memory, recovery, throughput)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
