"""Row formats: how one embedding row is stored in every tier and cache (float32, float16,
fp8 e4m3 with a per-row scale, int8 row-wise with a per-row scale and bias).

A table declares one format (``embedding_format_per_table`` or HugeCTR's ``fp8_quant`` in the
HPS JSON); every tier and cache stores its rows packed in that format, and every read
dequantises to float32 where the row is read (in the tier's gather, in the cache's query), so
``OUTPUT0`` is float32 whatever the format. The packed row of a ``dim``-wide table is
:meth:`RowFormat.row_bytes` bytes, little-endian::

    fp32   f32[dim]                               value = x
    fp16   f16[dim]                               value = float(h)
    fp8    scale f32 | e4m3[dim]                  value = e4m3(q) * scale, scale = max|x| / 448
    int8   scale f32 | bias f32 | u8[dim]         value = bias + q * scale,
                                                  bias = min x, scale = (max x - min x) / 255

fp32 rows are HugeCTR's own bytes, so every table written before formats existed is an fp32
table. int8 is FBGEMM's fused row-wise layout in spirit (scale and bias beside the row; here
in front of it, so the payload of a 4-byte aligned row is 4-byte aligned too). fp8 is the
OCP/NVIDIA E4M3 encoding (no infinities, max 448, subnormals down to 2**-9), saturating.

Every conversion is written so the GPU kernels (``cache/kernels/row_formats.cuh``) give the
same bits: float32 arithmetic in the same order, round-to-nearest-even by explicit bit
rounding (no fp8/fp16 hardware instruction, which differs by GPU generation), and the int8
dequantisation as a separate multiply and add (the device code uses ``__fmul_rn`` and
``__fadd_rn`` so the compiler cannot fuse them into an FMA the CPU does not do).

A row that cannot be stored is refused before anything is written, with
:class:`~hps_core.errors.RowValueError` naming the row and the reason: NaN or infinity in any
compact format, a float16 value beyond ±65504, an int8 row whose range overflows float32.
float32 rows are stored as given (HugeCTR's behaviour) by a tier; the paths that bring rows in
refuse NaN and infinity in any format first, with :func:`non_finite_rows` (the one finite check:
``publish-model``'s table check, the update source per message, the update sink at send time).

This module holds the formats' facts and needs only NumPy, so reading a config costs no
compiler; the conversions themselves (numba kernels: ``pack``, ``unpack``, ``encode_row``,
...) live in :mod:`hps_core.row_codecs`.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import numpy.typing as npt

from hps_core.errors import ConfigError, RowValueError

__all__ = ["E4M3_TO_F32", "F16_TO_F32", "FORMAT_NAMES", "RowFormat", "format_codes", "non_finite_rows"]

class RowFormat(enum.Enum):
    """A table's row format; the value is its name in the HPS JSON and in every message."""

    FP32 = "fp32"
    FP16 = "fp16"
    FP8 = "fp8"
    INT8 = "int8"

    @property
    def code(self) -> int:
        """The format's number in kernels and in the tiers' stored metadata."""
        return _CODES[self]

    @property
    def header_bytes(self) -> int:
        """Bytes in front of the elements (the scale, and the bias of int8)."""
        return _HEADER_BYTES[_CODES[self]]

    @property
    def element_bytes(self) -> int:
        return _ELEMENT_BYTES[_CODES[self]]

    def row_bytes(self, dim: int) -> int:
        """Bytes of one packed ``dim``-wide row."""
        return self.header_bytes + self.element_bytes * int(dim)

    @classmethod
    def from_code(cls, code: int) -> RowFormat:
        for fmt, c in _CODES.items():
            if c == code:
                return fmt
        raise ConfigError(f"unknown row format code {code!r}; known: {sorted(_CODES.values())}")

    @classmethod
    def parse(cls, text: object, where: str) -> RowFormat:
        """The format called ``text``; ConfigError naming ``where`` (field and file) otherwise."""
        for fmt in cls:
            if text == fmt.value:
                return fmt
        raise ConfigError(f"{where}: row format must be one of {', '.join(FORMAT_NAMES)}; got {text!r}")

    def __str__(self) -> str:
        return self.value


FORMAT_NAMES = tuple(f.value for f in RowFormat)
_FP32, _FP16, _FP8, _INT8 = range(4)  # the codes, as the kernels see them (constants to numba)
_CODES = {RowFormat.FP32: _FP32, RowFormat.FP16: _FP16, RowFormat.FP8: _FP8, RowFormat.INT8: _INT8}
_HEADER_BYTES = (0, 0, 4, 8)  # by code
_ELEMENT_BYTES = (4, 2, 1, 1)

F16_MAX = np.float32(65504.0)
E4M3_MAX = np.float32(448.0)


def format_codes(formats: Any) -> npt.NDArray[np.int64]:
    """(T,) int64 codes of a sequence of formats (the kernels' per-table array)."""
    return np.array([RowFormat(f).code for f in formats], np.int64)


def _e4m3_values() -> npt.NDArray[np.float32]:
    codes = np.arange(256)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 7
    magnitude = np.where(exponent == 0, mantissa * 2.0**-9, (1 + mantissa / 8) * 2.0 ** (exponent - 7.0))
    values = np.where(codes & 0x80, -magnitude, magnitude).astype(np.float32)
    values[[0x7F, 0xFF]] = np.nan  # E4M3's only NaNs; never produced by the encoder
    return values


#: e4m3 code -> float32, and float16 bits -> float32: the decoders' lookup tables.
E4M3_TO_F32 = _e4m3_values()
F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def non_finite_rows(values: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.intp]:
    """Positions, ascending, of the rows of ``values`` ((n, dim) float, host) that hold a NaN or
    an infinity; empty when every row is finite. The one finite check of rows coming in.

    Vectorised: one sum of the whole array first (no temporary), since a sum is NaN or
    infinite whenever an element is; only a non-finite sum (a bad row, or finite values whose
    sum overflows) pays the exact per-element pass and its (n, dim) boolean temporary.
    """
    if values.ndim != 2:
        raise RowValueError(f"rows must be a 2-D (n, dim) array, got shape {values.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow or inf - inf is an answer here
        total = values.sum()
    if values.size == 0 or np.isfinite(total):
        return np.empty(0, np.intp)
    return np.flatnonzero(~np.isfinite(values).all(axis=1))
