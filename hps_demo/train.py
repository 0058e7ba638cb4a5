"""Train the demo DLRM on CPU and export it for serving.

Export writes, where the caller says (the paths the HPS JSON and ``dlrm_dense`` name; never
inside the repository)::

    <sparse_files[j]>/key         int64 little-endian ids   [n_j]
    <sparse_files[j]>/emb_vector  float32 row-major         [n_j, dim]
    <dense_weights>, .json        dense network (backend/dlrm)

The sparse folders are HugeCTR's format, so the HPS JSON lists them in ``sparse_files``.

Only rows that training looked up are exported. A power-law workload leaves most tail rows of
a large table unseen; their embeddings are still their random initialisation and carry no
information, so they are not worth storing. At serving time keys of unseen rows are found in
no tier and get the table's ``default_value_for_each_table`` -- exactly how a production HPS
treats ids that appear after the model was trained.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from backend.dlrm.network import save_dense
from hps_core.formats import write_sparse_model
from hps_demo.data import Dataset, auc
from hps_demo.model import DLRM

__all__ = [
    "ExportedModel",
    "TrainMetrics",
    "export_model",
    "score",
    "train_dlrm",
]



@dataclass
class TrainMetrics:
    """What training measured; ``eval_auc`` is per epoch when an eval set was given."""

    epochs: int
    samples: int
    seconds: float
    loss: list[float] = field(default_factory=list)
    eval_auc: list[float] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.epochs * self.samples / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class ExportedModel:
    """Where :func:`export_model` wrote things, for building the HPS JSON and config.pbtxt."""

    sparse_files: tuple[Path, ...]
    rows_per_table: tuple[int, ...]  # rows exported per table (the seen ones)
    dense_weights: Path
    dim: int


def _tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.from_numpy(ds.dense), torch.from_numpy(ds.rows), torch.from_numpy(ds.label)


def score(
    model: DLRM, dataset: Dataset, *, batch_size: int = 8192, unseen_default: float | None = None
) -> npt.NDArray[np.float32]:
    """Click probabilities for every sample of ``dataset`` (eval mode, no gradients).

    With ``unseen_default``, rows that training never looked up get that value in every
    component instead of their (untrained) weights: what the server answers for them, since
    :func:`export_model` leaves them out.
    """
    dense, rows, _ = _tensors(dataset)
    was_training = model.training
    model.eval()  # eval: lookups do not mark rows as seen
    out = np.empty(len(dataset), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            stop = start + batch_size
            emb = model.lookup(rows[start:stop])
            if unseen_default is not None:
                unseen = ~model.seen[rows[start:stop] + model.offsets]
                emb = emb.masked_fill(unseen.unsqueeze(-1), unseen_default)
            out[start:stop] = model.dense(dense[start:stop], emb).numpy()
    model.train(was_training)
    return out


def train_dlrm(
    dataset: Dataset,
    *,
    dim: int = 16,
    epochs: int = 2,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    eval_dataset: Dataset | None = None,
    bottom: Sequence[int] = (64, 32),
    top: Sequence[int] = (128, 64),
) -> tuple[DLRM, TrainMetrics]:
    """Train a :class:`DLRM` on ``dataset`` (CPU, binary cross-entropy).

    Embedding rows use SparseAdam (sparse gradients: a step touches only the batch's rows);
    the dense network uses Adam. Seeded: same data and arguments give the same model.
    """
    torch.manual_seed(seed)
    model = DLRM(dataset.rows_per_table, n_dense=dataset.n_dense, dim=dim, bottom=bottom, top=top)
    # Optimizer, not SparseAdam: SparseAdam.step has no annotations, Optimizer.step has
    sparse_opt: torch.optim.Optimizer = torch.optim.SparseAdam(list(model.embedding.parameters()), lr=lr)
    dense_opt = torch.optim.Adam(model.dense.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    dense, rows, label = _tensors(dataset)
    order_rng = torch.Generator().manual_seed(seed)
    metrics = TrainMetrics(epochs=epochs, samples=len(dataset), seconds=0.0)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(dataset), generator=order_rng)
        total, n_batches = 0.0, 0
        for start in range(0, len(dataset), batch_size):
            idx = order[start : start + batch_size]
            loss = loss_fn(model.logits(dense[idx], rows[idx]), label[idx])
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            loss.backward()
            sparse_opt.step()
            dense_opt.step()
            total += loss.item()
            n_batches += 1
        metrics.loss.append(total / max(n_batches, 1))
        if eval_dataset is not None:
            metrics.eval_auc.append(auc(eval_dataset.label, score(model, eval_dataset)))
    metrics.seconds = time.perf_counter() - t0
    model.eval()
    return model, metrics


def export_model(
    model: DLRM,
    key_maps: Sequence[npt.NDArray[np.integer[Any]]],
    *,
    sparse_files: Sequence[str | Path],
    dense_weights: str | Path,
) -> ExportedModel:
    """Write the seen rows of every table and the dense weights (layout in the module doc).

    ``key_maps[j]`` maps row -> id for table ``j`` (``Dataset.key_maps``). Rows never looked up
    during training are left out; they are served the table's default value.
    """
    if len(key_maps) != len(model.rows_per_table):
        raise ValueError(f"{len(key_maps)} key maps for {len(model.rows_per_table)} tables")
    if len(sparse_files) != len(key_maps):
        raise ValueError(f"{len(sparse_files)} sparse model folders for {len(key_maps)} tables")
    folders: list[Path] = []
    exported: list[int] = []
    for j, key_map in enumerate(key_maps):
        weights, seen = model.table(j)
        if key_map.shape[0] != weights.shape[0]:
            raise ValueError(f"table {j}: key map has {key_map.shape[0]} rows, model {weights.shape[0]}")
        folder = Path(sparse_files[j])
        write_sparse_model(folder, key_map[seen].astype(np.int64), weights[seen])
        folders.append(folder)
        exported.append(int(seen.sum()))
    dense_path = save_dense(model.dense, dense_weights)
    return ExportedModel(
        sparse_files=tuple(folders),
        rows_per_table=tuple(exported),
        dense_weights=dense_path,
        dim=model.dense.dim,
    )
