"""The serving side: consume HugeCTR update messages from Kafka and apply them to one tier.

One :class:`UpdateSource` per database layer (volatile, persistent), as in HugeCTR's
``HierParameterServer``: each layer is its own Kafka consumer group, so every layer (and
every non-shared database instance) sees every update once.

Consumer group (HugeCTR ``hier_parameter_server.cpp``): ``hps.volatile`` or
``hps.persistent``, plus ``.<hostname>`` when the database is not shared between hosts
(hash map, RocksDB; a Redis Cluster is shared). :func:`consumer_group_id` adds an optional
``instance`` suffix for databases that are private to one process (a hash map per Triton model
instance), which HugeCTR's one-server-per-host layout did not need.

Subscription: the regex ``^hps_et\\..*``; each topic name is then matched (``re.search``)
against the layer's ``update_filters`` (default ``^hps_.+$``), as HugeCTR's
``KafkaMessageSource`` applies its tag filters to topic names. Topics that no filter matches
are skipped (their offsets still advance).

Delivery: a background thread polls (``poll_timeout_ms``), decodes every message whole,
collects updates per table and applies them through an
:class:`~hps_core.updates.applier.UpdateApplier` in slices of at most ``max_batch_size``
keys, in arrival order (so the newest update of a key wins). It applies and then commits
(synchronously, ``enable.auto.commit = false``) when ``max_batch_size`` updates or
``max_commit_interval`` messages are pending, or when the consumer has caught up. Offsets are
committed only after the updates before them were applied: a consumer killed at any point
loses nothing; its successor re-applies at most the uncommitted tail (at-least-once; updates
are idempotent upserts). What an apply may raise, and what the source does (the retryable set
is stated once, as :data:`APPLY_RETRYABLE`, the apply's :class:`~hps_core.retry.RetryPolicy`):

- :data:`APPLY_RETRYABLE`, a failure that passes: a TierError (the tier down or busy) or a
  DeviceMemoryError (the GPU out of memory while a cache is refreshed). The slice is retried every
  ``failure_backoff_ms`` until it succeeds or the source is stopped (then nothing is committed).
- any other :class:`~hps_core.errors.HPSError` but a DeviceError (ConfigError, RequestError,
  MalformedMessage: the tier refuses these rows, and would refuse them again): the slice is counted in
  ``rejected_updates``, logged and skipped, like a malformed message; its offsets commit.
- anything else is a bug (TypeError, KeyError, ..., and any other DeviceError: an illegal
  memory access would fail forever): it stops the source like a bug in the
  consumer loop (below). The offsets of the batch are not committed, so a restarted source
  re-reads it and nothing is lost.

Only the slices that were applied count in ``updates_applied``, and only the messages whose
updates were all applied count in ``messages`` and the staleness window.

Malformed messages (bad magic, wrong vector size, truncated, unknown table) are counted,
logged and skipped; decoding happens before anything is applied, so a message is applied
whole or not at all, and its offset is committed like any other.

Non-finite rows: a message any row of which holds a NaN or an infinity is refused whole, right
after decoding (:func:`~hps_core.row_formats.non_finite_rows`, the check ``hps publish-model``
applies to a publication), so no tier and no cache ever sees it: its pairs are counted in
``rejected_updates`` and, of them, ``rejected_non_finite`` (the metric
``hps_update_rejected_total{reason="non_finite"}``), it is logged (one line per topic per
``log_interval``, naming the first bad key) and its offset commits: it is never retried. Per
message rather than per row because the message is the stream's unit of atomicity (a malformed
message is skipped whole too; a publication is refused whole for one bad row), and a NaN in a
trainer's output means that step diverged, so the finite rows published with it are suspect
as well; the previous value of each key stays served. :class:`~hps_core.updates.UpdateSink`
refuses such rows at send time, so only a foreign producer (HugeCTR's own sink) can send them.

Broker outages: librdkafka reconnects by itself; the thread backs off ``failure_backoff_ms``
and keeps polling, and recreates the consumer after a fatal Kafka error (``KafkaException`` or
:class:`~hps_core.errors.UpdateError`, retried under a :class:`~hps_core.retry.RetryPolicy`
until the source stops). Any other error escaping the loop (a consumer setting librdkafka
refuses, raised as ConfigError; a bug) is not retried: it is logged once with its traceback
and the source stops, visibly: ``stats()`` reports ``running: False`` and the error in
``stopped_by``. The consumer settings are checked before that: :meth:`UpdateSource.start`
creates the first consumer in the caller's thread, so a setting librdkafka refuses raises
ConfigError there (a server fails to start, naming it). Serving never waits on this thread. Every log line of the loop, librdkafka's own included, goes through a
:class:`~hps_core.logs.RateLimitedLog`: one line per cause per ``log_interval``, with a count
of those held back.

Staleness: for every applied message, (time the apply finished) − (the Kafka message
timestamp, set by the producer when it published); ``stats()`` reports p50/p99/max over
the last ``staleness_window`` messages.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, TopicPartition

from hps_core.arrays import Keys, Vectors
from hps_core.config import DEFAULT_UPDATE_FILTERS, ParameterServerConfig, UpdateSourceConfig
from hps_core.errors import ConfigError, DeviceError, HPSError, MalformedMessage, UpdateError
from hps_core.logs import DEFAULT_LOG_INTERVAL_S, RateLimitedLog
from hps_core.retry import RetryPolicy
from hps_core.row_formats import non_finite_rows
from hps_core.updates.applier import APPLY_RETRYABLE, UpdateApplier
from hps_core.updates.sink import KafkaClientLog, kafka_brokers, kafka_error_of
from hps_core.updates.wire import TOPIC_PREFIX, decode

__all__ = ["APPLY_RETRYABLE", "SUBSCRIPTION", "UpdateSource", "consumer_group_id"]

log = logging.getLogger(__name__)

SUBSCRIPTION = rf"^{TOPIC_PREFIX}\..*"  # librdkafka treats a leading '^' as a regex
_LAYERS = ("volatile", "persistent")
_GROUP_PREFIX = "hps."
_FINAL_COMMIT_WAIT_S = 5.0  # a graceful stop waits this long for its last commit to settle

def consumer_group_id(layer: str, *, shared: bool, hostname: str | None = None,
                      instance: str | None = None) -> str:
    """HugeCTR's group: ``hps.<layer>`` + ``.<hostname>`` unless the database is shared, +
    ``.<instance>`` if given (a database private to one process on the host)."""
    if layer not in _LAYERS:
        raise ConfigError(f"update source layer must be one of {_LAYERS}, got {layer!r}")
    group = _GROUP_PREFIX + layer
    if not shared:
        group += "." + (hostname or socket.gethostname())
    if instance:
        group += "." + instance
    return group


@dataclass
class _Counters:
    messages: int = 0  # messages applied (beacons and filtered topics excluded)
    updates_applied: int = 0  # (key, vector) pairs applied
    malformed: int = 0  # messages skipped as malformed (unknown_table included)
    unknown_table: int = 0
    filtered: int = 0  # messages of topics no update_filter matches
    apply_errors: int = 0  # failed apply attempts (APPLY_RETRYABLE: each retried)
    # updates refused, never applied nor retried: those of non-finite messages, and those of
    # slices the tier refused (an HPSError not retryable)
    rejected_updates: int = 0
    rejected_non_finite: int = 0  # of rejected_updates, those of messages holding NaN or infinity
    commits: int = 0
    commit_errors: int = 0
    broker_errors: int = 0  # consumer errors and error callbacks (outages, rebalances)
    consumer_restarts: int = 0
    lag_messages: int = 0  # high watermark − position over assigned partitions (cached)
    assigned_partitions: int = 0
    last_applied_time: float = 0.0  # epoch seconds of the last successful apply


@dataclass
class _Pending:
    """Decoded updates not yet applied, and the offsets they free for commit."""

    # per table, one (keys, values, publish timestamp in ms or None) per message, in arrival order
    chunks: dict[str, list[tuple[Keys, Vectors, int | None]]] = field(default_factory=dict)
    # per table being applied, the outcome (applied, refused) of each of its slices done so far
    done: dict[str, list[bool]] = field(default_factory=dict)
    updates: int = 0
    messages: int = 0  # messages taken since the last commit (all kinds)

    def add(self, table: str, keys: Keys, values: Vectors, timestamp_ms: int | None) -> None:
        self.chunks.setdefault(table, []).append((keys, values, timestamp_ms))
        self.updates += int(keys.shape[0])

    def clear(self) -> None:
        self.chunks.clear()
        self.done.clear()
        self.updates = 0
        self.messages = 0


class UpdateSource:
    """Consumes ``hps_et.*`` update topics for one database layer and applies them.

    Args:
        config: the HPS JSON ``update_source`` section (brokers, poll_timeout_ms,
            max_batch_size, failure_backoff_ms, max_commit_interval, receive_buffer_size,
            metadata_refresh_interval_ms).
        applier: receives decoded batches (``dim`` / ``apply``).
        layer: ``"volatile"`` or ``"persistent"`` (names the consumer group).
        update_filters: regexes on topic names; a message is applied if any matches.
        shared: whether the database is shared between hosts (Redis Cluster): drops the
            host name from the group id.
        key_dtype: ``np.int64`` (``supportlonglong: true``) or ``np.uint32``.
        group_id: overrides :func:`consumer_group_id` entirely.
        instance: suffix for a database private to one process (see :func:`consumer_group_id`).
        consumer_config: extra librdkafka settings, applied last.
        staleness_window: how many recent messages the staleness percentiles cover.
        log_interval: seconds between two log lines of the same cause (a broker that is down,
            an apply that keeps failing).
    """

    def __init__(self, config: UpdateSourceConfig, applier: UpdateApplier, *, layer: str,
                 update_filters: Sequence[str] = DEFAULT_UPDATE_FILTERS, shared: bool = False,
                 key_dtype: npt.DTypeLike = np.int64, group_id: str | None = None,
                 instance: str | None = None, consumer_config: Mapping[str, Any] | None = None,
                 staleness_window: int = 10_000, log_interval: float = DEFAULT_LOG_INTERVAL_S) -> None:
        if not update_filters:
            raise ConfigError("update_filters is empty: this layer would apply no update; "
                              "leave update_source out instead")
        try:
            self._filters = [re.compile(f) for f in update_filters]
        except re.error as exc:
            raise ConfigError(f"update_filters: invalid regular expression ({exc})") from exc
        self.config = config
        self.applier = applier
        self.layer = layer
        self.key_dtype = np.dtype(key_dtype)
        self.group_id = group_id or consumer_group_id(layer, shared=shared, instance=instance)
        self._consumer_conf = self._build_conf(config, consumer_config)
        self._backoff_s = config.failure_backoff_ms / 1000.0
        # APPLY_RETRYABLE is retried every failure_backoff_ms until it passes or the source
        # stops; see _apply for the other errors.
        self._apply_policy = RetryPolicy(retryable=APPLY_RETRYABLE, first_backoff_s=self._backoff_s, factor=1.0,
                                         max_backoff_s=self._backoff_s)
        # A consumer that failed for Kafka's reasons is recreated every failure_backoff_ms (at
        # least 0.5 s) until the source stops; any other error stops the source (see _run).
        restart_s = max(self._backoff_s, 0.5)
        self._consumer_policy = RetryPolicy(retryable=(KafkaException, UpdateError), first_backoff_s=restart_s,
                                            factor=1.0, max_backoff_s=restart_s)
        self._stopped_by: str | None = None  # the error that stopped the thread, if one did
        self._first_consumer: Consumer | None = None  # created by start(), consumed by the thread
        self._poll_s = max(config.poll_timeout_ms, 1) / 1000.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards counters and the staleness window
        self._counters = _Counters()
        self._staleness_s: deque[float] = deque(maxlen=staleness_window)
        self._pending = _Pending()
        self._offsets: dict[tuple[str, int], int] = {}  # (topic, partition) → next offset
        self._in_flight: dict[tuple[str, int], int] | None = None  # offsets sent, not yet settled
        self._log = RateLimitedLog(log, log_interval)

    @classmethod
    def for_layer(cls, cfg: ParameterServerConfig, layer: str, applier: UpdateApplier,
                  **kwargs: Any) -> UpdateSource:
        """The source of ``layer`` as an HPS JSON configures it: ``update_source``, the
        layer's ``update_filters``, shared when the volatile tier is a Redis Cluster, keys
        int64 or uint32 from ``supportlonglong``. ``kwargs`` go to the constructor."""
        db = {"volatile": cfg.volatile_db, "persistent": cfg.persistent_db}.get(layer)
        if db is None:
            raise ConfigError(f"update source layer must be one of {_LAYERS}, got {layer!r}")
        kwargs.setdefault("update_filters", db.update_filters)
        kwargs.setdefault("shared", db.type.shared)
        kwargs.setdefault("key_dtype", np.int64 if cfg.supportlonglong else np.uint32)
        return cls(cfg.update_source, applier, layer=layer, **kwargs)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> UpdateSource:
        """Start the background consumer thread (idempotent); returns self.

        The first consumer is created here, in the caller's thread (locally: no broker is
        contacted), so a consumer setting librdkafka refuses raises ConfigError to the caller
        instead of stopping the thread after start() returned.
        """
        if self._thread is not None and self._thread.is_alive():
            return self
        self._first_consumer = self._connect()
        self._stop.clear()
        self._stopped_by = None
        self._thread = threading.Thread(target=self._run, name=f"hps-updates-{self.layer}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop polling, apply and commit what is pending when possible, leave the group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._log.flush()  # the count of the last burst (a broker that went away, ...)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> UpdateSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Counters and staleness (seconds, publish timestamp → applied) over the window."""
        with self._lock:
            out: dict[str, Any] = dict(vars(self._counters))
            window = np.fromiter(self._staleness_s, dtype=np.float64)
        out["group_id"] = self.group_id
        out["running"] = self.running
        out["stopped_by"] = self._stopped_by  # None unless an error that is not Kafka's ended the thread
        out["staleness_samples"] = int(window.size)
        if window.size:
            p50, p99 = np.percentile(window, [50, 99])
            out.update(staleness_p50_s=float(p50), staleness_p99_s=float(p99),
                       staleness_max_s=float(window.max()))
        else:
            out.update(staleness_p50_s=None, staleness_p99_s=None, staleness_max_s=None)
        return out

    # ---------------------------------------------------------------- the thread

    @staticmethod
    def _build_conf(config: UpdateSourceConfig, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "bootstrap.servers": kafka_brokers(config.brokers),
            "enable.auto.commit": False,  # commit only after apply
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "message.max.bytes": config.receive_buffer_size + 1024,
            "receive.message.max.bytes": 128 * 1024 * 1024,
            "topic.metadata.refresh.interval.ms": config.metadata_refresh_interval_ms,
            "queued.max.messages.kbytes": 64 * 1024,
            # A broker may hold an idle fetch this long before answering (tansu always does):
            # it bounds publish-to-visible latency. librdkafka's default is 500 ms.
            "fetch.wait.max.ms": 50,
            # fast group join (HugeCTR: 30 s / 3 s; a join takes about session/2 on tansu)
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
        conf.update(extra or {})
        return conf

    def _run(self) -> None:
        """Consume until stopped, recreating the consumer after a Kafka failure; an error that
        is not Kafka's is logged once and ends the thread (never serving)."""
        def restart(failures: int, exc: BaseException) -> None:
            self._count(broker_errors=1, consumer_restarts=1)
            self._log.failure(f"update source {self.group_id}: consumer failed, restarting", exc)

        try:
            self._consumer_policy.call(self._connect_and_consume, sleep=self._stop.wait, on_retry=restart)
        except (KafkaException, UpdateError):
            pass  # stopped while the consumer kept failing
        except Exception as exc:  # a bug, or a setting Kafka refuses: retrying would fail forever
            self._stopped_by = f"{type(exc).__name__}: {exc}"
            log.exception("update source %s stopped: %s", self.group_id, exc)
        finally:
            if self._first_consumer is not None:  # never used (stopped before)
                self._close(self._first_consumer)
                self._first_consumer = None

    def _connect_and_consume(self) -> None:
        consumer, self._first_consumer = self._first_consumer or self._connect(), None
        try:
            self._consume(consumer)
        finally:
            self._close(consumer)

    def _connect(self) -> Consumer:
        conf = dict(self._consumer_conf, **{"group.id": self.group_id, "error_cb": self._on_error,
                                            "on_commit": self._on_commit,
                                            "logger": KafkaClientLog(self._log, f"update source {self.group_id}")})
        try:  # local only (no broker is contacted): a failure is a setting librdkafka refuses
            consumer = Consumer(conf)
        except KafkaException as exc:
            raise ConfigError(f"update source {self.group_id}: consumer settings: {exc}") from exc
        consumer.subscribe([SUBSCRIPTION], on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_lost)
        return consumer

    def _consume(self, consumer: Consumer) -> None:
        budget = self.config.max_commit_interval
        while not self._stop.is_set():
            messages = self._next_messages(consumer, budget)
            caught_up = len(messages) < budget
            for msg in messages:
                caught_up |= self._take(consumer, msg)
            due = (self._pending.updates >= self.config.max_batch_size
                   or self._pending.messages >= self.config.max_commit_interval)
            if due or (caught_up and (self._pending.messages or self._offsets)):
                if not self._flush(consumer):
                    return  # stopped while an apply was failing: commit nothing
            if caught_up:
                self._update_lag(consumer)
        self._flush(consumer)  # graceful stop: apply and commit what was taken
        self._settle_commits(consumer)

    def _next_messages(self, consumer: Consumer, budget: int) -> list[Any]:
        """Up to ``budget`` messages: what is queued already, else wait up to poll_timeout_ms
        for the first one and take it with whatever came along. (``consume(n, timeout)``
        alone would hold the first message back until n arrived or the timeout passed.)"""
        messages: list[Any] = consumer.consume(num_messages=budget, timeout=0)
        if messages:
            return messages
        first = consumer.poll(self._poll_s)
        if first is None:
            return []
        return [first, *consumer.consume(num_messages=budget - 1, timeout=0)] if budget > 1 else [first]

    def _take(self, consumer: Consumer, msg: Any) -> bool:
        """Decode one message into the pending batch; True when a partition reached its end."""
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return True
            if err.fatal():
                raise KafkaException(err)
            self._count(broker_errors=1)
            self._warn(f"consume:{err.code()}", "update source %s: %s", self.group_id, err.str())
            self._stop.wait(self._backoff_s)
            return False
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        self._offsets[(topic, partition)] = offset + 1
        self._pending.messages += 1
        if not any(f.search(topic) for f in self._filters):
            self._count(filtered=1)
            return False
        payload = msg.value()
        if payload is None:  # a tombstone: HugeCTR ignores it
            return False
        dim = self.applier.dim(topic)
        try:
            if dim is None:
                self._count(unknown_table=1)
                raise MalformedMessage(f"unknown table {topic!r}: not deployed on this server")
            if msg.key():
                raise MalformedMessage("message has a Kafka key; HugeCTR update messages have none")
            keys, values = decode(payload, dim, self.key_dtype)
        except MalformedMessage as exc:
            self._count(malformed=1)
            self._warn(f"malformed:{topic}", "update source %s: skipped message %s[%d]@%d: %s",
                       self.group_id, topic, partition, offset, exc)
            return False
        bad = non_finite_rows(values)
        if bad.shape[0]:  # refused whole, before any tier or cache sees it (module docstring)
            n = int(keys.shape[0])
            self._count(rejected_updates=n, rejected_non_finite=n)
            self._warn(f"non_finite:{topic}", "update source %s: refused message %s[%d]@%d: %d of its %d rows hold "
                       "NaN or infinity (the first: key %d); none of its rows is applied, the keys keep their "
                       "previous values; fix the producer (a diverged training step?)",
                       self.group_id, topic, partition, offset, bad.shape[0], n, int(keys[bad[0]]))
            return False
        if keys.shape[0]:
            ts_type, ts = msg.timestamp()
            self._pending.add(topic, keys, values, None if ts_type == TIMESTAMP_NOT_AVAILABLE else ts)
        return False

    def _flush(self, consumer: Consumer, *, wait: bool = False) -> bool:
        """Apply everything pending, then commit the offsets (``wait``: synchronously);
        False if stopped mid-apply. A bug raised by the applier propagates (it stops the
        source) after the batch and its offsets are dropped: nothing of it is committed."""
        if not self._apply_pending():
            return False  # stopped while the apply kept failing: commit nothing
        self._commit(consumer, wait=wait)
        return True

    def _apply_pending(self) -> bool:
        """Apply everything pending (see :meth:`_flush`); False if stopped mid-apply.

        What is done leaves the batch as it is done: a table once all its slices are applied
        (or refused), and within a table the slices so far (``_Pending.done``), so a later
        flush (the revoke at the consumer's close) applies and counts only the rest, in order.
        """
        pending = self._pending
        step = self.config.max_batch_size
        try:
            for table in list(pending.chunks):
                chunks = pending.chunks[table]
                keys = np.concatenate([k for k, _, _ in chunks])
                values = np.concatenate([v for _, v, _ in chunks])
                applied = pending.done.setdefault(table, [])  # slice boundaries stay multiples of step
                for start in range(len(applied) * step, keys.shape[0], step):
                    outcome = self._apply(table, keys[start:start + step], values[start:start + step])
                    if outcome is None:
                        return False  # stopped while the apply kept failing: commit nothing
                    applied.append(outcome)
                self._record_applied(chunks, applied, step)
                del pending.chunks[table], pending.done[table]
        except Exception:
            pending.clear()  # a restarted source re-reads these from the last commit
            self._offsets.clear()
            raise
        pending.clear()
        return True

    def _apply(self, table: str, keys: Keys, values: Vectors) -> bool | None:
        """Apply one slice under the apply policy: True when applied, False when the tier
        refused it (skipped), None when stopped while it kept failing.

        :data:`APPLY_RETRYABLE` is retried every failure_backoff_ms. Any other HPSError (the
        tier refusing these rows) is never retried: the slice is counted in
        ``rejected_updates``, logged with its traceback and skipped, like a malformed message.
        Anything else (another DeviceError included) is a bug: it propagates and stops the
        source (see :meth:`_flush`).
        """
        def failed(attempts: int, exc: BaseException) -> None:
            self._count(apply_errors=1)
            self._warn(f"apply:{table}", "update source %s: applying %d updates to %s failed: %s",
                       self.group_id, keys.shape[0], table, exc)

        try:
            self._apply_policy.call(lambda: self.applier.apply(table, keys, values),
                                    sleep=self._stop.wait, on_retry=failed)
        except self._apply_policy.retryable:
            return None
        except DeviceError:  # not out of memory: the GPU is broken for good, retrying fails forever
            raise
        except HPSError as exc:  # refused, and would be again: never retried, never blocks the stream
            self._count(apply_errors=1, rejected_updates=int(keys.shape[0]))
            self._log.failure(f"update source {self.group_id}: skipped updates to {table}", exc)
            return False
        self._count(updates_applied=int(keys.shape[0]))
        return True

    def _record_applied(self, chunks: Sequence[tuple[Keys, Vectors, int | None]], applied: Sequence[bool],
                        step: int) -> None:
        """Count the messages of one table whose slices were all applied, and their staleness."""
        sizes = np.fromiter((k.shape[0] for k, _, _ in chunks), dtype=np.int64, count=len(chunks))
        ends = np.cumsum(sizes)
        refused = np.concatenate([[0], np.cumsum(~np.asarray(applied, dtype=bool))])
        whole = refused[(ends - 1) // step + 1] == refused[(ends - sizes) // step]  # no refused slice
        now = time.time()
        ages = [now - ts / 1000.0 for (_, _, ts), ok in zip(chunks, whole.tolist()) if ok and ts is not None]
        with self._lock:
            self._counters.messages += int(whole.sum())
            if any(applied):
                self._counters.last_applied_time = now
            self._staleness_s.extend(ages)

    def _commit(self, consumer: Consumer, *, wait: bool = False) -> None:
        """Commit the applied offsets; offsets stay in ``_offsets`` until a commit of them succeeds.

        Asynchronous by default (``_on_commit`` settles them): a synchronous commit waits for
        the group coordinator, so with the broker away it would stall this thread, and with it
        the error callbacks that only ``poll`` serves, until the broker returns. ``wait`` is for
        handing partitions over in a rebalance, which the coordinator drives while it is up:
        there the commit must land before the next owner reads, or it re-applies the tail.
        """
        if not self._offsets or (not wait and self._offsets == self._in_flight):
            return
        snapshot = dict(self._offsets)
        offsets = [TopicPartition(t, p, o) for (t, p), o in snapshot.items()]
        try:
            if wait:
                self._on_commit(None, consumer.commit(offsets=offsets, asynchronous=False))
            else:
                consumer.commit(offsets=offsets, asynchronous=True)
                self._in_flight = snapshot
        except KafkaException as exc:  # no coordinator, or a rebalance: try again at the next flush
            self._commit_failed(kafka_error_of(exc) or exc)

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self._in_flight = None
        failed = err or next((tp.error for tp in partitions if tp.error is not None), None)
        if failed is not None:  # broker away or rebalancing: the offsets go with the next commit
            self._commit_failed(failed)
            return
        for tp in partitions:
            if self._offsets.get((tp.topic, tp.partition)) == tp.offset:
                del self._offsets[(tp.topic, tp.partition)]
        self._count(commits=1)

    def _commit_failed(self, err: object) -> None:
        self._count(commit_errors=1)
        self._warn("commit", "update source %s: offset commit failed: %s", self.group_id, err)

    def _settle_commits(self, consumer: Consumer) -> None:
        """Serve callbacks until the last commit is answered, for at most a few seconds."""
        deadline = time.monotonic() + _FINAL_COMMIT_WAIT_S
        while self._in_flight is not None and time.monotonic() < deadline:
            consumer.poll(0.1)  # a message taken here is neither applied nor committed: re-read later

    def _update_lag(self, consumer: Consumer) -> None:
        try:
            assignment = consumer.assignment()
            positions = consumer.position(assignment) if assignment else []
            lag = 0
            for tp in positions:
                _, high = consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0 and tp.offset >= 0:
                    lag += max(0, high - tp.offset)
        except KafkaException:
            return
        with self._lock:
            self._counters.lag_messages = lag
            self._counters.assigned_partitions = len(assignment)

    def _close(self, consumer: Consumer) -> None:
        try:
            consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.debug("update source %s: close: %s", self.group_id, exc)

    # ---------------------------------------------------------------- callbacks (this thread)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("update source %s: assigned %d partitions", self.group_id, len(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Hand the partitions over cleanly: apply and commit what was taken from them.
        self._flush(consumer, wait=True)
        self._forget(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget(partitions)  # cannot commit for them any more; the new owner re-reads

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._offsets.pop((tp.topic, tp.partition), None)

    def _on_error(self, err: KafkaError) -> None:
        self._count(broker_errors=1)
        self._warn(f"error:{err.code()}", "update source %s: Kafka: %s", self.group_id, err.str())

    # ---------------------------------------------------------------- helpers

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self._counters, name, getattr(self._counters, name) + value)

    def _warn(self, cause: str, message: str, *args: Any) -> None:
        self._log.warning(f"update source {self.group_id}: {cause}", message % args)
