"""The row formats' conversions (:mod:`hps_core.row_formats` says what each format stores):
numba kernels that pack float32 rows into a format and read them back, row by row for the
tiers' and caches' own kernels (``encode_row``, ``decode_row``) and by batch (``pack``,
``unpack``, ``encode_rows``, ``decode_rows``), and the check of what a format can store
(``first_unstorable``). The GPU kernels' twin is ``cache/kernels/row_formats.cuh``: every
conversion gives the same bits on both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit

from hps_core.errors import RowValueError
from hps_core.row_formats import E4M3_MAX, E4M3_TO_F32, F16_MAX, F16_TO_F32, RowFormat

__all__ = [
    "Packed",
    "decode_row",
    "decode_rows",
    "encode_row",
    "encode_rows",
    "first_unstorable",
    "pack",
    "unpack",
    "unstorable_reason",
]

Packed = npt.NDArray[np.uint8]
# the formats' codes as module constants, which numba compiles in
_FP32, _FP16, _FP8, _INT8 = (fmt.code for fmt in (RowFormat.FP32, RowFormat.FP16, RowFormat.FP8, RowFormat.INT8))


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
