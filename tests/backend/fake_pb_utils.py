"""A stand-in for ``triton_python_backend_utils``, to drive our backends' model.py without Triton.

The project's rule is no stand-in for Triton in Triton's own tests. This one is tolerated for
the pure adapter logic of the backends (one response per request, errors mapped to status
codes, rate-limited logging) because the end-to-end tests (``tests/e2e``, marker ``triton``)
run the same model.py in a real ``tritonserver`` over the same paths:

* hps (``tests/backend/hps/test_model.py``): vectors of good requests answered beside failing
  ones → ``tests/e2e/test_hps_model.py`` (``test_output0_equals_sparse_rows_with_defaults``,
  ``test_duplicate_keys_in_one_request``, ``test_hps_embedding_step_alone``); a malformed
  request answered INVALID_ARG, the next one served → ``tests/e2e/test_bad_requests.py``;
  the load-time interface check → ``tests/e2e/test_load_checks.py``; metrics →
  ``tests/e2e/test_metrics.py``.
* dlrm (``tests/backend/dlrm/test_network.py``): scores of good requests →
  ``tests/e2e/test_ensemble.py::test_ensemble_scores_equal_in_process_model`` and
  ``::test_dlrm_dense_alone_scores_without_numkeys``; uneven NUMKEYS refused INVALID_ARG →
  ``::test_numkeys_not_one_key_per_table_per_sample_is_refused_by_name``.

Not reachable through a real Triton on purpose, so tested only here: an INTERNAL answer (an
output tensor that cannot be built, a forward pass that raises) and its rate-limited line in
Triton's log; the code that produces it (``backend/responses.py``) is the same that answers the
e2e requests above.
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
        records: list[tuple[str, str]] = []  # (level: info, warn, error, verbose; message)
        log_info = staticmethod(lambda msg: Logger.records.append(("info", msg)))
        log_warn = staticmethod(lambda msg: Logger.records.append(("warn", msg)))
        log_error = staticmethod(lambda msg: Logger.records.append(("error", msg)))
        log_verbose = staticmethod(lambda msg: Logger.records.append(("verbose", msg)))

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
