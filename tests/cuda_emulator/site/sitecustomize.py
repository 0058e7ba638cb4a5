"""Child processes of an emulated-GPU test get the emulated CuPy too.

:func:`tests.cuda_emulator.install` puts this folder first on ``PYTHONPATH``, so every Python
process the tests start (the shared GPU cache's keeper, ``multiprocessing`` spawn workers,
``subprocess`` users) imports this at start-up and, while ``HPS_EMULATED_GPU`` is set,
installs the stand-in before anything imports ``cupy``. No library module imports from
``tests/``: this is the only door, and it is a test-only folder.
"""

import os
import sys

if os.environ.get("HPS_EMULATED_GPU", "") not in ("", "0"):
    _root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if _root not in sys.path:
        sys.path.insert(0, _root)
    from tests import cuda_emulator

    cuda_emulator.install()
