"""Request plumbing of the ``dlrm`` backend, free of Triton so it can be unit-tested.

Wire layout (one Triton request, ``max_batch_size > 0``, dims ``[-1]``)::

    DENSE       FP32 [R, B * n_dense]            sample-major: sample 0's features, sample 1's ...
    EMBEDDINGS  FP32 [R, n_tables * B * dim]     table-major, as HPS's OUTPUT0: table 0's B
                                                 vectors, then table 1's B vectors, ...
    NUMKEYS     INT32 [R, n_tables]  (optional)  the keys per table the ensemble sent to HPS:
                                                 DLRM takes one key per table per sample, so
                                                 every entry must be B
    SCORE       FP32 [R, B]

Without NUMKEYS the table-major EMBEDDINGS cannot be told apart from vectors of keys that
were not one per table per sample (``NUMKEYS [2B, 0, B, ...]`` gives as many floats and would
pair embeddings with the wrong samples); the ``dlrm`` ensemble passes it, so such a request is
refused by name.

``R`` is the leading (Triton batch) dimension; every row is an independent set of ``B``
samples. A model with ``max_batch_size: 0`` sends 1-D tensors and gets 1-D scores back, which
is the same thing with no leading dimension. All rows are scored in one forward pass.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.dlpack import from_dlpack  # where torch defines it (``torch.from_dlpack`` re-exports)

from backend.tensors import numpy_from_tensor
from hps_core.errors import RequestError

__all__ = ["Batch", "check_numkeys", "split_batch", "to_torch"]

class _DLPackTensor(Protocol):
    """The part of ``pb_utils.Tensor`` these helpers use."""

    def is_cpu(self) -> bool: ...
    def as_numpy(self) -> npt.NDArray[Any]: ...
    def to_dlpack(self) -> Any: ...


def to_torch(tensor: _DLPackTensor) -> torch.Tensor:
    """Any Triton tensor as a torch tensor, without a copy where possible.

    GPU-resident tensors (an ensemble step on the GPU) stay on their GPU through DLPack. CPU
    tensors go through numpy; a read-only buffer is copied, since torch must not alias
    memory it may not write.
    """
    if not tensor.is_cpu():
        return from_dlpack(tensor.to_dlpack())
    array = numpy_from_tensor(tensor)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


class Batch:
    """One request's samples in network layout.

    dense [N, n_dense], emb [N, n_tables, dim] with N = R * B, and ``out_shape`` = the
    leading shape plus ``(B,)`` to give the flat scores back in request shape.
    """

    __slots__ = ("dense", "emb", "out_shape")

    def __init__(self, dense: torch.Tensor, emb: torch.Tensor, out_shape: tuple[int, ...]):
        self.dense, self.emb, self.out_shape = dense, emb, out_shape


def split_batch(
    dense: torch.Tensor,
    emb: torch.Tensor,
    *,
    n_dense: int,
    n_tables: int,
    dim: int,
    numkeys: torch.Tensor | None = None,
) -> Batch:
    """Check DENSE / EMBEDDINGS sizes (and NUMKEYS, when given: :func:`check_numkeys`) and
    reshape them for :class:`DenseDLRM`.

    Raises :class:`RequestError` naming the input and the expected size.
    """
    if dense.ndim == 0 or emb.ndim == 0:
        raise RequestError("DENSE and EMBEDDINGS must have at least one dimension")
    lead = tuple(dense.shape[:-1])
    if tuple(emb.shape[:-1]) != lead:
        raise RequestError(
            f"DENSE has shape {tuple(dense.shape)} and EMBEDDINGS {tuple(emb.shape)}: "
            "their leading (batch) dimensions must match"
        )
    width = int(dense.shape[-1])
    if width % n_dense:
        raise RequestError(
            f"DENSE has {width} values per row, not a multiple of n_dense={n_dense}"
        )
    b = width // n_dense
    if numkeys is not None:
        check_numkeys(numkeys, lead, b, n_tables)
    expected = n_tables * b * dim
    if int(emb.shape[-1]) != expected:
        raise RequestError(
            f"EMBEDDINGS has {int(emb.shape[-1])} values per row; {b} samples need "
            f"n_tables * B * dim = {n_tables} * {b} * {dim} = {expected}"
        )
    r = int(np.prod(lead, dtype=np.int64)) if lead else 1
    # Table-major [R, T, B, d] -> sample-major [R, B, T, d] -> [R*B, T, d].
    emb_rb = emb.reshape(r, n_tables, b, dim).permute(0, 2, 1, 3).reshape(r * b, n_tables, dim)
    return Batch(dense.reshape(r * b, n_dense), emb_rb, (*lead, b))


def check_numkeys(numkeys: torch.Tensor, lead: tuple[int, ...], b: int, n_tables: int) -> None:
    """Refuse NUMKEYS unless it gives every one of the ``b`` samples exactly one key per table.

    ``numkeys`` (*lead, n_tables) integers, ``lead`` DENSE's leading (batch) shape. DLRM pairs
    the i-th vector of each table with sample i, so every entry must equal ``b``; keys per
    table that differ (or are several per sample) would score embeddings with the wrong
    samples. Raises :class:`RequestError` naming NUMKEYS, its values and the rule.
    """
    if numkeys.is_floating_point() or numkeys.is_complex() or numkeys.dtype == torch.bool:
        raise RequestError(f"NUMKEYS must hold integers (INT32), got {numkeys.dtype}")
    if tuple(numkeys.shape) != (*lead, n_tables):
        raise RequestError(
            f"NUMKEYS has shape {tuple(numkeys.shape)}; with DENSE of leading shape {lead} and "
            f"{n_tables} tables it must be {(*lead, n_tables)}: one count per table"
        )
    rows = numkeys.reshape(-1, n_tables)
    bad = (rows != b).any(dim=1).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        where = f" (row {row})" if rows.shape[0] > 1 else ""
        raise RequestError(
            f"NUMKEYS{where} is {rows[row].tolist()}, but DLRM takes exactly one key per table per "
            f"sample: with B = {b} samples (DENSE holds {b} x n_dense values) every table must "
            f"have exactly {b} keys, i.e. NUMKEYS = [{b}] * {n_tables}"
        )
