#!/usr/bin/env python3
"""What ``hps serve``'s HTTP guard (hps_core/http_guard.py) costs: HTTP latency through it vs
straight to Triton, side by side in one run, on the demo's ``dlrm`` ensemble.

One Triton (the demo repository, ``hps_demo``'s request of ``--batch`` samples) and one guard in
front of it, in this process as ``hps serve`` runs it. The real ``tritonclient.http`` client
sends sequential requests with binary tensors (``binary_data=True``, the rows the issue's
target is about) and, for information, as JSON ``data`` (the guard parses the whole body
then). The two paths alternate in ``--rounds`` rounds of ``--requests`` requests each, so
drift on a busy machine hits both alike; p50/p99 are over all rounds. With
``--perf-analyzer``, perf_analyzer ``-i http`` runs against both too (concurrency 1 and 2).
The demo's data must exist first (``.venv/bin/python -m hps_demo --samples 20000``). Run
from the repository root::

    .venv/bin/python scripts/bench_http_guard.py --rounds 6 --requests 300 --perf-analyzer
"""

from __future__ import annotations

import argparse
import csv
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hps_core.config import load_config  # noqa: E402 - after the sys.path entry above
from hps_core.http_guard import HttpGuard  # noqa: E402
from hps_core.serving import TritonServer  # noqa: E402
from hps_demo.bench.harness import command_line  # noqa: E402
from hps_demo.client import dlrm_request, write_perf_analyzer_data  # noqa: E402
from hps_demo.tools import find_perf_analyzer  # noqa: E402

ENSEMBLE = "dlrm"
EMBEDDING = "hps_embedding"


def _request(repository: Path, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    model = load_config(repository / EMBEDDING / "hps.json").model(EMBEDDING)
    missing = [t.sparse_file for t in model.tables if not Path(t.sparse_file).exists()]
    if missing:
        raise SystemExit(f"the demo's tables are missing ({missing[0]}, ...): "
                         f"run .venv/bin/python -m hps_demo --samples 20000 first")
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 1000, size=(batch, len(model.tables)), dtype=np.int64)
    dense = rng.random((batch, 13), dtype=np.float32)
    return dlrm_request(keys, dense).as_dict()


def _sender(url: str, request: dict[str, np.ndarray], binary: bool) -> Callable[[], object]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=url)
    tensors = []
    for name, array in request.items():
        tensor = httpclient.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else
                                       "INT32" if array.dtype == np.int32 else "FP32")
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    outputs = [httpclient.InferRequestedOutput("SCORE", binary_data=binary)]

    def send() -> object:
        return client.infer(ENSEMBLE, tensors, outputs=outputs).as_numpy("SCORE")

    return send


def _timed(send: Callable[[], object], count: int) -> np.ndarray:
    seconds = np.empty(count)
    for i in range(count):
        start = time.perf_counter()
        send()
        seconds[i] = time.perf_counter() - start
    return seconds * 1e3


def _latency(urls: dict[str, str], request: dict[str, np.ndarray], binary: bool, rounds: int,
             count: int) -> dict[str, np.ndarray]:
    senders = {path: _sender(url, request, binary) for path, url in urls.items()}
    answers = {path: np.asarray(send()) for path, send in senders.items()}
    if not np.array_equal(answers["direct"], answers["guard"]):
        raise SystemExit("the guard's answer differs from Triton's")
    for send in senders.values():
        _timed(send, 20)  # warm-up
    times: dict[str, list[np.ndarray]] = {path: [] for path in urls}
    for r in range(rounds):
        order = list(urls) if r % 2 == 0 else list(reversed(urls))
        for path in order:
            times[path].append(_timed(senders[path], count))
    return {path: np.concatenate(t) for path, t in times.items()}


def _perf_analyzer(url: str, data: Path, csv_path: Path) -> list[dict[str, float]]:
    tool = find_perf_analyzer()
    command = [str(tool.path), "-m", ENSEMBLE, "-u", url, "-i", "http", "--input-data", str(data),
               "--concurrency-range", "1:2", "--measurement-interval", "3000", "-s", "25", "-p", "3000",
               "--max-trials", "10", "-f", str(csv_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=tool.environment())
    if result.returncode != 0:
        raise SystemExit(f"perf_analyzer failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    with open(csv_path) as handle:
        return [{"concurrency": float(row["Concurrency"]), "p50_ms": float(row["p50 latency"]) / 1e3,
                 "throughput": float(row["Inferences/Second"])} for row in csv.DictReader(handle)]


def _row(label: str, direct: float, guard: float) -> str:
    return f"| {label} | {direct:.3f} | {guard:.3f} | {guard / direct:.3f} | {100 * (guard / direct - 1):+.1f}% |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=REPO / "model_repository")
    parser.add_argument("--batch", type=int, default=64, help="samples per request (the demo's default)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=300, help="timed requests per path and round")
    parser.add_argument("--perf-analyzer", action="store_true", help="also perf_analyzer -i http, both paths")
    parser.add_argument("--no-json", action="store_true", help="skip the JSON-data rows")
    args = parser.parse_args(argv)
    repository = args.model_repository.resolve()
    request = _request(repository, args.batch)
    command = "$ " + command_line(".venv/bin/python scripts/bench_http_guard.py", argv)
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0) as server, \
            HttpGuard("127.0.0.1", 0, lambda: server.http_url) as guard:
        urls = {"direct": server.http_url, "guard": guard.url}
        rows = []
        kinds = [("binary tensors", True)] + ([] if args.no_json else [("JSON data", False)])
        for label, binary in kinds:
            ms = _latency(urls, request, binary, args.rounds, args.requests)
            for stat, fn in (("p50", np.median), ("p99", lambda a: np.percentile(a, 99)), ("mean", np.mean)):
                rows.append(_row(f"{label}, {stat} ms", float(fn(ms["direct"])), float(fn(ms["guard"]))))
        if args.perf_analyzer:
            with tempfile.TemporaryDirectory() as work:
                data = write_perf_analyzer_data(Path(work) / "input.json", [dlrm_request(
                    request["KEYS"].reshape(-1, args.batch).T, request["DENSE"].reshape(args.batch, 13))])
                found = {path: _perf_analyzer(url, data, Path(work) / f"{path}.csv") for path, url in urls.items()}
            for direct, guarded in zip(found["direct"], found["guard"]):
                c = int(direct["concurrency"])
                rows.append(_row(f"perf_analyzer -i http c={c}, p50 ms", direct["p50_ms"], guarded["p50_ms"]))
                rows.append(_row(f"perf_analyzer -i http c={c}, infer/s", direct["throughput"], guarded["throughput"]))
        refused = guard.refused
    print(command)
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{_cpus()} CPUs, Python {platform.python_version()}; dlrm, batch {args.batch}, "
          f"{args.rounds} x {args.requests} sequential requests per path (tritonclient.http)")
    print("| what | direct to Triton | through the guard | guard / direct | added |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    if refused:
        raise SystemExit(f"the guard refused {refused} good requests")
    return 0


def _cpus() -> Any:
    import os

    return os.cpu_count()


if __name__ == "__main__":
    raise SystemExit(main())
