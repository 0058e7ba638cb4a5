"""``hps models``: list, load and unload models of a running ``hps serve`` (hps_core/model_control.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hps_core.cli import keyword_defaults
from hps_core.errors import ConfigError, ServingError

__all__ = ["add_models", "run_models"]


def add_models(parser: argparse.ArgumentParser) -> None:
    """Set up ``hps models`` and its actions ``list``, ``load``, ``unload``."""
    parser.description = (
            "Add or remove models and model versions at runtime, through the explicit model control "
            "of the Triton that hps serve runs. The repository API needs the token hps serve was "
            "started with (header hps-api-token): --api-token-file FILE, else $HPS_API_TOKEN. A new "
            "model is a folder written into the served repository; a new version is a folder "
            "<model>/<N>/ beside the served ones (version_policy all): 'load' then serves it without "
            "touching the others. See docs/deployment.md, 'Model versions and runtime loading'."
        )
    control, server = _control_defaults(), _server_defaults()
    parser.add_argument("--url", default=f"{server['host']}:{server['http_port']}", metavar="HOST:PORT",
                        help="hps serve's HTTP endpoint (default: %(default)s)")
    parser.add_argument("--api-token-file", metavar="FILE",
                        help="file holding hps serve's token (default: $HPS_API_TOKEN)")
    parser.add_argument("--timeout", type=float, default=control["timeout"], metavar="SECONDS",
                        help="how long a load or unload may take (default: %(default)s)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every model version Triton knows of, with its state")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    load = actions.add_parser(
        "load", help="load (or reload) a model; wait until the versions asked for are READY",
        description=("Load MODEL from the served repository (or reload it: only versions whose folder "
                     "was added or changed are created again). With --version, wait until each is "
                     "READY; a version that fails to load is reported with Triton's message."),
    )
    load.add_argument("model", metavar="MODEL")
    load.add_argument("--version", type=int, action="append", default=[], metavar="N",
                      help="a version that must be READY afterwards (repeatable)")
    load.add_argument("--config", metavar="JSON_FILE",
                      help="a config override in Triton's JSON form used instead of config.pbtxt "
                           "(e.g. an ensemble whose steps are pinned to one version)")
    unload = actions.add_parser(
        "unload", help="unload a model, or some of its versions; wait until they are gone",
        description=("Unload every version of MODEL and wait until each ran its finalize. With "
                     "--version, unload only those: the model is loaded again with its served config "
                     "and a version policy naming the other READY versions. The folders stay, and a "
                     "later load of MODEL after a change on disk may serve them again; to retire "
                     "a version for good, move its folder out of the repository and load MODEL."),
    )
    unload.add_argument("model", metavar="MODEL")
    unload.add_argument("--version", type=int, action="append", default=[], metavar="N",
                        help="a version to unload (repeatable; default: every version)")
    unload.add_argument("--dependents", action="store_true",
                        help="unload the ensembles that use MODEL too (whole-model unload only)")
    parser.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    """Run the action; print what Triton serves of the model afterwards."""
    from hps_core.model_control import ModelControl, api_token  # lazy: keep `hps --help` fast

    control = ModelControl(args.url, api_token(args.api_token_file), timeout=args.timeout)
    if args.action == "list":
        entries = control.index()
        if args.json:
            print(json.dumps([vars(e) for e in entries], indent=2))
        else:
            rows = [("MODEL", "VERSION", "STATE", "REASON")]
            rows += [(e.name, "-" if e.version is None else str(e.version), e.state, e.reason) for e in entries]
            print(_table(rows))
        return 0
    if args.action == "load":
        config = _read_config(args.config) if args.config else None
        control.load(args.model, config=config, versions=args.version, timeout=args.timeout)
        print(f"hps models: {args.model} loaded; READY versions: {_versions(control.ready_versions(args.model))}")
        return 0
    if args.version:
        _unload_versions(control, args.model, args.version, args.timeout)
    else:
        control.unload(args.model, unload_dependents=args.dependents)
        control.wait_gone(args.model, timeout=args.timeout)
    print(f"hps models: {args.model} unloaded {_versions(args.version) if args.version else 'all versions'}; "
          f"READY versions: {_versions(control.ready_versions(args.model))}")
    return 0


def _unload_versions(control: Any, model: str, versions: list[int], timeout: float) -> None:
    """Serve ``model`` without ``versions``: its served config, version policy ``specific``
    naming the other READY versions (Triton creates nothing again: the config is the same)."""
    ready = control.ready_versions(model)
    absent = sorted(set(versions) - set(ready))
    if absent:
        raise ServingError(f"model '{model}' has no READY version {_versions(absent)} (READY: {_versions(ready)})")
    keep = [v for v in ready if v not in versions]
    if not keep:
        raise ServingError(f"unloading version(s) {_versions(versions)} would leave model '{model}' without a "
                           f"version: unload the model instead (hps models unload {model})")
    config = control.config(model)
    config["version_policy"] = {"specific": {"versions": keep}}
    control.load(model, config=config, timeout=timeout)
    control.wait_gone(model, versions, timeout=timeout)


def _read_config(path: str) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"--config {path}: not JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"--config {path}: a JSON object (Triton's model config) is expected")
    return config


def _versions(versions: list[int]) -> str:
    return ", ".join(str(v) for v in versions) or "none"


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _server_defaults() -> dict[str, Any]:
    """TritonServer's keyword defaults: hps serve's address unless told otherwise."""
    from hps_core.serving import TritonServer  # lazy: keep `hps --help` fast

    return keyword_defaults(TritonServer)


def _control_defaults() -> dict[str, Any]:
    """ModelControl's keyword defaults, which are the options' defaults."""
    from hps_core.model_control import ModelControl  # lazy: keep `hps --help` fast

    return keyword_defaults(ModelControl)
