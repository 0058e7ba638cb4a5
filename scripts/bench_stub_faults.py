#!/usr/bin/env python3
"""What one fault costs a client of ``hps serve``: a stub killed or stopped, crashing requests.

One ``hps serve`` per kind of fault, over tests/hps_serve.py's repository (``hps_multi``: the
HPS backend on the host store and RocksDB; ``echo``: a Python model). A client sends the same
``hps_multi`` lookup back to back and asks its readiness every 50 ms:

* ``stub_kill``: SIGKILL of ``hps_multi``'s stub, ``--rounds`` times;
* ``stub_stop``: SIGSTOP of it (``--stub-hang-timeout 2``), ``--rounds`` times;
* ``crash``: ``--crashes`` HTTP/JSON requests that kill Triton 2.51, each sent once the server
  serves again, with the HTTP guard off (each is a restart; past ``--max-restarts`` 5 the
  restarts go on every ``--restart-backoff-max``, with the alarm), then as many through the
  guard (each refused with HTTP 400; no restart).

Per round: seconds from the fault until the last failed request and until a right answer
again; failed requests; wrong answers (an answer that differs from the one before the fault:
must be 0); readiness answers other than 200 (must be > 0 for a stub fault: while the model
is down it must not claim to be ready). Run from the repository root::

    .venv/bin/python scripts/bench_stub_faults.py --rounds 3 --crashes 7
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.hps_serve import (  # noqa: E402 - after the sys.path entry above
    CRASH_BODY,
    Repository,
    ServeProcess,
    Traffic,
    build_repository,
    scrape,
    send,
    serving,
    stub_pid,
    wait_until,
)

_DEADLINE_S = 300.0  # a round that has not recovered by then is reported as such


def _round(traffic: Traffic, fault: float) -> dict[str, float]:
    """Wait for the fault's failures to end and right answers to come back; the figures."""
    wait_until(lambda: any(t >= fault for t in traffic.failures), _DEADLINE_S)
    wrong_before = traffic.wrong
    while True:
        last = max([t for t in traffic.failures if t >= fault], default=fault)
        right = traffic.right
        time.sleep(0.5)
        if traffic.right > right and max(traffic.failures, default=0.0) <= last:
            break
        if time.monotonic() - fault > _DEADLINE_S:
            return {"last_failure_s": float("nan"), "failed": len(traffic.failures), "wrong": traffic.wrong,
                    "not_ready": len(traffic.not_ready)}
    return {
        "last_failure_s": last - fault,
        "failed": sum(t >= fault for t in traffic.failures),
        "wrong": traffic.wrong - wrong_before,
        "not_ready": sum(t >= fault for t in traffic.not_ready),
    }


def _stub_rounds(repository: Repository, kind: str, rounds: int) -> list[dict[str, float]]:
    args = ("--stub-hang-timeout", "2") if kind == "stub_stop" else ()
    rows = []
    with ServeProcess(repository, *args) as serve:
        ready = serve.wait_ready()
        for _ in range(rounds):
            with Traffic(ready) as traffic:
                wait_until(lambda: traffic.right > 20, _DEADLINE_S)
                fault = time.monotonic()
                os.kill(stub_pid(ready, "hps_multi_0_0"), signal.SIGKILL if kind == "stub_kill" else signal.SIGSTOP)
                rows.append(_round(traffic, fault))
        serve.stop()
    return rows


def _crash_rounds(repository: Repository, crashes: int, guarded: bool) -> tuple[list[float], set[int], str]:
    """Seconds until serving again after each crashing request, the HTTP statuses they got, and
    hps serve's own metrics at the end."""
    seconds, statuses = [], set()
    with ServeProcess(repository, *(() if guarded else ("--no-http-guard",))) as serve:
        starts = 1
        for _ in range(crashes):
            ready = serve.wait_ready(starts)
            sent = time.monotonic()
            try:
                statuses.add(send(ready.http, "/v2/models/echo/infer", CRASH_BODY)[0])
            except OSError:
                statuses.add(0)  # the connection broke: Triton died
                starts += 1
            ready = serve.wait_ready(starts, timeout=_DEADLINE_S)
            seconds.append(time.monotonic() - sent if wait_until(lambda: serving(ready), _DEADLINE_S) else float("nan"))
        assert ready.restarts_url is not None
        metrics = scrape(ready.restarts_url)
        serve.stop()
    return seconds, statuses, metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="faults of each stub kind (default: %(default)s)")
    parser.add_argument("--crashes", type=int, default=7, help="crashing requests, with and without the guard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stub-faults-") as root:
        repository = build_repository(Path(root))
        print(f"$ .venv/bin/python scripts/bench_stub_faults.py --rounds {args.rounds} --crashes {args.crashes}")
        print("| fault | round | last failed request (s after the fault) | failed requests | wrong answers | readiness ≠ 200 |")
        print("|---|---:|---:|---:|---:|---:|")
        for kind in ("stub_kill", "stub_stop"):
            for i, row in enumerate(_stub_rounds(repository, kind, args.rounds), 1):
                print(f"| {kind} | {i} | {row['last_failure_s']:.2f} | {row['failed']:.0f} | {row['wrong']:.0f} "
                      f"| {row['not_ready']:.0f} |", flush=True)
        for guarded in (False, True):
            seconds, statuses, metrics = _crash_rounds(repository, args.crashes, guarded)
            died = re.search(r'^hps_serve_restarts_total\{cause="SIGSEGV"\} (\d+)$', metrics, re.MULTILINE)
            alarm = re.search(r"^hps_serve_restart_limit_reached 1$", metrics, re.MULTILINE) is not None
            print(f"\ncrashing requests, {'through the HTTP guard' if guarded else 'HTTP guard off'}: "
                  f"{len(seconds)} sent; HTTP statuses {sorted(statuses)} (0: connection broken); serving again "
                  f"after each in {', '.join(f'{s:.1f}' for s in seconds)} s; Triton restarts "
                  f"{died.group(1) if died else 0}; restart-limit alarm {'raised' if alarm else 'not raised'}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
