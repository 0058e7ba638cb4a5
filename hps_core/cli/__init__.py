"""The ``hps`` command line: the only argparse in ``hps_core``.

One module per subcommand (``serve.py``, ``load.py``, ``inspect.py``, ``publish.py``,
``publish_model.py``, ``models.py``), each with a function ``add_<name>(parser) -> None`` that
sets up the subcommand's parser (description, options) and its ``func`` (a callable ``(args)
-> int`` returning the exit code) with ``parser.set_defaults(func=...)``; the work itself is
done by the library modules they call (``serving``/``supervisor``, ``loader``, ``inspection``,
``updates``). :data:`SUBCOMMANDS` lists them with their one-line help, and only the module of
the subcommand being run is imported: ``hps --help`` and ``hps serve`` load nothing of the
others (numba, Kafka's or Redis's client, the publisher). To add one, write its module here and
add a line to :data:`SUBCOMMANDS`. An option's default is read from what it configures
(:func:`keyword_defaults` of a constructor, the fields of a config dataclass), never restated.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from inspect import Parameter, signature  # not `import inspect`: hps_core.cli.inspect shadows it
from typing import Any

from hps_core import __version__
from hps_core.errors import HPSError

__all__ = ["SUBCOMMANDS", "Subcommand", "build_parser", "keyword_defaults", "main"]

Register = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Subcommand:
    """Where a subcommand's parser is set up (``"module:add_function"``) and its one-line help."""

    target: str
    help: str


#: name -> subcommand (see the module docstring).
SUBCOMMANDS: dict[str, Subcommand] = {
    "serve": Subcommand(
        "hps_core.cli.serve:add_serve",
        "run Triton Inference Server on a model repository (HPS and DLRM backends staged), restarting it if it dies",
    ),
    "load": Subcommand(
        "hps_core.cli.load:add_load",
        "load sparse model folders or .npy/.npz tables into RocksDB and/or Redis",
    ),
    "inspect": Subcommand(
        "hps_core.cli.inspect:add_inspect",
        "show the tables of the tiers: rows, width, format, memory and disk",
    ),
    "publish": Subcommand(
        "hps_core.cli.publish:add_publish",
        "send a table's embeddings to Kafka as online updates (HugeCTR's message format)",
    ),
    "publish-model": Subcommand(
        "hps_core.cli.publish_model:add_publish_model",
        "publish a HugeCTR-style export as the next version of a served model, without downtime",
    ),
    "models": Subcommand(
        "hps_core.cli.models:add_models",
        "list, load or unload models of a running hps serve (Triton's repository API)",
    ),
}


def keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """The defaults of ``fn``'s parameters (a class: its constructor's), to be the defaults of
    the options that set them."""
    parameters = signature(fn).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not Parameter.empty}


# --------------------------------------------------------------------------- entry point
def _load_register(target: str) -> Register:
    module_name, _, function_name = target.partition(":")
    register: Register = getattr(importlib.import_module(module_name), function_name)
    return register


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``hps`` parser: every subcommand of :data:`SUBCOMMANDS` listed with its help, and the
    options of the one ``argv`` names (all of them when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        prog="hps",
        description=(
            "Hierarchical Parameter Server for Triton Inference Server: embedding tables in a "
            "GPU cache, CPU memory or Redis Cluster and RocksDB, served next to a DLRM model."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = None if argv is None else next((arg for arg in argv if arg in SUBCOMMANDS), "")
    for name, command in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help)
        if chosen is None or chosen == name:
            _load_register(command.target)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hps`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except HPSError as exc:
        print(f"hps {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return code

