"""hps_core.background: the bounded queue's sibling, a step repeated until stopped, back to back or periodically."""

from __future__ import annotations

import threading
import time

from hps_core.background import RepeatInBackground
from hps_core.errors import TierError


def test_repeats_until_the_block_ends_and_finishes_the_running_step() -> None:
    steps: list[int] = []
    three = threading.Event()

    def step() -> None:
        steps.append(len(steps))
        if len(steps) == 3:
            three.set()

    loop = RepeatInBackground(step)
    with loop:
        assert three.wait(30)
    done = len(steps)
    assert done >= 3 and loop.stopping.is_set()
    assert steps == list(range(done))  # one thread, in order, and nothing runs after the exit
    assert len(steps) == done


def test_a_periodic_step_waits_its_first_delay_then_its_interval() -> None:
    times: list[float] = []
    twice = threading.Event()

    def step() -> None:
        times.append(time.monotonic())
        if len(times) == 2:
            twice.set()

    started = time.monotonic()
    loop = RepeatInBackground(step, interval_s=0.2, first_delay_s=0.05)
    loop.start()
    assert twice.wait(30)
    loop.stop()
    assert times[0] - started >= 0.05 and times[1] - times[0] >= 0.2
    assert len(times) in (2, 3)


def test_a_failing_step_goes_to_on_error_and_the_loop_goes_on() -> None:
    errors: list[Exception] = []
    calls: list[int] = []
    three = threading.Event()

    def step() -> None:
        calls.append(1)
        if len(calls) >= 3:
            three.set()
        raise TierError("down")

    with RepeatInBackground(step, on_error=errors.append):
        assert three.wait(30)
    assert len(errors) == len(calls) >= 3 and all(isinstance(e, TierError) for e in errors)


def test_a_loop_never_started_stops_at_once_and_a_first_delay_is_cut_short() -> None:
    RepeatInBackground(lambda: None).stop()
    ran: list[int] = []
    loop = RepeatInBackground(lambda: ran.append(1), interval_s=60.0)
    loop.start()
    loop.stop()  # during the first delay (one interval): returns without running the step
    assert ran == []
