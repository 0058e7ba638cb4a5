"""Find the external programs the project drives, as a :class:`Tool` (path and environment).

perf_analyzer, which the demo's run and benchmark drive, is found here:
``scripts/setup.sh`` puts it in ``.venv/triton/bin`` with its libraries in ``.venv/triton/lib``.
The test servers' finders (tansu, redis-server) are test tooling, in ``tests/tools.py``. Each
finder raises :class:`ToolNotFoundError` with the fix when the program is missing, so callers
(the demo, tests, benchmarks) can skip or fail with a useful message. The error lives here,
with the finders, not in ``hps_core.errors``: the library never looks for a program.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from hps_core.errors import ServingError
from hps_core.serving import find_bundle

__all__ = ["Tool", "ToolNotFoundError", "find_perf_analyzer"]


class ToolNotFoundError(FileNotFoundError):
    """An external program is not installed; the message says how to get it."""


@dataclass(frozen=True)
class Tool:
    """A program and the environment additions it needs (merge ``env`` into ``os.environ``)."""

    path: Path
    env: dict[str, str] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        """``os.environ`` with this tool's additions (LD_LIBRARY_PATH prepended)."""
        merged = dict(os.environ)
        for key, value in self.env.items():
            if key == "LD_LIBRARY_PATH" and merged.get(key):
                value = f"{value}{os.pathsep}{merged[key]}"
            merged[key] = value
        return merged


def find_perf_analyzer() -> Tool:
    """perf_analyzer 2.51 from the Triton bundle (later releases need glibc 2.38)."""
    try:
        bundle = find_bundle()
    except ServingError as exc:
        raise ToolNotFoundError(f"perf_analyzer: {exc}") from exc
    path = bundle.home / "bin" / "perf_analyzer"
    if not path.is_file():
        found = shutil.which("perf_analyzer")
        if found is None:
            raise ToolNotFoundError(f"perf_analyzer not in {path.parent} nor on PATH; run scripts/setup.sh")
        return Tool(Path(found))
    # It links libcudart.so.12 and libb64.so.0d, which setup.sh links into the bundle's lib/.
    libs = os.pathsep.join(str(d) for d in bundle.lib_dirs)
    return Tool(path, {"LD_LIBRARY_PATH": libs})
