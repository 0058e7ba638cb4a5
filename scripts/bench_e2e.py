#!/usr/bin/env python
"""End-to-end benchmark of the served model with perf_analyzer (see hps_demo/bench_e2e.py).

Usage::

    .venv/bin/python scripts/bench_e2e.py                      # CPU-sized default, report into docs/benchmarks.md
    .venv/bin/python scripts/bench_e2e.py --rows 1000000 --dim 128 --tables 26 --alpha 1.2 \\
        --batches 32,1024,16384,131072 --concurrency 1,2,4,8   # the issue's size (GPU machine)
    .venv/bin/python scripts/bench_e2e.py --smoke               # CI: tiny, < 60 s, no docs

Writes ``<out>/bench_e2e.json`` and ``<out>/plots/*.png`` (default ``work/bench_e2e/``) and, unless
``--smoke`` or ``--no-docs``, the generated section of ``docs/benchmarks.md`` (plots copied to
``docs/img/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hps_demo.bench.harness import command_line  # noqa: E402
from hps_demo.bench_e2e import BenchConfig, plot_results, run_benchmark, update_docs  # noqa: E402


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _words(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=d.rows, help="rows per table")
    p.add_argument("--dim", type=int, default=d.dim, help="embedding width")
    p.add_argument("--tables", type=int, default=d.tables)
    p.add_argument("--alpha", type=float, default=d.alpha, help="power-law exponent of key popularity")
    p.add_argument("--batches", type=_ints, default=d.batches, help="samples per request, comma-separated")
    p.add_argument("--concurrency", type=_ints, default=d.concurrency, help="concurrency levels, comma-separated")
    p.add_argument("--concurrency-batch", type=int, default=d.concurrency_batch, help="batch of the concurrency sweep")
    p.add_argument("--protocols", type=_words, default=d.protocols, help="http,grpc")
    p.add_argument("--models", type=_words, default=d.models, help="dlrm,hps_embedding")
    p.add_argument("--shared-memory", type=_words, default=d.shared_memory,
                   help="none,system (cuda is added on the GPU path)")
    p.add_argument("--gpucacheper", type=float, default=d.gpucacheper, help="GPU cache share of rows")
    p.add_argument("--initial-cache-rate", type=float, default=d.initial_cache_rate,
                   help="share of each table in the hash map")
    p.add_argument("--queue-delay-us", type=lambda t: None if t == "off" else int(t), default=d.queue_delay_us,
                   help="dynamic batching queue delay of hps_embedding and dlrm_dense in microseconds, "
                        "or 'off' to serve them without dynamic batching (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--smoke", action="store_true", help="tiny CI run: 2 batch sizes, concurrency 1..2, no docs")
    p.add_argument("--out", type=Path, default=None, help="work folder (default work/bench_e2e, smoke: work/bench_e2e_smoke)")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md", help="markdown file to update")
    p.add_argument("--no-docs", action="store_true", help="do not touch the docs")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> BenchConfig:
    if args.smoke:
        return BenchConfig.smoke_config()
    return dataclasses.replace(
        BenchConfig(), rows=args.rows, dim=args.dim, tables=args.tables, alpha=args.alpha, batches=args.batches,
        concurrency=args.concurrency, concurrency_batch=args.concurrency_batch, protocols=args.protocols,
        models=args.models, shared_memory=args.shared_memory, gpucacheper=args.gpucacheper,
        initial_cache_rate=args.initial_cache_rate, seed=args.seed, queue_delay_us=args.queue_delay_us)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_from(args)
    out = args.out or REPO / "work" / ("bench_e2e_smoke" if config.smoke else "bench_e2e")
    result = run_benchmark(config, out, command=command_line("scripts/bench_e2e.py", argv))
    (out / "bench_e2e.json").write_text(json.dumps(result, indent=2) + "\n")
    plots = plot_results(result, out / "plots")
    print(f"wrote {out / 'bench_e2e.json'} and {len(plots)} plots in {out / 'plots'} ({result['seconds']:.0f} s)")
    if not (config.smoke or args.no_docs):
        images = args.docs.parent / "img"
        images.mkdir(parents=True, exist_ok=True)
        copied = [Path(shutil.copy(p, images / f"bench_e2e_{p.name}")) for p in plots]
        update_docs(args.docs, result, copied)
        print(f"updated {args.docs}")
    errors = [r for p in result["paths"].values() if isinstance(p, list) for r in p if "error" in r or r.get("errors")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
