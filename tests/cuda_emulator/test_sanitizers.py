"""The emulated kernels under AddressSanitizer and ThreadSanitizer (issue 20, deliverable 4).

Each run is a Python process of its own (sanitizer_workload.py) with the kernels built by
g++ with -fsanitize=address or -fsanitize=thread (HPS_EMU_SANITIZER) and the tool's runtime
LD_PRELOADed, which an uninstrumented interpreter needs: this pytest process never loads an
instrumented library. Per tool:

* the canaries: the tool still sees through the emulator's fibers (two warps of one block
  and two blocks racing on a word are data races, lanes ordered by __syncwarp and warps by
  __syncthreads are not; a write before its allocation is a heap-buffer-overflow);
* a dynamic cache (LRU, fp32/fp16/int8 tables, constant eviction) and a static table
  (fp16/fp8/fp32) hammered by two writer threads (replace, update; sizes, dump and clear of
  a table now and then) and two reader threads at once: no report at all, and every hit
  one row stored under its own key.

The races the kernels have by design (seqlocked keys and rows, LRU/LFU metadata) are
common.cuh's hps_racy_* accesses, relaxed atomics in the emulator: no suppression list.
How the fibers are annotated: cuda_shim.h, "Sanitizers". Results: docs/gpu_check.md.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPILER = os.environ.get("HPS_EMU_CXX", "g++")
RUNTIMES = {"address": "libasan.so", "thread": "libtsan.so"}
OPTIONS = {
    # Python's own allocations are never freed at exit: leaks are not the question here
    "address": ("ASAN_OPTIONS", "detect_leaks=0:detect_stack_use_after_return=0"),
    # every report, not the first only; exit status 66 when there was one
    "thread": ("TSAN_OPTIONS", "halt_on_error=0:report_signal_unsafe=0:history_size=2:exitcode=66"),
}
#: rounds of the workload per thread, each run about 3 s (ASan) and 15 s (TSan, whose vector
#: clocks grow with the CUDA threads it has seen: every fiber is one) on 2 cores
ROUNDS = {"address": 24, "thread": 4}
REPORT = re.compile(r"ERROR: AddressSanitizer|WARNING: ThreadSanitizer|ThreadSanitizer: .*ignores enabled")


def runtime(sanitizer: str) -> str | None:
    """The runtime library of ``sanitizer`` that g++ links, or None without one."""
    if shutil.which(COMPILER) is None:
        return None
    out = subprocess.run([COMPILER, f"-print-file-name={RUNTIMES[sanitizer]}"], capture_output=True, text=True)
    path = Path(out.stdout.strip())
    return str(path.resolve()) if path.is_absolute() and path.exists() else None


def run(sanitizer: str, *args: str, preload: bool = True, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HPS_EMULATED_GPU", "LD_PRELOAD")}
    env["HPS_EMU_SANITIZER"] = sanitizer
    env["HPS_EMU_THREADS"] = "2"  # 2 host threads per launch: TSan's clocks grow with its threads
    name, value = OPTIONS[sanitizer]
    env[name] = value
    if preload:
        lib = runtime(sanitizer)
        assert lib is not None
        env["LD_PRELOAD"] = lib
    return subprocess.run([sys.executable, "-m", "tests.cuda_emulator.sanitizer_workload", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def needs(sanitizer: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(runtime(sanitizer) is None, reason=f"{COMPILER} has no {RUNTIMES[sanitizer]}")


SANITIZERS = [pytest.param(s, marks=needs(s)) for s in ("address", "thread")]


@pytest.fixture(scope="module", autouse=True)
def builds() -> None:
    """Both tools' modules compiled at once (cached by source hash: later runs skip this)."""
    procs = [subprocess.Popen([sys.executable, "-m", "tests.cuda_emulator.sanitizer_workload", "build"], cwd=ROOT,
                              env={**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
                                   "HPS_EMU_SANITIZER": s}, stderr=subprocess.PIPE, text=True)
             for s in RUNTIMES if runtime(s) is not None]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-5000:]


def segments(stderr: str) -> dict[str, str]:
    """The canary run's stderr, by the kernel each part followed."""
    parts = re.split(r"^== canary (\w+)$", stderr, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_the_tools_see_through_the_fibers(sanitizer: str) -> None:
    proc = run(sanitizer, "canary")
    seen = segments(proc.stderr)
    assert not REPORT.search(seen.get("lanes_synced", "missing")), proc.stderr[-5000:]
    assert not REPORT.search(seen.get("block_synced", "missing")), proc.stderr[-5000:]
    if sanitizer == "thread":
        assert "WARNING: ThreadSanitizer: data race" in seen.get("warps_race", ""), proc.stderr[-5000:]
        assert "WARNING: ThreadSanitizer: data race" in seen.get("blocks_race", ""), proc.stderr[-5000:]
    else:
        assert not REPORT.search(seen["warps_race"] + seen["blocks_race"]), proc.stderr[-5000:]
        assert "ERROR: AddressSanitizer: heap-buffer-overflow" in seen.get("write_at", ""), proc.stderr[-5000:]
        assert proc.returncode != 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_concurrent_cache_calls_are_clean(sanitizer: str, kind: str) -> None:
    rounds = ROUNDS[sanitizer]
    proc = run(sanitizer, kind, str(rounds))
    assert proc.returncode == 0 and not REPORT.search(proc.stderr), proc.stderr[-20000:]
    assert f"{kind}: {rounds} rounds, 0 wrong rows" in proc.stderr
