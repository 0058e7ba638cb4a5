#!/usr/bin/env bash
# Build (or reuse) the environments, then run the whole test suite:
#   1. every test in .venv (numpy<2 inside Triton's Python stub, as Triton 2.51 expects);
#   2. the GPU tests (-m gpu) on the CPU execution model of the CUDA kernels
#      (tests/cuda_emulator: the unchanged .cu sources built with g++, a CuPy stand-in), in a
#      run of their own because the stand-in is importable as `cupy` for the whole session;
#   3. the end-to-end tests again in .venv-numpy2, so the backends' tensor I/O is exercised
#      inside the real stub under numpy 2 as well (what a GPU machine with CuPy runs).
# Arguments go to the first pytest run, e.g.: scripts/test.sh -m "not triton" -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
bash scripts/setup_numpy2.sh
"$ROOT/.venv/bin/python" -m pytest -q "$@"
echo "== the GPU tests on the emulated device (tests/cuda_emulator)"
HPS_EMULATED_GPU=1 "$ROOT/.venv/bin/python" -m pytest -q -m gpu tests/
echo "== the end-to-end tests again, numpy 2 in the Triton stub"
HPS_TRITON_HOME="$ROOT/.venv/triton" exec "$ROOT/.venv-numpy2/bin/python" -m pytest -q tests/e2e -m "not slow"
