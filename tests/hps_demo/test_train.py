"""Training improves held-out AUC; export writes HugeCTR sparse folders of seen rows only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend.dlrm.network import load_dense
from hps_demo.data import auc, make_dataset, train_test_split
from hps_demo.train import export_model, score, train_dlrm

SIZES = (2000, 50, 500, 3000, 100)
DIM = 8


@pytest.fixture(scope="module")
def trained():
    data = make_dataset(30_000, n_tables=len(SIZES), rows_per_table=SIZES, seed=7)
    train, test = train_test_split(data, 0.2, seed=7)
    model, metrics = train_dlrm(
        train, dim=DIM, epochs=2, batch_size=512, lr=2e-3, seed=0, eval_dataset=test
    )
    return data, train, test, model, metrics


def test_training_beats_chance_on_held_out(trained):
    _, _, test, model, metrics = trained
    assert len(metrics.loss) == 2 and len(metrics.eval_auc) == 2
    assert metrics.loss[1] < metrics.loss[0]
    held_out = auc(test.label, score(model, test))
    assert held_out > 0.6
    assert held_out == pytest.approx(metrics.eval_auc[-1])
    assert metrics.seconds > 0 and metrics.samples_per_second > 0


def test_training_is_seeded():
    data = make_dataset(2000, n_tables=2, rows_per_table=100, seed=1)
    a, _ = train_dlrm(data, dim=4, epochs=1, batch_size=256, seed=5)
    b, _ = train_dlrm(data, dim=4, epochs=1, batch_size=256, seed=5)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_scoring_does_not_mark_rows_seen(trained):
    _, _, test, model, _ = trained
    before = model.seen.clone()
    score(model, test)
    assert torch.equal(before, model.seen)


def _export(model, key_maps, folder):
    return export_model(
        model,
        key_maps,
        sparse_files=[folder / f"table{j}.model" for j in range(len(key_maps))],
        dense_weights=folder / "dense.pt",
    )


def test_export_writes_seen_rows_only(trained, tmp_path):
    data, train, _, model, _ = trained
    exported = _export(model, data.key_maps, tmp_path)
    version_dir = tmp_path
    assert exported.dim == DIM and len(exported.sparse_files) == len(SIZES)
    for j, size in enumerate(SIZES):
        folder = version_dir / f"table{j}.model"
        assert exported.sparse_files[j] == folder
        keys = np.fromfile(folder / "key", dtype="<i8")
        vectors = np.fromfile(folder / "emb_vector", dtype="<f4")
        n = keys.shape[0]
        assert (folder / "key").stat().st_size == 8 * n
        assert (folder / "emb_vector").stat().st_size == 4 * n * DIM
        assert n == exported.rows_per_table[j]
        # Exactly the rows of the training split, mapped to their ids.
        seen_rows = np.unique(train.rows[:, j])
        np.testing.assert_array_equal(np.sort(keys), np.sort(data.key_maps[j][seen_rows]))
        weights, _ = model.table(j)
        np.testing.assert_array_equal(vectors.reshape(n, DIM), weights[seen_rows])
    # The large, power-law table has unseen rows: their keys will get the default value.
    assert exported.rows_per_table[3] < SIZES[3]


def test_export_dense_weights_round_trip(trained, tmp_path):
    data, _, test, model, _ = trained
    exported = _export(model, data.key_maps, tmp_path)
    meta = json.loads(exported.dense_weights.with_suffix(".json").read_text())
    assert meta["dim"] == DIM and meta["n_tables"] == len(SIZES) and meta["n_dense"] == 13
    net = load_dense(exported.dense_weights)
    dense = torch.from_numpy(test.dense[:64])
    with torch.inference_mode():
        emb = model.lookup(torch.from_numpy(test.rows[:64]))
        torch.testing.assert_close(net(dense, emb), model.dense(dense, emb), rtol=0, atol=1e-6)


def test_export_rejects_wrong_key_maps(trained, tmp_path):
    data, _, _, model, _ = trained
    with pytest.raises(ValueError, match="key maps"):
        _export(model, data.key_maps[:2], tmp_path)


def test_export_reads_back_with_hps_reader(trained, tmp_path):
    from hps_core.formats import hugectr
    data, _, _, model, _ = trained
    exported = _export(model, data.key_maps, tmp_path)
    for j, folder in enumerate(exported.sparse_files):
        table = hugectr.read_sparse_model(folder, DIM)
        assert table.keys.shape == (exported.rows_per_table[j],)
        assert table.vectors.shape == (exported.rows_per_table[j], DIM)


def test_score_with_unseen_default_matches_the_exported_tables(trained):
    _, _, test, model, _ = trained
    rows = torch.from_numpy(test.rows[:64])
    with torch.inference_mode():
        emb = model.lookup(rows).clone()
        emb[~model.seen[rows + model.offsets]] = 0.0
        expected = model.dense(torch.from_numpy(test.dense[:64]), emb).numpy()
    got = score(model, test.subset(np.arange(64)), unseen_default=0.0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert not model.seen[rows + model.offsets].all()  # some rows really were unseen
