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
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit

from hps_core.errors import ConfigError, RowValueError

__all__ = [
    "FORMAT_NAMES",
    "RowFormat",
    "decode_rows",
    "encode_rows",
    "first_unstorable",
    "format_codes",
    "non_finite_rows",
    "pack",
    "unpack",
]

Packed = npt.NDArray[np.uint8]


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


# --------------------------------------------------------------------------- scalar conversions


@njit(nogil=True, cache=True, inline="always")
def _f32_bits(x: Any) -> Any:
    return np.float32(x).view(np.uint32)


@njit(nogil=True, cache=True, inline="always")
def f32_to_f16_bits(x: Any) -> Any:
    """float32 -> float16 bits, round to nearest even (NumPy's ``astype(float16)``); values
    at or beyond 65520 become infinity (callers refuse them first)."""
    bits = _f32_bits(x)
    sign = np.uint16((bits >> np.uint32(16)) & np.uint32(0x8000))
    a = bits & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # inf or NaN
        return sign | np.uint16(0x7E00 if a > np.uint32(0x7F800000) else 0x7C00)
    if a < np.uint32(0x38800000):  # below 2**-14: a half subnormal, in units of 2**-24
        return sign | np.uint16(np.rint(abs(x) * np.float32(16777216.0)))
    if a >= np.uint32(0x477FF000):  # rounds to 65536 or more
        return sign | np.uint16(0x7C00)
    exponent = (a >> np.uint32(23)) - np.uint32(112)  # rebias 127 -> 15
    keep = (a >> np.uint32(13)) & np.uint32(0x3FF)
    rest = a & np.uint32(0x1FFF)
    h = (exponent << np.uint32(10)) | keep
    if rest > np.uint32(0x1000) or (rest == np.uint32(0x1000) and (keep & np.uint32(1))):
        h += np.uint32(1)  # a carry into the exponent is the right rounding too
    return sign | np.uint16(h)


@njit(nogil=True, cache=True, inline="always")
def f32_to_e4m3(x: Any) -> Any:
    """float32 -> e4m3 code, round to nearest even, saturating at ±448 (the encoders have
    already scaled the row into that range)."""
    bits = _f32_bits(x)
    sign = np.uint8((bits >> np.uint32(24)) & np.uint32(0x80))
    a = bits & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x43E00000):  # 448 or more (NaN excluded by the callers)
        return sign | np.uint8(0x7E)
    if a < np.uint32(0x3C800000):  # below 2**-6: a subnormal, in units of 2**-9
        return sign | np.uint8(np.rint(abs(x) * np.float32(512.0)))
    exponent = (a >> np.uint32(23)) - np.uint32(120)  # rebias 127 -> 7
    keep = (a >> np.uint32(20)) & np.uint32(7)
    rest = a & np.uint32(0xFFFFF)
    code = (exponent << np.uint32(3)) | keep
    if rest > np.uint32(0x80000) or (rest == np.uint32(0x80000) and (keep & np.uint32(1))):
        code += np.uint32(1)
    if code > np.uint32(0x7E):
        code = np.uint32(0x7E)
    return sign | np.uint8(code)


# --------------------------------------------------------------------------- rows


@njit(nogil=True, cache=True, inline="always")
def _range(src: Any, s: int, dim: int) -> Any:
    lo, hi = src[s], src[s]
    for j in range(1, dim):
        v = src[s + j]
        lo = min(lo, v)
        hi = max(hi, v)
    return lo, hi


@njit(nogil=True, cache=True)
def unstorable_reason(src: Any, s: int, dim: int, code: int) -> int:
    """0 when row ``src[s : s + dim]`` can be stored in format ``code``; else 1 (NaN), 2
    (infinity), 3 (beyond float16's range), 4 (an int8 range that overflows float32)."""
    if code == _FP32:
        return 0
    for j in range(dim):
        v = src[s + j]
        if np.isnan(v):
            return 1
        if np.isinf(v):
            return 2
        if code == _FP16 and abs(v) > F16_MAX:
            return 3
    if code == _INT8:
        lo, hi = _range(src, s, dim)
        if np.isinf(hi - lo):
            return 4
    return 0


_REASONS = ("", "a NaN", "an infinity", "a value beyond float16's ±65504", "a range (max - min) beyond float32")


@njit(nogil=True, cache=True, inline="always")
def encode_row(src: Any, s: int, dim: int, code: int, dst: Any, d: int) -> None:
    """Pack float32 row ``src[s : s + dim]`` into ``dst[d : d + row_bytes]`` (uint8)."""
    row = src[s : s + dim]  # slices from 0: the loops below vectorise
    if code == _FP32:
        out32 = dst[d : d + 4 * dim].view(np.float32)
        for j in range(dim):
            out32[j] = row[j]
    elif code == _FP16:
        out16 = dst[d : d + 2 * dim].view(np.uint16)
        for j in range(dim):
            out16[j] = f32_to_f16_bits(row[j])
    elif code == _FP8:
        amax = np.float32(0.0)
        for j in range(dim):
            amax = max(amax, abs(row[j]))
        scale = amax / E4M3_MAX
        dst[d : d + 4].view(np.float32)[0] = scale
        q8 = dst[d + 4 : d + 4 + dim]
        for j in range(dim):
            q8[j] = f32_to_e4m3(row[j] / scale) if scale > 0 else np.uint8(0)
    else:
        lo, hi = _range(row, 0, dim)
        scale = (hi - lo) / np.float32(255.0)
        header = dst[d : d + 8].view(np.float32)
        header[0] = scale
        header[1] = lo
        q = dst[d + 8 : d + 8 + dim]
        for j in range(dim):
            step = np.rint((row[j] - lo) / scale) if scale > 0 else np.float32(0.0)
            q[j] = np.uint8(min(max(step, np.float32(0.0)), np.float32(255.0)))


@njit(nogil=True, cache=True, inline="always")
def decode_row(src: Any, s: int, dim: int, code: int, dst: Any, d: int) -> None:
    """Unpack the row at ``src[s:]`` (uint8) into float32 ``dst[d : d + dim]``."""
    out = dst[d : d + dim]  # slices from 0: the loops below vectorise
    if code == _FP32:
        row32 = src[s : s + 4 * dim].view(np.float32)
        for j in range(dim):
            out[j] = row32[j]
    elif code == _FP16:
        row16 = src[s : s + 2 * dim].view(np.uint16)
        for j in range(dim):
            out[j] = F16_TO_F32[row16[j]]
    elif code == _FP8:
        scale = src[s : s + 4].view(np.float32)[0]
        q8 = src[s + 4 : s + 4 + dim]
        for j in range(dim):
            out[j] = E4M3_TO_F32[q8[j]] * scale
    else:
        header = src[s : s + 8].view(np.float32)
        scale, bias = header[0], header[1]
        q = src[s + 8 : s + 8 + dim]
        for j in range(dim):
            out[j] = bias + np.float32(q[j]) * scale


# --------------------------------------------------------------------------- batches


@njit(nogil=True, cache=True)
def encode_rows(src: Any, src_offsets: Any, table_ids: Any, dims: Any, codes: Any, dst: Any, dst_starts: Any) -> None:
    """Pack row i (``src[src_offsets[i]:]``, float32, table ``table_ids[i]``) at byte
    ``dst_starts[i]`` of ``dst`` in its table's format ``codes[t]``."""
    for i in range(table_ids.shape[0]):
        t = table_ids[i]
        encode_row(src, src_offsets[i], dims[t], codes[t], dst, dst_starts[i])


@njit(nogil=True, cache=True)
def decode_rows(src: Any, src_starts: Any, table_ids: Any, dims: Any, codes: Any, dst: Any, dst_offsets: Any) -> None:
    """Unpack row i (byte ``src_starts[i]`` of ``src``, table ``table_ids[i]``) into float32
    ``dst[dst_offsets[i] : + dims[t]]``."""
    for i in range(table_ids.shape[0]):
        t = table_ids[i]
        decode_row(src, src_starts[i], dims[t], codes[t], dst, dst_offsets[i])


@njit(nogil=True, cache=True)
def _first_unstorable(values: Any, code: int) -> Any:
    n, dim = values.shape
    flat = values.reshape(n * dim)
    for i in range(n):
        reason = unstorable_reason(flat, i * dim, dim, code)
        if reason:
            return i, reason
    return -1, 0


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


def first_unstorable(fmt: RowFormat, values: npt.NDArray[np.float32]) -> tuple[int, str]:
    """The first row of ``values`` (n, dim) that ``fmt`` cannot store and why, or ``(-1, "")``."""
    row, reason = _first_unstorable(np.ascontiguousarray(values), fmt.code)
    return int(row), _REASONS[int(reason)]


@njit(nogil=True, cache=True)
def _pack(values: Any, code: int, row_bytes: int) -> Any:
    n, dim = values.shape
    flat = values.reshape(n * dim)
    out = np.empty((n, row_bytes), np.uint8)
    packed = out.reshape(n * row_bytes)
    for i in range(n):
        encode_row(flat, i * dim, dim, code, packed, i * row_bytes)
    return out


@njit(nogil=True, cache=True)
def _unpack(packed: Any, code: int, dim: int) -> Any:
    n, row_bytes = packed.shape
    flat = packed.reshape(n * row_bytes)
    out = np.empty((n, dim), np.float32)
    rows = out.reshape(n * dim)
    for i in range(n):
        decode_row(flat, i * row_bytes, dim, code, rows, i * dim)
    return out


def pack(fmt: RowFormat, values: npt.NDArray[np.float32], what: str = "rows") -> Packed:
    """(n, dim) float32 -> (n, row_bytes) uint8 in ``fmt``; refuses the batch, naming the first
    row that cannot be stored (``what`` names the batch for the message), before packing any."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    row, reason = first_unstorable(fmt, values)
    if row >= 0:
        raise RowValueError(
            f"{what}: row {row} holds {reason}, which the {fmt} row format cannot store "
            f"(row: {values[row][:8].tolist()}{'...' if values.shape[1] > 8 else ''}); fix the "
            "embedding or store the table as fp32",
            position=row,
        )
    return _pack(values, fmt.code, fmt.row_bytes(values.shape[1]))  # type: ignore[no-any-return]


def unpack(fmt: RowFormat, packed: Packed, dim: int) -> npt.NDArray[np.float32]:
    """(n, row_bytes) uint8 in ``fmt`` -> (n, dim) float32."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != fmt.row_bytes(dim):
        raise RowValueError(f"packed {fmt} rows of width {dim} must be (n, {fmt.row_bytes(dim)}) bytes, "
                            f"got {packed.shape}")
    return _unpack(packed, fmt.code, int(dim))  # type: ignore[no-any-return]
