"""The ``hps`` command line: the only argparse in ``hps_core``.

One module per subcommand (``serve.py``, ``load.py``, ``inspect.py``, ``publish.py``, ``models.py``), each with
a registration function ``add_<name>(subparsers) -> None`` that adds its parser and sets
``func`` (a callable ``(args) -> int`` returning the exit code) with
``parser.set_defaults(func=...)``; the work itself is done by the library modules they call
(``serving``/``supervisor``, ``loader``, ``inspection``, ``updates``). :data:`SUBCOMMANDS` lists
them as ``"module:function"`` strings, imported only when the parser is built, so a heavy
subcommand (torch, CuPy) costs nothing to the others. To add one, write its module here and
add a line to :data:`SUBCOMMANDS`. An option's default is read from what it configures
(:func:`keyword_defaults` of a constructor, the fields of a config dataclass), never restated.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from inspect import Parameter, signature  # not `import inspect`: hps_core.cli.inspect shadows it
from typing import Any

from hps_core import __version__
from hps_core.errors import HPSError

__all__ = ["SUBCOMMANDS", "SubParsers", "build_parser", "keyword_defaults", "main"]

SubParsers = Any  # argparse._SubParsersAction, which is private
Register = Callable[[SubParsers], None]

#: name -> "module:registration_function" (see the module docstring).
SUBCOMMANDS: dict[str, str] = {
    "serve": "hps_core.cli.serve:add_serve",
    "load": "hps_core.cli.load:add_load",
    "inspect": "hps_core.cli.inspect:add_inspect",
    "publish": "hps_core.cli.publish:add_publish",
    "publish-model": "hps_core.cli.publish_model:add_publish_model",
    "models": "hps_core.cli.models:add_models",
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


def build_parser() -> argparse.ArgumentParser:
    """The ``hps`` parser with every subcommand of :data:`SUBCOMMANDS` registered."""
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
    for target in SUBCOMMANDS.values():
        _load_register(target)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hps`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except HPSError as exc:
        print(f"hps {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return code

