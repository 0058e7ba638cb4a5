"""``python -m hps_core.cli``: the ``hps`` command without the console script."""

import sys

from hps_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
