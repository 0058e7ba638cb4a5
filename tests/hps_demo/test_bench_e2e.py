"""Pure logic of the end-to-end benchmark (the served runs are in tests/e2e)."""

from __future__ import annotations

import re

from hps_demo.bench_e2e import COMMITTED_REPOSITORY, with_queue_delay


def test_queue_delay_is_replaced_or_dynamic_batching_removed() -> None:
    for model in ("hps_embedding", "dlrm_dense"):
        text = (COMMITTED_REPOSITORY / model / "config.pbtxt").read_text()
        assert "dynamic_batching" in text  # the committed configs batch
        delayed = with_queue_delay(text, 250)
        assert re.findall(r"max_queue_delay_microseconds: (\d+)", delayed) == ["250"]
        assert "dynamic_batching" not in with_queue_delay(text, None)
        assert with_queue_delay(delayed, 0).count("dynamic_batching") == 1
