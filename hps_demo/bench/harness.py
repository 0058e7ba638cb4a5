"""The one benchmark harness: what a benchmark script (``scripts/bench_*.py``,
``hps_demo/bench_e2e.py``) gets here instead of writing it again.

- Where it ran: :func:`machine` (CPU model, CPU count, platform, Python, numpy) or
  :func:`machine_with_gpus` (the same without numpy, with memory and GPUs), and
  :func:`command_line`, the command that produced a report, quoted so it can be pasted back.
- How it times: :func:`interleaved` runs candidates in rounds A, B, A, B, ... and reports
  medians, so machine noise lands on every side alike; :func:`rotating` cycles one candidate
  through several request sets.
- What a server says: :func:`scrape` reads the ``hps_`` and ``nv_inference_`` series of
  Triton's ``/metrics``; :func:`metric_total` sums one series over the labels asked for.
- What it reports: :func:`percentiles_ms` and :func:`tail_percentiles_ms` (latency
  percentiles of a list of seconds), :func:`markdown` (a right-aligned markdown table) and
  :func:`write_report` (``<out>/<benchmark>_<time>.json`` with the machine, the command line
  and the results).

Timing loops that measure something else on purpose stay in their scripts: ``bench_tiers``'s
best-of keys/s rounds, ``bench_cache``'s CUDA-event medians.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np

#: One result row (a JSON object).
Row = dict[str, Any]


# --------------------------------------------------------------------------- where it ran


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where it has none)."""
    with suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def machine() -> Row:
    """cpu, cpus, platform, python and numpy of this machine."""
    return {"cpu": cpu_model() or platform.processor() or "unknown", "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__}


def machine_with_gpus() -> Row:
    """platform, python, cpus, gpus, and where known cpu, memory_gib and gpu (nvidia-smi's names)."""
    from hps_core.serving import gpu_count  # only here: the Triton launcher is not every benchmark's

    info: Row = {"platform": platform.platform(), "python": platform.python_version(),
                 "cpus": os.cpu_count(), "gpus": gpu_count()}
    cpu = cpu_model()
    if cpu is not None:
        info["cpu"] = cpu
    with suppress(Exception):
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if info["gpus"]:
        with suppress(Exception):
            info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip()
    return info


def command_line(script: str, argv: Sequence[Any] | None) -> str:
    """``script`` and its arguments (``sys.argv[1:]`` when ``argv`` is None), shell-quoted: the
    command a report names as the one that produced it."""
    words = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return " ".join([script, *map(shlex.quote, words)])


# --------------------------------------------------------------------------- timing


def interleaved(candidates: dict[str, Callable[[], Any]], min_seconds: float, min_reps: int,
                max_seconds: float) -> dict[str, Row]:
    """Median seconds of each candidate, run in rounds A, B, C, A, B, C, ... after one warm-up
    each, until every candidate has ``min_reps`` samples and ``min_seconds`` of timed work (or
    the rounds took ``max_seconds`` and every candidate has at least 3 samples)."""
    for fn in candidates.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    started = time.perf_counter()
    while True:
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        reps = len(samples[next(iter(samples))])
        enough = reps >= min_reps and all(sum(s) >= min_seconds for s in samples.values())
        if enough or (reps >= 3 and time.perf_counter() - started >= max_seconds):
            break
    return {name: {"median_s": float(np.median(s)), "reps": len(s)} for name, s in samples.items()}


def rotating(calls: list[Callable[[], Any]]) -> Callable[[], Any]:
    """One callable that runs ``calls`` in turn, one per call (the request sets of a size)."""
    turn = [0]

    def run() -> Any:
        call = calls[turn[0] % len(calls)]
        turn[0] += 1
        return call()

    return run


# --------------------------------------------------------------------------- a server's metrics


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_SERIES = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$", re.MULTILINE)
Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]  # (name, labels) → value


def scrape(url: str) -> Scrape:
    """The hps_ and nv_inference_ series of Triton's ``/metrics``."""
    text = _get(url)
    out: Scrape = {}
    for name, labels, value in _SERIES.findall(text):
        if name.startswith(("hps_", "nv_inference_")):
            out[(name, frozenset(re.findall(r'(\w+)="([^"]*)"', labels)))] = float(value)
    return out


def _get(url: str, attempts: int = 50) -> str:
    # The metrics endpoint can open a moment after the server reports ready.
    for attempt in range(attempts):
        try:
            with _OPENER.open(url, timeout=10) as response:
                return str(response.read().decode())
        except (ConnectionError, OSError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def metric_total(series: Scrape, name: str, **labels: str) -> float:
    """The sum of the series ``name`` in ``series`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and wanted <= ls)


# --------------------------------------------------------------------------- reports


def percentiles_ms(seconds: Sequence[float]) -> Row:
    """Latencies ``seconds`` in milliseconds: p50_ms, p99_ms, mean_ms and requests."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "requests": int(ms.size)}


def tail_percentiles_ms(seconds: Sequence[float]) -> Row:
    """Latencies ``seconds`` in milliseconds: p50_ms, p90_ms, p99_ms, max_ms and samples."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "max_ms": float(ms.max()),
            "samples": int(ms.size)}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, every column right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def write_report(benchmark: str, argv: list[str] | None, out: str, **fields: Any) -> Path:
    """Write ``<out>/<benchmark>_<time>.json``: the machine, the command line and ``fields``."""
    report = {"benchmark": benchmark, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
              "command": command_line(Path(sys.argv[0]).name, argv),
              **fields}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{benchmark}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return path
