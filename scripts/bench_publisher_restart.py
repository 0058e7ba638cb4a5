#!/usr/bin/env python
"""Benchmark a long-lived publisher across a broker restart: updates published, delivered,
lost and re-sent.

One ``UpdateSink`` lives through the whole run against a tansu broker this script starts:

1. ``--calls`` publishes, a flush, and a reader (tests/kafka_broker.TopicReader) that has read
   them all;
2. one more publish, and the broker is SIGKILLed right after it (those messages in flight);
3. ``--calls`` publishes while it is down (over ``--down-s`` seconds);
4. the broker restarts on the same port, empty (tansu keeps nothing: topics, messages and
   producer ids are gone); ``--calls`` more publishes, one ``flush(--timeout)``.

The reader reads the topic throughout. *Lost* = published (key, vector) pairs it never read;
*wrong final* = keys whose last value read is not the last one published. The same run with
re-sending turned off (what ``UpdateSink`` did before it kept messages: report them
undelivered and drop them) is printed beside it.

Usage::

    .venv/bin/python scripts/bench_publisher_restart.py
    .venv/bin/python scripts/bench_publisher_restart.py --calls 50 --pairs 2000 --num-partitions 3

Writes ``<out>/bench_publisher_restart_<time>.json`` (default ``work/bench_updates/``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hps_core.errors import UpdateError  # noqa: E402
from hps_core.updates import UpdateSink, topic_name  # noqa: E402
from hps_demo.bench.harness import write_report  # noqa: E402
from tests.kafka_broker import KafkaBroker, TopicReader  # noqa: E402


class _NoResend(UpdateSink):
    """The sink without its re-sends: failed messages stay reported, never sent again."""

    def _resend(self) -> None:
        return None


def run(sink_class: type[UpdateSink], *, calls: int, pairs: int, dim: int, key_space: int, down_s: float,
        timeout: float, num_partitions: int | None, message_pairs: int, seed: int = 0) -> dict[str, Any]:
    """One run of the four phases (module doc) against a broker of its own."""
    rng = np.random.default_rng(seed)
    model = f"restart{uuid.uuid4().hex[:8]}"
    topic = topic_name(model, "t")
    published: list[tuple[np.ndarray, np.ndarray]] = []
    with KafkaBroker() as broker:
        sink = sink_class(broker.bootstrap, max_batch_size=message_pairs, num_partitions=num_partitions)

        def publish() -> None:
            keys = rng.integers(0, key_space, pairs, dtype=np.int64)
            values = rng.standard_normal((pairs, dim)).astype(np.float32)
            sink.publish(model, "t", keys, values)
            published.append((keys, values))

        for _ in range(calls):
            publish()
        sink.flush(60)
        reader = TopicReader(broker.bootstrap, topic, num_partitions or 4, dim)  # tansu auto-creates 4
        try:
            if not reader.wait_for(calls * pairs, 60):
                raise RuntimeError("the reader did not read the first phase")
            publish()
            broker.kill()
            killed = time.monotonic()
            for i in range(calls):
                publish()
                time.sleep(max(0.0, killed + down_s * (i + 1) / calls - time.monotonic()))
            broker.start()
            restarted = time.monotonic()
            reader.rewind()
            for _ in range(calls):
                publish()
            error = ""
            try:
                sink.flush(timeout)
            except UpdateError as exc:
                error = str(exc)
            flushed = time.monotonic()
            total = sum(k.size for k, _ in published)
            reader.wait_for(total, 30 if not error else 5)
            seen = reader.seen()
            got = reader.newest()
            read = reader.pairs
        finally:
            reader.close()
    lost = sum(int((k, v.tobytes()) not in seen) for keys, values in published
               for k, v in zip(keys.tolist(), values))
    newest: dict[int, np.ndarray] = {}
    for keys, values in published:
        newest.update(zip(keys.tolist(), values))
    wrong = sum(int(k not in got or not np.array_equal(got[k], v)) for k, v in newest.items())
    stats = sink.stats()
    return {"sink": "UpdateSink" if sink_class is UpdateSink else "UpdateSink without re-send",
            "updates_published": total, "messages_published": stats["messages"],
            "messages_delivered": stats["delivered"], "messages_resent": stats["resent"],
            "messages_pending": stats["pending"], "producer_restarts": stats["producer_restarts"],
            "updates_read": read, "updates_lost": lost, "keys": len(newest), "keys_wrong_final": wrong,
            "restart_to_flushed_s": round(flushed - restarted, 2), "flush_error": error}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20, help="publish calls per phase (default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=1000, help="updates per publish call (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=16, help="vector size (default: %(default)s)")
    parser.add_argument("--key-space", type=int, default=20_000, help="keys drawn from (default: %(default)s)")
    parser.add_argument("--message-pairs", type=int, default=100, help="pairs per message (default: %(default)s)")
    parser.add_argument("--down-s", type=float, default=2.0, help="seconds the broker stays down (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="the final flush's timeout (default: %(default)s)")
    parser.add_argument("--num-partitions", type=int, default=None,
                        help="create topics with this many partitions (default: the broker's auto-creation)")
    parser.add_argument("--baseline-timeout", type=float, default=20.0,
                        help="the final flush's timeout without re-send (default: %(default)s)")
    parser.add_argument("--out", default=str(REPO / "work" / "bench_updates"), help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.ERROR)  # the broker's absence is expected here
    common: dict[str, Any] = dict(calls=args.calls, pairs=args.pairs, dim=args.dim, key_space=args.key_space, down_s=args.down_s,
                  num_partitions=args.num_partitions, message_pairs=args.message_pairs)
    results = [run(UpdateSink, timeout=args.timeout, **common),
               run(_NoResend, timeout=args.baseline_timeout, **common)]
    for r in results:
        print(f"{r['sink']:27s} published {r['updates_published']:,} updates in {r['messages_published']:,} "
              f"messages; delivered {r['messages_delivered']:,} messages, re-sent {r['messages_resent']:,}, "
              f"pending {r['messages_pending']:,}; lost {r['updates_lost']:,} updates "
              f"({r['updates_lost'] / r['updates_published']:.1%}); keys with a wrong final value "
              f"{r['keys_wrong_final']:,} of {r['keys']:,}; restart → flushed {r['restart_to_flushed_s']} s",
              flush=True)
    write_report("bench_publisher_restart", argv, args.out, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
