#!/usr/bin/env bash
# The GPU check of issue 9: ONE command, run from the repository root on a machine with a GPU
# (the device tool's H200; docs/gpu_check.md), in under 8 minutes:
#
#   setup         nvidia-smi, the carried wheels (.gpu_pack/wheels, made here by
#                 scripts/pack_gpu_check.sh) installed into /tmp, imports, a CuPy kernel launch,
#                 the carried Triton bundle (.gpu_pack/triton.tar.xz) unpacked
#   pytest_gpu    pytest -m gpu over every test file that marks GPU tests (caches, conformance,
#                 multi-table structure, LookupSession with a GPU cache, the GPU cache shared by
#                 processes through CUDA IPC: test_shared_gpu_cache.py)
#   bench_cache   scripts/bench_cache.py --device gpu, sized down: all-hit query vs the float4
#                 gather at batches 1,024 to 1,048,576, dims 32 and 128, one-table and 26-table caches
#   bench_lookup  scripts/bench_lookup.py --device gpu: the lookup on the GPU cache vs the device
#                 gather, 26 tables vs 1 table, launches and syncs per lookup
#   bench_e2e     scripts/bench_e2e.py, GPU path then CPU path, small (only with the Triton bundle
#                 and a libpython3.12 for its stub)
#   kernels       tests/hps_core/cache/test_kernels_compile.py (nvcc; CI runs it too)
#   pytest_cpu    the CPU tests of the same files (CI runs them too)
#
# Steps run in that order, each under `timeout`, within one budget (GPU_CHECK_BUDGET_S, default
# 470 s): a step that fails or times out does not stop the others, a step with too little time
# left is skipped. Logs go to $OUT (the device tool's folder; work/gpu_check/out when unset):
# setup.log pytest.log kernels.log bench_cache.log bench_lookup.log bench_e2e.log summary.md
# results.tar.gz (junit XML, the benchmarks' results.json and plots). The summary table is
# printed last.
#
#   bash scripts/gpu_check.sh              # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run    # here, without a GPU: CPU sizes, the CPU twin cache;
#                                          # checks the plumbing and the summary, measures nothing
# Environment: PYTHON (interpreter, default python3; .venv/bin/python in a dry run),
# GPU_CHECK_BUDGET_S, GPU_CHECK_XDIST (pytest workers for pytest_gpu, default 4; 0: none),
# GPU_CHECK_E2E (0: skip bench_e2e; 1: run it in a dry run too), GPU_CHECK_E2E_ARGS.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-470}
RESERVE=12   # seconds kept for the summary and the archive
MIN_STEP=25  # a step is not started with less than this left
OUT="${OUT:-$ROOT/work/gpu_check/out}"
if [[ $DRY == 1 ]]; then WORK="$ROOT/work/gpu_check/work"; else WORK="${GPU_CHECK_WORK:-/tmp/gpu_check}"; fi
SITE="$WORK/site"
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
for f in setup.log pytest.log kernels.log bench_cache.log bench_lookup.log bench_e2e.log summary.md results.tar.gz; do
    rm -f "$OUT/$f"  # a previous run's (the device tool empties $OUT itself)
done
STATUS="$WORK/status.tsv"
: > "$STATUS"
PY="${PYTHON:-python3}"
if [[ $DRY == 1 && -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg

elapsed() { echo $((SECONDS - START)); }
say() { printf '[gpu_check %3ss] %s\n' "$(elapsed)" "$*"; }
note() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STATUS"; }  # step, rc|skipped, seconds, note

# run_step NAME LOG CAP_S NOTE -- COMMAND...: the command under timeout (the smaller of CAP_S and
# what the budget has left), output appended to $OUT/LOG, one status line. Not started with
# less than STEP_MIN (default MIN_STEP) seconds left.
run_step() {
    local name="$1" log="$2" cap="$3" what="$4"
    shift 5
    local left=$((BUDGET - $(elapsed) - RESERVE))
    if (( left < ${STEP_MIN:-$MIN_STEP} )); then
        say "$name: skipped, ${left}s of the budget left"
        note "$name" skipped 0 "no time left (budget ${BUDGET}s)"
        return
    fi
    local limit=$(( cap < left ? cap : left ))
    say "$name: start (limit ${limit}s) -> $log"
    local t0=$SECONDS
    { printf '\n== %s: %s\n== limit %ss, at %ss of the run\n' "$name" "$*" "$limit" "$(elapsed)"
      timeout -k 10 "$limit" "$@"; } >> "$OUT/$log" 2>&1
    local rc=$?
    local took=$((SECONDS - t0))
    say "$name: rc $rc after ${took}s"
    note "$name" "$rc" "$took" "${what:-limit ${limit}s}"
}

# --------------------------------------------------------------------------- setup
SETUP="$OUT/setup.log"
: > "$SETUP"
HAVE_GPU=0
TRITON_OK=0
TRITON_WHY="no .gpu_pack/triton.tar.xz"
t_setup=$SECONDS
say "setup -> setup.log"
{
    echo "== gpu_check $( [[ $DRY == 1 ]] && echo '(dry run)' ) at $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT"
    echo "== git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
    echo "== python: $PY -> $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])' 2>&1)"
    echo "== uname: $(uname -srm); cpus: $(nproc)"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
            --format=csv 2>&1
        HAVE_GPU=1
    else
        echo "== no GPU: nvidia-smi missing or lists none"
    fi
    command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2
} >> "$SETUP" 2>&1

PYTAG="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null)"
if compgen -G ".gpu_pack/wheels/*.whl" >/dev/null && [[ "$PYTAG" != 3.12 ]]; then
    echo "== .gpu_pack/wheels are for Python 3.12, $PY is $PYTAG: not installed" >> "$SETUP"
elif compgen -G ".gpu_pack/wheels/*.whl" >/dev/null; then
    {
        echo "== installing $(ls .gpu_pack/wheels/*.whl | wc -l) carried wheels into $SITE"
        timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .gpu_pack/wheels/*.whl && echo "   ok"
        # tritonclient.grpc needs grpcio >= 1.81.1 and protobuf >= 6.30: carried, used only if
        # the image's are older (or missing)
        if compgen -G ".gpu_pack/wheels/optional/*.whl" >/dev/null && ! "$PY" - <<'EOF'
import sys
try:
    import grpc, google.protobuf as pb
    from packaging.version import Version
    ok = Version(grpc.__version__) >= Version("1.81.1") and Version("6.30") <= Version(pb.__version__) < Version("7")
    print(f"   image: grpcio {grpc.__version__}, protobuf {pb.__version__}: {'new enough' if ok else 'too old'}")
except Exception as exc:  # noqa: BLE001
    print(f"   image: grpcio/protobuf unusable: {exc}")
    ok = False
sys.exit(0 if ok else 1)
EOF
        then
            echo "== installing the carried grpcio and protobuf too"
            timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" .gpu_pack/wheels/optional/*.whl && echo "   ok"
        fi
        # Triton's Python backend stub embeds the interpreter without reading PYTHONPATH (seen
        # here with the 3.12 stub: its sys.path is the cwd, the stdlib and the interpreter's
        # site-packages): a .pth file there shows the models the carried wheels and the repository.
        if [[ $DRY == 0 || "${GPU_CHECK_PTH:-0}" == 1 ]]; then
            PURELIB="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
            if printf '%s\n%s\n' "$SITE" "$ROOT" > "$PURELIB/zz_hps_gpu_check.pth"; then
                echo "== wrote $PURELIB/zz_hps_gpu_check.pth (for the Triton stub's Python)"
            else
                echo "== could not write a .pth into $PURELIB: bench_e2e's models may not import hps_core's needs"
            fi
        fi
    } >> "$SETUP" 2>&1
    export PYTHONPATH="$SITE:$PYTHONPATH"
else
    echo "== no .gpu_pack/wheels: using what $PY has (make them with scripts/pack_gpu_check.sh)" >> "$SETUP"
fi

# Imports the tests and benchmarks need, and one kernel launch.
"$PY" - "$HAVE_GPU" >> "$SETUP" 2>&1 <<'EOF'
import importlib, sys
need = ["numpy", "numba", "llvmlite", "rocksdict", "redis", "confluent_kafka", "tqdm", "matplotlib", "pytest",
        "hps_core", "hps_core.lookup", "backend", "hps_demo"]
maybe = ["cupy", "torch", "tritonclient.http", "tritonclient.grpc", "hiredis", "xdist", "pytest_timeout"]
for name in need + maybe:
    try:
        mod = importlib.import_module(name)
        print(f"   import {name:18s} ok {getattr(mod, '__version__', '')}  {getattr(mod, '__file__', '')}")
    except Exception as exc:  # noqa: BLE001
        print(f"   import {name:18s} {'FAILED' if name in need else 'missing'}: {type(exc).__name__}: {exc}")
if sys.argv[1] == "1":
    try:
        import cupy as cp
        k = cp.RawKernel(r'extern "C" __global__ void twice(float* x, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= 2.0f; }', "twice")
        x = cp.arange(1000, dtype=cp.float32)
        k((4,), (256,), (x, cp.int32(1000)))
        ok = bool((x.get() == 2 * cp.arange(1000, dtype=cp.float32).get()).all())
        name = cp.cuda.runtime.getDeviceProperties(0)["name"]
        print(f"   cupy kernel launch on {name.decode() if isinstance(name, bytes) else name}: {'ok' if ok else 'WRONG'}; "
              f"CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, driver {cp.cuda.runtime.driverGetVersion()}")
    except Exception as exc:  # noqa: BLE001
        print(f"   cupy kernel launch FAILED: {type(exc).__name__}: {exc}")
EOF

# The Triton bundle for bench_e2e: unpacked into $WORK/triton, found through HPS_TRITON_HOME.
if [[ -f .gpu_pack/triton.tar.xz && "$PYTAG" == 3.12 ]]; then
    {
        echo "== unpacking .gpu_pack/triton.tar.xz into $WORK"
        tar -C "$WORK" -xJf .gpu_pack/triton.tar.xz 2>&1 \
            || "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" .gpu_pack/triton.tar.xz "$WORK"
    } >> "$SETUP" 2>&1
elif [[ $DRY == 1 && -x "$ROOT/.venv/triton/bin/tritonserver" ]]; then
    ln -sfn "$ROOT/.venv/triton" "$WORK/triton"  # the dry run uses setup.sh's bundle
fi
if [[ -x "$WORK/triton/bin/tritonserver" ]]; then
    export HPS_TRITON_HOME="$WORK/triton"
    # The stub embeds this interpreter's libpython (hps_core.serving puts LIBDIR on the path).
    LIBPY="$("$PY" - <<'EOF'
import glob, os, sysconfig
name = sysconfig.get_config_var("INSTSONAME") or ""
dirs = [sysconfig.get_config_var("LIBDIR") or "", "/usr/lib/x86_64-linux-gnu", "/usr/local/lib", "/usr/lib"]
hits = [os.path.join(d, name) for d in dirs if d and name and os.path.exists(os.path.join(d, name))]
if name and not hits:  # a standalone Python's lib/ (uv, conda) somewhere under /opt
    hits = sorted(glob.glob(f"/opt/*/lib/{name}") + glob.glob(f"/opt/*/*/lib/{name}"))
print(hits[0] if hits else "")
EOF
)"
    USAGE="$("$WORK/triton/bin/tritonserver" --help 2>&1 || true)"
    if [[ "$USAGE" != *--model-repository* ]]; then
        TRITON_WHY="tritonserver does not run: $(printf '%s' "$USAGE" | tail -n 1)"
    elif [[ ! -x "$WORK/triton/python_backend_stubs/$PYTAG/triton_python_backend_stub" ]]; then
        TRITON_WHY="the bundle has no Python $PYTAG backend stub"
    elif [[ -z "$LIBPY" ]]; then
        TRITON_WHY="no libpython$PYTAG.so for the Python backend stub"
    else
        TRITON_OK=1
        TRITON_WHY="bundle at $HPS_TRITON_HOME, libpython $LIBPY"
        export LD_LIBRARY_PATH="$(dirname "$LIBPY")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
fi
echo "== Triton for bench_e2e: $TRITON_WHY" >> "$SETUP"
note setup "$([[ $HAVE_GPU == 1 || $DRY == 1 ]] && echo 0 || echo 1)" $((SECONDS - t_setup)) \
    "$([[ $HAVE_GPU == 1 ]] && echo GPU || echo 'no GPU')$([[ $DRY == 1 ]] && echo ', dry run'); e2e: $TRITON_WHY"
say "setup done: GPU $HAVE_GPU, Triton $TRITON_OK ($TRITON_WHY)"

# --------------------------------------------------------------------------- steps
mapfile -t GPU_TESTS < <(grep -rlE --include='test_*.py' 'mark\.gpu' tests | sort)
XDIST=()
workers="${GPU_CHECK_XDIST:-4}"
if [[ "$workers" != 0 ]] && "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST=(-n "$workers"); fi
PER_TEST=()  # a hung kernel fails its test instead of eating the budget
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then PER_TEST=(--timeout 150); fi

run_step pytest_gpu pytest.log 240 "${#GPU_TESTS[@]} files, ${XDIST[*]:-serial}" -- \
    "$PY" -m pytest -m gpu -p no:cacheprovider --continue-on-collection-errors "${PER_TEST[@]}" "${XDIST[@]}" \
    --junitxml="$WORK/junit_gpu.xml" "${GPU_TESTS[@]}"

if [[ $DRY == 1 ]]; then
    CACHE_ARGS=(--device cpu --quick)
    LOOKUP_ARGS=(--quick --cache cpu --mode inprocess tables --dims 128 --keys powerlaw uniform)
else
    CACHE_ARGS=(--device gpu --dims 32 128 --max-batch 1048576 --trace-rows 1000000 --trace-len 4000000)
    LOOKUP_ARGS=(--device gpu --mode inprocess tables --dims 128 --rows 50000 --samples 128 1024 4096 16384
                 --tables-samples 128 1024 8192 --keys powerlaw uniform --min-seconds 0.2 --min-reps 15
                 --max-seconds 8)
fi
run_step bench_cache bench_cache.log 150 "" -- \
    "$PY" scripts/bench_cache.py "${CACHE_ARGS[@]}" --out "$WORK/bench_cache"
run_step bench_lookup bench_lookup.log 150 "" -- \
    "$PY" scripts/bench_lookup.py "${LOOKUP_ARGS[@]}" --out "$WORK/bench_lookup"

E2E_DEFAULT="--rows 20000 --dim 32 --tables 26 --batches 32,1024 --concurrency 1,2 --concurrency-batch 256 --protocols grpc --shared-memory none"
[[ $DRY == 1 ]] && E2E_DEFAULT="--smoke"
read -r -a E2E_ARGS <<<"${GPU_CHECK_E2E_ARGS:-$E2E_DEFAULT}"
if [[ "${GPU_CHECK_E2E:-$((1 - DRY))}" == 0 ]]; then
    note bench_e2e skipped 0 "GPU_CHECK_E2E=0$([[ $DRY == 1 ]] && echo ' (dry run default)')"
elif [[ $TRITON_OK != 1 ]]; then
    note bench_e2e skipped 0 "$TRITON_WHY"
    echo "bench_e2e skipped: $TRITON_WHY" >> "$OUT/bench_e2e.log"
else
    STEP_MIN=100 run_step bench_e2e bench_e2e.log 170 "" -- \
        "$PY" scripts/bench_e2e.py "${E2E_ARGS[@]}" --no-docs --out "$WORK/bench_e2e"
fi

run_step kernels kernels.log 90 "" -- \
    "$PY" -m pytest -p no:cacheprovider --junitxml="$WORK/junit_kernels.xml" \
    tests/hps_core/cache/test_kernels_compile.py
run_step pytest_cpu pytest.log 120 "" -- \
    "$PY" -m pytest -p no:cacheprovider "${PER_TEST[@]}" --continue-on-collection-errors \
    -m "not gpu and not triton and not slow and not redis and not kafka" \
    --junitxml="$WORK/junit_cpu.xml" --ignore tests/hps_core/cache/test_kernels_compile.py \
    tests/hps_core/cache tests/hps_core/test_lookup_cached.py tests/hps_core/test_bench_lookup_smoke.py

# --------------------------------------------------------------------------- summary
(
    cd "$WORK" || exit 0
    files=()
    for f in status.tsv junit_gpu.xml junit_kernels.xml junit_cpu.xml bench_cache/results.json \
             bench_cache/bench_cache.png bench_lookup/results.json bench_lookup/bench_lookup.png \
             bench_e2e/bench_e2e.json bench_e2e/plots; do
        [[ -e "$f" ]] && files+=("$f")
    done
    tar -czf "$OUT/results.tar.gz" "${files[@]}" 2>/dev/null
)
say "done: logs in $OUT; the summary (also $OUT/summary.md):"
"$PY" - "$WORK" "$OUT/summary.md" "$(elapsed)" "$DRY" <<'EOF'
"""The one summary table of scripts/gpu_check.sh (also written to summary.md)."""
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, dest, seconds, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
steps = {}
for line in (work / "status.tsv").read_text().splitlines():
    name, rc, took, note = (line.split("\t") + ["", "", ""])[:4]
    steps.setdefault(name, []).append((rc, took, note))


def verdict(runs):
    words = []
    for rc, took, note in runs:
        if rc == "skipped":
            words.append(f"skipped ({note})")
        elif rc == "0":
            words.append("passed")
        elif rc in ("124", "137"):
            words.append(f"TIMED OUT after {took} s")
        else:
            words.append(f"FAILED (rc {rc})")
    return "; ".join(words) or "not run"


def took(runs):
    return f"{sum(int(t) for _, t, _ in runs if t.isdigit())} s"


def junit(name):
    path = work / f"junit_{name}.xml"
    if not path.is_file():
        return "no junit XML"
    try:
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        t = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        passed = t["tests"] - t["failures"] - t["errors"] - t["skipped"]
        failed = [c.get("classname", "") + "::" + c.get("name", "") for s in suites for c in s.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        text = f"{passed} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"
        if failed:
            text += "; failing: " + ", ".join(f.split(".")[-1] for f in failed[:6]) + (" ..." if len(failed) > 6 else "")
        return text
    except Exception as exc:  # noqa: BLE001
        return f"junit XML unreadable: {exc}"


def load(rel):
    try:
        return json.loads((work / rel).read_text())
    except Exception:  # noqa: BLE001
        return None


def f2(x):
    return "n/a" if x is None else f"{x:.2f}"


def judge(ok, device):
    """A target's verdict; the targets are the GPU's, so a CPU figure only shows the plumbing."""
    if device != "gpu":
        return f"n/a on {device} ({'would be met' if ok else 'would not be met'})"
    return "**met**" if ok else "**NOT met**"


targets = []  # (what, value, target, verdict)
rows = []
if "setup" in steps:
    rows.append(("setup", verdict(steps["setup"]), took(steps["setup"]), steps["setup"][0][2]))
if "pytest_gpu" in steps:
    rows.append(("pytest -m gpu", verdict(steps["pytest_gpu"]), took(steps["pytest_gpu"]),
                 f"{junit('gpu')} ({steps['pytest_gpu'][0][2]})"))

cache = load("bench_cache/results.json")
detail = "no results.json"
if cache:
    big = [r for r in cache.get("query", []) if r["dim"] == 128 and r["batch"] >= 65536]
    parts = []
    for r in big:
        parts.append(f"b {r['batch']:,}: dyn {f2(r['dynamic_query_vs_gather'])} / x{r.get('tables', 26)} "
                     f"{f2(r.get('dynamic_multi_query_vs_gather'))}, static {f2(r['static_query_vs_gather'])} / "
                     f"x{r.get('tables', 26)} {f2(r.get('static_multi_query_vs_gather'))}")
    if cache.get("meta", {}).get("errors"):
        parts.append("ERRORS: " + "; ".join(cache["meta"]["errors"]))
    elif cache.get("meta", {}).get("partial"):
        parts.append("(partial: the run stopped before the traces)")
    detail = ("dim 128, query/gather throughput: " + "; ".join(parts)) if parts else \
        f"no dim-128 batch >= 65,536 (sizes {[(r['dim'], r['batch']) for r in cache.get('query', [])][:6]})"
    device = cache.get("meta", {}).get("device")
    for kind in ("dynamic", "static"):
        for key, what in ((f"{kind}_query_vs_gather", f"{kind} one-table"),
                          (f"{kind}_multi_query_vs_gather", f"{kind} 26-table structure")):
            vals = [r[key] for r in big if key in r]
            if vals:
                worst = min(vals)
                targets.append((f"all-hit query / plain gather, {what}, dim 128, batch >= 65,536",
                                f"{worst:.2f} (worst of {len(vals)})", ">= 0.80", judge(worst >= 0.8, device)))
if "bench_cache" in steps:
    rows.append(("bench_cache", verdict(steps["bench_cache"]), took(steps["bench_cache"]), detail))

lookup = load("bench_lookup/results.json")
detail = "no results.json"
if lookup:
    parts = []
    tab = lookup.get("tables", [])
    if tab:
        worst = max(tab, key=lambda r: r["many_vs_one"])
        parts.append("26 vs 1 table: " + ", ".join(f"{r['keys_dist'][:3]} {r['samples']}: {r['many_vs_one']:.2f}"
                                                 for r in tab))
        targets.append((f"26-table / 1-table lookup time, same keys (cache {worst.get('cache')})",
                        f"{worst['many_vs_one']:.2f} (worst: {worst['keys_dist']}, {worst['samples']} samples)",
                        "<= 1.2", judge(worst["many_vs_one"] <= 1.2, worst.get("device"))))
    inp = lookup.get("inprocess", [])
    if inp:
        parts.append("lookup/gather time: " + ", ".join(f"{r['keys_dist'][:3]} {r['keys']:,} keys: "
                                                      f"{r['lookup_vs_gather']:.2f}" for r in inp))
        counted = [r for r in inp + tab if "launches_per_lookup" in r]
        if counted:
            r = counted[-1]
            profiled = [x["profiler"] for x in counted if "profiler" in x]
            good = [x for x in profiled if "kernels_per_lookup" in x]
            if good:
                prof = good[-1]
                ptxt = (f"; CUDA profiler: {prof['kernels_per_lookup']:g} kernels, {prof['memcpy_per_lookup']:g} "
                        f"copies, {prof['sync_calls_per_lookup']:g} sync calls")
            else:
                ptxt = f"; CUDA profiler: {profiled[0].get('error', '?')}" if profiled else ""
            parts.append(f"per lookup: {r['launches_per_lookup']:g} launches, {r['syncs_per_lookup']:g} syncs "
                         f"(+{r['h2d_per_lookup']:g} h2d){ptxt}")
            one = [x["one_table"] for x in tab if "launches_per_lookup" in x.get("one_table", {})]
            many = [x for x in tab if "launches_per_lookup" in x]
            if one and many:
                same = all(m["launches_per_lookup"] == m["one_table"]["launches_per_lookup"] for m in many
                           if "launches_per_lookup" in m.get("one_table", {}))
                targets.append(("launches per lookup, 26 tables vs 1 table",
                                f"{many[-1]['launches_per_lookup']:g} vs {one[-1]['launches_per_lookup']:g}",
                                "same", judge(same, "gpu")))
        rates = [r.get("hit_rate") for r in inp + tab if r.get("hit_rate") is not None]
        if rates:
            parts.append(f"cache hit rate min {min(rates):.4f}")
        errors = [r["count_error"] for r in inp + tab if "count_error" in r]
        if errors:
            parts.append(f"counting failed: {errors[0]}")
    if lookup.get("errors"):
        parts.append("ERRORS: " + "; ".join(f"{e['mode']} dim {e['dim']}: {e['error']}" for e in lookup["errors"]))
    if lookup.get("meta", {}).get("partial"):
        parts.append("(partial: the run stopped early)")
    detail = "; ".join(parts) or detail
if "bench_lookup" in steps:
    rows.append(("bench_lookup", verdict(steps["bench_lookup"]), took(steps["bench_lookup"]), detail))

e2e = load("bench_e2e/bench_e2e.json")
if "bench_e2e" in steps:
    detail = steps["bench_e2e"][0][2]
    if e2e:
        parts = []
        for path, recs in e2e.get("paths", {}).items():
            if isinstance(recs, list):
                errs = sum(1 for r in recs if "error" in r or r.get("errors"))
                best = max((r.get("throughput_sps", 0) for r in recs if "error" not in r), default=0)
                parts.append(f"{path}: {len(recs)} runs, {errs} errors, best {best:,.0f} samples/s")
            else:
                parts.append(f"{path}: {recs}")
        detail = "; ".join(parts)
    rows.append(("bench_e2e", verdict(steps["bench_e2e"]), took(steps["bench_e2e"]), detail))
for name, label, key in (("kernels", "kernels compile (nvcc)", "kernels"), ("pytest_cpu", "pytest CPU tests", "cpu")):
    if name in steps:
        rows.append((label, verdict(steps[name]), took(steps[name]), junit(key)))

lines = [f"## gpu_check summary{' (DRY RUN: no GPU, CPU sizes, nothing measured on a GPU)' if dry else ''}, "
         f"{seconds} s", "", "| step or target | result | time | details / measured (target) |", "|---|---|---:|---|"]
lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
lines += [f"| target: {a} | {d} | | {b} (target {c}) |" for a, b, c, d in targets] \
    or ["| targets | no ratios: the benchmarks left no results | | |"]
text = "\n".join(lines) + "\n"
dest.write_text(text)
print(text)
EOF
