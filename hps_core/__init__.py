"""Hierarchical Parameter Server (HPS): a Python successor to HugeCTR's HPS.

The library has no Triton import: ``backend/hps`` adapts it to Triton's Python-based
backend API, and :mod:`hps_core.serving` launches a real Triton Inference Server binary.
In-process use::

    from hps_core import HierarchicalParameterServer, load_config

    with HierarchicalParameterServer(load_config("hps.json")) as server:
        vectors = server.session("my_model").lookup(keys, numkeys)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers; at run time they load on first use
    from hps_core.config import ParameterServerConfig, load_config
    from hps_core.errors import ConfigError, FormatError, HPSError, RequestError, TierError, UnknownTableError
    from hps_core.lookup import LookupSession
    from hps_core.server import HierarchicalParameterServer

# Where each public name lives. Loaded on first use (PEP 562), so that importing one small
# module (hps_core.errors, the CLI's parser) does not import numba, redis, rocksdict and Kafka.
_EXPORTS = {
    "ParameterServerConfig": "hps_core.config",
    "load_config": "hps_core.config",
    "ConfigError": "hps_core.errors",
    "FormatError": "hps_core.errors",
    "HPSError": "hps_core.errors",
    "RequestError": "hps_core.errors",
    "TierError": "hps_core.errors",
    "UnknownTableError": "hps_core.errors",
    "LookupSession": "hps_core.lookup",
    "HierarchicalParameterServer": "hps_core.server",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hps_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once
    return value


__version__ = "0.1.0"

__all__ = [
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
