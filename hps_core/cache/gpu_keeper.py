"""The GPU keeper of one shared GPU cache: ``python -m hps_core.cache.gpu_keeper <file> <fd>``.

Started by the first process that uses the cache, with the cache's metadata file open on
descriptor ``fd`` (the path names it in listings), forks the keeper off and exits
(hps_core.cache.shared_gpu, which describes its life): it allocates the cache's device
memory, exports it through CUDA IPC and keeps it until no process uses it and no
``hps serve`` keeps it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hps_core.cache.shared_gpu import keep


def main(argv: list[str]) -> int:
    """Fork the keeper off and return at once (its starter waits for this process only); the
    keeper, reparented, keeps the cache. CUDA is not initialised before the fork (nor CuPy
    imported: the keeper reports a failed import through the file)."""
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m hps_core.cache.gpu_keeper <metadata file> <its open descriptor>", file=sys.stderr)
        return 2
    path, fd = Path(argv[0]), int(argv[1])
    try:
        os.fstat(fd)
    except OSError as exc:
        print(f"{path}: the shared GPU cache file's descriptor {fd} was not passed ({exc})", file=sys.stderr)
        return 1
    if os.fork() > 0:
        return 0
    devnull = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(devnull, std)
    os._exit(keep(path, fd))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
