"""The Triton model repository on disk, as this project lays it out and reads it.

One module for what used to be decided in three places (the backend, ``hps serve``'s CUDA
pool sizing, ``publish-model``), so they cannot disagree::

    <repository>/<model>/config.pbtxt     Triton's config; an HPS model (backend "hps") names
                                          its HPS JSON in the parameter ``hps_config``
                                          (relative to the model's folder) and may name its
                                          model in that JSON with ``hps_model``
    <repository>/<model>/<N>/             version N; a version published with its own files
                                          holds them: ``hps.json`` (an HPS model's tiers and
                                          tables), ``dense.pt`` + ``dense.json`` (a dense model)
    <mirror>/<model>/.hps_source          in a repository ``hps serve`` staged for a machine
                                          without GPU: the original model folder's path

**Which file serves version N** (:func:`served_file`): the version folder's own file when it
has one, else the model's parameter (``hps_config``, ``dense_weights``), else a default (hps
serve's ``--backend-config hps,ps=PATH``); a relative path is relative to the model's
*original* folder, also when Triton serves the staged mirror.

**Staging for CPU-only machines** (:func:`stage_model_repository`): a repository whose
configs ask for ``KIND_GPU`` instances is served from a mirror whose model folders hold a
rewritten config.pbtxt (``KIND_CPU``) and links to everything else, so relative paths and
version folders resolve as in the original; :func:`sync_model_repository` keeps the mirror in
step with the original while it is served.

No Triton module and nothing heavy is imported here: the backends read it in every stub.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "DENSE_WEIGHTS",
    "HPS_JSON",
    "PS_ENV",
    "SOURCE_MARKER",
    "hps_models",
    "link_to",
    "original_folder",
    "pbtxt_string_parameter",
    "rewrite_instance_groups_to_cpu",
    "served_file",
    "stage_model_repository",
    "sync_model_repository",
    "version_numbers",
]

HPS_JSON = "hps.json"  # an HPS model's tables and tiers, in a version folder (and in an export)
DENSE_WEIGHTS = "dense.pt"  # the dense model's weights in its version folder (and in an export)
SOURCE_MARKER = ".hps_source"  # in a staged model folder: the original folder's path
#: HugeCTR's ``--backend-config=hps,ps=PATH`` as ``hps serve`` hands it to the HPS backend's
#: stubs (serving.backend_config_environment, the path made absolute): the HPS JSON of a model
#: whose config.pbtxt names none.
PS_ENV = "HPS_BACKEND_CONFIG_PS"

_HPS_BACKEND = re.compile(r'\bbackend\s*:\s*"hps"')
_KIND_GPU = re.compile(r"\bkind\s*:\s*KIND_GPU\b")
# `gpus: [0, 1]` with an optional trailing comma (both separators are legal in pbtxt).
_GPUS = re.compile(r"\bgpus\s*:\s*\[[^\]]*\]\s*,?")


# --------------------------------------------------------------------------- reading


def original_folder(folder: Path) -> Path:
    """The model folder the user wrote: ``folder`` itself, or the original of a staged copy."""
    marker = folder / SOURCE_MARKER
    if marker.is_file():
        return Path(marker.read_text().strip())
    return folder


def pbtxt_string_parameter(config_text: str, key: str) -> str | None:
    """The ``string_value`` of the config.pbtxt parameter ``key``, or None when absent (what
    Triton hands a backend as ``parameters[key].string_value``, for readers without Triton)."""
    pattern = rf'key\s*:\s*"{re.escape(key)}"\s*value\s*:\s*\{{\s*string_value\s*:\s*"([^"]*)"'
    match = re.search(pattern, config_text)
    return (match.group(1).strip() or None) if match else None


def version_numbers(model_folder: Path) -> list[int]:
    """The version folders of a model, ascending (Triton's: numeric names only)."""
    return sorted(int(entry.name) for entry in model_folder.iterdir() if entry.is_dir() and entry.name.isdigit())


def served_file(model_folder: Path, version: int | str | None, name: str, parameter: str | None,
                default: str | Path | None = None) -> Path | None:
    """The file ``name`` that serves ``version`` of the model in ``model_folder`` (the module
    doc's rule): ``<original folder>/<version>/<name>`` when it exists, else ``parameter``, else
    ``default``, a relative one resolved from the original folder; None when none is given."""
    folder = original_folder(model_folder)
    if version is not None and str(version).strip():
        own = folder / str(version).strip() / name
        if own.is_file():
            return own
    value = parameter or default
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (folder / path).resolve()


def hps_models(repository: Path) -> Iterator[tuple[Path, str]]:
    """(model folder, config.pbtxt text) of every HPS model (backend "hps") of ``repository``."""
    for config in sorted(repository.glob("*/config.pbtxt")):
        text = config.read_text()
        if _HPS_BACKEND.search(text):
            yield config.parent, text


# --------------------------------------------------------------------------- staging


def rewrite_instance_groups_to_cpu(config_text: str) -> tuple[str, bool]:
    """Turn ``kind: KIND_GPU`` instance groups into ``KIND_CPU`` and drop their ``gpus`` lists.

    Returns the new text and whether anything changed.
    """
    if not _KIND_GPU.search(config_text):
        return config_text, False
    text = _KIND_GPU.sub("kind: KIND_CPU", config_text)
    return _GPUS.sub("", text), True


def stage_model_repository(repository: Path, dest: Path) -> tuple[Path, list[str]]:
    """Return a repository Triton can serve without GPU, and the models that were rewritten.

    When no config asks for KIND_GPU the original repository is returned untouched. Otherwise
    ``dest`` mirrors it (:func:`sync_model_repository`): model folders are real folders holding
    a rewritten copy of config.pbtxt, everything else is a symlink, so relative paths
    (``../hps.json``, version folders, weights) resolve as they do in the original.
    """
    rewritten = sorted(
        config.parent.name for config in repository.glob("*/config.pbtxt")
        if rewrite_instance_groups_to_cpu(config.read_text())[1]
    )
    if not rewritten:
        return repository, []
    sync_model_repository(repository, dest)
    return dest, rewritten


def sync_model_repository(repository: Path, dest: Path) -> None:
    """Make the mirror ``dest`` follow ``repository`` now: models and version folders added
    since the last call are linked, removed ones unlinked, changed configs rewritten again.

    Idempotent and cheap (a listing per model folder): ``hps serve`` calls it at every poll,
    so a version folder written beside the served ones, or a new model, is seen by Triton's
    next load (docs/deployment.md, "Model versions and runtime loading"). Only links, the
    marker and the rewritten configs of ``dest`` are touched; a config is replaced atomically.
    """
    dest.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for entry in sorted(repository.iterdir()):
        wanted.add(entry.name)
        target = dest / entry.name
        is_model = entry.is_dir() and (entry / "config.pbtxt").is_file()
        if is_model and target.is_symlink():
            target.unlink()  # a folder linked before its config.pbtxt was written
        elif not is_model and target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # a mirrored model whose config.pbtxt went away
        if is_model:
            _mirror_model_dir(entry, target)
        elif not target.is_symlink():
            link_to(entry, target)
    for stale in list(dest.iterdir()):
        if stale.name not in wanted:
            _remove_entry(stale)


def link_to(target: Path, link: Path) -> None:
    """``link`` -> ``target``'s real path, its folder made first."""
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve())


def _mirror_model_dir(model_dir: Path, dest: Path) -> None:
    dest.mkdir(exist_ok=True)
    # Paths that leave the repository (``../../data``) would resolve from the staged copy;
    # the backends read this marker and resolve them from the original folder instead.
    marker = dest / SOURCE_MARKER
    if not marker.is_file():
        marker.write_text(f"{model_dir.resolve()}\n")
    config = dest / "config.pbtxt"
    text = rewrite_instance_groups_to_cpu((model_dir / "config.pbtxt").read_text())[0]
    if not config.is_file() or config.read_text() != text:
        partial = dest / ".config.pbtxt.partial"
        partial.write_text(text)
        partial.replace(config)
    names = {"config.pbtxt", SOURCE_MARKER}
    for entry in model_dir.iterdir():
        if entry.name in names:
            continue
        names.add(entry.name)
        if not (dest / entry.name).is_symlink():
            link_to(entry, dest / entry.name)
    for stale in list(dest.iterdir()):
        if stale.name not in names:
            _remove_entry(stale)


def _remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
