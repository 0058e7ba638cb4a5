"""The training side: publish changed embeddings to Kafka in HugeCTR's wire format.

``UpdateSink(brokers).publish(model, table, keys, values)`` sends the pairs to topic
``hps_et.<model>.<table>``. Keys are partitioned as HugeCTR does (``wire.partitions_for_keys``:
XXH3 key group → partition), so all updates of one key go to one partition and are applied
in publish order; the producer is idempotent, so retries neither reorder nor duplicate.
Each partition's pairs are cut into messages of at most ``max_batch_size`` pairs and
``send_buffer_size`` bytes. Grouping is one stable argsort; the only Python loop is per
message. ``flush()`` waits for every message to be acknowledged and raises
:class:`~hps_core.errors.UpdateError` if any delivery failed.

Producer settings follow HugeCTR's ``KafkaMessageSink`` (idempotence on, no compression,
``message.max.bytes = send_buffer_size + 1024``), except ``linger.ms``: 5 ms instead of
HugeCTR's 100 ms, for fresher updates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from hps_core.errors import ConfigError, UpdateError
from hps_core.updates.wire import (
    DEFAULT_NUM_KEY_GROUPS,
    DEFAULT_SEND_BUFFER_SIZE,
    HEADER_SIZE,
    frame,
    pack,
    partitions_for_keys,
    topic_name,
)

__all__ = ["UpdateSink", "kafka_brokers"]

log = logging.getLogger(__name__)

_METADATA_TIMEOUT_S = 10.0
_QUEUE_FULL_BACKOFF_S = 0.05  # HugeCTR's queue_full_backoff_delay_


def kafka_brokers(brokers: str) -> str:
    """HPS JSON ``brokers`` (``host[:port][;host[:port]...]``, commas also accepted) →
    librdkafka's comma-separated ``bootstrap.servers``."""
    parts = [p.strip() for p in brokers.replace(";", ",").split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"update_source.brokers {brokers!r} names no broker; use host:port")
    return ",".join(parts)


class UpdateSink:
    """Publishes embedding updates (HugeCTR's ``KafkaMessageSink``).

    Args:
        brokers: ``host:port`` (``;``- or ``,``-separated list).
        max_batch_size: most (key, vector) pairs per Kafka message.
        send_buffer_size: most bytes per message, header included (HugeCTR: 256 KiB; the
            consumer's ``receive_buffer_size`` should be at least this).
        num_key_groups: HugeCTR's key groups (8); the partition is ``group % partitions``.
        key_dtype: ``np.int64`` (``supportlonglong: true``) or ``np.uint32``.
        num_partitions: if set, topics are created with this many partitions when missing
            (else the broker's auto-creation decides).
        producer_config: extra librdkafka settings, applied last.
    """

    def __init__(self, brokers: str, *, max_batch_size: int = 8 * 1024,
                 send_buffer_size: int = DEFAULT_SEND_BUFFER_SIZE,
                 num_key_groups: int = DEFAULT_NUM_KEY_GROUPS,
                 key_dtype: npt.DTypeLike = np.int64, num_partitions: int | None = None,
                 producer_config: Mapping[str, Any] | None = None) -> None:
        for name, value, low in (("max_batch_size", max_batch_size, 1),
                                 ("send_buffer_size", send_buffer_size, 1024),
                                 ("num_key_groups", num_key_groups, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"UpdateSink {name} must be an integer >= {low}, got {value!r}")
        self._bootstrap = kafka_brokers(brokers)
        self.max_batch_size = max_batch_size
        self.send_buffer_size = send_buffer_size
        self.num_key_groups = num_key_groups
        self.key_dtype = np.dtype(key_dtype)
        self.num_partitions = num_partitions
        conf: dict[str, Any] = {
            "bootstrap.servers": self._bootstrap,
            "enable.idempotence": True,  # HugeCTR: "DO NOT CHANGE"; keeps per-partition order
            "compression.codec": "none",
            "message.max.bytes": send_buffer_size + 1024,
            "queue.buffering.max.messages": 64 * 1024,
            "queue.buffering.max.kbytes": 1024 * 1024,
            "batch.num.messages": 8 * 1024,
            "linger.ms": 5,
            "error_cb": self._on_error,
        }
        conf.update(producer_config or {})
        self._producer = Producer(conf)
        self._partitions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._failed = 0  # deliveries failed since the last flush
        self._first_failure = ""
        self._messages = 0
        self._pairs = 0
        self._bytes = 0
        self._delivered = 0

    # ---------------------------------------------------------------- publishing

    def publish(self, model: str, table: str, keys: npt.ArrayLike, values: npt.ArrayLike) -> int:
        """Queue updates of ``hps_et.<model>.<table>``; returns the number of messages.

        keys: (n,) integer (int64, or uint32-range with ``key_dtype=np.uint32``).
        values: (n, dim) float32. Returns once queued; call :meth:`flush` to wait for delivery.
        """
        return self.publish_topic(topic_name(model, table), keys, values)

    def publish_topic(self, topic: str, keys: npt.ArrayLike, values: npt.ArrayLike) -> int:
        """:meth:`publish` to an already qualified topic name."""
        rows = pack(keys, values, self.key_dtype)
        if rows.shape[0] == 0:
            return 0
        per_message = min(self.max_batch_size, (self.send_buffer_size - HEADER_SIZE) // rows.dtype.itemsize)
        if per_message < 1:
            raise ConfigError(
                f"send_buffer_size {self.send_buffer_size} cannot hold one {rows.dtype.itemsize}-byte pair"
            )
        count = self._partition_count(topic)
        parts = partitions_for_keys(rows["key"], count, self.num_key_groups, self.key_dtype)
        order = np.argsort(parts, kind="stable")  # stable: repeated keys keep publish order
        rows = rows[order]
        bounds = np.concatenate(([0], np.cumsum(np.bincount(parts, minlength=count))))
        sent = 0
        for partition in range(count):
            for start in range(int(bounds[partition]), int(bounds[partition + 1]), per_message):
                stop = min(start + per_message, int(bounds[partition + 1]))
                self._produce(topic, partition, frame(rows[start:stop]))
                sent += 1
        with self._lock:
            self._pairs += rows.shape[0]
        return sent

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued message is acknowledged (``timeout`` seconds; None: no limit).

        Raises UpdateError when messages are still undelivered at the timeout, or when any
        delivery since the last flush failed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 5.0 if deadline is None else max(0.0, min(5.0, deadline - time.monotonic()))
            left = self._producer.flush(wait)
            if left == 0:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise UpdateError(f"{left} update messages not delivered to {self._bootstrap} in {timeout} s")
        with self._lock:
            failed, first = self._failed, self._first_failure
            self._failed, self._first_failure = 0, ""
        if failed:
            raise UpdateError(f"{failed} update messages were not delivered; first: {first}")

    def stats(self) -> dict[str, int]:
        """Counters: messages/pairs/bytes queued, messages delivered, delivery failures pending."""
        with self._lock:
            return {"messages": self._messages, "pairs": self._pairs, "bytes": self._bytes,
                    "delivered": self._delivered, "failed": self._failed}

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush (raising UpdateError as :meth:`flush` does) and release the producer."""
        self.flush(timeout)

    def __enter__(self) -> UpdateSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _produce(self, topic: str, partition: int, payload: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, value=payload, partition=partition,
                                       on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: serve callbacks, back off, retry
                self._producer.poll(_QUEUE_FULL_BACKOFF_S)
            except KafkaException as exc:
                raise UpdateError(f"cannot publish to {topic!r} partition {partition}: {exc}") from exc
        with self._lock:
            self._messages += 1
            self._bytes += len(payload)
        self._producer.poll(0)

    def _partition_count(self, topic: str) -> int:
        count = self._partitions.get(topic)
        if count is not None:
            return count
        if self.num_partitions is not None:
            self._create_topic(topic, self.num_partitions)
        deadline = time.monotonic() + _METADATA_TIMEOUT_S
        while True:  # auto-created topics may take a moment to show partitions
            try:
                meta = self._producer.list_topics(topic, timeout=_METADATA_TIMEOUT_S).topics.get(topic)
            except KafkaException as exc:
                raise UpdateError(f"cannot read metadata of topic {topic!r} from {self._bootstrap}: {exc}") from exc
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

    def _create_topic(self, topic: str, partitions: int) -> None:
        admin = AdminClient({"bootstrap.servers": self._bootstrap})
        future = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic]
        try:
            future.result(timeout=_METADATA_TIMEOUT_S)
        except KafkaException as exc:
            if exc.args and getattr(exc.args[0], "code", lambda: None)() == KafkaError.TOPIC_ALREADY_EXISTS:
                return
            raise UpdateError(f"cannot create topic {topic!r} on {self._bootstrap}: {exc}") from exc

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        with self._lock:
            if err is None:
                self._delivered += 1
            else:
                if not self._failed:
                    self._first_failure = f"{msg.topic()}[{msg.partition()}]: {err.str()}"
                self._failed += 1

    def _on_error(self, err: KafkaError) -> None:
        log.warning("Kafka producer (%s): %s", self._bootstrap, err.str())
