"""What the benchmarks share: :mod:`hps_demo.bench.harness` (machine, command line, interleaved
timing, percentiles, markdown tables, JSON reports) and :mod:`hps_demo.bench.tables` (the
synthetic tables, requests and device of the lookup benchmarks).

It lives in the package, not in ``scripts/``, because both ``scripts/*.py`` and
``hps_demo/bench_e2e.py`` use it, and the package cannot import ``scripts/`` (not a package,
not installed).
"""
