"""The library's public surface, the layering rule (hps_core imports no Triton, no torch), and what
importing a part of it costs: only what that part uses."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hps_core
from hps_core.cli import SUBCOMMANDS, build_parser
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


_COMPILERS_AND_CLIENTS = ("numba", "redis", "rocksdict", "confluent_kafka")


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["models", "--help"], ["-v", "models", "list", "--help"]])
def test_the_cli_imports_only_the_subcommand_it_runs(argv: list[str]) -> None:
    """`hps --help` and the subcommands that need no compiler or client load none (the CLI's
    help took half a second when every subcommand's module was imported to build the parser)."""
    code = f"""
import contextlib, sys
from hps_core.cli import main
with contextlib.redirect_stdout(None), contextlib.suppress(SystemExit):
    main({argv!r})
print(",".join(m for m in sys.modules if m.split(".")[0] in {_COMPILERS_AND_CLIENTS!r}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_subcommand_still_sets_up_its_parser(command: str) -> None:
    parser = build_parser([command])
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(io.StringIO()) as out:
        parser.parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: hps {command}" in out.getvalue() and "--" in out.getvalue()
