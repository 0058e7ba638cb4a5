"""Compact row formats through a real Triton: what is stored packed is served as its reference,
and a table stored in another format than the config's fails the model's load, saying so.

- A HugeCTR-style model (KIND_GPU, no parameters, ``--backend-config hps,ps=...``) whose HPS
  JSON sets HugeCTR's ``fp8_quant: true``: every tier and the cache store fp8 rows, and
  ``OUTPUT0`` (float32) equals ``unpack(pack(rows))`` of the sparse files, over HTTP and gRPC,
  cold and warm.
- A persistent RocksDB written as int8 by ``hps load``, then served with a config that says
  fp32: Triton fails to load the model, and the reason (the table, both formats, the config
  file) reaches the error.

Each test starts its own Triton (a few seconds each); they are kept to these two.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hps_core.errors import ServingError
from hps_core.formats import write_sparse_model
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import pack, unpack
from hps_core.serving import TritonServer
from hps_demo.client import infer, make_client
from tests.e2e.models import HUGECTR_STYLE_CONFIG, REPO_ROOT, Table

pytestmark = pytest.mark.triton

MODEL = "hps_fp8"
DIMS = (8, 3)
DEFAULTS = (0.5, -1.0)
ROWS = 200


def _tables(root: Path) -> tuple[list[str], tuple[Table, ...]]:
    """Two sparse files of rows whose magnitudes differ from row to row (each fp8 row has its
    own scale) and the folders they are written to."""
    rng = np.random.default_rng(11)
    files, tables = [], []
    for i, (dim, default) in enumerate(zip(DIMS, DEFAULTS)):
        keys = rng.choice(np.int64(1) << 40, size=ROWS, replace=False).astype(np.int64)
        vectors = (rng.normal(size=(ROWS, dim)) * np.logspace(-3, 3, ROWS)[:, None]).astype(np.float32)
        path = root / "data" / f"t{i}.model"
        write_sparse_model(path, keys, vectors)
        files.append(str(path))
        tables.append(Table(keys, vectors, default))
    return files, tuple(tables)


def _repository(root: Path, files: list[str], model_fields: dict[str, object]) -> tuple[Path, Path]:
    """A repository with one HugeCTR-style model, and its HPS JSON (RocksDB under ``root``)."""
    folder = root / "repository" / MODEL
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(HUGECTR_STYLE_CONFIG.replace('name: "hps_multi"', f'name: "{MODEL}"'))
    hps_json = root / "hps.json"
    hps_json.write_text(json.dumps({
        "supportlonglong": True,
        "volatile_db": {"type": "hash_map", "num_partitions": 2, "initial_cache_rate": 0.5},
        "persistent_db": {"type": "rocks_db", "path": str(root / "rocksdb")},
        "models": [{
            "model": MODEL,
            "sparse_files": files,
            "embedding_table_names": [f"t{i}" for i in range(len(files))],
            "embedding_vecsize_per_table": list(DIMS),
            "default_value_for_each_table": list(DEFAULTS),
            "maxnum_catfeature_query_per_table_per_sample": [4, 4],
            "deployed_device_list": [0],
            "max_batch_size": 128,
            "gpucache": True,
            "gpucacheper": 0.5,
            "hit_rate_threshold": 1.0,  # misses are inserted before answering: exact answers
            **model_fields,
        }],
    }, indent=2))
    return root / "repository", hps_json


def _server(repository: Path, hps_json: Path) -> TritonServer:
    return TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, exit_timeout=2,
                        backend_config=[f"hps,ps={hps_json}"])


@pytest.mark.timeout(240)
def test_fp8_quant_serves_the_fp8_reference_rows(tmp_path: Path) -> None:
    files, tables = _tables(tmp_path)
    repository, hps_json = _repository(tmp_path, files, {"fp8_quant": True})
    reference = tuple(Table(t.keys, unpack(RowFormat.FP8, pack(RowFormat.FP8, t.vectors), t.vectors.shape[1]),
                            t.default) for t in tables)
    rng = np.random.default_rng(2)
    per_table = [np.where(rng.random(ROWS) < 0.2, rng.integers(-(1 << 40), -1, size=ROWS), t.keys) for t in tables]
    keys = np.concatenate(per_table).astype(np.int64)
    numkeys = np.array([k.size for k in per_table], np.int32)
    expected = np.concatenate([t.expected(k).ravel() for t, k in zip(reference, per_table)])
    with _server(repository, hps_json) as server:
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url), ("http", server.http_url)):
            served = infer(make_client(protocol, url), MODEL, {"KEYS": keys[None], "NUMKEYS": numkeys[None]},
                           "OUTPUT0")
            np.testing.assert_array_equal(served[0], expected)  # the fp8 rows, bit for bit, cold and warm
    exact = np.concatenate([t.expected(k).ravel() for t, k in zip(tables, per_table)])
    assert not np.array_equal(expected, exact)  # fp8 changed the rows: this is not the fp32 answer


@pytest.mark.timeout(240)
def test_a_table_stored_as_int8_fails_a_model_configured_fp32(tmp_path: Path) -> None:
    files, _ = _tables(tmp_path)
    repository, hps_json = _repository(tmp_path, files, {"embedding_format_per_table": "int8"})
    loaded = subprocess.run([sys.executable, "-m", "hps_core.cli", "load", "--config", str(hps_json), "--no-progress"],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert loaded.returncode == 0, loaded.stderr
    assert f"hps_et.{MODEL}.t0: {ROWS} rows written" in loaded.stdout
    doc = json.loads(hps_json.read_text())
    del doc["models"][0]["embedding_format_per_table"]  # the same model, fp32 (the default), over the int8 RocksDB
    hps_json.write_text(json.dumps(doc))
    with pytest.raises(ServingError) as info:
        _server(repository, hps_json).start()
    message = str(info.value)
    assert f"table 'hps_et.{MODEL}.t0'" in message, message
    assert "stores int8 rows, but fp32 was asked for" in message, message
    assert str(hps_json) in message, message
