"""The small model repository the end-to-end tests serve, and what it must answer.

The repository holds the committed ensemble (``hps_embedding`` → ``dlrm_dense``, config.pbtxt
files copied unchanged except for paths) over 26 random tables, and ``hps_multi``: a
HugeCTR-sample-style model (KIND_GPU, no parameters) with four tables of widths 1, 3, 16 and 7,
found through ``--backend-config hps,ps=...`` as HugeCTR launched it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hps_core.formats import write_sparse_model

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMITTED_REPOSITORY = REPO_ROOT / "model_repository"

DLRM_TABLES = 26
DLRM_DIM = 8
DLRM_ROWS = 400
MULTI_DIMS = (1, 3, 16, 7)
MULTI_DEFAULTS = (-1.5, 0.25, 0.0, 7.0)
MULTI_ROWS = 300
MAX_BATCH_SIZE = 64  # HPS JSON max_batch_size: samples per request

HUGECTR_STYLE_CONFIG = """\
name: "hps_multi"
backend: "hps"
max_batch_size: 1024
input [
  { name: "KEYS" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "NUMKEYS" data_type: TYPE_INT32 dims: [ -1 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }
]
version_policy: { specific: { versions: 1 } }
instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]
"""


@dataclass(frozen=True)
class Table:
    keys: np.ndarray  # (rows,) int64
    vectors: np.ndarray  # (rows, dim) float32
    default: float

    def expected(self, query: np.ndarray) -> np.ndarray:
        """What the server must return for ``query``: the row, or the default where absent."""
        order = np.argsort(self.keys)
        sorted_keys = self.keys[order]
        pos = np.clip(np.searchsorted(sorted_keys, query), 0, sorted_keys.size - 1)
        hit = sorted_keys[pos] == query
        out = np.full((query.size, self.vectors.shape[1]), self.default, dtype=np.float32)
        out[hit] = self.vectors[order[pos[hit]]]
        return out


@dataclass(frozen=True)
class E2EModels:
    repository: Path
    hps_json: Path
    dense_weights: Path
    dlrm_tables: tuple[Table, ...]
    multi_tables: tuple[Table, ...]


def _random_table(rng: np.random.Generator, rows: int, dim: int, default: float) -> Table:
    keys = rng.choice(np.int64(1) << 40, size=rows, replace=False).astype(np.int64)
    return Table(keys, rng.normal(size=(rows, dim)).astype(np.float32), default)


def _model_entry(name: str, folder: Path, tables: tuple[Table, ...], max_keys: list[int]) -> dict:
    files = []
    for i, table in enumerate(tables):
        path = folder / f"{name}_table{i}.model"
        write_sparse_model(path, table.keys, table.vectors)
        files.append(str(path))
    return {
        "model": name,
        "sparse_files": files,
        "embedding_table_names": [f"t{i}" for i in range(len(tables))],
        "embedding_vecsize_per_table": [int(t.vectors.shape[1]) for t in tables],
        "default_value_for_each_table": [t.default for t in tables],
        "maxnum_catfeature_query_per_table_per_sample": max_keys,
        "deployed_device_list": [0],
        "max_batch_size": MAX_BATCH_SIZE,
        "gpucache": True,
        "gpucacheper": 0.5,
        # 1.0: every batch with a miss inserts synchronously, so answers are exact on a GPU
        # too (below 1.0 a warm batch gets defaults for its misses, HugeCTR's trade-off)
        "hit_rate_threshold": 1.0,
    }


def build_models(root: Path) -> E2EModels:
    """Write tables, dense weights, HPS JSON and model repository under ``root``."""
    from backend.dlrm.network import DenseDLRM, save_dense

    rng = np.random.default_rng(7)
    data = root / "data"
    data.mkdir(parents=True)
    dlrm_tables = tuple(_random_table(rng, DLRM_ROWS, DLRM_DIM, 0.0) for _ in range(DLRM_TABLES))
    multi_tables = tuple(_random_table(rng, MULTI_ROWS, d, v) for d, v in zip(MULTI_DIMS, MULTI_DEFAULTS))
    repository = root / "repository"
    shutil.copytree(COMMITTED_REPOSITORY, repository, ignore=shutil.ignore_patterns("hps.json"))
    hps_json = repository / "hps_embedding" / "hps.json"
    hps_json.write_text(json.dumps({
        "supportlonglong": True,
        "volatile_db": {"type": "hash_map", "num_partitions": 2, "initial_cache_rate": 0.5},
        "persistent_db": {"type": "rocks_db", "path": str(root / "rocksdb")},
        "models": [
            _model_entry("hps_embedding", data, dlrm_tables, [1] * DLRM_TABLES),
            _model_entry("hps_multi", data, multi_tables, [2, 1, 3, 1]),
        ],
    }, indent=2))
    torch_seed = int(rng.integers(1 << 31))
    import torch

    torch.manual_seed(torch_seed)
    dense_weights = save_dense(DenseDLRM(n_tables=DLRM_TABLES, dim=DLRM_DIM), root / "dense" / "dense.pt")
    dense_config = repository / "dlrm_dense" / "config.pbtxt"
    text = dense_config.read_text()
    assert "../../work/demo/dense.pt" in text  # the committed path this test swaps
    dense_config.write_text(text.replace("../../work/demo/dense.pt", str(dense_weights)))
    multi = repository / "hps_multi"
    (multi / "1").mkdir(parents=True)
    (multi / "config.pbtxt").write_text(HUGECTR_STYLE_CONFIG)
    return E2EModels(repository, hps_json, dense_weights, dlrm_tables, multi_tables)


