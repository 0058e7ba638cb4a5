"""Tests of hps_core.config: HugeCTR HPS JSON parsing, defaults and validation errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

import hps_core.config as config_module
from hps_core.config import (
    INACTIVE_FIELDS,
    PERSISTENT_TYPES,
    VOLATILE_TYPES,
    ModelConfig,
    OverflowConfig,
    ParameterServerConfig,
    PersistentDBConfig,
    TableConfig,
    TierType,
    TLSConfig,
    UpdateSourceConfig,
    VolatileDBConfig,
    gpu_cache_requested,
    load_config,
    parse_config,
)
from hps_core.errors import ConfigError, UnknownTableError
from hps_core.row_formats import RowFormat

# A HugeCTR-style HPS JSON, as in hugectr_backend's hps_backend/README.md: a CPU hash map in
# front of RocksDB, one Wide&Deep model with two tables of widths 1 and 16. Sparse files are
# relative, so they resolve against the JSON's folder.
SAMPLE_JSON = """
{
    "supportlonglong": true,
    "volatile_db": {
        "type": "hash_map",
        "user_name": "default",
        "num_partitions": 8,
        "max_get_batch_size": 100000,
        "max_set_batch_size": 100000,
        "overflow_policy": "evict_oldest",
        "overflow_margin": 10000000,
        "overflow_resolution_target": 0.8,
        "initial_cache_rate": 1.0
    },
    "persistent_db": {
        "type": "rocks_db",
        "path": "rocksdb",
        "num_threads": 8,
        "read_only": false,
        "max_batch_size": 65536,
        "update_filters": [".+"]
    },
    "models": [{
        "model": "hps_wdl",
        "sparse_files": ["hps_wdl/1/wdl0_sparse_2000.model", "/abs/wdl1_sparse_2000.model"],
        "num_of_worker_buffer_in_pool": 3,
        "embedding_table_names": ["embedding_table1", "embedding_table2"],
        "embedding_vecsize_per_table": [1, 16],
        "maxnum_catfeature_query_per_table_per_sample": [2, 26],
        "default_value_for_each_table": [0.0, 0.5],
        "deployed_device_list": [0],
        "max_batch_size": 1024,
        "hit_rate_threshold": 0.9,
        "gpucacheper": 0.5,
        "gpucache": true
    }]
}
"""

MINIMAL: dict[str, Any] = {
    "models": [{
        "model": "m",
        "sparse_files": ["/t0", "/t1"],
        "embedding_vecsize_per_table": [4, 8],
        "maxnum_catfeature_query_per_table_per_sample": [1, 3],
    }]
}

DELETE = object()


def _with(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep copy of ``base`` (MINIMAL) with the dotted ``path`` set to ``value``."""
    data = copy.deepcopy(MINIMAL if base is None else base)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    key: Any = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return data


def _parse(data: Any) -> ParameterServerConfig:
    return parse_config(data, "/cfg/hps.json")


@pytest.fixture
def sample_path(tmp_path: Path) -> Path:
    path = tmp_path / "model_repository" / "hps.json"
    path.parent.mkdir()
    path.write_text(SAMPLE_JSON)
    return path


# --------------------------------------------------------------------------------------------
# The sample config.
# --------------------------------------------------------------------------------------------
def test_sample_config_loads(sample_path: Path) -> None:
    cfg = load_config(sample_path)
    assert cfg.source == str(sample_path)
    assert cfg.supportlonglong is True
    assert cfg.volatile_db.type == "hash_map"
    assert cfg.volatile_db.num_partitions == 8
    assert cfg.volatile_db.overflow.policy == "evict_oldest"
    assert cfg.volatile_db.overflow.margin == 10_000_000
    assert cfg.persistent_db.type == "rocks_db"
    assert cfg.persistent_db.enabled and cfg.volatile_db.enabled
    assert cfg.persistent_db.update_filters == (".+",)
    assert cfg.update_source.type == "null" and not cfg.update_source.enabled
    model = cfg.model("hps_wdl")
    assert model.embedding_vecsize_per_table == (1, 16)
    assert model.max_batch_size == 1024
    assert model.gpucacheper == 0.5
    assert model.num_of_worker_buffer_in_pool == 3
    assert model.num_tables == 2


def test_sample_tables(sample_path: Path) -> None:
    tables = load_config(sample_path).model("hps_wdl").tables
    folder = sample_path.parent
    assert tables == (
        TableConfig(name="embedding_table1", dim=1, default_value=0.0, max_keys_per_sample=2,
                    sparse_file=str(folder / "hps_wdl/1/wdl0_sparse_2000.model"),
                    qualified_name="hps_et.hps_wdl.embedding_table1"),
        TableConfig(name="embedding_table2", dim=16, default_value=0.5, max_keys_per_sample=26,
                    sparse_file="/abs/wdl1_sparse_2000.model",
                    qualified_name="hps_et.hps_wdl.embedding_table2"),
    )


def test_relative_paths_resolve_against_json_folder(sample_path: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # somewhere else than the JSON's folder
    cfg = load_config(Path("model_repository") / "hps.json")
    folder = str(sample_path.parent)
    assert cfg.models[0].sparse_files[0] == os.path.join(folder, "hps_wdl/1/wdl0_sparse_2000.model")
    assert os.path.isabs(cfg.models[0].sparse_files[0])
    assert cfg.persistent_db.path == os.path.join(folder, "rocksdb")


def test_parse_config_base_dir_override() -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["sparse_files"] = ["a/../b", "/t1"]
    cfg = parse_config(data, "<memory>", base_dir="/srv/models")
    assert cfg.models[0].sparse_files == ("/srv/models/b", "/t1")


def test_legacy_get_set_batch_sizes_fold_into_max_batch_size(sample_path: Path) -> None:
    vdb = load_config(sample_path).volatile_db
    assert vdb.max_get_batch_size == 100_000 and vdb.max_set_batch_size == 100_000
    assert vdb.max_batch_size == 100_000
    explicit = _parse(_with("volatile_db", {"type": "hash_map", "max_batch_size": 7,
                                            "max_get_batch_size": 100}))
    assert explicit.volatile_db.max_batch_size == 7
    assert explicit.volatile_db.get_batch_size == 100
    assert explicit.volatile_db.max_set_batch_size is None
    assert explicit.volatile_db.set_batch_size == 7


def test_absent_get_set_batch_sizes_are_max_batch_size() -> None:
    # None (absent) means max_batch_size, resolved by get_/set_batch_size, the sizes tiers chunk by.
    cfg = _parse(_with("persistent_db", {"type": "rocks_db", "max_batch_size": 1000}))
    assert (cfg.persistent_db.max_get_batch_size, cfg.persistent_db.max_set_batch_size) == (None, None)
    assert (cfg.persistent_db.get_batch_size, cfg.persistent_db.set_batch_size) == (1000, 1000)
    direct = VolatileDBConfig(max_batch_size=500, max_set_batch_size=20)
    assert (direct.get_batch_size, direct.set_batch_size) == (500, 20)
    assert VolatileDBConfig().get_batch_size == 65536


def test_zero_get_set_batch_size_is_kept_not_replaced() -> None:
    # 0 is not "absent": it stays 0, for the tier to refuse (see the tiers' bad-settings tests).
    direct = PersistentDBConfig(max_batch_size=500, max_get_batch_size=0)
    assert (direct.max_get_batch_size, direct.get_batch_size) == (0, 0)
    with pytest.raises(ConfigError, match="max_set_batch_size"):
        _parse(_with("volatile_db", {"type": "hash_map", "max_set_batch_size": 0}))


# --------------------------------------------------------------------------------------------
# Defaults (HugeCTR's).
# --------------------------------------------------------------------------------------------
def test_defaults_when_sections_absent() -> None:
    cfg = _parse(MINIMAL)
    assert cfg.supportlonglong is True
    assert cfg.fuse_embedding_table is False
    vdb = cfg.volatile_db
    assert vdb == VolatileDBConfig()
    assert vdb.type == "parallel_hash_map"  # HugeCTR's struct default
    assert vdb.redis.address == "127.0.0.1:7000" and vdb.redis.user_name == "default"
    assert vdb.redis.password == ""
    assert vdb.num_partitions == min(16, os.cpu_count() or 1)
    assert vdb.allocation_rate == 256 * 1024 * 1024
    assert vdb.redis.num_node_connections == 5
    assert vdb.max_batch_size == 65536
    assert vdb.overflow.margin == 2**64 - 1 and not vdb.overflow.limited
    assert vdb.overflow.policy == "evict_random"
    assert vdb.overflow.resolution_target == 0.8
    assert vdb.initial_cache_rate == 1.0
    assert vdb.cache_missed_embeddings is False
    assert vdb.update_filters == ("^hps_.+$",)
    assert vdb.redis.tls.enabled is False
    assert vdb.redis.tls.server_name_identification == "redis.localhost"
    pdb = cfg.persistent_db
    assert pdb.type == "disabled" and not pdb.enabled
    assert pdb.path == os.path.join(tempfile.gettempdir(), "rocksdb")
    assert pdb.num_threads == 16 and pdb.read_only is False and pdb.max_batch_size == 65536
    src = cfg.update_source
    assert src == UpdateSourceConfig()
    assert (src.type, src.brokers, src.poll_timeout_ms, src.max_batch_size) == (
        "null", "127.0.0.1:9092", 500, 8192)
    assert (src.receive_buffer_size, src.failure_backoff_ms, src.max_commit_interval) == (
        262144, 50, 32)
    assert src.metadata_refresh_interval_ms == 30_000


def test_model_defaults() -> None:
    model = _parse(MINIMAL).models[0]
    assert model.embedding_table_names == ("sparse_embedding0", "sparse_embedding1")
    assert model.default_value_for_each_table == (0.0, 0.0)
    assert model.deployed_device_list == (0,)
    assert model.max_batch_size == 64
    assert model.gpucache is True and model.gpucacheper == 0.2
    assert model.hit_rate_threshold == 0.9
    assert model.embedding_cache_type == "dynamic"
    assert model.cache_refresh_percentage_per_iteration == 0.0
    assert model.refresh_delay == 0.0 and model.refresh_interval == 0.0
    assert model.maxnum_des_feature_per_sample == 26
    assert model.num_of_worker_buffer_in_pool == 1
    assert model.label_dim == 1 and model.slot_num == 10
    assert model.dense_file == "" and model.network_file == ""
    assert model.fp8_quant is False
    assert model.embedding_format_per_table == (RowFormat.FP32, RowFormat.FP32)
    assert [t.row_format for t in model.tables] == [RowFormat.FP32, RowFormat.FP32]


# --------------------------------------------------------------------------------------------
# Row formats: embedding_format_per_table and HugeCTR's fp8_quant.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "expected"), [
    ({"embedding_format_per_table": "int8"}, ("int8", "int8")),  # one name: every table
    ({"embedding_format_per_table": ["fp16", "fp8"]}, ("fp16", "fp8")),  # one per table
    ({"fp8_quant": True}, ("fp8", "fp8")),  # HugeCTR's switch: every table fp8
    ({"fp8_quant": True, "embedding_format_per_table": "fp8"}, ("fp8", "fp8")),  # they agree
    ({"fp8_quant": True, "embedding_format_per_table": ["fp8", "fp8"]}, ("fp8", "fp8")),
    ({"fp8_quant": False, "embedding_format_per_table": ["int8", "fp32"]}, ("int8", "fp32")),
])
def test_row_formats_per_table(fields: dict[str, Any], expected: tuple[str, ...]) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0].update(fields)
    model = _parse(data).models[0]
    assert model.embedding_format_per_table == tuple(RowFormat(f) for f in expected)
    assert tuple(t.row_format.value for t in model.tables) == expected
    assert [t.row_format.row_bytes(t.dim) for t in model.tables] == [
        RowFormat(f).row_bytes(d) for f, d in zip(expected, (4, 8))]


@pytest.mark.parametrize("formats", ["int8", ["fp8", "fp32"], ["fp16", "fp16"]])
def test_fp8_quant_and_a_disagreeing_format_list_name_both_fields(formats: Any) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0].update(fp8_quant=True, embedding_format_per_table=formats)
    with pytest.raises(ConfigError) as info:
        _parse(data)
    message = str(info.value)
    assert message.startswith("/cfg/hps.json: models[0].embedding_format_per_table: model 'm': "), message
    assert "fp8_quant is true" in message and json.dumps(formats) in message, message


def test_a_bad_row_format_names_the_file_the_model_and_the_field(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"].append(dict(copy.deepcopy(data["models"][0]), model="second",
                               embedding_format_per_table=["fp32", "bf16"]))
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: models[1].embedding_format_per_table[1]: model 'second': unknown row format "
        "\"bf16\". Fix: use one of 'fp32', 'fp16', 'fp8', 'int8'.")


def test_volatile_section_without_type_is_disabled() -> None:
    # HugeCTR quirk kept: present section, no "type" -> disabled.
    cfg = _parse(_with("volatile_db", {"num_partitions": 2}))
    assert cfg.volatile_db.type == "disabled" and not cfg.volatile_db.enabled


def test_single_default_value_is_broadcast() -> None:
    model = _parse(_with("models.0.default_value_for_each_table", [0.25])).models[0]
    assert model.default_value_for_each_table == (0.25, 0.25)


def test_integers_accepted_where_floats_expected() -> None:
    model = _parse(_with("models.0.gpucacheper", 1)).models[0]
    assert model.gpucacheper == 1.0 and isinstance(model.gpucacheper, float)


def test_hit_rate_threshold_above_one_means_always_synchronous() -> None:
    # HugeCTR documents hit_rate_threshold > 1 as the way to disable asynchronous insertion.
    assert _parse(_with("models.0.hit_rate_threshold", 1.5)).models[0].hit_rate_threshold == 1.5


@pytest.mark.parametrize(("section", "key", "alias", "canonical"), [
    ("volatile_db", "type", "hashmap", "hash_map"),
    ("volatile_db", "type", "parallel_hash", "parallel_hash_map"),
    ("volatile_db", "type", "redis", "redis_cluster"),
    ("volatile_db", "type", "none", "disabled"),
    ("volatile_db", "overflow_policy", "random", "evict_random"),
    ("volatile_db", "overflow_policy", "least_used", "evict_least_used"),
    ("volatile_db", "overflow_policy", "oldest", "evict_oldest"),
    ("persistent_db", "type", "rocksdb", "rocks_db"),
    ("persistent_db", "type", "disable", "disabled"),
    ("update_source", "type", "kafka", "kafka_message_queue"),
    ("update_source", "type", "kafka_mq", "kafka_message_queue"),
    ("update_source", "type", "none", "null"),
])
def test_hugectr_enum_aliases(section: str, key: str, alias: str, canonical: str) -> None:
    cfg = _parse(_with(f"{section}.{key}", alias))
    value: object = getattr(cfg, section)
    for attr in _ATTRIBUTE_OF_FIELD.get(key, key).split("."):
        value = getattr(value, attr)
    assert value == canonical


# HugeCTR's flat JSON fields that live in a nested section of the dataclass.
_ATTRIBUTE_OF_FIELD = {"overflow_policy": "overflow.policy"}


def test_tier_types_are_one_enum() -> None:
    # The roles' accepted types are members of TierType; together they are all its members.
    assert set(VOLATILE_TYPES) | set(PERSISTENT_TYPES) == set(TierType)
    for section, kinds in (("volatile_db", VOLATILE_TYPES), ("persistent_db", PERSISTENT_TYPES)):
        for kind in kinds:
            parsed = getattr(_parse(_with(f"{section}.type", kind.value)), section).type
            assert parsed is kind and isinstance(parsed, TierType)
    assert VolatileDBConfig().type is TierType.PARALLEL_HASH_MAP
    assert PersistentDBConfig().type is TierType.DISABLED


def test_nested_sections_read_hugectr_flat_fields() -> None:
    cfg = _parse(_with("volatile_db", {
        "type": "redis_cluster", "overflow_margin": 5, "overflow_policy": "oldest",
        "overflow_resolution_target": 0.5, "enable_tls": True, "tls_client_key": "/k.pem",
        "num_node_connections": 3,
    }))
    vdb = cfg.volatile_db
    assert vdb.overflow == OverflowConfig(margin=5, policy="evict_oldest", resolution_target=0.5)
    assert vdb.overflow.limited
    assert vdb.redis.tls == TLSConfig(enabled=True, client_key="/k.pem")
    assert vdb.redis.num_node_connections == 3


def test_use_static_table_forces_static_cache() -> None:
    model = _parse(_with("models.0.use_static_table", True)).models[0]
    assert model.embedding_cache_type == "static"


def test_kafka_update_source() -> None:
    cfg = _parse(_with("update_source", {"type": "kafka_message_queue",
                                          "brokers": "k1:9092;k2:9092", "poll_timeout_ms": 10}))
    assert cfg.update_source.enabled
    assert cfg.update_source.brokers == "k1:9092;k2:9092"
    assert cfg.update_source.poll_timeout_ms == 10


def test_redis_fields() -> None:
    cfg = _parse(_with("volatile_db", {
        "type": "redis_cluster", "address": "r1:7000,r2:7000", "user_name": "u",
        "password": "secret", "num_partitions": 24, "num_node_connections": 2,
        "max_batch_size": 1000, "enable_tls": True, "tls_ca_certificate": "/ca.crt",
        "cache_missed_embeddings": True, "update_filters": ["^hps_et\\.m\\..*$"],
    }))
    vdb = cfg.volatile_db
    assert (vdb.type, vdb.redis.address, vdb.redis.user_name, vdb.redis.password) == (
        "redis_cluster", "r1:7000,r2:7000", "u", "secret")
    assert vdb.redis.tls.enabled and vdb.redis.tls.ca_certificate == "/ca.crt"
    assert vdb.cache_missed_embeddings is True
    assert "secret" not in repr(cfg)


def test_hugectr_documentation_model_example_loads() -> None:
    # The `models` example of HugeCTR's hps_database_backend.md, with every field it shows.
    model = {
        "model": "wdl",
        "sparse_files": ["/wdl_infer/model/wdl/1/wdl0_sparse_20000.model",
                         "/wdl_infer/model/wdl/1/wdl1_sparse_20000.model"],
        "dense_file": "/wdl_infer/model/wdl/1/wdl_dense_20000.model",
        "network_file": "/wdl_infer/model/wdl/1/wdl.json",
        "num_of_worker_buffer_in_pool": 4, "num_of_refresher_buffer_in_pool": 1,
        "deployed_device_list": [0], "max_batch_size": 64,
        "default_value_for_each_table": [0.0, 0.0], "maxnum_des_feature_per_sample": 26,
        "maxnum_catfeature_query_per_table_per_sample": [2, 26],
        "embedding_vecsize_per_table": [1, 15], "embedding_table_names": ["table1", "table2"],
        "refresh_delay": 0, "refresh_interval": 0, "hit_rate_threshold": 0.9,
        "gpucacheper": 0.1, "use_static_table": False, "gpucache": True,
        "cache_refresh_percentage_per_iteration": 0.2, "label_dim": 1, "slot_num": 10,
        "use_context_stream": False,
    }
    cfg = _parse({"supportlonglong": True, "fuse_embedding_table": False, "models": [model]})
    assert cfg.model("wdl").embedding_vecsize_per_table == (1, 15)
    assert cfg.model("wdl").dense_file == "/wdl_infer/model/wdl/1/wdl_dense_20000.model"


def test_documentation_database_examples_load() -> None:
    # volatile_db / persistent_db / update_source examples of hps_database_backend.md.
    cfg = _parse(MINIMAL | {
        "volatile_db": {
            "type": "redis_cluster", "address": "127.0.0.1:7003,127.0.0.1:7004,127.0.0.1:7005",
            "user_name": "default", "password": "", "num_partitions": 8,
            "allocation_rate": 268435456, "shared_memory_size": 17179869184,
            "shared_memory_name": "hctr_mp_hash_map_database", "shared_memory_auto_remove": True,
            "max_batch_size": 65536, "enable_tls": False,
            "tls_ca_certificate": "cacertbundle.crt", "tls_client_certificate": "client_cert.pem",
            "tls_client_key": "client_key.pem", "tls_server_name_identification": "redis.localhost",
            "overflow_margin": 10000000, "overflow_policy": "evict_random",
            "overflow_resolution_target": 0.8, "initialize_after_startup": True,
            "initial_cache_rate": 1.0, "cache_missed_embeddings": False, "update_filters": [".+"],
        },
        "persistent_db": {"type": "rocks_db", "path": "/tmp/rocksdb", "num_threads": 16,
                          "read_only": False, "max_batch_size": 65536, "update_filters": [".+"]},
        "update_source": {"type": "kafka_message_queue", "brokers": "127.0.0.1:9092",
                          "metadata_refresh_interval_ms": 30000, "poll_timeout_ms": 500,
                          "receive_buffer_size": 262144, "max_batch_size": 8192,
                          "failure_backoff_ms": 50, "max_commit_interval": 32},
    })
    assert cfg.volatile_db.overflow.margin == 10_000_000
    assert cfg.persistent_db.path == "/tmp/rocksdb"
    assert cfg.update_source.enabled


def test_host_store_fields() -> None:
    # HugeCTR's multi_process_hash_map fields drive the host store; a hash map is host-shared
    # unless host_shared says otherwise, and multi_process_hash_map cannot be made private.
    default = _parse(MINIMAL | {"volatile_db": {"type": "hash_map"}}).volatile_db
    assert default.host_shared and default.shared_memory_name == "" and default.shared_memory_auto_remove
    cfg = _parse(MINIMAL | {"volatile_db": {
        "type": "multi_process_hash_map", "shared_memory_name": "hctr_mp_hash_map_database",
        "shared_memory_size": 1 << 30, "shared_memory_auto_remove": False}}).volatile_db
    assert cfg.type == "parallel_hash_map" and cfg.host_shared
    assert (cfg.shared_memory_name, cfg.shared_memory_size, cfg.shared_memory_auto_remove) == (
        "hctr_mp_hash_map_database", 1 << 30, False)
    assert not _parse(MINIMAL | {"volatile_db": {"type": "parallel_hash_map", "host_shared": False}}
                      ).volatile_db.host_shared
    with pytest.raises(ConfigError, match="volatile_db.host_shared.*parallel_hash_map"):
        _parse(MINIMAL | {"volatile_db": {"type": "multi_process_hash_map", "host_shared": False}})


def test_every_inactive_field_is_accepted() -> None:
    values = {"fuse_embedding_table": True, "allocation_rate": 1,
              "refresh_time_after_fetch": True, "algorithm": "stl",
              "max_receive_buffer_size": 2000, "dense_file": "d", "network_file": "n.json",
              "non_trainable_params_file": "p", "num_of_worker_buffer_in_pool": 2,
              "num_of_refresher_buffer_in_pool": 2, "thread_pool_size": 4,
              "maxnum_des_feature_per_sample": 13, "label_dim": 2, "slot_num": 26,
              "use_context_stream": False, "use_mixed_precision": True, "scaler": 1024.0,
              "use_algorithm_search": False, "use_cuda_graph": False,
              "use_hctr_cache_implementation": False, "init_ec": False,
              "enable_pagelock": True}
    data = copy.deepcopy(MINIMAL)
    section_of = {"": data, "volatile_db": data.setdefault("volatile_db", {"type": "hash_map"}),
                  "persistent_db": data.setdefault("persistent_db", {}),
                  "update_source": data.setdefault("update_source", {}),
                  "models[]": data["models"][0]}
    for section, names in INACTIVE_FIELDS.items():
        for name in names:
            section_of[section][name] = values[name]
    cfg = _parse(data)
    assert cfg.fuse_embedding_table is True
    assert cfg.models[0].network_file == "/cfg/n.json"
    assert cfg.volatile_db.algorithm == "stl"


# --------------------------------------------------------------------------------------------
# Errors: every one names the file, the field path and a fix.
# --------------------------------------------------------------------------------------------
ERROR_CASES = [
    # (dotted path, value, field path in the message, words in the message)
    ("models", DELETE, "models", "required"),
    ("models", [], "models", "must not be empty"),
    ("models", {}, "models", "list"),
    ("models.0.model", DELETE, "models[0].model", "required"),
    ("models.0.model", "", "models[0].model", "must not be empty"),
    ("models.0.sparse_files", DELETE, "models[0].sparse_files", "required"),
    ("models.0.sparse_files", [], "models[0].sparse_files", "must not be empty"),
    ("models.0.sparse_files", "/t0", "models[0].sparse_files", "list"),
    ("models.0.sparse_files", ["/t0", 3], "models[0].sparse_files[1]", "string"),
    ("models.0.sparse_files", ["hdfs://nn:9000/t0", "/t1"], "models[0].sparse_files[0]",
     "remote"),
    ("models.0.embedding_vecsize_per_table", DELETE, "models[0].embedding_vecsize_per_table",
     "required"),
    ("models.0.embedding_vecsize_per_table", [4, 8, 16], "models[0].embedding_vecsize_per_table",
     "has 3 entries but sparse_files has 2"),
    ("models.0.embedding_vecsize_per_table", [4, 0], "models[0].embedding_vecsize_per_table[1]",
     ">= 1"),
    ("models.0.embedding_vecsize_per_table", [4, 8.0],
     "models[0].embedding_vecsize_per_table[1]", "integer"),
    ("models.0.maxnum_catfeature_query_per_table_per_sample", DELETE,
     "models[0].maxnum_catfeature_query_per_table_per_sample", "required"),
    ("models.0.maxnum_catfeature_query_per_table_per_sample", [1],
     "models[0].maxnum_catfeature_query_per_table_per_sample", "has 1 entries"),
    ("models.0.embedding_table_names", ["a"], "models[0].embedding_table_names", "has 1"),
    ("models.0.embedding_table_names", ["a", "a"], "models[0].embedding_table_names[1]",
     "duplicate"),
    ("models.0.embedding_table_names", ["a", ""], "models[0].embedding_table_names[1]",
     "non-empty"),
    ("models.0.default_value_for_each_table", [0.0, 0.0, 0.0],
     "models[0].default_value_for_each_table", "has 3 entries"),
    ("models.0.default_value_for_each_table", [0.0, "0"],
     "models[0].default_value_for_each_table[1]", "number"),
    ("models.0.deployed_device_list", [], "models[0].deployed_device_list", "empty"),
    ("models.0.deployed_device_list", [-1], "models[0].deployed_device_list[0]", ">= 0"),
    ("models.0.deployed_device_list", [0, 0], "models[0].deployed_device_list", "twice"),
    ("models.0.max_batch_size", 0, "models[0].max_batch_size", ">= 1"),
    ("models.0.max_batch_size", 64.0, "models[0].max_batch_size", "integer"),
    ("models.0.max_batch_size", "64", "models[0].max_batch_size", "integer"),
    ("models.0.gpucache", "true", "models[0].gpucache", "true or false"),
    ("models.0.gpucache", 1, "models[0].gpucache", "true or false"),
    ("models.0.gpucacheper", 1.5, "models[0].gpucacheper", "[0, 1]"),
    ("models.0.gpucacheper", -0.1, "models[0].gpucacheper", "[0, 1]"),
    ("models.0.gpucacheper", True, "models[0].gpucacheper", "number"),
    ("models.0.hit_rate_threshold", -0.5, "models[0].hit_rate_threshold", "must be in"),
    ("models.0.gpucacheper", float("nan"), "models[0].gpucacheper", "finite"),
    ("models.0.default_value_for_each_table", [float("inf")],
     "models[0].default_value_for_each_table[0]", "finite"),
    ("models.0.cache_refresh_percentage_per_iteration", 2,
     "models[0].cache_refresh_percentage_per_iteration", "[0, 1]"),
    ("models.0.refresh_interval", -1, "models[0].refresh_interval", "must be in"),
    ("models.0.embedding_cache_type", "lru", "models[0].embedding_cache_type", "unknown value"),
    ("models.0.fp8_quant", "true", "models[0].fp8_quant", "true or false"),
    ("models.0.embedding_format_per_table", "fp4", "models[0].embedding_format_per_table",
     "model 'm': unknown row format \"fp4\""),
    ("models.0.embedding_format_per_table", ["fp32"], "models[0].embedding_format_per_table",
     "model 'm': has 1 entries but sparse_files has 2"),
    ("models.0.embedding_format_per_table", ["fp32", "FP16"],
     "models[0].embedding_format_per_table[1]", "unknown row format"),
    ("models.0.embedding_format_per_table", ["fp32", 8], "models[0].embedding_format_per_table[1]",
     "unknown row format 8"),
    ("models.0.embedding_format_per_table", None, "models[0].embedding_format_per_table",
     "unknown row format null"),
    ("models.0.gpu_cache", True, "models[0].gpu_cache", "did you mean 'gpucache'"),
    ("models.0", "m", "models[0]", "JSON object"),
    ("supportlonglong", "yes", "supportlonglong", "true or false"),
    ("surprise", 1, "surprise", "not supported by this server"),
    ("volatile_db", [], "volatile_db", "JSON object"),
    ("volatile_db.shared_memory_name", "../etc", "volatile_db.shared_memory_name", "folder under /dev/shm"),
    ("volatile_db.type", "rocks_db", "volatile_db.type", "persistent_db"),
    ("volatile_db.type", "memcached", "volatile_db.type", "unknown value"),
    ("volatile_db.type", 1, "volatile_db.type", "string"),
    ("volatile_db.num_partitions", 0, "volatile_db.num_partitions", ">= 1"),
    ("volatile_db.max_batch_size", -1, "volatile_db.max_batch_size", ">= 1"),
    ("volatile_db.overflow_policy", "evict_newest", "volatile_db.overflow_policy",
     "unknown value"),
    ("volatile_db.overflow_resolution_target", 1.0, "volatile_db.overflow_resolution_target",
     "(0, 1)"),
    ("volatile_db.overflow_resolution_target", 0, "volatile_db.overflow_resolution_target",
     "(0, 1)"),
    ("volatile_db.initial_cache_rate", 1.5, "volatile_db.initial_cache_rate", "[0, 1]"),
    ("volatile_db.update_filters", ["("], "volatile_db.update_filters[0]", "regular expression"),
    ("volatile_db.update_filters", "^hps_.+$", "volatile_db.update_filters", "list"),
    ("volatile_db.address", "", "volatile_db.address", "empty"),
    ("volatile_db.password", None, "volatile_db.password", "string"),
    ("volatile_db.overflow_margin", 0, "volatile_db.overflow_margin", ">= 1"),
    ("persistent_db.type", "hash_map", "persistent_db.type", "volatile_db"),
    ("persistent_db.type", "leveldb", "persistent_db.type", "unknown value"),
    ("persistent_db.num_threads", 0, "persistent_db.num_threads", ">= 1"),
    ("persistent_db.read_only", "false", "persistent_db.read_only", "true or false"),
    ("persistent_db.path", "", "persistent_db.path", "empty"),
    ("persistent_db.pth", "/x", "persistent_db.pth", "did you mean 'path'"),
    ("update_source.type", "pulsar", "update_source.type", "unknown value"),
    ("update_source.poll_timeout_ms", -1, "update_source.poll_timeout_ms", ">= 0"),
    ("update_source.max_batch_size", 0, "update_source.max_batch_size", ">= 1"),
    ("update_source.brokers", "", "update_source.brokers", "empty"),
]


@pytest.mark.parametrize(("path", "value", "field_path", "words"), ERROR_CASES,
                         ids=[f"{c[0]}={c[1]!r}"[:60] for c in ERROR_CASES])
def test_error_names_file_field_and_fix(path: str, value: Any, field_path: str,
                                        words: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(_with(path, value))
    message = str(info.value)
    assert message.startswith(f"/cfg/hps.json: {field_path}: "), message
    assert words in message, message
    assert "Fix: " in message, message


def test_error_names_the_file_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(_with("models.0.gpucacheper", 3)))
    with pytest.raises(ConfigError, match=rf"^{path}: models\[0\]\.gpucacheper: "):
        load_config(path)


def test_duplicate_model_names_rejected() -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"].append(copy.deepcopy(data["models"][0]))
    with pytest.raises(ConfigError, match=r"models\[1\]\.model: duplicate model name 'm'"):
        _parse(data)


def test_top_level_must_be_object() -> None:
    with pytest.raises(ConfigError, match=r"^/cfg/hps.json: <top level>: expected a JSON object"):
        _parse([MINIMAL])


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.json")


def test_load_config_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "hps.json"
    path.write_text('{\n  "models": [],\n}\n')
    with pytest.raises(ConfigError, match=r"line 3, column 1: not valid JSON"):
        load_config(path)


# --------------------------------------------------------------------------------------------
# Lookups and helpers.
# --------------------------------------------------------------------------------------------
def test_model_lookup_unknown_raises_unknown_table_error() -> None:
    cfg = _parse(MINIMAL)
    assert cfg.model("m") is cfg.models[0]
    assert cfg.model_names == ("m",)
    with pytest.raises(UnknownTableError, match=r"model 'dlrm' is not configured.*\['m'\]"):
        cfg.model("dlrm")


def test_model_table_lookup() -> None:
    model = _parse(MINIMAL).models[0]
    assert model.table("sparse_embedding1").dim == 8
    assert model.table("hps_et.m.sparse_embedding0").dim == 4
    with pytest.raises(UnknownTableError, match="no table 'x'"):
        model.table("x")


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, True),
    ({"gpucache": False}, False),
    ({"gpucacheper": 0.0}, False),
    ({"gpucacheper": 0.0, "embedding_cache_type": "static"}, True),
    ({"gpucache": False, "use_static_table": True}, False),
])
def test_gpu_cache_requested(fields: dict[str, Any], expected: bool) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0].update(fields)
    assert gpu_cache_requested(_parse(data).models[0]) is expected


def test_config_objects_are_frozen_and_keyword_only() -> None:
    cfg = _parse(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.models[0].gpucacheper = 0.9  # type: ignore[misc]
    with pytest.raises(TypeError):
        VolatileDBConfig("hash_map")  # type: ignore[misc]
    for cls in (ParameterServerConfig, VolatileDBConfig, PersistentDBConfig,
                UpdateSourceConfig, ModelConfig, TableConfig):
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_exported_names() -> None:
    assert set(config_module.__all__) == {
        "INACTIVE_FIELDS", "ModelConfig", "ParameterServerConfig", "PersistentDBConfig",
        "TableConfig", "UpdateSourceConfig", "VolatileDBConfig", "gpu_cache_requested",
        "NO_OVERFLOW_LIMIT", "OVERFLOW_POLICIES", "OverflowConfig", "RedisConfig", "TLSConfig",
        "TierType", "VOLATILE_TYPES", "PERSISTENT_TYPES",
        "load_config", "parse_config", "version_model_name", "entry_version", "version_entry_name",
        "CacheKind", "CachePolicy",
    }
    for name in config_module.__all__:
        assert hasattr(config_module, name)


def test_entry_version_reads_back_the_versioned_entry_name() -> None:
    from hps_core.config import entry_version
    assert [entry_version(e) for e in ("hps_embedding", "hps_embedding_v2", "m_v12", "m_vx", "_v3")] == [1, 2, 12, 1, 1]
