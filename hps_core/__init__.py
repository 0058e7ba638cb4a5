"""Hierarchical Parameter Server (HPS): a Python successor to HugeCTR's HPS.

The library has no Triton import: ``backend/hps`` adapts it to Triton's Python-based
backend API, and :mod:`hps_core.serving` launches a real Triton Inference Server binary.
In-process use::

    from hps_core import HierarchicalParameterServer, load_config

    with HierarchicalParameterServer(load_config("hps.json")) as server:
        vectors = server.session("my_model").lookup(keys, numkeys)
"""

from hps_core.config import ParameterServerConfig, load_config
from hps_core.errors import ConfigError, FormatError, HPSError, RequestError, TierError, UnknownTableError
from hps_core.lookup import LookupSession
from hps_core.server import HierarchicalParameterServer

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
