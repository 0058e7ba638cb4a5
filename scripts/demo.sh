#!/usr/bin/env bash
# The main job, one command: set up (or reuse) the environment, then train the demo DLRM,
# serve it through Triton with the HPS backend and query it (hps_demo/run.py).
# Arguments go to the demo, e.g.: scripts/demo.sh --samples 100000 --alpha 0.99
# Everything it writes lands in work/ (git-ignored).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec "$ROOT/.venv/bin/python" -m hps_demo "$@"
