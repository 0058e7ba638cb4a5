"""Find the Python backend stubs of one Triton server that died or hung.

Triton 2.51 runs every instance of a Python-based model in its own
``triton_python_backend_stub`` process, a child of ``tritonserver``. When a stub dies (an
out-of-memory kill, ``kill -9``, a crash in native code) Triton neither replaces it nor says so:
measured, every request to the model answers ``INTERNAL Stub process '<instance>' is not
healthy`` for as long as one waits, while liveness, readiness and the model's readiness all
answer 200. Two facts make a death visible from outside:

* Triton reaps a stub it stops itself (an unload, a failed load) within milliseconds, but not
  one that died on its own: that one stays a zombie child of ``tritonserver`` until the server
  exits, with the signal or exit code that ended it in ``/proc/<pid>/stat``;
* a stub's command line names its model folder (``<repository>/<model>/<version>/model.py``)
  and its instance (``<model>_<group>_<index>``), read while it lives.

:class:`StubWatch` tracks the stubs of one server from those facts (:meth:`StubWatch.dead`).
A stub that is alive but stuck (an endless loop, SIGSTOP, a lock never released) is seen from
Triton's own metrics instead (:class:`HangWatch`): requests are pending for a model version
while none of its executions completes for ``hang_s``. Both are read by ``hps serve``
(:mod:`hps_core.supervisor`), which brings the model back, and by the HPS backend when Triton
runs without ``hps serve`` (backend/hps/model.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SUPERVISED_ENV", "HangWatch", "Stub", "StubDeath", "StubWatch", "hung_versions", "stub_of"]

STUB_EXECUTABLE = "triton_python_backend_stub"
#: Set by ``hps serve`` in Triton's environment: it watches the stubs itself, so the backends'
#: watchdog (backend/stub_watchdog.py) stays off.
SUPERVISED_ENV = "HPS_SERVE_WATCHES_STUBS"
# A stub is learned within this long of its start (a few file reads per Triton thread); one that
# dies sooner is a failed load, which Triton reports itself.
_RESCAN_S = 1.0
# A stub Triton stops is a zombie for the moment before Triton's waitpid (seen in 19 of 30
# unloads polling every 0.5 ms; longer on a busy machine); one that died on its own stays a
# zombie for good. Generous: it delays the report of a real death by as much.
_CONFIRM_S = 1.0
_STUB_ARGS = 9  # stub, model.py, shm region, shm sizes ×2, parent pid, backend dir, ipc size, instance name
_METRIC_LINE = re.compile(r'^(nv_inference_pending_request_count|nv_inference_exec_count)\{([^}]*)\} (\S+)$', re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Stub:
    """One stub process: the model instance it runs."""

    pid: int
    model: str
    version: int
    instance: str  # Triton's instance name, e.g. hps_embedding_0_1


@dataclass(frozen=True)
class StubDeath:
    """A stub that ended without Triton stopping it."""

    stub: Stub
    cause: str  # "SIGKILL", "SIGSEGV", "exit 1", ...

    def describe(self) -> str:
        s = self.stub
        return f"stub of model '{s.model}' version {s.version} (instance {s.instance}, pid {s.pid}) died: {self.cause}"


def stub_of(pid: int) -> Stub | None:
    """The stub process ``pid`` runs, from its command line; None for any other process (or gone)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if len(argv) < _STUB_ARGS or not argv[0].endswith(STUB_EXECUTABLE.encode()):
        return None
    version_dir = Path(os.fsdecode(argv[1])).parent
    try:
        version = int(version_dir.name)
    except ValueError:
        return None
    return Stub(pid, version_dir.parent.name, version, os.fsdecode(argv[8]))


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (zombies included)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    # Only the main thread's children are listed there; Triton starts stubs from other threads.
    found = set(map(int, text.split()))
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found.update(map(int, (task / "children").read_text().split()))
    return sorted(found)


def _state_and_exit(pid: int, parent: int) -> tuple[str, int] | None:
    """``(state, exit status)`` of ``pid`` from /proc while it is a child of ``parent`` (None once
    it is gone: reaped, and its number maybe reused); the status is the wait(2) word (0 while it runs)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # comm may hold spaces and parentheses
    if int(fields[1]) != parent:
        return None
    # field 52 (exit_code) is the 50th after comm; older kernels lack it
    return fields[0], int(fields[49]) if len(fields) > 49 else 0


def _cause(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return signal.Signals(number).name
        return f"signal {number}"
    return f"exit {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else "died"


class StubWatch:
    """The stubs of the ``tritonserver`` process ``server_pid``; :meth:`dead` reports each death once."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._alive: dict[int, Stub] = {}
        self._reported: set[int] = set()  # zombies stay until the server exits: report each once
        self._stopped_since: dict[int, float] = {}  # stubs seen stopped (SIGSTOP, a tracer), since when
        self._scanned_at = -float("inf")  # last listing of the server's children
        self._zombie_since: dict[int, float] = {}  # stubs seen dead, not yet confirmed (see dead())

    def stubs(self) -> list[Stub]:
        """The stubs alive at the last :meth:`dead`."""
        return list(self._alive.values())

    def dead(self) -> list[StubDeath]:
        """Stubs that died since the last call; the server's children are listed again (to learn
        new stubs) at most every ``_RESCAN_S``: Triton has a hundred threads to list them from,
        while a known stub's state is one file."""
        now = time.monotonic()
        if now - self._scanned_at >= _RESCAN_S:
            self._scanned_at = now
            for pid in set(_children(self.server_pid)) - self._alive.keys() - self._reported:
                stub = stub_of(pid)
                if stub is not None:
                    self._alive[pid] = stub
        deaths = []
        for pid, stub in list(self._alive.items()):
            status = _state_and_exit(pid, self.server_pid)
            state = status[0] if status else ""
            if status is None:  # reaped by Triton: it stopped the stub itself
                del self._alive[pid]
            elif state == "Z" and now - self._zombie_since.setdefault(pid, now) >= _CONFIRM_S:
                del self._alive[pid]
                self._reported.add(pid)
                deaths.append(StubDeath(stub, _cause(status[1])))
            if state != "Z" or pid in self._reported:
                self._zombie_since.pop(pid, None)
            if state in ("T", "t"):
                self._stopped_since.setdefault(pid, now)
            else:
                self._stopped_since.pop(pid, None)
        return deaths

    def stopped(self, for_s: float) -> list[Stub]:
        """Stubs stopped (state T: SIGSTOP, a debugger) for ``for_s`` seconds or more at the last
        :meth:`dead`. Triton then fails each request to them with INTERNAL "not healthy" after
        its own health check times out, so no request stays pending for :class:`HangWatch`."""
        now = time.monotonic()
        return [self._alive[pid] for pid, since in self._stopped_since.items()
                if pid in self._alive and now - since >= for_s]

    def kill_model(self, model: str, version: int) -> list[Stub]:
        """SIGKILL the stubs of ``model`` version ``version`` (a hung one); the next :meth:`dead` reports them."""
        killed = [s for s in self._alive.values() if (s.model, s.version) == (model, version)]
        for stub in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stub.pid, signal.SIGKILL)
        return killed


def _metric_values(text: str) -> dict[str, dict[tuple[str, int], float]]:
    """``{metric: {(model, version): value}}`` for the two families :class:`HangWatch` reads."""
    values: dict[str, dict[tuple[str, int], float]] = {}
    for name, labels, value in _METRIC_LINE.findall(text):
        found = dict(_LABEL.findall(labels))
        with contextlib.suppress(KeyError, ValueError):
            values.setdefault(name, {})[(found["model"], int(found["version"]))] = float(value)
    return values


def hung_versions(samples: Sequence[tuple[float, str]], hang_s: float) -> set[tuple[str, int]]:
    """The model versions that had requests pending in every sample of the last ``hang_s``
    seconds while their execution count did not move. ``samples``: ``(time, metrics text)``,
    oldest first, as Triton's ``/metrics`` answered them; the oldest must be ``hang_s`` old."""
    if not samples:
        return set()
    now = samples[-1][0]
    first = max((i for i, (t, _) in enumerate(samples) if now - t >= hang_s), default=None)
    if first is None:
        return set()
    window = [_metric_values(text) for _, text in samples[first:]]
    hung = set()
    for key, executions in window[-1].get("nv_inference_exec_count", {}).items():
        pending = [values.get("nv_inference_pending_request_count", {}).get(key, 0.0) for values in window]
        if window[0].get("nv_inference_exec_count", {}).get(key) == executions and min(pending) > 0:
            hung.add(key)
    return hung


class HangWatch:
    """Samples a server's metrics text and tells which model versions hang (:func:`hung_versions`)."""

    def __init__(self, hang_s: float) -> None:
        self.hang_s = hang_s
        self._samples: list[tuple[float, str]] = []

    def add(self, metrics_text: str, now: float | None = None) -> set[tuple[str, int]]:
        """Record one scrape; the versions hung for ``hang_s`` up to it."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, metrics_text))
        # keep the newest sample older than the window: it starts the window judged
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.hang_s:
            self._samples.pop(0)
        return hung_versions(self._samples, self.hang_s)

    def reset(self) -> None:
        """Start the count again (after the hung versions were brought back)."""
        self._samples.clear()
