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
           buffers ``out`` and the gather is about 2x slower, no ceiling. The lookup's answer
           is checked equal to the gather's once per size, so both sides do the same work.
tables     the same keys as 26 tables x B samples and as 1 table (26*rows rows) x 26B keys:
           ratio 26-table time / 1-table time (what a request pays per table it spans).
served     the real Triton (``hps_core.serving.TritonServer``) on a temporary repository with
           an ``hps`` model (HugeCTR I/O, KIND_CPU, hash map with initial_cache_rate 1.0,
           persistent tier disabled) and ``zeros``, a Python-backend model with the same I/O
           that answers zeros of the right size (the floor of a Python backend). Client-side
           p50/p99 of sequential requests (tritonclient gRPC, optionally HTTP), the two
           models interleaved; ratio hps p50 / zeros p50.

Keys follow a finite power law (``P(rank k) ~ k**-alpha``, hot rows scattered over the table,
as hps_demo/data.py draws them) or a uniform draw (``--keys powerlaw uniform``).

    .venv/bin/python scripts/bench_lookup.py                        # all modes, a few minutes on 2 cores
    .venv/bin/python scripts/bench_lookup.py --mode inprocess --keys powerlaw uniform
    .venv/bin/python scripts/bench_lookup.py --quick --out /tmp/bl  # tiny smoke run, seconds

Prints the machine, the command line and one markdown table per mode; ``--out DIR`` (default
``work/bench_lookup``) gets ``results.json`` and ``bench_lookup.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hps_core.config import ModelConfig, parse_config  # noqa: E402
from hps_core.db import HashMapVolatileDB  # noqa: E402
from hps_core.formats import write_sparse_model  # noqa: E402
from hps_core.lookup import LookupSession  # noqa: E402
from hps_demo.data import make_key_map, power_law_ranks  # noqa: E402

Row = dict[str, Any]
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


# --------------------------------------------------------------------------- data


@dataclass
class Tables:
    """``n`` tables of ``rows`` rows each, held twice: in a hash map and as one dense array.

    key_maps: (n, rows) int64, row -> key of each table (opaque ids, distinct across tables)
    dense:    (n * rows, dim) float32, row r of table t at ``t * rows + r``
    """

    key_maps: np.ndarray
    dense: np.ndarray

    @property
    def n(self) -> int:
        return int(self.key_maps.shape[0])

    @property
    def rows(self) -> int:
        return int(self.key_maps.shape[1])

    @property
    def dim(self) -> int:
        return int(self.dense.shape[1])


def make_tables(n: int, rows: int, dim: int, seed: int) -> Tables:
    rng = np.random.default_rng(seed)
    key_maps = np.stack([make_key_map(rows, t, seed) for t in range(n)])
    if np.unique(key_maps).size != key_maps.size:  # one-table mode puts all keys in one table
        raise RuntimeError("key collision between tables; pick another --seed")
    return Tables(key_maps, rng.standard_normal((n * rows, dim), dtype=np.float32))


def draw_rows(rng: np.random.Generator, tables: Tables, samples: int, dist: str, alpha: float) -> np.ndarray:
    """(n, samples) int64 row of each table's key per sample: power law with hot rows
    scattered by a per-table permutation, or uniform."""
    out = np.empty((tables.n, samples), dtype=np.int64)
    for t in range(tables.n):
        if dist == "uniform":
            out[t] = rng.integers(0, tables.rows, samples)
        else:
            out[t] = rng.permutation(tables.rows)[power_law_ranks(rng, tables.rows, samples, alpha)]
    return out


@dataclass(frozen=True)
class Request:
    """One HugeCTR request and where its rows sit in the dense array."""

    keys: np.ndarray  # (n * samples,) int64, table-major
    numkeys: np.ndarray  # (n,) int32
    dense_index: np.ndarray  # (n * samples,) int64 rows of Tables.dense, same order
    per_table: list[np.ndarray]  # n arrays (samples,) int64: rows within each table


def make_request(tables: Tables, rows: np.ndarray) -> Request:
    n, samples = rows.shape
    keys = np.take_along_axis(tables.key_maps, rows, axis=1).ravel()
    dense_index = (rows + (np.arange(n, dtype=np.int64) * tables.rows)[:, None]).ravel()
    return Request(keys, np.full(n, samples, dtype=np.int32), dense_index, list(rows))


def model_config(name: str, n_tables: int, dim: int, max_batch: int, keys_per_sample: int = 1) -> ModelConfig:
    config = parse_config({"models": [{
        "model": name,
        "sparse_files": [f"unused/{name}/t{i}" for i in range(n_tables)],
        "embedding_table_names": [f"t{i}" for i in range(n_tables)],
        "embedding_vecsize_per_table": [dim] * n_tables,
        "default_value_for_each_table": [0.0] * n_tables,
        "maxnum_catfeature_query_per_table_per_sample": [keys_per_sample] * n_tables,
        "max_batch_size": max_batch,
    }]}, "bench_lookup")
    return config.model(name)


def load_hash_map(db: HashMapVolatileDB, model: ModelConfig, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
    """Insert ``keys[i]`` (rows,) / ``values[i]`` (rows, dim) into table i of ``model``."""
    for table, k, v in zip(model.tables, keys, values):
        db.create_table(table.qualified_name, table.dim)
        for s in range(0, k.size, LOAD_CHUNK):
            db.insert(table.qualified_name, k[s : s + LOAD_CHUNK], v[s : s + LOAD_CHUNK])


@contextmanager
def session_over(model: ModelConfig, keys: list[np.ndarray], values: list[np.ndarray],
                 partitions: int) -> Iterator[LookupSession]:
    """A LookupSession over a hash map holding every row (persistent tier disabled)."""
    db = HashMapVolatileDB(num_partitions=partitions)
    load_hash_map(db, model, keys, values)
    session = LookupSession(model, volatile=db, persistent=None)
    try:
        yield session
    finally:
        session.close()
        db.close()


# --------------------------------------------------------------------------- timing


def interleaved(candidates: dict[str, Callable[[], Any]], min_seconds: float, min_reps: int,
                max_seconds: float) -> dict[str, Row]:
    """Median seconds of each candidate, run in rounds A, B, C, A, B, C, ... after one warm-up
    each, until every candidate has ``min_reps`` samples and ``min_seconds`` of timed work (or
    the rounds took ``max_seconds`` and every candidate has at least 3 samples)."""
    for fn in candidates.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    started = time.perf_counter()
    while True:
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        reps = len(samples[next(iter(samples))])
        enough = reps >= min_reps and all(sum(s) >= min_seconds for s in samples.values())
        if enough or (reps >= 3 and time.perf_counter() - started >= max_seconds):
            break
    return {name: {"median_s": float(np.median(s)), "reps": len(s)} for name, s in samples.items()}


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "requests": int(ms.size)}


# --------------------------------------------------------------------------- inprocess


def bench_inprocess(args: argparse.Namespace, tables: Tables, rng: np.random.Generator) -> list[Row]:
    model = model_config("bench26", tables.n, tables.dim, max(args.samples))
    slices = [tables.dense[t * tables.rows : (t + 1) * tables.rows] for t in range(tables.n)]
    results = []
    with session_over(model, list(tables.key_maps), slices, args.num_partitions) as session:
        for dist in args.keys:
            for samples in args.samples:
                req = make_request(tables, draw_rows(rng, tables, samples, dist, args.alpha))
                out = np.empty((req.keys.size, tables.dim), dtype=np.float32)
                outs = [out[t * samples : (t + 1) * samples] for t in range(tables.n)]

                def lookup() -> Any:
                    return session.lookup(req.keys, req.numkeys)

                def gather() -> None:
                    np.take(tables.dense, req.dense_index, axis=0, out=out, mode="clip")

                def takes() -> None:
                    for t in range(tables.n):
                        np.take(slices[t], req.per_table[t], axis=0, out=outs[t], mode="clip")

                gather()
                checked = bool(np.array_equal(np.asarray(lookup()), out.ravel()))
                assert checked, f"lookup and gather disagree (dim {tables.dim}, {samples} samples, {dist})"
                got = interleaved({"lookup": lookup, "gather": gather, "takes": takes},
                                  args.min_seconds, args.min_reps, args.max_seconds)
                row = {"keys_dist": dist, "dim": tables.dim, "samples": samples, "keys": int(req.keys.size),
                       "unique_keys": int(np.unique(req.keys).size), "checked_equal": checked,
                       "lookup_ms": got["lookup"]["median_s"] * 1e3, "gather_ms": got["gather"]["median_s"] * 1e3,
                       "takes_ms": got["takes"]["median_s"] * 1e3, "reps": got["lookup"]["reps"]}
                row["lookup_vs_gather"] = row["lookup_ms"] / row["gather_ms"]
                row["lookup_vs_takes"] = row["lookup_ms"] / row["takes_ms"]
                results.append(row)
                print(f"  inprocess {dist:8s} dim {tables.dim:4d} samples {samples:6d}: "
                      f"lookup/gather {row['lookup_vs_gather']:7.2f}x  lookup/{tables.n} takes "
                      f"{row['lookup_vs_takes']:6.2f}x  ({row['reps']} reps)", flush=True)
    return results


# --------------------------------------------------------------------------- tables


def bench_tables(args: argparse.Namespace, tables: Tables, rng: np.random.Generator) -> list[Row]:
    """The same keys as ``n`` tables x B samples and as 1 table x nB keys, each in its own session."""
    n, max_b = tables.n, max(args.tables_samples)
    many = model_config("bench_many", n, tables.dim, max_b)
    one = model_config("bench_one", 1, tables.dim, max_b, keys_per_sample=n)
    slices = [tables.dense[t * tables.rows : (t + 1) * tables.rows] for t in range(n)]
    results = []
    with session_over(many, list(tables.key_maps), slices, args.num_partitions) as s_many, \
            session_over(one, [tables.key_maps.ravel()], [tables.dense], args.num_partitions) as s_one:
        for dist in args.keys:
            for samples in args.tables_samples:
                req = make_request(tables, draw_rows(rng, tables, samples, dist, args.alpha))
                one_numkeys = np.array([req.keys.size], dtype=np.int32)

                def lookup_many() -> Any:
                    return s_many.lookup(req.keys, req.numkeys)

                def lookup_one() -> Any:
                    return s_one.lookup(req.keys, one_numkeys)

                expected = tables.dense[req.dense_index].ravel()
                checked = bool(np.array_equal(np.asarray(lookup_many()), expected)
                               and np.array_equal(np.asarray(lookup_one()), expected))
                assert checked, f"{n}-table and 1-table lookups disagree (dim {tables.dim}, {samples} samples)"
                got = interleaved({"many": lookup_many, "one": lookup_one},
                                  args.min_seconds, args.min_reps, args.max_seconds)
                row = {"keys_dist": dist, "dim": tables.dim, "samples": samples, "keys": int(req.keys.size),
                       "tables": n, "checked_equal": checked, "many_tables_ms": got["many"]["median_s"] * 1e3,
                       "one_table_ms": got["one"]["median_s"] * 1e3, "reps": got["many"]["reps"]}
                row["many_vs_one"] = row["many_tables_ms"] / row["one_table_ms"]
                results.append(row)
                print(f"  tables    {dist:8s} dim {tables.dim:4d} samples {samples:6d}: "
                      f"{n} tables / 1 table {row['many_vs_one']:6.2f}x  ({row['reps']} reps)", flush=True)
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


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def report(results: dict[str, list[Row]], n_tables: int) -> str:
    parts = []
    if results.get("inprocess"):
        parts.append(f"### inprocess: LookupSession.lookup vs one np.take (gather) and {n_tables} np.take\n\n" + markdown(
            ["keys dist", "dim", "samples", "keys", "lookup ms", "gather ms", f"{n_tables} takes ms",
             "lookup/gather", f"lookup/{n_tables} takes"],
            [[r["keys_dist"], str(r["dim"]), f"{r['samples']:,}", f"{r['keys']:,}", f"{r['lookup_ms']:.3f}",
              f"{r['gather_ms']:.3f}", f"{r['takes_ms']:.3f}", f"**{r['lookup_vs_gather']:.2f}**",
              f"{r['lookup_vs_takes']:.2f}"] for r in results["inprocess"]]))
    if results.get("tables"):
        parts.append(f"### tables: {n_tables} tables x B samples vs 1 table x {n_tables}B keys (same keys)\n\n" + markdown(
            ["keys dist", "dim", "samples", "keys", f"{n_tables} tables ms", "1 table ms", f"{n_tables} tables / 1 table"],
            [[r["keys_dist"], str(r["dim"]), f"{r['samples']:,}", f"{r['keys']:,}", f"{r['many_tables_ms']:.3f}",
              f"{r['one_table_ms']:.3f}", f"**{r['many_vs_one']:.2f}**"] for r in results["tables"]]))
    if results.get("served"):
        parts.append("### served: Triton, client-side latency of sequential requests, hps vs zeros\n\n" + markdown(
            ["protocol", "dim", "samples", "keys", "hps p50 ms", "zeros p50 ms", "hps p99 ms", "zeros p99 ms",
             "hps/zeros p50", "hps/zeros p99"],
            [[r["protocol"], str(r["dim"]), f"{r['samples']:,}", f"{r['keys']:,}", f"{r['hps']['p50_ms']:.2f}",
              f"{r['zeros']['p50_ms']:.2f}", f"{r['hps']['p99_ms']:.2f}", f"{r['zeros']['p99_ms']:.2f}",
              f"**{r['hps_vs_zeros_p50']:.2f}**", f"{r['hps_vs_zeros_p99']:.2f}"] for r in results["served"]]))
    return "\n\n".join(parts)


def plot(results: dict[str, list[Row]], path: Path) -> bool:
    """Ratio vs samples, one line per dim (and key distribution); False without matplotlib."""
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


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name")) or cpu
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu or "unknown", "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["all", "inprocess", "tables", "served"], nargs="+", default=["all"])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (small tables, few sizes, short timing)")
    p.add_argument("--tables", type=int, default=26, help="tables per request (default 26)")
    p.add_argument("--rows", type=int, default=None, help="rows per table (default 50,000; quick 2,000)")
    p.add_argument("--dims", type=int, nargs="+", default=[16, 128])
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
    if q:
        args.warmup = min(args.warmup, 3)
    args.modes = ["inprocess", "tables", "served"] if "all" in args.mode else args.mode
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    words = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = " ".join(["scripts/bench_lookup.py", *map(shlex.quote, words)])
    info = machine()
    print(f"machine: {info['cpu']}, {info['cpus']} CPUs, {info['platform']}, numpy {info['numpy']}")
    print(f"command: {command}")
    print(f"modes {args.modes}: {args.tables} tables x {args.rows:,} rows, dims {args.dims} (served "
          f"{args.served_dims}), keys {args.keys} (alpha {args.alpha}); timing: interleaved, medians over "
          f">= {args.min_reps} reps and >= {args.min_seconds} s per candidate; served: {args.requests} "
          f"requests per model and size", flush=True)
    rng = np.random.default_rng(args.seed)
    results: dict[str, list[Row]] = {mode: [] for mode in args.modes}
    for dim in args.dims:
        if not {"inprocess", "tables"} & set(args.modes):
            break
        tables = make_tables(args.tables, args.rows, dim, args.seed)
        if "inprocess" in args.modes:
            results["inprocess"] += bench_inprocess(args, tables, rng)
        if "tables" in args.modes:
            results["tables"] += bench_tables(args, tables, rng)
        del tables
    if "served" in args.modes:
        served_tables = {dim: make_tables(args.tables, args.rows, dim, args.seed) for dim in args.served_dims}
        results["served"] = bench_served(args, served_tables, rng)
    print()
    print(report(results, args.tables))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": info, "command": command, "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    wrote = [str(args.out / "results.json")]
    if plot(results, args.out / "bench_lookup.png"):
        wrote.append(str(args.out / "bench_lookup.png"))
    print(f"\nwrote {' and '.join(wrote)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
