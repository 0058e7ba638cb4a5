"""How embedding tables are laid out in Redis, and the vectorised helpers that build it.

HugeCTR's layout (``HugeCTR/src/hps/redis_backend.cpp``, ``make_hkey``): each table is cut
into ``num_partitions`` partitions and each partition is ONE Redis hash::

    hps_et{<table>/p<N>}v      hash   field: the key, 8 bytes little-endian int64
                                      value: the row packed in the table's row format
                                      (hps_core.row_formats: fp32 = dim float32
                                      little-endian, HugeCTR's 4·dim bytes; int8 = 8 + dim)

The braces are a cluster hash tag: the whole hash lives in one slot, so one HMGET/HSET
reads or writes many rows of a partition on one node, and the partitions of a table
spread over the cluster's nodes. Our additions: three metadata hashes holding each table's
vector width, so a second process (or ``hps inspect``) knows ``dim`` without being told, the
partition count it was written with, so that a process with another count (which would
look for every key in the wrong hash) is refused, and its row format, so that a process
asking for another format is refused too (a table without one, HugeCTR's or an older
version's, is fp32: a compact format is refused for it while its partitions hold rows of
another size); and per partition a load marker and a refill lock, in the partition's
own slot (same hash tag, so on the node holding its rows)::

    hps_et{meta}tables         hash   field: table name (UTF-8)   value: dim as ASCII
    hps_et{meta}partitions     hash   field: table name (UTF-8)   value: num_partitions as ASCII
    hps_et{meta}formats        hash   field: table name (UTF-8)   value: RowFormat.code as ASCII
    hps_et{<table>/p<N>}m      string "1": the partition's rows were loaded (gone = node lost them)
    hps_et{<table>/p<N>}l      string a refill lock (SET NX PX), see hps_core/db/redis_refill.py

Partition of a key: ``(splitmix64(key) >> 32) % num_partitions`` — the hash map tier's
mixer, computed here with NumPy (uint64 arithmetic wraps, as it should). HugeCTR hashes
keys with its own function, so a Redis database written by HugeCTR is read only with
``num_partitions: 1``; all processes sharing one database must use the same
``num_partitions``.

All helpers are vectorised: :func:`plan` groups a batch of one table or of many by
(table, partition) with one counting sort (``hps_core.grouping.group_by``) and cuts the
commands with array arithmetic; keys and packed rows become lists of ``bytes`` through one
``view(...).tolist()``; replies, of one table or of several formats and widths, are joined
once and dequantised by one ``hps_core.rows.unpack_stored``.
The per-key Python objects that remain are the ``bytes`` redis-py needs for arguments and
returns for replies.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import compress, repeat
from operator import is_not
from typing import Any

import numpy as np
import numpy.typing as npt

from hps_core.errors import StoredWidthError
from hps_core.grouping import group_by
from hps_core.hashing import partition_array
from hps_core.row_formats import RowFormat
from hps_core.rows import unpack_stored

__all__ = [
    "FORMATS_KEY",
    "META_KEY",
    "PARTITIONS_KEY",
    "Chunk",
    "Plan",
    "decode_replies",
    "decode_rows",
    "found_values",
    "interleave",
    "key_fields",
    "lock_hkey",
    "marker_hkey",
    "partition_of",
    "plan",
    "row_values",
    "value_hkey",
]

META_KEY = b"hps_et{meta}tables"
PARTITIONS_KEY = b"hps_et{meta}partitions"
FORMATS_KEY = b"hps_et{meta}formats"


def value_hkey(table: str, partition: int) -> bytes:
    """The Redis key of partition ``partition`` of ``table`` (HugeCTR's ``make_hkey``)."""
    return f"hps_et{{{table}/p{partition}}}v".encode()


def marker_hkey(table: str, partition: int) -> bytes:
    """The load marker of a partition: in its slot, so it vanishes with the partition's rows."""
    return f"hps_et{{{table}/p{partition}}}m".encode()


def lock_hkey(table: str, partition: int) -> bytes:
    """The refill lock of a partition (in its slot too)."""
    return f"hps_et{{{table}/p{partition}}}l".encode()


def partition_of(keys: npt.NDArray[np.int64], num_partitions: int) -> npt.NDArray[np.int64]:
    """(n,) int64 keys → (n,) int64 partition indices in ``[0, num_partitions)``: the hash
    map's partitions too (``hps_core.hashing.partition``)."""
    return partition_array(keys, num_partitions)


@dataclass(frozen=True)
class Chunk:
    """One HMGET/HSET command: partition ``partition`` of table ``table`` gets ``sorted[start:stop]``."""

    table: int
    partition: int
    start: int
    stop: int


@dataclass(frozen=True)
class Plan:
    """A batch grouped by (table, partition) and cut into commands.

    ``order``: (n,) int64 positions sorted by group, stable, so batch order holds inside a
    group (the last duplicate wins on insert). Command ``c`` covers ``order[starts[c] :
    stops[c]]`` of group ``groups[c] = table * num_partitions + partition``, which is also
    the index of its hash in a table-major list of hash keys.
    """

    order: npt.NDArray[np.int64]
    groups: npt.NDArray[np.int64]  # (c,)
    starts: npt.NDArray[np.int64]  # (c,)
    stops: npt.NDArray[np.int64]  # (c,)
    num_partitions: int

    @property
    def chunks(self) -> list[Chunk]:
        """The commands as objects (for tools; the tiers read the arrays)."""
        tables, parts = np.divmod(self.groups, self.num_partitions)
        return [
            Chunk(t, p, a, b)
            for t, p, a, b in zip(tables.tolist(), parts.tolist(), self.starts.tolist(), self.stops.tolist())
        ]


def plan(
    keys: npt.NDArray[np.int64],
    num_partitions: int,
    max_chunk: int,
    table_ids: npt.NDArray[np.int64] | None = None,
    num_tables: int = 1,
) -> Plan:
    """Group ``keys`` by (table, partition) and cut each group into chunks of ≤ ``max_chunk`` keys.

    keys: (n,) int64. table_ids: (n,) int64 in ``[0, num_tables)``, or None for one table.
    One stable counting sort (:func:`~hps_core.grouping.group_by`) of the combined code
    ``table * num_partitions + partition`` groups the whole batch, whatever its table count;
    the chunks are cut with array arithmetic.
    """
    codes = partition_of(keys, num_partitions)
    if table_ids is not None:
        codes += table_ids * num_partitions
    num_groups = num_tables * num_partitions
    order, bounds = group_by(codes, num_groups)
    counts = np.diff(bounds)
    groups = np.flatnonzero(counts)
    ends = bounds[1:][groups]
    sizes = counts[groups]
    per_group = -(-sizes // max_chunk)  # commands per group
    first = np.repeat(np.cumsum(per_group) - per_group, per_group)  # index of the group's first command
    nth = np.arange(first.shape[0], dtype=np.int64) - first  # command's rank inside its group
    starts = np.repeat(ends - sizes, per_group) + nth * max_chunk
    stops = np.minimum(starts + max_chunk, np.repeat(ends, per_group))
    return Plan(order, np.repeat(groups, per_group), starts, stops, num_partitions)


def key_fields(keys: npt.NDArray[np.int64]) -> list[bytes]:
    """(n,) int64 → n 8-byte little-endian ``bytes`` (a void view: ``S8`` would strip
    trailing zero bytes)."""
    fields: list[bytes] = np.ascontiguousarray(keys, dtype="<i8").view("V8").tolist()
    return fields


def row_values(packed: npt.NDArray[np.uint8]) -> list[bytes]:
    """(n, row_bytes) uint8 packed rows (:func:`hps_core.row_formats.pack`) → n ``bytes``."""
    rows = np.ascontiguousarray(packed, dtype=np.uint8)
    out: list[bytes] = rows.view(f"V{rows.shape[1]}").reshape(-1).tolist()
    return out


def interleave(fields: list[bytes], values: list[bytes]) -> list[bytes]:
    """``[f0, v0, f1, v1, ...]``, the argument order of HSET (two C-level slice copies)."""
    args: list[Any] = [None] * (2 * len(fields))
    args[0::2] = fields
    args[1::2] = values
    return args


def found_values(replies: list[Any]) -> tuple[npt.NDArray[np.bool_], list[bytes]]:
    """HMGET replies (``bytes`` or None) → (n,) bool found mask and the found values."""
    mask = np.fromiter(map(is_not, replies, repeat(None)), dtype=np.bool_, count=len(replies))
    return mask, list(compress(replies, mask))


def decode_rows(
    replies: list[Any],
    table_ids: npt.NDArray[np.int64],
    dims: npt.NDArray[np.int64],
    codes: npt.NDArray[np.int64],
    sizes: npt.NDArray[np.int64],
    out: npt.NDArray[np.float32],
    offsets: npt.NDArray[np.int64],
) -> npt.NDArray[np.bool_]:
    """HMGET replies (``bytes`` or None) of rows of any tables → the (n,) bool found mask,
    each found row dequantised into the flat float32 ``out`` at ``offsets[i]``.

    ``table_ids``: (n,) int64, the table of reply i; ``dims``, ``codes``, ``sizes``: (T,)
    int64 width, format code and stored row bytes of each table (``hps_core.rows``). One
    join and one decode for the batch. Raises StoredWidthError, its ``position`` the reply,
    at the first value of the wrong size, before writing any row.
    """
    mask, hits = found_values(replies)
    positions = np.flatnonzero(mask)
    hit_ids = table_ids[positions]
    bad = unpack_stored(hits, hit_ids, dims, codes, sizes, out, offsets[positions])
    if bad >= 0:
        t = int(hit_ids[bad])
        raise StoredWidthError(
            f"a stored value is {len(hits[bad])} bytes, not {int(sizes[t])} (a {int(dims[t])}-wide "
            f"{RowFormat.from_code(int(codes[t]))} row)",
            int(positions[bad]),
        )
    return mask


def decode_replies(
    replies: list[Any], dim: int, row_format: RowFormat = RowFormat.FP32
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32]]:
    """HMGET replies of one table (``bytes`` or None) → found mask and the found rows (hits, dim).

    Raises StoredWidthError (a TierError) when a stored value is not ``row_bytes(dim)`` bytes.
    """
    mask, hits = found_values(replies)
    rows = np.empty((len(hits), dim), np.float32)
    one = np.array([dim], np.int64)
    size = np.array([row_format.row_bytes(dim)], np.int64)
    decode_rows(hits, np.zeros(len(hits), np.int64), one, np.array([row_format.code], np.int64), size,
                rows.reshape(-1), np.arange(0, len(hits) * dim, dim, dtype=np.int64))
    return mask, rows
