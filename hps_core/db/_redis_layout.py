"""How embedding tables are laid out in Redis, and the vectorised helpers that build it.

HugeCTR's layout (``HugeCTR/src/hps/redis_backend.cpp``, ``make_hkey``): each table is cut
into ``num_partitions`` partitions and each partition is ONE Redis hash::

    hps_et{<table>/p<N>}v      hash   field: the key, 8 bytes little-endian int64
                                      value: the vector, dim float32 little-endian (4·dim bytes)

The braces are a cluster hash tag: the whole hash lives in one slot, so one HMGET/HSET
reads or writes many rows of a partition on one node, and the partitions of a table
spread over the cluster's nodes. Our one addition is a metadata hash holding each table's
vector width, so a second process (or ``hps inspect``) knows ``dim`` without being told::

    hps_et{meta}tables         hash   field: table name (UTF-8)   value: dim as ASCII

Partition of a key: ``(splitmix64(key) >> 32) % num_partitions`` — the hash map tier's
mixer, computed here with NumPy (uint64 arithmetic wraps, as it should). HugeCTR hashes
keys with its own function, so a Redis database written by HugeCTR is read only with
``num_partitions: 1``; all processes sharing one database must use the same
``num_partitions``.

All helpers are vectorised: keys and rows become lists of ``bytes`` through one
``view(...).tolist()``, replies are decoded with one ``b"".join`` and one ``np.frombuffer``.
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

__all__ = [
    "META_KEY",
    "Chunk",
    "Plan",
    "decode_replies",
    "interleave",
    "key_fields",
    "partition_of",
    "plan",
    "row_values",
    "value_hkey",
]

META_KEY = b"hps_et{meta}tables"

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def value_hkey(table: str, partition: int) -> bytes:
    """The Redis key of partition ``partition`` of ``table`` (HugeCTR's ``make_hkey``)."""
    return f"hps_et{{{table}/p{partition}}}v".encode()


def partition_of(keys: npt.NDArray[np.int64], num_partitions: int) -> npt.NDArray[np.int64]:
    """(n,) int64 keys → (n,) int64 partition indices in ``[0, num_partitions)``."""
    x = keys.view(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(32)) % np.uint64(num_partitions)).astype(np.int64)


@dataclass(frozen=True)
class Chunk:
    """One HMGET/HSET command: partition ``partition`` gets ``sorted[start:stop]``."""

    partition: int
    start: int
    stop: int


@dataclass(frozen=True)
class Plan:
    """A batch grouped by partition: ``order`` (positions sorted by partition, stable, so
    batch order holds inside a partition) and the commands cutting it into chunks."""

    order: npt.NDArray[np.int64]
    chunks: list[Chunk]


def plan(keys: npt.NDArray[np.int64], num_partitions: int, max_chunk: int) -> Plan:
    """Group ``keys`` by partition and cut each group into chunks of ≤ ``max_chunk`` keys."""
    parts = partition_of(keys, num_partitions)
    order = np.argsort(parts, kind="stable")
    bounds = np.zeros(num_partitions + 1, np.int64)
    np.cumsum(np.bincount(parts, minlength=num_partitions), out=bounds[1:])
    chunks: list[Chunk] = []
    for p in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():  # per partition, not per key
        lo, hi = int(bounds[p]), int(bounds[p + 1])
        chunks.extend(Chunk(p, s, min(s + max_chunk, hi)) for s in range(lo, hi, max_chunk))
    return Plan(order, chunks)


def key_fields(keys: npt.NDArray[np.int64]) -> list[bytes]:
    """(n,) int64 → n 8-byte little-endian ``bytes`` (a void view: ``S8`` would strip
    trailing zero bytes)."""
    fields: list[bytes] = np.ascontiguousarray(keys, dtype="<i8").view("V8").tolist()
    return fields


def row_values(values: npt.NDArray[np.float32]) -> list[bytes]:
    """(n, dim) float32 → n ``bytes`` of 4·dim little-endian floats."""
    rows = np.ascontiguousarray(values, dtype="<f4")
    width = rows.shape[1] * 4
    out: list[bytes] = rows.view(f"V{width}").reshape(-1).tolist()
    return out


def interleave(fields: list[bytes], values: list[bytes]) -> list[bytes]:
    """``[f0, v0, f1, v1, ...]``, the argument order of HSET (two C-level slice copies)."""
    args: list[Any] = [None] * (2 * len(fields))
    args[0::2] = fields
    args[1::2] = values
    return args


def decode_replies(replies: list[Any], dim: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32]]:
    """HMGET replies (``bytes`` or None, in sorted order) → found mask and the found rows.

    Raises ValueError when a stored value is not ``4·dim`` bytes (written with another width).
    """
    n = len(replies)
    mask = np.fromiter(map(is_not, replies, repeat(None)), dtype=np.bool_, count=n)
    data = b"".join(compress(replies, mask))
    hits = int(np.count_nonzero(mask))
    if len(data) != hits * dim * 4:
        raise ValueError(f"stored values are not {4 * dim} bytes each ({len(data)} bytes for {hits} rows)")
    rows = np.frombuffer(data, dtype="<f4").reshape(hits, dim)
    return mask, rows
