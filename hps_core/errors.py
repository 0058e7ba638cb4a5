"""Exceptions raised by the parameter server: every exception class of hps_core is here.

Every error the library raises derives from :class:`HPSError`, so a caller (the Triton
backend, the CLI) can tell ours from bugs. Third-party errors are translated where they
enter, ``raise TierError(...) from exc``, by one helper per library beside the module that
owns it: ``translate_redis`` (hps_core.db.redis_cluster), ``translate_rocksdb``
(hps_core.db.rocksdb), ``translate_kafka`` (hps_core.updates.sink), ``translate_cupy``
(hps_core.cache.gpu). Which of these errors are worth another attempt is data, a
:class:`~hps_core.retry.RetryPolicy`. The tree (tests/hps_core/test_errors.py checks it
against the classes below)::

    HPSError
     ├── ConfigError        an HPS JSON or model setting is invalid (names field and file)
     ├── FormatError        a sparse model folder or table file is malformed
     ├── RequestError       a lookup request is malformed (wrong dtype, shape, counts)
     │    ├── UnknownTableError   a table or model that is not deployed
     │    └── RowValueError       a row its table's format cannot store (NaN, inf, out of range)
     ├── TierError          a storage tier failed (I/O, connection); callers degrade to the next tier
     │    ├── TierBusyError     another process holds the tier exclusively (RocksDB's write lock)
     │    ├── PartialTierError  some nodes of a tier answered a fetch and some failed: carries
     │    │                     the rows found and the keys whose node failed
     │    └── StoredWidthError  a stored row's size is not its table's width (written with another dim)
     ├── CacheFullError     a static cache table has no room for the new keys of a replace
     ├── DeviceError        the GPU failed (CuPy/CUDA: a kernel that does not compile, an illegal access)
     │    └── DeviceMemoryError  the GPU ran out of memory: passes, so the update source retries it
     ├── UpdateError        the Kafka update path failed (broker unreachable, delivery failed)
     │    └── MalformedMessage  a message breaks HugeCTR's wire format; skipped, never retried
     └── ServingError       the Triton server could not be found, staged, started or stopped
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the error classes load without numpy
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "CacheFullError",
    "ConfigError",
    "DeviceError",
    "DeviceMemoryError",
    "FormatError",
    "HPSError",
    "MalformedMessage",
    "PartialTierError",
    "RequestError",
    "RowValueError",
    "ServingError",
    "StoredWidthError",
    "TierBusyError",
    "TierError",
    "UnknownTableError",
    "UpdateError",
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


class RowValueError(RequestError):
    """A row its table's row format cannot store (hps_core.row_formats): a NaN or infinity in
    a compact format, a float16 value beyond ±65504, an int8 row whose range (max - min)
    overflows float32. The batch is refused whole: nothing of the refused batch was stored
    (a loader's earlier batches stay stored). ``position``: the index of the first such row
    in the batch."""

    def __init__(self, message: str, position: int = -1) -> None:
        super().__init__(message)
        self.position = position


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


class StoredWidthError(TierError):
    """A stored row whose size is not ``row_bytes(dim)`` of its table's row format
    (:meth:`hps_core.row_formats.RowFormat.row_bytes`: ``4 × dim`` for fp32, ``8 + dim`` for
    int8): the table was written with another dim or format. ``position``: the index of the
    offending value in the batch that found it."""

    def __init__(self, message: str, position: int = -1) -> None:
        super().__init__(message)
        self.position = position


class CacheFullError(HPSError):
    """Static cache tables cannot take the new keys of a replace: nothing was written.

    ``tables``: the indices of the tables without room (a caller may retry without their rows).
    """

    def __init__(self, message: str, tables: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.tables = tuple(int(t) for t in tables)


class DeviceError(HPSError):
    """The GPU failed under a cache: CuPy or CUDA ran out of device memory, a kernel did not
    compile, or a call on the device failed. The message names the device and the step."""


class DeviceMemoryError(DeviceError):
    """The GPU ran out of memory (CuPy's OutOfMemoryError, CUDA's cudaErrorMemoryAllocation
    or CUDA_ERROR_OUT_OF_MEMORY): a failure that may pass once memory is freed, unlike the
    other DeviceErrors (an illegal memory access leaves the CUDA context unusable)."""


class UpdateError(HPSError):
    """The online-update path (Kafka sink or source) failed: broker unreachable, delivery
    failed, a message that cannot be applied."""


class MalformedMessage(UpdateError, ValueError):
    """A Kafka payload is not a valid HugeCTR update message (bad magic, wrong vector size,
    truncated). The whole message is refused; nothing of it is applied."""


class ServingError(HPSError, RuntimeError):
    """The Triton server could not be found, staged, started or stopped."""
