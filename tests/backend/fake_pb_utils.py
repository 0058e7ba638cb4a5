"""A stand-in for ``triton_python_backend_utils``, to drive our backends' model.py without Triton.

Only for the pure adapter logic of the backends (one response per request, errors mapped to
status codes); the end-to-end tests (tests/e2e) run the same code in a real Triton.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["FakeTensor", "fake_pb_utils"]


class FakeTensor:
    """Stands in for pb_utils.Tensor: CPU memory, numpy and DLPack views."""

    def __init__(self, array: np.ndarray, writeable: bool = True):
        self._array = array
        if not writeable:
            self._array.flags.writeable = False

    def is_cpu(self) -> bool:
        return True

    def as_numpy(self) -> np.ndarray:
        return self._array

    def to_dlpack(self) -> Any:
        return torch.from_numpy(self._array.copy()).__dlpack__()

    def __dlpack__(self, stream: Any = None) -> Any:
        return self._array.__dlpack__()

    def __dlpack_device__(self) -> Any:
        return self._array.__dlpack_device__()


def fake_pb_utils() -> types.ModuleType:
    """A fresh module object with the names our backends use.

    ``pb.Tensor.refuse``: a predicate on an output array; where it holds, building the output
    tensor raises (as a stub out of shared memory would), to test that only that request fails.
    """
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor(FakeTensor):
        refuse: Callable[[np.ndarray], bool] = staticmethod(lambda array: False)

        def __init__(self, name: str, array: np.ndarray):
            if Tensor.refuse(array):
                raise MemoryError(f"cannot allocate output tensor {name} of {array.nbytes} bytes")
            super().__init__(np.ascontiguousarray(array))
            self.name = name

        @classmethod
        def from_dlpack(cls, name: str, array: Any) -> Tensor:
            return cls(name, np.from_dlpack(array))

    class TritonError(Exception):
        INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"

        def __init__(self, message: str, code: str | None = None):
            super().__init__(message)
            self.code = code

    class InferenceResponse:
        def __init__(self, output_tensors: Any = (), error: Any = None):
            self.output_tensors, self.error = list(output_tensors), error

    class Logger:
        lines: list[str] = []
        log_info = log_warn = log_error = staticmethod(lambda msg: Logger.lines.append(msg))

    class Metric:
        def __init__(self, labels: dict[str, str]):
            self.labels, self.value = labels, 0.0

        def increment(self, value: float) -> None:
            self.value += value

        def set(self, value: float) -> None:
            self.value = value

    class MetricFamily:
        COUNTER, GAUGE = "counter", "gauge"

        def __init__(self, name: str, description: str, kind: str):
            self.name, self.kind, self.metrics = name, kind, []

        def Metric(self, labels: dict[str, str]) -> Metric:  # noqa: N802 - pb_utils' name
            self.metrics.append(Metric(labels))
            return self.metrics[-1]

    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.Logger = (  # type: ignore[attr-defined]
        Tensor, TritonError, InferenceResponse, Logger
    )
    pb.MetricFamily = MetricFamily  # type: ignore[attr-defined]
    pb.TritonModelException = type("TritonModelException", (Exception,), {})  # type: ignore[attr-defined]
    pb.get_input_tensor_by_name = lambda request, name: request.get(name)  # type: ignore[attr-defined]
    return pb
