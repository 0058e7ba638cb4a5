"""Child processes of an emulated-GPU test get the emulated CuPy too.

:func:`tests.cuda_emulator.install` puts this folder first on ``PYTHONPATH``, so every Python
process the tests start (the shared GPU cache's keeper, ``multiprocessing`` spawn workers,
``subprocess`` users) imports this at start-up and, while ``HPS_EMULATED_GPU`` is set,
installs the stand-in before anything imports ``cupy``. No library module imports from
``tests/``: this is the only door, and it is a test-only folder. A ``sitecustomize`` this one
shadows (later on ``sys.path``) still runs, first.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _candidate = os.path.join(_entry or ".", "sitecustomize.py")
    if os.path.abspath(_entry or ".") != _here and os.path.isfile(_candidate):
        with open(_candidate, encoding="utf-8") as _fh:
            exec(compile(_fh.read(), _candidate, "exec"), {"__name__": "sitecustomize", "__file__": _candidate})  # noqa: S102
        break

if os.environ.get("HPS_EMULATED_GPU", "") not in ("", "0"):
    _root = os.path.dirname(os.path.dirname(os.path.dirname(_here)))
    if _root not in sys.path:
        sys.path.insert(0, _root)
    from tests import cuda_emulator

    cuda_emulator.install()
