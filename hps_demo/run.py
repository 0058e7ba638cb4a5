"""The demo: train a small DLRM, serve it through Triton with the HPS backend, query it.

``python -m hps_demo`` (what ``scripts/demo.sh`` runs after set-up):

1. reads the committed model repository's HPS JSON for the tables (count, width, file paths);
2. generates a synthetic Criteo-like data set (power-law keys) and trains a DLRM on the CPU;
3. writes each embedding table as a HugeCTR sparse model folder and the dense weights, where
   ``model_repository/`` expects them (under ``work/demo/``, git-ignored);
4. starts the real Triton server with ``hps serve``'s machinery and sends the held-out samples
   over HTTP and gRPC with ``tritonclient``;
5. prints sample predictions, the AUC of the served scores next to the in-process model's,
   p50/p99 latency per protocol, and a short perf_analyzer run's summary.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from hps_core.config import ModelConfig, load_config
from hps_core.serving import TritonServer
from hps_demo.client import dlrm_request, infer, make_client, measure_latency, write_perf_analyzer_data
from hps_demo.data import DEMO_ROWS_PER_TABLE, Dataset, auc, make_dataset, train_test_split
from hps_demo.model import DLRM
from hps_demo.tools import find_perf_analyzer
from hps_demo.train import export_model, score, train_dlrm

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDING_MODEL = "hps_embedding"
DENSE_MODEL = "dlrm_dense"
ENSEMBLE = "dlrm"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hps_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--samples", type=int, default=300_000, help="synthetic samples (train + test)")
    parser.add_argument("--alpha", type=float, default=1.2, help="power-law exponent of key popularity")
    parser.add_argument("--rows-scale", type=float, default=1.0, help="scale the demo's rows per table")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="samples per request when querying")
    parser.add_argument("--latency-requests", type=int, default=300, help="timed requests per protocol")
    parser.add_argument("--perf-seconds", type=float, default=3.0, help="perf_analyzer measurement window")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _dense_weights_path(repository: Path) -> Path:
    """Where ``dlrm_dense``'s config.pbtxt expects the dense weights (its ``dense_weights``)."""
    text = (repository / DENSE_MODEL / "config.pbtxt").read_text()
    match = re.search(r'key:\s*"dense_weights"\s*value:\s*\{\s*string_value:\s*"([^"]+)"', text)
    if match is None:
        raise SystemExit(f"{repository / DENSE_MODEL / 'config.pbtxt'}: no dense_weights parameter")
    path = Path(match.group(1))
    return path if path.is_absolute() else (repository / DENSE_MODEL / path).resolve()


def _section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _train_and_export(args: argparse.Namespace, model: ModelConfig, dense_weights: Path,
                      rocksdb: Path) -> tuple[DLRM, Dataset]:
    tables = model.tables
    rows = [max(100, int(r * args.rows_scale)) for r in DEMO_ROWS_PER_TABLE[: len(tables)]]
    _section(f"data: {args.samples:,} samples, {len(tables)} tables ({sum(rows):,} rows), alpha {args.alpha}")
    data = make_dataset(args.samples, n_tables=len(tables), rows_per_table=rows, alpha=args.alpha, seed=args.seed)
    train, test = train_test_split(data, test_fraction=0.1, seed=args.seed)
    _section(f"training DLRM (dim {tables[0].dim}) on {len(train):,} samples, {args.epochs} epochs, CPU")
    start = time.perf_counter()
    net, metrics = train_dlrm(train, dim=tables[0].dim, epochs=args.epochs, seed=args.seed, eval_dataset=test)
    print(f"trained in {time.perf_counter() - start:.1f} s; held-out AUC per epoch: "
          + ", ".join(f"{a:.4f}" for a in metrics.eval_auc))
    if rocksdb.exists():
        shutil.rmtree(rocksdb)  # its rows belong to the previous run's tables
    exported = export_model(
        net, data.key_maps, sparse_files=[Path(t.sparse_file) for t in tables], dense_weights=dense_weights
    )
    print(f"wrote {len(tables)} HugeCTR sparse model folders ({sum(exported.rows_per_table):,} rows seen in "
          f"training; unseen keys get the default value) and {dense_weights}")
    return net, test


def _query(server: TritonServer, test: Dataset, batch: int) -> dict[str, npt.NDArray[np.float32]]:
    served: dict[str, npt.NDArray[np.float32]] = {}  # the ensemble's SCORE is TYPE_FP32
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        client = make_client(protocol, url)
        scores = [
            infer(client, ENSEMBLE, dlrm_request(test.keys[i : i + batch], test.dense[i : i + batch]).as_dict(), "SCORE")[0]
            for i in range(0, len(test), batch)
        ]
        served[protocol] = np.concatenate(scores)
    return served


def _latency(server: TritonServer, test: Dataset, batch: int, count: int) -> None:
    request = dlrm_request(test.keys[:batch], test.dense[:batch]).as_dict()
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        client = make_client(protocol, url)
        summary = measure_latency(lambda: infer(client, ENSEMBLE, request, "SCORE"), count)
        print(f"{protocol:>4}: {summary} (batch {batch} samples per request)")


def _perf_analyzer(server: TritonServer, test: Dataset, batch: int, seconds: float, work: Path) -> None:
    requests = [dlrm_request(test.keys[i : i + batch], test.dense[i : i + batch]) for i in range(0, 16 * batch, batch)]
    data = write_perf_analyzer_data(work / "perf_input.json", requests)
    perf_analyzer = find_perf_analyzer()
    command = [str(perf_analyzer.path),
        "-m", ENSEMBLE, "-u", server.grpc_url, "-i", "grpc", "--input-data", str(data),
        "--concurrency-range", "1:2", "--measurement-interval", str(int(seconds * 1000)),
        # a busy 2-core machine rarely meets the default 10% stability
        "-s", "50", "-p", str(int(seconds * 1000)), "--max-trials", "10",
    ]
    print("$ perf_analyzer " + " ".join(command[1:]))
    result = subprocess.run(command, capture_output=True, text=True, env=perf_analyzer.environment())
    for line in result.stdout.splitlines():
        match = re.match(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec, latency (\d+) usec", line)
        if match:
            requests_per_s = float(match.group(2))
            print(f"concurrency {match.group(1)}: {requests_per_s:,.1f} requests/s = "
                  f"{requests_per_s * batch:,.0f} samples/s, mean latency {int(match.group(3)) / 1e3:.2f} ms")
        elif "p50 latency" in line or "p99 latency" in line or "Avg request latency" in line:
            print(line.rstrip())
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"perf_analyzer failed with exit code {result.returncode}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    repository = args.model_repository.resolve()
    ps = load_config(repository / EMBEDDING_MODEL / "hps.json")
    model = ps.model(EMBEDDING_MODEL)
    dense_weights = _dense_weights_path(repository)
    work = dense_weights.parent
    net, test = _train_and_export(args, model, dense_weights, Path(ps.persistent_db.path))
    # What the server must answer: unseen rows were not exported, so they get the default.
    reference = score(net, test, unseen_default=model.tables[0].default_value)

    _section("serving: Triton Inference Server with the dlrm ensemble (hps_embedding -> dlrm_dense)")
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, log_file=work / "triton.log") as server:
        print(f"ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}")
        served = _query(server, test, args.batch)
        _section(f"predictions for {len(test):,} held-out samples")
        for i in range(5):
            print(f"sample {i}: label {int(test.label[i])}  served {served['http'][i]:.4f}  in-process {reference[i]:.4f}")
        for protocol, scores in served.items():
            print(f"{protocol:>4}: AUC {auc(test.label, scores):.4f}; max |served - in-process| "
                  f"{np.abs(scores - reference).max():.2e}")
        print(f"in-process AUC {auc(test.label, reference):.4f} (same tables), "
              f"{auc(test.label, score(net, test)):.4f} (with the untrained rows); "
              f"hidden model's AUC (ceiling) {auc(test.label, test.click_prob):.4f}")
        _section("latency, client side, sequential requests")
        _latency(server, test, args.batch, args.latency_requests)
        _section("perf_analyzer (gRPC, concurrency 1 and 2)")
        _perf_analyzer(server, test, args.batch, args.perf_seconds, work)
    return 0
