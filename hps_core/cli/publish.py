"""``hps publish``: a table's rows to Kafka as online updates (hps_core/updates)."""

from __future__ import annotations

import argparse

from hps_core.cli import keyword_defaults

__all__ = ["add_publish", "run_publish"]

_PUBLISH_CHUNK_ROWS = 1 << 20  # rows packed at a time: bounds memory for large tables


def add_publish(parser: argparse.ArgumentParser) -> None:
    """Set up ``hps publish``."""
    parser.description = (
            "Publish every row of a table to the Kafka topic hps_et.MODEL.TABLE in HugeCTR's update "
            "format, partitioned by key, for serving HPS instances (or HugeCTR's) to apply. "
            "Waits until the broker acknowledged every message, re-sending what it did not take "
            "(at least once, also across a broker restart); reports the re-sends."
        )
    parser.add_argument("--brokers", required=True, metavar="HOST:PORT",
                        help="Kafka bootstrap servers, host:port[;host:port...]")
    parser.add_argument("--model", required=True, help="model name (the topic's middle part)")
    parser.add_argument("--table", required=True, help="embedding table name (the topic's last part)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sparse-model", metavar="FOLDER", help="HugeCTR sparse model folder (key, emb_vector)")
    source.add_argument("--npz", metavar="FILE", help=".npz archive with members keys and vectors")
    parser.add_argument("--dim", type=int, metavar="N", help="vector size to check the file against")
    from hps_core.updates import UpdateSink  # lazy: keep `hps --help` fast

    sink = keyword_defaults(UpdateSink)
    parser.add_argument("--max-batch-size", type=int, default=sink["max_batch_size"], metavar="N",
                        help="most key/vector pairs per message (default: %(default)s)")
    parser.add_argument("--key-type", choices=("int64", "uint32"), default="int64",
                        help="key width on the wire: int64 (supportlonglong: true) or uint32 (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="how long to wait for the broker to acknowledge, re-sends included "
                             "(default: %(default)s)")
    parser.set_defaults(func=run_publish)


def run_publish(args: argparse.Namespace) -> int:
    """Read the table, publish it in chunks, flush; print what was sent and re-sent."""
    import numpy as np  # lazy: keep `hps --help` fast

    from hps_core.formats import read_npz, read_sparse_model
    from hps_core.updates import UpdateSink, topic_name

    table = read_sparse_model(args.sparse_model, args.dim) if args.sparse_model else read_npz(args.npz, args.dim)
    key_dtype = np.int64 if args.key_type == "int64" else np.uint32
    topic = topic_name(args.model, args.table)
    with UpdateSink(args.brokers, max_batch_size=args.max_batch_size, key_dtype=key_dtype) as sink:
        for start in range(0, len(table), _PUBLISH_CHUNK_ROWS):
            stop = start + _PUBLISH_CHUNK_ROWS
            sink.publish_topic(topic, table.keys[start:stop], table.vectors[start:stop])
        sink.flush(args.timeout)  # UpdateError (exit 1) names what is still undelivered
        stats = sink.stats()
    print(f"hps publish: {stats['pairs']} updates of {topic} in {stats['messages']} messages "
          f"({stats['bytes']} bytes) delivered to {args.brokers}; {stats['resent']} re-sent",
          flush=True)
    return 0
