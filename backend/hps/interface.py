"""The Triton interface of an HPS model, checked at load against HugeCTR's.

HugeCTR's HPS backend serves a model whose ``config.pbtxt`` declares::

    input  [ { name: "KEYS"    data_type: TYPE_INT64 dims: [ -1 ] },    # or TYPE_UINT32
             { name: "NUMKEYS" data_type: TYPE_INT32 dims: [ -1 ] } ]
    output [ { name: "OUTPUT0" data_type: TYPE_FP32  dims: [ -1 ] } ]

with ``max_batch_size`` 0 (1-D tensors) or above (a leading batch dimension Triton adds). A
config that differs loads in Triton but fails or misleads at request time (an ``OUTPUT0`` of
``dims: [24]`` is not what the backend answers; ``KEYS`` of ``TYPE_FP32`` is refused on every
request), so :func:`check_interface` refuses it when the model loads, naming the field, what
it found, what HugeCTR's interface expects, and the fix.

Pure logic over the model configuration dict Triton hands to ``initialize`` (its JSON, see
``backend.tensors.model_config``): no Triton import, unit-tested anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hps_core.errors import ConfigError

__all__ = ["INTERFACE", "TensorSpec", "check_interface"]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the interface: its name, the data types it may have, its dims."""

    name: str
    data_types: tuple[str, ...]  # the first is the one to suggest
    role: str  # what it holds, for messages


#: HugeCTR's HPS interface: inputs, then outputs. KEYS may be UINT32 (HugeCTR's
#: ``supportlonglong: false``); the lookup takes both (hps_core.request.check_request).
INTERFACE: dict[str, tuple[TensorSpec, ...]] = {
    "input": (
        TensorSpec("KEYS", ("TYPE_INT64", "TYPE_UINT32"), "all keys of all tables, table-major"),
        TensorSpec("NUMKEYS", ("TYPE_INT32",), "the number of keys per table"),
    ),
    "output": (
        TensorSpec("OUTPUT0", ("TYPE_FP32",), "the vectors of all keys, flattened"),
    ),
}
_DIMS = [-1]  # every tensor: one variable dimension (after the batch dimension, if any)


def check_interface(config: Mapping[str, Any]) -> None:
    """Refuse a model configuration whose inputs and outputs are not HugeCTR's HPS interface.

    Raises :class:`ConfigError` naming the model, the field (``output[0].dims``), what was
    found, what is expected and the fix. Inputs beyond KEYS and NUMKEYS are allowed only
    when ``optional: true`` (the backend never reads them); outputs beyond OUTPUT0 are not.
    """
    model = str(config.get("name", "?"))
    for section, specs in INTERFACE.items():
        entries = list(config.get(section) or ())
        expected = {spec.name: spec for spec in specs}
        for spec in specs:
            if not any(entry.get("name") == spec.name for entry in entries):
                raise _error(model, f"{section} has no {spec.name!r}", f"{{ {_declaration(spec)} }} ({spec.role})",
                             f"add {{ {_declaration(spec)} }} to {section} [ ... ]")
        for index, entry in enumerate(entries):
            name = str(entry.get("name", ""))
            field = f"{section}[{index}]"
            known = expected.get(name)
            if known is None:
                _check_extra(model, section, field, name, entry)
            else:
                _check_tensor(model, section, field, known, entry)


def _check_extra(model: str, section: str, field: str, name: str, entry: Mapping[str, Any]) -> None:
    """A tensor HugeCTR's interface does not have: an optional input is harmless."""
    if section == "input" and entry.get("optional") is True:
        return
    names = ", ".join(spec.name for spec in INTERFACE[section])
    if section == "input":
        found, fix = f"{name!r}, required", "remove it or mark it `optional: true` (the hps backend never reads it)"
    else:
        found, fix = repr(name), "remove it (the hps backend answers only OUTPUT0)"
    raise _error(model, f"{field}.name is {found}", f"only {names}", fix)


def _check_tensor(model: str, section: str, field: str, spec: TensorSpec, entry: Mapping[str, Any]) -> None:
    data_type = entry.get("data_type")
    if data_type not in spec.data_types:
        raise _error(model, f"{field}.data_type ({spec.name}) is {data_type}", " or ".join(spec.data_types),
                     f"set `data_type: {spec.data_types[0]}`")
    dims = _dims(entry.get("dims"))
    if dims != _DIMS:
        raise _error(model, f"{field}.dims ({spec.name}) is {dims}",
                     f"{_DIMS} ({spec.role}: their count varies by request)",
                     "set `dims: [ -1 ]` (with or without max_batch_size)")
    if entry.get("reshape"):
        raise _error(model, f"{field}.reshape ({spec.name}) is {entry['reshape']}", "no reshape",
                     "remove the reshape")
    if section == "input" and entry.get("optional") is True:
        raise _error(model, f"{field}.optional ({spec.name}) is true", "a required input (every request needs it)",
                     "remove `optional: true`")


def _dims(value: Any) -> list[int] | Any:
    """``dims`` as ints: Triton's JSON may spell int64 values as strings."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        return value
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        return list(value)


def _declaration(spec: TensorSpec) -> str:
    return f'name: "{spec.name}" data_type: {spec.data_types[0]} dims: [ -1 ]'


def _error(model: str, finding: str, expected: str, fix: str) -> ConfigError:
    """``finding``: the field and what it holds ("output[0].dims (OUTPUT0) is [24]")."""
    return ConfigError(
        f"model '{model}': config.pbtxt {finding}, but the hps backend serves HugeCTR's "
        f"HPS interface, which expects {expected}; {fix}"
    )
