"""Online embedding updates: HugeCTR's Kafka stream from training into every tier.

- :mod:`~hps_core.updates.wire`: HugeCTR's message format ('HCTR' header, packed pairs),
  topic names ``hps_et.<model>.<table>``, key → partition.
- :class:`UpdateSink`: the training side (``hps publish``), at least once across broker
  restarts; ``flush`` returns a :class:`FlushResult`.
- :class:`UpdateSource`: the serving side, one consumer group per database layer, commits
  after apply.
- :class:`TierUpdateApplier`: applies batches into an EmbeddingTier, with an ``on_applied``
  hook for cache refresh.

Errors: :class:`~hps_core.errors.UpdateError`, and its subclass :class:`~hps_core.errors.MalformedMessage`
for payloads that break the format.
"""

from __future__ import annotations

from hps_core.errors import MalformedMessage, UpdateError
from hps_core.updates.applier import OnApplied, TierUpdateApplier, UpdateApplier
from hps_core.updates.sink import FlushResult, UpdateSink
from hps_core.updates.source import UpdateSource, consumer_group_id
from hps_core.updates.wire import decode, encode, parse_topic, topic_name

__all__ = [
    "FlushResult",
    "MalformedMessage",
    "OnApplied",
    "TierUpdateApplier",
    "UpdateApplier",
    "UpdateError",
    "UpdateSink",
    "UpdateSource",
    "consumer_group_id",
    "decode",
    "encode",
    "parse_topic",
    "topic_name",
]
