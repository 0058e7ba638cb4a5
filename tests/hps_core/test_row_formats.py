"""Row formats (hps_core/row_formats.py): layouts, round-trip error bounds over random rows
(constant rows, huge and tiny magnitudes, single elements), refusal of unstorable rows, and
the exact rounding the GPU kernels must reproduce (float16 as NumPy rounds it, e4m3 to the
nearest code with ties to even)."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from hps_core.errors import ConfigError, RowValueError
from hps_core.row_formats import E4M3_TO_F32, FORMAT_NAMES, RowFormat, format_codes
from hps_core.row_codecs import decode_rows, encode_rows, f32_to_e4m3, first_unstorable, pack, unpack

EPS = float(np.finfo(np.float32).eps)
DIMS = (1, 2, 3, 16, 128)


def random_rows(n: int, dim: int, seed: int, *, low: float = -30.0, high: float = 30.0) -> np.ndarray:
    """Rows of magnitudes 10**low .. 10**high, some offset from zero, some constant, some
    holding zeros: the shapes a quantiser gets wrong first."""
    rng = np.random.default_rng(seed)
    magnitude = 10.0 ** rng.uniform(low, high, size=(n, 1))
    rows = rng.normal(size=(n, dim)) * magnitude
    rows += rng.normal(size=(n, 1)) * magnitude * rng.choice([0.0, 1.0, 50.0], size=(n, 1))
    rows[::7] = rows[::7, :1]  # constant rows
    rows[3::11, : max(1, dim // 2)] = 0.0
    return rows.astype(np.float32)


def round_trip(fmt: RowFormat, rows: np.ndarray) -> np.ndarray:
    return unpack(fmt, pack(fmt, rows), rows.shape[1])


def test_names_and_sizes() -> None:
    assert FORMAT_NAMES == ("fp32", "fp16", "fp8", "int8")
    assert [RowFormat(n).row_bytes(128) for n in FORMAT_NAMES] == [512, 256, 132, 136]
    assert [RowFormat(n).row_bytes(16) for n in FORMAT_NAMES] == [64, 32, 20, 24]
    assert all(RowFormat.from_code(f.code) is f for f in RowFormat)
    assert format_codes(["int8", RowFormat.FP32]).tolist() == [RowFormat.INT8.code, RowFormat.FP32.code]
    with pytest.raises(ConfigError, match=r"models\[0\].x in a.json: row format must be one of fp32, fp16, fp8, int8; got 'int4'"):
        RowFormat.parse("int4", "models[0].x in a.json")


@pytest.mark.parametrize("dim", DIMS)
def test_fp32_is_exact_and_hugectrs_bytes(dim: int) -> None:
    rows = random_rows(500, dim, seed=dim)
    packed = pack(RowFormat.FP32, rows)
    assert packed.tobytes() == rows.astype("<f4").tobytes()
    np.testing.assert_array_equal(unpack(RowFormat.FP32, packed, dim), rows)


@pytest.mark.parametrize("dim", DIMS)
def test_fp16_rounds_as_numpy(dim: int) -> None:
    rows = np.clip(random_rows(2000, dim, seed=dim, low=-9, high=4.8), -65504, 65504).astype(np.float32)
    packed = pack(RowFormat.FP16, rows)
    np.testing.assert_array_equal(packed.view("<u2"), rows.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(unpack(RowFormat.FP16, packed, dim), rows.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("dim", DIMS)
def test_int8_error_is_half_a_step(dim: int) -> None:
    rows = random_rows(4000, dim, seed=100 + dim)
    packed = pack(RowFormat.INT8, rows)
    header = packed[:, :8].copy().view("<f4")
    scale, bias = header[:, 0], header[:, 1]
    np.testing.assert_array_equal(bias, rows.min(1))
    np.testing.assert_array_equal(scale, (rows.max(1) - rows.min(1)) / np.float32(255))
    served = unpack(RowFormat.INT8, packed, dim)
    amax = np.abs(rows).max(1)
    bound = 0.5 * scale + 4 * EPS * amax  # half a step, plus the float32 rounding of bias + q * scale
    assert (np.abs(served - rows).max(1) <= bound).all()
    constant = (rows == rows[:, :1]).all(1)
    np.testing.assert_array_equal(served[constant], rows[constant])  # scale 0: exact


@pytest.mark.parametrize("dim", DIMS)
def test_fp8_error_is_a_sixteenth(dim: int) -> None:
    rows = random_rows(4000, dim, seed=200 + dim)
    packed = pack(RowFormat.FP8, rows)
    scale = packed[:, :4].copy().view("<f4")[:, 0]
    amax = np.abs(rows).max(1)
    np.testing.assert_array_equal(scale, amax / np.float32(448))
    served = unpack(RowFormat.FP8, packed, dim)
    # 3 mantissa bits: half a step is 2**-4 of the value; below 2**-6 (scaled) the subnormal
    # step 2**-9 applies; the scale's own rounding adds a few float32 ulps of the row's max
    bound = np.abs(rows) * 2.0**-4 + (scale * 2.0**-10)[:, None] + (4 * EPS * amax)[:, None]
    assert (np.abs(served - rows) <= bound).all()
    assert (np.abs(served).max(1) <= amax * (1 + 4 * EPS)).all()


def test_e4m3_encoder_picks_the_nearest_code_ties_to_even() -> None:
    @njit
    def encode(values: np.ndarray) -> np.ndarray:
        out = np.empty(values.shape[0], np.uint8)
        for i in range(values.shape[0]):
            out[i] = f32_to_e4m3(values[i])
        return out

    codes = E4M3_TO_F32[:0x7F].astype(np.float64)  # the non-negative codes, in order
    midpoints = ((codes[1:] + codes[:-1]) / 2).astype(np.float32)
    rng = np.random.default_rng(3)
    values = np.concatenate([codes.astype(np.float32), midpoints, rng.uniform(0, 448, 20000).astype(np.float32),
                             rng.uniform(0, 2.0**-6, 5000).astype(np.float32)])
    got = encode(values)
    distance = np.abs(codes[None, :] - values[:, None].astype(np.float64))
    nearest = distance.min(1)
    assert (np.abs(codes[got] - values) == nearest).all()
    tie = (distance == nearest[:, None]).sum(1) == 2
    assert tie.sum() >= len(midpoints) - 1 and (got[tie] % 2 == 0).all()
    np.testing.assert_array_equal(encode(-values), got | 0x80)
    assert E4M3_TO_F32[0x7E] == 448 and E4M3_TO_F32[1] == 2.0**-9


@pytest.mark.parametrize("fmt", [f for f in RowFormat if f is not RowFormat.FP32], ids=str)
@pytest.mark.parametrize("bad, reason", [(np.nan, "a NaN"), (np.inf, "an infinity"), (-np.inf, "an infinity")])
def test_nan_and_inf_are_refused(fmt: RowFormat, bad: float, reason: str) -> None:
    rows = random_rows(10, 4, seed=1, low=-3, high=3)
    rows[6, 3] = bad
    assert first_unstorable(fmt, rows) == (6, reason)
    with pytest.raises(RowValueError, match=f"table t: row 6 holds {reason}, which the {fmt} row format") as err:
        pack(fmt, rows, "table t")
    assert err.value.position == 6


def test_fp32_stores_what_it_is_given() -> None:
    rows = np.array([[np.nan, np.inf, -1.0]], np.float32)
    np.testing.assert_array_equal(round_trip(RowFormat.FP32, rows), rows)


def test_range_limits() -> None:
    with pytest.raises(RowValueError, match="beyond float16's"):
        pack(RowFormat.FP16, np.array([[1.0, 70000.0]], np.float32))
    np.testing.assert_array_equal(round_trip(RowFormat.FP16, np.array([[65504.0, -65504.0]], np.float32)),
                                  [[65504.0, -65504.0]])
    with pytest.raises(RowValueError, match=r"range \(max - min\) beyond float32"):
        pack(RowFormat.INT8, np.array([[-3e38, 3e38]], np.float32))
    huge = np.array([[3e38, -1e38, 2e38]], np.float32)
    assert np.isfinite(round_trip(RowFormat.FP8, huge)).all()
    assert np.abs(round_trip(RowFormat.FP8, huge) - huge).max() <= 3e38 * 2.0**-4


@pytest.mark.parametrize("fmt", list(RowFormat), ids=str)
def test_requantising_a_served_row_serves_it_again(fmt: RowFormat) -> None:
    """A cache fills from a tier's float32 answer: packing it again must serve the same row
    (exactly, or for int8 within float32 rounding of the row's largest value)."""
    rows = np.clip(random_rows(3000, 16, seed=9, low=-6, high=4), -60000, 60000).astype(np.float32)
    once = round_trip(fmt, rows)
    twice = round_trip(fmt, once)
    if fmt is RowFormat.INT8:
        tolerance = 4 * EPS * np.abs(once).max(1, keepdims=True)
        assert (np.abs(twice - once) <= tolerance).all()
    else:
        np.testing.assert_array_equal(twice, once)


def test_flat_encode_and_decode_of_mixed_tables() -> None:
    """encode_rows/decode_rows: rows of tables of different widths and formats in flat buffers."""
    formats = list(RowFormat)
    dims = np.array([3, 16, 5, 8], np.int64)
    codes = format_codes(formats)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 4, 200).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(dims[ids])[:-1]]).astype(np.int64)
    src = rng.normal(size=int(dims[ids].sum())).astype(np.float32)
    sizes = np.array([RowFormat(formats[t]).row_bytes(int(dims[t])) for t in ids], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    packed = np.zeros(int(sizes.sum()), np.uint8)
    encode_rows(src, offsets, ids, dims, codes, packed, starts)
    out = np.zeros_like(src)
    decode_rows(packed, starts, ids, dims, codes, out, offsets)
    for i, t in enumerate(ids.tolist()):
        row = src[offsets[i]: offsets[i] + dims[t]][None, :]
        np.testing.assert_array_equal(out[offsets[i]: offsets[i] + dims[t]], round_trip(formats[t], row)[0])
