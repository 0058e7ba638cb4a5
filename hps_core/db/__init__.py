"""Storage tiers behind one batched contract (:class:`EmbeddingTier`).

Roles: :class:`VolatileDB` (in memory: :class:`SharedHashMapVolatileDB` in host shared memory,
:class:`HashMapVolatileDB` private to a process, :class:`RedisClusterVolatileDB`,
:class:`RedisVolatileDB`)
and :class:`PersistentDB` (on disk: :class:`RocksDBPersistentDB`). The factories pick the
implementation from the HPS JSON's ``volatile_db.type`` / ``persistent_db.type``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hps_core.config import (
    PERSISTENT_TYPES,
    VOLATILE_TYPES,
    PersistentDBConfig,
    TierType,
    VolatileDBConfig,
)
from hps_core.db.base import EmbeddingTier, PersistentDB, VolatileDB
from hps_core.errors import ConfigError

if TYPE_CHECKING:
    from hps_core.db.hash_map import HashMapVolatileDB
    from hps_core.db.redis_cluster import RedisClusterVolatileDB, RedisVolatileDB
    from hps_core.db.rocksdb import RocksDBPersistentDB
    from hps_core.db.shared_hash_map import SharedHashMapVolatileDB

__all__ = [
    "EmbeddingTier",
    "HashMapVolatileDB",
    "PersistentDB",
    "RedisClusterVolatileDB",
    "RedisVolatileDB",
    "RocksDBPersistentDB",
    "SharedHashMapVolatileDB",
    "VolatileDB",
    "open_persistent_db",
    "open_volatile_db",
]

# Each implementation is imported when first named or opened, never by `import hps_core.db`:
# redis, rocksdict and their modules cost a serving process about 16 MiB of its own memory
# (every Triton stub pays it) and a third of a second, for a tier its config may not use.
_IMPLEMENTATIONS = {
    "HashMapVolatileDB": "hps_core.db.hash_map",
    "SharedHashMapVolatileDB": "hps_core.db.shared_hash_map",
    "RedisClusterVolatileDB": "hps_core.db.redis_cluster",
    "RedisVolatileDB": "hps_core.db.redis_cluster",
    "RocksDBPersistentDB": "hps_core.db.rocksdb",
}


def __getattr__(name: str) -> Any:
    if name in _IMPLEMENTATIONS:
        return getattr(importlib.import_module(_IMPLEMENTATIONS[name]), name)
    raise AttributeError(f"module 'hps_core.db' has no attribute {name!r}")


def open_volatile_db(cfg: VolatileDBConfig, source: str = "") -> VolatileDB | None:
    """The volatile tier ``cfg.type`` names, or None when disabled.

    ``hash_map`` and ``parallel_hash_map`` are one implementation here: HugeCTR's
    distinction (one partition vs. several) is ``num_partitions``. Its rows live in host shared
    memory (one copy per host, in the namespace ``source``, the HPS JSON's path, names) unless
    ``host_shared`` is false.
    """
    match cfg.type:
        case TierType.HASH_MAP | TierType.PARALLEL_HASH_MAP:
            if cfg.host_shared:
                from hps_core.db.shared_hash_map import SharedHashMapVolatileDB

                return SharedHashMapVolatileDB(cfg, source=source)
            from hps_core.db.hash_map import HashMapVolatileDB

            return HashMapVolatileDB(cfg)
        case TierType.REDIS_CLUSTER:
            # several addresses or a cluster node → RedisClusterVolatileDB; one server not in
            # cluster mode → RedisVolatileDB (see hps_core/db/redis_cluster.py, open_redis_db)
            from hps_core.db.redis_cluster import open_redis_db

            return open_redis_db(cfg)
        case TierType.DISABLED:
            return None
    raise ConfigError(f"volatile_db.type must be one of {', '.join(VOLATILE_TYPES)}; got {cfg.type!r}")


def open_persistent_db(cfg: PersistentDBConfig, *, secondary_path: str | Path | None = None
                       ) -> PersistentDB | None:
    """The persistent tier ``cfg.type`` names, or None when disabled.

    ``secondary_path``: open RocksDB as a secondary instance keeping its state there (a
    serving process beside a writer; see :class:`RocksDBPersistentDB`).
    """
    match cfg.type:
        case TierType.ROCKS_DB:
            from hps_core.db.rocksdb import RocksDBPersistentDB

            return RocksDBPersistentDB(cfg, secondary_path=secondary_path)
        case TierType.DISABLED:
            return None
    raise ConfigError(
        f"persistent_db.type must be one of {', '.join(PERSISTENT_TYPES)}; got {cfg.type!r}"
    )
