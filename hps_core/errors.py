"""Exceptions raised by the parameter server.

Every error the library raises derives from :class:`HPSError`, so a caller (the Triton
backend, the CLI) can tell ours from bugs. Third-party errors (rocksdict, redis, kafka) are
translated where they enter, ``raise TierError(...) from exc``::

    HPSError
     ├── ConfigError        an HPS JSON or model setting is invalid (names field and file)
     ├── FormatError        a sparse model folder or table file is malformed
     ├── RequestError       a lookup request is malformed (wrong dtype, shape, counts)
     │    └── UnknownTableError   a table or model that is not deployed
     └── TierError          a storage tier failed (I/O, connection); callers degrade to the next tier
          ├── TierBusyError  another process holds the tier exclusively (RocksDB's write lock)
          └── PartialTierError  some nodes of a tier answered a fetch and some failed: carries
                                the rows found and the keys whose node failed
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "ConfigError",
    "FormatError",
    "HPSError",
    "PartialTierError",
    "RequestError",
    "TierBusyError",
    "TierError",
    "UnknownTableError",
]


class HPSError(Exception):
    """Base of every error raised by hps_core."""


class ConfigError(HPSError, ValueError):
    """An HPS configuration value is missing, invalid or unsupported."""


class FormatError(HPSError, ValueError):
    """A sparse model folder or table file does not have the expected layout or size."""


class RequestError(HPSError, ValueError):
    """A lookup request is malformed; the message names the input and the problem."""


class UnknownTableError(RequestError, KeyError):
    """A request or call names a model or table that is not deployed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TierError(HPSError):
    """A storage tier failed to answer; the lookup falls through to the next tier."""


class TierBusyError(TierError):
    """Another process holds the tier exclusively for now (RocksDB's write lock); retry later."""


class PartialTierError(TierError):
    """A batched fetch that some of the tier's nodes answered and some could not (a Redis node
    down, refusing or timing out).

    The rows of the keys the healthy nodes hold are already written to the caller's ``out``:
    ``found`` (n,) bool marks them, ``failed`` (n,) bool the keys whose node failed (neither
    found nor known to be absent). A caller that handles only :class:`TierError` stays
    correct: it treats the whole tier as missing and asks the next tier for every key.
    """

    def __init__(self, message: str, found: npt.NDArray[np.bool_], failed: npt.NDArray[np.bool_]) -> None:
        super().__init__(message)
        self.found = found
        self.failed = failed


# Online updates (hps_core.updates), appended to the tree above:
#     HPSError
#      └── UpdateError           the Kafka update path failed (broker unreachable, delivery failed)
#           └── MalformedMessage  (hps_core.updates.wire) a message breaks HugeCTR's wire format
class UpdateError(HPSError):
    """The online-update path (Kafka sink or source) failed: broker unreachable, delivery
    failed, a message that cannot be applied."""


__all__ += ["UpdateError"]
