"""Volatile tier in Redis: a Redis Cluster (``RedisClusterVolatileDB``) or one server (``RedisVolatileDB``).

Layout (``_redis_layout``, HugeCTR's): one Redis hash per (table, partition), named
``hps_et{<table>/p<N>}v``; the braces are a hash tag, so a partition lives in one slot of
one node. Field = 8-byte key, value = the row packed in the table's row format
(``hps_core.row_formats``: fp32 rows are HugeCTR's float32 bytes, int8 rows ``8 + dim``
bytes). Table widths live in the hash ``hps_et{meta}tables``, the partition count each table
was written with in ``hps_et{meta}partitions``, its row format in ``hps_et{meta}formats``: a
process with another ``num_partitions`` is refused (ConfigError naming
``volatile_db.num_partitions``) instead of missing every row, one asking for another format
is refused too (ConfigError naming both formats). The three are written together (one
script) by the process that creates the table; a table written before (by HugeCTR or an
older version) has no count, which cannot be checked, and no format: it is fp32, and a
process asking for a compact format for it while its partitions hold rows is refused too
(HugeCTR writes no metadata at all: ``create_table`` samples the partitions first).

A batch is grouped by (table, partition) (one counting sort of a combined code,
``hps_core.grouping.group_by``), each group cut into HMGET/HSET commands of at most ``max_get_batch_size`` /
``max_set_batch_size`` keys, the commands grouped by the node owning their slot (each
command carries its own), and each node's commands sent as ONE pipeline. Pipelines go out
to every node before any reply is read, so the nodes work in parallel while this process
waits (no threads). ``fetch_tables`` sends the keys of all a lookup's tables in that one
round — a request costs one pipeline per node whatever its table count — and ``fetch`` is
its one-table case. Replies of rows of different widths are joined once and scattered
into the caller's flat buffer, dequantised on the way, by one ``hps_core.rows.unpack_stored``;
an insert packs its batch once (``hps_core.row_formats.pack``). The cluster client (redis-py
``RedisCluster``, hiredis parser) supplies the slot map, authentication, TLS and one
connection pool per node; this module drives those pools directly so that a failure stays
confined to the node that failed.

Failure semantics (HugeCTR's cascade: a volatile tier that cannot answer is a miss)::

    fetch   a node that refuses, drops or times out (``socket_timeout``) makes ITS keys
            misses; rows of keys on healthy nodes are still written to ``out``, then
            PartialTierError (a TierError) is raised with the ``found`` mask and the
            ``failed`` mask of the keys whose node failed, so that the lookup serves the
            found rows, asks the next tier for the rest and counts a tier error. Counted
            here too in ``errors`` (failed node requests), ``error_keys`` (keys turned
            into misses) and ``last_error``.
    insert  any node failure raises TierError (a write must not be lost silently). Rows
            bound for healthy nodes may already be written: an upsert is idempotent, so
            the caller retries the whole batch.
    count   raises TierError (it is not a lookup).

A failed node is marked down for ``retry_after`` seconds: fetches skip it (its keys are
misses at once, without paying a timeout on every request), inserts fail at once. After
that the next call tries it again; a cluster client also re-reads the slot map
(``CLUSTER SLOTS``) once per ``retry_after`` after a failure, which picks up a failover to a
replica. A ``MOVED`` reply (resharding, failover) refreshes the slot map and re-sends the
commands once. Node failures are logged through :class:`~hps_core.logs.RateLimitedLog`:
one line per node and cause per interval, never one per request. Redis errors never leave
this module: they become :class:`~hps_core.errors.TierError`::

    HPSError
     ├── ConfigError     bad settings (address, TLS files), a table re-created with another
     │                   dim or row format, a table stored with another num_partitions
     ├── RequestError    bad arrays (base.py's checks), UnknownTableError, RowValueError (a
     │                   row the table's format cannot store: the batch is refused whole)
     └── TierError       connection or authentication failure, a failed insert/count,
          │              a stored value of the wrong size, a closed tier
          └── PartialTierError   a fetch some nodes failed (found rows written)

Load markers (``mark_loaded``, ``check_markers``, ``claim_partitions``,
``insert_missing``): a marker per (table, partition) in the partition's slot says its rows
were loaded; a node that restarts empty loses them with its rows. The refill monitor
(``hps_core/db/redis_refill.py``) probes them and refills what was lost.

Single server vs cluster (:func:`open_redis_db`, used by ``open_volatile_db`` for
``type: redis_cluster``): several addresses → a cluster; one address → ``INFO cluster`` is
asked and a server with ``cluster_enabled:0`` gets :class:`RedisVolatileDB` (same layout,
one connection pool), a cluster node gets :class:`RedisClusterVolatileDB` (which
discovers the other nodes from it).

Per-key Python that remains: redis-py takes and returns one ``bytes`` per field/value; we
build those lists with one ``view().tolist()`` and decode replies with one join and one
numba decode.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import ConnectionPool
from redis.crc import key_slot
from redis.exceptions import AskError, AuthenticationError, RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from hps_core.db import _redis_layout as layout
from hps_core.arrays import Flat, Keys, Mask, Vectors
from hps_core.db.base import MarkerState, TableGroups, TierBase, check_table_name, format_mismatch, unknown_table
from hps_core.errors import ConfigError, PartialTierError, StoredWidthError, TierError
from hps_core.config import RedisConfig, TLSConfig, VolatileDBConfig
from hps_core.logs import RateLimitedLog
from hps_core.row_formats import RowFormat, format_codes
from hps_core.row_codecs import pack
from hps_core.rows import row_sizes

__all__ = ["RedisClusterVolatileDB", "RedisVolatileDB", "open_redis_db", "parse_addresses"]

#: node failures: the first of each cause at once, then one line per cause per interval
_log = RateLimitedLog(logging.getLogger(__name__))

DEFAULT_PORT = 6379  # for an address without ":port"
DEFAULT_SOCKET_TIMEOUT = 1.0  # s: a node slower than this counts as down for this request
DEFAULT_CONNECT_TIMEOUT = 0.5  # s
DEFAULT_RETRY_AFTER = 1.0  # s a failed node is skipped before it is tried again

#: errors that mean "this node cannot answer now" (retryable after ``retry_after``)
NODE_FAILURES: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError)
#: every error redis-py raises, with the socket errors under it: what translate_redis takes
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)

# HSET that leaves the fields already present alone (one command per chunk, like HSET): a
# refill must not overwrite a row the update stream wrote since the node came back.
_HSETNX_MANY = "for i = 1, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end return 0"
# A table's metadata (dim, partition count, row format: three hashes of one slot), read, and
# written first only when the table is new, in one atomic step: a process creating the same
# table at the same time sees all three or none. Replies [dim, count or nil, format or nil].
_READ_TABLE = "return {redis.call('HGET', KEYS[1], ARGV[1]), redis.call('HGET', KEYS[2], ARGV[1]), " \
              "redis.call('HGET', KEYS[3], ARGV[1])}"
_CREATE_TABLE = "if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then " \
                "redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) redis.call('HSET', KEYS[3], ARGV[1], ARGV[4]) end " \
                + _READ_TABLE
_META_KEYS = (layout.META_KEY, layout.PARTITIONS_KEY, layout.FORMATS_KEY)
# A table's entries in the three metadata hashes, removed together (drop_table).
_DROP_META = "for _, key in ipairs(KEYS) do redis.call('HDEL', key, ARGV[1]) end return 1"
# Delete a lock only if it still holds our token (it may have expired and been taken).
_RELEASE_LOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


# --------------------------------------------------------------------------- settings


def parse_addresses(address: str) -> list[tuple[str, int]]:
    """``"host[:port],host[:port],..."`` → [(host, port)], port 6379 when absent."""
    out = []
    for item in (a.strip() for a in str(address).split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, str(DEFAULT_PORT)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"volatile_db.address: {item!r} is not host[:port]. Fix: e.g. '127.0.0.1:7000'")
        out.append((host, int(port)))
    if not out:
        raise ConfigError(f"volatile_db.address: {address!r} names no server. Fix: 'host:port,host:port'")
    return out


def _tls_kwargs(tls: TLSConfig) -> dict[str, Any]:
    """HugeCTR's ``enable_tls`` fields as redis-py connection arguments ({} when disabled)."""
    if not tls.enabled:
        return {}
    for name, path in (("tls_client_certificate", tls.client_certificate), ("tls_client_key", tls.client_key)):
        if not os.path.isfile(path):
            raise ConfigError(f"volatile_db.{name}: {path!r} is not a file. Fix: give the PEM file's path")
    if not os.path.exists(tls.ca_certificate):
        raise ConfigError(
            f"volatile_db.tls_ca_certificate: {tls.ca_certificate!r} does not exist. "
            "Fix: give a CA bundle file or a folder of CA certificates"
        )
    ca = {"ssl_ca_path" if os.path.isdir(tls.ca_certificate) else "ssl_ca_certs": tls.ca_certificate}
    return {
        "ssl": True,
        "ssl_certfile": tls.client_certificate,
        "ssl_keyfile": tls.client_key,
        **ca,
        # redis-py sends the node's host as SNI and cannot send another name; the
        # certificate chain is verified, the host name is checked only when the
        # configured SNI name is the host itself (see docs/tiers.md).
        "ssl_check_hostname": False,
    }


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- nodes


@dataclass(eq=False)
class _Link:
    """Where commands for one node go: its pool, and a semaphore of num_node_connections."""

    name: str
    pool: ConnectionPool | _DeadPool
    slots: threading.BoundedSemaphore


@dataclass(eq=False)
class _Group:
    """The commands of one call bound for one node, and what came back."""

    link: _Link
    commands: list[tuple[Any, ...]]
    tags: list[int]  # one per command: its index in the call's command list
    replies: list[Any] | None = None  # one per command (a ResponseError in place of an error reply)
    failure: BaseException | None = None  # the whole node failed


@dataclass(eq=False)
class _Table:
    dim: int
    row_format: RowFormat
    hkeys: list[bytes]  # per partition
    slots: list[int]  # per partition (cluster slot of the hash key)


@dataclass(eq=False)
class _Tables:
    """The tables of a ``fetch_tables`` call, resolved once per tuple of names."""

    names: tuple[str, ...]
    dims: Keys  # (T,) int64
    codes: Keys  # (T,) int64 row format codes
    sizes: Keys  # (T,) int64 bytes of a stored row
    hkeys: list[bytes]  # (T * P,) table-major: hash of (table t, partition p) at t * P + p
    slots: list[int]  # (T * P,) their cluster slots


class _Command(NamedTuple):
    """One command of a call: the slot it goes to (that of its hash), its arguments, and
    how many keys it touches (misses to count if its node fails)."""

    slot: int
    args: tuple[Any, ...]
    size: int


class _NodeDown(RedisError):
    """A request not sent because its node failed less than ``retry_after`` seconds ago."""


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- the tiers


class _RedisTier(TierBase[_Tables]):
    """The layout, batching and failure handling shared by both Redis tiers.

    Arguments are checked by :class:`~hps_core.db.base.TierBase` with ``_strict_names``: a
    table's name goes verbatim into the commands, so every call checks that the tier is open
    and the name first, and a batch's keys before the table is looked up (a lookup of a table
    not described here yet is a round trip to the metadata node).
    """

    _kind = "Redis"
    _label = _kind
    _strict_names = True

    def __init__(
        self,
        config: VolatileDBConfig | None = None,
        *,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        retry_after: float = DEFAULT_RETRY_AFTER,
    ) -> None:
        """``config``: the ``volatile_db`` section (defaults: ``VolatileDBConfig()``); read
        here: ``redis`` (address, credentials, connections, TLS), ``num_partitions`` and the
        batch sizes."""
        config = VolatileDBConfig() if config is None else config
        address = config.redis.address
        self._num_partitions = _check_positive("num_partitions", config.num_partitions)
        self._max_get = _check_positive("max_get_batch_size", config.get_batch_size)
        self._max_set = _check_positive("max_set_batch_size", config.set_batch_size)
        self._node_connections = _check_positive("num_node_connections", config.redis.num_node_connections)
        self._retry_after = float(retry_after)
        self._tables: dict[str, _Table] = {}
        self._groups: TableGroups[_Tables] = TableGroups(self._resolve)
        self._links: dict[str, _Link] = {}
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.errors = 0  # failed node requests (fetch turns them into misses)
        self.error_keys = 0  # keys that became misses because their node failed or was down
        self.last_error: str | None = None
        self._address = address
        self._connect(
            address,
            _client_kwargs(config.redis, socket_timeout=socket_timeout,
                           socket_connect_timeout=socket_connect_timeout),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(address={self._address!r}, partitions={self._num_partitions})"

    @property
    def address(self) -> str:
        """The configured ``volatile_db.address`` (the tier is shared: :class:`SharedTier`)."""
        return self._address

    # ---------------------------------------------------------------- subclass hooks

    def _connect(self, address: str, client_kwargs: dict[str, Any]) -> None:
        """Open the client(s) for ``address``; raise TierError/ConfigError naming it."""
        raise NotImplementedError

    def _meta(self) -> Any:
        """A client for single-key commands on the metadata hash (cluster-routed)."""
        raise NotImplementedError

    def _link_for_slot(self, slot: int) -> _Link:
        """The node currently owning ``slot``."""
        raise NotImplementedError

    def _note_node_failure(self) -> None:
        """A node failed: a cluster re-reads its slot map (rate-limited)."""

    def _refresh_topology(self) -> None:
        """Re-read the slot map now (after a MOVED reply)."""

    def _close_clients(self) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- contract

    def _create_table(self, table: str, dim: int, row_format: RowFormat) -> None:
        if row_format is not RowFormat.FP32:
            self._refuse_unformatted_rows(table, dim, row_format)
        meta = self._meta()
        # The count and format are stamped only on a table this call creates: a table already
        # in the metadata without them (HugeCTR's, or an older version's) stays unstamped,
        # since its count is unknown, and whoever came first must not decide it (its format
        # is fp32 all the same).
        stored, partitions, fmt = self._call(
            f"create table {table!r}",
            lambda: meta.eval(_CREATE_TABLE, 3, *_META_KEYS, table, dim, self._num_partitions, row_format.code),
        )
        if int(stored) != dim:
            raise ConfigError(f"table {table!r} already exists with dim {int(stored)}; cannot create it with dim {dim}")
        self._check_partitions(table, partitions)
        stored_format = _stored_format(fmt)
        if stored_format is not row_format:
            raise format_mismatch(table, f"{self._kind} at {self._address}", stored_format, row_format)
        self._tables[table] = self._describe(table, dim, row_format)

    def row_format(self, table: str) -> RowFormat:
        return self._table(self._checked_name(table)).row_format

    def _insert(self, table: str, keys: Keys, values: Vectors) -> None:
        self._write(table, keys, values, ("HSET",), "insert into")

    def insert_missing(self, table: str, keys: Keys, values: Vectors) -> None:
        """As :meth:`insert`, but a key already stored keeps its row (HSETNX, one command per
        chunk): what a refill writes, so that rows written since a node came back (the update
        stream, ``cache_missed_embeddings``) are not overwritten by older ones."""
        self._write(*self._rows_in(table, keys, values), ("EVAL", _HSETNX_MANY, 1), "refill")

    def _write(self, table: str, keys: Keys, values: Vectors, verb: tuple[Any, ...], what: str) -> None:
        """One ``verb hash field value ...`` command per chunk of a partition, of checked
        arguments; strict."""
        info = self._table(table)
        if len(keys) == 0:
            return
        packed = pack(info.row_format, values, f"{what} {table!r}")  # refuses before any write
        batch = layout.plan(keys, self._num_partitions, self._max_set)
        args = layout.interleave(layout.key_fields(keys[batch.order]), layout.row_values(packed[batch.order]))
        commands = [
            _Command(info.slots[p], (*verb, info.hkeys[p], *args[2 * a : 2 * b]), b - a)
            for p, a, b in zip(batch.groups.tolist(), batch.starts.tolist(), batch.stops.tolist())
        ]
        self._run(f"{what} {table!r}", commands, strict=True)

    def _fetch(self, table: str, keys: Keys, out: Vectors) -> Mask:
        """The one-table case of :meth:`fetch_tables` (one read path for both)."""
        tables = self._groups.get((table,))
        n, dim = out.shape
        offsets = np.arange(0, n * dim, dim, dtype=np.int64)
        return self._fetch_rows(f"fetch from {table!r}", tables, np.zeros(n, np.int64), keys, out.reshape(-1), offsets)

    def _tables_of(self, tables: Sequence[str]) -> tuple[Keys, _Tables]:
        resolved = self._groups.get(tables)
        return resolved.dims, resolved

    def _fetch_tables(self, group: _Tables, table_ids: Keys, keys: Keys, out: Flat, offsets: Keys) -> Mask:
        """Keys of several tables in ONE round of pipelines: one pipeline per node for the
        whole batch, whatever the table count. Arrays as in the contract (base.py)."""
        return self._fetch_rows(f"fetch from {len(group.names)} tables", group, table_ids, keys, out, offsets)

    def _fetch_rows(self, what: str, tables: _Tables, ids: Keys, keys: Keys, out: Flat, offsets: Keys) -> Mask:
        """Checked arrays in, rows written into ``out``: group by (table, partition), one
        HMGET per chunk, one pipeline per node, one join and one decode (dequantise and
        scatter) for the batch."""
        found = np.zeros(len(keys), dtype=np.bool_)
        if len(keys) == 0:
            return found
        batch = layout.plan(keys, self._num_partitions, self._max_get, ids, len(tables.names))
        fields = layout.key_fields(keys[batch.order])
        commands = [
            _Command(tables.slots[g], ("HMGET", tables.hkeys[g], *fields[a:b]), b - a)
            for g, a, b in zip(batch.groups.tolist(), batch.starts.tolist(), batch.stops.tolist())
        ]
        failed_commands: list[int] = []
        replies = self._run(what, commands, strict=False, failed=failed_commands)
        flat: list[Any] = list(chain.from_iterable(replies)) if len(replies) > 1 else replies[0]
        sorted_ids = ids[batch.order]
        try:
            mask = layout.decode_rows(flat, sorted_ids, tables.dims, tables.codes, tables.sizes, out,
                                      offsets[batch.order])
        except StoredWidthError as exc:
            table = tables.names[int(sorted_ids[exc.position])]
            raise StoredWidthError(
                f"{self._kind}: table {table!r}: {exc}; the stored table and its dim or row format disagree",
                exc.position,
            ) from exc
        found[batch.order[mask]] = True
        if failed_commands:
            raise self._partial(what, batch, failed_commands, found)
        return found

    def _partial(self, what: str, batch: layout.Plan, failed_commands: list[int], found: Mask) -> PartialTierError:
        """The error of a fetch some nodes failed: the found rows are written, the keys of the
        failed commands marked (commands cover the sorted batch in order, so one repeat)."""
        by_command = np.zeros(batch.groups.shape[0], np.bool_)
        by_command[failed_commands] = True
        failed = np.zeros(found.shape[0], np.bool_)
        failed[batch.order] = np.repeat(by_command, batch.stops - batch.starts)
        with self._lock:
            cause = self.last_error
        return PartialTierError(
            f"{self._kind}: {what}: {int(failed.sum())} of {failed.shape[0]} keys are on nodes that "
            f"failed or are marked down ({cause}); they count as misses",
            found,
            failed,
        )

    def count(self, table: str) -> int:
        info = self._table(self._checked_name(table))
        commands = [_Command(info.slots[p], ("HLEN", info.hkeys[p]), 0) for p in range(self._num_partitions)]
        replies = self._run(f"count {table!r}", commands, strict=True)
        return int(sum(int(r) for r in replies))

    def drop_table(self, table: str) -> int:
        """Delete ``table``'s partition hashes, load markers and refill locks, then its entries
        in the metadata hashes (one script); returns the rows dropped (``DropTable``). Strict:
        a node that fails raises TierError, and the table stays listed until a drop succeeds."""
        table = self._checked_name(table)
        info = self._table(table)
        parts = range(self._num_partitions)
        counted = self._run(f"count {table!r}", [_Command(info.slots[p], ("HLEN", info.hkeys[p]), 0) for p in parts],
                            strict=True)
        deletes = [
            _Command(info.slots[p], ("DEL", info.hkeys[p], layout.marker_hkey(table, p), layout.lock_hkey(table, p)), 0)
            for p in parts
        ]
        self._run(f"drop {table!r}", deletes, strict=True)
        meta = self._meta()
        self._call(f"drop table {table!r}", lambda: meta.eval(_DROP_META, 3, *_META_KEYS, table))
        self._tables.pop(table, None)
        self._groups.clear()
        return int(sum(int(r) for r in counted))

    def memory_bytes(self, table: str) -> int:
        """Redis's estimate of the memory the table's hashes use (``MEMORY USAGE``, sampled)."""
        info = self._table(self._checked_name(table))
        commands = [
            _Command(info.slots[p], ("MEMORY", "USAGE", info.hkeys[p]), 0) for p in range(self._num_partitions)
        ]
        replies = self._run(f"memory of {table!r}", commands, strict=True)
        return int(sum(int(r or 0) for r in replies))

    # ---------------------------------------------------------------- load markers (refill)

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def mark_loaded(self, table: str, partitions: Iterable[int] | None = None) -> None:
        """Write the load marker of ``partitions`` of ``table`` (all by default): their rows
        are in. A marker lives in its partition's slot, so a node that loses its data loses
        the markers of its partitions with it (see :meth:`check_markers`). Strict."""
        table = self._checked_name(table)
        info = self._table(table)
        parts = range(self._num_partitions) if partitions is None else partitions
        commands = [_Command(info.slots[p], ("SET", layout.marker_hkey(table, p), b"1"), 0) for p in parts]
        self._run(f"mark {table!r} loaded", commands, strict=True)

    def check_markers(self, tables: Sequence[str]) -> MarkerState:
        """Which partitions of ``tables`` lost their load marker: one pipelined EXISTS per
        node for every marker and the metadata hash. A node that does not answer is not a
        loss (yet): its markers count as ``unknown``. Cheap enough to run every second."""
        self._check_open()
        infos = [(t, self._table(self._checked_name(t))) for t in tables]
        commands = [
            _Command(info.slots[p], ("EXISTS", layout.marker_hkey(t, p)), 0)
            for t, info in infos
            for p in range(self._num_partitions)
        ]
        commands.append(_Command(key_slot(layout.META_KEY), ("EXISTS", layout.META_KEY), 0))
        replies = self._run("check load markers", commands, strict=False)
        present = np.array([r if isinstance(r, int) else -1 for r in replies], np.int64)
        per_table = present[:-1].reshape(len(infos), self._num_partitions)
        missing = {t: np.flatnonzero(row == 0).tolist() for (t, _), row in zip(infos, per_table)}
        return MarkerState(
            {t: parts for t, parts in missing.items() if parts},
            meta_missing=bool(present[-1] == 0),
            unknown=int((present < 0).sum()),
        )

    def claim_partitions(self, table: str, partitions: Sequence[int], token: str, lock_s: float) -> list[int]:
        """Take the refill lock of each of ``partitions`` (``SET NX PX``, expiring after
        ``lock_s``) and return those taken whose marker is still missing; the locks of the
        others are released at once. Several processes share one Redis: one refills."""
        info = self._table(self._checked_name(table))
        ms = max(1, int(lock_s * 1000))
        commands = [
            command
            for p in partitions
            for command in (
                _Command(info.slots[p], ("SET", layout.lock_hkey(table, p), token, "NX", "PX", ms), 0),
                _Command(info.slots[p], ("EXISTS", layout.marker_hkey(table, p)), 0),
            )
        ]
        replies = self._run(f"claim partitions of {table!r}", commands, strict=False)
        locked = [p for p, r in zip(partitions, replies[0::2]) if r in (b"OK", "OK", True)]
        claimed = [p for p, r in zip(partitions, replies[1::2]) if p in locked and r == 0]
        self.release_partitions(table, [p for p in locked if p not in claimed], token)
        return claimed

    def release_partitions(self, table: str, partitions: Sequence[int], token: str) -> None:
        """Release the refill locks of ``partitions`` this ``token`` holds (a lock that expired
        and was taken by another process is left alone). Failures are left to the expiry."""
        if not partitions:
            return
        info = self._table(check_table_name(table))
        commands = [
            _Command(info.slots[p], ("EVAL", _RELEASE_LOCK, 1, layout.lock_hkey(table, p), token), 0)
            for p in partitions
        ]
        self._run(f"release partitions of {table!r}", commands, strict=False)

    @staticmethod
    def new_token() -> str:
        """A token naming this process's locks."""
        return f"{os.getpid()}-{uuid.uuid4().hex}"

    def table_names(self) -> list[str]:
        self._check_open()
        meta = self._meta()
        names = self._call("list tables", lambda: meta.hkeys(layout.META_KEY))
        return sorted(n.decode() if isinstance(n, bytes) else str(n) for n in names)

    def dim(self, table: str) -> int:
        return self._table(self._checked_name(table)).dim

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._close_clients()
        except REDIS_ERRORS:
            pass  # closing a client of a dead node is not worth an error

    def counters(self) -> dict[str, Any]:
        """Failure counters: errors, error_keys, last_error, and the nodes now marked down."""
        now = time.monotonic()
        with self._lock:
            down = sorted(n for n, t in self._down_until.items() if t > now)
        return {"errors": self.errors, "error_keys": self.error_keys, "last_error": self.last_error, "down_nodes": down}

    def __enter__(self) -> _RedisTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- tables

    def _check_open(self) -> None:
        if self._closed:
            raise TierError(f"{self._kind} tier is closed")

    def _dim_of(self, table: str) -> int:
        return self._table(table).dim

    def _describe(self, table: str, dim: int, row_format: RowFormat) -> _Table:
        hkeys = [layout.value_hkey(table, p) for p in range(self._num_partitions)]
        return _Table(dim, row_format, hkeys, [key_slot(h) for h in hkeys])

    def _table(self, table: str) -> _Table:
        """The cached description, or the width and format another process stored in the
        metadata hashes."""
        info = self._tables.get(table)
        if info is not None:
            return info
        meta = self._meta()
        stored, partitions, fmt = self._call(
            f"look up table {table!r}", lambda: meta.eval(_READ_TABLE, 3, *_META_KEYS, table)
        )
        if stored is None:
            raise unknown_table(table, self.table_names())
        self._check_partitions(table, partitions)
        info = self._tables.setdefault(table, self._describe(table, int(stored), _stored_format(fmt)))
        return info

    def _refuse_unformatted_rows(self, table: str, dim: int, row_format: RowFormat) -> None:
        """Refuse to give a compact format to a table without a stored one whose partitions
        hold rows in another: HugeCTR writes rows and no metadata, so :meth:`create_table`
        would stamp the format over fp32 values and every fetch of them would fail. One
        ``HSCAN 0 COUNT 1`` per partition (a pipeline per node) samples the stored values;
        rows already of ``row_format``'s size are kept (the metadata node lost its data, or
        another process is loading the table now). ConfigError naming both formats."""
        meta = self._meta()
        _, _, fmt = self._call(f"look up table {table!r}", lambda: meta.eval(_READ_TABLE, 3, *_META_KEYS, table))
        if fmt is not None:
            return  # stamped: create_table compares it
        info = self._describe(table, dim, row_format)
        commands = [_Command(slot, ("HSCAN", hkey, 0, "COUNT", 1), 0) for hkey, slot in zip(info.hkeys, info.slots)]
        replies = self._run(f"look for rows of {table!r}", commands, strict=True)
        size = row_format.row_bytes(dim)
        if any(len(value) != size for reply in replies for value in reply[1][1::2]):
            where = f"{self._kind} at {self._address}"
            raise format_mismatch(table, where, RowFormat.FP32, row_format, unformatted=True)

    def _check_partitions(self, table: str, stored: Any) -> None:
        """Refuse a table written with another partition count: every key would be looked for
        in another hash than the one holding it. A table with no stored count (written by
        HugeCTR or an older version) is accepted as before: its count cannot be checked, and
        it is never stamped (see :meth:`create_table`)."""
        if stored is not None and int(stored) != self._num_partitions:
            raise ConfigError(
                f"volatile_db.num_partitions: table {table!r} is stored in {self._kind} with "
                f"{int(stored)} partitions, but this server uses {self._num_partitions}, so it would "
                "look for each key in another partition than the one holding it. Fix: set "
                f"volatile_db.num_partitions to {int(stored)} in every HPS JSON sharing this "
                "Redis (or delete the table's hashes and load it again)"
            )

    def _resolve(self, names: tuple[str, ...]) -> _Tables:
        """The hashes, slots and widths of ``names`` (see TableGroups)."""
        infos = [self._table(name) for name in names]
        dims = np.array([i.dim for i in infos], dtype=np.int64)
        formats = [i.row_format for i in infos]
        return _Tables(
            names,
            dims,
            format_codes(formats),
            row_sizes(formats, dims),
            [h for i in infos for h in i.hkeys],
            [s for i in infos for s in i.slots],
        )

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a single-key command; redis errors become TierError."""
        try:
            return fn()
        except REDIS_ERRORS as exc:
            self._record(None, exc, 0)
            raise translate_redis(exc, self._kind, f"{what} failed") from exc

    # ---------------------------------------------------------------- pipelines

    def _record(self, node: str | None, exc: BaseException, keys: int) -> None:
        """Count a failure; a node that failed (not one merely skipped) is marked down."""
        with self._lock:
            if isinstance(exc, _NodeDown):  # skipped: its keys are misses, no new failure
                self.error_keys += keys
                return
            self.errors += 1
            self.error_keys += keys
            self.last_error = f"{node or self._kind}: {_short(exc)}"
            if node is not None and isinstance(exc, NODE_FAILURES):
                self._down_until[node] = time.monotonic() + self._retry_after
        if isinstance(exc, NODE_FAILURES):
            self._note_node_failure()
        # every request may hit the failure: one line per node and cause per interval
        _log.failure(f"{self._kind} node {node or self._address}", exc, level=logging.WARNING)

    def _is_down(self, node: str) -> bool:
        until = self._down_until.get(node)
        return until is not None and until > time.monotonic()

    def _group(self, commands: list[_Command], indices: Iterable[int]) -> list[_Group]:
        """Commands ``indices`` grouped by the node owning their slot (per command, not per
        key); a group's tags are the command indices. A slot is looked up once per call."""
        groups: dict[str, _Group] = {}
        links: dict[int, _Link] = {}
        for i in indices:
            command = commands[i]
            link = links.get(command.slot)
            if link is None:
                link = links[command.slot] = self._link_for_slot(command.slot)
            group = groups.get(link.name)
            if group is None:
                group = groups[link.name] = _Group(link, [], [])
            group.commands.append(command.args)
            group.tags.append(i)
        return list(groups.values())

    def _exchange(self, groups: list[_Group]) -> None:
        """Send every node its pipeline, then read every reply: the nodes work side by side.

        Fills ``group.replies`` or ``group.failure``; never raises for a node's failure.
        """
        held: list[tuple[_Group, Any]] = []
        try:
            for group in groups:
                if self._is_down(group.link.name):
                    group.failure = _NodeDown(f"node {group.link.name} is marked down after a failure")
                    continue
                group.link.slots.acquire()
                conn = None
                try:
                    conn = group.link.pool.get_connection()
                    conn.send_packed_command(conn.pack_commands(group.commands), check_health=False)
                    held.append((group, conn))
                except NODE_FAILURES as exc:
                    group.failure = exc
                    self._release(group.link, conn, broken=True)
            while held:
                group, conn = held.pop(0)
                broken = False
                try:
                    group.replies = [self._read(conn) for _ in group.commands]
                except NODE_FAILURES as exc:
                    group.failure, broken = exc, True
                finally:
                    self._release(group.link, conn, broken)
        finally:
            for group, conn in held:  # only on an unexpected exception mid-way
                self._release(group.link, conn, broken=True)

    @staticmethod
    def _read(conn: Any) -> Any:
        try:
            return conn.read_response()
        except ResponseError as exc:  # an error reply; the connection stays in step
            return exc

    @staticmethod
    def _release(link: _Link, conn: Any, broken: bool) -> None:
        try:
            if conn is not None:
                if broken:
                    conn.disconnect()
                link.pool.release(conn)
        finally:
            link.slots.release()

    def _run(
        self, what: str, commands: list[_Command], *, strict: bool, failed: list[int] | None = None
    ) -> list[Any]:
        """Run ``commands``, of any tables and partitions, in one round: one pipeline per node.

        Returns one reply per command. A MOVED reply refreshes the slot map and re-sends
        once. Other failures: ``strict`` raises TierError; otherwise the command's reply
        is ``[None] * size`` (all misses), the failure is counted, once per node, and the
        command's index appended to ``failed`` (when given).
        """
        results: list[Any] = [None] * len(commands)
        pending: list[int] = list(range(len(commands)))
        for attempt in range(2):
            groups = self._group(commands, pending)
            self._exchange(groups)
            moved: list[int] = []
            for group in groups:
                if group.failure is not None:
                    keys = sum(commands[i].size for i in group.tags)
                    self._fail(what, group.link.name, group.failure, keys, strict)
                    for i in group.tags:
                        results[i] = [None] * commands[i].size
                    if failed is not None:
                        failed += group.tags
                    continue
                assert group.replies is not None
                for i, reply in zip(group.tags, group.replies):
                    if isinstance(reply, AskError) and attempt == 0:  # MOVED (or ASK): re-route once
                        moved.append(i)
                    elif isinstance(reply, BaseException):
                        self._fail(what, group.link.name, reply, commands[i].size, strict)
                        results[i] = [None] * commands[i].size
                        if failed is not None:
                            failed.append(i)
                    else:
                        results[i] = reply
            if not moved:
                break
            self._refresh_topology()
            pending = moved
        return results

    def _fail(self, what: str, node: str, exc: BaseException, keys: int, strict: bool) -> None:
        self._record(node, exc, 0 if strict else keys)
        if strict:
            raise translate_redis(exc, self._kind, f"{what} failed on node {node}") from exc

    def _new_link(self, name: str, pool: ConnectionPool | _DeadPool) -> _Link:
        with self._lock:
            link = self._links.get(name)
            if link is None or link.pool is not pool:
                link = self._links[name] = _Link(name, pool, threading.BoundedSemaphore(self._node_connections))
            return link


def _stored_format(raw: Any) -> RowFormat:
    """The format in ``hps_et{meta}formats`` (a code as ASCII); none stored: fp32, the format
    of every table written before formats existed (HugeCTR's too)."""
    return RowFormat.FP32 if raw is None else RowFormat.from_code(int(raw))


def _client_kwargs(redis_cfg: RedisConfig, *, socket_timeout: float, socket_connect_timeout: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "socket_keepalive": True,
    }
    if redis_cfg.password:
        kwargs["password"] = redis_cfg.password
        if redis_cfg.user_name and redis_cfg.user_name != "default":
            kwargs["username"] = redis_cfg.user_name
    kwargs.update(_tls_kwargs(redis_cfg.tls))
    return kwargs


def translate_redis(exc: BaseException, where: str, what: str) -> TierError:
    """The TierError a redis-py failure (one of REDIS_ERRORS) enters hps_core as, for every
    call of this module: ``"<where>: <what> (<Type>: <message>)"``, or, when the server refused
    the credentials, ``"<where>: authentication failed (...)"`` with the fix."""
    auth_markers = ("WRONGPASS", "NOAUTH", "invalid username-password", "Authentication required")
    if isinstance(exc, AuthenticationError) or any(m in str(exc) for m in auth_markers):
        return TierError(
            f"{where}: authentication failed ({_short(exc)}). "
            "Fix: set volatile_db.user_name / volatile_db.password to the server's"
        )
    return TierError(f"{where}: {what} ({_short(exc)})")


class RedisClusterVolatileDB(_RedisTier):
    """Volatile tier in a Redis Cluster (HugeCTR ``redis_cluster``), through redis-py ``RedisCluster``.

    Args:
        address: ``"host[:port],host[:port],..."``; any reachable node is enough to
            discover the cluster.
        user_name, password: Redis ACL user and password (``""``: no AUTH).
        num_partitions: hashes per table, spread over the nodes by their hash tag. Every
            process sharing the cluster must use the same value.
        max_get_batch_size, max_set_batch_size: most keys per HMGET / HSET command.
        num_node_connections: most connections this object opens to one node.
        tls: TLS settings, or None for plain TCP.
        socket_timeout: seconds before a silent node counts as failed for this request.
        socket_connect_timeout: seconds to wait for a TCP connection.
        retry_after: seconds a failed node is skipped before it is tried again.
    """

    _kind = "Redis Cluster"
    _label = _kind

    def _connect(self, address: str, client_kwargs: dict[str, Any]) -> None:
        # redis-py ships py.typed but leaves ClusterNode and the nodes manager unannotated
        nodes = [ClusterNode(host, port) for host, port in parse_addresses(address)]  # type: ignore[no-untyped-call]
        self._refresh_lock = threading.Lock()
        self._refresh_due = False
        self._next_refresh = 0.0
        try:
            self._client = RedisCluster(
                startup_nodes=nodes,
                require_full_coverage=False,  # a node down must not stop the others from answering
                retry=Retry(NoBackoff(), 1),
                **client_kwargs,
            )
        except REDIS_ERRORS as exc:
            raise translate_redis(exc, f"{self._kind} at {address}", "cannot connect") from exc

    def _meta(self) -> Any:
        return self._client

    def _link_for_slot(self, slot: int) -> _Link:
        self._maybe_refresh()
        try:
            node = self._client.nodes_manager.get_node_from_slot(slot)
        except (RedisError, RedisClusterException) as exc:
            # slot not covered: a link that always fails, so the keys become misses
            return self._new_link(f"slot-{slot}-uncovered", _DeadPool(exc))
        if node.redis_connection is None:
            self._client.nodes_manager.create_redis_connections([node])  # type: ignore[no-untyped-call]  # unannotated
        return self._new_link(node.name, node.redis_connection.connection_pool)

    def _note_node_failure(self) -> None:
        self._refresh_due = True

    def _maybe_refresh(self) -> None:
        """After a node failure, re-read the slot map at most once per ``retry_after``, in
        the background: asking a dead or frozen startup node must not stall a lookup."""
        if not self._refresh_due or time.monotonic() < self._next_refresh:
            return
        self._next_refresh = time.monotonic() + self._retry_after
        self._refresh_due = False
        threading.Thread(target=self._refresh_now, name="hps-redis-slot-refresh", daemon=True).start()

    def _refresh_now(self) -> None:
        if not self._refresh_lock.acquire(blocking=False):
            return  # a refresh is already running
        try:
            if not self._closed:
                self._client.nodes_manager.initialize()
        except REDIS_ERRORS as exc:
            self._refresh_due = True
            with self._lock:
                self.last_error = f"slot map refresh: {_short(exc)}"
            _log.failure(f"{self._kind} slot map refresh", exc, level=logging.WARNING)
        finally:
            self._refresh_lock.release()

    def _refresh_topology(self) -> None:
        """After a MOVED reply: re-read the slot map now (the commands are re-sent next)."""
        self._next_refresh = time.monotonic() + self._retry_after
        self._refresh_now()

    def _close_clients(self) -> None:
        self._client.close()


class RedisVolatileDB(_RedisTier):
    """Volatile tier in one Redis server (not a cluster): the same layout, one connection pool.

    For small deployments. Arguments as :class:`RedisClusterVolatileDB`, but ``address``
    names exactly one server.
    """

    _kind = "Redis"
    _label = _kind

    def _connect(self, address: str, client_kwargs: dict[str, Any]) -> None:
        servers = parse_addresses(address)
        if len(servers) != 1:
            raise ConfigError(
                f"volatile_db.address: a single Redis server takes one address, got {len(servers)}. "
                "Fix: use RedisClusterVolatileDB for a cluster"
            )
        host, port = servers[0]
        self._client = redis.Redis(host=host, port=port, retry=Retry(NoBackoff(), 0), **client_kwargs)
        try:
            self._client.ping()
        except REDIS_ERRORS as exc:
            self._client.close()
            raise translate_redis(exc, f"{self._kind} at {address}", "cannot connect") from exc
        self._link = _Link(f"{host}:{port}", self._client.connection_pool, threading.BoundedSemaphore(self._node_connections))

    def _meta(self) -> Any:
        return self._client

    def _link_for_slot(self, slot: int) -> _Link:
        return self._link

    def _close_clients(self) -> None:
        self._client.close()


class _DeadPool:
    """Stands in for the pool of a node that owns nothing: every connection attempt fails."""

    def __init__(self, exc: BaseException) -> None:
        self._exc = exc

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError(f"slot not served by any node: {self._exc}")

    def release(self, conn: Any) -> None:  # pragma: no cover - never handed a connection
        pass


def _cluster_enabled(address: str, kwargs: dict[str, Any]) -> bool:
    """Ask one server whether it runs in cluster mode (``INFO cluster``)."""
    (host, port), = parse_addresses(address)
    client = redis.Redis(host=host, port=port, retry=Retry(NoBackoff(), 0), **kwargs)
    try:
        return bool(client.info("cluster").get("cluster_enabled", 0))
    except REDIS_ERRORS as exc:
        raise translate_redis(exc, f"Redis at {address}", "cannot connect") from exc
    finally:
        client.close()


def open_redis_db(cfg: VolatileDBConfig) -> RedisClusterVolatileDB | RedisVolatileDB:
    """The Redis tier ``volatile_db`` describes: a cluster for several addresses or a
    cluster node, one server (:class:`RedisVolatileDB`) for a server not in cluster mode."""
    if len(parse_addresses(cfg.redis.address)) == 1:
        probe = _client_kwargs(cfg.redis, socket_timeout=DEFAULT_SOCKET_TIMEOUT,
                               socket_connect_timeout=DEFAULT_CONNECT_TIMEOUT)
        if not _cluster_enabled(cfg.redis.address, probe):
            return RedisVolatileDB(cfg)
    return RedisClusterVolatileDB(cfg)
