"""DenseDLRM shapes and save/load; the dlrm backend's request plumbing (no Triton needed)."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
import torch

from backend.dlrm.io import check_numkeys, split_batch, to_torch
from backend.tensors import numpy_from_tensor
from backend.dlrm.network import DenseDLRM, load_dense, predict, save_dense, serving_forward
from hps_core.errors import RequestError
from tests.backend.fake_pb_utils import FakeTensor, fake_pb_utils


def _inputs(b: int, n_tables: int = 26, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 13, generator=g), torch.randn(b, n_tables, dim, generator=g)


def test_forward_shapes_and_range():
    net = DenseDLRM(dim=16).eval()
    dense, emb = _inputs(7)
    prob = net(dense, emb)
    assert prob.shape == (7,) and prob.dtype == torch.float32
    assert ((prob > 0) & (prob < 1)).all()
    assert net.logits(dense, emb).shape == (7,)


def test_interaction_size():
    net = DenseDLRM(n_tables=3, dim=4, bottom=(8,), top=(5,))
    # bottom output (4) + 4*3/2 pairwise dots among 4 vectors = 10 inputs to the top MLP
    assert net.top[0][0].in_features == 4 + 6


def test_interaction_is_the_dot_products():
    net = DenseDLRM(n_tables=2, dim=3, bottom=(4,), top=()).eval()
    dense, emb = _inputs(5, n_tables=2, dim=3)
    x = net.bottom(dense)
    vectors = [x, emb[:, 0], emb[:, 1]]
    pairs = [(0, 1), (0, 2), (1, 2)]
    z = torch.stack([(vectors[a] * vectors[b]).sum(1) for a, b in pairs], dim=1)
    expected = net.top(torch.cat([x, z], dim=1)).squeeze(1)
    torch.testing.assert_close(net.logits(dense, emb), expected)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = DenseDLRM(n_tables=5, dim=8, bottom=(32, 16), top=(24,)).eval()
    path = save_dense(net, tmp_path / "sub" / "dense.pt")
    meta = json.loads((tmp_path / "sub" / "dense.json").read_text())
    assert meta == {
        "format": "hps-demo-dlrm-dense/1", "n_dense": 13, "n_tables": 5, "dim": 8,
        "bottom": [32, 16], "top": [24],
    }
    loaded = load_dense(path)
    assert not loaded.training
    dense, emb = _inputs(33, n_tables=5, dim=8)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(dense, emb), net(dense, emb), rtol=0, atol=1e-6)


def test_load_needs_json(tmp_path):
    path = save_dense(DenseDLRM(n_tables=2, dim=4), tmp_path / "dense.pt")
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="dense.json"):
        load_dense(path)


def test_predict_casts_and_does_not_track_grad():
    net = DenseDLRM(n_tables=2, dim=4).eval()
    dense, emb = _inputs(3, n_tables=2, dim=4)
    out = predict(net, dense.double(), emb)
    assert out.dtype == torch.float32 and not out.requires_grad


# --- request plumbing -------------------------------------------------------------------


def _wire(dense: torch.Tensor, emb: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """What a client / HPS sends: DENSE [1, B*13] and EMBEDDINGS table-major [1, T*B*d]."""
    return (
        dense.numpy().reshape(1, -1),
        emb.permute(1, 0, 2).contiguous().numpy().reshape(1, -1),
    )


def test_split_batch_inverts_hps_table_major_order():
    dense, emb = _inputs(4, n_tables=3, dim=2)
    wire_dense, wire_emb = _wire(dense, emb)
    batch = split_batch(
        torch.from_numpy(wire_dense), torch.from_numpy(wire_emb), n_dense=13, n_tables=3, dim=2
    )
    assert batch.out_shape == (1, 4)
    torch.testing.assert_close(batch.dense, dense)
    torch.testing.assert_close(batch.emb, emb)
    # As the brief states it: emb.reshape(T, B, d).transpose(1, 0, 2).
    np.testing.assert_array_equal(
        batch.emb.numpy(), wire_emb.reshape(3, 4, 2).transpose(1, 0, 2)
    )


def test_split_batch_several_rows_and_1d():
    d0, e0 = _inputs(2, n_tables=3, dim=2, seed=0)
    d1, e1 = _inputs(2, n_tables=3, dim=2, seed=1)
    w0, w1 = _wire(d0, e0), _wire(d1, e1)
    dense = torch.from_numpy(np.concatenate([w0[0], w1[0]]))
    emb = torch.from_numpy(np.concatenate([w0[1], w1[1]]))
    batch = split_batch(dense, emb, n_dense=13, n_tables=3, dim=2)
    assert batch.out_shape == (2, 2)
    torch.testing.assert_close(batch.emb, torch.cat([e0, e1]))
    torch.testing.assert_close(batch.dense, torch.cat([d0, d1]))
    flat = split_batch(dense[0], emb[0], n_dense=13, n_tables=3, dim=2)
    assert flat.out_shape == (2,)
    torch.testing.assert_close(flat.emb, e0)


def test_split_batch_scores_match_direct_forward():
    net = DenseDLRM(n_tables=3, dim=2).eval()
    dense, emb = _inputs(6, n_tables=3, dim=2)
    wire_dense, wire_emb = _wire(dense, emb)
    batch = split_batch(
        torch.from_numpy(wire_dense), torch.from_numpy(wire_emb), n_dense=13, n_tables=3, dim=2
    )
    scores = predict(net, batch.dense, batch.emb).reshape(batch.out_shape)
    with torch.inference_mode():
        torch.testing.assert_close(scores[0], net(dense, emb))


def test_split_batch_empty_batch():
    batch = split_batch(torch.zeros(1, 0), torch.zeros(1, 0), n_dense=13, n_tables=3, dim=2)
    assert batch.out_shape == (1, 0) and batch.emb.shape == (0, 3, 2)


@pytest.mark.parametrize(
    ("dense_len", "emb_len", "match"),
    [
        (14, 26 * 16, "DENSE has 14 values per row, not a multiple of n_dense=13"),
        (26, 26 * 16, r"EMBEDDINGS has 416 values per row; 2 samples need .* = 832"),
        (13, 0, "EMBEDDINGS has 0 values"),
    ],
)
def test_split_batch_size_errors(dense_len, emb_len, match):
    with pytest.raises(RequestError, match=match):
        split_batch(
            torch.zeros(1, dense_len), torch.zeros(1, emb_len), n_dense=13, n_tables=26, dim=16
        )


def test_split_batch_leading_dims_must_agree():
    with pytest.raises(RequestError, match="leading"):
        split_batch(torch.zeros(2, 13), torch.zeros(1, 26), n_dense=13, n_tables=2, dim=1)
    with pytest.raises(RequestError, match="at least one dimension"):
        split_batch(torch.zeros(()), torch.zeros(1), n_dense=13, n_tables=1, dim=1)


def test_numpy_from_tensor_and_to_torch_cpu():
    a = np.arange(6, dtype=np.float32).reshape(1, 6)
    np.testing.assert_array_equal(numpy_from_tensor(FakeTensor(a.copy())), a)
    t = to_torch(FakeTensor(a.copy()))
    assert t.dtype == torch.float32 and t.tolist() == a.tolist()
    # A read-only buffer is copied rather than aliased (no torch warning, no shared writes).
    ro = to_torch(FakeTensor(a.copy(), writeable=False))
    ro[0, 0] = 42.0
    assert ro.tolist()[0][1:] == a.tolist()[0][1:]


# --- the Triton adapter, driven through a stand-in for triton_python_backend_utils ----------


@pytest.fixture()
def triton_model(tmp_path, monkeypatch):
    """An initialised TritonPythonModel over a random DenseDLRM (26 tables, dim 4)."""
    pb = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "backend.dlrm.model", raising=False)
    model_py = importlib.import_module("backend.dlrm.model")
    threads = torch.get_num_threads()  # initialize() sets 1; give the process its own back
    torch.manual_seed(1)
    net = DenseDLRM(dim=4).eval()
    save_dense(net, tmp_path / "dlrm_dense" / "1" / "dense.pt")
    config = {"name": "dlrm_dense", "parameters": {"dense_weights": {"string_value": "1/dense.pt"}}}
    instance = model_py.TritonPythonModel()
    instance.initialize({
        "model_config": json.dumps(config),
        "model_repository": str(tmp_path / "dlrm_dense"),
        "model_version": "1",
        "model_instance_kind": "CPU",
    })
    yield instance, net, pb
    instance.finalize()
    torch.set_num_threads(threads)
    sys.modules.pop("backend.dlrm.model", None)


def test_triton_model_scores_and_rejects_bad_requests(triton_model):
    instance, net, pb = triton_model
    assert torch.get_num_threads() == 1
    dense, emb = _inputs(3, dim=4)
    wire_dense, wire_emb = _wire(dense, emb)
    good = {"DENSE": pb.Tensor("DENSE", wire_dense), "EMBEDDINGS": pb.Tensor("EMBEDDINGS", wire_emb)}
    bad = {"DENSE": pb.Tensor("DENSE", wire_dense[:, :-1]), "EMBEDDINGS": good["EMBEDDINGS"]}
    responses = instance.execute([good, bad, {"DENSE": good["DENSE"]}, good])
    assert len(responses) == 4
    for response in (responses[0], responses[3]):
        assert response.error is None
        (out,) = response.output_tensors
        assert out.name == "SCORE" and out.as_numpy().shape == (1, 3)
        with torch.inference_mode():
            np.testing.assert_allclose(out.as_numpy()[0], net(dense, emb).numpy(), atol=1e-6)
    assert responses[1].error.code == "INVALID_ARG" and "n_dense=13" in str(responses[1].error)
    assert responses[2].error.code == "INVALID_ARG" and "EMBEDDINGS" in str(responses[2].error)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_serving_forward_is_the_same_function_as_eager(batch: int) -> None:
    """The backend serves the TorchScript-frozen network; it must score exactly as eager."""
    torch.manual_seed(batch)
    net = DenseDLRM(n_tables=5, dim=4).eval()
    dense, emb = torch.randn(batch, net.n_dense), torch.randn(batch, 5, 4)
    forward = serving_forward(net)
    with torch.inference_mode():
        torch.testing.assert_close(forward(dense, emb), net(dense, emb), rtol=1e-6, atol=1e-6)


# --- NUMKEYS: one key per table per sample ------------------------------------------------


def test_numkeys_of_one_key_per_table_per_sample_is_accepted():
    dense, emb = _inputs(3, n_tables=4, dim=2)
    wire_dense, wire_emb = _wire(dense, emb)
    batch = split_batch(torch.from_numpy(wire_dense), torch.from_numpy(wire_emb), n_dense=13, n_tables=4, dim=2,
                        numkeys=torch.full((1, 4), 3, dtype=torch.int32))
    torch.testing.assert_close(batch.emb, emb)
    check_numkeys(torch.full((4,), 3, dtype=torch.int32), (), 3, 4)  # max_batch_size 0: 1-D


@pytest.mark.parametrize(
    ("numkeys", "match"),
    [
        # As many keys in all as 3 samples x 4 tables, and as many floats: it would score.
        ([[6, 0, 3, 3]], r"NUMKEYS is \[6, 0, 3, 3\], but DLRM takes exactly one key per table per sample: "
                         r"with B = 3 samples .* every table must have exactly 3 keys, i\.e\. NUMKEYS = \[3\] \* 4"),
        ([[6, 6, 6, 6]], r"NUMKEYS is \[6, 6, 6, 6\]"),  # two keys per sample (multi-hot)
        ([[3, 3, 3]], r"NUMKEYS has shape \(1, 3\); .* must be \(1, 4\)"),
        ([3, 3, 3, 3], r"NUMKEYS has shape \(4,\)"),
    ],
)
def test_numkeys_that_do_not_give_one_key_per_table_per_sample_are_refused(numkeys, match):
    dense, emb = _inputs(3, n_tables=4, dim=2)
    wire_dense, wire_emb = _wire(dense, emb)
    with pytest.raises(RequestError, match=match):
        split_batch(torch.from_numpy(wire_dense), torch.from_numpy(wire_emb), n_dense=13, n_tables=4, dim=2,
                    numkeys=torch.tensor(numkeys, dtype=torch.int32))


def test_numkeys_names_the_bad_row_and_its_dtype():
    with pytest.raises(RequestError, match=r"NUMKEYS \(row 1\) is \[2, 1\]"):
        check_numkeys(torch.tensor([[2, 2], [2, 1]], dtype=torch.int32), (2,), 2, 2)
    with pytest.raises(RequestError, match="NUMKEYS must hold integers"):
        check_numkeys(torch.full((1, 2), 2.0), (1,), 2, 2)


def test_triton_model_refuses_uneven_numkeys_and_scores_the_rest(triton_model):
    instance, net, pb = triton_model
    dense, emb = _inputs(3, dim=4)
    wire_dense, wire_emb = _wire(dense, emb)
    inputs = {"DENSE": pb.Tensor("DENSE", wire_dense), "EMBEDDINGS": pb.Tensor("EMBEDDINGS", wire_emb)}
    good = {**inputs, "NUMKEYS": pb.Tensor("NUMKEYS", np.full((1, 26), 3, np.int32))}
    uneven = np.full((1, 26), 3, np.int32)
    uneven[0, :2] = 6, 0
    bad = {**inputs, "NUMKEYS": pb.Tensor("NUMKEYS", uneven)}
    responses = instance.execute([good, bad, inputs])  # the last without NUMKEYS (optional)
    assert responses[1].error.code == "INVALID_ARG"
    assert "NUMKEYS is [6, 0, 3," in str(responses[1].error) and "exactly 3 keys" in str(responses[1].error)
    with torch.inference_mode():
        expected = net(dense, emb).numpy()
    for response in (responses[0], responses[2]):
        assert response.error is None
        np.testing.assert_allclose(response.output_tensors[0].as_numpy()[0], expected, atol=1e-6)


def test_a_forward_failure_fails_only_the_request_that_causes_it(triton_model):
    """The shared forward pass raises (here: for any batch holding a NaN feature); each request
    is then scored alone, so only the culprit gets INTERNAL with the message."""
    instance, net, pb = triton_model
    forward = instance._forward

    def picky_forward(dense, emb):
        if torch.isnan(dense).any():
            raise RuntimeError("forward failed on a NaN feature")
        return forward(dense, emb)

    instance._forward = picky_forward
    requests, expected = [], []
    for seed in range(3):
        dense, emb = _inputs(2, dim=4, seed=seed)
        if seed == 1:
            dense[0, 0] = float("nan")
        wire_dense, wire_emb = _wire(dense, emb)
        requests.append({"DENSE": pb.Tensor("DENSE", wire_dense), "EMBEDDINGS": pb.Tensor("EMBEDDINGS", wire_emb)})
        with torch.inference_mode():
            expected.append(net(dense, emb).numpy())
    responses = instance.execute(requests)
    assert responses[1].error.code == "INTERNAL"
    assert "RuntimeError: forward failed on a NaN feature" in str(responses[1].error)
    for i in (0, 2):
        assert responses[i].error is None
        np.testing.assert_allclose(responses[i].output_tensors[0].as_numpy()[0], expected[i], atol=1e-6)


def test_internal_failures_are_one_log_line_per_cause_and_finalize_writes_the_count(triton_model):
    """A forward pass that fails for every request (a lost device, a bug) logs one line per
    cause, not one per request; finalize writes how many it held back."""
    instance, _, pb = triton_model

    def broken_forward(dense, emb):
        raise RuntimeError("CUDA error: device-side assert triggered")

    instance._forward = broken_forward
    dense, emb = _inputs(2, dim=4)
    wire_dense, wire_emb = _wire(dense, emb)
    request = {"DENSE": pb.Tensor("DENSE", wire_dense), "EMBEDDINGS": pb.Tensor("EMBEDDINGS", wire_emb)}
    for _ in range(30):
        assert [r.error.code for r in instance.execute([request, request])] == ["INTERNAL", "INTERNAL"]
    errors = [line for level, line in pb.Logger.records if level == "error"]
    assert errors == ["dlrm: request failed: RuntimeError: CUDA error: device-side assert triggered"]
    instance.finalize()
    errors = [line for level, line in pb.Logger.records if level == "error"]
    assert len(errors) == 2 and errors[1].startswith(errors[0] + " (59 like this held back in the last "), errors
