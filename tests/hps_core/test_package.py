"""The library's public surface, and the layering rule: hps_core imports no Triton, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import hps_core
from hps_core.formats import write_sparse_model


def test_exported_names() -> None:
    assert sorted(hps_core.__all__) == [
        "ConfigError",
        "FormatError",
        "HPSError",
        "HierarchicalParameterServer",
        "LookupSession",
        "ParameterServerConfig",
        "RequestError",
        "TierError",
        "UnknownTableError",
        "__version__",
        "load_config",
    ]
    for name in hps_core.__all__:
        assert hasattr(hps_core, name)


def test_hps_core_imports_no_triton_and_no_torch() -> None:
    code = """
import pkgutil, importlib, sys
import hps_core
for info in pkgutil.walk_packages(hps_core.__path__, "hps_core."):
    importlib.import_module(info.name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("triton_python_backend_utils", "tritonclient", "torch", "backend", "hps_demo"))
print(",".join(bad))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_a_server_without_redis_rocksdb_or_kafka_imports_none_of_their_clients(tmp_path: Path) -> None:
    """Every Triton stub pays for what the serving path imports, in memory of its own (about
    16 MiB for redis and rocksdict): a hash-map server that follows no update stream builds
    and answers without importing those clients or the modules that wrap them."""
    keys = np.arange(10, dtype=np.int64)
    write_sparse_model(tmp_path / "t0.model", keys, np.ones((10, 4), np.float32))
    (tmp_path / "hps.json").write_text(json.dumps({
        "volatile_db": {"type": "hash_map", "host_shared": False},
        "models": [{"model": "m", "sparse_files": ["t0.model"], "embedding_table_names": ["t0"],
                    "embedding_vecsize_per_table": [4], "maxnum_catfeature_query_per_table_per_sample": [1]}],
    }))
    code = f"""
import sys
import numpy as np
from hps_core.config import load_config
from hps_core.server import HierarchicalParameterServer
with HierarchicalParameterServer(load_config({str(tmp_path / "hps.json")!r})) as server:
    rows = server.session("m").lookup(np.arange(3, dtype=np.int64), np.array([3], np.int32))
assert np.all(rows == 1), rows
heavy = ("redis", "rocksdict", "confluent_kafka", "hps_core.online", "hps_core.updates", "hps_core.db.redis_cluster",
         "hps_core.db.rocksdb")
print(",".join(m for m in heavy if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
