"""The trainable DLRM of the demo: embedding tables plus the served dense network.

Serving needs only the dense part (:class:`backend.dlrm.network.DenseDLRM`, saved with
:func:`~backend.dlrm.network.save_dense`); the tables are exported to HugeCTR sparse model
folders for the parameter server (``hps_demo/train.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from backend.dlrm.network import DEFAULT_BOTTOM, DEFAULT_DIM, DEFAULT_N_DENSE, DEFAULT_TOP, DenseDLRM

__all__ = ["DLRM"]


class DLRM(nn.Module):
    """Trainable DLRM: embedding tables (indexed by row) plus a :class:`DenseDLRM`.

    All tables live in one ``nn.Embedding`` with per-table row offsets: one gather per batch
    instead of one per table, and sparse gradients so an optimiser step touches only the rows
    of the batch. ``seen`` marks the rows that training looked up; export writes only those.
    """

    offsets: torch.Tensor  # registered buffers
    seen: torch.Tensor

    def __init__(
        self,
        rows_per_table: Sequence[int],
        *,
        n_dense: int = DEFAULT_N_DENSE,
        dim: int = DEFAULT_DIM,
        bottom: Sequence[int] = DEFAULT_BOTTOM,
        top: Sequence[int] = DEFAULT_TOP,
    ) -> None:
        super().__init__()
        sizes = torch.tensor([int(r) for r in rows_per_table], dtype=torch.int64)
        self.rows_per_table = tuple(int(r) for r in sizes)
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes)
        self.register_buffer("seen", torch.zeros(int(sizes.sum()), dtype=torch.bool))
        self.embedding = nn.Embedding(int(sizes.sum()), dim, sparse=True)
        # Small uniform init (DLRM uses ±sqrt(1/rows), far too small for 100k-row tables).
        nn.init.uniform_(self.embedding.weight, -0.05, 0.05)
        self.dense = DenseDLRM(
            n_dense=n_dense, n_tables=len(self.rows_per_table), dim=dim, bottom=bottom, top=top
        )

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` int64[B, n_tables] (row ids per table) -> embeddings [B, n_tables, dim]."""
        flat = rows + self.offsets
        if self.training:
            self.seen[flat.reshape(-1)] = True
        emb: torch.Tensor = self.embedding(flat)  # Module calls are Any
        return emb

    def logits(self, dense: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.dense.logits(dense, self.lookup(rows))

    def forward(self, dense: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(dense, rows))

    def table(self, j: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """Table ``j`` as (weights float32[rows_j, dim], seen bool[rows_j]) numpy copies."""
        start = int(self.offsets[j])
        stop = start + self.rows_per_table[j]
        with torch.no_grad():
            weights = self.embedding.weight[start:stop].detach().cpu().numpy().copy()
        return weights, self.seen[start:stop].cpu().numpy().copy()
