"""The GPU keeper of one shared GPU cache: ``python -m hps_core.cache.gpu_keeper <file>``.

Started detached by the first process that uses the cache (hps_core.cache.shared_gpu, which
describes its life): it allocates the cache's device memory, exports it through CUDA IPC and
keeps it until no process uses it and no ``hps serve`` keeps it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hps_core.cache.shared_gpu import keep


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m hps_core.cache.gpu_keeper <metadata file>", file=sys.stderr)
        return 2
    return keep(Path(argv[0]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
