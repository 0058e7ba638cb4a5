#!/usr/bin/env python
"""Lookup benchmark of issue 9: one request over all its tables, next to its baselines, in one run.

Every headline figure is a ratio of two times measured side by side in this run (candidates
interleaved A, B, A, B, ..., medians over at least ``--min-reps`` repetitions and
``--min-seconds`` each), so machine noise lands on both sides alike; compare ratios, not
absolute times, across machines.

inprocess  ``LookupSession.lookup`` of one request (``--tables`` tables x ``--rows`` rows, all in
           the in-process hash map, persistent tier disabled; one key per table and sample,
           keys table-major) next to the plain-gather ceiling: the same rows in one dense
           float32 array ``(tables*rows, dim)`` gathered with ONE ``np.take(..., out=...)``;
           and next to one ``np.take`` per table. Both takes use ``mode="clip"`` (the indices
           are valid, so the answer is the same): with the default ``mode="raise"`` numpy
           buffers ``out`` and the gather is about 2x slower, no ceiling. The lookup's answers
           are checked equal to the gather's once per size, so both sides do the same work.
tables     the same keys as 26 tables x B samples and as 1 table (26*rows rows) x 26B keys:
           ratio 26-table time / 1-table time (what a request pays per table it spans).
served     the real Triton (``hps_core.serving.TritonServer``) on a temporary repository with
           an ``hps`` model (HugeCTR I/O, KIND_CPU, hash map with initial_cache_rate 1.0,
           persistent tier disabled) and ``zeros``, a Python-backend model with the same I/O
           that answers zeros of the right size (the floor of a Python backend). Client-side
           p50/p99 of sequential requests (tritonclient gRPC, optionally HTTP), the two
           models interleaved; ratio hps p50 / zeros p50.

Keys follow a finite power law (``P(rank k) ~ k**-alpha``, hot rows scattered over the table,
as hps_demo/data.py draws them) or a uniform draw (``--keys powerlaw uniform``). Each size
draws ``--request-sets`` requests and every candidate cycles through them (so repeated runs
do not time one request's rows sitting in the processor's caches).

Cached mode (``--cache cpu|gpu``; ``--device gpu`` implies ``--cache gpu``): the session also
gets a multi-table embedding cache (``make_multi_table_cache("dynamic", device=..., capacities=
--cache-headroom x rows per table, dims=...)``) warmed with every row of every table, so each
request is all-hit and ``inprocess``/``tables`` time the cache path (hit rates are measured and
reported; ``hit_rate_threshold`` is 1.0, so a miss would still be answered exactly from the
hash map). With ``--device gpu`` the answers are CuPy arrays, the ceiling is a float4 RawKernel
gather of the same rows from a dense device array (one launch; ``cupy.take`` when rows are not
16-byte aligned), every candidate is timed with a device synchronize before the host clock
stops, and each lookup's kernel launches and host synchronisations are counted by wrapping the
cache's kernel handles, its status read-backs and the host/device copies (in this script only;
with torch installed, the CUDA profiler's count is recorded beside it as a cross-check).
``--cache cpu`` is the same path on the CPU twin (CpuDynamicCache), which runs anywhere.

    .venv/bin/python scripts/bench_lookup.py                        # all modes, a few minutes on 2 cores
    .venv/bin/python scripts/bench_lookup.py --mode inprocess --keys powerlaw uniform
    .venv/bin/python scripts/bench_lookup.py --quick --out /tmp/bl  # tiny smoke run, seconds
    .venv/bin/python scripts/bench_lookup.py --quick --cache cpu --mode inprocess tables  # CPU twin cache
    python3 scripts/bench_lookup.py --device gpu --mode inprocess tables --dims 128   # GPU cache path

Prints the machine, the command line and one markdown table per mode; ``--out DIR`` (default
``work/bench_lookup``) gets ``results.json`` and ``bench_lookup.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hps_core.cache import make_multi_table_cache  # noqa: E402
from hps_core.cache.base import MultiTableCache  # noqa: E402
from hps_core.arrays import retain_freed_memory  # noqa: E402
from hps_core.config import ModelConfig, VolatileDBConfig, parse_config  # noqa: E402
from hps_core.db import HashMapVolatileDB  # noqa: E402
from hps_core.formats import write_sparse_model  # noqa: E402
from hps_core.lookup import LookupSession  # noqa: E402
from hps_demo.bench.harness import Row, command_line, interleaved, machine, markdown, percentiles_ms, rotating  # noqa: E402
from hps_demo.bench.tables import Device, Tables, cache_hits, draw_rows, hit_rate_of  # noqa: E402
from hps_demo.bench.tables import make_request, make_tables, warm_cache  # noqa: E402

LOAD_CHUNK = 65_536
TRITON_MAX_BATCH = 1024  # config.pbtxt max_batch_size: clients send KEYS [1, n], as tests/e2e does

ZEROS_MODEL_PY = '''\
"""The floor of a Python backend: HugeCTR's HPS I/O, answered with zeros of the right size."""

import numpy as np
import triton_python_backend_utils as pb_utils

from backend.tensors import model_config, numpy_from_tensor, numpy_to_tensor, string_parameter


class TritonPythonModel:
    def initialize(self, args):
        self._dim = int(string_parameter(model_config(args), "dim"))

    def execute(self, requests):
        responses = []
        for request in requests:
            numpy_from_tensor(pb_utils.get_input_tensor_by_name(request, "KEYS"))  # read, as hps does
            numkeys = numpy_from_tensor(pb_utils.get_input_tensor_by_name(request, "NUMKEYS"))
            total = int(numkeys.reshape(-1, numkeys.shape[-1])[0].sum()) * self._dim
            out = np.zeros(numkeys.shape[:-1] + (total,), dtype=np.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[numpy_to_tensor(pb_utils, "OUTPUT0", out)]))
        return responses
'''

CONFIG_PBTXT = """\
name: "{name}"
backend: "{backend}"
max_batch_size: {max_batch}
input [
  {{ name: "KEYS" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "NUMKEYS" data_type: TYPE_INT32 dims: [ -1 ] }}
]
output [
  {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}
"""


# --------------------------------------------------------------------------- sessions


def model_config(name: str, n_tables: int, dim: int, max_batch: int, keys_per_sample: int = 1) -> ModelConfig:
    config = parse_config({"models": [{
        "model": name,
        "sparse_files": [f"unused/{name}/t{i}" for i in range(n_tables)],
        "embedding_table_names": [f"t{i}" for i in range(n_tables)],
        "embedding_vecsize_per_table": [dim] * n_tables,
        "default_value_for_each_table": [0.0] * n_tables,
        "maxnum_catfeature_query_per_table_per_sample": [keys_per_sample] * n_tables,
        "max_batch_size": max_batch,
        # With a cache: a batch with a miss waits for the hash map, so every answer is exact.
        "hit_rate_threshold": 1.0,
    }]}, "bench_lookup")
    return config.model(name)


def load_hash_map(db: HashMapVolatileDB, model: ModelConfig, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
    """Insert ``keys[i]`` (rows,) / ``values[i]`` (rows, dim) into table i of ``model``."""
    for table, k, v in zip(model.tables, keys, values):
        db.create_table(table.qualified_name, table.dim, table.row_format)
        for s in range(0, k.size, LOAD_CHUNK):
            db.insert(table.qualified_name, k[s : s + LOAD_CHUNK], v[s : s + LOAD_CHUNK])


@contextmanager
def session_over(model: ModelConfig, keys: list[np.ndarray], values: list[np.ndarray],
                 partitions: int, cache: MultiTableCache | None = None) -> Iterator[LookupSession]:
    """A LookupSession over a hash map holding every row (persistent tier disabled), and the
    embedding cache ``cache`` in front of it when one is given (see :func:`warm_cache`)."""
    db = HashMapVolatileDB(VolatileDBConfig(num_partitions=partitions))
    load_hash_map(db, model, keys, values)
    session = LookupSession(model, volatile=db, persistent=None, cache=cache)
    try:
        yield session
    finally:
        session.close()
        db.close()


# --------------------------------------------------------------------------- cache and GPU call counts


def make_cache(args: argparse.Namespace, model: ModelConfig, rows: list[int]) -> MultiTableCache | None:
    """The session's multi-table dynamic cache for ``model``'s tables, of ``rows`` rows each
    (None: no cache), in their widths and row formats, as the server builds it. Capacity
    ``--cache-headroom`` x rows per table: at the default 4 the whole table stays resident (a
    set of 32 slots overflows with negligible probability), so warmed requests are all-hit."""
    if args.cache == "none":
        return None
    device: str | int = 0 if args.cache == "gpu" else "cpu"
    return make_multi_table_cache("dynamic", device=device, capacities=[args.cache_headroom * r for r in rows],
                                  dims=[t.dim for t in model.tables],
                                  row_formats=[t.row_format for t in model.tables])


@contextmanager
def gpu_call_counter(caches: list[Any]) -> Iterator[dict[str, int]]:
    """Counts, while open, the kernel launches of ``caches`` (their kernel handles, wrapped),
    their status read-backs (each one host synchronisation), device-to-host copies on the
    lookup path (``hps_core.lookup.to_host`` of a device array) and host-to-device copies
    (``cupy.asarray`` of a numpy array: a copy from pageable memory, which the host waits for).
    Instrumentation of this benchmark only; everything is restored on exit."""
    import cupy

    import hps_core.lookup as lookup_module
    from hps_core.cache import gpu

    counts = {"launches": 0, "status_reads": 0, "d2h": 0, "h2d": 0}
    restore: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        restore.append((owner, name, owner[name] if isinstance(owner, dict) else getattr(owner, name)))
        if isinstance(owner, dict):
            owner[name] = value
        else:
            setattr(owner, name, value)

    def counting(kernel: Any) -> Any:
        def launch(*a: Any, **kw: Any) -> Any:
            counts["launches"] += 1
            return kernel(*a, **kw)

        return launch

    seen: set[int] = set()
    for cache in caches:
        for table in (cache._kernels, cache._row_kernels):
            for kernels in table.values():
                if id(kernels) in seen:
                    continue
                seen.add(id(kernels))
                for name in list(kernels):
                    patch(kernels, name, counting(kernels[name]))
    read, to_host, asarray = gpu._Workspace.read, lookup_module.to_host, cupy.asarray

    def counted_read(self: Any, words: int, stream: Any) -> Any:
        counts["status_reads"] += 1
        return read(self, words, stream)

    def counted_to_host(array: Any) -> Any:
        if not isinstance(array, np.ndarray):
            counts["d2h"] += 1
        return to_host(array)

    def counted_asarray(array: Any, *a: Any, **kw: Any) -> Any:
        if isinstance(array, np.ndarray):
            counts["h2d"] += 1
        return asarray(array, *a, **kw)

    patch(gpu._Workspace, "read", counted_read)
    patch(lookup_module, "to_host", counted_to_host)
    patch(cupy, "asarray", counted_asarray)
    try:
        yield counts
    finally:
        for owner, name, value in reversed(restore):
            if isinstance(owner, dict):
                owner[name] = value
            else:
                setattr(owner, name, value)


def count_gpu_calls(session: LookupSession, device: Device, calls: list[Callable[[], Any]], profile: bool) -> Row:
    """Launches and host synchronisations per lookup, over ``calls`` (one lookup each), after
    one untimed run of each, and with ``profile`` the profiler's cross-check. Empty on the
    host; a ``count_error`` entry if counting failed."""
    if not device.gpu or session.cache is None:
        return {}
    try:
        for call in calls:
            call()
        device.sync()
        with gpu_call_counter([session.cache]) as counts:
            for call in calls:
                call()
            device.sync()
        n = len(calls)
        row: Row = {"launches_per_lookup": counts["launches"] / n,
                    "syncs_per_lookup": (counts["status_reads"] + counts["d2h"]) / n,
                    "status_reads_per_lookup": counts["status_reads"] / n,
                    "d2h_per_lookup": counts["d2h"] / n, "h2d_per_lookup": counts["h2d"] / n}
    except Exception as exc:  # noqa: BLE001 - a count that fails must not lose the timings
        return {"count_error": f"{type(exc).__name__}: {exc}"}
    if profile:
        row["profiler"] = profile_gpu_calls(device, calls)
    return row


#: Runtime and driver calls after which the host has waited for the device.
_SYNC_CALLS = frozenset({
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpy2D",
    "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpy", "cuMemcpyDtoH", "cuMemcpyDtoH_v2",
    "cuMemcpyHtoD", "cuMemcpyHtoD_v2"})


def profile_gpu_calls(device: Device, calls: list[Callable[[], Any]]) -> Row:
    """Cross-check with the CUDA profiler (torch.profiler, CUPTI: sees every kernel and copy in
    the process, CuPy's own included): device kernels, copies and synchronising runtime calls
    per lookup. ``{"error": ...}`` where torch or CUPTI is unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for call in calls:
                call()
            device.sync()  # one cudaDeviceSynchronize of our own, subtracted below
        kernels = copies = syncs = 0
        for event in prof.key_averages():
            name, count = str(event.key), int(event.count)
            on_device = str(getattr(event, "device_type", "")).endswith("CUDA")
            if on_device and name.startswith(("Memcpy", "Memset")):
                copies += count if name.startswith("Memcpy") else 0
            elif on_device:
                kernels += count
            elif name in _SYNC_CALLS:
                syncs += count
        n = len(calls)
        return {"kernels_per_lookup": kernels / n, "memcpy_per_lookup": copies / n,
                "sync_calls_per_lookup": max(0, syncs - 1) / n}
    except Exception as exc:  # noqa: BLE001 - optional
        return {"error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------- inprocess


def lookup_of(session: LookupSession, keys: np.ndarray, numkeys: np.ndarray) -> Callable[[], Any]:
    """A candidate: ``session.lookup(keys, numkeys)``."""
    return lambda: session.lookup(keys, numkeys)


def cache_row(session: LookupSession, resident: float | None, hits_before: tuple[float, float],
              counted: Row) -> Row:
    """The cached-mode columns of a result row (empty without a cache)."""
    if session.cache is None:
        return {}
    return {"cache_resident": resident, "hit_rate": hit_rate_of(session, hits_before), **counted}


def bench_inprocess(args: argparse.Namespace, tables: Tables, rng: np.random.Generator, device: Device,
                    on_row: Callable[[Row], None] | None = None) -> list[Row]:
    model = model_config("bench26", tables.n, tables.dim, max(args.samples))
    slices = [tables.dense[t * tables.rows : (t + 1) * tables.rows] for t in range(tables.n)]
    cache = make_cache(args, model, [tables.rows] * tables.n)
    results = []
    with session_over(model, list(tables.key_maps), slices, args.num_partitions, cache) as session:
        resident = warm_cache(cache, device, list(tables.key_maps), slices)
        dense = device.put(tables.dense)
        dense_slices = [dense[t * tables.rows : (t + 1) * tables.rows] for t in range(tables.n)]
        for dist in args.keys:
            for samples in args.samples:
                reqs = [make_request(tables, draw_rows(rng, tables, samples, dist, args.alpha))
                        for _ in range(args.request_sets)]
                index = [device.put(r.dense_index) for r in reqs]
                per_table = [[device.put(rows) for rows in r.per_table] for r in reqs]
                out = device.empty((reqs[0].keys.size, tables.dim))
                outs = [out[t * samples : (t + 1) * samples] for t in range(tables.n)]
                lookups = [lookup_of(session, r.keys, r.numkeys) for r in reqs]

                def gathers(i: int) -> Callable[[], None]:
                    return lambda: device.gather(dense, index[i], out)

                def takes(i: int) -> Callable[[], None]:
                    def run() -> None:
                        for t in range(tables.n):
                            device.gather(dense_slices[t], per_table[i][t], outs[t])

                    return run

                checked = True
                for i, req in enumerate(reqs):  # every request set, against the gather on the host
                    answer = device.host(lookups[i]()).ravel()
                    checked &= bool(np.array_equal(answer, tables.dense[req.dense_index].ravel()))
                assert checked, f"lookup and gather disagree (dim {tables.dim}, {samples} samples, {dist})"
                gathers(0)()
                device.sync()
                assert np.array_equal(device.host(out).ravel(), tables.dense[reqs[0].dense_index].ravel()), \
                    "the gather ceiling gathers the wrong rows"
                hits_before = cache_hits(session)
                got = interleaved({name: device.synced(rotating(fns)) for name, fns in (
                    ("lookup", lookups), ("gather", [gathers(i) for i in range(len(reqs))]),
                    ("takes", [takes(i) for i in range(len(reqs))]))},
                    args.min_seconds, args.min_reps, args.max_seconds)
                profile = args.profile and samples == max(args.samples)
                extra = cache_row(session, resident, hits_before, count_gpu_calls(session, device, lookups, profile))
                row = {"keys_dist": dist, "dim": tables.dim, "samples": samples, "keys": int(reqs[0].keys.size),
                       "unique_keys": int(np.unique(reqs[0].keys).size), "checked_equal": checked,
                       "device": device.name, "cache": args.cache, "request_sets": len(reqs),
                       "lookup_ms": got["lookup"]["median_s"] * 1e3, "gather_ms": got["gather"]["median_s"] * 1e3,
                       "takes_ms": got["takes"]["median_s"] * 1e3, "reps": got["lookup"]["reps"], **extra}
                row["lookup_vs_gather"] = row["lookup_ms"] / row["gather_ms"]
                row["lookup_vs_takes"] = row["lookup_ms"] / row["takes_ms"]
                results.append(row)
                if on_row:
                    on_row(row)
                print(f"  inprocess {dist:8s} dim {tables.dim:4d} samples {samples:6d}: "
                      f"lookup/gather {row['lookup_vs_gather']:7.2f}x  lookup/{tables.n} takes "
                      f"{row['lookup_vs_takes']:6.2f}x  ({row['reps']} reps){counts_text(row)}", flush=True)
    return results


def counts_text(row: Row) -> str:
    """`` hit rate ..., launches ..., syncs ...`` for a cached row ('' without a cache)."""
    if row.get("cache", "none") == "none":
        return ""
    text = f"  hit rate {row['hit_rate']:.4f}" if row.get("hit_rate") is not None else "  hit rate n/a"
    if "launches_per_lookup" in row:
        text += (f", {row['launches_per_lookup']:g} launches, {row['syncs_per_lookup']:g} syncs "
                 f"(+{row['h2d_per_lookup']:g} h2d) per lookup")
    elif "count_error" in row:
        text += f", counting failed: {row['count_error']}"
    return text


# --------------------------------------------------------------------------- tables


def bench_tables(args: argparse.Namespace, tables: Tables, rng: np.random.Generator, device: Device,
                 on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """The same keys as ``n`` tables x B samples and as 1 table x nB keys, each in its own session
    (each with its own cache in cached mode, warmed with all its rows)."""
    n, max_b = tables.n, max(args.tables_samples)
    many = model_config("bench_many", n, tables.dim, max_b)
    one = model_config("bench_one", 1, tables.dim, max_b, keys_per_sample=n)
    slices = [tables.dense[t * tables.rows : (t + 1) * tables.rows] for t in range(n)]
    many_cache = make_cache(args, many, [tables.rows] * n)
    one_cache = make_cache(args, one, [n * tables.rows])
    results = []
    with session_over(many, list(tables.key_maps), slices, args.num_partitions, many_cache) as s_many, \
            session_over(one, [tables.key_maps.ravel()], [tables.dense], args.num_partitions, one_cache) as s_one:
        resident = {"many": warm_cache(many_cache, device, list(tables.key_maps), slices),
                    "one": warm_cache(one_cache, device, [tables.key_maps.ravel()], [tables.dense])}
        for dist in args.keys:
            for samples in args.tables_samples:
                reqs = [make_request(tables, draw_rows(rng, tables, samples, dist, args.alpha))
                        for _ in range(args.request_sets)]
                one_numkeys = np.array([reqs[0].keys.size], dtype=np.int32)
                lookups_many = [lookup_of(s_many, r.keys, r.numkeys) for r in reqs]
                lookups_one = [lookup_of(s_one, r.keys, one_numkeys) for r in reqs]
                checked = True
                for i, req in enumerate(reqs):
                    expected = tables.dense[req.dense_index].ravel()
                    checked &= bool(np.array_equal(device.host(lookups_many[i]()).ravel(), expected)
                                    and np.array_equal(device.host(lookups_one[i]()).ravel(), expected))
                assert checked, f"{n}-table and 1-table lookups disagree (dim {tables.dim}, {samples} samples)"
                before = {"many": cache_hits(s_many), "one": cache_hits(s_one)}
                got = interleaved({"many": device.synced(rotating(lookups_many)),
                                   "one": device.synced(rotating(lookups_one))},
                                  args.min_seconds, args.min_reps, args.max_seconds)
                row = {"keys_dist": dist, "dim": tables.dim, "samples": samples, "keys": int(reqs[0].keys.size),
                       "tables": n, "checked_equal": checked, "device": device.name, "cache": args.cache,
                       "request_sets": len(reqs), "many_tables_ms": got["many"]["median_s"] * 1e3,
                       "one_table_ms": got["one"]["median_s"] * 1e3, "reps": got["many"]["reps"]}
                row["many_vs_one"] = row["many_tables_ms"] / row["one_table_ms"]
                if args.cache != "none":
                    profile = args.profile and samples == max(args.tables_samples)
                    many_counts = count_gpu_calls(s_many, device, lookups_many, profile)
                    one_counts = count_gpu_calls(s_one, device, lookups_one, profile)
                    row.update(cache_row(s_many, resident["many"], before["many"], many_counts))
                    row["one_table"] = cache_row(s_one, resident["one"], before["one"], one_counts)
                results.append(row)
                if on_row:
                    on_row(row)
                one_text = ""
                if "launches_per_lookup" in row.get("one_table", {}):
                    one_text = (f"; 1 table: {row['one_table']['launches_per_lookup']:g} launches, "
                                f"{row['one_table']['syncs_per_lookup']:g} syncs")
                print(f"  tables    {dist:8s} dim {tables.dim:4d} samples {samples:6d}: "
                      f"{n} tables / 1 table {row['many_vs_one']:6.2f}x  ({row['reps']} reps)"
                      f"{counts_text(row)}{one_text}", flush=True)
    return results


# --------------------------------------------------------------------------- served


def write_repository(root: Path, tables_by_dim: dict[int, Tables], args: argparse.Namespace) -> Path:
    """A model repository with ``hps_d<dim>`` and ``zeros_d<dim>`` per dim; returns its path."""
    repo, data = root / "repository", root / "sparse"
    entries = []
    for dim, tables in tables_by_dim.items():
        files = []
        for t in range(tables.n):
            folder = data / f"d{dim}" / f"table{t}.model"
            write_sparse_model(folder, tables.key_maps[t], tables.dense[t * tables.rows : (t + 1) * tables.rows])
            files.append(str(folder))
        entries.append({
            "model": f"hps_d{dim}", "sparse_files": files,
            "embedding_table_names": [f"t{t}" for t in range(tables.n)],
            "embedding_vecsize_per_table": [dim] * tables.n,
            "default_value_for_each_table": [0.0] * tables.n,
            "maxnum_catfeature_query_per_table_per_sample": [1] * tables.n,
            "max_batch_size": max(args.served_samples),
        })
        for name, backend, key, value in ((f"hps_d{dim}", "hps", "hps_config", "../hps.json"),
                                          (f"zeros_d{dim}", "python", "dim", str(dim))):
            (repo / name / "1").mkdir(parents=True)
            (repo / name / "config.pbtxt").write_text(CONFIG_PBTXT.format(
                name=name, backend=backend, max_batch=TRITON_MAX_BATCH, key=key, value=value))
            if backend == "python":
                (repo / name / "1" / "model.py").write_text(ZEROS_MODEL_PY)
    (repo / "hps.json").write_text(json.dumps({
        "supportlonglong": True,
        "volatile_db": {"type": "hash_map", "num_partitions": args.num_partitions, "initial_cache_rate": 1.0},
        "persistent_db": {"type": "disabled"},
        "models": entries,
    }, indent=1))
    return repo


def client_for(protocol: str, url: str) -> tuple[Any, Any]:
    """(tritonclient module, client) for ``protocol``."""
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module  # type: ignore[no-redef]
    return module, module.InferenceServerClient(url=url)


def bench_served(args: argparse.Namespace, tables_by_dim: dict[int, Tables], rng: np.random.Generator) -> list[Row]:
    from hps_core.serving import TritonServer

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_lookup_") as tmp:
        repo = write_repository(Path(tmp), tables_by_dim, args)
        started = time.perf_counter()
        with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0) as server:
            print(f"  served: Triton ready in {time.perf_counter() - started:.1f} s", flush=True)
            for protocol in args.protocols:
                module, client = client_for(protocol, server.grpc_url if protocol == "grpc" else server.http_url)
                try:
                    for dim, tables in tables_by_dim.items():
                        for samples in args.served_samples:
                            row = served_size(args, module, client, tables, samples, rng)
                            row["protocol"] = protocol
                            results.append(row)
                            print(f"  served    {protocol:4s} dim {dim:4d} samples {samples:6d}: hps p50 "
                                  f"{row['hps']['p50_ms']:.2f} ms, zeros p50 {row['zeros']['p50_ms']:.2f} ms, "
                                  f"ratio {row['hps_vs_zeros_p50']:.2f}x", flush=True)
                finally:
                    client.close()
    return results


def served_size(args: argparse.Namespace, module: Any, client: Any, tables: Tables, samples: int,
                rng: np.random.Generator) -> Row:
    """Sequential requests of ``samples`` samples to hps and zeros, interleaved; p50/p99 each."""
    req = make_request(tables, draw_rows(rng, tables, samples, args.keys[0], args.alpha))
    inputs = [module.InferInput("KEYS", [1, req.keys.size], "INT64"),
              module.InferInput("NUMKEYS", [1, tables.n], "INT32")]
    inputs[0].set_data_from_numpy(req.keys.reshape(1, -1))
    inputs[1].set_data_from_numpy(req.numkeys.reshape(1, -1))
    outputs = [module.InferRequestedOutput("OUTPUT0")]
    models = {"hps": f"hps_d{tables.dim}", "zeros": f"zeros_d{tables.dim}"}

    def send(model: str) -> np.ndarray:
        return client.infer(model, inputs, outputs=outputs).as_numpy("OUTPUT0")

    got = send(models["hps"])
    checked = bool(np.array_equal(got.ravel(), tables.dense[req.dense_index].ravel()))
    assert checked, f"served hps answer differs from the gather (dim {tables.dim}, {samples} samples)"
    assert send(models["zeros"]).size == got.size, "zeros model answers a different size"
    for _ in range(args.warmup):
        for model in models.values():
            send(model)
    seconds: dict[str, list[float]] = {kind: [] for kind in models}
    for _ in range(args.requests):
        for kind, model in models.items():
            t0 = time.perf_counter()
            send(model)
            seconds[kind].append(time.perf_counter() - t0)
    row: Row = {"dim": tables.dim, "samples": samples, "keys": int(req.keys.size), "keys_dist": args.keys[0],
                "checked_equal": checked, **{kind: percentiles_ms(s) for kind, s in seconds.items()}}
    row["hps_vs_zeros_p50"] = row["hps"]["p50_ms"] / row["zeros"]["p50_ms"]
    row["hps_vs_zeros_p99"] = row["hps"]["p99_ms"] / row["zeros"]["p99_ms"]
    return row


# --------------------------------------------------------------------------- report


def _num(value: Any, fmt: str = "g") -> str:
    return "n/a" if value is None else format(value, fmt)


def cache_columns(r: Row, counted: bool) -> list[str]:
    """hit rate, and with ``counted`` (GPU rows) launches and syncs (+ host-to-device copies)
    per lookup of a cached row."""
    cells = [_num(r.get("hit_rate"), ".4f")]
    if counted:
        cells += [_num(r.get("launches_per_lookup")),
                  f"{_num(r.get('syncs_per_lookup'))} (+{_num(r.get('h2d_per_lookup'))})"]
    return cells


def resident_text(rows: list[Row]) -> str:
    shares = [r["cache_resident"] for r in rows if r.get("cache_resident") is not None]
    return f"{100 * min(shares):.2f}% of the rows resident after warming" if shares else "residency unknown"


def report(results: dict[str, list[Row]], n_tables: int) -> str:
    parts = []
    if results.get("inprocess"):
        rows = results["inprocess"]
        cached = any(r.get("cache", "none") != "none" for r in rows)
        gpu = any(r.get("device") == "gpu" for r in rows)
        where = "a device gather kernel" if gpu else "one np.take"
        title = (f"### inprocess: LookupSession.lookup vs {where} (gather) and {n_tables} per-table gathers"
                 + (f" (cache: {rows[0]['cache']}, {resident_text(rows)})" if cached else ""))
        parts.append(title + "\n\n" + markdown(
            ["keys dist", "dim", "samples", "keys", "lookup ms", "gather ms", f"{n_tables} takes ms",
             "lookup/gather", f"lookup/{n_tables} takes"]
            + (["hit rate"] if cached else []) + (["launches/lookup", "syncs (+h2d)/lookup"] if gpu else []),
            [[r["keys_dist"], str(r["dim"]), f"{r['samples']:,}", f"{r['keys']:,}", f"{r['lookup_ms']:.3f}",
              f"{r['gather_ms']:.3f}", f"{r['takes_ms']:.3f}", f"**{r['lookup_vs_gather']:.2f}**",
              f"{r['lookup_vs_takes']:.2f}"] + (cache_columns(r, gpu) if cached else []) for r in rows]))
    if results.get("tables"):
        rows = results["tables"]
        cached = any(r.get("cache", "none") != "none" for r in rows)
        gpu = any(r.get("device") == "gpu" for r in rows)
        parts.append(f"### tables: {n_tables} tables x B samples vs 1 table x {n_tables}B keys (same keys)"
                     + (f" (cache: {rows[0]['cache']}, {resident_text(rows)})" if cached else "") + "\n\n" + markdown(
            ["keys dist", "dim", "samples", "keys", f"{n_tables} tables ms", "1 table ms", f"{n_tables} tables / 1 table"]
            + (["hit rate"] if cached else [])
            + ([f"{n_tables} tables: launches/lookup", "syncs (+h2d)", "1 table: launches/lookup", "syncs (+h2d)"]
               if gpu else []),
            [[r["keys_dist"], str(r["dim"]), f"{r['samples']:,}", f"{r['keys']:,}", f"{r['many_tables_ms']:.3f}",
              f"{r['one_table_ms']:.3f}", f"**{r['many_vs_one']:.2f}**"]
             + ((cache_columns(r, gpu) + (cache_columns(r.get("one_table", {}), gpu)[1:] if gpu else []))
                if cached else []) for r in rows]))
    if results.get("served"):
        parts.append("### served: Triton, client-side latency of sequential requests, hps vs zeros\n\n" + markdown(
            ["protocol", "dim", "samples", "keys", "hps p50 ms", "zeros p50 ms", "hps p99 ms", "zeros p99 ms",
             "hps/zeros p50", "hps/zeros p99"],
            [[r["protocol"], str(r["dim"]), f"{r['samples']:,}", f"{r['keys']:,}", f"{r['hps']['p50_ms']:.2f}",
              f"{r['zeros']['p50_ms']:.2f}", f"{r['hps']['p99_ms']:.2f}", f"{r['zeros']['p99_ms']:.2f}",
              f"**{r['hps_vs_zeros_p50']:.2f}**", f"{r['hps_vs_zeros_p99']:.2f}"] for r in results["served"]]))
    return "\n\n".join(parts)


def plot(results: dict[str, list[Row]], path: Path, baseline: dict[str, list[Row]] | None = None) -> bool:
    """Ratio vs samples, one line per dim (and key distribution); with ``baseline`` (an earlier
    run's results.json, e.g. before a change) its lines too, dotted. False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [(mode, key, label) for mode, key, label in (
        ("inprocess", "lookup_vs_gather", "lookup / plain gather"),
        ("tables", "many_vs_one", "26 tables / 1 table"),
        ("served", "hps_vs_zeros_p50", "hps p50 / zeros p50")) if results.get(mode)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (mode, key, label) in zip(axes[0], panels):
        rows = results[mode]
        groups = sorted({(r["dim"], r["keys_dist"], r.get("protocol", "")) for r in rows})
        for i, group in enumerate(groups):
            line = [r for r in rows if (r["dim"], r["keys_dist"], r.get("protocol", "")) == group]
            name = f"dim {group[0]} {group[1]} {group[2]}".strip()
            ax.plot([r["samples"] for r in line], [r[key] for r in line], "o-", color=f"C{i}", label=name)
            old = [r for r in (baseline or {}).get(mode, [])
                   if (r["dim"], r["keys_dist"], r.get("protocol", "")) == group and key in r]
            if old:
                ax.plot([r["samples"] for r in old], [r[key] for r in old], "x:", color=f"C{i}",
                        label=f"{name}: baseline")
            if mode == "inprocess":
                ax.plot([r["samples"] for r in line], [r["lookup_vs_takes"] for r in line], "s--", color=f"C{i}",
                        label=f"{name}: lookup / per-table takes")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set(xscale="log", yscale="log", xlabel="samples per request", ylabel=f"{label} (time ratio)", title=mode)
        sizes = sorted({r["samples"] for r in rows})
        ax.set_xticks(sizes, [f"{s:,}" for s in sizes], minor=False)
        ax.set_xticks([], minor=True)
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def describe_device(device: Device) -> dict[str, Any]:
    try:
        return device.describe()
    except Exception as exc:  # noqa: BLE001 - a description, not a measurement
        return {"device": device.name, "error": str(exc)}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["all", "inprocess", "tables", "served"], nargs="+", default=["all"])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="where inprocess/tables answers and the gather ceiling live (gpu: GPU 0, CuPy; "
                        "implies --cache gpu)")
    p.add_argument("--cache", choices=["none", "cpu", "gpu"], default=None,
                   help="embedding cache in the session: none (hash map only; the cpu default), cpu (the "
                        "CPU twin, CpuDynamicCache) or gpu (GpuDynamicCache; the gpu default)")
    p.add_argument("--cache-headroom", type=int, default=4,
                   help="cache capacity per table in multiples of its rows (4: every row stays resident)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="GPU: skip the CUDA profiler's cross-check of the launch and sync counts (made at the "
                        "largest size of each mode otherwise; needs torch)")
    p.add_argument("--request-sets", type=int, default=None,
                   help="requests drawn per size, cycled through by every candidate (default 3; quick 2)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (small tables, few sizes, short timing)")
    p.add_argument("--tables", type=int, default=26, help="tables per request (default 26)")
    p.add_argument("--rows", type=int, default=None, help="rows per table (default 50,000; quick 2,000)")
    p.add_argument("--dims", type=int, nargs="+", default=[16, 128])
    p.add_argument("--baseline", type=Path, default=None,
                   help="an earlier run's results.json: its ratios are drawn dotted beside this run's")
    p.add_argument("--samples", type=int, nargs="+", default=None,
                   help="inprocess samples per request (default 32 128 512 1024 4096 16384)")
    p.add_argument("--tables-samples", type=int, nargs="+", default=None,
                   help="tables mode samples per request (default 128 1024 8192)")
    p.add_argument("--served-samples", type=int, nargs="+", default=None, help="served samples (default 32 1024)")
    p.add_argument("--served-dims", type=int, nargs="+", default=None, help="served dims (default --dims)")
    p.add_argument("--protocols", nargs="+", choices=["grpc", "http"], default=["grpc"])
    p.add_argument("--requests", type=int, default=None, help="timed requests per served model and size (200)")
    p.add_argument("--warmup", type=int, default=10, help="untimed requests per served model and size")
    p.add_argument("--keys", nargs="+", choices=["powerlaw", "uniform"], default=["powerlaw"],
                   help="key distributions (served uses the first)")
    p.add_argument("--alpha", type=float, default=1.2, help="power-law exponent (hps_demo's default)")
    p.add_argument("--num-partitions", type=int, default=min(16, os.cpu_count() or 1), help="hash-map partitions")
    p.add_argument("--min-seconds", type=float, default=None, help="timed seconds per candidate (0.3; quick 0.02)")
    p.add_argument("--min-reps", type=int, default=None, help="repetitions per candidate (20; quick 5)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="cap on one size's interleaved rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "work" / "bench_lookup")
    args = p.parse_args(None if argv is None else [str(a) for a in argv])
    q = args.quick

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if q else full)

    args.rows = pick(args.rows, 50_000, 2_000)
    args.samples = pick(args.samples, [32, 128, 512, 1024, 4096, 16384], [32, 512])
    args.tables_samples = pick(args.tables_samples, [128, 1024, 8192], [32, 512])
    args.served_samples = pick(args.served_samples, [32, 1024], [32, 256])
    args.served_dims = pick(args.served_dims, args.dims, args.dims[:1])
    args.requests = pick(args.requests, 200, 20)
    args.min_seconds = pick(args.min_seconds, 0.3, 0.02)
    args.min_reps = pick(args.min_reps, 20, 5)
    args.request_sets = max(1, pick(args.request_sets, 3, 2))
    if args.cache is None:
        args.cache = "gpu" if args.device == "gpu" else "none"
    if (args.device == "gpu") != (args.cache == "gpu"):
        p.error(f"--cache {args.cache} does not go with --device {args.device}: the GPU cache answers on the "
                "GPU, the CPU twin and the hash map on the host")
    if q:
        args.warmup = min(args.warmup, 3)
    args.modes = ["inprocess", "tables", "served"] if "all" in args.mode else args.mode
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The serving process does this (backend/hps/model.py): freed buffers stay mapped, so a
    # request's allocations do not fault pages in (hps_core/arrays.py). The gather ceiling
    # allocates nothing, so this only removes a cost the server does not pay either.
    retain_freed_memory()
    command = command_line("scripts/bench_lookup.py", argv)
    info = machine()
    device = Device(args.device)
    info.update(describe_device(device))
    print(f"machine: {info['cpu']}, {info['cpus']} CPUs, {info['platform']}, numpy {info['numpy']}"
          + (f"; {info.get('gpu')}, CuPy {info.get('cupy')}" if device.gpu else ""))
    print(f"command: {command}")
    print(f"modes {args.modes}: {args.tables} tables x {args.rows:,} rows, dims {args.dims} (served "
          f"{args.served_dims}), keys {args.keys} (alpha {args.alpha}); device {args.device}, cache {args.cache}"
          + (f" ({args.cache_headroom}x rows, warmed with every row)" if args.cache != "none" else "")
          + f"; timing: interleaved over {args.request_sets} request sets per size, medians over "
          f">= {args.min_reps} reps and >= {args.min_seconds} s per candidate"
          + (", device synchronised before the clock stops" if device.gpu else "")
          + f"; served: {args.requests} requests per model and size", flush=True)
    rng = np.random.default_rng(args.seed)
    results: dict[str, list[Row]] = {mode: [] for mode in args.modes}
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": info, "command": command, "args": {k: str(v) for k, v in vars(args).items()}}

    def save(partial: bool) -> None:
        """results.json, rewritten after every row: a run stopped half-way keeps what it measured."""
        (args.out / "results.json").write_text(json.dumps({"meta": {**meta, "partial": partial}, **results}, indent=1))

    def recorder(mode: str) -> Callable[[Row], None]:
        def record(row: Row) -> None:
            results[mode].append(row)
            save(partial=True)

        return record

    errors: list[Row] = []

    def attempt(mode: str, dim: int, run: Callable[[], Any]) -> None:
        """Run one mode at one dim; a failure (a wrong answer, an exception from the device) is
        printed and recorded, and the other modes still run (one GPU session, many questions)."""
        try:
            run()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            errors.append({"mode": mode, "dim": dim, "error": f"{type(exc).__name__}: {exc}"})
            results["errors"] = errors
            save(partial=True)
            print(f"  {mode} dim {dim} FAILED: {type(exc).__name__}: {exc}", flush=True)

    for dim in args.dims:
        if not {"inprocess", "tables"} & set(args.modes):
            break
        tables = make_tables(args.tables, args.rows, dim, args.seed)
        if "inprocess" in args.modes:
            attempt("inprocess", dim, lambda: bench_inprocess(args, tables, rng, device, recorder("inprocess")))
        if "tables" in args.modes:
            attempt("tables", dim, lambda: bench_tables(args, tables, rng, device, recorder("tables")))
        del tables
    if "served" in args.modes:
        served_tables = {dim: make_tables(args.tables, args.rows, dim, args.seed) for dim in args.served_dims}
        results["served"] = bench_served(args, served_tables, rng)
    print()
    print(report(results, args.tables))
    save(partial=False)
    wrote = [str(args.out / "results.json")]
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    if plot(results, args.out / "bench_lookup.png", baseline):
        wrote.append(str(args.out / "bench_lookup.png"))
    print(f"\nwrote {' and '.join(wrote)}")
    if errors:
        print(f"{len(errors)} mode(s) FAILED: " + "; ".join(f"{e['mode']} dim {e['dim']}: {e['error']}" for e in errors))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
