"""Python-based Triton backends: ``hps`` (embedding lookup) and ``dlrm`` (dense network)."""
