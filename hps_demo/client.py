"""Client side of the demo: HugeCTR-layout requests sent with the real ``tritonclient``.

A request for ``B`` samples of a model with ``T`` tables, one key per table and sample, is
``KEYS`` = the (B, T) key matrix transposed and flattened (table-major, as HugeCTR sends it),
``NUMKEYS`` = ``[B] * T`` and ``DENSE`` = the (B, 13) dense matrix flattened; each input gets
Triton's leading batch dimension of 1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DLRMRequest",
    "LatencySummary",
    "dlrm_request",
    "hps_request",
    "infer",
    "make_client",
    "measure_latency",
    "write_perf_analyzer_data",
]


@dataclass(frozen=True)
class DLRMRequest:
    """The inputs of one ensemble request, each shaped (1, n)."""

    keys: npt.NDArray[np.int64]  # (1, T*B)
    numkeys: npt.NDArray[np.int32]  # (1, T)
    dense: npt.NDArray[np.float32]  # (1, B*13)

    def as_dict(self) -> dict[str, npt.NDArray[np.generic]]:
        return {"KEYS": self.keys, "NUMKEYS": self.numkeys, "DENSE": self.dense}


def _hps_inputs(keys: npt.NDArray[np.integer[Any]]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    """KEYS (1, T*B) table-major and NUMKEYS (1, T) for a (B, T) key matrix."""
    b, t = keys.shape
    return np.ascontiguousarray(keys.T).reshape(1, b * t).astype(np.int64), np.full((1, t), b, dtype=np.int32)


def hps_request(keys: npt.NDArray[np.integer[Any]]) -> dict[str, npt.NDArray[np.generic]]:
    """KEYS/NUMKEYS for a (B, T) int64 key matrix, one key per table and sample."""
    flat, numkeys = _hps_inputs(keys)
    return {"KEYS": flat, "NUMKEYS": numkeys}


def dlrm_request(keys: npt.NDArray[np.integer[Any]], dense: npt.NDArray[np.floating[Any]]) -> DLRMRequest:
    """The ensemble request for samples given as (B, T) keys and (B, 13) dense features."""
    flat, numkeys = _hps_inputs(keys)
    return DLRMRequest(
        keys=flat,
        numkeys=numkeys,
        dense=np.ascontiguousarray(dense, dtype=np.float32).reshape(1, -1),
    )


def make_client(protocol: str, url: str) -> Any:
    """A ``tritonclient`` client for ``protocol`` "http" or "grpc" at ``host:port``."""
    if protocol == "http":
        import tritonclient.http as client_module
    elif protocol == "grpc":
        import tritonclient.grpc as client_module
    else:
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return client_module.InferenceServerClient(url=url)


def _client_module(client: Any) -> Any:
    if type(client).__module__.startswith("tritonclient.grpc"):
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def infer(client: Any, model: str, inputs: Mapping[str, npt.NDArray[np.generic]], output: str, *,
          datatypes: Mapping[str, str] | None = None) -> npt.NDArray[np.generic]:
    """Send one request and return ``output`` as an ndarray; errors raise the client's exception."""
    module = _client_module(client)
    datatypes = datatypes or {}
    tensors = []
    for name, array in inputs.items():
        tensor = module.InferInput(name, list(array.shape), datatypes.get(name) or _datatype(array))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    result = client.infer(model, tensors, outputs=[module.InferRequestedOutput(output)])
    answer: npt.NDArray[np.generic] = result.as_numpy(output)  # tritonclient is untyped: Any
    return answer


def _datatype(array: npt.NDArray[np.generic]) -> str:
    from tritonclient.utils import np_to_triton_dtype

    name: str = np_to_triton_dtype(array.dtype)  # tritonclient is untyped: Any
    return name


@dataclass(frozen=True)
class LatencySummary:
    """Client-side latency of ``count`` sequential requests, in milliseconds."""

    count: int
    p50_ms: float
    p99_ms: float
    mean_ms: float

    def __str__(self) -> str:
        return f"p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms, mean {self.mean_ms:.2f} ms over {self.count} requests"


def measure_latency(send: Callable[[], object], count: int, *, warmup: int = 5) -> LatencySummary:
    """Time ``count`` sequential calls of ``send`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        send()
    seconds = np.empty(count)
    for i in range(count):
        start = time.perf_counter()
        send()
        seconds[i] = time.perf_counter() - start
    ms = seconds * 1e3
    return LatencySummary(count, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), float(ms.mean()))


def write_perf_analyzer_data(path: Path, requests: list[DLRMRequest]) -> Path:
    """perf_analyzer ``--input-data`` JSON with real samples (shapes without the batch dim)."""
    def entry(array: npt.NDArray[np.generic]) -> dict[str, Any]:
        return {"content": array.ravel().tolist(), "shape": [int(array.shape[-1])]}

    data = [{name: entry(array) for name, array in r.as_dict().items()} for r in requests]
    path.write_text(json.dumps({"data": data}))
    return path
