"""The GPU keeper of one shared GPU cache: ``python -m hps_core.cache.gpu_keeper <file>``.

Started by the first process that uses the cache, forks the keeper off and exits (hps_core.cache.shared_gpu, which
describes its life): it allocates the cache's device memory, exports it through CUDA IPC and
keeps it until no process uses it and no ``hps serve`` keeps it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hps_core.cache.shared_gpu import keep


def main(argv: list[str]) -> int:
    """Fork the keeper off and return at once (its starter waits for this process only); the
    keeper, reparented, keeps the cache. CUDA is not initialised before the fork."""
    if len(argv) != 1:
        print("usage: python -m hps_core.cache.gpu_keeper <metadata file>", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"{path}: no such shared GPU cache file", file=sys.stderr)
        return 1
    if os.fork() > 0:
        return 0
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os._exit(keep(path))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
