"""hps_core.background: the bounded queue's sibling, a step repeated until its block ends."""

from __future__ import annotations

import threading

from hps_core.background import RepeatInBackground


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
