"""HugeCTR HPS JSON → frozen, validated configuration objects.

The JSON is HugeCTR's parameter-server configuration, the file handed to the Triton HPS
backend (``--backend-config=hps,ps=/path/hps.json``) and to ``hugectr.inference``. Field
names and defaults follow HugeCTR, researched in (read, not copied):

- ``HugeCTR/src/hps/inference_utils.cpp`` (``parameter_server_config::init`` and the
  ``get_hps_*_type`` helpers, 2023 revision): which keys are read, their defaults, aliases;
- ``HugeCTR/include/pybind/hps_wrapper.hpp``: pybind defaults for ``VolatileDatabaseParams``,
  ``PersistentDatabaseParams``, ``UpdateSourceParams`` and ``InferenceParams``;
- ``HugeCTR/include/hps/inference_utils.hpp`` (older revisions: ``max_get_batch_size``,
  ``max_set_batch_size``, ``algorithm``, ``refresh_time_after_fetch``);
- ``docs/source/hierarchical_parameter_server/hps_database_backend.md`` and
  ``triton-inference-server/hugectr_backend: hps_backend/README.md`` (sample configs).

Unlike HugeCTR, which reads with "soft" getters and silently falls back on unknown enum
values and unknown keys, every value here is type- and range-checked, and a key we do not
know is an error. Errors are :class:`~hps_core.errors.ConfigError` and read
``<file>: <field path>: <problem>. Fix: <what to do>``. Fields HugeCTR reads that only tune
its C++/CUDA internals are parsed (so existing configs load) but have no effect; they are
listed in ``INACTIVE_FIELDS`` and in ``docs/configuration.md``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from hps_core.errors import ConfigError, UnknownTableError
from hps_core.row_formats import FORMAT_NAMES, RowFormat

__all__ = [
    "CacheKind",
    "CachePolicy",
    "INACTIVE_FIELDS",
    "NO_OVERFLOW_LIMIT",
    "OVERFLOW_POLICIES",
    "ModelConfig",
    "OverflowConfig",
    "PERSISTENT_TYPES",
    "ParameterServerConfig",
    "PersistentDBConfig",
    "RedisConfig",
    "TLSConfig",
    "TableConfig",
    "TierType",
    "UpdateSourceConfig",
    "VOLATILE_TYPES",
    "VolatileDBConfig",
    "gpu_cache_requested",
    "load_config",
    "parse_config",
    "entry_version",
    "version_entry_name",
    "version_model_name",
]

_T = TypeVar("_T")

DEFAULT_UPDATE_FILTERS: tuple[str, ...] = ("^hps_.+$",)
NO_OVERFLOW_LIMIT = 2**64 - 1  # HugeCTR: std::numeric_limits<size_t>::max(), i.e. never evict
_REMOTE_PATH = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _default_num_partitions() -> int:
    return min(16, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# Enumerations: canonical name -> HugeCTR aliases (get_hps_database_type & friends).
# --------------------------------------------------------------------------------------------
class TierType(StrEnum):
    """Every database tier type, the one list (``volatile_db.type`` / ``persistent_db.type``).

    A ``StrEnum``: a member equals its canonical HugeCTR name (``TierType.ROCKS_DB ==
    "rocks_db"``). The factories in :mod:`hps_core.db` build one tier per member.
    """

    DISABLED = "disabled"  # no tier in this role
    HASH_MAP = "hash_map"  # in-process hash map (one implementation with the next)
    PARALLEL_HASH_MAP = "parallel_hash_map"  # in-process hash map, num_partitions partitions
    REDIS_CLUSTER = "redis_cluster"  # Redis Cluster or one Redis server, shared between servers
    ROCKS_DB = "rocks_db"  # RocksDB on local disk

    @property
    def in_process(self) -> bool:
        """A hash map: in host shared memory (``volatile_db.host_shared``, the default) or
        private to each serving process; either way on this host, not on a server."""
        return self in (TierType.HASH_MAP, TierType.PARALLEL_HASH_MAP)

    @property
    def shared(self) -> bool:
        """A tier shared between servers; its tiers declare :class:`~hps_core.db.base.SharedTier`."""
        return self is TierType.REDIS_CLUSTER


class CacheKind(StrEnum):
    """An embedding cache's kind, HugeCTR's ``embedding_cache_type``: the one list. HugeCTR's
    ``uvm`` and ``stochastic`` are read as ``dynamic`` (this server implements those two)."""

    DYNAMIC = "dynamic"  # set-associative (32 ways), evicting by its CachePolicy
    STATIC = "static"  # whole tables resident, never evicting

    @classmethod
    def parse(cls, value: object, where: str) -> CacheKind:
        """The kind called ``value``; ConfigError naming ``where`` otherwise."""
        return _parse_member(cls, value, where)


class CachePolicy(StrEnum):
    """How a dynamic cache picks the slot to evict from a full set: the one list."""

    LRU = "lru"  # least recently used
    LFU = "lfu"  # least frequently used (saturating counts)

    @classmethod
    def parse(cls, value: object, where: str) -> CachePolicy:
        """The policy called ``value``; ConfigError naming ``where`` otherwise."""
        return _parse_member(cls, value, where)


_E = TypeVar("_E", bound=StrEnum)


def _parse_member(enum_type: type[_E], value: object, where: str) -> _E:
    if isinstance(value, str):
        for member in enum_type:
            if value == member:
                return member
    raise ConfigError(f"{where} must be one of {', '.join(repr(m.value) for m in enum_type)}, got {value!r}")


#: HugeCTR's ``multi_process_hash_map``: here the host-shared hash map every hash map is by
#: default, so a parallel_hash_map that cannot be made private (``host_shared: false``).
MULTI_PROCESS_ALIASES = ("multi_process_hash_map", "multi_process_hashmap", "multi_process_hash",
                         "multi_process_map")

#: HugeCTR's aliases of each tier type, per role (the roles' accepted types).
_TIER_ALIASES: Mapping[TierType, tuple[str, ...]] = {
    TierType.DISABLED: ("disabled", "disable", "none"),
    TierType.HASH_MAP: ("hash_map", "hashmap", "hash", "map"),
    TierType.PARALLEL_HASH_MAP: ("parallel_hash_map", "parallel_hashmap", "parallel_hash",
                                 "parallel_map", *MULTI_PROCESS_ALIASES),
    TierType.REDIS_CLUSTER: ("redis_cluster", "redis"),
    TierType.ROCKS_DB: ("rocks_db", "rocksdb", "rocks"),
}
VOLATILE_TYPES: tuple[TierType, ...] = (
    TierType.DISABLED, TierType.HASH_MAP, TierType.PARALLEL_HASH_MAP, TierType.REDIS_CLUSTER)
PERSISTENT_TYPES: tuple[TierType, ...] = (TierType.DISABLED, TierType.ROCKS_DB)
_VOLATILE_TYPES = {t.value: _TIER_ALIASES[t] for t in VOLATILE_TYPES}
_PERSISTENT_TYPES = {t.value: _TIER_ALIASES[t] for t in PERSISTENT_TYPES}
_UPDATE_SOURCE_TYPES = {
    "null": ("null", "none"),
    "kafka_message_queue": ("kafka_message_queue", "kafka_mq", "kafka"),
}
#: HugeCTR's overflow policies and their short aliases.
OVERFLOW_POLICIES: Mapping[str, tuple[str, ...]] = {
    "evict_random": ("evict_random", "random"),
    "evict_least_used": ("evict_least_used", "least_used"),
    "evict_oldest": ("evict_oldest", "oldest"),
}
_EMBEDDING_CACHE_TYPES = {
    CacheKind.DYNAMIC.value: ("dynamic", "uvm", "stochastic"),
    CacheKind.STATIC.value: ("static",),
}
_HASH_MAP_ALGORITHMS = {"phm": ("phm",), "stl": ("stl",)}

# Values HugeCTR knows but this server does not implement: value -> fix.
_UNSUPPORTED_VOLATILE = {
    name: "RocksDB is a persistent database: move it to 'persistent_db'"
    for name in _TIER_ALIASES[TierType.ROCKS_DB]
}
_UNSUPPORTED_PERSISTENT = {
    name: "hash maps and Redis are volatile databases: move them to 'volatile_db'"
    for kind in VOLATILE_TYPES if kind not in PERSISTENT_TYPES
    for name in _TIER_ALIASES[kind]
}


# --------------------------------------------------------------------------------------------
# Configuration objects.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _DatabaseConfig:
    """Fields shared by the volatile and the persistent database."""

    type: TierType = TierType.DISABLED  # one of the role's types (VOLATILE_ / PERSISTENT_TYPES)
    max_batch_size: int = 64 * 1024  # keys per batched call to the tier (chunking)
    max_get_batch_size: int | None = None  # keys per fetch chunk (HugeCTR ≤ 23.04); None = max_batch_size
    max_set_batch_size: int | None = None  # keys per insert chunk (HugeCTR ≤ 23.04); None = max_batch_size
    initialize_after_startup: bool = True  # fill the tier from the sparse files at start-up
    update_filters: tuple[str, ...] = DEFAULT_UPDATE_FILTERS  # regexes of Kafka topics to apply

    # The one place "absent means max_batch_size" is decided; the tiers chunk by these and
    # check them (0 or a negative size is their ConfigError, naming the field).
    @property
    def get_batch_size(self) -> int:
        """Keys per fetch chunk: ``max_get_batch_size``, or ``max_batch_size`` when None."""
        return self.max_batch_size if self.max_get_batch_size is None else self.max_get_batch_size

    @property
    def set_batch_size(self) -> int:
        """Keys per insert chunk: ``max_set_batch_size``, or ``max_batch_size`` when None."""
        return self.max_batch_size if self.max_set_batch_size is None else self.max_set_batch_size


@dataclass(frozen=True, kw_only=True)
class TLSConfig:
    """Redis TLS: HugeCTR's flat ``enable_tls`` and ``tls_*`` fields of ``volatile_db``."""

    enabled: bool = False  # enable_tls: TLS/SSL connections
    ca_certificate: str = "cacertbundle.crt"  # tls_ca_certificate: CA file or folder
    client_certificate: str = "client_cert.pem"  # tls_client_certificate
    client_key: str = "client_key.pem"  # tls_client_key: client private key
    server_name_identification: str = "redis.localhost"  # tls_server_name_identification: SNI


@dataclass(frozen=True, kw_only=True)
class RedisConfig:
    """The Redis fields of ``volatile_db`` (flat in the JSON, as in HugeCTR)."""

    address: str = "127.0.0.1:7000"  # "host[:port],host[:port],..."
    user_name: str = "default"  # ACL user
    password: str = field(default="", repr=False)  # "" = none
    num_node_connections: int = 5  # connections per cluster node
    tls: TLSConfig = field(default_factory=TLSConfig)  # enable_tls, tls_*


@dataclass(frozen=True, kw_only=True)
class OverflowConfig:
    """When a hash-map partition overflows and what it evicts: HugeCTR's ``overflow_*``."""

    margin: int = NO_OVERFLOW_LIMIT  # overflow_margin: max rows per partition (default: none)
    policy: str = "evict_random"  # overflow_policy: evict_random | evict_least_used | evict_oldest
    resolution_target: float = 0.8  # overflow_resolution_target: evict down to this fraction

    @property
    def limited(self) -> bool:
        """Whether a margin is set (HugeCTR's default, ``size_t`` max, never evicts)."""
        return self.margin < NO_OVERFLOW_LIMIT


@dataclass(frozen=True, kw_only=True)
class VolatileDBConfig(_DatabaseConfig):
    """``volatile_db``: the CPU-memory tier (hash map) or a Redis Cluster."""

    type: TierType = TierType.PARALLEL_HASH_MAP  # one of VOLATILE_TYPES
    num_partitions: int = field(default_factory=_default_num_partitions)  # partitions per table
    redis: RedisConfig = field(default_factory=RedisConfig)  # address, user_name, password, ...
    overflow: OverflowConfig = field(default_factory=OverflowConfig)  # overflow_*
    allocation_rate: int = 256 * 1024 * 1024  # hash map: bytes per allocation (inactive)
    host_shared: bool = True  # hash map: one copy per host in /dev/shm (false: one per process)
    shared_memory_size: int = 16 * 1024**3  # host store: most bytes its namespace takes in /dev/shm
    shared_memory_name: str = ""  # host store namespace; "" = derived from the HPS JSON's path
    shared_memory_auto_remove: bool = True  # host store: removed when its last user exits
    initial_cache_rate: float = 1.0  # fraction of each table loaded at start-up
    cache_missed_embeddings: bool = False  # copy rows found in the persistent tier up here
    refresh_time_after_fetch: bool = False  # legacy (HugeCTR ≤ 23.04), inactive
    algorithm: str = "phm"  # legacy hash map algorithm (HugeCTR ≤ 22.x), inactive

    @property
    def enabled(self) -> bool:
        """Whether a volatile tier is configured."""
        return self.type != TierType.DISABLED


@dataclass(frozen=True, kw_only=True)
class PersistentDBConfig(_DatabaseConfig):
    """``persistent_db``: the RocksDB tier on local SSD."""

    path: str = field(default_factory=lambda: os.path.join(tempfile.gettempdir(), "rocksdb"))
    num_threads: int = 16  # RocksDB background threads
    read_only: bool = False  # open the database read-only (shared, e.g. over NFS)

    @property
    def enabled(self) -> bool:
        """Whether a persistent tier is configured."""
        return self.type != TierType.DISABLED


@dataclass(frozen=True, kw_only=True)
class UpdateSourceConfig:
    """``update_source``: where online embedding updates come from (Kafka)."""

    type: str = "null"  # null | kafka_message_queue
    brokers: str = "127.0.0.1:9092"  # Kafka bootstrap servers "host[:port][;host[:port]...]"
    metadata_refresh_interval_ms: int = 30_000  # topic metadata refresh period
    receive_buffer_size: int = 256 * 1024  # bytes per received message buffer
    poll_timeout_ms: int = 500  # max wait for more messages before applying a batch
    max_batch_size: int = 8 * 1024  # max keys applied to the tiers per call
    failure_backoff_ms: int = 50  # delay before retrying a failed apply
    max_commit_interval: int = 32  # max messages between Kafka offset commits
    max_receive_buffer_size: int | None = None  # legacy name (HugeCTR ≤ 22.x), inactive

    @property
    def enabled(self) -> bool:
        """Whether an update source is configured."""
        return self.type != "null"


@dataclass(frozen=True, kw_only=True)
class TableConfig:
    """One embedding table of a model, as the tiers and the lookup see it."""

    name: str  # embedding_table_names[i]
    dim: int  # embedding_vecsize_per_table[i]: floats per row
    default_value: float  # default_value_for_each_table[i]: fill for keys found nowhere
    max_keys_per_sample: int  # maxnum_catfeature_query_per_table_per_sample[i]
    sparse_file: str  # sparse_files[i]: absolute path of the HugeCTR sparse model folder
    qualified_name: str  # "hps_et.<model>.<table>", the table's name in every tier
    row_format: RowFormat = RowFormat.FP32  # embedding_format_per_table[i] (fp8_quant: fp8): rows as stored


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One entry of ``models[]``: a model and its embedding tables."""

    model: str  # model name; Triton model name of the HPS step
    sparse_files: tuple[str, ...]  # one HugeCTR sparse model folder per table (absolute)
    embedding_vecsize_per_table: tuple[int, ...]  # vector width per table
    maxnum_catfeature_query_per_table_per_sample: tuple[int, ...]  # max keys/sample per table
    embedding_table_names: tuple[str, ...]  # default "sparse_embedding<i>"
    default_value_for_each_table: tuple[float, ...]  # default 0.0 per table
    embedding_format_per_table: tuple[RowFormat, ...]  # row format per table (default: TableConfig's)
    deployed_device_list: tuple[int, ...] = (0,)  # CUDA devices serving this model
    max_batch_size: int = 64  # max samples per request
    gpucache: bool = True  # use the GPU embedding cache
    gpucacheper: float = 0.2  # GPU cache capacity as a fraction of each table's rows
    gpu_cache_shared: bool = True  # this server's: one GPU cache per GPU shared by the instances (CUDA IPC)
    hit_rate_threshold: float = 0.9  # below: insert misses synchronously; above: in background
    embedding_cache_type: CacheKind = CacheKind.DYNAMIC  # HugeCTR's uvm and stochastic: dynamic
    use_static_table: bool = False  # HugeCTR alias: true forces embedding_cache_type "static"
    cache_refresh_percentage_per_iteration: float = 0.0  # cache share refreshed per refresh step
    refresh_delay: float = 0.0  # seconds after start-up before the first cache refresh
    refresh_interval: float = 0.0  # seconds between cache refreshes (0 = never)
    fp8_quant: bool = False  # HugeCTR's FP8 switch: true stores every table as fp8 (embedding_format_per_table)
    # Accepted but inactive (HugeCTR C++/CUDA or dense-network tuning); see INACTIVE_FIELDS.
    dense_file: str = ""  # HugeCTR dense model file
    network_file: str = ""  # HugeCTR network JSON
    non_trainable_params_file: str = ""  # HugeCTR dense non-trainable parameters
    num_of_worker_buffer_in_pool: int = 1  # HugeCTR embedding-cache worker buffers
    num_of_refresher_buffer_in_pool: int = 1  # HugeCTR embedding-cache refresh buffers
    thread_pool_size: int = 16  # HugeCTR insertion thread pool
    maxnum_des_feature_per_sample: int = 26  # dense features per sample (dense model)
    label_dim: int = 1  # outputs per sample (dense model)
    slot_num: int = 10  # feature fields (dense model)
    use_context_stream: bool = True  # TF/TRT plugin stream choice
    use_mixed_precision: bool = False  # dense model precision
    scaler: float = 1.0  # dense model mixed-precision scaler
    use_algorithm_search: bool = True  # dense model cuBLAS algorithm search
    use_cuda_graph: bool = True  # dense model CUDA graphs
    use_hctr_cache_implementation: bool = True  # HugeCTR cache implementation choice
    init_ec: bool = True  # HugeCTR: warm the embedding cache at start-up
    enable_pagelock: bool = False  # HugeCTR: page-lock host tables

    @property
    def num_tables(self) -> int:
        """Number of embedding tables (``len(sparse_files)``)."""
        return len(self.sparse_files)

    @property
    def tables(self) -> tuple[TableConfig, ...]:
        """The model's tables, in ``sparse_files`` order (the order of ``NUMKEYS``)."""
        return tuple(
            TableConfig(
                name=name,
                dim=dim,
                default_value=default,
                max_keys_per_sample=max_keys,
                sparse_file=sparse_file,
                qualified_name=f"hps_et.{self.model}.{name}",
                row_format=row_format,
            )
            for name, dim, default, max_keys, sparse_file, row_format in zip(
                self.embedding_table_names,
                self.embedding_vecsize_per_table,
                self.default_value_for_each_table,
                self.maxnum_catfeature_query_per_table_per_sample,
                self.sparse_files,
                self.embedding_format_per_table,
            )
        )

    def table(self, name: str) -> TableConfig:
        """The table called ``name`` (plain or qualified); UnknownTableError if absent."""
        for table in self.tables:
            if name in (table.name, table.qualified_name):
                return table
        raise UnknownTableError(
            f"model {self.model!r} has no table {name!r}; its tables are "
            f"{list(self.embedding_table_names)}"
        )


@dataclass(frozen=True, kw_only=True)
class ParameterServerConfig:
    """The whole HPS JSON: databases, update source and models."""

    supportlonglong: bool = True  # keys are int64 (true) or uint32 (false)
    fuse_embedding_table: bool = False  # HugeCTR table fusion (inactive: results identical)
    volatile_db: VolatileDBConfig = field(default_factory=VolatileDBConfig)
    persistent_db: PersistentDBConfig = field(default_factory=PersistentDBConfig)
    update_source: UpdateSourceConfig = field(default_factory=UpdateSourceConfig)
    models: tuple[ModelConfig, ...] = ()
    source: str = "<memory>"  # file the config was read from (for messages)

    def model(self, name: str) -> ModelConfig:
        """The model called ``name``; UnknownTableError if it is not configured."""
        for model in self.models:
            if model.model == name:
                return model
        raise UnknownTableError(
            f"model {name!r} is not configured in {self.source}; configured models: "
            f"{[m.model for m in self.models]}"
        )

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names of all configured models, in file order."""
        return tuple(m.model for m in self.models)


_VERSIONED_ENTRY = re.compile(r"(.+)_v(\d+)")  # <name>_v<N>: the entry version N >= 2 serves


def version_entry_name(base: str, version: int) -> str:
    """The HPS JSON entry ``hps publish-model`` writes for ``version`` of the model ``base``:
    HugeCTR's name for version 1, ``<base>_v<N>`` after (:func:`entry_version` reads it back)."""
    return base if version <= 1 else f"{base}_v{version}"


def version_model_name(config: ParameterServerConfig, name: str, version: int) -> str:
    """The entry of a version's own HPS JSON that version ``version`` of ``name`` serves:
    ``<name>_v<version>`` when the JSON has one, else ``name``. The backend (which entry an
    instance serves) and ``hps publish-model`` (which entry serves, whose tables to drop) both
    pick it here."""
    versioned = f"{name}_v{version}"  # even for version 1: a JSON may name its entry so
    return versioned if any(m.model == versioned for m in config.models) else name


def entry_version(entry: str) -> int:
    """The model version a model entry serves: N for ``<name>_v<N>``, else 1 (the inverse of
    :func:`version_model_name`'s naming)."""
    match = _VERSIONED_ENTRY.fullmatch(entry)
    return int(match.group(2)) if match else 1


def gpu_cache_requested(model: ModelConfig) -> bool:
    """Whether the config asks for a GPU embedding cache for ``model``.

    True when ``gpucache`` is true and the cache has room (``gpucacheper > 0``), or the cache
    type is ``static`` (the whole table lives on the GPU). Whether a GPU is present is the
    caller's question.
    """
    if not model.gpucache:
        return False
    # ==, not is: a ModelConfig built in code may hold the name
    return model.gpucacheper > 0.0 or model.embedding_cache_type == CacheKind.STATIC


# Fields parsed for compatibility that change nothing in this server, per section.
INACTIVE_FIELDS: Mapping[str, tuple[str, ...]] = {
    "": ("fuse_embedding_table",),
    "volatile_db": (
        "allocation_rate", "refresh_time_after_fetch", "algorithm",
    ),
    "persistent_db": (),
    "update_source": ("max_receive_buffer_size",),
    "models[]": (
        "dense_file", "network_file", "non_trainable_params_file",
        "num_of_worker_buffer_in_pool", "num_of_refresher_buffer_in_pool", "thread_pool_size",
        "maxnum_des_feature_per_sample", "label_dim", "slot_num", "use_context_stream",
        "use_mixed_precision", "scaler", "use_algorithm_search", "use_cuda_graph",
        "use_hctr_cache_implementation", "init_ec", "enable_pagelock",
    ),
}


# --------------------------------------------------------------------------------------------
# Typed readers.
# --------------------------------------------------------------------------------------------
def _field_defaults(section: type[Any]) -> dict[str, Any]:
    """The defaults of a section dataclass's fields, by field name (required fields left out).

    The one place defaults are written is the dataclass; the parser reads them from here.
    """
    out: dict[str, Any] = {}
    for f in fields(section):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


class _Reader:
    """Reads typed fields of one JSON object, remembering which keys it consumed."""

    def __init__(self, obj: Any, where: str, source: str) -> None:
        self.source = source
        self.where = where
        if not isinstance(obj, dict):
            self.fail("", f"expected a JSON object, got {_json_type(obj)}",
                      "write this section as {...}")
        self.obj: dict[str, Any] = obj
        self.seen: set[str] = set()

    # -- errors -------------------------------------------------------------------------
    def path(self, key: str) -> str:
        if not key:
            return self.where or "<top level>"
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, problem: str, fix: str) -> NoReturn:
        raise ConfigError(f"{self.source}: {self.path(key)}: {problem}. Fix: {fix}.")

    # -- raw access ---------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.obj

    def _get(self, key: str, default: _T, required: bool, kind: str) -> Any:
        self.seen.add(key)
        if key not in self.obj:
            if required:
                self.fail(key, "is required but missing", f"add \"{key}\": <{kind}>")
            return default
        return self.obj[key]

    # -- scalars ------------------------------------------------------------------------
    def read_bool(self, key: str, default: bool = False, *, required: bool = False) -> bool:
        value = self._get(key, default, required, "true|false")
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_show(value)}",
                      "write a JSON boolean without quotes")
        return value

    def read_int(self, key: str, default: Any = 0, *, minimum: int | None = 0,
                 required: bool = False) -> Any:
        value = self._get(key, default, required, "integer")
        if value is None and default is None and key not in self.obj:
            return None
        self._check_int(key, value, minimum)
        return value

    def read_float(self, key: str, default: float = 0.0, *, lo: float | None = None,
                   hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
                   required: bool = False) -> float:
        value = self.float_item(key, self._get(key, default, required, "number"))
        self._check_range(key, value, lo, hi, lo_open, hi_open)
        return value

    def read_str(self, key: str, default: str = "", *, required: bool = False,
                 non_empty: bool = False) -> str:
        value = self._get(key, default, required, "string")
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_show(value)}", "write a JSON string")
        if non_empty and not value:
            self.fail(key, "must not be empty", "give a non-empty string")
        return value

    def read_enum(self, key: str, default: str, choices: Mapping[str, tuple[str, ...]],
                  unsupported: Mapping[str, str] | None = None) -> str:
        value = self.read_str(key, default)
        for canonical, aliases in choices.items():
            if value in aliases:
                return canonical
        if unsupported and value in unsupported:
            self.fail(key, f"{value!r} is not supported by this server", unsupported[value])
        self.fail(key, f"unknown value {value!r}",
                  f"use one of {', '.join(repr(c) for c in choices)}")

    # -- lists --------------------------------------------------------------------------
    def read_list(self, key: str, item: Callable[[str, Any], _T], default: Iterable[_T] = (),
                  *, required: bool = False, length: int | None = None,
                  length_of: str = "", non_empty: bool = False) -> tuple[_T, ...]:
        value = self._get(key, None, required, "list")
        if value is None and key not in self.obj:
            return tuple(default)
        if not isinstance(value, list):
            self.fail(key, f"expected a JSON list, got {_show(value)}", "write [..., ...]")
        if non_empty and not value:
            self.fail(key, "must not be empty", "give at least one entry")
        if length is not None and len(value) != length:
            self.fail(key, f"has {len(value)} entries but {length_of} has {length}",
                      f"give exactly one entry per entry of {length_of}")
        return tuple(item(f"{key}[{i}]", v) for i, v in enumerate(value))

    def int_item(self, minimum: int) -> Callable[[str, Any], int]:
        def read(key: str, value: Any) -> int:
            self._check_int(key, value, minimum)
            return int(value)
        return read

    def float_item(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"expected a number, got {_show(value)}", "write a JSON number")
        if not math.isfinite(value):
            self.fail(key, f"must be a finite number, got {value}", "write a finite number")
        return float(value)

    def str_item(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, f"expected a non-empty string, got {_show(value)}",
                      "write a non-empty JSON string")
        return value

    # -- checks -------------------------------------------------------------------------
    def _check_int(self, key: str, value: Any, minimum: int | None) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected an integer, got {_show(value)}",
                      "write a whole number without quotes or decimal point")
        if minimum is not None and value < minimum:
            self.fail(key, f"must be >= {minimum}, got {value}", f"use a value >= {minimum}")

    def _check_range(self, key: str, value: float, lo: float | None, hi: float | None,
                     lo_open: bool, hi_open: bool) -> None:
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if too_low or too_high:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf" if hi is None else f"{hi:g}"
            self.fail(key, f"must be in {left}{lo_s}, {hi_s}{right}, got {value:g}",
                      "use a value in that range")

    def finish(self) -> None:
        """Fail on any key that no reader consumed."""
        for key in self.obj:
            if key not in self.seen:
                close = difflib.get_close_matches(key, sorted(self.seen), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(key, f"field {key!r} is not supported by this server{hint}",
                          "remove it (see docs/configuration.md for the supported fields)")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else _json_type(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------
# Section parsers.
# --------------------------------------------------------------------------------------------
def _resolve_path(path: str, base_dir: Path) -> str:
    """Absolute, normalised path; relative paths are relative to the JSON's folder."""
    return os.path.normpath(os.path.join(base_dir, path)) if path else path


def _parse_filters(r: _Reader) -> tuple[str, ...]:
    filters = r.read_list("update_filters", r.str_item, DEFAULT_UPDATE_FILTERS)
    for i, pattern in enumerate(filters):
        try:
            re.compile(pattern)
        except re.error as exc:
            r.fail(f"update_filters[{i}]", f"invalid regular expression {pattern!r} ({exc})",
                   "fix the pattern")
    return filters


def _parse_batch_sizes(r: _Reader) -> dict[str, Any]:
    """``max_batch_size`` and the older get/set pair: an absent ``max_batch_size`` is the
    smaller of the pair; an absent get/set size stays None (see ``_DatabaseConfig``)."""
    get = r.read_int("max_get_batch_size", None, minimum=1)
    put = r.read_int("max_set_batch_size", None, minimum=1)
    legacy = [v for v in (get, put) if v is not None]
    default = _field_defaults(_DatabaseConfig)["max_batch_size"]
    batch = r.read_int("max_batch_size", min(legacy) if legacy else default, minimum=1)
    return {"max_batch_size": batch, "max_get_batch_size": get, "max_set_batch_size": put}


def _parse_namespace(r: _Reader, default: str) -> str:
    """``shared_memory_name``: it names a folder under /dev/shm, so a plain name."""
    name = r.read_str("shared_memory_name", default)
    if name and (not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", name) or name.startswith(".")):
        r.fail("shared_memory_name", f"{name!r} cannot name a folder under /dev/shm",
               "use 1-100 letters, digits, '_', '.' or '-', not starting with '.'")
    return name


def _parse_volatile(obj: Any, source: str) -> VolatileDBConfig:
    r = _Reader(obj, "volatile_db", source)
    d, dr, dt, do = (_field_defaults(c) for c in (VolatileDBConfig, RedisConfig, TLSConfig, OverflowConfig))
    # HugeCTR quirk kept: the section present without "type" means disabled.
    multi_process = r.read_str("type", "") in MULTI_PROCESS_ALIASES
    host_shared = r.read_bool("host_shared", d["host_shared"])
    if multi_process and not host_shared:
        r.fail("host_shared", "false contradicts type 'multi_process_hash_map' (a host-shared map)",
               "use type 'parallel_hash_map' for a private map in each process")
    cfg = VolatileDBConfig(
        type=TierType(r.read_enum("type", TierType.DISABLED, _VOLATILE_TYPES, _UNSUPPORTED_VOLATILE)),
        host_shared=host_shared,
        num_partitions=r.read_int("num_partitions", d["num_partitions"], minimum=1),
        redis=RedisConfig(
            address=r.read_str("address", dr["address"], non_empty=True),
            user_name=r.read_str("user_name", dr["user_name"]),
            password=r.read_str("password", dr["password"]),
            num_node_connections=r.read_int("num_node_connections", dr["num_node_connections"],
                                            minimum=1),
            tls=TLSConfig(
                enabled=r.read_bool("enable_tls", dt["enabled"]),
                ca_certificate=r.read_str("tls_ca_certificate", dt["ca_certificate"]),
                client_certificate=r.read_str("tls_client_certificate", dt["client_certificate"]),
                client_key=r.read_str("tls_client_key", dt["client_key"]),
                server_name_identification=r.read_str("tls_server_name_identification",
                                                      dt["server_name_identification"]),
            ),
        ),
        overflow=OverflowConfig(
            margin=r.read_int("overflow_margin", do["margin"], minimum=1),
            policy=r.read_enum("overflow_policy", do["policy"], OVERFLOW_POLICIES),
            resolution_target=r.read_float("overflow_resolution_target", do["resolution_target"],
                                           lo=0.0, hi=1.0, lo_open=True, hi_open=True),
        ),
        allocation_rate=r.read_int("allocation_rate", d["allocation_rate"], minimum=1),
        shared_memory_size=r.read_int("shared_memory_size", d["shared_memory_size"], minimum=1),
        shared_memory_name=_parse_namespace(r, d["shared_memory_name"]),
        shared_memory_auto_remove=r.read_bool("shared_memory_auto_remove",
                                              d["shared_memory_auto_remove"]),
        initialize_after_startup=r.read_bool("initialize_after_startup",
                                             d["initialize_after_startup"]),
        initial_cache_rate=r.read_float("initial_cache_rate", d["initial_cache_rate"], lo=0.0,
                                        hi=1.0),
        cache_missed_embeddings=r.read_bool("cache_missed_embeddings",
                                            d["cache_missed_embeddings"]),
        update_filters=_parse_filters(r),
        refresh_time_after_fetch=r.read_bool("refresh_time_after_fetch",
                                             d["refresh_time_after_fetch"]),
        algorithm=r.read_enum("algorithm", d["algorithm"], _HASH_MAP_ALGORITHMS),
        **_parse_batch_sizes(r),
    )
    r.finish()
    return cfg


def _parse_persistent(obj: Any, source: str, base_dir: Path) -> PersistentDBConfig:
    r = _Reader(obj, "persistent_db", source)
    d = _field_defaults(PersistentDBConfig)
    cfg = PersistentDBConfig(
        type=TierType(r.read_enum("type", d["type"], _PERSISTENT_TYPES, _UNSUPPORTED_PERSISTENT)),
        path=_resolve_path(r.read_str("path", d["path"], non_empty=True), base_dir),
        num_threads=r.read_int("num_threads", d["num_threads"], minimum=1),
        read_only=r.read_bool("read_only", d["read_only"]),
        initialize_after_startup=r.read_bool("initialize_after_startup",
                                             d["initialize_after_startup"]),
        update_filters=_parse_filters(r),
        **_parse_batch_sizes(r),
    )
    r.finish()
    return cfg


def _parse_update_source(obj: Any, source: str) -> UpdateSourceConfig:
    r = _Reader(obj, "update_source", source)
    d = _field_defaults(UpdateSourceConfig)
    cfg = UpdateSourceConfig(
        type=r.read_enum("type", d["type"], _UPDATE_SOURCE_TYPES),
        brokers=r.read_str("brokers", d["brokers"], non_empty=True),
        metadata_refresh_interval_ms=r.read_int("metadata_refresh_interval_ms",
                                                d["metadata_refresh_interval_ms"], minimum=1),
        receive_buffer_size=r.read_int("receive_buffer_size", d["receive_buffer_size"], minimum=1),
        poll_timeout_ms=r.read_int("poll_timeout_ms", d["poll_timeout_ms"], minimum=0),
        max_batch_size=r.read_int("max_batch_size", d["max_batch_size"], minimum=1),
        failure_backoff_ms=r.read_int("failure_backoff_ms", d["failure_backoff_ms"], minimum=0),
        max_commit_interval=r.read_int("max_commit_interval", d["max_commit_interval"], minimum=1),
        max_receive_buffer_size=r.read_int("max_receive_buffer_size",
                                           d["max_receive_buffer_size"], minimum=1),
    )
    r.finish()
    return cfg


def _parse_sparse_files(r: _Reader, base_dir: Path) -> tuple[str, ...]:
    files = r.read_list("sparse_files", r.str_item, required=True, non_empty=True)
    for i, path in enumerate(files):
        if _REMOTE_PATH.match(path):
            r.fail(f"sparse_files[{i}]",
                   f"remote file systems (HDFS, S3, GCS) are not supported: {path!r}",
                   "copy the sparse model folder to local disk and give its path")
    return tuple(_resolve_path(path, base_dir) for path in files)


def _parse_row_formats(r: _Reader, n: int, model: str, fp8_quant: bool) -> tuple[RowFormat, ...]:
    """``embedding_format_per_table`` (one format name for every table, or a list with one per
    table) and HugeCTR's ``fp8_quant`` (true: every table fp8), resolved to one format per
    table. Absent both, every table has :class:`TableConfig`'s default format."""
    key = "embedding_format_per_table"
    r.seen.add(key)
    if key not in r.obj:
        return (RowFormat.FP8 if fp8_quant else _field_defaults(TableConfig)["row_format"],) * n
    value = r.obj[key]
    if isinstance(value, list):
        if len(value) != n:
            r.fail(key, f"model {model!r}: has {len(value)} entries but sparse_files has {n}",
                   "give one format per table, or one format name for every table")
        formats = tuple(_row_format(r, f"{key}[{i}]", v, model) for i, v in enumerate(value))
    else:
        formats = (_row_format(r, key, value, model),) * n
    if fp8_quant and any(f is not RowFormat.FP8 for f in formats):
        r.fail(key, f"model {model!r}: fp8_quant is true (every table fp8) but "
                    f"embedding_format_per_table is {json.dumps(value)}",
               "remove one of the two fields (fp8_quant: true is embedding_format_per_table: \"fp8\")")
    return formats


def _row_format(r: _Reader, key: str, value: Any, model: str) -> RowFormat:
    if not isinstance(value, str) or value not in FORMAT_NAMES:
        r.fail(key, f"model {model!r}: unknown row format {_show(value)}",
               f"use one of {', '.join(repr(name) for name in FORMAT_NAMES)}")
    return RowFormat(value)


def _parse_model(obj: Any, index: int, source: str, base_dir: Path) -> ModelConfig:
    r = _Reader(obj, f"models[{index}]", source)
    d = _field_defaults(ModelConfig)
    model = r.read_str("model", required=True, non_empty=True)
    sparse_files = _parse_sparse_files(r, base_dir)
    n = len(sparse_files)
    names = r.read_list("embedding_table_names", r.str_item,
                        tuple(f"sparse_embedding{i}" for i in range(n)), length=n, length_of="sparse_files")
    for i, name in enumerate(names):
        if name in names[:i]:
            r.fail(f"embedding_table_names[{i}]", f"duplicate table name {name!r}",
                   "give every table of a model its own name")
    defaults = r.read_list("default_value_for_each_table", r.float_item, (0.0,) * n)
    if len(defaults) == 1 and n > 1:
        defaults = defaults * n  # HugeCTR broadcasts a one-entry list (InferenceParams)
    elif len(defaults) != n:
        r.fail("default_value_for_each_table",
               f"has {len(defaults)} entries but sparse_files has {n}",
               "give one default value per table (or a single value for all tables)")
    fp8_quant = r.read_bool("fp8_quant", d["fp8_quant"])
    use_static_table = r.read_bool("use_static_table", d["use_static_table"])
    cache_type = r.read_enum("embedding_cache_type", d["embedding_cache_type"], _EMBEDDING_CACHE_TYPES)
    devices = r.read_list("deployed_device_list", r.int_item(0), d["deployed_device_list"], non_empty=True)
    if len(set(devices)) != len(devices):
        r.fail("deployed_device_list", f"lists a device twice: {list(devices)}",
               "list each device once")
    cfg = ModelConfig(
        model=model,
        sparse_files=sparse_files,
        embedding_vecsize_per_table=r.read_list("embedding_vecsize_per_table", r.int_item(1),
                                                required=True, length=n, length_of="sparse_files"),
        maxnum_catfeature_query_per_table_per_sample=r.read_list(
            "maxnum_catfeature_query_per_table_per_sample", r.int_item(1), required=True,
            length=n, length_of="sparse_files"),
        embedding_table_names=names,
        default_value_for_each_table=defaults,
        embedding_format_per_table=_parse_row_formats(r, n, model, fp8_quant),
        deployed_device_list=devices,
        max_batch_size=r.read_int("max_batch_size", d["max_batch_size"], minimum=1),
        gpucache=r.read_bool("gpucache", d["gpucache"]),
        gpucacheper=r.read_float("gpucacheper", d["gpucacheper"], lo=0.0, hi=1.0),
        gpu_cache_shared=r.read_bool("gpu_cache_shared", d["gpu_cache_shared"]),
        hit_rate_threshold=r.read_float("hit_rate_threshold", d["hit_rate_threshold"], lo=0.0),
        embedding_cache_type=CacheKind.STATIC if use_static_table else CacheKind(cache_type),
        use_static_table=use_static_table,
        cache_refresh_percentage_per_iteration=r.read_float(
            "cache_refresh_percentage_per_iteration", 0.0, lo=0.0, hi=1.0),
        refresh_delay=r.read_float("refresh_delay", d["refresh_delay"], lo=0.0),
        refresh_interval=r.read_float("refresh_interval", d["refresh_interval"], lo=0.0),
        fp8_quant=fp8_quant,
        dense_file=_resolve_path(r.read_str("dense_file", d["dense_file"]), base_dir),
        network_file=_resolve_path(r.read_str("network_file", d["network_file"]), base_dir),
        non_trainable_params_file=_resolve_path(r.read_str("non_trainable_params_file", d["non_trainable_params_file"]),
                                                base_dir),
        num_of_worker_buffer_in_pool=r.read_int("num_of_worker_buffer_in_pool", d["num_of_worker_buffer_in_pool"], minimum=1),
        num_of_refresher_buffer_in_pool=r.read_int("num_of_refresher_buffer_in_pool", d["num_of_refresher_buffer_in_pool"],
                                              minimum=1),
        thread_pool_size=r.read_int("thread_pool_size", d["thread_pool_size"], minimum=1),
        maxnum_des_feature_per_sample=r.read_int("maxnum_des_feature_per_sample", d["maxnum_des_feature_per_sample"]),
        label_dim=r.read_int("label_dim", d["label_dim"], minimum=1),
        slot_num=r.read_int("slot_num", d["slot_num"], minimum=0),
        use_context_stream=r.read_bool("use_context_stream", d["use_context_stream"]),
        use_mixed_precision=r.read_bool("use_mixed_precision", d["use_mixed_precision"]),
        scaler=r.read_float("scaler", d["scaler"], lo=0.0, lo_open=True),
        use_algorithm_search=r.read_bool("use_algorithm_search", d["use_algorithm_search"]),
        use_cuda_graph=r.read_bool("use_cuda_graph", d["use_cuda_graph"]),
        use_hctr_cache_implementation=r.read_bool("use_hctr_cache_implementation", d["use_hctr_cache_implementation"]),
        init_ec=r.read_bool("init_ec", d["init_ec"]),
        enable_pagelock=r.read_bool("enable_pagelock", d["enable_pagelock"]),
    )
    r.finish()
    return cfg


def parse_config(data: Any, source: str, *, base_dir: str | Path | None = None
                 ) -> ParameterServerConfig:
    """Validate a decoded HPS JSON document.

    ``source`` names the document in error messages (normally its path). Relative paths
    (``sparse_files``, ``persistent_db.path``, ...) resolve against ``base_dir``, by default
    the folder of ``source``.
    """
    base = Path(base_dir) if base_dir is not None else Path(source).parent
    base = base.absolute()
    r = _Reader(data, "", source)
    d = _field_defaults(ParameterServerConfig)
    supportlonglong = r.read_bool("supportlonglong", d["supportlonglong"])
    fuse = r.read_bool("fuse_embedding_table", d["fuse_embedding_table"])
    volatile = (_parse_volatile(r.obj["volatile_db"], source) if r.has("volatile_db")
                else VolatileDBConfig())
    persistent = (_parse_persistent(r.obj["persistent_db"], source, base)
                  if r.has("persistent_db") else PersistentDBConfig())
    update = (_parse_update_source(r.obj["update_source"], source)
              if r.has("update_source") else UpdateSourceConfig())
    r.seen.update({"volatile_db", "persistent_db", "update_source"})
    raw_models = r.read_list("models", lambda key, value: value, required=True, non_empty=True)
    models = tuple(_parse_model(m, i, source, base) for i, m in enumerate(raw_models))
    for i, model in enumerate(models):
        if model.model in (m.model for m in models[:i]):
            r.fail(f"models[{i}].model", f"duplicate model name {model.model!r}",
                   "give every model its own name")
    r.finish()
    return ParameterServerConfig(
        supportlonglong=supportlonglong,
        fuse_embedding_table=fuse,
        volatile_db=volatile,
        persistent_db=persistent,
        update_source=update,
        models=models,
        source=source,
    )


def load_config(path: str | os.PathLike[str]) -> ParameterServerConfig:
    """Read and validate the HPS JSON at ``path``."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found. Fix: pass the path of the HPS JSON "
                          "(the file given as ps=... to the HugeCTR HPS backend).") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the file ({exc}). Fix: check the path "
                          "and its permissions.") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: line {exc.lineno}, column {exc.colno}: not valid JSON "
                          f"({exc.msg}). Fix: correct the JSON syntax (comments and trailing "
                          "commas are not allowed).") from exc
    return parse_config(data, source, base_dir=Path(source).absolute().parent)
