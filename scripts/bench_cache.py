#!/usr/bin/env python3
"""Benchmark the embedding caches; every figure sits next to its baseline from the same run.

(a) all-hit query throughput of the dynamic and static caches next to a plain gather of the
    same number of rows -> ratio. GPU: a RawKernel gather with float4 loads. CPU: a numba
    row-copy loop (the ceiling: same compiler, no hashing); numpy.take is reported beside it,
    and on this machine it is slower than the numba loop (its ``out=`` path is buffered).
    Each kind is measured twice: a one-table cache (``make_cache``, ``query``) and the
    multi-table structure a model's tables share (``make_multi_table_cache`` with ``--tables``
    tables holding the same rows between them, one ``query_tables`` call over keys of every
    table, flat output) -- the same total keys; the multi-table answers are checked against
    the rows once per size;
(b) replace throughput (new keys into a cache with room);
(c) serving power-law traces (alpha 1.2 and 0.99) with the cache at 20% of the rows, the
    way LookupSession does (query a de-duplicated batch, insert its misses): hit rate and
    keys/s for dynamic LRU, dynamic LFU, and a static table pre-loaded with the hottest
    20% (an oracle warm start: static tables never admit later keys);
(d) with --device gpu, the CPU twin on the same traces (with --device cpu, (c) is the twin).

Writes ``results.json`` and ``bench_cache.png`` into ``--out`` and prints the tables.

    python scripts/bench_cache.py --device cpu                     # a minute or two, 2 cores
    python scripts/bench_cache.py --device cpu --quick             # seconds: dim 128, small traces
    python scripts/bench_cache.py --device gpu --max-batch 1048576 # the issue's full sweep
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when not installed

from hps_core.cache import make_cache, make_multi_table_cache  # noqa: E402
from hps_demo.bench.tables import GATHER_CU  # noqa: E402

BATCHES = [1024, 4096, 16384, 65536, 262144, 1048576]


# --------------------------------------------------------------------------- timing


@njit(nogil=True, cache=True)
def _cpu_gather(table: Any, rows: Any, out: Any) -> None:
    """Plain gather, the CPU ceiling: out[i] = table[rows[i]]."""
    for i in range(rows.shape[0]):
        r = rows[i]
        for d in range(table.shape[1]):
            out[i, d] = table[r, d]


class Backend:
    """Array module, device and a timer for one device kind."""

    def __init__(self, device: str) -> None:
        self.name = device
        self.xp: Any
        self.device: str | int
        if device == "gpu":
            import cupy

            self.xp, self.device = cupy, 0
            self._gather = cupy.RawKernel(GATHER_CU.read_text(), "gather")  # the device gather ceiling
        else:
            self.xp, self.device = np, "cpu"

    def time(self, fn: Callable[[], Any], repeat: int) -> float:
        """Median seconds of ``fn`` over ``repeat`` runs after one warm-up."""
        fn()
        samples = []
        for _ in range(repeat):
            if self.name == "gpu":
                start, end = self.xp.cuda.Event(), self.xp.cuda.Event()
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(self.xp.cuda.get_elapsed_time(start, end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        return float(np.median(samples))

    def gather(self, table: Any, rows: Any, out: Any) -> None:
        if self.name == "gpu":
            n, dim = rows.shape[0], table.shape[1]
            blocks = min(-(-n // 8), 65535)
            self._gather((blocks,), (256,), (table, rows, out, np.int64(n), np.int32(dim)))
        else:
            _cpu_gather(table, rows, out)


def repeats(batch: int, device: str) -> int:
    return 20 if device == "gpu" else max(5, min(50, 2_000_000 // batch))


# --------------------------------------------------------------------------- (a) + (b)


def bench_query_and_replace(be: Backend, dims: list[int], batches: list[int], rng: np.random.Generator,
                            tables: int = 26, results: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """(a) and (b); rows are appended to ``results`` (a new list by default) as they are measured."""
    xp = be.xp
    results = [] if results is None else results
    capacity = max(4 * max(batches), 65536)
    kinds = ("dynamic", "static")
    for dim in dims:
        caches = {kind: make_cache(kind, device=be.device, capacity=capacity, dim=dim) for kind in kinds}
        # the same capacity shared by `tables` tables: one structure, one query_tables call
        multis = {kind: make_multi_table_cache(kind, device=be.device, capacities=[-(-capacity // tables)] * tables,
                                               dims=[dim] * tables) for kind in kinds}
        keys = (rng.choice(2**40, int(capacity * 0.75), replace=False)).astype(np.int64)
        vals = rng.standard_normal((len(keys), dim)).astype(np.float32)
        for cache in caches.values():
            cache.replace(xp.asarray(keys), xp.asarray(vals))
        table_of = (np.arange(len(keys)) % tables).astype(np.int64)  # key i lives in table i % tables
        for multi in multis.values():
            multi.replace_tables(xp.asarray(table_of), xp.asarray(keys), xp.asarray(vals.reshape(-1)),
                                 xp.asarray(np.arange(len(keys), dtype=np.int64) * dim))
        held = {kind: c.dump(0, c.num_sets) for kind, c in caches.items()}  # what stayed in
        held_multi = {kind: m.dump_sets(0, m.total_sets) for kind, m in multis.items()}  # (table ids, keys)
        order = np.argsort(keys)
        table = xp.asarray(vals)
        for batch in batches:
            row: dict[str, Any] = {"dim": dim, "batch": batch, "tables": tables}
            rows = xp.asarray(rng.integers(0, len(keys), batch).astype(np.int64))
            out = xp.empty((batch, dim), np.float32)
            t_gather = be.time(lambda: be.gather(table, rows, out), repeats(batch, be.name))
            row["gather_rows_per_s"] = batch / t_gather
            if be.name == "cpu":
                t_take = be.time(lambda: np.take(table, rows, axis=0, out=out), repeats(batch, be.name))
                row["numpy_take_rows_per_s"] = batch / t_take
            for kind, cache in caches.items():
                q = held[kind][xp.asarray(rng.integers(0, len(held[kind]), batch))]
                t = be.time(lambda: cache.query(q, out), repeats(batch, be.name))
                row[f"{kind}_query_keys_per_s"] = batch / t
                row[f"{kind}_query_vs_gather"] = t_gather / t
            flat = out.reshape(-1)
            offsets = xp.arange(batch, dtype=np.int64) * dim
            for kind, multi in multis.items():
                ids_held, keys_held = held_multi[kind]
                pick = xp.asarray(rng.integers(0, len(keys_held), batch))
                q_ids, q_keys = ids_held[pick], keys_held[pick]
                missing = multi.query_tables(q_ids, q_keys, flat, offsets)  # checked once per size
                host_keys = q_keys.get() if be.name == "gpu" else q_keys
                host_out = out.get() if be.name == "gpu" else out
                expected = vals[order[np.searchsorted(keys, host_keys, sorter=order)]]
                assert missing.shape[0] == 0, f"{kind} {tables}-table cache missed {missing.shape[0]} held keys"
                assert np.array_equal(host_out, expected), f"{kind} {tables}-table cache answered wrong rows"
                t = be.time(lambda: multi.query_tables(q_ids, q_keys, flat, offsets), repeats(batch, be.name))
                row[f"{kind}_multi_query_keys_per_s"] = batch / t
                row[f"{kind}_multi_query_vs_gather"] = t_gather / t
            fresh_cache = make_cache("dynamic", device=be.device, capacity=2 * batch, dim=dim)
            new_keys = xp.asarray(rng.choice(2**40, batch, replace=False).astype(np.int64))
            new_vals = xp.asarray(rng.standard_normal((batch, dim)).astype(np.float32))
            t_rep = be.time(lambda: fresh_cache.replace(new_keys, new_vals), repeats(batch, be.name))
            row["dynamic_replace_keys_per_s"] = batch / t_rep
            results.append(row)
            print(f"  dim {dim:4d} batch {batch:8d}: gather {row['gather_rows_per_s']/1e6:8.1f} M/s | "
                  f"dynamic {row['dynamic_query_keys_per_s']/1e6:7.1f} M/s ({row['dynamic_query_vs_gather']:.2f}x), "
                  f"{tables} tables {row['dynamic_multi_query_vs_gather']:.2f}x | "
                  f"static {row['static_query_keys_per_s']/1e6:7.1f} M/s ({row['static_query_vs_gather']:.2f}x), "
                  f"{tables} tables {row['static_multi_query_vs_gather']:.2f}x | "
                  f"replace {row['dynamic_replace_keys_per_s']/1e6:6.1f} M/s", flush=True)
    return results


def query_table(query: list[dict[str, Any]]) -> str:
    """(a) as a markdown table: throughput in M keys/s, ratios = query / gather throughput."""
    tables = query[0]["tables"] if query else 26
    header = ["dim", "batch", "gather", "dynamic", "ratio", f"dynamic x{tables}", "ratio", "static", "ratio",
              f"static x{tables}", "ratio", "replace"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for r in query:
        cells = [str(r["dim"]), f"{r['batch']:,}", f"{r['gather_rows_per_s'] / 1e6:.1f}"]
        for kind in ("dynamic", "static"):
            cells += [f"{r[f'{kind}_query_keys_per_s'] / 1e6:.1f}", f"{r[f'{kind}_query_vs_gather']:.2f}",
                      f"{r[f'{kind}_multi_query_keys_per_s'] / 1e6:.1f}", f"{r[f'{kind}_multi_query_vs_gather']:.2f}"]
        cells.append(f"{r['dynamic_replace_keys_per_s'] / 1e6:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- (c) + (d)


def power_law_trace(rng: np.random.Generator, rows: int, alpha: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(trace of ``n`` keys with P(rank r) ~ r**-alpha, keys by rank hottest first)."""
    p = 1.0 / np.arange(1, rows + 1) ** alpha
    draws = np.minimum(np.searchsorted(np.cumsum(p / p.sum()), rng.random(n)), rows - 1)
    by_rank = rng.permutation(rows).astype(np.int64) * 7919 + 13
    return by_rank[draws], by_rank


def serve_trace(be_device: str | int, xp: Any, kind: str, policy: str, trace: np.ndarray, by_rank: np.ndarray,
                capacity: int, dim: int, batch: int) -> dict[str, float]:
    """Query each de-duplicated batch, insert its misses (LookupSession's flow)."""
    cache = make_cache(kind, device=be_device, capacity=capacity, dim=dim, policy=policy)
    if kind == "static":  # oracle warm start: the hottest `capacity` keys, never changed after
        hot = by_rank[:capacity]
        cache.replace(xp.asarray(hot), xp.zeros((len(hot), dim), np.float32))
    hits = total = 0
    t0 = time.perf_counter()
    for start in range(0, len(trace), batch):
        keys = xp.unique(xp.asarray(trace[start : start + batch]))
        out = xp.empty((keys.shape[0], dim), np.float32)
        missing, _ = cache.query(keys, out)
        hits += keys.shape[0] - missing.shape[0]
        total += keys.shape[0]
        if kind == "dynamic" and missing.shape[0]:
            cache.replace(missing, xp.zeros((missing.shape[0], dim), np.float32))
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
    seconds = time.perf_counter() - t0
    return {"hit_rate": hits / total, "keys_per_s": total / seconds}


def bench_traces(be: Backend, args: argparse.Namespace, rng: np.random.Generator) -> list[dict[str, Any]]:
    results = []
    targets: list[tuple[str, str | int, Any]] = [(be.name, be.device, be.xp)]
    if be.name == "gpu":
        targets.append(("cpu", "cpu", np))  # (d): the CPU twin on the same traces
    for alpha in (1.2, 0.99):
        trace, by_rank = power_law_trace(rng, args.trace_rows, alpha, args.trace_len)
        capacity = args.trace_rows // 5
        for device_name, device, xp in targets:
            for kind, policy in (("dynamic", "lru"), ("dynamic", "lfu"), ("static", "lru")):
                r = serve_trace(device, xp, kind, policy, trace, by_rank, capacity, args.trace_dim, args.trace_batch)
                label = f"{kind}-{policy}" if kind == "dynamic" else "static-hottest"
                results.append({"alpha": alpha, "device": device_name, "cache": label, **r})
                print(f"  alpha {alpha:4.2f} {device_name:3s} {label:15s} hit rate {r['hit_rate']:.4f} "
                      f"{r['keys_per_s']/1e6:7.2f} M keys/s", flush=True)
    return results


# --------------------------------------------------------------------------- output


def plot(query: list[dict[str, Any]], traces: list[dict[str, Any]], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for dim in sorted({r["dim"] for r in query}):
        rows = [r for r in query if r["dim"] == dim]
        b = [r["batch"] for r in rows]
        ax1.plot(b, [r["dynamic_query_vs_gather"] for r in rows], "o-", label=f"dynamic dim {dim}")
        ax1.plot(b, [r["static_query_vs_gather"] for r in rows], "s--", label=f"static dim {dim}")
        if rows and "dynamic_multi_query_vs_gather" in rows[0]:
            t = rows[0]["tables"]
            ax1.plot(b, [r["dynamic_multi_query_vs_gather"] for r in rows], "^:", label=f"dynamic x{t} tables dim {dim}")
            ax1.plot(b, [r["static_multi_query_vs_gather"] for r in rows], "v:", label=f"static x{t} tables dim {dim}")
    ax1.set(xscale="log", xlabel="batch (keys)", ylabel="query / plain gather throughput",
            title=f"(a) all-hit query vs gather ({device})")
    ax1.axhline(1.0, color="grey", lw=0.5)
    ax1.legend(fontsize=7)
    labels = sorted({(r["device"], r["cache"]) for r in traces})
    alphas = sorted({r["alpha"] for r in traces})
    width = 0.8 / len(labels)
    for j, (dev, cache) in enumerate(labels):
        hr = [next(r["hit_rate"] for r in traces if r["alpha"] == a and r["device"] == dev and r["cache"] == cache)
              for a in alphas]
        ax2.bar(np.arange(len(alphas)) + j * width, hr, width, label=f"{dev} {cache}")
    ax2.set_xticks(np.arange(len(alphas)) + 0.4 - width / 2, [f"alpha {a}" for a in alphas])
    ax2.set(ylabel="hit rate", title="(c) power-law traces, cache = 20% of rows")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--max-batch", type=int, default=None,
                        help="largest batch of (a)/(b) (default: 65536 on cpu, 1048576 on gpu)")
    parser.add_argument("--trace-rows", type=int, default=None, help="rows of the trace table (cpu 200k, gpu 10M)")
    parser.add_argument("--trace-len", type=int, default=None, help="keys in each trace (cpu 2M, gpu 50M)")
    parser.add_argument("--trace-batch", type=int, default=16384)
    parser.add_argument("--trace-dim", type=int, default=64)
    parser.add_argument("--tables", type=int, default=26,
                        help="tables of the multi-table structure measured beside the one-table cache in (a)")
    parser.add_argument("--quick", action="store_true",
                        help="seconds: dims 128, batches to 4,096, 20k-row traces of 200k keys (unless given)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("work/bench_cache"))
    args = parser.parse_args(argv)
    gpu = args.device == "gpu"
    if args.quick:
        args.dims = [128] if args.dims == parser.get_default("dims") else args.dims
        args.max_batch = args.max_batch or 4096
        args.trace_rows = args.trace_rows or 20_000
        args.trace_len = args.trace_len or 200_000
        args.trace_batch = min(args.trace_batch, 4096)
    args.max_batch = args.max_batch or (1048576 if gpu else 65536)
    args.trace_rows = args.trace_rows or (10_000_000 if gpu else 200_000)
    args.trace_len = args.trace_len or (50_000_000 if gpu else 2_000_000)
    batches = [b for b in BATCHES if b <= args.max_batch]
    rng = np.random.default_rng(args.seed)
    be = Backend(args.device)
    print(f"(a)+(b) query and replace on {args.device}, batches {batches}; one-table caches and "
          f"{args.tables}-table structures")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "host": platform.node(), "python": platform.python_version(),
            "args": {k: str(v) for k, v in vars(args).items()}}
    errors: list[str] = []
    query: list[dict[str, Any]] = []
    traces: list[dict[str, Any]] = []
    try:  # a failure in one part (a first run on a GPU, say) is reported and the other part runs
        query = bench_query_and_replace(be, args.dims, batches, rng, args.tables, query)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        errors.append(f"(a)+(b): {type(exc).__name__}: {exc}")
    # (a)+(b) kept even if (c) does not finish (a time limit, say)
    (args.out / "results.json").write_text(json.dumps({"meta": {**meta, "partial": True, "errors": errors},
                                                       "query": query, "traces": []}, indent=1))
    print(f"(c){'+(d)' if gpu else ''} traces: {args.trace_rows} rows, {args.trace_len} keys, cache 20%")
    try:
        traces = bench_traces(be, args, rng)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        errors.append(f"(c): {type(exc).__name__}: {exc}")
    (args.out / "results.json").write_text(json.dumps({"meta": {**meta, "errors": errors}, "query": query,
                                                       "traces": traces}, indent=1))
    try:
        plot(query, traces, args.out / "bench_cache.png", args.device)
    except Exception as exc:  # noqa: BLE001 - a missing part leaves its panel empty
        print(f"no plot: {type(exc).__name__}: {exc}")
    print(f"\n(a) all-hit query vs plain gather on {args.device} (M keys/s; ratio = query / gather throughput)\n")
    print(query_table(query))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'bench_cache.png'}")
    if errors:
        print("FAILED: " + "; ".join(errors))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
