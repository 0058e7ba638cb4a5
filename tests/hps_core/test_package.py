"""The library's public surface, and the layering rule: hps_core imports no Triton, no torch."""

from __future__ import annotations

import subprocess
import sys

import hps_core


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
