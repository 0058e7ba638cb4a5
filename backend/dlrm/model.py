"""Triton Python-based backend ``dlrm``: scores samples with the DLRM dense network.

It is the second step of the ``dlrm`` ensemble: HPS (step 1) turns keys into embedding
vectors, this model turns dense features + vectors into a click probability.

Model configuration (config.pbtxt)::

    backend: "dlrm"
    max_batch_size: 1                   (or more; every row of the batch is scored)
    input  [ { name: "DENSE",      data_type: TYPE_FP32, dims: [ -1 ] },   # B * n_dense
             { name: "EMBEDDINGS", data_type: TYPE_FP32, dims: [ -1 ] },   # n_tables * B * dim
             { name: "NUMKEYS",    data_type: TYPE_INT32, dims: [ -1 ],    # n_tables, each B
               optional: true } ]
    output [ { name: "SCORE",      data_type: TYPE_FP32, dims: [ -1 ] } ]  # B
    parameters { key: "dense_weights" value: { string_value: "1/dense.pt" } }
    parameters { key: "torch_threads" value: { string_value: "1" } }       # optional

``dense_weights`` is the ``dense.pt`` written by ``save_dense`` (its ``dense.json`` must lie
beside it); a relative path is taken relative to the model's folder in the repository. A
version folder holding its own ``dense.pt`` (``<model folder>/<N>/dense.pt``, with its
``dense.json``, as ``hps publish-model`` writes it) is served instead, for that version.

``NUMKEYS`` is what the ensemble sent to HPS (step 1); with it, a request whose keys are not
one per table per sample is refused (INVALID_ARG naming NUMKEYS) instead of being scored with
embeddings paired with the wrong samples. A request without it is scored as before.

Only this file imports ``triton_python_backend_utils``; the request plumbing is in
``backend/dlrm/io.py`` and the network in ``backend/dlrm/network.py`` (both unit-tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import triton_python_backend_utils as pb_utils

from backend.dlrm.io import Batch, split_batch, to_torch
from backend.dlrm.network import DenseDLRM, load_dense, serving_forward
from backend.responses import answer_requests, triton_log
from backend.stub_watchdog import start_watchdog
from backend.tensors import (
    model_config,
    numpy_to_tensor,
    resolve_model_path,
    served_path,
    string_parameter,
    triton_error,
)
from hps_core.errors import HPSError, RequestError
from hps_core.logs import RateLimitedLog
from hps_core.repository import DENSE_WEIGHTS


def _parameter(config: dict[str, Any], name: str, default: str | None = None) -> str:
    value = string_parameter(config, name) or default
    if value is None:
        raise pb_utils.TritonModelException(
            f"model {config.get('name')!r}: parameter {name!r} (string_value) is required"
        )
    return value


class TritonPythonModel:
    """One instance per Triton model instance (each is its own stub process)."""

    def initialize(self, args: dict[str, Any]) -> None:
        self.log = pb_utils.Logger
        # Unexpected request failures (INTERNAL) in Triton's log: one line per cause per
        # interval. Made here: pb_utils.Logger does not exist yet when the stub imports us.
        self._failures = RateLimitedLog(triton_log(pb_utils.Logger))
        config = model_config(args)
        # the version's own weights, else the dense_weights parameter (required then: _parameter says so)
        weights = (served_path(args, DENSE_WEIGHTS, string_parameter(config, "dense_weights"))
                   or resolve_model_path(args, _parameter(config, "dense_weights")))
        # Each instance is a separate process; Triton scales by running several of them, so one
        # intra-op thread each avoids N instances x all-cores threads fighting for the CPUs (small
        # batches gain nothing from more threads). Raise it with "torch_threads" for 1 instance.
        torch.set_num_threads(int(_parameter(config, "torch_threads", "1")))

        use_gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        self.device = (
            torch.device(f"cuda:{int(args.get('model_instance_device_id', 0))}")
            if use_gpu
            else torch.device("cpu")
        )
        self.net: DenseDLRM = load_dense(weights, map_location=self.device)
        self._forward = serving_forward(self.net)
        try:
            self._watchdog = start_watchdog(string_parameter(config, "hps_on_dead_stub"),
                                            str(args.get("model_name") or config.get("name")), self.log.log_error)
        except HPSError as exc:
            raise pb_utils.TritonModelException(str(exc)) from exc
        self.log.log_info(
            f"dlrm: loaded {weights} (n_dense={self.net.n_dense}, n_tables="
            f"{self.net.n_tables}, dim={self.net.dim}) on {self.device}"
        )

    def _batch(self, request: Any) -> Batch:  # a pb_utils.InferenceRequest
        dense = pb_utils.get_input_tensor_by_name(request, "DENSE")
        emb = pb_utils.get_input_tensor_by_name(request, "EMBEDDINGS")
        if dense is None or emb is None:
            raise RequestError("request needs both inputs DENSE and EMBEDDINGS")
        numkeys = pb_utils.get_input_tensor_by_name(request, "NUMKEYS")  # optional
        return split_batch(
            to_torch(dense),
            to_torch(emb),
            n_dense=self.net.n_dense,
            n_tables=self.net.n_tables,
            dim=self.net.dim,
            numkeys=None if numkeys is None else to_torch(numkeys),
        )

    def execute(self, requests: list[Any]) -> list[Any]:  # pb_utils requests and responses
        """Every good request's samples scored in ONE forward pass (Triton's dynamic batching
        hands several requests per call); one response per request, a bad one gets its error.
        Should the shared pass fail, each request is scored alone, so only the one that causes
        the failure gets it (backend/responses.py)."""
        return answer_requests(requests, self._batch, self._predict, _response, self._error)

    def _predict(self, batches: Sequence[Batch]) -> list[npt.NDArray[np.float32]]:
        """The scores of every batch, one forward pass: host float32, each in its request's shape."""
        if len(batches) == 1:
            dense, emb = batches[0].dense, batches[0].emb
        else:
            dense = torch.cat([b.dense.to(self.device) for b in batches])
            emb = torch.cat([b.emb.to(self.device) for b in batches])
        with torch.inference_mode():
            scores = self._forward(dense.to(self.device, torch.float32), emb.to(self.device, torch.float32))
        parts = torch.split(scores, [b.dense.shape[0] for b in batches])
        return [
            part.reshape(b.out_shape).to("cpu", dtype=torch.float32).contiguous().numpy()
            for b, part in zip(batches, parts)
        ]

    def _error(self, exc: Exception) -> "pb_utils.InferenceResponse":
        if isinstance(exc, RequestError):
            return pb_utils.InferenceResponse(error=triton_error(pb_utils, str(exc), "INVALID_ARG"))
        self._failures.failure("dlrm: request failed", exc)
        return pb_utils.InferenceResponse(
            error=triton_error(pb_utils, f"dlrm: {type(exc).__name__}: {exc}", "INTERNAL")
        )

    def finalize(self) -> None:
        if self._watchdog is not None:
            self._watchdog.close()
        self._failures.flush()  # the count of failures held back since their last line
        self.log.log_info("dlrm: finalize")
        self.net = None  # type: ignore[assignment]


def _response(scores: npt.NDArray[np.float32]) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[numpy_to_tensor(pb_utils, "SCORE", scores)])
