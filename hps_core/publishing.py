"""Publishing a model export as the next version of a served model (``hps publish-model``).

An **export** is what training leaves, HugeCTR-style: a folder holding an HPS JSON (one model
entry: ``sparse_files``, ``embedding_vecsize_per_table``, ...; relative paths are relative to
the JSON), the HugeCTR sparse model folders it names (``key`` + ``emb_vector``) and, for a DLRM,
the dense weights (``dense.pt`` and its ``dense.json``, backend/dlrm/network.py's format).

:func:`publish_model` makes it version N+1 of a running repository while version N serves
(docs/model_versions.md):

1. **validate** (:func:`validate_export`): every sparse folder exists and holds ``rows × dim``
   floats for the JSON's dims, keys are unique (and fit uint32 without ``supportlonglong``),
   vectors are finite, the dense weights exist, their hyper-parameters match the tables
   (count and width) and they load into the network those describe (:func:`check_dense_loads`,
   in a child process: hps_core imports neither torch nor backend), the table count is the serving version's (clients' ``NUMKEYS``). A
   broken export raises ConfigError/FormatError here, before anything is written.
2. **write** (:func:`write_version`): the ensemble pinned to version N first (a step at
   ``model_version: -1`` would follow each model's new version on its own); then, in the work
   folder beside the repository (``<repo>.versions/staging/``: Triton would take a folder inside
   the repository for a model), ``<hps model>/<N+1>/hps.json`` (the serving version's tiers, the
   export's model entry renamed ``<model>_v<N+1>``, so its tables are
   ``hps_et.<model>_v<N+1>.<table>`` in every tier), its sparse folders (hard links where the
   file system allows, else copies) and ``<dense model>/<N+1>/dense.pt``.
3. **bulk load** (:func:`bulk_load`): the new tables into the persistent tier (RocksDB, SST
   ingest, resumable through the loader's markers) and a shared volatile tier (Redis),
   ahead of the switch, with a progress bar (hps_core/loader.py), at a lower CPU priority
   (:func:`at_low_priority`). A hash map (the host store) is filled by the first serving
   process that loads the version, once per host.
4. **load, switch, unload, drop**: the folders renamed into the repository
   (:func:`install_version`), then through the repository API (:mod:`hps_core.model_control`):
   the new versions are loaded beside the old ones and awaited READY (one that fails is taken
   out again, and its tables dropped once Triton confirmed it unloaded, else kept), the ensemble is switched to them in one reload, the old versions' folders are
   moved out after a drain (:func:`retire_version`) and they unload, and their tables are
   dropped from the shared tiers and the host store (:func:`drop_tables`; never a table whose name version 1 or
   the new version also uses). Each ensemble override (the pin, the switch) that fails is
   restored at once; when the restore fails too the error says the ensemble is unloaded and how
   to load it again.

One publication at a time per repository (:func:`publication_lock`): an exclusive ``flock`` on
``<repo>.versions/publish.lock``, which holds the holder's pid, host and start time; a second
run refuses with them. The kernel releases the lock when its holder dies (SIGKILL included), so
a dead holder's lock is taken over by the next run, never left to clear by hand.

The ensemble's pin (to version N while N+1 loads, to N+1 at the switch) is written into its
``config.pbtxt`` too, after Triton took it, so a Triton restarted at any point of a publication
serves the version the running one served, never each model's newest folder on its own (a
dense N+1 beside an HPS N, killed between the two renames of :func:`install_version`).

A publication killed at any point is resumed by running the same command again:
``<repo>.versions/publish-<N+1>.json`` records the export's fingerprint and the phase reached;
the written folders are kept, the bulk load continues from its markers, and the Triton steps
are idempotent. Only a publication started over the version serving now (or already switched)
is resumed; a failed one never is, and its number is not used again. The stores stay
consistent at every point: a table is loaded (SST ingest, then its marker) before any version
names it, and dropped only after no loaded version does; RocksDB's own steps are crash-safe
(hps_core/db/rocksdb.py). tests/hps_core/test_publishing_crash.py kills the command at points in
every phase, restarts ``hps serve`` on what is left and checks every served vector.

Test-only hook: with ``HPS_PUBLISH_KILL_AT=<point>[#<n>]`` in its environment the command
SIGKILLs itself the n-th time it reaches ``<point>``, one of ``validate.locked``,
``validate.dense`` (the dense check's child running), ``validate.done``, ``write.pinned``,
``write.done``, ``bulk_load.table`` (after each table), ``bulk_load.done``, ``load.install``
(after each model's folder moved in), ``load.done``, ``switch.start``, ``switch.done``,
``unload.retired``, ``unload.model`` (after each model), ``unload.done``, ``drop.table`` (after
each table), ``drop.done``. ``HPS_PUBLISH_PAUSE_AT`` takes the same values and makes it wait
for a line on stdin there instead. Unset, each point costs two environment lookups.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from hps_core.config import (
    ModelConfig,
    ParameterServerConfig,
    TierType,
    load_config,
    parse_config,
    version_entry_name,
    version_model_name,
)
from hps_core.cache import remove_unused_gpu_caches
from hps_core.db.base import DropTable, EmbeddingTier
from hps_core.db.shm_store import namespace_of
from hps_core.errors import ConfigError, FormatError, HPSError, ServingError
from hps_core.formats import read_sparse_model
from hps_core.formats.hugectr import check_unique_keys
from hps_core.loader import DEFAULT_CHUNK_ROWS, fingerprint, load_config_tables
from hps_core.model_control import ModelControl
from hps_core.repository import DENSE_WEIGHTS, HPS_JSON, pbtxt_string_parameter, served_file
from hps_core.retry import WRITE_LOCK_WAIT
from hps_core.row_formats import non_finite_rows

__all__ = [
    "PHASES",
    "TO_SERVING",
    "Export",
    "PublishReport",
    "PublishTarget",
    "WrittenVersion",
    "DenseCheck",
    "KILL_AT_ENV",
    "PAUSE_AT_ENV",
    "at_low_priority",
    "check_dense_loads",
    "bulk_load",
    "drop_tables",
    "find_resumable_version",
    "hps_entry_base",
    "install_version",
    "next_version",
    "publication_lock",
    "publish_model",
    "retire_version",
    "serving_hps_json",
    "serving_json_document",
    "validate_export",
    "version_config",
    "version_entry_name",
    "version_folders",
    "write_version",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The phases of a publication, in order; :class:`PublishReport` times each.
PHASES = ("validate", "write", "bulk_load", "load", "switch", "unload", "drop")
#: The phases from the command to the new version serving (the rest is clean-up).
TO_SERVING = PHASES[:5]
DENSE_FORMAT = "hps-demo-dlrm-dense/1"  # backend/dlrm/network.py's hyper-parameter file format
SPARSE_FOLDER = "sparse"  # the version's sparse model folders: <version>/sparse/<table>/
#: Opening RocksDB's writer waits while a serving process holds the lock (it loads or applies updates).
_STATE_FILE = re.compile(r"publish-(\d+)\.json")
#: A check of an export's dense weights beyond their files (:func:`check_dense_loads`); raises FormatError.
DenseCheck = Callable[[Path], None]
#: Test-only: ``<point>`` or ``<point>#<n>`` makes publish-model SIGKILL itself the n-th time
#: (default 1st) it reaches that point (:func:`_crash_point`; points are named in the module doc).
KILL_AT_ENV = "HPS_PUBLISH_KILL_AT"
#: Test-only: the same points, where publish-model pauses until a line arrives on its stdin.
PAUSE_AT_ENV = "HPS_PUBLISH_PAUSE_AT"
_LOCK_FILE = "publish.lock"  # in the work folder: one publication at a time per repository


@dataclass(frozen=True, kw_only=True)
class PublishTarget:
    """The served models a publication replaces, in a model repository."""

    repository: Path  # the model repository `hps serve` serves
    hps_model: str = "hps_embedding"  # the Triton model of the HPS step
    dense_model: str | None = "dlrm_dense"  # the Triton model of the dense step (None: HPS only)
    ensemble: str | None = "dlrm"  # the ensemble pinned to one version of both (None: none)
    hps_config: Path | None = None  # version 1's HPS JSON when config.pbtxt names none (hps serve --backend-config)
    work_dir: Path | None = None  # versions being written and retired ones (default: <repository>.versions beside it)

    def model_dir(self, model: str) -> Path:
        return self.repository / model

    @property
    def work(self) -> Path:
        """Outside the repository (Triton would take a folder inside it for a model), on its
        file system (versions move in and out by rename)."""
        return self.work_dir or self.repository.parent / f"{self.repository.name}.versions"

    def staged(self, model: str, version: int) -> Path:
        return self.work / "staging" / model / str(version)

    def retired(self, model: str, version: int) -> Path:
        return self.work / "retired" / model / str(version)

    def state_file(self, version: int) -> Path:
        return self.work / f"publish-{version}.json"

    @property
    def models(self) -> tuple[str, ...]:
        """The versioned models, HPS first."""
        return (self.hps_model,) + ((self.dense_model,) if self.dense_model else ())


@dataclass(frozen=True, kw_only=True)
class Export:
    """A validated export: what :func:`write_version` writes."""

    folder: Path
    hps_json: Path
    entry: dict[str, Any]  # the export's model entry, as in its JSON (paths resolved)
    model: ModelConfig  # the same entry, parsed
    rows: tuple[int, ...]  # rows per table
    dense_weights: Path | None
    fingerprint: str  # identity of the export's files (sizes, times, ends; no full read)


@dataclass(frozen=True, kw_only=True)
class WrittenVersion:
    """Version ``version`` of the target's models, as written."""

    version: int
    hps_json: Path  # <repo>/<hps model>/<version>/hps.json, once installed
    dense_weights: Path | None  # <repo>/<dense model>/<version>/dense.pt, once installed


@dataclass
class PublishReport:
    """What a publication did and how long each phase took (seconds, in :data:`PHASES` order)."""

    version: int = 0
    previous: int | None = None  # the version serving before (None: none was)
    resumed: bool = False  # an unfinished publication of the same export was continued
    seconds: dict[str, float] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)  # time.monotonic() when each phase began
    rows_loaded: dict[str, dict[str, int]] = field(default_factory=dict)  # {tier: {table: rows written}}
    dropped: dict[str, list[str]] = field(default_factory=dict)  # {tier: tables of the old version dropped}
    model_load_s: dict[str, float] = field(default_factory=dict)  # seconds until each model's new version was READY

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (added to what earlier blocks of it took)."""
        start = time.perf_counter()
        self.started.setdefault(name, time.monotonic())
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def to_serving_s(self) -> float:
        """Seconds from the command to the new version answering (validate ... switch)."""
        return sum(self.seconds.get(name, 0.0) for name in TO_SERVING)

    def lines(self) -> list[str]:
        """The phase timings as printed by ``hps publish-model``: seconds, and the share of the
        time to serving for the phases before it."""
        serving = self.to_serving_s or 1e-9
        out = []
        for name in PHASES:
            if name in self.seconds:
                share = f"{100 * self.seconds[name] / serving:5.1f} %" if name in TO_SERVING else "       "
                out.append(f"  {name:<10} {self.seconds[name]:8.2f} s  {share}")
        out.append(f"  {'serving':<10} {self.to_serving_s:8.2f} s  from the command to version {self.version} answering")
        out.append(f"  {'total':<10} {self.total_s:8.2f} s  with the old version unloaded" +
                   (" and its tables dropped" if "drop" in self.seconds else ""))
        return out


# --------------------------------------------------------------------------- lock and crash points
_crash_counts: dict[str, int] = {}


def _crash_point(name: str) -> None:
    """Test-only: the n-th time ``name`` is reached, SIGKILL this process (:data:`KILL_AT_ENV`),
    as ``kill -9`` or the OOM killer would: nothing flushed, no ``finally`` run; or
    (:data:`PAUSE_AT_ENV`) say so on stderr and wait for a line on stdin, holding what it holds
    (the lock), so that a test can run a second publication beside it without a race."""
    kill, pause = os.environ.get(KILL_AT_ENV, ""), os.environ.get(PAUSE_AT_ENV, "")
    if not kill and not pause:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    for action, wanted in (("killed", kill), ("paused", pause)):
        point, _, nth = wanted.partition("#")
        if point == name and _crash_counts[name] == int(nth or 1):
            print(f"hps publish-model: {action} at {wanted}", file=sys.stderr, flush=True)
            if action == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            sys.stdin.readline()


@contextlib.contextmanager
def publication_lock(target: PublishTarget) -> Iterator[None]:
    """Hold the target's publication lock for the block: ``flock`` on ``<work>/publish.lock``,
    whose content names the holder (pid, host, start time, repository).

    ServingError naming the holder when another publication holds it. The kernel drops the
    lock with its holder's last descriptor, so a killed holder's lock is free at once (its
    stale content is replaced by the next holder's); the descriptor is close-on-exec, so no
    child keeps it. The file itself stays: removing a flock'd file would let two runs lock two
    different files of one name."""
    path = target.work / _LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ServingError(
                f"{target.repository}: another hps publish-model is publishing into this repository "
                f"({_lock_holder(fd)}; lock {path}); one publication at a time: wait for it to end, or stop "
                "it and run your command again (a killed publication holds no lock; the same command "
                "resumes it)") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "repository": str(target.repository)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # still ours: an empty file names no holder
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """Who holds the lock, from the file's content: pid, host, start time."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        holder = None
    if not isinstance(holder, dict):
        return "its holder is starting and has not written its name yet"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


# --------------------------------------------------------------------------- versions on disk
def version_folders(model_dir: Path) -> list[int]:
    """The numeric version folders of a model folder, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def next_version(target: PublishTarget) -> int:
    """One above every version of the target's models: in the repository, being written, retired
    or failed (a number is never used twice: its tables may still be in the tiers)."""
    folders = [folder for m in target.models for folder in (target.model_dir(m), target.work / "staging" / m,
                                                            target.work / "retired" / m, target.work / "failed" / m)]
    numbers = [v for folder in folders for v in version_folders(folder)] + list(_state_files(target))
    return 1 + max(numbers, default=0)


def _state_files(target: PublishTarget) -> dict[int, Path]:
    """The publications' state files by version number (publish-10 above publish-9)."""
    found = {}
    if target.work.is_dir():
        for path in target.work.iterdir():
            match = _STATE_FILE.fullmatch(path.name)
            if match:
                found[int(match.group(1))] = path
    return found


def hps_entry_base(target: PublishTarget) -> str:
    """The HPS model name the backend serves: the ``hps_model`` parameter, else the Triton name."""
    config = target.model_dir(target.hps_model) / "config.pbtxt"
    name = pbtxt_string_parameter(config.read_text(), "hps_model") if config.is_file() else None
    return name or target.hps_model


def serving_hps_json(target: PublishTarget, version: int) -> Path:
    """The HPS JSON version ``version`` of the HPS model serves, as the backend picks it
    (:func:`hps_core.repository.served_file`): ``<version>/hps.json``, else the model's
    ``hps_config`` parameter (relative to its folder), else ``target.hps_config``."""
    model_dir = target.model_dir(target.hps_model)
    config = model_dir / "config.pbtxt"
    if not config.is_file():
        raise ConfigError(f"{config}: not found; is {target.repository} the model repository and "
                          f"{target.hps_model!r} its HPS model?")
    path = served_file(model_dir, version, HPS_JSON, pbtxt_string_parameter(config.read_text(), "hps_config"),
                       target.hps_config)
    if path is not None:
        return path
    raise ConfigError(f"{config}: no hps_config parameter and no {version}/hps.json; give the HPS JSON "
                      "the server was started with (--hps-config, as hps serve's --backend-config hps,ps=...)")


# --------------------------------------------------------------------------- validate
def validate_export(
    folder: str | os.PathLike[str],
    *,
    serving: ParameterServerConfig,
    serving_model: ModelConfig | None,
    export_json: str | None = None,
    export_model: str | None = None,
    dense: bool = True,
    dense_check: DenseCheck | None = None,
) -> Export:
    """Check everything of the export at ``folder`` that can be checked without serving it.

    ``serving``/``serving_model``: the config and model entry now served (the tiers the
    version will use; the table count clients send). ``export_json``: the JSON's name in the
    folder (default: ``hps.json``, else the only ``*.json`` other than ``dense.json``).
    ``export_model``: its entry (default: the only one). ``dense``: dense weights required. ``dense_check``: run on the dense weights after
    their files passed (default :func:`check_dense_loads`: loaded into the network).
    Raises ConfigError or FormatError naming the export, the file and the problem.
    """
    root = Path(folder).absolute()
    if not root.is_dir():
        raise ConfigError(f"export {root}: not a folder (an export holds an HPS JSON, sparse model "
                          "folders and dense weights)")
    path = _export_json(root, export_json)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"export {root}: cannot read {path.name} ({exc})") from exc
    entries = document.get("models") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: no 'models' list; an export's HPS JSON has one model entry")
    entry = _pick_entry(path, entries, export_model)
    # Parsed alone (the export's tiers are not the server's): field checks with names and file.
    parsed = parse_config({"supportlonglong": serving.supportlonglong, "models": [entry]}, str(path))
    model = parsed.models[0]
    if serving_model is not None and model.num_tables != serving_model.num_tables:
        raise ConfigError(
            f"{path}: model {model.model!r} has {model.num_tables} tables but the serving version has "
            f"{serving_model.num_tables}; clients send NUMKEYS with one entry per table, so a version "
            "cannot change the table count: publish it as a new model instead")
    rows = tuple(_check_table(t.sparse_file, t.name, t.dim, serving.supportlonglong) for t in model.tables)
    weights = _check_dense(root, model) if dense else None
    if weights is not None:
        (dense_check or check_dense_loads)(weights)
    resolved = {**entry, "sparse_files": list(model.sparse_files)}
    return Export(folder=root, hps_json=path, entry=resolved, model=model, rows=rows,
                  dense_weights=weights, fingerprint=_export_fingerprint(path, model, weights))


def _export_json(root: Path, name: str | None) -> Path:
    if name is not None:
        path = root / name
        if not path.is_file():
            raise ConfigError(f"export {root}: {name} not found")
        return path
    if (root / HPS_JSON).is_file():
        return root / HPS_JSON
    found = sorted(p for p in root.glob("*.json") if p.name != Path(DENSE_WEIGHTS).with_suffix(".json").name)
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise ConfigError(f"export {root}: no hps.json and {len(found)} other JSON files ({listed}); "
                          "name the HPS JSON with --export-json")
    return found[0]


def _pick_entry(path: Path, entries: list[Any], name: str | None) -> dict[str, Any]:
    names = [e.get("model") if isinstance(e, dict) else None for e in entries]
    if name is None:
        if len(entries) != 1:
            raise ConfigError(f"{path}: {len(entries)} model entries ({names}); choose one with --export-model")
        chosen = entries[0]
    elif name in names:
        chosen = entries[names.index(name)]
    else:
        raise ConfigError(f"{path}: no model entry {name!r}; its entries are {names}")
    if not isinstance(chosen, dict):
        raise ConfigError(f"{path}: the model entry is not an object")
    return dict(chosen)


def _check_table(folder: str, name: str, dim: int, long_keys: bool) -> int:
    """Rows of one sparse folder after checking sizes, keys and values; FormatError otherwise."""
    what = f"table {name!r} ({folder})"
    try:
        table = read_sparse_model(folder, dim)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from exc
    check_unique_keys(np.asarray(table.keys), what)
    if not long_keys and table.keys.size and (table.keys.min() < 0 or table.keys.max() >= 1 << 32):
        raise FormatError(f"{what}: keys outside 0..2^32-1 but the serving config has supportlonglong: false")
    step = 1 << 18
    for lo in range(0, len(table), step):
        chunk = np.asarray(table.vectors[lo:lo + step])
        bad = non_finite_rows(chunk)
        if bad.shape[0]:
            row = lo + int(bad[0])
            raise FormatError(f"{what}: the row of key {int(table.keys[row])} (row {row}) holds NaN or infinity")
    return len(table)


def _check_dense(root: Path, model: ModelConfig) -> Path:
    """The export's dense weights (``dense.pt`` + ``dense.json``), checked against its tables."""
    weights = root / DENSE_WEIGHTS
    hparams = weights.with_suffix(".json")
    for path in (weights, hparams):
        if not path.is_file():
            raise FormatError(f"export {root}: dense weights {path.name} missing (an export holds "
                              f"{DENSE_WEIGHTS} and its {hparams.name}, as backend/dlrm/network.py's save_dense writes)")
    try:
        meta = json.loads(hparams.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{hparams}: not readable JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != DENSE_FORMAT:
        raise FormatError(f"{hparams}: format is {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                          f"expected {DENSE_FORMAT!r}")
    dims = set(model.embedding_vecsize_per_table)
    if meta.get("n_tables") != model.num_tables or dims != {meta.get("dim")}:
        raise FormatError(
            f"{hparams}: the dense network takes {meta.get('n_tables')} tables of dim {meta.get('dim')} but the "
            f"export's HPS JSON has {model.num_tables} tables of dims {sorted(dims)}: the dense weights do not "
            "belong to these sparse tables")
    try:
        with zipfile.ZipFile(weights) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{weights}: not a PyTorch state_dict file ({exc})") from exc
    if not any(n.endswith("/data.pkl") for n in names):
        raise FormatError(f"{weights}: a zip without data.pkl, not a PyTorch state_dict file")
    return weights


_DENSE_LOADER = """
import ctypes, os, sys
if sys.platform.startswith("linux"):  # die with publish-model (PR_SET_PDEATHSIG = 1, SIGKILL = 9)
    ctypes.CDLL(None).prctl(1, 9)
    if os.getppid() != int(sys.argv[2]):  # it died before prctl took effect
        sys.exit(4)
try:
    from backend.dlrm.network import load_dense
except ImportError as exc:
    print(exc)
    sys.exit(3)
try:
    load_dense(sys.argv[1])
except Exception as exc:
    print(" ".join(f"{type(exc).__name__}: {exc}".split()))
    sys.exit(1)
"""


def check_dense_loads(weights: Path, *, timeout: float = 300.0) -> None:
    """Load ``weights`` into the dense network, as Triton's dense model will
    (backend/dlrm/network.py's ``load_dense``: the network built from ``dense.json``, the
    state_dict loaded strictly), so that a tensor of the wrong shape or name is refused before
    anything changes; FormatError with the loader's message.

    In a child Python process: hps_core imports neither torch nor backend (the layering rule of
    tests/hps_core/test_package.py; backend imports hps_core, never the reverse). Where torch or
    the backend package is not installed, the check is skipped with a log line (the files'
    checks of :func:`validate_export` still ran). The child asks the kernel to SIGKILL it when
    its parent dies (``PR_SET_PDEATHSIG``), so a killed publish-model leaves no process behind
    (issue 19: it kept loading torch for seconds after)."""
    env = dict(os.environ)
    root = Path(__file__).resolve().parent.parent  # the checkout beside hps_core, where backend/ lives
    if (root / "backend" / "dlrm" / "network.py").is_file():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-c", _DENSE_LOADER, str(weights), str(os.getpid())]
    try:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as child:
            _crash_point("validate.dense")
            try:
                stdout, stderr = child.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                raise
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FormatError(f"{weights}: the dense weights could not be loaded into the network ({exc})") from exc
    message = (stdout.strip() or stderr.strip()).splitlines()[-1:] or [""]
    if child.returncode == 3:
        log.info("%s: not loaded into the dense network during validation (%s)", weights, message[0])
        return
    if child.returncode != 0:
        raise FormatError(f"{weights}: the dense weights do not load into the network {weights.with_suffix('.json').name} "
                          f"describes: {message[0] or stderr.strip()[-2000:]}")


def _export_fingerprint(path: Path, model: ModelConfig, weights: Path | None) -> str:
    digest = hashlib.sha256(path.read_bytes())
    for folder in model.sparse_files:
        digest.update(fingerprint(folder).encode())
    for file in (weights, weights.with_suffix(".json")) if weights else ():
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:32]


# --------------------------------------------------------------------------- write
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def find_resumable_version(target: PublishTarget, export: Export, serving: int) -> int | None:
    """The version of an unfinished publication of ``export`` (same fingerprint) that can be
    continued while version ``serving`` serves, else None (a new version number).

    Not a failed one (phase ``failed``: it was taken out again, its number is never used again)
    nor a finished one; and only one that was started over the version serving now (its
    ``previous``) or that already serves (it was switched, the clean-up was cut short): one
    started over another version would switch the ensemble back to a version that no longer
    serves. The newest such publication, by number."""
    for number, state_file in sorted(_state_files(target).items(), reverse=True):
        state = _read_json(state_file)
        if state.get("fingerprint") != export.fingerprint or state.get("phase") in ("failed", "done"):
            continue
        if serving in (state.get("previous"), state.get("version")) and state.get("version") == number:
            return number
    return None


def write_version(target: PublishTarget, export: Export, version: int, serving_json: Path) -> WrittenVersion:
    """Write ``export`` as ``version`` of the target's models into the work folder (installed
    into the repository by :func:`install_version`, right before Triton loads it). A version
    already written for this export (a resumed publication) is kept as it is."""
    hps_final = target.model_dir(target.hps_model) / str(version)
    hps_staged = target.staged(target.hps_model, version)
    entry = dict(export.entry)
    entry["model"] = version_entry_name(hps_entry_base(target), version)
    names = [t.name for t in export.model.tables]
    if not (hps_staged / HPS_JSON).is_file() and not (hps_final / HPS_JSON).is_file():
        base = serving_json_document(serving_json)
        with _fresh_folder(hps_staged) as tmp:
            for name, source in zip(names, export.model.sparse_files):
                _link_or_copy_tree(Path(source), tmp / SPARSE_FOLDER / name)
            final = {**entry, "sparse_files": [str(hps_final / SPARSE_FOLDER / n) for n in names]}
            _write_json(tmp / HPS_JSON, {**base, "models": [final]})
    dense_final = target.model_dir(target.dense_model) / str(version) / DENSE_WEIGHTS if target.dense_model else None
    if target.dense_model and export.dense_weights is not None and dense_final is not None:
        dense_staged = target.staged(target.dense_model, version)
        if not dense_final.is_file() and not (dense_staged / DENSE_WEIGHTS).is_file():
            with _fresh_folder(dense_staged) as tmp:
                _link_or_copy(export.dense_weights, tmp / DENSE_WEIGHTS)
                _link_or_copy(export.dense_weights.with_suffix(".json"), tmp / Path(DENSE_WEIGHTS).with_suffix(".json"))
    return WrittenVersion(version=version, hps_json=hps_final / HPS_JSON, dense_weights=dense_final)


def version_config(target: PublishTarget, written: WrittenVersion) -> ParameterServerConfig:
    """The version's HPS JSON, parsed, its sparse files where they are now (the work folder
    before :func:`install_version`, the repository after: the loader's fingerprints do not
    depend on the folder, so a load from either is the same load)."""
    staged = target.staged(target.hps_model, written.version)
    if written.hps_json.is_file():
        return load_config(written.hps_json)
    document = json.loads((staged / HPS_JSON).read_text())
    entry = document["models"][0]
    entry["sparse_files"] = [str(staged / SPARSE_FOLDER / Path(f).name) for f in entry["sparse_files"]]
    return parse_config(document, str(staged / HPS_JSON))


def serving_json_document(path: Path) -> dict[str, Any]:
    """The serving HPS JSON's top-level settings (tiers, update source) with its paths made
    absolute, to be written into another folder; its ``models`` left out."""
    config = load_config(path)  # validates, and resolves relative paths
    document = json.loads(path.read_text(encoding="utf-8"))
    document.pop("models", None)
    persistent = document.get("persistent_db")
    if isinstance(persistent, dict) and config.persistent_db.type is TierType.ROCKS_DB:
        persistent["path"] = config.persistent_db.path
    return dict(document)


@contextlib.contextmanager
def _fresh_folder(final: Path) -> Iterator[Path]:
    """A hidden sibling of ``final`` to fill, renamed to ``final`` when the block ends well."""
    tmp = final.parent / f".{final.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _link_or_copy(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, dest)  # the trainer replaces files by rename, so a link keeps this content
    except OSError:
        shutil.copy2(source, dest)


def _link_or_copy_tree(source: Path, dest: Path) -> None:
    for file in sorted(source.iterdir()):
        if file.is_file():
            _link_or_copy(file, dest / file.name)


def install_version(target: PublishTarget, version: int) -> None:
    """Move the version's folders from the work folder into the repository, the dense model's
    first and the HPS model's right after (an ensemble step at ``model_version: -1`` picks each
    model's highest version, so both appear together)."""
    for model in reversed(target.models):
        staged, final = target.staged(model, version), target.model_dir(model) / str(version)
        if staged.is_dir() and not final.exists():
            staged.rename(final)
            _crash_point("load.install")


def retire_version(target: PublishTarget, version: int) -> list[str]:
    """Move the version's folders out of the repository (into the work folder's ``retired/``,
    outside the repository: Triton would take a folder inside it for a model); the models moved."""
    moved = []
    for model in target.models:
        folder, dest = target.model_dir(model) / str(version), target.retired(model, version)
        if folder.is_dir():
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(dest)
            moved.append(model)
    return moved


# --------------------------------------------------------------------------- bulk load
def bulk_load(config: ParameterServerConfig, *, progress: bool = True,
              chunk_rows: int = DEFAULT_CHUNK_ROWS) -> dict[str, dict[str, int]]:
    """Load the tables of ``config``'s model into its persistent tier and a shared volatile
    tier (not an in-process hash map: each serving process fills its own); ``{tier: {table:
    rows written}}``. Resumable: rows already committed (RocksDB's markers) are not written again."""
    report: dict[str, dict[str, int]] = {}
    tables = config.models[0].tables
    # One open of each tier for all tables; the crash point after each table makes a kill
    # between two tables a test case.
    if config.persistent_db.enabled:
        report.update(WRITE_LOCK_WAIT.call(lambda: load_config_tables(
            config, tables, tier="persistent", progress=progress, chunk_rows=chunk_rows,
            after_table=lambda _: _crash_point("bulk_load.table"))))
    if config.volatile_db.enabled and config.volatile_db.type.shared:
        report.update(load_config_tables(config, tables, tier="volatile", progress=progress, chunk_rows=chunk_rows,
                                         after_table=lambda _: _crash_point("bulk_load.table")))
    return report


def at_low_priority(fn: Callable[[], T], nice: int) -> T:
    """``fn()`` run in a thread of its own whose scheduling priority is lowered by ``nice``
    (Linux: a thread's own nice value, inherited by threads it starts, such as RocksDB's), so
    that a bulk load beside a serving Triton takes the CPU the requests leave; its result, or
    its exception."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        if nice > 0:
            with contextlib.suppress(OSError, AttributeError):
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + nice, 19))
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name="hps-bulk-load")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def drop_tables(config: ParameterServerConfig, model: str, *,
                keep: Collection[str] = (), served_from: str | os.PathLike[str] | None = None
                ) -> dict[str, list[str]]:
    """Drop ``model``'s tables from ``config``'s persistent tier and shared volatile tier (Redis,
    or the host store's files), where the tier can drop tables (``DropTable``), and remove its
    unused shared GPU caches; ``{tier: tables dropped, "gpu_cache": cache files removed}``. Tables named in
    ``keep`` (qualified names another version serves or will serve) are never dropped.
    ``served_from``: the path of the HPS JSON the servers read (default ``config.source``), which
    names the host store's namespace: retiring a version moves its folder, and so its JSON."""
    from hps_core.db import open_persistent_db, open_volatile_db

    names = [t.qualified_name for t in config.model(model).tables]
    kept = [n for n in names if n in keep]
    if kept:
        log.warning("tables %s of model %r are not dropped: another version uses the same names", kept, model)
        names = [n for n in names if n not in keep]
    if not names:
        return {}
    dropped: dict[str, list[str]] = {}
    openers: list[tuple[str, Callable[[], EmbeddingTier | None]]] = []
    if config.persistent_db.enabled and not config.persistent_db.read_only:
        openers.append(("persistent", lambda: WRITE_LOCK_WAIT.call(lambda: open_persistent_db(config.persistent_db))))
    volatile = config.volatile_db
    if volatile.enabled and (volatile.type.shared or (volatile.type.in_process and volatile.host_shared)):
        # Redis, or the host store (whose files hps serve would otherwise keep until it stops),
        # in the namespace of the JSON the servers read, wherever the folder went since
        source = str(served_from) if served_from is not None else config.source
        openers.append(("volatile", lambda: open_volatile_db(volatile, source)))
    # the version's shared GPU caches, in the namespace its servers named them in (hps serve,
    # their keeper, would keep them until it stops)
    served = str(served_from) if served_from is not None else config.source
    caches = remove_unused_gpu_caches(lambda entry: entry == model, namespace_of(volatile, served))
    if caches:
        dropped["gpu_cache"] = caches
    for tier, opener in openers:
        db = opener()
        if db is None:
            continue
        try:
            known = set(db.table_names())
            dropper = db if isinstance(db, DropTable) else None
            if dropper is None:
                log.info("%s tier cannot drop tables: version tables %s stay", tier, names)
                continue
            dropped[tier] = [n for n in names if n in known]
            for name in dropped[tier]:
                dropper.drop_table(name)
                _crash_point("drop.table")
        finally:
            db.close()
    return dropped


# --------------------------------------------------------------------------- the protocol
def _pinned(config: dict[str, Any], versions: dict[str, int]) -> dict[str, Any]:
    """An ensemble config (Triton's JSON) with the steps of ``versions``' models pinned to them."""
    pinned = json.loads(json.dumps(config))
    for step in pinned.get("ensemble_scheduling", {}).get("step", []):
        if step.get("model_name") in versions:
            step["model_version"] = versions[step["model_name"]]
    return dict(pinned)


def _step_versions(config: dict[str, Any]) -> dict[str, int]:
    steps = config.get("ensemble_scheduling", {}).get("step", [])
    return {str(s["model_name"]): int(s.get("model_version", -1)) for s in steps}


def _serving_version(control: ModelControl, target: PublishTarget) -> int:
    """The version the ensemble (or, without one, the HPS model's latest READY version) serves."""
    ready = {m: sorted(v for v, e in control.versions(m).items() if e.state == "READY") for m in target.models}
    for model, versions in ready.items():
        if not versions:
            raise ServingError(f"{control.base}: model '{model}' has no READY version: nothing to publish over "
                               "(start hps serve on the repository first)")
    if target.ensemble:
        pinned = {v for m, v in _step_versions(control.config(target.ensemble)).items() if m in target.models and v > 0}
        if len(pinned) == 1:
            return pinned.pop()
    return ready[target.hps_model][-1]


def publish_model(
    target: PublishTarget,
    export_folder: str | os.PathLike[str],
    control: ModelControl,
    *,
    export_json: str | None = None,
    export_model: str | None = None,
    drain_s: float = 2.0,
    drop_old: bool = True,
    progress: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    bulk_load_nice: int = 10,
    log_line: Callable[[str], None] = lambda line: None,
    dense_check: DenseCheck | None = None,
) -> PublishReport:
    """Publish the export at ``export_folder`` as the next version of ``target`` on the server
    ``control`` talks to (the protocol of the module doc); returns the phase timings.

    A broken export raises before anything changes; a new version that fails to load is taken
    out again (the old one never stopped serving) and raises ServingError with Triton's reason.
    ``bulk_load_nice``: how much lower the bulk load's CPU priority is than the command's
    (:func:`at_low_priority`). ``log_line`` gets a line per step. ``dense_check``: see
    :func:`validate_export`.
    """
    with publication_lock(target):
        _crash_point("validate.locked")
        return _publish(target, export_folder, control, export_json=export_json, export_model=export_model,
                        drain_s=drain_s, drop_old=drop_old, progress=progress, chunk_rows=chunk_rows,
                        bulk_load_nice=bulk_load_nice, log_line=log_line, dense_check=dense_check)


def _publish(target: PublishTarget, export_folder: str | os.PathLike[str], control: ModelControl, *,
             export_json: str | None, export_model: str | None, drain_s: float, drop_old: bool, progress: bool,
             chunk_rows: int, bulk_load_nice: int, log_line: Callable[[str], None],
             dense_check: DenseCheck | None) -> PublishReport:
    """:func:`publish_model` under the publication lock."""
    report = PublishReport()
    with report.phase("validate"):
        current = _serving_version(control, target)
        serving_json = serving_hps_json(target, current)
        serving = load_config(serving_json)
        serving_model = serving.model(version_model_name(serving, hps_entry_base(target), current))
        export = validate_export(export_folder, serving=serving, serving_model=serving_model,
                                 export_json=export_json, export_model=export_model, dense=target.dense_model is not None,
                                 dense_check=dense_check)
        resumed = find_resumable_version(target, export, current)
        version = resumed if resumed is not None else next_version(target)
        state_file = target.state_file(version)
        state = (_read_json(state_file) if resumed is not None else {}) or {
            "version": version, "fingerprint": export.fingerprint, "export": str(export.folder), "phase": "validated",
            "previous": current, "previous_model": serving_model.model, "previous_json": str(serving_json)}
        previous, old_model = int(state["previous"]), str(state["previous_model"])
        _write_json(state_file, state)
        _crash_point("validate.done")
    report.version, report.previous, report.resumed = version, previous, resumed is not None
    log_line(f"export {export.folder}: {export.model.num_tables} tables, {sum(export.rows):,} rows; "
             f"version {previous} serving, publishing version {version}" + (" (resumed)" if resumed else ""))

    def reached(phase: str) -> None:
        state["phase"] = phase
        _write_json(state_file, state)

    with report.phase("write"):
        if target.ensemble and current == previous:  # an ensemble at -1 would pick up each model's new version alone
            config = control.config(target.ensemble)
            wanted = {m: previous for m in target.models}
            if any(_step_versions(config).get(m) != v for m, v in wanted.items()):
                _load_ensemble(control, target, _pinned(config, wanted), restore=config,
                               what=f"pinning it to version {previous}")
                log_line(f"ensemble '{target.ensemble}' pinned to version {previous}")
            _pin_on_disk(target, wanted)  # also when Triton had it pinned already (an older run)
            _crash_point("write.pinned")
        written = write_version(target, export, version, serving_json)
        _crash_point("write.done")
    with report.phase("bulk_load"):
        new_config = version_config(target, written)
        report.rows_loaded = at_low_priority(lambda: bulk_load(new_config, progress=progress, chunk_rows=chunk_rows),
                                             bulk_load_nice)
        reached("loaded")
        _crash_point("bulk_load.done")
    log_line(f"bulk load: {sum(sum(t.values()) for t in report.rows_loaded.values()):,} rows written "
             f"({', '.join(report.rows_loaded) or 'no shared tier'})")
    with report.phase("load"):
        install_version(target, version)
        try:
            with ThreadPoolExecutor(len(target.models)) as pool:  # both models load at once
                for model, seconds in zip(target.models, pool.map(lambda m: _timed(control.load, m, versions=[version]),
                                                                   target.models)):
                    report.model_load_s[model] = seconds
        except ServingError as exc:
            gone = _take_back(target, control, version, previous)
            reached("failed")
            tables = f"its tables ({new_config.models[0].model}) "
            if gone:  # its rows are of no use: the next attempt is another version
                try:
                    drop_tables(new_config, new_config.models[0].model, keep=_tables_in_use(target, serving),
                                served_from=target.model_dir(target.hps_model) / str(version) / HPS_JSON)
                    tables += "were dropped"
                except HPSError as drop_error:
                    tables += f"could not be dropped ({drop_error})"
            else:  # an instance of it may still be reading them
                tables += ("were kept in the tiers: Triton did not confirm that the version unloaded, so an "
                           "instance may still read them; they are unused once `hps models list` shows it gone")
                log.warning("version %d: %s", version, tables)
            raise ServingError(f"version {version} did not load, so it was taken out again and version {previous} "
                               f"serves on (its folders are in {target.work / 'failed'}; {tables}): {exc}") from exc
        reached("installed")
        _crash_point("load.done")
    log_line(f"version {version} READY: " + ", ".join(f"{m} in {t:.2f} s" for m, t in report.model_load_s.items()))
    with report.phase("switch"):
        _crash_point("switch.start")
        if target.ensemble:
            _switch(control, target, version, previous)
            log_line(f"ensemble '{target.ensemble}' switched to version {version}")
        reached("switched")
        _crash_point("switch.done")
    with report.phase("unload"):
        if previous != version:
            time.sleep(drain_s)  # requests the old ensemble config took are answered
            retire_version(target, previous)
            _crash_point("unload.retired")
            for model in target.models:
                _unload_version(control, model, previous, version)
                _crash_point("unload.model")
        log_line(f"version {previous} unloaded")
        _crash_point("unload.done")
    if drop_old and previous != version:
        with report.phase("drop"):
            old_json = Path(state["previous_json"])
            if not old_json.is_file():  # a version folder's own JSON: retired with it
                old_json = target.retired(target.hps_model, previous) / HPS_JSON
            report.dropped = drop_tables(load_config(old_json), old_model,
                                         keep=_tables_in_use(target, new_config, first=previous != 1),
                                         served_from=state["previous_json"])
            _crash_point("drop.done")
    reached("done")
    return report


def _unload_version(control: ModelControl, model: str, old: int, new: int, *, timeout: float = 600.0) -> None:
    """Load ``model`` again until version ``old`` (whose folder is gone) is unloaded. Loads are
    repeated: a server serving a staged mirror of the repository sees the folder gone only once
    the mirror follows (``hps serve`` re-syncs it every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        control.load(model, versions=[new])
        try:
            control.wait_gone(model, [old], timeout=2.0)
            return
        except ServingError:
            if time.monotonic() > deadline:
                raise


def _timed(fn: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def _tables_in_use(target: PublishTarget, config: ParameterServerConfig, *, first: bool = True) -> set[str]:
    """The qualified table names of ``config`` (the version that serves on) and, with ``first``
    (the version being dropped is not version 1), of version 1's HPS JSON, every entry: tables
    :func:`drop_tables` must keep (a version entry without its ``_v<N>`` name has version 1's)."""
    names = {t.qualified_name for m in config.models for t in m.tables}
    if first:
        with contextlib.suppress(HPSError, OSError):
            names |= {t.qualified_name for m in load_config(serving_hps_json(target, 1)).models for t in m.tables}
    return names


_TAKE_BACK_TIMEOUT_S = 60.0  # how long a failed version is awaited gone


def _take_back(target: PublishTarget, control: ModelControl, version: int, previous: int) -> bool:
    """A new version failed to load: move its folders out and load again so that Triton drops
    it; the ensemble is still pinned to ``previous``, which never stopped serving. Whether
    Triton confirmed every model's ``version`` gone (else an instance may still read its tables)."""
    for model in target.models:
        folder = target.model_dir(model) / str(version)
        if folder.is_dir():
            dest = target.work / "failed" / model / str(version)
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(dest)
    gone = True
    for model in target.models:
        try:
            _unload_version(control, model, version, previous, timeout=_TAKE_BACK_TIMEOUT_S)
        except ServingError as exc:
            log.warning("version %d of %r: not confirmed unloaded (%s)", version, model, exc)
            gone = False
    return gone


def _switch(control: ModelControl, target: PublishTarget, version: int, previous: int) -> None:
    """Pin the ensemble to ``version`` in one reload (one request = one ensemble config); on a
    failure restore the pin to ``previous`` at once (a failed override unloads the ensemble)."""
    assert target.ensemble is not None
    for model in target.models:
        control.wait_ready(model, [version])
    config = control.config(target.ensemble)
    _load_ensemble(control, target, _pinned(config, {m: version for m in target.models}),
                   restore=_pinned(config, {m: previous for m in target.models}),
                   what=f"switching it to version {version}")
    _pin_on_disk(target, {m: version for m in target.models})


_STEP_VERSION = r'(model_name\s*:\s*"{model}"\s*,?\s*model_version\s*:\s*)-?\d+'


def _pin_on_disk(target: PublishTarget, versions: dict[str, int]) -> None:
    """Write the ensemble's pin (``versions`` of its steps' models) into its ``config.pbtxt``,
    after Triton took it as an override: a Triton restarted later (``hps serve`` after a crash)
    reads the file and serves the version the running one served, where ``model_version: -1``
    would take each model's newest folder on its own (mid-publication: a mix). A step written
    in another order (version before name) is left as it is, with a warning."""
    assert target.ensemble is not None
    path = target.model_dir(target.ensemble) / "config.pbtxt"
    if not path.is_file():
        return
    text = new = path.read_text()
    for model, version in versions.items():
        new, count = re.subn(_STEP_VERSION.format(model=re.escape(model)), rf"\g<1>{version}", new)
        if not count:
            log.warning("%s: no step 'model_name: \"%s\" model_version: N' to pin to version %d; a restarted "
                        "Triton serves the version that file names", path, model, version)
    if new != text:
        partial = path.with_name(".config.pbtxt.partial")
        partial.write_text(new)
        partial.replace(path)


def _load_ensemble(control: ModelControl, target: PublishTarget, config: dict[str, Any], *,
                   restore: dict[str, Any], what: str) -> None:
    """Load the ensemble with ``config`` (a config override); on a failure (Triton unloads a
    model whose override failed: every request to it fails) load it with ``restore`` at once and
    re-raise. When the restore fails too, one ServingError names both errors, says that the
    ensemble is unloaded and how to bring it back (``restore`` is written beside the state files
    for ``hps models load``)."""
    assert target.ensemble is not None
    try:
        control.load(target.ensemble, config=config)
    except ServingError as exc:
        try:
            control.load(target.ensemble, config=restore)
        except ServingError as restore_error:
            saved = target.work / f"ensemble-{target.ensemble}-restore.json"
            with contextlib.suppress(OSError):
                _write_json(saved, restore)
            raise ServingError(
                f"ensemble '{target.ensemble}': {what} failed ({exc}), and restoring its previous config failed "
                f"too ({restore_error}); the ensemble is UNLOADED: every request to it fails until it is loaded "
                f"again. Bring it back by running the same hps publish-model command again, or with "
                f"`hps models load {target.ensemble} --config {saved}` (with publish-model's --url and "
                f"--api-token-file)") from exc
        raise
