"""Model versions of a small DLRM whose served scores can be computed in-process.

What the version tests (tests/e2e/test_model_versions.py) and scripts/bench_model_switch.py
publish: :func:`make_version` draws version ``v`` of a DLRM (its embedding tables, the same
keys in every version, and a dense network from its own seed) and :func:`write_export` writes
it as a HugeCTR-style export folder, what ``hps publish-model`` takes::

    <export>/hps.json             one model entry: sparse_files, dims, names, defaults
    <export>/sparse/t<i>/key      HugeCTR sparse model folders
    <export>/sparse/t<i>/emb_vector
    <export>/dense.pt, dense.json the dense network (backend/dlrm/network.py)

:func:`expected_scores` is what the served ensemble must answer for a request: the version's
embeddings gathered and its dense network run in this process. Embeddings of one version
scored by the other's network give other scores (:func:`mixed_scores`), so an answer that
mixes versions is told apart from both.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from backend.dlrm.network import DenseDLRM, predict, save_dense
from hps_core.formats import write_sparse_model
from hps_core.repository import rewrite_instance_groups_to_cpu

__all__ = [
    "Answer",
    "DLRMVersion",
    "LoadThread",
    "build_repository",
    "classify",
    "distinguishable",
    "expected_scores",
    "make_version",
    "mixed_scores",
    "request_keys",
    "version_combinations",
    "write_export",
]

N_DENSE = 13


@dataclass(frozen=True)
class DLRMVersion:
    """One version: keys (shared by all versions), its rows and its dense network."""

    version: int
    keys: tuple[npt.NDArray[np.int64], ...]  # per table: (rows,)
    vectors: tuple[npt.NDArray[np.float32], ...]  # per table: (rows, dim)
    dense: DenseDLRM

    @property
    def dim(self) -> int:
        return int(self.vectors[0].shape[1])


def make_version(version: int, *, tables: int, rows: int | Sequence[int], dim: int, seed: int = 0,
                 bottom: Sequence[int] = (16, 8), top: Sequence[int] = (16, 8)) -> DLRMVersion:
    """Version ``version`` (``rows`` per table, or one count for all): the keys depend on
    ``seed`` only, the rows and the network on both."""
    counts = [rows] * tables if isinstance(rows, int) else list(rows)
    key_rng = np.random.default_rng(seed)
    keys = tuple(np.sort(key_rng.choice(1 << 40, size=n, replace=False)).astype(np.int64) for n in counts)
    rng = np.random.default_rng([seed, version])
    vectors = tuple(rng.normal(scale=0.5, size=(n, dim)).astype(np.float32) for n in counts)
    torch.manual_seed(seed * 1000 + version)
    dense = DenseDLRM(n_dense=N_DENSE, n_tables=tables, dim=dim, bottom=bottom, top=top).eval()
    return DLRMVersion(version, keys, vectors, dense)


def write_export(model: DLRMVersion, folder: Path, *, name: str = "hps_embedding", max_batch_size: int = 64) -> Path:
    """Write ``model`` as an export folder (layout in the module doc); returns ``folder``."""
    files = []
    for i, (keys, vectors) in enumerate(zip(model.keys, model.vectors)):
        path = folder / "sparse" / f"t{i}"
        write_sparse_model(path, keys, vectors)
        files.append(f"sparse/t{i}")
    entry: dict[str, Any] = {
        "model": name,
        "sparse_files": files,
        "embedding_table_names": [f"t{i}" for i in range(len(files))],
        "embedding_vecsize_per_table": [model.dim] * len(files),
        "default_value_for_each_table": [0.0] * len(files),
        "maxnum_catfeature_query_per_table_per_sample": [1] * len(files),
        "max_batch_size": max_batch_size,
        "gpucache": True,
        "gpucacheper": 0.5,
        "hit_rate_threshold": 1.0,
    }
    (folder / "hps.json").write_text(json.dumps({"supportlonglong": True, "models": [entry]}, indent=2) + "\n")
    save_dense(model.dense, folder / "dense.pt")
    return folder


def request_keys(model: DLRMVersion, batch: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """(batch, T) keys, one present key per table and sample."""
    return np.stack([k[rng.integers(0, k.size, size=batch)] for k in model.keys], axis=1)


def _embeddings(model: DLRMVersion, keys: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.float32]:
    """(B, T, dim): each key's row in ``model`` (every key must be present)."""
    rows = [v[np.searchsorted(k, keys[:, t])] for t, (k, v) in enumerate(zip(model.keys, model.vectors))]
    return np.stack(rows, axis=1)


def mixed_scores(sparse: DLRMVersion, dense: DLRMVersion, keys: npt.NDArray[np.integer[Any]],
                 features: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """(B,) scores of ``sparse``'s embeddings through ``dense``'s network."""
    emb = torch.from_numpy(_embeddings(sparse, keys))
    return predict(dense.dense, torch.from_numpy(np.asarray(features, dtype=np.float32)), emb).numpy()


def expected_scores(model: DLRMVersion, keys: npt.NDArray[np.integer[Any]],
                    features: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """(B,) what the served ensemble answers for version ``model``."""
    return mixed_scores(model, model, keys, features)


def build_repository(root: Path, first: DLRMVersion, *, rocksdb: Path, volatile: dict[str, Any] | None = None,
                     cpu: bool = True) -> Path:
    """A model repository serving ``first`` as version 1 of the committed ``dlrm`` ensemble
    (``hps_embedding`` → ``dlrm_dense``), its HPS JSON over ``rocksdb`` and the ``volatile``
    tier settings (default: the in-process hash map); ``cpu`` asks for KIND_CPU instances, so
    Triton serves the folder itself, not a staged copy. Returns the repository."""
    committed = Path(__file__).resolve().parents[1] / "model_repository"
    repository = root / "repository"
    shutil.copytree(committed, repository, ignore=shutil.ignore_patterns("hps.json"))
    export = write_export(first, root / "export_v1")
    entry = json.loads((export / "hps.json").read_text())["models"][0]
    entry["sparse_files"] = [str(export / f) for f in entry["sparse_files"]]
    (repository / "hps_embedding" / "hps.json").write_text(json.dumps({
        "supportlonglong": True,
        "volatile_db": volatile or {"type": "hash_map", "num_partitions": 2, "initial_cache_rate": 1.0},
        "persistent_db": {"type": "rocks_db", "path": str(rocksdb)},
        "models": [entry],
    }, indent=2) + "\n")
    for config in repository.glob("*/config.pbtxt"):
        text = config.read_text().replace("../../work/demo/dense.pt", str(export / "dense.pt"))
        if config.parent.name != "dlrm" and "version_policy" not in text:
            text += "version_policy: { all {} }\n"  # every version folder served: N+1 loads beside N
        config.write_text(rewrite_instance_groups_to_cpu(text)[0] if cpu else text)
    return repository


# --------------------------------------------------------------------------- under load
@dataclass(frozen=True)
class Answer:
    """One request sent by :class:`LoadThread`."""

    index: int  # which of the thread's requests
    sent: float  # time.monotonic() when sent
    seconds: float  # latency
    scores: npt.NDArray[np.generic] | None  # (B,) SCORE, None when it failed
    error: str = ""


class LoadThread:
    """A client thread sending ``requests`` (inputs dicts) round-robin to ``model`` over HTTP
    until stopped, one at a time; every answer is kept (:attr:`answers`)."""

    def __init__(self, url: str, requests: Sequence[Mapping[str, npt.NDArray[np.generic]]], *, model: str = "dlrm",
                 protocol: str = "http") -> None:
        import threading

        from hps_demo.client import infer, make_client

        self.answers: list[Answer] = []
        self._stop = threading.Event()
        client = make_client(protocol, url)

        def run() -> None:
            i = 0
            while not self._stop.is_set():
                index = i % len(requests)
                sent = time.monotonic()
                try:
                    scores = infer(client, model, requests[index], "SCORE").reshape(-1)
                    self.answers.append(Answer(index, sent, time.monotonic() - sent, scores))
                except Exception as exc:  # noqa: BLE001 - every failure is an answer to count
                    self.answers.append(Answer(index, sent, time.monotonic() - sent, None, str(exc)))
                i += 1

        self._thread = threading.Thread(target=run, daemon=True, name="load")

    def __enter__(self) -> LoadThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Answer]:
        self._stop.set()
        self._thread.join(60)
        return self.answers


def classify(answer: Answer, expected: Mapping[str, Sequence[npt.NDArray[np.floating[Any]]]], *, atol: float = 1e-5) -> str:
    """The name of the combination whose scores ``answer`` matches (``expected``: name → one
    (B,) array per request), ``"failed"``, or ``"unknown"`` when it matches none."""
    if answer.scores is None:
        return "failed"
    for name, scores in expected.items():
        if np.allclose(answer.scores, scores[answer.index], rtol=0, atol=atol):
            return name
    return "unknown"


def version_combinations(
    old: DLRMVersion, new: DLRMVersion,
    requests: Sequence[tuple[npt.NDArray[np.integer[Any]], npt.NDArray[np.floating[Any]]]],
) -> dict[str, list[npt.NDArray[np.float32]]]:
    """Expected scores per request of the four combinations of sparse rows and dense weights:
    ``v<old>``, ``v<new>`` and the two mixes (``sparse v<a> + dense v<b>``)."""
    combos = {f"v{old.version}": (old, old), f"v{new.version}": (new, new),
              f"sparse v{old.version} + dense v{new.version}": (old, new),
              f"sparse v{new.version} + dense v{old.version}": (new, old)}
    return {name: [mixed_scores(s, d, keys, dense) for keys, dense in requests] for name, (s, d) in combos.items()}


def distinguishable(combinations: Mapping[str, Sequence[npt.NDArray[np.floating[Any]]]], *, margin: float = 1e-4) -> bool:
    """Whether every pair of combinations differs by more than ``margin`` in some sample of every request."""
    names = list(combinations)
    return all(
        np.abs(combinations[a][r] - combinations[b][r]).max() > margin
        for i, a in enumerate(names) for b in names[i + 1:] for r in range(len(combinations[a]))
    )
