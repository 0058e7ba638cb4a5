#!/usr/bin/env python3
"""How fast ``hps serve`` serves again after Triton dies, and what the dead server left behind.

One ``hps serve`` (tests/hps_serve.py's repository: an HPS model on RocksDB and a Python
model) is hit ``--rounds`` times by each kind of death:

* ``crash``: the HTTP/JSON request that kills Triton 2.51 (SIGSEGV);
* ``kill``: SIGKILL of tritonserver while eight requests are in flight.

A client sends good lookups back to back through every round; a failure is expected only
inside a restart window (from the death until both models answer again): the table counts
those that fail outside one. For each round: seconds from the death until both models
answer correctly again, and what is left of the dead server (live processes of its group, stubs using its /dev/shm prefix,
its /dev/shm regions, its staging folder). A recovery costs the restart policy's backoff
(doubling with each restart in the window) plus the kill and one start: the table shows the
backoff and the rest, set against the cold start of the same server (from ``hps serve``'s
launch to ready and answering). Run from the repository root::

    .venv/bin/python scripts/bench_recovery.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hps_core.background import RepeatInBackground  # noqa: E402 - after the sys.path entry above
from hps_core.supervisor import RestartPolicy  # noqa: E402
from tests.hps_serve import (  # noqa: E402
    Ready,
    ServeProcess,
    build_repository,
    echo_ok,
    hps_ok,
    kill_in_flight,
    leftovers,
    restarts,
    send_crash,
    serving,
    trace,
    wait_until,
)

DEADLINE_S = 300.0


def _crash(ready: Ready, pool: ThreadPoolExecutor) -> None:
    send_crash(ready.http)


DEATHS = {"crash": _crash, "kill": kill_in_flight}


class GoodTraffic:
    """One client sending good lookups back to back to ``address``; records when each ended and
    whether it was answered correctly."""

    def __init__(self, address: str) -> None:
        self._address = address
        self.results: list[tuple[float, bool]] = []
        self.loop = RepeatInBackground(self._send, name="good-traffic")

    def _send(self) -> None:
        ok = hps_ok(self._address)
        self.results.append((time.monotonic(), ok))
        if not ok:  # a dead server refuses at once: count tries, not a spin
            self.loop.stopping.wait(0.05)

    def failed_outside(self, windows: list[tuple[float, float]]) -> int:
        """Failures that ended outside every ``(start, end)`` restart window."""
        return sum(not ok and not any(a <= t <= b for a, b in windows) for t, ok in self.results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="deaths of each kind (default: %(default)s)")
    parser.add_argument("--backoff", type=float, default=1.0,
                        help="hps serve --restart-backoff (default: %(default)s, hps serve's own)")
    args = parser.parse_args()
    rows: list[tuple[str, float, dict[str, int]]] = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(8) as pool:
        repository = build_repository(Path(tmp))
        launched = time.monotonic()
        # Without the HTTP guard: it refuses the crashing request, which must reach Triton here.
        with ServeProcess(repository, "--restart-backoff", str(args.backoff), "--no-http-guard",
                          "--max-restarts", str(2 * args.rounds * len(DEATHS))) as serve:
            ready = serve.wait_ready(timeout=DEADLINE_S)
            wait_until(lambda: serving(ready), DEADLINE_S)
            cold = time.monotonic() - launched
            count = 1
            windows: list[tuple[float, float]] = []
            traffic = GoodTraffic(ready.http)  # the ports stay the same across restarts
            with traffic.loop:
                for kind, kill in DEATHS.items():
                    for _ in range(args.rounds):
                        dead = trace(ready)
                        started = time.monotonic()
                        kill(ready, pool)
                        count += 1
                        ready = serve.wait_ready(count, timeout=DEADLINE_S)
                        if not wait_until(lambda: serving(ready), DEADLINE_S):
                            raise SystemExit(f"not serving {DEADLINE_S:.0f} s after a {kind} (echo answers: "
                                             f"{echo_ok(ready.http)}, hps_multi answers: {hps_ok(ready.http)}):\n"
                                             f"{serve.output}")
                        windows.append((started, time.monotonic()))
                        rows.append((kind, windows[-1][1] - started, leftovers(dead)))
                time.sleep(1.0)  # some good traffic after the last recovery too
            sent = len(traffic.results)
            failed = sum(not ok for _, ok in traffic.results)
            outside = traffic.failed_outside(windows)
            assert ready.restarts_url is not None
            counted = {cause: restarts(ready.restarts_url, cause) for cause in ("SIGSEGV", "SIGKILL")}
            serve.stop()
    _print_table(cold, rows, args.backoff, counted)
    print(f"good lookups through every round: {sent} sent, {sent - failed} answered, {failed} failed "
          f"(retried every 50 ms while the server was down), {outside} failed outside a restart window")
    return 0


def _print_table(cold: float, rows: list[tuple[str, float, dict[str, int]]], backoff: float,
                 counted: dict[str, int]) -> None:
    policy = RestartPolicy(backoff_s=backoff)
    print(f"cold start (launch -> answering): {cold:.2f} s")
    print(f"{'death':<7}{'restart':>8}{'recovery s':>12}{'backoff s':>11}{'rest s':>8}{'rest/cold':>10}"
          f"{'processes':>11}{'stubs':>7}{'shm':>5}{'staging':>9}")
    rests: dict[str, list[float]] = {kind: [] for kind in DEATHS}
    for i, (kind, seconds, left) in enumerate(rows):
        wait = policy.delay(i)
        rests[kind].append(seconds - wait)
        print(f"{kind:<7}{i + 1:>8}{seconds:>12.2f}{wait:>11.1f}{seconds - wait:>8.2f}{(seconds - wait) / cold:>10.2f}"
              f"{left['processes']:>11}{left['stubs']:>7}{left['shm_regions']:>5}{left['staging']:>9}")
    for kind, values in rests.items():
        median = statistics.median(values)
        print(f"{kind}: median recovery beyond the backoff {median:.2f} s ({median / cold:.2f}x cold start)")
    print(f"hps_serve_restarts_total: {counted}")


if __name__ == "__main__":
    sys.exit(main())
