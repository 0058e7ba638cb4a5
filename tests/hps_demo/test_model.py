"""The demo's trainable DLRM: one embedding for all tables, the rows training saw, its dense part served."""

from __future__ import annotations

import torch

from backend.dlrm.network import load_dense, save_dense
from hps_demo.model import DLRM


def test_save_full_model_saves_dense_part(tmp_path):
    model = DLRM((10, 20), dim=4)
    save_dense(model.dense, tmp_path / "dense.pt")
    assert load_dense(tmp_path / "dense.pt").n_tables == 2


def test_dlrm_lookup_offsets_and_seen():
    model = DLRM((3, 5), dim=4)
    rows = torch.tensor([[2, 4], [0, 0]])
    emb = model.lookup(rows)
    w = model.embedding.weight
    torch.testing.assert_close(emb[0, 1], w[3 + 4])
    torch.testing.assert_close(emb[1, 0], w[0])
    assert model.seen.nonzero().ravel().tolist() == [0, 2, 3, 7]
    weights, seen = model.table(1)
    assert weights.shape == (5, 4) and seen.tolist() == [True, False, False, False, True]
