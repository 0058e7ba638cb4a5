"""Triton Python-based backend "hps": HugeCTR's HPS model interface over hps_core.

Inputs ``KEYS`` (INT64, all keys of all tables, table-major) and ``NUMKEYS`` (INT32, keys per
table), output ``OUTPUT0`` (FP32, the vectors in the same order, flattened) — with or without
a leading batch dimension. This file only adapts Triton tensors to a
:class:`hps_core.lookup.LookupSession`; the work happens there.

On a KIND_GPU instance of a model with ``gpucache: true`` the session gets one embedding
cache per table on the instance's GPU: request keys (CPU memory) cross to the device once,
and ``OUTPUT0`` stays on the GPU, handed to the next ensemble step through DLPack. On a
KIND_CPU instance the same model serves from the volatile and persistent databases.

Where the HPS JSON comes from, first match wins:
1. ``<model folder>/<version>/hps.json``: the version's own JSON (``hps publish-model`` writes
   it for each version it publishes);
2. the model parameter ``hps_config`` (relative paths are relative to the model's folder);
3. ``--backend-config=hps,ps=PATH`` given to ``hps serve`` (HugeCTR's way; ``hps serve``
   hands it over in the environment variable ``HPS_BACKEND_CONFIG_PS``).
The model's entry in that JSON is the one whose ``model`` equals the Triton model name, or
the model parameter ``hps_model``; from a version's own JSON, the entry ``<that name>_v<N>``
when there is one (its tables are ``hps_et.<name>_v<N>.<table>`` in every tier, apart from
version N-1's), else that name.

``finalize`` releases everything the instance holds (the metrics thread, the update sources,
refreshers and background insertions, the tiers' RocksDB handles and Redis connections, the
caches), so that unloading a model or a version through Triton's repository API returns its
memory and files (tests/hps_core/test_runtime_models.py).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from backend.hps.interface import check_interface
from backend.hps.metrics import DEFAULT_INTERVAL_S, TritonMetrics
from backend.responses import answer_requests, triton_log
from backend.stub_watchdog import start_watchdog
from backend.tensors import (
    model_config,
    numpy_from_tensor,
    numpy_to_tensor,
    model_dir,
    served_path,
    string_parameter,
    triton_error,
)
from hps_core.arrays import retain_freed_memory
from hps_core.config import gpu_cache_requested, load_config, version_model_name
from hps_core.errors import HPSError, RequestError, TierError
from hps_core.logs import RateLimitedLog
from hps_core.metrics import MetricsCollector
from hps_core.repository import HPS_JSON, PS_ENV
from hps_core.server import HierarchicalParameterServer



class TritonPythonModel:
    """One model instance: one parameter server over the model's tables."""

    def initialize(self, args: dict[str, Any]) -> None:
        self._logger = pb_utils.Logger
        # Unexpected request failures (INTERNAL) in Triton's log: one line per cause per
        # interval. Made here: pb_utils.Logger does not exist yet when the stub imports us.
        self._failures = RateLimitedLog(triton_log(pb_utils.Logger))
        retain_freed_memory()  # this stub process is ours: keep per-request buffers' pages mapped
        config = model_config(args)
        try:
            check_interface(config)  # HugeCTR's KEYS, NUMKEYS -> OUTPUT0, or a clear load error
        except HPSError as exc:
            raise pb_utils.TritonModelException(str(exc)) from exc
        hps_config = served_path(args, HPS_JSON, string_parameter(config, "hps_config"), os.environ.get(PS_ENV))
        if hps_config is None:
            raise pb_utils.TritonModelException(
                f"model '{args['model_name']}': no HPS config; set the parameter hps_config in config.pbtxt "
                "or start the server with `hps serve --backend-config hps,ps=PATH`"
            )
        name = string_parameter(config, "hps_model") or args["model_name"]
        try:
            ps_config = load_config(hps_config)
            if hps_config.parent == model_dir(args) / str(args["model_version"]):  # the version's own JSON
                name = version_model_name(ps_config, name, int(args["model_version"]))
            model = ps_config.model(name)
            device = self._cache_device(model, args)
            if device is not None:
                import cupy  # a GPU instance: the lookup's device arrays live on this GPU

                cupy.cuda.Device(device).use()
            self._server = HierarchicalParameterServer(ps_config, models=[name], cache_device=device)
        except HPSError as exc:
            raise pb_utils.TritonModelException(str(exc)) from exc
        self._session = self._server.session(name)
        try:
            self._watchdog = start_watchdog(string_parameter(config, "hps_on_dead_stub"), args["model_name"],
                                            self._logger.log_error)
        except HPSError as exc:
            self._server.close()
            raise pb_utils.TritonModelException(str(exc)) from exc
        self._metrics = TritonMetrics(pb_utils, self._collector(name, args), self._session, self._server.updates)
        self._metrics.start(float(string_parameter(config, "hps_metrics_interval_s") or DEFAULT_INTERVAL_S))
        self._logger.log_info(
            f"hps: model '{name}' (version {args.get('model_version', '?')}) ready with {len(model.tables)} "
            f"tables from {ps_config.source} "
            f"(numpy {np.__version__})"  # the stub's numpy decides its tensor I/O path
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        """Every request of this call answered in one lookup pass; one response each, in order.
        A request that fails at any step (its inputs, its lookup, its output tensor) gets its
        own error; the others are answered (backend/responses.py)."""
        return answer_requests(requests, _inputs, self._session.lookup_requests, _response, self._error)

    def finalize(self) -> None:
        if self._watchdog is not None:
            self._watchdog.close()  # first: the unload is about to stop the siblings too
        self._metrics.close()  # stops the publishing thread (backend/hps/metrics.py)
        self._server.close()  # drains background cache insertions, stops refreshers
        self._failures.flush()  # the count of failures held back since their last line

    def _collector(self, name: str, args: dict[str, Any]) -> MetricsCollector:
        tiers = ["cache", "volatile", "persistent"]
        tiers = [t for t, db in zip(tiers, (True, self._server.volatile, self._server.persistent)) if db is not None]
        instance = {"instance": str(args.get("model_instance_name", name))}
        return MetricsCollector(name, tiers, caches=self._session.caches, extra_labels=instance,
                                lost_partitions=lambda: self._server.lost_partitions(name))

    def _error(self, exc: Exception) -> Any:
        """The response for a request that failed: INVALID_ARG for a malformed request,
        UNAVAILABLE when a tier failed, INTERNAL (logged, rate-limited) for anything unexpected."""
        if isinstance(exc, RequestError):
            code = "INVALID_ARG"
        elif isinstance(exc, TierError):
            code = "UNAVAILABLE"
        else:
            code = "INTERNAL"
            self._failures.failure("hps: request failed", exc)
        return pb_utils.InferenceResponse(error=triton_error(pb_utils, str(exc), code))

    def _cache_device(self, model: Any, args: dict[str, Any]) -> int | None:
        """The CUDA device for this instance's embedding caches, or None to serve without."""
        if not gpu_cache_requested(model):
            return None
        if args.get("model_instance_kind") != "GPU":
            self._logger.log_warn(
                f"hps: model '{model.model}' asks for the GPU embedding cache (gpucache: true) but this "
                "instance runs on the CPU (KIND_CPU, or no GPU); serving from the volatile and "
                "persistent databases without it"
            )
            return None
        device = int(args.get("model_instance_device_id", 0))
        if device not in model.deployed_device_list:
            raise HPSError(
                f"model '{model.model}': this instance runs on GPU {device}, which is not in its "
                f"deployed_device_list {list(model.deployed_device_list)}; add it there or change "
                "the instance_group's gpus in config.pbtxt"
            )
        return device


def _inputs(request: Any) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """A request's ``KEYS`` and ``NUMKEYS`` as host arrays."""
    keys = numpy_from_tensor(pb_utils.get_input_tensor_by_name(request, "KEYS"))
    return keys, numpy_from_tensor(pb_utils.get_input_tensor_by_name(request, "NUMKEYS"))


def _response(vectors: Any) -> Any:
    """The response carrying a request's vectors as ``OUTPUT0`` (host, or on the GPU)."""
    return pb_utils.InferenceResponse(output_tensors=[numpy_to_tensor(pb_utils, "OUTPUT0", vectors)])
