"""When Triton runs without ``hps serve``: a dead sibling stub stops the server instead of
leaving its model answering INTERNAL forever.

Triton 2.51 never replaces a Python stub that died, and keeps saying every model is ready
(hps_core/stub_watch.py). Under ``hps serve`` the supervisor reloads the model. Launched
directly (HugeCTR-style, under systemd, Kubernetes or ``docker --restart``), nothing inside
Triton can reload it: the repository API's address and token are unknown to a backend, and
the model control mode may be ``none``. So each instance of the ``hps`` and ``dlrm`` backends
watches the other stubs of its server and, when one dies, logs why and sends Triton SIGTERM:
it unloads what it can and exits, its liveness check fails, and whatever started it starts it
again with every stub. A server that stops is seen and restarted; one that answers INTERNAL
with readiness 200 is not. The model parameter ``hps_on_dead_stub`` chooses:

* ``stop_server`` (default): the above;
* ``log``: an ERROR line once per dead stub, nothing else (someone else watches).

Off under ``hps serve``, which says so in the environment (:data:`SUPERVISED_ENV`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

from hps_core.errors import ConfigError
from hps_core.stub_watch import SUPERVISED_ENV, StubDeath, StubWatch

__all__ = ["ON_DEAD_STUB", "StubWatchdog", "start_watchdog"]

#: The values of the model parameter ``hps_on_dead_stub``; the first is the default.
ON_DEAD_STUB = ("stop_server", "log")
_INTERVAL_S = 1.0  # how often the siblings are looked at: bounds the time a dead one goes unseen


class StubWatchdog:
    """A daemon thread watching the stubs of the Triton ``server_pid`` (this stub's parent)."""

    def __init__(self, server_pid: int, action: str, log_error: Callable[[str], None]) -> None:
        self._watch = StubWatch(server_pid)
        self._action = action
        self._log_error = log_error
        self._stop = threading.Event()
        self._watch.dead()  # the siblings alive now
        self._thread = threading.Thread(target=self._run, name="hps-stub-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_INTERVAL_S):
            deaths = [d for d in self._watch.dead() if d.stub.pid != os.getpid()]
            if deaths:
                self._react(deaths)

    def _react(self, deaths: list[StubDeath]) -> None:
        what = "; ".join(death.describe() for death in deaths)
        if self._action == "log":
            self._log_error(f"{what}. Triton answers INTERNAL for it until the model is reloaded "
                            "(hps_on_dead_stub: log; hps serve would reload it)")
            return
        self._log_error(f"{what}. Triton never replaces it and would answer INTERNAL for it while saying "
                        "ready: stopping Triton (SIGTERM) so that whatever started it starts it again "
                        "(model parameter hps_on_dead_stub: log keeps it running)")
        self._stop.set()
        os.kill(self._watch.server_pid, signal.SIGTERM)

    def close(self) -> None:
        self._stop.set()


def start_watchdog(action: str | None, model: str, log_error: Callable[[str], None]) -> StubWatchdog | None:
    """The watchdog for this stub (None under ``hps serve``); ``action`` is the model parameter
    ``hps_on_dead_stub`` (None: the default), refused by name when unknown."""
    action = action or ON_DEAD_STUB[0]
    if action not in ON_DEAD_STUB:
        raise ConfigError(f"model '{model}': parameter hps_on_dead_stub {action!r}: expected one of "
                          f"{', '.join(ON_DEAD_STUB)}")
    if os.environ.get(SUPERVISED_ENV):
        return None
    return StubWatchdog(os.getppid(), action, log_error)

