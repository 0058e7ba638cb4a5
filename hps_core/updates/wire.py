"""HugeCTR's Kafka wire format for online embedding updates, vectorised with NumPy.

Taken from HugeCTR's sources (NVIDIA-Merlin/HugeCTR, ``HugeCTR/src/hps/kafka_message.cpp``:
``KafkaMessageSink::post`` / ``acquire_send_buffer`` write it, ``KafkaMessageSource::run``
reads it; ``HugeCTR/include/hps/kafka_message.hpp``; the topic name comes from
``HierParameterServerBase::make_tag_name`` in ``HugeCTR/src/hps/hier_parameter_server.cpp``).
No code was copied; the layout is re-stated here.

One Kafka message carries updates of one table, all little-endian, with no padding::

    offset 0   uint32  magic       0x52544348, the bytes 'H' 'C' 'T' 'R' (HCTR_KAFKA_VALUE_PREFIX)
    offset 4   uint32  value_size  bytes per vector: 4 * dim for float32 vectors
    offset 8   n pairs, each:
               key     int64 (HPS JSON ``supportlonglong: true``) or uint32 (``false``)
               value   value_size bytes: the float32 vector

- There is no pair count and no key size in the header: ``n = (len - 8) / (key_size +
  value_size)``, and the key width is a deployment setting both sides must agree on.
- A message of just the header is a *beacon* (HugeCTR's sink sends one to topic
  ``__hps_beacon`` to test the connection); readers skip it.
- The Kafka message key is empty: HugeCTR's reader discards messages that have one.
- Topic per table: ``hps_et.<model>.<table>`` (``PS_EMBEDDING_TABLE_TAG_PREFIX = "hps_et"``);
  model and table names match ``[a-zA-Z0-9_-]{1,120}``.
- Partitioning: key group ``XXH3_64bits(key bytes) % num_key_groups`` (8 by default), Kafka
  partition ``(key_group & 0x7fffffff) % partition_count`` (``kafka_key_group_partitioner``),
  so every update of one key lands in one partition and stays ordered. (HugeCTR's own sink
  hashes the key correctly only for single-pair posts; for multi-pair posts it hashes a
  pointer, ``HCTR_KEY_GROUP_OF_KEY(&k)``. We hash the key in both cases.)

Errors: a payload that breaks the format raises :class:`~hps_core.errors.MalformedMessage`.
"""

from __future__ import annotations

import re
import struct
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from hps_core.arrays import Keys, Vectors
from hps_core.errors import MalformedMessage, RequestError

__all__ = [
    "BEACON_TOPIC",
    "DEFAULT_NUM_KEY_GROUPS",
    "DEFAULT_SEND_BUFFER_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "TOPIC_PREFIX",
    "decode",
    "encode",
    "frame",
    "key_groups",
    "pack",
    "pair_dtype",
    "parse_topic",
    "partitions_for_keys",
    "topic_name",
    "xxh3_64",
]

MAGIC = 0x52544348  # b"HCTR" read as a little-endian uint32
HEADER_SIZE = 8  # magic + value_size
TOPIC_PREFIX = "hps_et"
BEACON_TOPIC = "__hps_beacon"
DEFAULT_NUM_KEY_GROUPS = 8  # KafkaMessageSink's num_key_groups default
DEFAULT_SEND_BUFFER_SIZE = 256 * 1024  # KafkaMessageSink's send_buffer_size default (bytes)

_HEADER = struct.Struct("<II")
_NAME_SYNTAX = re.compile(r"[a-zA-Z0-9_\-]{1,120}")
_TOPIC_SYNTAX = re.compile(rf"{TOPIC_PREFIX}\.([a-zA-Z0-9_\-]{{1,120}})\.([a-zA-Z0-9_\-]{{1,120}})")
_KEY_DTYPES = {np.dtype(np.int64): "<i8", np.dtype(np.uint32): "<u4"}


# --------------------------------------------------------------------------- topics
def topic_name(model: str, table: str) -> str:
    """``hps_et.<model>.<table>``, HugeCTR's tag; names must match ``[a-zA-Z0-9_-]{1,120}``."""
    for what, name in (("model", model), ("table", table)):
        if not isinstance(name, str) or not _NAME_SYNTAX.fullmatch(name):
            raise RequestError(
                f"{what} name {name!r} cannot be a Kafka topic part: use 1-120 characters "
                "of a-z, A-Z, 0-9, '_' and '-' (HugeCTR's make_tag_name rule)"
            )
    return f"{TOPIC_PREFIX}.{model}.{table}"


def parse_topic(topic: str) -> tuple[str, str] | None:
    """``(model, table)`` of an ``hps_et.<model>.<table>`` topic, else None."""
    match = _TOPIC_SYNTAX.fullmatch(topic)
    return (match.group(1), match.group(2)) if match else None


# --------------------------------------------------------------------------- payloads
def _key_code(key_dtype: npt.DTypeLike) -> str:
    code = _KEY_DTYPES.get(np.dtype(key_dtype))
    if code is None:
        raise RequestError(f"key_dtype must be int64 or uint32 (supportlonglong), got {key_dtype}")
    return code


@lru_cache(maxsize=64)
def _pair_dtype(dim: int, key_code: str) -> np.dtype[np.void]:
    return np.dtype([("key", key_code), ("value", "<f4", (dim,))])  # packed: no alignment


def pair_dtype(dim: int, key_dtype: npt.DTypeLike = np.int64) -> np.dtype[np.void]:
    """The packed structured dtype of one (key, vector) pair: ``key_size + 4 * dim`` bytes."""
    return _pair_dtype(int(dim), _key_code(key_dtype))


def pack(keys: npt.ArrayLike, values: npt.ArrayLike, key_dtype: npt.DTypeLike = np.int64) -> npt.NDArray[np.void]:
    """keys (n,) integer, values (n, dim) float32 → (n,) packed pairs, ready to be framed.

    Keys are checked to fit ``key_dtype`` (uint32 keys: 0 ≤ key < 2**32) and values must
    be finite-width float rows; every check is vectorised.
    """
    k = np.asarray(keys)
    v = np.asarray(values)
    if k.ndim != 1 or not np.issubdtype(k.dtype, np.integer):
        raise RequestError(f"keys must be a 1-D integer array, got shape {k.shape} dtype {k.dtype}")
    if v.ndim != 2 or v.shape[0] != k.shape[0] or v.shape[1] < 1:
        raise RequestError(f"values must have shape ({k.shape[0]}, dim), got {v.shape}")
    if not np.issubdtype(v.dtype, np.floating):
        raise RequestError(f"values must be float32, got {v.dtype}")
    code = _key_code(key_dtype)
    if code == "<u4" and k.size and (int(k.min()) < 0 or int(k.max()) > 0xFFFFFFFF):
        raise RequestError("keys do not fit uint32 (supportlonglong: false): 0 <= key < 2**32")
    rows = np.empty(k.shape[0], dtype=_pair_dtype(v.shape[1], code))
    rows["key"] = k
    rows["value"] = v
    return rows


def frame(rows: npt.NDArray[np.void]) -> bytes:
    """One message: the 8-byte header, then ``rows`` (packed pairs from :func:`pack`)."""
    value_size = rows.dtype["value"].itemsize
    return _HEADER.pack(MAGIC, value_size) + rows.tobytes()


def encode(keys: npt.ArrayLike, values: npt.ArrayLike, key_dtype: npt.DTypeLike = np.int64) -> bytes:
    """keys (n,) integer, values (n, dim) float32 → one HugeCTR update message."""
    return frame(pack(keys, values, key_dtype))


def decode(payload: bytes | bytearray | memoryview, expected_dim: int,
           key_dtype: npt.DTypeLike = np.int64) -> tuple[Keys, Vectors]:
    """One HugeCTR update message → keys (n,) int64 and values (n, expected_dim) float32.

    Both arrays are fresh copies (C-contiguous). A beacon (header only) gives n = 0.
    Raises MalformedMessage for a short header, a bad magic, a value size that is not
    ``4 * expected_dim`` or a body that is not a whole number of pairs.
    """
    size = len(payload)
    if size < HEADER_SIZE:
        raise MalformedMessage(f"truncated message: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, value_size = _HEADER.unpack_from(payload, 0)
    if magic != MAGIC:
        raise MalformedMessage(f"bad magic 0x{magic:08x}: expected 0x{MAGIC:08x} ('HCTR')")
    code = _key_code(key_dtype)
    if size == HEADER_SIZE:  # a beacon: HugeCTR skips it before looking at value_size
        return np.empty(0, np.int64), np.empty((0, int(expected_dim)), np.float32)
    if value_size != 4 * expected_dim:
        raise MalformedMessage(
            f"value size {value_size} bytes does not match the table's {expected_dim}-wide "
            f"float32 vectors ({4 * expected_dim} bytes)"
        )
    dtype = _pair_dtype(int(expected_dim), code)
    body = size - HEADER_SIZE
    if body % dtype.itemsize:
        raise MalformedMessage(
            f"truncated message: body of {body} bytes is not a whole number of "
            f"{dtype.itemsize}-byte (key, vector) pairs"
        )
    rows = np.frombuffer(payload, dtype=dtype, offset=HEADER_SIZE)
    keys = rows["key"].astype(np.int64)
    values = np.ascontiguousarray(rows["value"], dtype=np.float32)
    return keys, values


# --------------------------------------------------------------------------- partitioning
_U64 = np.uint64
# XXH3's default secret, bytes 8..23 (the only part XXH3 reads for 4- to 8-byte inputs).
_SECRET_8_24 = bytes.fromhex("7c01812cf721ad1c" "ded46de9839097db")
_BITFLIP = _U64(int.from_bytes(_SECRET_8_24[:8], "little") ^ int.from_bytes(_SECRET_8_24[8:], "little"))
_PRIME_MX2 = _U64(0x9FB21C651E98DF25)


def _rotl(x: npt.NDArray[np.uint64], r: int) -> npt.NDArray[np.uint64]:
    return (x << _U64(r)) | (x >> _U64(64 - r))


def xxh3_64(keys: npt.ArrayLike, key_dtype: npt.DTypeLike = np.int64) -> npt.NDArray[np.uint64]:
    """``XXH3_64bits(&key, sizeof(key))`` (seed 0) of every key, vectorised.

    Keys are hashed as their little-endian bytes: 8 for int64, 4 for uint32 keys
    (XXH3's 4-to-8-byte path: ``rrmxmx`` of the two 32-bit halves swapped, xor the secret).
    """
    code = _key_code(key_dtype)
    if code == "<i8":
        x = np.ascontiguousarray(keys, dtype="<i8").view("<u8").astype(np.uint64)
        length = _U64(8)
        swapped = (x >> _U64(32)) | (x << _U64(32))  # input2 + (input1 << 32)
    else:
        x = np.ascontiguousarray(keys, dtype="<u4").astype(np.uint64)
        length = _U64(4)
        swapped = x | (x << _U64(32))  # input1 == input2 == the key
    h = swapped ^ _BITFLIP
    h ^= _rotl(h, 49) ^ _rotl(h, 24)
    h *= _PRIME_MX2
    h ^= (h >> _U64(35)) + length
    h *= _PRIME_MX2
    h ^= h >> _U64(28)
    return h


def key_groups(keys: npt.ArrayLike, num_key_groups: int = DEFAULT_NUM_KEY_GROUPS,
               key_dtype: npt.DTypeLike = np.int64) -> npt.NDArray[np.int64]:
    """HugeCTR's key group of each key: ``XXH3_64bits(key) % num_key_groups``."""
    if num_key_groups < 1:
        raise RequestError(f"num_key_groups must be >= 1, got {num_key_groups}")
    return (xxh3_64(keys, key_dtype) % _U64(num_key_groups)).astype(np.int64)


def partitions_for_keys(keys: npt.ArrayLike, partition_count: int,
                        num_key_groups: int = DEFAULT_NUM_KEY_GROUPS,
                        key_dtype: npt.DTypeLike = np.int64) -> npt.NDArray[np.int64]:
    """The Kafka partition of each key: ``(key_group & 0x7fffffff) % partition_count``."""
    if partition_count < 1:
        raise RequestError(f"partition_count must be >= 1, got {partition_count}")
    groups = key_groups(keys, num_key_groups, key_dtype)
    return (groups & 0x7FFFFFFF) % partition_count
