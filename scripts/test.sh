#!/usr/bin/env bash
# Build (or reuse) the environments, then run the whole test suite:
#   1. every test in .venv (numpy<2 inside Triton's Python stub, as Triton 2.51 expects);
#   2. the end-to-end tests again in .venv-numpy2, so the backends' tensor I/O is exercised
#      inside the real stub under numpy 2 as well (what a GPU machine with CuPy runs).
# Arguments go to the first pytest run, e.g.: scripts/test.sh -m "not triton" -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
bash scripts/setup_numpy2.sh
"$ROOT/.venv/bin/python" -m pytest -q "$@"
echo "== the end-to-end tests again, numpy 2 in the Triton stub"
HPS_TRITON_HOME="$ROOT/.venv/triton" exec "$ROOT/.venv-numpy2/bin/python" -m pytest -q tests/e2e -m "not slow"
