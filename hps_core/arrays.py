"""Host/device array helpers shared by the lookup path.

The lookup runs on numpy arrays (CPU path, CPU twin caches) or cupy arrays (GPU caches); it
asks a cache for its array module and moves only what must cross (the missing keys down,
their rows up) between host and device.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["array_module", "to_host"]


def array_module(cache: Any) -> ModuleType:
    """The array module a cache works in: numpy for no cache or a CPU cache, cupy for a GPU one."""
    if cache is None or cache.device == "cpu":
        return np
    import cupy  # only reached with a GPU cache, which needed cupy to exist

    return cupy  # type: ignore[no-any-return]


def to_host(array: Any) -> np.ndarray:
    """``array`` as a host numpy array (a copy only when it lives on a GPU)."""
    if isinstance(array, np.ndarray):
        return array
    get = getattr(array, "get", None)  # cupy.ndarray.get() copies device → host
    return get() if callable(get) else np.asarray(array)
