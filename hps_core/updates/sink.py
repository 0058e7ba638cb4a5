"""The training side: publish changed embeddings to Kafka in HugeCTR's wire format.

``UpdateSink(brokers).publish(model, table, keys, values)`` sends the pairs to topic
``hps_et.<model>.<table>``. Keys are partitioned as HugeCTR does (``wire.partitions_for_keys``:
XXH3 key group → partition), so all updates of one key go to one partition and are applied
in publish order. Each partition's pairs are cut into messages of at most ``max_batch_size``
pairs and ``send_buffer_size`` bytes. Grouping is one counting sort
(``hps_core.grouping.group_by``); the only Python loop is per message. A call whose rows hold a
NaN or an infinity raises :class:`~hps_core.errors.RowValueError` naming the first key, before
anything is queued (:func:`~hps_core.row_formats.non_finite_rows`, the check every server
applies to each message it receives and ``hps publish-model`` to a publication).

Delivery is at least once, across broker restarts. The sink keeps every message it produced
until the broker acknowledges it (and every message before it in its partition), in publish
order per partition. :meth:`UpdateSink.flush` waits for the acknowledgements; when librdkafka
gives up on a message (broker gone longer than ``message.timeout.ms``, a restarted broker that
forgot the producer id or the topic, a fatal producer error), ``flush`` waits until nothing is
in flight, backs off, replaces the producer and re-sends every kept message of the affected
partitions in their original order, also those acknowledged after the failed one, so that the
last value published for a key is also the last one applied. It repeats until everything is
acknowledged, the deadline passes, or ``max_idle_rounds`` re-send rounds in a row delivered
nothing; then it raises :class:`~hps_core.errors.UpdateError` saying how many messages are
still undelivered, which stay kept for the next ``flush``. A re-sent message may be applied
twice; the consumers apply upserts, so that is harmless.

Not every failure is worth a re-send (:func:`_failure_kind`): a message the broker refuses as
such (too large, invalid) is dropped and reported; a broker that refuses the topic or the
producer (authorization, authentication, an unsupported request) stops the flush at once with
an UpdateError naming the cause and the topic, the messages kept; a partition that no longer
exists (a topic deleted and auto-created again with fewer partitions) makes the sink re-read
the topic's partition count and report the messages of the lost partitions as rejected:
sending them to another partition would reorder the updates of their keys.

Kept messages are bounded by ``max_pending_bytes``: a ``publish`` that would exceed it first
waits (serving acknowledgements and re-sends) up to ``block_timeout`` seconds for room, then
raises UpdateError without queuing anything of that call.

Producer settings follow HugeCTR's ``KafkaMessageSink`` (idempotence on, so librdkafka's own
retries neither reorder nor duplicate; no compression; ``message.max.bytes = send_buffer_size +
1024``), except ``linger.ms`` (5 ms instead of 100 ms, for fresher updates) and
``message.timeout.ms`` (10 s instead of librdkafka's 300 s: how long one producer keeps trying
before the sink takes over; an idempotent producer whose broker restarted without its state
never recovers by itself, so waiting longer only delays the re-send). librdkafka's errors and
log lines go through :class:`~hps_core.logs.RateLimitedLog`: a broker that is down reports the
same error several times a second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # where it is defined (confluent_kafka.admin re-exports it)

from hps_core.errors import ConfigError, RowValueError, UpdateError
from hps_core.grouping import group_by
from hps_core.logs import DEFAULT_LOG_INTERVAL_S, RateLimitedLog
from hps_core.retry import RetryPolicy
from hps_core.row_formats import non_finite_rows
from hps_core.updates.wire import (
    DEFAULT_NUM_KEY_GROUPS,
    DEFAULT_SEND_BUFFER_SIZE,
    HEADER_SIZE,
    frame,
    pack,
    partitions_for_keys,
    topic_name,
)

__all__ = ["FlushResult", "KafkaClientLog", "UpdateSink", "kafka_brokers"]

log = logging.getLogger(__name__)

_METADATA_TIMEOUT_S = 10.0
_CREATE_TIMEOUT_S = 2.0  # re-creating lost topics before a re-send round
_QUEUE_FULL_BACKOFF_S = 0.05  # HugeCTR's queue_full_backoff_delay_
_POLL_S = 0.1  # how often a waiting flush or publish looks at the deadline
_DEFAULT_MAX_IDLE_ROUNDS = 20  # ~4 min of a broker that stays down (10 s message timeout + 2 s)
#: Errors of the message itself that no re-send can cure: it is dropped and the flush raises.
_REJECTED = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError.INVALID_MSG,
                       KafkaError.INVALID_RECORD, KafkaError.TOPIC_EXCEPTION, KafkaError._INVALID_ARG})
#: The broker refuses the topic or this producer, whatever is sent: the flush raises at once
#: and the messages stay kept (an operator fixes the ACL or the credentials, then flushes again).
_DENIED = frozenset({KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
                     KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                     KafkaError.DELEGATION_TOKEN_AUTHORIZATION_FAILED, KafkaError.SASL_AUTHENTICATION_FAILED,
                     KafkaError._AUTHENTICATION, KafkaError.POLICY_VIOLATION, KafkaError.INVALID_REQUIRED_ACKS,
                     KafkaError.UNSUPPORTED_VERSION, KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
                     KafkaError.UNSUPPORTED_COMPRESSION_TYPE, KafkaError._UNSUPPORTED_FEATURE})
#: The message's partition is not in the topic's metadata: re-read the partition count.
_UNKNOWN_PARTITION = frozenset({KafkaError._UNKNOWN_PARTITION})

_FailureKind = Literal["rejected", "denied", "unknown_partition", "retry"]


def _failure_kind(code: int) -> _FailureKind:
    """What a failed delivery (librdkafka error ``code``) means for its message.

    ``"rejected"``: the message itself is refused for good (dropped, reported by ``flush``);
    ``"denied"``: the broker refuses the topic or the producer, which no re-send cures
    (``flush`` raises at once, the message kept); ``"unknown_partition"``: its partition is
    gone (the partition count is re-read; if the partition no longer exists the message is
    rejected); ``"retry"``: anything else (broker down, timed out, a poisoned producer) is
    re-sent, in rounds bounded by ``max_idle_rounds``.
    """
    if code in _REJECTED:
        return "rejected"
    if code in _DENIED:
        return "denied"
    if code in _UNKNOWN_PARTITION:
        return "unknown_partition"
    return "retry"


def kafka_error_of(exc: BaseException) -> KafkaError | None:
    """The KafkaError a confluent-kafka KafkaException carries (its code, ``fatal()``), or None."""
    err = exc.args[0] if exc.args else None
    return err if isinstance(err, KafkaError) else None


def translate_kafka(exc: BaseException, what: str) -> UpdateError:
    """The UpdateError a confluent-kafka failure enters hps_core as, for the sink and the
    source alike: ``"<what>: <the Kafka error>"``, chained by the caller (``from exc``)."""
    return UpdateError(f"{what}: {exc}")


def kafka_brokers(brokers: str) -> str:
    """HPS JSON ``brokers`` (``host[:port][;host[:port]...]``, commas also accepted) →
    librdkafka's comma-separated ``bootstrap.servers``."""
    parts = [p.strip() for p in brokers.replace(";", ",").split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"update_source.brokers {brokers!r} names no broker; use host:port")
    return ",".join(parts)


class KafkaClientLog:
    """librdkafka's ``logger``: its log lines through a :class:`RateLimitedLog`, one cause per
    facility and level (a down broker logs ``FAIL`` on every reconnect attempt)."""

    def __init__(self, limiter: RateLimitedLog, client: str) -> None:
        self._limiter = limiter
        self._client = client

    def log(self, level: int, fmt: str, *args: Any) -> None:
        """Called by confluent-kafka as ``log(level, "%s [%s] %s", facility, name, text)``."""
        facility = str(args[0]) if args else "?"
        self._limiter.log(level, f"{self._client} librdkafka {facility} {level}", f"{self._client}: " + fmt % args)


_Stop = Literal["deadline", "denied", "idle"]  # why _drive stopped before done


@dataclass(frozen=True)
class FlushResult:
    """What a :meth:`UpdateSink.flush` did, counted in messages since the previous flush."""

    delivered: int  # messages acknowledged (each once, however often it was sent)
    resent: int  # re-sends (a message sent three times counts two)
    pending: int  # messages not acknowledged yet: kept, and re-sent by the next flush
    pending_bytes: int  # their payload bytes (bounded by max_pending_bytes)
    rejected: int  # messages refused for good (too large, invalid, their partition gone): dropped


@dataclass(eq=False)
class _Message:
    """One produced message, kept until it and every message before it in its partition are
    acknowledged."""

    topic: str
    partition: int
    payload: bytes
    attempt: int = 0  # sends so far; delivery reports of an earlier attempt are ignored
    done: bool = False  # acknowledged (or rejected) since its last send
    delivered: bool = False  # acknowledged at least once (counted once in ``delivered``)


class UpdateSink:
    """Publishes embedding updates (HugeCTR's ``KafkaMessageSink``), at least once.

    Args:
        brokers: ``host:port`` (``;``- or ``,``-separated list).
        max_batch_size: most (key, vector) pairs per Kafka message.
        send_buffer_size: most bytes per message, header included (HugeCTR: 256 KiB; the
            consumer's ``receive_buffer_size`` should be at least this).
        num_key_groups: HugeCTR's key groups (8); the partition is ``group % partitions``.
        key_dtype: ``np.int64`` (``supportlonglong: true``) or ``np.uint32``.
        num_partitions: if set, topics are created with this many partitions when missing
            (also again after a broker lost them; the broker's auto-creation is then not used).
        max_pending_bytes: most payload bytes kept unacknowledged; a ``publish`` beyond it
            waits for room (see ``block_timeout``). One call larger than this is let through
            alone.
        block_timeout: seconds a ``publish`` waits for room before raising UpdateError.
        max_idle_rounds: re-send rounds in a row that deliver nothing before a ``flush`` (or
            a ``publish`` waiting for room) gives up with UpdateError, the messages kept; each
            round lasts up to ``message.timeout.ms`` (10 s) plus a backoff of up to 2 s.
        log_interval: seconds between two log lines of the same cause (broker errors).
        producer_config: extra librdkafka settings, applied last.

    One thread at a time may publish and flush (calls are serialised); ``stats`` may be
    called from any thread.
    """

    def __init__(self, brokers: str, *, max_batch_size: int = 8 * 1024,
                 send_buffer_size: int = DEFAULT_SEND_BUFFER_SIZE,
                 num_key_groups: int = DEFAULT_NUM_KEY_GROUPS,
                 key_dtype: npt.DTypeLike = np.int64, num_partitions: int | None = None,
                 max_pending_bytes: int = 256 << 20, block_timeout: float = 60.0,
                 max_idle_rounds: int = _DEFAULT_MAX_IDLE_ROUNDS,
                 log_interval: float = DEFAULT_LOG_INTERVAL_S,
                 producer_config: Mapping[str, Any] | None = None) -> None:
        for name, value, low in (("max_batch_size", max_batch_size, 1),
                                 ("send_buffer_size", send_buffer_size, 1024),
                                 ("num_key_groups", num_key_groups, 1),
                                 ("max_pending_bytes", max_pending_bytes, 1),
                                 ("max_idle_rounds", max_idle_rounds, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"UpdateSink {name} must be an integer >= {low}, got {value!r}")
        self._bootstrap = kafka_brokers(brokers)
        self.max_batch_size = max_batch_size
        self.send_buffer_size = send_buffer_size
        self.num_key_groups = num_key_groups
        self.key_dtype = np.dtype(key_dtype)
        self.num_partitions = num_partitions
        self.max_pending_bytes = max_pending_bytes
        self.block_timeout = block_timeout
        self.max_idle_rounds = max_idle_rounds
        # Re-send rounds: 0.1 s before the first, doubling up to 2 s (jittered: every producer of
        # a restarted broker comes back at once), reset by any progress;
        # the flush gives up after max_idle_rounds rounds in a row that settled nothing. A
        # round's own UpdateError (broker still away) is logged and left to the next round.
        self._resend_policy = RetryPolicy(retryable=(UpdateError,), first_backoff_s=0.1, factor=2.0,
                                          max_backoff_s=2.0, max_attempts=max_idle_rounds, jitter=0.5)
        self._log = RateLimitedLog(log, log_interval)
        self._conf: dict[str, Any] = {
            "bootstrap.servers": self._bootstrap,
            "enable.idempotence": True,  # HugeCTR: "DO NOT CHANGE"; keeps per-partition order
            "compression.codec": "none",
            "message.max.bytes": send_buffer_size + 1024,
            "queue.buffering.max.messages": 64 * 1024,
            "queue.buffering.max.kbytes": 1024 * 1024,
            "batch.num.messages": 8 * 1024,
            "linger.ms": 5,
            # librdkafka retries a message itself (idempotently, in order) for this long, then
            # reports it failed and the sink re-sends it through a new producer (module doc).
            "message.timeout.ms": 10_000,
            "retries": 2**31 - 1,
            "retry.backoff.ms": 100,
            "retry.backoff.max.ms": 1000,
            # a topic re-created with a different partition count would break key → partition
            "allow.auto.create.topics": num_partitions is None,
            "error_cb": self._on_error,
            "logger": KafkaClientLog(self._log, f"update sink ({self._bootstrap})"),
        }
        self._conf.update(producer_config or {})
        self._producer = Producer(self._conf)
        self._partitions: dict[str, int] = {}
        self._serial = threading.RLock()  # one publish / flush at a time
        self._lock = threading.Lock()  # counters and kept messages (delivery reports, stats)
        self._kept: dict[tuple[str, int], deque[_Message]] = {}
        self._pending = 0  # kept messages
        self._pending_bytes = 0
        self._fatal: str | None = None  # a fatal producer error: replace the producer
        self._denied: dict[str, str] = {}  # topic → why the broker refuses it (this drive)
        self._unknown_partitions: set[str] = set()  # topics whose partition count to re-read
        self._last_error = ""
        self._first_rejection = ""
        self._messages = 0
        self._pairs = 0
        self._bytes = 0
        self._delivered = 0
        self._resent = 0
        self._failed = 0  # failed delivery attempts (each re-sent)
        self._rejected = 0
        self._broker_errors = 0
        self._producer_restarts = 0
        self._since_flush = (0, 0, 0)  # delivered, resent, rejected at the last flush
        self.last_flush: FlushResult | None = None

    # ---------------------------------------------------------------- publishing

    def publish(self, model: str, table: str, keys: npt.ArrayLike, values: npt.ArrayLike) -> int:
        """Queue updates of ``hps_et.<model>.<table>``; returns the number of messages.

        keys: (n,) integer (int64, or uint32-range with ``key_dtype=np.uint32``).
        values: (n, dim) float32, finite: a row holding NaN or infinity raises RowValueError
        naming its key, and nothing of the call is sent (the servers refuse such a message whole,
        see hps_core/updates/source.py). Returns once queued (after waiting for room when
        ``max_pending_bytes`` are unacknowledged); call :meth:`flush` to wait for delivery.
        """
        return self.publish_topic(topic_name(model, table), keys, values)

    def publish_topic(self, topic: str, keys: npt.ArrayLike, values: npt.ArrayLike) -> int:
        """:meth:`publish` to an already qualified topic name."""
        rows = pack(keys, values, self.key_dtype)
        bad = non_finite_rows(rows["value"])  # as float32: a float64 beyond its range is an infinity too
        if bad.shape[0]:
            first = int(bad[0])
            raise RowValueError(
                f"publish to {topic}: {bad.shape[0]} of the {rows.shape[0]} rows hold NaN or infinity (the first: "
                f"row {first}, key {int(rows['key'][first])}); nothing of this call was sent, since every server "
                "refuses such a message whole; fix those embeddings (a diverged training step?) or leave their "
                "keys out",
                position=first,
            )
        if rows.shape[0] == 0:
            return 0
        per_message = min(self.max_batch_size, (self.send_buffer_size - HEADER_SIZE) // rows.dtype.itemsize)
        if per_message < 1:
            raise ConfigError(
                f"send_buffer_size {self.send_buffer_size} cannot hold one {rows.dtype.itemsize}-byte pair"
            )
        with self._serial:
            count = self._partition_count(topic)
            parts = partitions_for_keys(rows["key"], count, self.num_key_groups, self.key_dtype)
            order, bounds = group_by(parts, count)  # stable: repeated keys keep publish order
            rows = rows[order]
            messages = [
                _Message(topic, partition, frame(rows[start:min(start + per_message, int(bounds[partition + 1]))]))
                for partition in range(count)
                for start in range(int(bounds[partition]), int(bounds[partition + 1]), per_message)
            ]
            self._wait_for_room(sum(len(m.payload) for m in messages))
            for message in messages:
                self._keep(message)
                self._send(message)
            with self._lock:
                self._pairs += rows.shape[0]
            self._serve(0)
        return len(messages)

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait until every message is acknowledged, re-sending what the broker did not take
        (``timeout`` seconds; None: no limit). Returns what happened since the last flush.

        Raises UpdateError when messages are still unacknowledged at the timeout, after
        ``max_idle_rounds`` re-send rounds that delivered nothing, or as soon as the broker
        refuses a topic for good (authorization): those are kept and re-sent by the next
        flush. Also when the broker rejected messages for good (too large, invalid, their
        partition gone): those are dropped. :attr:`last_flush` holds the result either way.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._serial:
            stopped = self._drive(lambda: self._pending == 0, deadline)
            with self._lock:
                delivered, resent, rejected = self._since_flush
                result = FlushResult(delivered=self._delivered - delivered, resent=self._resent - resent,
                                     pending=self._pending, pending_bytes=self._pending_bytes,
                                     rejected=self._rejected - rejected)
                self._since_flush = (self._delivered, self._resent, self._rejected)
                first_rejection = self._first_rejection
                self._first_rejection = ""
            self.last_flush = result
        if stopped is not None:
            raise UpdateError(f"{self._why_pending(stopped, timeout)}; they are kept and re-sent by the next flush()")
        if result.rejected:
            raise UpdateError(f"{result.rejected} update messages were rejected by {self._bootstrap} and "
                              f"dropped; first: {first_rejection}")
        return result

    def stats(self) -> dict[str, int]:
        """Counters: messages/pairs/bytes queued; messages delivered (once each), re-sent,
        rejected; failed delivery attempts; messages and bytes pending (kept, unacknowledged);
        broker errors reported; producers replaced."""
        with self._lock:
            return {"messages": self._messages, "pairs": self._pairs, "bytes": self._bytes,
                    "delivered": self._delivered, "resent": self._resent, "failed": self._failed,
                    "rejected": self._rejected, "pending": self._pending,
                    "pending_bytes": self._pending_bytes, "broker_errors": self._broker_errors,
                    "producer_restarts": self._producer_restarts}

    def close(self, timeout: float | None = 30.0) -> FlushResult:
        """Flush (raising UpdateError as :meth:`flush` does: what is still pending is lost
        with the sink unless ``flush`` is called again), then log what the rate limit held back."""
        try:
            return self.flush(timeout)
        finally:
            self._log.flush()

    def __enter__(self) -> UpdateSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _keep(self, message: _Message) -> None:
        with self._lock:
            self._kept.setdefault((message.topic, message.partition), deque()).append(message)
            self._pending += 1
            self._pending_bytes += len(message.payload)
            self._messages += 1
            self._bytes += len(message.payload)

    def _send(self, message: _Message) -> None:
        """Produce ``message`` (again); a local error marks it failed, to be re-sent."""
        with self._lock:
            if message.attempt:
                self._resent += 1
            message.attempt += 1
            message.done = False
            attempt = message.attempt
        report = partial(self._on_delivery, message, attempt)
        while True:
            try:
                self._producer.produce(message.topic, value=message.payload, partition=message.partition,
                                       on_delivery=report)
                return
            except BufferError:  # local queue full: serve callbacks, back off, retry
                self._serve(_QUEUE_FULL_BACKOFF_S)
            except KafkaException as exc:  # unknown partition, fatal producer error, ...
                err = kafka_error_of(exc)
                if err is None:
                    raise translate_kafka(exc, f"cannot publish to {message.topic!r}") from exc
                if err.fatal():
                    self._fatal = err.str()
                report(err, None)
                return

    def _wait_for_room(self, size: int) -> None:
        def room() -> bool:
            return self._pending == 0 or self._pending_bytes + size <= self.max_pending_bytes

        stopped = self._drive(room, time.monotonic() + self.block_timeout)
        if stopped is not None:
            raise UpdateError(f"{self._why_pending(stopped, self.block_timeout)}; max_pending_bytes is "
                              f"{self.max_pending_bytes}, so this publish of {size} bytes was not queued")

    def _drive(self, done: Callable[[], bool], deadline: float | None) -> _Stop | None:
        """Serve delivery reports and re-send what failed until ``done()``; None once done,
        else why it stopped: the deadline passed, the broker denied a topic, or
        ``max_idle_rounds`` re-send rounds in a row settled nothing."""
        with self._lock:
            self._denied.clear()  # each flush tries a denied topic once more
        progress = self._settled()
        idle = 0
        while not done():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return "deadline"
            step = _POLL_S if remaining is None else min(_POLL_S, remaining)
            if self._fatal is not None and len(self._producer):
                self._producer.purge()  # a fatal producer delivers nothing more: fail it all now
            if len(self._producer):
                self._serve(step, flush=True)
                continue
            # Nothing in flight and something kept: every kept partition starts with a failure.
            if self._denied:
                return "denied"  # no re-send cures it; flush again once the broker allows it
            settled = self._settled()
            if settled > progress:
                progress, idle = settled, 0
            elif self._resend_policy.exhausted(idle):
                return "idle"
            pause = self._resend_policy.pause(idle + 1)
            time.sleep(pause if remaining is None else min(pause, remaining))
            if deadline is not None and time.monotonic() >= deadline:
                return "deadline"
            self._resend()
            idle += 1
        return None

    def _settled(self) -> int:
        """Messages acknowledged or rejected so far: what a re-send round counts as progress."""
        with self._lock:
            return self._delivered + self._rejected

    def _why_pending(self, stopped: _Stop, waited: float | None) -> str:
        """What is still pending and why the sink stopped trying, for an UpdateError."""
        with self._lock:
            pending = (f"{self._pending} update messages ({self._pending_bytes} bytes) not acknowledged by "
                       f"{self._bootstrap}")
            last_error = self._last_error or "none reported"
            denied = ", ".join(f"topic {topic!r} ({why})" for topic, why in sorted(self._denied.items()))
        if stopped == "denied":
            return (f"{pending}: the broker refuses {denied}, which no re-send cures; grant this producer "
                    "Write on the topic (ACLs), or check its credentials and the broker's version")
        if stopped == "idle":
            return (f"{pending} after {self.max_idle_rounds} re-send rounds in a row that delivered nothing "
                    f"(last error: {last_error})")
        return f"{pending} within {waited} s ({self._resent} re-sends so far; last error: {last_error})"

    def _resend(self) -> None:
        """A new producer (the old one may be poisoned: a restarted broker forgot its
        producer id, or a fatal error), then every kept message in partition order."""
        self._producer = Producer(self._conf)
        self._fatal = None
        with self._lock:
            self._producer_restarts += 1
            topics = sorted({topic for topic, _ in self._kept})
            stale, self._unknown_partitions = self._unknown_partitions, set()
        if self.num_partitions is not None:  # a broker that lost its data lost the topics too
            try:
                self._create_topics(topics, self.num_partitions, _CREATE_TIMEOUT_S)
            except UpdateError as exc:
                self._log.failure("update sink: re-creating topics", exc, level=logging.WARNING)
        for topic in sorted(stale):
            self._reject_lost_partitions(topic)
        with self._lock:
            kept = [m for queue in self._kept.values() for m in queue]
        for message in kept:
            self._send(message)
        self._serve(0)

    def _serve(self, timeout: float, *, flush: bool = False) -> None:
        """Serve delivery reports (``flush``: and send what lingers at once). confluent-kafka
        raises a fatal producer error here (an idempotent producer whose id the broker forgot):
        it marks the producer for replacement, and its messages fail and are re-sent."""
        try:
            if flush:
                self._producer.flush(timeout)
            else:
                self._producer.poll(timeout)
        except KafkaException as exc:
            err = kafka_error_of(exc)
            if err is None or not err.fatal():
                raise translate_kafka(exc, f"Kafka producer ({self._bootstrap}) failed") from exc
            self._fatal = err.str()
            self._log.warning(f"update sink: fatal {err.name()}",
                              f"Kafka producer ({self._bootstrap}): fatal error, replacing the producer: {err.str()}")

    def _reject_lost_partitions(self, topic: str) -> None:
        """Re-read ``topic``'s partition count (a partition was reported unknown) and reject
        the kept messages of partitions it no longer has. They are not re-partitioned: the
        updates of a key would then be applied out of publish order."""
        before = self._partitions.pop(topic, None)
        try:
            count = self._partition_count(topic)
        except UpdateError as exc:  # broker still away: try again next round
            self._log.failure("update sink: re-reading partitions", exc, level=logging.WARNING)
            with self._lock:
                self._unknown_partitions.add(topic)
            return
        with self._lock:
            lost = sorted(key for key in self._kept if key[0] == topic and key[1] >= count)
            if not lost:
                return
            dropped = 0
            for key in lost:
                for message in self._kept.pop(key):
                    self._pending -= 1
                    self._pending_bytes -= len(message.payload)
                    if not message.delivered:
                        dropped += 1
            self._rejected += dropped
            reason = (
                f"topic {topic!r} now has {count} partitions (it had {before or lost[-1][1] + 1}), so "
                f"{dropped} update messages of its partitions {[p for _, p in lost]} cannot be delivered and "
                "were dropped: sending them to another partition would reorder the updates of their keys (all "
                "updates of a key go to one partition, in publish order); re-create the topic with its "
                "partition count, or publish those keys again"
            )
            self._last_error = reason
            self._first_rejection = self._first_rejection or reason
        self._log.error(f"update sink: partitions lost: {topic}", f"update sink: {reason}")

    def _partition_count(self, topic: str) -> int:
        count = self._partitions.get(topic)
        if count is not None:
            return count
        if self.num_partitions is not None:
            self._create_topics([topic], self.num_partitions, _METADATA_TIMEOUT_S)
        deadline = time.monotonic() + _METADATA_TIMEOUT_S
        while True:  # auto-created topics may take a moment to show partitions
            try:
                meta = self._producer.list_topics(topic, timeout=_METADATA_TIMEOUT_S).topics.get(topic)
            except KafkaException as exc:
                raise translate_kafka(exc, f"cannot read metadata of topic {topic!r} from {self._bootstrap}") from exc
            if meta is not None and meta.error is None and meta.partitions:
                count = len(meta.partitions)
                break
            if time.monotonic() >= deadline:
                reason = meta.error if meta is not None else "no metadata"
                raise UpdateError(
                    f"topic {topic!r} is not available on {self._bootstrap} ({reason}); create it, "
                    "or enable the broker's topic auto-creation, or pass num_partitions"
                )
            time.sleep(0.1)
        self._partitions[topic] = count
        return count

    def _create_topics(self, topics: list[str], partitions: int, timeout: float) -> None:
        """Create ``topics`` where missing (an existing topic is left as it is)."""
        conf: dict[str, Any] = {"bootstrap.servers": self._bootstrap,
                                "logger": KafkaClientLog(self._log, f"update sink admin ({self._bootstrap})")}
        admin = AdminClient(conf)  # held until the futures resolve: its destruction fails them
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics],
            operation_timeout=timeout, request_timeout=timeout)
        for topic, future in futures.items():
            try:
                future.result(timeout=timeout)
            except KafkaException as exc:
                err = kafka_error_of(exc)
                if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                raise translate_kafka(exc, f"cannot create topic {topic!r} on {self._bootstrap}") from exc

    def _on_delivery(self, message: _Message, attempt: int, err: KafkaError | None, _msg: Any) -> None:
        with self._lock:
            if attempt != message.attempt:
                return  # a report of an earlier send: the message went out again since
            if err is not None:
                self._last_error = f"{message.topic}[{message.partition}]: {err.str()}"
                kind = _failure_kind(err.code())
                if kind != "rejected":
                    self._failed += 1
                    if kind == "denied":
                        self._denied.setdefault(message.topic, f"{err.name()}: {err.str()}")
                    elif kind == "unknown_partition":
                        self._unknown_partitions.add(message.topic)
                    return  # kept: re-sent by the next round (after a re-read of the partitions)
                self._rejected += 1
                self._first_rejection = self._first_rejection or self._last_error
            elif not message.delivered:
                message.delivered = True
                self._delivered += 1
            message.done = True
            key = (message.topic, message.partition)
            queue = self._kept[key]
            while queue and queue[0].done:  # release the acknowledged prefix of the partition
                self._pending -= 1
                self._pending_bytes -= len(queue.popleft().payload)
            if not queue:
                del self._kept[key]
        if err is not None:
            self._log.error(f"update sink: rejected: {err.name()}", f"update sink: {self._last_error}; dropped")

    def _on_error(self, err: KafkaError) -> None:
        with self._lock:
            self._broker_errors += 1
        if err.fatal():
            self._fatal = err.str()
        self._log.warning(f"update sink: {err.name()}", f"Kafka producer ({self._bootstrap}): {err.str()}")
