"""``hps publish-model``: an export as the next version of a served model, switched in under load
(hps_core/publishing.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hps_core.cli import keyword_defaults
from hps_core.model_control import ModelControl, api_token
from hps_core.publishing import PublishTarget, publish_model

__all__ = ["add_publish_model", "run_publish_model"]


def add_publish_model(parser: argparse.ArgumentParser) -> None:
    """Set up ``hps publish-model``."""
    target = keyword_defaults(PublishTarget)
    publish = keyword_defaults(publish_model)
    parser.description = (
            "Validate an export (HPS JSON, sparse model folders, dense weights), write it as version N+1 "
            "of the repository, bulk-load its tables into the persistent and shared volatile tiers, load "
            "it beside version N in the running server (hps serve), switch the ensemble to it in one "
            "reload, unload version N and drop its tables. A broken export is refused before anything "
            "changes. Resumable: after a kill, the same command continues. Prints the time of each phase."
        )
    parser.add_argument("export", metavar="EXPORT_DIR", help="the export folder (hps.json, sparse folders, dense.pt)")
    parser.add_argument("--model-repository", required=True, metavar="DIR", help="the repository hps serve serves")
    parser.add_argument("--url", default="127.0.0.1:8000", metavar="HOST:PORT", help="the server's HTTP endpoint (default: %(default)s)")
    parser.add_argument("--api-token-file", metavar="FILE", help="the repository API token (default: $HPS_API_TOKEN)")
    parser.add_argument("--hps-model", default=target["hps_model"], help="the HPS step's Triton model (default: %(default)s)")
    parser.add_argument("--dense-model", default=target["dense_model"],
                        help="the dense step's Triton model, '' for none (default: %(default)s)")
    parser.add_argument("--ensemble", default=target["ensemble"], help="the ensemble, '' for none (default: %(default)s)")
    parser.add_argument("--hps-config", metavar="HPS_JSON",
                        help="version 1's HPS JSON when config.pbtxt names none (what hps serve got as --backend-config hps,ps=...)")
    parser.add_argument("--work-dir", metavar="DIR", help="versions being written and retired ones (default: <repository>.versions)")
    parser.add_argument("--export-json", metavar="NAME", help="the HPS JSON in the export (default: hps.json)")
    parser.add_argument("--export-model", metavar="NAME", help="the export's model entry (default: its only one)")
    parser.add_argument("--drain", type=float, default=publish["drain_s"], metavar="S",
                        help="seconds between the switch and unloading the old version (default: %(default)s)")
    parser.add_argument("--nice", type=int, default=publish["bulk_load_nice"], metavar="N",
                        help="the bulk load runs this much below the command's CPU priority (default: %(default)s)")
    parser.add_argument("--keep-old-tables", action="store_true", help="do not drop the old version's tables")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_publish_model)


def run_publish_model(args: argparse.Namespace) -> int:
    """``hps publish-model``: a line per step, then the phase timings."""
    target = PublishTarget(
        repository=Path(args.model_repository).absolute(), hps_model=args.hps_model,
        dense_model=args.dense_model or None, ensemble=args.ensemble or None,
        hps_config=Path(args.hps_config).absolute() if args.hps_config else None,
        work_dir=Path(args.work_dir).absolute() if args.work_dir else None,
    )
    control = ModelControl(args.url, api_token(args.api_token_file))
    report = publish_model(
        target, args.export, control, export_json=args.export_json, export_model=args.export_model,
        drain_s=args.drain, drop_old=not args.keep_old_tables, progress=not args.no_progress,
        bulk_load_nice=args.nice,
        log_line=lambda line: print(f"hps publish-model: {line}", flush=True),
    )
    print(f"hps publish-model: version {report.version} serving; phases:")
    for line in report.lines():
        print(line)
    if report.dropped:
        print("hps publish-model: dropped " + "; ".join(
            f"{tier}: {len(t)} {'caches' if tier == 'gpu_cache' else 'tables'}" for tier, t in report.dropped.items()))
    return 0
