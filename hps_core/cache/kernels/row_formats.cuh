// Row formats on the device: the GPU caches' twin of hps_core/row_codecs.py, which the CPU
// twins call (encode_row, decode_row). The two MUST change together, line for line: the
// caches promise the same bytes in the store and the same float32 out of a query on both
// (tests/hps_core/cache/test_gpu_cache.py compares them on a GPU; test_row_formats_cuh.py
// compiles the scalar half below as host C++ and compares it with row_codecs.py anywhere).
//
// Packed row of a dim-wide table, little-endian (row_formats.py has the table):
//   fp32  f32[dim]                          fp16  f16 bits[dim]
//   fp8   scale f32 | e4m3[dim]             int8  scale f32 | bias f32 | u8[dim]
//
// Same bits as NumPy/numba: float32 operations in the same order, each one rounded alone
// (__fmul_rn, __fadd_rn, __fsub_rn and __fdiv_rn are never fused into an FMA or turned into a
// reciprocal), round-to-nearest-even by explicit bit rounding (no fp8/fp16 cvt instruction,
// which differs by GPU generation), rintf for np.rint. Comparisons mirror numba's min/max:
// min(lo, v) is `v < lo ? v : lo`, so of equal values (+0 and -0) the first index wins; the
// warp reductions carry that index, which makes them independent of the lanes' order.
//
// Include after common.cuh (its warp, grid and row-width helpers). The scalar half (conversions, per-element
// encode and decode, the row statistics and their merge) builds as host C++ when the includer
// defines HPS_ROW_FORMATS_HOST and the CUDA intrinsics it uses; the warp half is left out then.
#ifndef HPS_ROW_FORMATS_CUH
#define HPS_ROW_FORMATS_CUH

#ifdef HPS_ROW_FORMATS_HOST
#define HPS_FN static inline
#else
#define HPS_FN __device__ __forceinline__
#endif

// Format codes: RowFormat.code in row_formats.py.
#define HPS_FP32 0
#define HPS_FP16 1
#define HPS_FP8 2
#define HPS_INT8 3

// Bytes in front of the elements (RowFormat.header_bytes).
HPS_FN int hps_header_bytes(int code) { return code == HPS_FP8 ? 4 : (code == HPS_INT8 ? 8 : 0); }

// ---------------------------------------------------------------- scalar conversions

// f32_to_f16_bits: float32 -> float16 bits, round to nearest even; >= 65520 -> infinity.
HPS_FN unsigned hps_f32_to_f16_bits(float x) {
  const unsigned bits = __float_as_uint(x);
  const unsigned sign = (bits >> 16) & 0x8000u;
  const unsigned a = bits & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u);  // inf or NaN
  if (a < 0x38800000u) {  // below 2**-14: a half subnormal, in units of 2**-24
    return sign | static_cast<unsigned>(rintf(__fmul_rn(fabsf(x), 16777216.0f)));
  }
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // rounds to 65536 or more
  const unsigned exponent = (a >> 23) - 112u;  // rebias 127 -> 15
  const unsigned keep = (a >> 13) & 0x3FFu;
  const unsigned rest = a & 0x1FFFu;
  unsigned h = (exponent << 10) | keep;
  if (rest > 0x1000u || (rest == 0x1000u && (keep & 1u))) h += 1u;  // a carry into the exponent is right too
  return (sign | h) & 0xFFFFu;
}

// F16_TO_F32: float16 bits -> float32, exact (NumPy's widening, NaN payload kept).
HPS_FN float hps_f16_bits_to_f32(unsigned h) {
  const unsigned sign = (h & 0x8000u) << 16;
  const unsigned exponent = (h >> 10) & 0x1Fu;
  const unsigned mantissa = h & 0x3FFu;
  if (exponent == 0u) {  // zero or subnormal: mantissa * 2**-24, exact in float32
    return __uint_as_float(sign | __float_as_uint(__fmul_rn(static_cast<float>(mantissa), 5.9604644775390625e-08f)));
  }
  if (exponent == 31u) return __uint_as_float(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN
  return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// f32_to_e4m3: float32 -> e4m3 code, round to nearest even, saturating at +-448.
HPS_FN unsigned hps_f32_to_e4m3(float x) {
  const unsigned bits = __float_as_uint(x);
  const unsigned sign = (bits >> 24) & 0x80u;
  const unsigned a = bits & 0x7FFFFFFFu;
  if (a >= 0x43E00000u) return sign | 0x7Eu;  // 448 or more
  if (a < 0x3C800000u) {  // below 2**-6: a subnormal, in units of 2**-9
    return sign | (static_cast<unsigned>(rintf(__fmul_rn(fabsf(x), 512.0f))) & 0xFFu);
  }
  const unsigned exponent = (a >> 23) - 120u;  // rebias 127 -> 7
  const unsigned keep = (a >> 20) & 7u;
  const unsigned rest = a & 0xFFFFFu;
  unsigned code = (exponent << 3) | keep;
  if (rest > 0x80000u || (rest == 0x80000u && (keep & 1u))) code += 1u;
  if (code > 0x7Eu) code = 0x7Eu;
  return sign | code;
}

// E4M3_TO_F32: e4m3 code -> float32, exact; 0x7F and 0xFF are the table's (positive) NaN.
HPS_FN float hps_e4m3_to_f32(unsigned q) {
  const unsigned exponent = (q >> 3) & 0xFu;
  const unsigned mantissa = q & 7u;
  if (exponent == 15u && mantissa == 7u) return __uint_as_float(0x7FC00000u);
  const unsigned sign = (q & 0x80u) << 24;
  if (exponent == 0u) {  // mantissa * 2**-9, exact
    return __uint_as_float(sign | __float_as_uint(__fmul_rn(static_cast<float>(mantissa), 0.001953125f)));
  }
  return __uint_as_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

// ---------------------------------------------------------------- row statistics
// What a row's header needs, gathered element by element (hps_stats_add, in index order
// within a lane) and merged across lanes (hps_stats_merge: associative and commutative, so
// any reduction tree gives numba's sequential answer):
//   lo, hi    _range: the first minimum and the first maximum (ties broken by index `*_at`)
//   amax      encode_row's fp8 max |x| (starts at 0, like numba's)
//   bad       unstorable_reason != 0: a NaN or infinity (compact formats), a value beyond
//             float16's range (fp16); int8's overflowing range is checked by hps_header.
struct HpsStats {
  float lo, hi, amax;
  int lo_at, hi_at;
  unsigned bad;
};

struct HpsHeader {
  float scale, bias;  // fp8: scale; int8: scale, bias (= lo); else unused
  bool ok;            // the row can be stored in the format
};

HPS_FN HpsStats hps_stats_empty() {
  HpsStats s;
  s.lo = __uint_as_float(0x7F800000u);  // +inf, index past any row: loses every tie
  s.hi = __uint_as_float(0xFF800000u);
  s.lo_at = s.hi_at = 0x7FFFFFFF;
  s.amax = 0.0f;
  s.bad = 0u;
  return s;
}

HPS_FN void hps_stats_add(HpsStats& s, float v, int at, int code) {
  if (v < s.lo || (v == s.lo && at < s.lo_at)) { s.lo = v; s.lo_at = at; }
  if (v > s.hi || (v == s.hi && at < s.hi_at)) { s.hi = v; s.hi_at = at; }
  const float m = fabsf(v);
  if (m > s.amax) s.amax = m;
  const unsigned a = __float_as_uint(v) & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) s.bad = 1u;  // NaN or infinity
  if (code == HPS_FP16 && m > 65504.0f) s.bad = 1u;
}

HPS_FN HpsStats hps_stats_merge(HpsStats a, const HpsStats& b) {
  if (b.lo < a.lo || (b.lo == a.lo && b.lo_at < a.lo_at)) { a.lo = b.lo; a.lo_at = b.lo_at; }
  if (b.hi > a.hi || (b.hi == a.hi && b.hi_at < a.hi_at)) { a.hi = b.hi; a.hi_at = b.hi_at; }
  if (b.amax > a.amax) a.amax = b.amax;
  a.bad |= b.bad;
  return a;
}

// encode_row's header of a row with statistics `s`, and whether unstorable_reason is 0.
HPS_FN HpsHeader hps_header(const HpsStats& s, int code) {
  HpsHeader h;
  h.scale = 0.0f;
  h.bias = 0.0f;
  h.ok = true;
  if (code == HPS_FP32) return h;
  h.ok = s.bad == 0u;
  if (code == HPS_FP8) {
    h.scale = __fdiv_rn(s.amax, 448.0f);
  } else if (code == HPS_INT8) {
    const float range = __fsub_rn(s.hi, s.lo);
    if ((__float_as_uint(range) & 0x7FFFFFFFu) == 0x7F800000u) h.ok = false;  // max - min overflows
    h.scale = __fdiv_rn(range, 255.0f);
    h.bias = s.lo;
  }
  return h;
}

// ---------------------------------------------------------------- elements

// Element x of a row with header h, as its stored bits (the low 32, 16 or 8 of the result).
HPS_FN unsigned hps_encode(int code, float x, const HpsHeader& h) {
  if (code == HPS_FP32) return __float_as_uint(x);
  if (code == HPS_FP16) return hps_f32_to_f16_bits(x);
  if (!(h.scale > 0.0f)) return 0u;
  if (code == HPS_FP8) return hps_f32_to_e4m3(__fdiv_rn(x, h.scale));
  float q = rintf(__fdiv_rn(__fsub_rn(x, h.bias), h.scale));
  q = 0.0f > q ? 0.0f : q;  // numba's max(q, 0.0), then min(., 255.0)
  q = 255.0f < q ? 255.0f : q;
  return static_cast<unsigned>(q);
}

// Stored bits q of a row with header h, as float32.
HPS_FN float hps_decode(int code, unsigned q, const HpsHeader& h) {
  if (code == HPS_FP32) return __uint_as_float(q);
  if (code == HPS_FP16) return hps_f16_bits_to_f32(q);
  if (code == HPS_FP8) return __fmul_rn(hps_e4m3_to_f32(q), h.scale);
  return __fadd_rn(h.bias, __fmul_rn(static_cast<float>(q), h.scale));
}

#ifndef HPS_ROW_FORMATS_HOST
// ---------------------------------------------------------------- packed groups
// A group is VEC consecutive elements of one lane (common.cuh's row layout). Its packed
// bytes, VEC * element size of them, are moved in one transaction: the caches keep every
// row's payload aligned for it (cache/base.py, row_stride).

template <int TOTAL>
__device__ __forceinline__ void hps_load_words(const unsigned char* p, unsigned (&w)[(TOTAL + 3) / 4]) {
  if constexpr (TOTAL == 16) {
    const uint4 t = hps_racy_ld(reinterpret_cast<const uint4*>(p));
    w[0] = t.x; w[1] = t.y; w[2] = t.z; w[3] = t.w;
  } else if constexpr (TOTAL == 8) {
    const uint2 t = hps_racy_ld(reinterpret_cast<const uint2*>(p));
    w[0] = t.x; w[1] = t.y;
  } else if constexpr (TOTAL == 4) {
    w[0] = hps_racy_ld(reinterpret_cast<const unsigned*>(p));
  } else if constexpr (TOTAL == 2) {
    w[0] = hps_racy_ld(reinterpret_cast<const unsigned short*>(p));
  } else {
    w[0] = hps_racy_ld(p);
  }
}

template <int TOTAL>
__device__ __forceinline__ void hps_store_words(unsigned char* p, const unsigned (&w)[(TOTAL + 3) / 4]) {
  if constexpr (TOTAL == 16) {
    hps_racy_st(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  } else if constexpr (TOTAL == 8) {
    hps_racy_st(reinterpret_cast<uint2*>(p), make_uint2(w[0], w[1]));
  } else if constexpr (TOTAL == 4) {
    hps_racy_st(reinterpret_cast<unsigned*>(p), w[0]);
  } else if constexpr (TOTAL == 2) {
    hps_racy_st(reinterpret_cast<unsigned short*>(p), static_cast<unsigned short>(w[0]));
  } else {
    hps_racy_st(p, static_cast<unsigned char>(w[0]));
  }
}

// VEC elements of BYTES bytes each at p -> q[0..VEC), little-endian.
template <int VEC, int BYTES>
__device__ __forceinline__ void hps_load_group(const unsigned char* p, unsigned* q) {
  unsigned w[(VEC * BYTES + 3) / 4];
  hps_load_words<VEC * BYTES>(p, w);
#pragma unroll
  for (int c = 0; c < VEC; ++c) {
    if constexpr (BYTES == 4) {
      q[c] = w[c];
    } else {
      q[c] = (w[(c * BYTES) / 4] >> (8 * ((c * BYTES) % 4))) & ((1u << (8 * BYTES)) - 1u);
    }
  }
}

template <int VEC, int BYTES>
__device__ __forceinline__ void hps_store_group(unsigned char* p, const unsigned* q) {
  unsigned w[(VEC * BYTES + 3) / 4];
#pragma unroll
  for (int k = 0; k < (VEC * BYTES + 3) / 4; ++k) w[k] = 0u;
#pragma unroll
  for (int c = 0; c < VEC; ++c) w[(c * BYTES) / 4] |= q[c] << (8 * ((c * BYTES) % 4));
  hps_store_words<VEC * BYTES>(p, w);
}

// ---------------------------------------------------------------- warp-cooperative rows
// Lane l holds groups l, l+32, ... of the row (common.cuh), element e of a row at register
// (e / (32 * VEC)) * VEC + e % VEC of lane (e / VEC) % 32. `code` is per table, so every
// branch on it is warp-uniform.

// A caller's float32 row -> registers (elements past dim are left as they are).
template <int VEC, int NV>
__device__ __forceinline__ void hps_row_take(const float* src, int dim, int lane, float (&buf)[NV * VEC],
                                             bool aligned) {
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int e = (j * HPS_WARP + lane) * VEC;
    if (e < dim) hps_group_load<VEC>(src + e, buf + j * VEC, aligned);
  }
}

// The header of the row in registers (every lane gets the same): each lane's statistics in
// index order, then a butterfly of hps_stats_merge.
template <int VEC, int NV>
__device__ __forceinline__ HpsHeader hps_row_header(int code, int dim, int lane, const float (&buf)[NV * VEC]) {
  HpsStats s = hps_stats_empty();
  if (code == HPS_FP32) return hps_header(s, code);
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int e = (j * HPS_WARP + lane) * VEC;
#pragma unroll
    for (int c = 0; c < VEC; ++c) {
      if (e + c < dim) hps_stats_add(s, buf[j * VEC + c], e + c, code);
    }
  }
#pragma unroll
  for (int off = HPS_WARP / 2; off > 0; off /= 2) {
    HpsStats o;
    o.lo = __shfl_xor_sync(HPS_FULL_MASK, s.lo, off);
    o.hi = __shfl_xor_sync(HPS_FULL_MASK, s.hi, off);
    o.amax = __shfl_xor_sync(HPS_FULL_MASK, s.amax, off);
    o.lo_at = __shfl_xor_sync(HPS_FULL_MASK, s.lo_at, off);
    o.hi_at = __shfl_xor_sync(HPS_FULL_MASK, s.hi_at, off);
    o.bad = __shfl_xor_sync(HPS_FULL_MASK, s.bad, off);
    s = hps_stats_merge(s, o);
  }
  return hps_header(s, code);
}

// Record that row i of the call cannot be stored in its table's format: status[2] becomes
// 1 + its position (first reporter wins; the host raises RowValueError naming the first).
// `status` is null for a write that does not wait for its kernel (a dynamic replace): its
// check pass, hps_check_rows, has already refused any batch holding such a row.
__device__ __forceinline__ void hps_flag_unstorable(unsigned* status, long long i, int lane) {
  if (status != nullptr && lane == 0) atomicCAS(status + 2, 0u, static_cast<unsigned>(i + 1));
}

template <int VEC, int BYTES, int NV>
__device__ __forceinline__ void hps_row_encode_groups(unsigned char* payload, int code, int dim, int lane,
                                                      const float (&buf)[NV * VEC], const HpsHeader& h) {
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int e = (j * HPS_WARP + lane) * VEC;
    if (e < dim) {
      unsigned q[VEC];
#pragma unroll
      for (int c = 0; c < VEC; ++c) q[c] = hps_encode(code, buf[j * VEC + c], h);
      hps_store_group<VEC, BYTES>(payload + static_cast<long long>(e) * BYTES, q);
    }
  }
}

// Registers -> the packed row at `row` (encode_row); the writer holds the row.
template <int VEC, int NV>
__device__ __forceinline__ void hps_row_encode(unsigned char* row, int code, int dim, int lane,
                                               const float (&buf)[NV * VEC], const HpsHeader& h) {
  if (code == HPS_FP32) {
    hps_row_encode_groups<VEC, 4, NV>(row, code, dim, lane, buf, h);
  } else if (code == HPS_FP16) {
    hps_row_encode_groups<VEC, 2, NV>(row, code, dim, lane, buf, h);
  } else {
    if (lane == 0) {
      hps_racy_st(reinterpret_cast<float*>(row), h.scale);
      if (code == HPS_INT8) hps_racy_st(reinterpret_cast<float*>(row) + 1, h.bias);
    }
    hps_row_encode_groups<VEC, 1, NV>(row + hps_header_bytes(code), code, dim, lane, buf, h);
  }
}

// A caller's float32 row staged in registers by a writer, with its table's format and the
// row's header: every kernel that stores rows begins with stage() and ends with store().
template <int VEC, int NV>
struct HpsStagedRow {
  float buf[NV * VEC];
  HpsHeader h;
  int code;

  // Row i of the call (at `src`, `aligned` for VEC-wide loads) of a table of format
  // `format`. false when the format cannot store it, after flagging it: the caller skips
  // the row, touching nothing.
  __device__ __forceinline__ bool stage(const float* src, bool aligned, long long format, int dim, int lane,
                                        unsigned* status, long long i) {
    code = static_cast<int>(format);
    hps_row_take<VEC, NV>(src, dim, lane, buf, aligned);
    h = hps_row_header<VEC, NV>(code, dim, lane, buf);
    if (!h.ok) hps_flag_unstorable(status, i, lane);
    return h.ok;
  }

  // The packed row at `row` (the writer holds it).
  __device__ __forceinline__ void store(unsigned char* row, int dim, int lane) const {
    hps_row_encode<VEC, NV>(row, code, dim, lane, buf, h);
  }
};

// The check pass of a write (gpu.py runs it before the write's launch when a table of the
// cache is not fp32): stage() of every row of the call, storing nothing, so status[2] names
// a row its table's format cannot store and the host refuses the batch whole before any row
// is written, as the CPU twins do. The writers' own check, not a copy of it. A row that
// does not fit `src` is skipped unflagged (the write reports it as it always does); fp32
// rows are not read (float32 stores any row). One warp per row.
template <int VEC, int NV>
__global__ void hps_check_rows(const long long* __restrict__ table_ids, long long n, const float* __restrict__ src,
                               const long long* __restrict__ src_offsets, long long src_size, unsigned* status,
                               const long long* dims, const long long* codes, int tables) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long i = hps_warp_id(); i < n; i += nwarps) {
    const long long t = table_ids[i];
    const long long o = src_offsets[i];
    const int dim = hps_row_width(t, o, tables, dims, src_size);
    if (dim < 0 || codes[t] == HPS_FP32) continue;
    HpsStagedRow<VEC, NV> row;
    row.stage(src + o, o % VEC == 0, codes[t], dim, lane, status, i);
  }
}

template <int VEC, int BYTES, int NV>
__device__ __forceinline__ void hps_row_load_groups(const unsigned char* payload, int dim, int lane,
                                                    unsigned (&q)[NV * VEC]) {
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int e = (j * HPS_WARP + lane) * VEC;
    if (e < dim) hps_load_group<VEC, BYTES>(payload + static_cast<long long>(e) * BYTES, q + j * VEC);
  }
}

// The packed row at `row` -> registers, still packed (a reader decodes only a copy its
// seqlock check accepted); every lane reads the header.
template <int VEC, int NV>
__device__ __forceinline__ void hps_row_copy_packed(const unsigned char* row, int code, int dim, int lane,
                                                    unsigned (&q)[NV * VEC], HpsHeader& h) {
  if (code == HPS_FP32) {
    hps_row_load_groups<VEC, 4, NV>(row, dim, lane, q);
  } else if (code == HPS_FP16) {
    hps_row_load_groups<VEC, 2, NV>(row, dim, lane, q);
  } else {
    h.scale = hps_racy_ld(reinterpret_cast<const float*>(row));
    if (code == HPS_INT8) h.bias = hps_racy_ld(reinterpret_cast<const float*>(row) + 1);
    hps_row_load_groups<VEC, 1, NV>(row + hps_header_bytes(code), dim, lane, q);
  }
}

// Packed registers -> a caller's float32 row (decode_row).
template <int VEC, int NV>
__device__ __forceinline__ void hps_row_decode(float* out, int code, int dim, int lane, const unsigned (&q)[NV * VEC],
                                               const HpsHeader& h, bool aligned) {
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int e = (j * HPS_WARP + lane) * VEC;
    if (e < dim) {
      float f[VEC];
#pragma unroll
      for (int c = 0; c < VEC; ++c) f[c] = hps_decode(code, q[j * VEC + c], h);
      hps_group_store<VEC>(out + e, f, aligned);
    }
  }
}

#endif  // HPS_ROW_FORMATS_HOST

#endif  // HPS_ROW_FORMATS_CUH
