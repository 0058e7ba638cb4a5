#!/usr/bin/env bash
# Pack what scripts/gpu_check.sh needs on a GPU machine that has no package registry.
#
# Runs HERE (a machine with pip access to PyPI), from any folder; writes .gpu_pack/ at the
# repository root (git-ignored through .git/info/exclude, never committed):
#
#   .gpu_pack/wheels/*.whl           cp312 manylinux wheels of what the GPU image lacks and
#                                    hps_core or the tests import: rocksdict, redis, hiredis,
#                                    confluent-kafka (hps_core.db / hps_core.updates import them
#                                    at module import), tritonclient[http,grpc] and the parts of
#                                    its needs the image lacks (python-rapidjson, geventhttpclient,
#                                    gevent, greenlet, zope.event, zope.interface, brotli)
#   .gpu_pack/wheels/optional/*.whl  grpcio and protobuf: installed there only when the image's
#                                    own are older than tritonclient.grpc needs
#   .gpu_pack/triton.tar.xz          Triton 2.51 for bench_e2e.py: tritonserver, the Python
#                                    backend, the Python 3.12 stub, their libraries (from the
#                                    nvidia-pytriton 0.7.0 wheel) and perf_analyzer (tritonclient
#                                    2.51.0 wheel); 125 MB unpacked, so it travels compressed
#   .gpu_pack/MANIFEST.txt           what is in the pack, with sizes
#
# Wheel versions are the ones installed in .venv (what the tests ran with here), else the
# pins below. The GPU image (see /work/.library/device/KINDS.md) already has numpy 2, CuPy,
# numba, llvmlite, torch, tqdm, matplotlib, pytest (+ timeout, xdist), grpcio, protobuf,
# aiohttp, certifi, urllib3, packaging, ml-dtypes.
#
# Usage: bash scripts/pack_gpu_check.sh [--no-triton]
# Then, with the device tool: run(command="bash scripts/gpu_check.sh", carry=[".gpu_pack"],
# timeout_s=540). docs/gpu_check.md says more.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PACK=".gpu_pack"
LIMIT=$((64 * 1024 * 1024))  # what one device call carries: working tree + carried paths
WITH_TRITON=1
[[ "${1:-}" == "--no-triton" ]] && WITH_TRITON=0
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
say() { printf '[pack] %s\n' "$*"; }
# This machine's pip config names local indexes that lack most projects; pip warns once per
# project. Drop only those lines (as scripts/setup.sh does) so real errors stay visible.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# Wheels of the device's Python (3.12, CPython, x86-64 manylinux), without their dependencies
# (each needed one is named below): the device tool's README command, plus a few more glibc
# levels (pip matches manylinux_2_N exactly; the device runs glibc 2.39).
PLATFORM_ARGS=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
               --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
               --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
               --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64
               --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)

# name, pin used when .venv does not have it
REQUIRED=(
    "rocksdict 0.3.29"        # hps_core.db.rocksdb
    "redis 8.1.0"             # hps_core.db.redis_cluster
    "hiredis 3.5.0"           # redis's fast parser (optional for redis, small)
    "confluent-kafka 2.16.1"  # hps_core.updates
    "tritonclient 2.73.0"     # tests/e2e, tests/hps_core/test_serving.py, hps_demo.client, bench_lookup served
    "python-rapidjson 1.25"   # tritonclient
    "geventhttpclient 2.6.1"  # tritonclient.http
    "gevent 26.9.0"           # geventhttpclient
    "greenlet 3.3.2"          # gevent
    "zope.event 6.2"          # gevent
    "zope.interface 8.7"      # gevent
    "brotli 1.2.1"            # geventhttpclient
)
OPTIONAL=(
    "grpcio 1.85.3"           # tritonclient.grpc needs >= 1.81.1
    "protobuf 6.33.6"         # tritonclient.grpc needs >= 6.30, < 7
)

version_of() {  # version_of NAME PIN -> the version in .venv, else PIN
    "$PY" - "$1" "$2" <<'EOF' 2>/dev/null || echo "$2"
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    print(sys.argv[2])
EOF
}

specs() {  # specs ENTRY... -> NAME==VERSION per entry
    local entry name pin
    for entry in "$@"; do
        read -r name pin <<<"$entry"
        printf '%s==%s\n' "$name" "$(version_of "$name" "$pin")"
    done
}

rm -rf "$PACK"
mkdir -p "$PACK/wheels/optional"
mapfile -t REQ < <(specs "${REQUIRED[@]}")
mapfile -t OPT < <(specs "${OPTIONAL[@]}")
say "downloading ${#REQ[@]} cp312 wheels: ${REQ[*]}"
pip_quiet "$PY" -m pip download -q "${PLATFORM_ARGS[@]}" -d "$PACK/wheels" "${REQ[@]}"
say "downloading optional wheels: ${OPT[*]}"
pip_quiet "$PY" -m pip download -q "${PLATFORM_ARGS[@]}" -d "$PACK/wheels/optional" "${OPT[@]}"

# One version of each: two of one project stop the whole install there.
dupes="$(ls "$PACK/wheels"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
if [[ -n "$dupes" ]]; then
    say "ERROR: more than one wheel of: $dupes"; exit 1
fi

if [[ "$WITH_TRITON" == 1 ]]; then
    DL="$ROOT/.venv/downloads"  # where scripts/setup.sh keeps them
    fetch() {  # fetch NAME VERSION -> path of the wheel (any platform: these are py3-none)
        local found
        found="$(ls "$DL"/"${1//-/_}"-"$2"-*.whl 2>/dev/null | head -n1 || true)"
        if [[ -z "$found" ]]; then
            mkdir -p "$PACK/.dl"
            pip_quiet "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$PACK/.dl" "$1==$2" >&2
            found="$(ls "$PACK/.dl"/"${1//-/_}"-"$2"-*.whl | head -n1)"
        fi
        printf '%s\n' "$found"
    }
    PYTRITON_WHL="$(fetch nvidia-pytriton 0.7.0)"
    CLIENT_WHL="$(fetch tritonclient 2.51.0)"
    STAGE="$(mktemp -d)"
    trap 'rm -rf "$STAGE"' EXIT
    say "extracting Triton 2.51 (server, Python backend, Python 3.12 stub, libraries) and perf_analyzer"
    # The layout of scripts/setup.sh's .venv/triton, for Python 3.12: what hps_core.serving
    # finds through HPS_TRITON_HOME. The wheel's libpython 3.13 (for its 3.13 stub) stays out.
    "$PY" - "$PYTRITON_WHL" "$CLIENT_WHL" "$STAGE/triton" <<'EOF'
import os, sys, zipfile
from pathlib import Path

pytriton, client, dest = sys.argv[1], sys.argv[2], Path(sys.argv[3])
srv = "pytriton/tritonserver/"
wanted = {
    srv + "bin/tritonserver": "bin/tritonserver",
    srv + "backends/python/libtriton_python.so": "backends/python/libtriton_python.so",
    srv + "backends/python/triton_python_backend_utils.py": "backends/python/triton_python_backend_utils.py",
    srv + "python_backend_stubs/3.12/triton_python_backend_stub": "python_backend_stubs/3.12/triton_python_backend_stub",
}

def extract(zf, name, rel):
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(name) as src, open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    os.chmod(target, 0o644 if rel.endswith(".py") else 0o755)

with zipfile.ZipFile(pytriton) as zf:
    for name, rel in wanted.items():
        extract(zf, name, rel)
    for name in zf.namelist():
        base = name.split("/", 1)[-1]
        if name.startswith("nvidia_pytriton.libs/") and base and not base.startswith("libpython3"):
            extract(zf, name, "lib/" + base)
with zipfile.ZipFile(client) as zf:
    extract(zf, next(n for n in zf.namelist() if n.endswith("/data/bin/perf_analyzer")), "bin/perf_analyzer")
EOF
    # perf_analyzer links libcudart.so.12 and libb64.so.0d by their plain names (as setup.sh does)
    (cd "$STAGE/triton/lib" && ln -sfn "$(ls libcudart-*.so.12* | head -n1)" libcudart.so.12 \
        && ln -sfn "$(ls libb64-*.so.0d | head -n1)" libb64.so.0d)
    say "compressing $(du -sh "$STAGE/triton" | cut -f1) of Triton into $PACK/triton.tar.xz (about a minute)"
    tar -C "$STAGE" -cf - triton | xz -9 -T0 > "$PACK/triton.tar.xz"
    rm -rf "$PACK/.dl"
fi

# Never commit the pack: ignore it in this checkout (a worktree has its own info/exclude path).
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF "/$PACK/" "$EXCLUDE" 2>/dev/null || echo "/$PACK/" >> "$EXCLUDE"

{
    echo "# $PACK, made $(date -u +%Y-%m-%dT%H:%M:%SZ) by scripts/pack_gpu_check.sh"
    (cd "$PACK" && find . -type f ! -name MANIFEST.txt -printf '%10s  %P\n' | sort -k2)
} > "$PACK/MANIFEST.txt"

pack_bytes=$(du -sb "$PACK" | cut -f1)
# What travels besides: tracked files and untracked ones git does not ignore.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
             | awk '{s += $1} END {print s + 0}')
total=$((pack_bytes + tree_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
say "wheels: $(mib "$(du -sb "$PACK/wheels" | cut -f1)") ($(ls "$PACK/wheels"/*.whl | wc -l) required, $(ls "$PACK/wheels/optional"/*.whl | wc -l) optional)"
[[ -f "$PACK/triton.tar.xz" ]] && say "triton.tar.xz: $(mib "$(stat -c %s "$PACK/triton.tar.xz")")"
say "pack $(mib "$pack_bytes") + working tree $(mib "$tree_bytes") = $(mib "$total") of the 64 MiB a call carries"
if (( total > LIMIT )); then
    say "ERROR: over the limit; rerun with --no-triton (bench_e2e is then skipped there)"
    exit 1
fi
cat <<EOF
[pack] ready. On a task lent a GPU, make ONE device call (about 8 minutes of the 15 lent):
  run(command="bash scripts/gpu_check.sh", carry=[".gpu_pack"], timeout_s=540)
[pack] what comes back: setup.log pytest.log kernels.log bench_cache.log bench_lookup.log bench_e2e.log
       summary.md results.tar.gz; the summary table is the end of the output (docs/gpu_check.md).
EOF
