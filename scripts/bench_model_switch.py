#!/usr/bin/env python
"""A new model version switched in under load (issue 13's figures).

One real ``tritonserver`` (explicit model control, API token) serves version 1 of a DLRM with
the demo's 26 tables (``hps_demo.data.DEMO_ROWS_PER_TABLE`` rows each, about 0.9M rows, dim
16, the demo's dense network sizes; random rows, so no training is needed) on RocksDB and the
in-process hash map. ``--concurrency`` client threads send ensemble requests over HTTP without
pause; after ``--before`` seconds ``hps publish-model``'s :func:`~hps_core.publishing.publish_model`
publishes version 2 (other rows, other dense weights), the load runs ``--after`` seconds more, and
so on for ``--publishes`` versions (the first publication after a server's start is slower:
Triton re-creates the versions it loaded at start on the first explicit load of each model).

Reported: failed requests; answers matching neither version's expected scores, or matching a
mix (one version's rows through the other's dense network: hps_demo/versions.py); p50/p99
latency before the publication, during the switch (the new version loading, the ensemble
switch and the old version's unload) and during the whole publication (the bulk load
included), with their ratios to before; the time from the command to the new version serving,
per phase, and the bulk load's share of it.

Usage::

    .venv/bin/python scripts/bench_model_switch.py            # the demo's 26 tables
    .venv/bin/python scripts/bench_model_switch.py --smoke    # tiny tables, a few seconds per window

Writes ``<out>/bench_model_switch_<time>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hps_core.model_control import ModelControl  # noqa: E402
from hps_core.publishing import PHASES, TO_SERVING, PublishReport, PublishTarget, publish_model  # noqa: E402
from hps_core.serving import TritonServer  # noqa: E402
from hps_demo.bench.harness import command_line, machine_with_gpus  # noqa: E402
from hps_demo.client import dlrm_request  # noqa: E402
from hps_demo.data import DEMO_ROWS_PER_TABLE  # noqa: E402
from hps_demo.versions import (  # noqa: E402
    Answer,
    LoadThread,
    build_repository,
    classify,
    distinguishable,
    make_version,
    request_keys,
    version_combinations,
    write_export,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny tables and windows: checks the script runs")
    p.add_argument("--tables", type=int, default=len(DEMO_ROWS_PER_TABLE))
    p.add_argument("--rows-scale", type=float, default=None, help="scale the demo's rows per table (default 1; smoke 0.002)")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=64, help="samples per request")
    p.add_argument("--requests", type=int, default=32, help="distinct requests sent round-robin")
    p.add_argument("--concurrency", type=int, default=2, help="client threads")
    p.add_argument("--before", type=float, default=None, help="seconds of load before publishing (default 15; smoke 2)")
    p.add_argument("--after", type=float, default=None, help="seconds of load after it (default 5; smoke 1)")
    p.add_argument("--drain", type=float, default=2.0, help="publish-model --drain")
    p.add_argument("--publishes", type=int, default=None,
                   help="versions published one after the other (default 2: the first after the server's start "
                        "pays Triton's one-time re-creation of the loaded versions; smoke 1)")
    p.add_argument("--out", type=Path, default=REPO / "work" / "bench_model_switch")
    args = p.parse_args(argv)
    pick = (lambda value, full, smoke: value if value is not None else (smoke if args.smoke else full))
    args.rows_scale = pick(args.rows_scale, 1.0, 0.002)
    args.before = pick(args.before, 15.0, 2.0)
    args.after = pick(args.after, 5.0, 1.0)
    args.publishes = pick(args.publishes, 2, 1)
    if args.smoke:
        args.tables, args.batch, args.requests = min(args.tables, 4), min(args.batch, 8), min(args.requests, 8)
    return args


def _latency(answers: list[Answer], start: float, end: float) -> dict[str, Any]:
    ms = np.array([a.seconds * 1e3 for a in answers if start <= a.sent < end and a.scores is not None])
    if ms.size == 0:
        return {"requests": 0, "p50_ms": None, "p99_ms": None}
    return {"requests": int(ms.size), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def _ratio(window: dict[str, Any], before: dict[str, Any], key: str) -> float | None:
    if window[key] is None or not before[key]:
        return None
    return round(window[key] / before[key], 2)


def _publication(report: PublishReport, answers: list[Answer], kinds: list[str], t0: float, t1: float,
                 before: dict[str, Any]) -> dict[str, Any]:
    """The figures of one publication: its latency windows, phases and answers after its switch."""
    switch_start, switch_end = report.started["load"], report.started.get("drop", t1)
    during_switch = _latency(answers, switch_start, switch_end)
    during_publish = _latency(answers, t0, t1)
    new = f"v{report.version}"
    first_new = min((a.sent + a.seconds for a, k in zip(answers, kinds) if k == new), default=None)
    to_serving = report.to_serving_s
    return {
        "version": report.version,
        "old_after_switch": sum(1 for a, k in zip(answers, kinds) if a.sent > switch_end and k.startswith("v")
                                and int(k[1:]) < report.version),
        "latency": {"during_switch": during_switch, "during_publish": during_publish},
        "p50_ratio_switch": _ratio(during_switch, before, "p50_ms"),
        "p99_ratio_switch": _ratio(during_switch, before, "p99_ms"),
        "p99_ratio_publish": _ratio(during_publish, before, "p99_ms"),
        "phases_s": {k: round(v, 3) for k, v in report.seconds.items()},
        "model_load_s": {k: round(v, 3) for k, v in report.model_load_s.items()},
        "to_serving_s": round(to_serving, 3),
        "bulk_load_share": round(report.seconds.get("bulk_load", 0.0) / to_serving, 3) if to_serving else None,
        "first_new_answer_s": round(first_new - t0, 3) if first_new is not None else None,
        "rows_loaded": {tier: sum(t.values()) for tier, t in report.rows_loaded.items()},
        "dropped": {tier: len(t) for tier, t in report.dropped.items()},
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rows = [max(100, int(r * args.rows_scale)) for r in (DEMO_ROWS_PER_TABLE * 2)[: args.tables]]
    versions = [make_version(v, tables=args.tables, rows=rows, dim=args.dim, bottom=(64, 32), top=(128, 64))
                for v in range(1, args.publishes + 2)]
    rng = np.random.default_rng(1)
    samples = [(request_keys(versions[0], args.batch, rng), rng.normal(size=(args.batch, 13)).astype(np.float32))
               for _ in range(args.requests)]
    expected: dict[str, list[np.ndarray]] = {}
    for i, old in enumerate(versions):
        for new in versions[i + 1:]:
            expected.update(version_combinations(old, new, samples))
    repository = build_repository(work, versions[0], rocksdb=work / "rocksdb")
    exports = [write_export(v, work / f"export_v{v.version}") for v in versions[1:]]
    token = secrets.token_urlsafe(24)
    requests = [dlrm_request(keys, dense).as_dict() for keys, dense in samples]
    print(f"{len(versions)} versions: {args.tables} tables, {sum(rows):,} rows, dim {args.dim}; starting Triton", flush=True)
    started = time.monotonic()
    published: list[tuple[PublishReport, float, float]] = []
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, api_token=token) as server:
        print(f"Triton ready in {time.monotonic() - started:.1f} s; load: {args.concurrency} client thread(s), "
              f"batch {args.batch}", flush=True)
        threads = [LoadThread(server.urls["http"], requests) for _ in range(args.concurrency)]
        for thread in threads:
            thread.__enter__()
        try:
            time.sleep(args.before)
            target = PublishTarget(repository=repository)
            control = ModelControl(server.urls["http"], token)
            for export in exports:
                t0 = time.monotonic()
                report = publish_model(target, export, control, drain_s=args.drain, progress=False,
                                       log_line=lambda line: print(f"  {time.monotonic() - t0:6.2f} s  {line}", flush=True))
                published.append((report, t0, time.monotonic()))
                time.sleep(args.after)
        finally:
            answers = [a for thread in threads for a in thread.stop()]
    answers.sort(key=lambda a: a.sent)
    kinds = [classify(a, expected) for a in answers]
    first_t0 = published[0][1] if published else time.monotonic()
    before = _latency(answers, first_t0 - args.before, first_t0)
    counts = {k: kinds.count(k) for k in sorted(set(kinds))}
    return {
        "tables": args.tables, "rows": sum(rows), "dim": args.dim, "batch": args.batch,
        "concurrency": args.concurrency, "distinguishable": distinguishable(expected),
        "requests": len(answers),
        "failed": kinds.count("failed"),
        "mixed": sum(n for k, n in counts.items() if k.startswith("sparse")),
        "unknown": kinds.count("unknown"),
        "answers": counts,
        "errors": sorted({a.error[:200] for a in answers if a.error})[:5],
        "before": before,
        "publications": [_publication(r, answers, kinds, t0, t1, before) for r, t0, t1 in published],
    }


def _cell(value: Any, unit: str = "") -> str:
    return "n/a" if value is None else f"{value}{unit}"


def markdown(result: dict[str, Any]) -> str:
    r = result["result"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine'].get('cpu', 'unknown CPU')}, {result['machine']['cpus']} CPUs, "
        f"{result['machine']['gpus']} GPU(s), Python {result['machine']['python']}  ",
        f"Model: {r['tables']} tables, {r['rows']:,} rows, dim {r['dim']}; load: {r['concurrency']} HTTP client "
        f"thread(s) without pause, batch {r['batch']}; {r['requests']:,} requests",
        "",
        "| window | requests | p50 ms | p99 ms | p50 / before | p99 / before |",
        "|---|---:|---:|---:|---:|---:|",
        f"| before the first publication | {r['before']['requests']} | {_cell(r['before']['p50_ms'])} | "
        f"{_cell(r['before']['p99_ms'])} | 1 | 1 |",
    ]
    for p in r["publications"]:
        sw, pub = p["latency"]["during_switch"], p["latency"]["during_publish"]
        lines.append(f"| v{p['version']}: during the switch (load, switch, unload) | {sw['requests']} | "
                     f"{_cell(sw['p50_ms'])} | {_cell(sw['p99_ms'])} | {_cell(p['p50_ratio_switch'])} | "
                     f"{_cell(p['p99_ratio_switch'])} |")
        lines.append(f"| v{p['version']}: during the whole publication | {pub['requests']} | {_cell(pub['p50_ms'])} | "
                     f"{_cell(pub['p99_ms'])} | | {_cell(p['p99_ratio_publish'])} |")
    lines += [
        "",
        f"Failed requests: **{r['failed']}**; mixed answers: **{r['mixed']}**; answers of no version: {r['unknown']}; "
        f"answers per version: {', '.join(f'{k} {n:,}' for k, n in r['answers'].items())}; old-version answers after "
        f"a switch: {sum(p['old_after_switch'] for p in r['publications'])}.",
        "",
    ]
    phases = [name for name in PHASES if any(name in p["phases_s"] for p in r["publications"])]
    lines.append("| publication | " + " | ".join(phases) + " | to serving | bulk load share | models READY |")
    lines.append("|---|" + "---:|" * (len(phases) + 3))
    for p in r["publications"]:
        ready = ", ".join(f"{m} {t:.1f} s" for m, t in p["model_load_s"].items())
        lines.append(f"| v{p['version']} | " + " | ".join(f"{p['phases_s'].get(n, 0):.2f}" for n in phases)
                     + f" | **{p['to_serving_s']:.2f}** | {100 * (p['bulk_load_share'] or 0):.0f} % | {ready} |")
    lines.append("")
    lines.append(f"Times in seconds; to serving = {' + '.join(TO_SERVING)} (the command until the ensemble "
                 "answers with the new version).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line(".venv/bin/python scripts/bench_model_switch.py", argv)
    info = machine_with_gpus()
    print(f"machine: {info.get('cpu', 'unknown CPU')}, {info['cpus']} CPUs, {info['gpus']} GPU(s)\ncommand: {command}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-model-switch-") as tmp:
        result = {"benchmark": "bench_model_switch", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "command": command, "machine": info, "smoke": args.smoke, "result": run(args, Path(tmp))}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_model_switch_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(markdown(result))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
