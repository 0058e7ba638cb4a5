"""The emulated GPU: this project's CUDA kernels and its GPU cache run on the CPU, for tests.

Two parts, test tooling only (nothing here is importable as ``cupy`` by a server):

* ``cuda_shim.h`` + ``emu_runtime.h`` (C++): a CUDA execution model under which the unchanged
  ``hps_core/cache/kernels`` sources compile with the system C++ compiler (``_build``): lanes
  are fibers meeting at every warp intrinsic, blocks run on several host threads at once.
* ``fake_cupy`` (Python): the part of CuPy that hps_core uses, launching those kernels, so
  ``hps_core/cache/gpu.py`` runs unchanged.

``HPS_EMULATED_GPU=1 pytest ...`` runs the ``gpu``-marked tests on it (tests/conftest.py calls
:func:`install` before any test module imports CuPy). What it proves and what only a real
GPU shows: docs/gpu_check.md, "The emulated GPU".

Child processes: :func:`install` puts ``site/`` first on ``PYTHONPATH``; its
``sitecustomize.py`` installs the stand-in in every Python process started from then on while
``HPS_EMULATED_GPU`` is set (the shared GPU cache's keeper, ``multiprocessing`` spawn workers,
``subprocess`` users), so processes that share one emulated allocation through the emulated
CUDA IPC (``fake_cupy``: a memfd mapped through the exporter's ``/proc/<pid>/fd``) all run the
emulated CuPy, and no library module imports anything from ``tests/``.

Knobs (environment): HPS_EMU_THREADS host threads per launch (3), HPS_EMU_SEED another
fiber interleaving per seed (0: FIFO), HPS_EMU_TIMEOUT seconds before a launch is a hang
(120), HPS_EMU_DEVICES (2), HPS_EMU_SMS (2), HPS_EMU_CXX (g++), HPS_EMU_BUILD_DIR,
HPS_EMU_PREEMPT (4), HPS_EMU_STALL_EVERY / HPS_EMU_STALL_US (0 / 100: every n-th acquire load
stops its host thread that long), HPS_EMU_SANITIZER (address or thread: test_sanitizers.py).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

__all__ = ["ENV", "enabled", "install", "prebuild"]

#: Set to 1 to run the gpu-marked tests on the emulated device.
ENV = "HPS_EMULATED_GPU"


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def install() -> ModuleType:
    """Make ``import cupy`` give the stand-in (for this process), after compiling the cache
    kernels ahead; returns it. Refuses to replace a real CuPy already imported."""
    from tests.cuda_emulator import fake_cupy

    present = sys.modules.get("cupy")
    if present is not None and present is not fake_cupy:
        raise RuntimeError("a real CuPy is already imported: the emulated GPU would replace it")
    sys.modules["cupy"] = fake_cupy
    site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site")
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if site not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([site, *[p for p in paths if p]])
    prebuild()
    return fake_cupy


def prebuild() -> None:
    """Compile every kernel family with every instantiation the loader can ask for, in
    parallel (about 25 s once; cached by source hash after), so no cache made in a test
    waits for a compiler."""
    from hps_core.cache import _kernels
    from tests.cuda_emulator import _build, fake_cupy

    def family(name: str) -> None:
        exprs: set[str] = set()
        for fam, kdt, vec, nv in _kernels.all_variants():
            if fam == name:
                exprs |= _kernels.kernel_names(fam, kdt, {vec: nv}).expressions()
        code = _kernels.source(name)
        fake_cupy.register_prebuilt(code, _build.load(code, sorted(exprs)))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(family, sorted(_kernels.FAMILIES)))
