"""Scale-out on CPU: two Triton servers over one repository, one Redis Cluster, one update stream.

The layout of a multi-node HugeCTR deployment, on loopback: a 3-node Redis Cluster is the
shared volatile tier (loaded once, before the servers start), a Kafka-protocol broker (tansu)
carries the updates, and two ``tritonserver`` processes serve the same model repository.
Updates are published once; both servers must then answer the newest vectors over HTTP.

Why applying once is enough: a Redis Cluster volatile tier is shared, so its update consumer
group is ``hps.volatile`` with no host suffix (HugeCTR's naming). The two servers join the
same group and split the partitions between them, each applying its share into the one
Redis, from which both serve. ``hps_updates_applied_total`` summed over both servers is
therefore the number published (at least once: a rebalance may repeat an uncommitted tail),
not twice that. The persistent tier is disabled here: RocksDB is per node, and its group
``hps.persistent.<hostname>`` would split the stream between two servers on one host (see
docs/deployment.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hps_core.config import load_config
from hps_core.formats import write_sparse_model
from hps_core.loader import load_config_tables
from hps_core.serving import TritonServer
from hps_core.updates import UpdateSink
from hps_demo.client import infer, make_client
from hps_demo.tools import ToolNotFoundError
from tests.e2e.models import COMMITTED_REPOSITORY
from tests.e2e.test_metrics import scrape, total
from tests.kafka_broker import KafkaBroker
from tests.redis_servers import RedisProcesses

pytestmark = [pytest.mark.triton, pytest.mark.redis, pytest.mark.kafka, pytest.mark.slow]

MODEL = "hps_embedding"
TABLES = 3
DIM = 8
ROWS = 400
UPDATED = 120  # keys per table that get a new vector


def _rows(keys: np.ndarray, table: int, version: int) -> np.ndarray:
    """Recognisable vectors: key, table and version can be read back from the values."""
    return (keys[:, None] * 100 + np.arange(DIM) + 10 * table + 100_000 * version).astype(np.float32)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisProcesses, KafkaBroker]]:
    try:
        broker = KafkaBroker()
    except ToolNotFoundError as exc:
        pytest.skip(f"needs the tansu Kafka broker: {exc}")
    with RedisProcesses.cluster(tmp_path_factory.mktemp("redis"), nodes=3) as cluster, broker:
        yield cluster, broker


def _repository(root: Path, redis_address: str, brokers: str) -> Path:
    """One model folder (the committed hps_embedding config.pbtxt) and its hps.json."""
    keys = np.arange(ROWS, dtype=np.int64)
    files = []
    for t in range(TABLES):
        path = root / "data" / f"table{t}.model"
        write_sparse_model(path, keys, _rows(keys, t, 0))
        files.append(str(path))
    model_dir = root / "repository" / MODEL
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text((COMMITTED_REPOSITORY / MODEL / "config.pbtxt").read_text())
    (model_dir / "hps.json").write_text(json.dumps({
        "supportlonglong": True,
        "volatile_db": {"type": "redis_cluster", "address": redis_address, "num_partitions": 4,
                        "initial_cache_rate": 1.0},
        "persistent_db": {"type": "disabled"},
        "update_source": {"type": "kafka_message_queue", "brokers": brokers, "poll_timeout_ms": 50,
                          "metadata_refresh_interval_ms": 1000},
        "models": [{
            "model": MODEL, "sparse_files": files,
            "embedding_table_names": [f"table{t}" for t in range(TABLES)],
            "embedding_vecsize_per_table": [DIM] * TABLES,
            "maxnum_catfeature_query_per_table_per_sample": [1] * TABLES,
            "default_value_for_each_table": [0.0] * TABLES,
            "max_batch_size": ROWS, "gpucache": False,
        }],
    }, indent=2))
    return root / "repository"


def _served(server: TritonServer, keys: np.ndarray) -> np.ndarray:
    """(TABLES, n, DIM): what the server answers over HTTP for ``keys`` in every table."""
    request = {"KEYS": np.tile(keys, TABLES).reshape(1, -1).astype(np.int64),
               "NUMKEYS": np.full((1, TABLES), keys.size, dtype=np.int32)}
    out = infer(make_client("http", server.http_url), MODEL, request, "OUTPUT0")
    return out.reshape(TABLES, keys.size, DIM)


def _expected(keys: np.ndarray, version: int) -> np.ndarray:
    return np.stack([_rows(keys, t, version) for t in range(TABLES)])


def test_two_servers_share_one_redis_cluster_and_one_update_stream(
    services: tuple[RedisProcesses, KafkaBroker], tmp_path: Path
) -> None:
    cluster, broker = services
    repository = _repository(tmp_path, cluster.address, broker.bootstrap)
    config = load_config(repository / MODEL / "hps.json")
    loaded = load_config_tables(config, config.model(MODEL).tables, tier="volatile")  # once, before any server
    assert all(rows == ROWS for rows in loaded["volatile"].values())

    keys = np.arange(ROWS, dtype=np.int64)
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0) as a, \
            TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0) as b:
        for server in (a, b):
            np.testing.assert_array_equal(_served(server, keys), _expected(keys, 0))

        updated = np.random.default_rng(0).choice(keys, size=UPDATED, replace=False)
        with UpdateSink(broker.bootstrap) as sink:
            for t in range(TABLES):
                sink.publish(MODEL, f"table{t}", updated, _rows(updated, t, 1))
            sink.flush()

        deadline = time.monotonic() + 90  # group join (~4 s on tansu) + topic discovery (1 s)
        want = _expected(keys, 0)
        want[:, updated] = _expected(updated, 1)
        for server in (a, b):
            while not np.array_equal(_served(server, keys), want):
                assert time.monotonic() < deadline, "updates not visible through both servers"
                time.sleep(0.2)

        # Each update was applied by one of the two servers into the shared Redis, not by both.
        applied = 0.0
        deadline = time.monotonic() + 10  # the backends publish metrics once a second
        while applied < TABLES * UPDATED and time.monotonic() < deadline:
            time.sleep(0.3)
            applied = sum(total(scrape(s.metrics_url), "hps_updates_applied_total", model=MODEL, tier="volatile")
                          for s in (a, b))
        assert TABLES * UPDATED <= applied < 2 * TABLES * UPDATED
