"""``python -m hps_demo``: train, serve and query the demo DLRM (see hps_demo/run.py)."""

import sys

from hps_demo.run import main

sys.exit(main())
