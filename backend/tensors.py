"""Tensor I/O shared by our Python-based Triton backends.

Kept free of ``triton_python_backend_utils`` so it can be unit-tested anywhere; the model files
pass their ``pb_utils`` module in.

Why not just ``tensor.as_numpy()``: under numpy 2 the python backend stub 2.51 returns wrong
values from ``as_numpy`` and builds zero-byte output tensors from ndarrays (PLATFORM.md).
DLPack reads and writes correctly under both numpy 1 and 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from hps_core.repository import original_folder, served_file

__all__ = [
    "model_config",
    "model_dir",
    "numpy_from_tensor",
    "numpy_to_tensor",
    "resolve_model_path",
    "served_path",
    "string_parameter",
    "triton_error",
]

_NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


def numpy_from_tensor(tensor: Any) -> npt.NDArray[Any]:
    """A host ndarray with the contents of a ``pb_utils.Tensor``.

    A tensor in GPU memory (an ensemble step on the GPU sent it) is copied to the host
    through CuPy; request inputs from HTTP/gRPC clients arrive in CPU memory.
    """
    if not tensor.is_cpu():
        import cupy  # only on a GPU instance

        # CuPy and pb_utils are untyped (Any): name what they hand back
        copied: npt.NDArray[Any] = cupy.asnumpy(cupy.from_dlpack(tensor.to_dlpack()))
        return copied
    if _NUMPY_2:
        return np.from_dlpack(tensor)
    host: npt.NDArray[Any] = tensor.as_numpy()
    return host


def numpy_to_tensor(pb_utils: Any, name: str, array: Any) -> Any:
    """A ``pb_utils.Tensor`` named ``name`` holding ``array``: a host ndarray, or a device
    array (CuPy), which is handed over through DLPack and stays on its GPU."""
    if hasattr(array, "__cuda_array_interface__"):
        return pb_utils.Tensor.from_dlpack(name, array)
    array = np.ascontiguousarray(array)
    if _NUMPY_2:
        return pb_utils.Tensor.from_dlpack(name, array)
    return pb_utils.Tensor(name, array)


def string_parameter(model_config: dict[str, Any], name: str) -> str | None:
    """The ``string_value`` of a config.pbtxt ``parameters`` entry, or None when absent."""
    entry = model_config.get("parameters", {}).get(name)
    if entry is None:
        return None
    value = entry.get("string_value", "").strip()
    return value or None


def model_dir(args: dict[str, Any]) -> Path:
    """The folder of the model being initialised, as Triton passes it to ``initialize``.

    ``hps serve`` stages a repository (for example to run a KIND_GPU config on a machine
    without GPU) and leaves the original folder in ``.hps_source``, so that paths relative to
    the model's folder keep pointing where the user meant.
    """
    return original_folder(Path(args["model_repository"]))


def served_path(args: dict[str, Any], name: str, parameter: str | None, default: str | None = None) -> Path | None:
    """The file ``name`` that serves the version being initialised, by the repository's one rule
    (:func:`hps_core.repository.served_file`): the version folder's own (a version published
    with its own files, docs/deployment.md "Model versions and runtime loading"), else the
    path ``parameter`` (else ``default``) names, relative to the model's folder; None when
    neither is given."""
    return served_file(Path(args["model_repository"]), args.get("model_version"), name, parameter, default)


def resolve_model_path(args: dict[str, Any], value: str) -> Path:
    """An absolute path for a path parameter; a relative one is relative to the model's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (model_dir(args) / path).resolve()


def model_config(args: dict[str, Any]) -> dict[str, Any]:
    """The model's config.pbtxt as the dict Triton hands to ``initialize``."""
    config: dict[str, Any] = json.loads(args["model_config"])  # a JSON object, whatever its fields
    return config


def triton_error(pb_utils: Any, message: str, code_name: str) -> Any:
    """A ``pb_utils.TritonError`` with status ``code_name`` (e.g. "INVALID_ARG") where the
    running stub knows status codes, a plain one otherwise."""
    code = getattr(pb_utils.TritonError, code_name, None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
