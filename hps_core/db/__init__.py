"""Storage tiers behind one batched contract (:class:`EmbeddingTier`).

Roles: :class:`VolatileDB` (in memory: :class:`HashMapVolatileDB`, :class:`RedisClusterVolatileDB`,
:class:`RedisVolatileDB`)
and :class:`PersistentDB` (on disk: :class:`RocksDBPersistentDB`). The factories pick the
implementation from the HPS JSON's ``volatile_db.type`` / ``persistent_db.type``.
"""

from __future__ import annotations

from typing import Any

from hps_core.db.base import EmbeddingTier, PersistentDB, VolatileDB
from hps_core.db.hash_map import HashMapVolatileDB
from hps_core.db.redis_cluster import RedisClusterVolatileDB, RedisVolatileDB, open_redis_db
from hps_core.db.rocksdb import RocksDBPersistentDB
from hps_core.errors import ConfigError

__all__ = [
    "EmbeddingTier",
    "HashMapVolatileDB",
    "PersistentDB",
    "RedisClusterVolatileDB",
    "RedisVolatileDB",
    "RocksDBPersistentDB",
    "VolatileDB",
    "open_persistent_db",
    "open_volatile_db",
]

_VOLATILE_TYPES = ("hash_map", "parallel_hash_map", "redis_cluster", "disabled")
_PERSISTENT_TYPES = ("rocks_db", "disabled")


def open_volatile_db(cfg: Any) -> VolatileDB | None:
    """The volatile tier ``cfg.type`` names (a VolatileDBConfig), or None when disabled.

    ``hash_map`` and ``parallel_hash_map`` are one implementation here: HugeCTR's
    distinction (one partition vs. several) is ``num_partitions``.
    """
    kind = getattr(cfg, "type", None)
    if kind in ("hash_map", "parallel_hash_map"):
        return HashMapVolatileDB.from_config(cfg)
    if kind == "disabled":
        return None
    if kind == "redis_cluster":
        # several addresses or a cluster node → RedisClusterVolatileDB; one server not in
        # cluster mode → RedisVolatileDB (see hps_core/db/redis_cluster.py, open_redis_db)
        return open_redis_db(cfg)
    raise ConfigError(f"volatile_db.type must be one of {', '.join(_VOLATILE_TYPES)}; got {kind!r}")


def open_persistent_db(cfg: Any) -> PersistentDB | None:
    """The persistent tier ``cfg.type`` names (a PersistentDBConfig), or None when disabled."""
    kind = getattr(cfg, "type", None)
    if kind == "rocks_db":
        return RocksDBPersistentDB.from_config(cfg)
    if kind == "disabled":
        return None
    raise ConfigError(
        f"persistent_db.type must be one of {', '.join(_PERSISTENT_TYPES)}; got {kind!r}"
    )
