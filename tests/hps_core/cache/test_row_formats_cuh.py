"""kernels/row_formats.cuh against hps_core/row_formats.py, without a GPU.

The scalar half of the device header (conversions, per-element encode and decode, the row
statistics and their merge) is compiled as host C++ (g++, IEEE float32, no contraction) with
the CUDA intrinsics it uses written as their IEEE meaning, and run on rows chosen to reach
every branch: rounding ties, subnormals, the formats' limits, +0 beside -0, constant rows.
The harness lays each row out over 32 lanes exactly as the kernels do (groups of VEC
elements, lane l holding groups l, l+32, ...) and merges the lanes' statistics in the
kernels' butterfly order, for several (VEC, NV) shapes. Its bytes must be ``pack``'s and its
floats ``unpack``'s, bit for bit. What only a GPU shows (the intrinsics themselves, the
shuffles, the packed loads and stores) is checked by test_gpu_cache.py against the CPU twin.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hps_core.cache import _kernels
from hps_core.row_formats import RowFormat
from hps_core.row_codecs import first_unstorable, pack, unpack

CXX = shutil.which("g++") or shutil.which("c++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no host C++ compiler to build the header's scalar half")

#: The CUDA intrinsics the scalar half uses, as host C++: each is one IEEE float32 operation.
_PRELUDE = r"""
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
static inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
static inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
#define HPS_ROW_FORMATS_HOST 1
"""

#: Reads (n, dim, code, vec, nv) and n rows of float32 from stdin; writes each row packed
#: (row_bytes) and then decoded (dim float32), as the kernels would, lane by lane.
_HARNESS = r"""
static int element_bytes(int code) { return code == HPS_FP32 ? 4 : (code == HPS_FP16 ? 2 : 1); }

int main() {
  int head[5];
  if (std::fread(head, 4, 5, stdin) != 5) return 2;
  const int n = head[0], dim = head[1], code = head[2], vec = head[3], nv = head[4];
  if (32 * vec * nv < dim) return 3;
  const int eb = element_bytes(code), hb = hps_header_bytes(code), row_bytes = hb + eb * dim;
  std::vector<float> row(dim);
  std::vector<unsigned char> packed(row_bytes);
  std::vector<float> decoded(dim);
  for (int r = 0; r < n; ++r) {
    if (std::fread(row.data(), 4, dim, stdin) != static_cast<size_t>(dim)) return 4;
    HpsStats lanes[32];
    for (int lane = 0; lane < 32; ++lane) {  // hps_row_header: each lane in index order
      lanes[lane] = hps_stats_empty();
      for (int j = 0; j < nv; ++j)
        for (int c = 0; c < vec; ++c) {
          const int e = (j * 32 + lane) * vec + c;
          if (e < dim) hps_stats_add(lanes[lane], row[e], e, code);
        }
    }
    for (int off = 16; off > 0; off /= 2) {  // the __shfl_xor_sync butterfly
      HpsStats next[32];
      for (int lane = 0; lane < 32; ++lane) next[lane] = hps_stats_merge(lanes[lane], lanes[lane ^ off]);
      for (int lane = 0; lane < 32; ++lane) lanes[lane] = next[lane];
    }
    const HpsHeader h = hps_header(lanes[0], code);
    for (int lane = 1; lane < 32; ++lane) {  // every lane must end with the same header
      const HpsHeader o = hps_header(lanes[lane], code);
      if (std::memcmp(&o.scale, &h.scale, 4) || std::memcmp(&o.bias, &h.bias, 4) || o.ok != h.ok) return 5;
    }
    if (!h.ok) return 6;  // the tests hand over storable rows only
    std::memset(packed.data(), 0, row_bytes);
    if (code == HPS_FP8 || code == HPS_INT8) std::memcpy(packed.data(), &h.scale, 4);
    if (code == HPS_INT8) std::memcpy(packed.data() + 4, &h.bias, 4);
    for (int e = 0; e < dim; ++e) {
      const unsigned q = hps_encode(code, row[e], h);
      std::memcpy(packed.data() + hb + e * eb, &q, eb);  // little-endian low bytes
    }
    HpsHeader read{0.0f, 0.0f, true};  // what a reader takes from the packed row
    if (hb) std::memcpy(&read.scale, packed.data(), 4);
    if (hb == 8) std::memcpy(&read.bias, packed.data() + 4, 4);
    for (int e = 0; e < dim; ++e) {
      unsigned q = 0;
      std::memcpy(&q, packed.data() + hb + e * eb, eb);
      decoded[e] = hps_decode(code, q, read);
    }
    std::fwrite(packed.data(), 1, row_bytes, stdout);
    std::fwrite(decoded.data(), 4, dim, stdout);
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if CXX is None:
        pytest.skip("no host C++ compiler")
    folder = tmp_path_factory.mktemp("row_formats_cuh")
    source, binary = folder / "harness.cpp", folder / "harness"
    header = (_kernels.kernel_dir() / "row_formats.cuh").read_text()
    source.write_text(_PRELUDE + header + _HARNESS)
    cmd = [CXX, "-O2", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-Wall", "-Werror", "-o", str(binary),
           str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    return binary


def run_harness(binary: Path, fmt: RowFormat, rows: np.ndarray, vec: int, nv: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed (n, row_bytes) uint8, decoded (n, dim) float32) as the device code makes them."""
    n, dim = rows.shape
    data = struct.pack("<5i", n, dim, fmt.code, vec, nv) + np.ascontiguousarray(rows, np.float32).tobytes()
    proc = subprocess.run([str(binary)], input=data, capture_output=True, timeout=120)
    assert proc.returncode == 0, f"harness exit {proc.returncode}: {proc.stderr.decode()}"
    record = fmt.row_bytes(dim) + 4 * dim
    out = np.frombuffer(proc.stdout, np.uint8).reshape(n, record)
    return out[:, : fmt.row_bytes(dim)].copy(), out[:, fmt.row_bytes(dim) :].copy().view(np.float32)


def _ties_f16() -> list[float]:
    """float32 values halfway between two float16 values (and next to halfway), normal and
    subnormal, and the edges of float16's range."""
    one = np.float32(1.0)
    return [1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-11 + 2.0**-23, 2.0**-24 * 1.5, 2.0**-24 * 2.5, 2.0**-25,
            2.0**-25 + 2.0**-40, 2.0**-14, 2.0**-14 * (1 - 2.0**-11), 65504.0, 65503.99, 2048.5, float(one)]


def _ties_e4m3(scale_to: float) -> list[float]:
    """Values that land on e4m3 rounding ties once the row is scaled to max |x| = 448."""
    k = scale_to / 448.0
    grid = [1.0625, 1.1875, 0.0029296875, 0.0048828125, 2.0**-10, 2.0**-6 * 0.96875, 240.0, 464.0 / 1.04, 416.0 + 16.0,
            447.9, 7.5 * 2.0**-9]
    return [g * k for g in grid]


def edge_rows(fmt: RowFormat, dim: int, rng: np.random.Generator) -> np.ndarray:
    """(n, dim) float32 rows that reach every branch of ``fmt``'s encoder and decoder, all of
    them storable in ``fmt``: random rows at many magnitudes, rows of ±0, constant rows,
    rounding ties, subnormals, each format's limits."""
    rows: list[np.ndarray] = []
    for magnitude in (1e-42, 1e-38, 1e-30, 1e-7, 1e-3, 1.0, 3.0, 1e3, 6e4, 1e20, 1e37):
        for _ in range(3):
            rows.append(rng.standard_normal(dim) * magnitude)
        rows.append(rng.uniform(0, 1, dim) * magnitude)  # one sign: lo or hi is the row's edge
    special = {
        "zeros": np.zeros(dim), "negzeros": np.full(dim, -0.0), "const": np.full(dim, 2.5), "negconst": np.full(dim, -7.0),
    }
    rows += list(special.values())
    mixed = np.zeros(dim)
    mixed[::2] = -0.0
    rows.append(mixed)
    if dim > 1:
        for first in (0.0, -0.0):  # ±0 as min or max, first or later: the first index must win
            r = np.full(dim, 1.0)
            r[0], r[-1] = first, -first
            rows.append(r)
            rows.append(-r)
    pool = _ties_f16() + _ties_e4m3(448.0) + _ties_e4m3(3.0e-3)
    for start in range(0, len(pool), max(1, dim)):
        r = np.resize(np.array(pool[start : start + dim]), dim)
        rows.append(r)
        rows.append(-r)
    if dim > 1:
        for lo, hi in ((0.0, 255.0), (-1.0, 1.0), (1e-3, 1e-3 + 255e-6), (-3e38, 3e38 / 2)):
            r = np.linspace(lo, hi, dim)
            r[1::3] += (hi - lo) / 510.0  # int8 rounding ties, roughly
            rows.append(r)
        r = rng.standard_normal(dim)
        r[dim // 2] = 448.0  # fp8 scale exactly 1
        rows.append(r)
    out = np.array(rows, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        keep = [first_unstorable(fmt, out[i : i + 1])[0] < 0 for i in range(len(out))]
    return out[np.array(keep, bool)]


def shapes_for(dim: int) -> list[tuple[int, int]]:
    """(VEC, NV) pairs a kernel may run a row of ``dim`` with: those the loader picks and a
    wider NV, which must not change the answer."""
    picked = _kernels.vector_shapes([dim])
    shapes = set(picked.items())
    shapes |= {(vec, 2 * nv) for vec, nv in picked.items() if 2 * nv * vec <= 32}
    return sorted(shapes)


@needs_cxx
@pytest.mark.parametrize("fmt", list(RowFormat), ids=str)
@pytest.mark.parametrize("dim", [1, 2, 3, 4, 16, 33, 128, 1000, 1024])
def test_device_code_packs_and_unpacks_like_row_formats(harness: Path, fmt: RowFormat, dim: int) -> None:
    rows = edge_rows(fmt, dim, np.random.default_rng(dim * 10 + fmt.code))
    assert len(rows) > 20
    expected_packed = pack(fmt, rows)
    expected = unpack(fmt, expected_packed, dim)
    for vec, nv in shapes_for(dim):
        packed, decoded = run_harness(harness, fmt, rows, vec, nv)
        bad = np.flatnonzero((packed != expected_packed).any(axis=1))
        assert bad.size == 0, f"VEC {vec} NV {nv}: rows {bad[:5]} pack differently, e.g. {rows[bad[0]][:6]}"
        np.testing.assert_array_equal(decoded.view(np.uint32), expected.view(np.uint32),
                                      err_msg=f"VEC {vec} NV {nv}: decoded floats differ")


@needs_cxx
def test_every_float16_and_e4m3_code_decodes_like_the_tables(harness: Path) -> None:
    """The decoders' bit conversions against row_formats' lookup tables, over every finite code."""
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves) & (np.abs(halves) <= 65504)].astype(np.float32)
    _, decoded = run_harness(harness, RowFormat.FP16, finite[:, None], 1, 1)  # one-element rows
    np.testing.assert_array_equal(decoded[:, 0].view(np.uint32), finite.view(np.uint32))
    # e4m3: a row holding 448 (scale 1) and one code's value decodes to that value exactly
    from hps_core.row_formats import E4M3_TO_F32

    values = E4M3_TO_F32[np.isfinite(E4M3_TO_F32)]
    rows = np.stack([np.full(values.shape, 448.0, np.float32), values], axis=1)
    _, decoded = run_harness(harness, RowFormat.FP8, rows, 1, 1)
    np.testing.assert_array_equal(decoded[:, 1].view(np.uint32), values.view(np.uint32))
