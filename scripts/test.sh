#!/usr/bin/env bash
# Build (or reuse) the environment, then run the whole test suite with it.
# Arguments go to pytest, e.g.: scripts/test.sh -m "not triton" -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
