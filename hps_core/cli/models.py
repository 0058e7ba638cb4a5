"""``hps models``: list, load and unload models of a running ``hps serve`` (hps_core/model_control.py)."""

from __future__ import annotations

import argparse
import json
import time
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
    hps_model = _hps_model_name(control, args.model)  # read before the unload: Triton forgets the config
    if args.version:
        _unload_versions(control, args.model, args.version, args.timeout)
    else:
        control.unload(args.model, unload_dependents=args.dependents)
        control.wait_gone(args.model, timeout=args.timeout)
    print(f"hps models: {args.model} unloaded {_versions(args.version) if args.version else 'all versions'}; "
          f"READY versions: {_versions(control.ready_versions(args.model))}")
    if hps_model is not None:
        stores, caches = _remove_retired_stores(hps_model, args.version or None)
        if stores:
            print(f"hps models: removed {len(stores)} host store file(s) of the unloaded version(s) from /dev/shm")
        if caches:
            print(f"hps models: removed {len(caches)} shared GPU cache(s) of the unloaded version(s)")
    return 0


def _hps_model_name(control: Any, model: str) -> str | None:
    """The model's entry name in its HPS JSON (the ``hps_model`` parameter, else its name) when
    it is an HPS model Triton knows; None otherwise."""
    try:
        config = control.config(model)
    except ServingError:
        return None  # the unload itself reports an unknown model
    if config.get("backend") != "hps":
        return None
    name = config.get("parameters", {}).get("hps_model", {}).get("string_value", "").strip()
    return str(name or model)


def _remove_retired_stores(hps_model: str, versions: list[int] | None, settle_s: float = 1.0,
                           limit_s: float = 15.0) -> tuple[list[str], list[str]]:
    """Remove the host stores and shared GPU caches of the unloaded versions (all of the
    model's when ``versions`` is None) that nobody uses any more: under ``hps serve`` nothing
    else would before it stops. Returns the paths removed: (host stores, GPU caches).

    Triton reports a version unloaded before its stubs have always exited, so this waits until
    the stores' users stopped changing for ``settle_s`` (at most ``limit_s``): a stub still
    leaving is waited for, while a store another version still serves (same tables) is kept.
    Only this host's stores are seen (``hps models`` may talk to a remote server: then none)."""
    from hps_core.cache import remove_unused_gpu_caches
    from hps_core.cache.shared_gpu import list_caches
    from hps_core.config import entry_version, version_entry_name
    from hps_core.db.shm_store import list_stores, remove_unused_tables

    def retired_entry(entry: str) -> bool:
        version = entry_version(entry)
        return (versions is None or version in versions) and version_entry_name(hps_model, version) == entry

    def retired(table: str) -> bool:  # hps_et.<entry>.<table>
        parts = table.split(".", 2)
        return len(parts) == 3 and retired_entry(parts[1])

    users = None
    settled_at = start = time.monotonic()
    while time.monotonic() - start < limit_s:
        now = tuple(sorted([pid for info in list_stores() if retired(info.table) for pid in info.users]
                           + [pid for info in list_caches() if retired_entry(info.name) for pid in info.users]))
        if now != users:
            users, settled_at = now, time.monotonic()
        elif not users or time.monotonic() - settled_at >= settle_s:
            break
        time.sleep(0.1)
    return remove_unused_tables(retired), remove_unused_gpu_caches(retired_entry)


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
