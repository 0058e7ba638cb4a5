// Device helpers shared by the cache kernels: key hashing, memory ordering, vector I/O, and
// the per-table lookups of the multi-table layout (hps_core/rows.py).
//
// hps_core/cache/_kernels.py pastes this text (and row_formats.cuh's) in place of the
// `#include "common.cuh"` line of each .cu before handing the source to NVRTC
// (cupy.RawModule caches compiled code by source text, so the headers must be part of that
// text, not an -I include). The include guard keeps the file usable through #include as well. No CUDA headers are included, so
// the sources build the same under NVRTC (which has no system include path) and nvcc.
#ifndef HPS_COMMON_CUH
#define HPS_COMMON_CUH

#define HPS_FULL_MASK 0xffffffffu
#define HPS_WARP 32
// A reader retries a vector copied while a writer held the slot this many times, then
// reports the key missing (the lookup then fetches it from the next tier): a miss is always
// a safe answer, a torn vector never is.
#define HPS_MAX_READ_TRIES 64
// A call's status words (gpu.py's _STATUS): [0] its count, [1] 1 + the position of a row
// that does not fit its buffer, [2] 1 + the position of a row its format cannot store
// (row_formats.cuh); then one word per table.
#define HPS_STATUS_WORDS 3

// splitmix64 finaliser; hps_core/hashing.py (mix64) uses the same constants, so a key lands
// in the same set on the CPU twin and the GPU.
__device__ __forceinline__ unsigned long long hps_mix64(unsigned long long x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Keys widen to 64 bits like NumPy's uint64 cast: int64 by two's complement, uint32 by zero.
__device__ __forceinline__ unsigned long long hps_key_bits(long long k) {
  return static_cast<unsigned long long>(k);
}
__device__ __forceinline__ unsigned long long hps_key_bits(unsigned int k) {
  return static_cast<unsigned long long>(k);
}

// ---------------------------------------------------------------- memory ordering (sm_70+)
// Seqlock words are read and written with explicit PTX scopes: a plain load may be served
// from a non-coherent L1 line and a plain store may be reordered with the payload.
// HPS_EMULATOR: the CPU emulator of the tests (tests/cuda_emulator/cuda_shim.h) defines these
// helpers as C++ atomics of the same orders; PTX does not compile for the host.
#ifndef HPS_EMULATOR

__device__ __forceinline__ unsigned hps_ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned hps_ld_relaxed(const unsigned* p) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ int hps_ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void hps_st_relaxed(unsigned* p, unsigned v) {
  asm volatile("st.relaxed.gpu.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void hps_st_release(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void hps_st_release(int* p, int v) {
  asm volatile("st.release.gpu.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Orders every earlier load/store of this thread before every later one, at GPU scope.
__device__ __forceinline__ void hps_fence() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }
#endif  // HPS_EMULATOR

// ---------------------------------------------------------------- accesses that race by design
// A reader's copy of a seqlocked key or packed row (kept only if the version did not move),
// the writer's stores it races with, and the LRU/LFU metadata readers write without a lock
// (advisory: a race can misjudge a victim, never a value). Plain (or volatile: read fresh,
// past L1) on the GPU, where an aligned word is never torn and the seqlock rejects a copy a
// write overlapped. Named so the CPU emulator can map them to relaxed C++ atomics, which is
// what they are in a seqlock under the C++ memory model: its ThreadSanitizer build then
// reports every race but these (tests/cuda_emulator/cuda_shim.h).
#ifndef HPS_EMULATOR
template <typename T>
__device__ __forceinline__ T hps_racy_ld(const T* p) {
  return *p;
}
template <typename T>
__device__ __forceinline__ void hps_racy_st(T* p, const T& v) {
  *p = v;
}
template <typename T>
__device__ __forceinline__ T hps_volatile_ld(const T* p) {
  return *reinterpret_cast<const volatile T*>(p);
}
#endif  // HPS_EMULATOR

// ---------------------------------------------------------------- vector I/O
// VecIO<VEC>::load reads VEC consecutive floats of a caller's buffer at p (aligned to
// the whole group); store writes them back. One 16-byte (float4) or 8-byte (float2)
// transaction per group where the width allows. (Stored rows are packed in their table's
// format and moved by row_formats.cuh.)

template <int VEC>
struct VecIO;

template <>
struct VecIO<4> {
  static __device__ __forceinline__ void load(const float* p, float* d) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    d[0] = t.x; d[1] = t.y; d[2] = t.z; d[3] = t.w;
  }
  static __device__ __forceinline__ void store(float* p, const float* s) {
    *reinterpret_cast<float4*>(p) = make_float4(s[0], s[1], s[2], s[3]);
  }
};

template <>
struct VecIO<2> {
  static __device__ __forceinline__ void load(const float* p, float* d) {
    const float2 t = *reinterpret_cast<const float2*>(p);
    d[0] = t.x; d[1] = t.y;
  }
  static __device__ __forceinline__ void store(float* p, const float* s) {
    *reinterpret_cast<float2*>(p) = make_float2(s[0], s[1]);
  }
};

template <>
struct VecIO<1> {
  static __device__ __forceinline__ void load(const float* p, float* d) { d[0] = *p; }
  static __device__ __forceinline__ void store(float* p, const float* s) { *p = s[0]; }
};

// A group of VEC floats of a caller's buffer. The buffer's base is aligned for VEC (the host
// narrows VEC until it is), but a row starts wherever its offset says: a row whose offset is
// not a multiple of VEC takes the same groups element by element (`aligned` is warp-uniform,
// one offset per key), so an odd caller layout is slower, never a misaligned access.
template <int VEC>
__device__ __forceinline__ void hps_group_load(const float* p, float* d, bool aligned) {
  if (aligned) {
    VecIO<VEC>::load(p, d);
  } else {
#pragma unroll
    for (int c = 0; c < VEC; ++c) d[c] = p[c];
  }
}

template <int VEC>
__device__ __forceinline__ void hps_group_store(float* p, const float* s, bool aligned) {
  if (aligned) {
    VecIO<VEC>::store(p, s);
  } else {
#pragma unroll
    for (int c = 0; c < VEC; ++c) p[c] = s[c];
  }
}

// ---------------------------------------------------------------- warp-cooperative rows
// A row of `dim` elements (dim a multiple of VEC) is cut into groups of VEC; lane l owns
// groups l, l+32, l+64, ... (NV of them at most), so a warp's loads of one group index are
// contiguous (coalesced). row_formats.cuh moves stored rows in that layout; every table's
// stored rows are aligned for it (cache/base.py, row_stride).

// ---------------------------------------------------------------- multi-table rows

// Width of row i, or -1 when it cannot be served: its table id is outside [0, tables) or the
// row [offset, offset + dim) does not lie inside a buffer of `size` floats. Kernels skip such
// rows, so no access ever leaves the caller's buffer (the host does not read the offsets).
__device__ __forceinline__ int hps_row_width(long long t, long long offset, int tables,
                                             const long long* dims, long long size) {
  if (t < 0 || t >= tables) return -1;
  const long long dim = dims[t];
  return (offset < 0 || offset > size - dim) ? -1 : static_cast<int>(dim);
}

// Report a row that did not fit: status[1] becomes 1 + its position (first reporter wins);
// the host turns that into a RequestError after the read-back it does anyway. `status` is
// null for calls that do not wait for their kernel (they cannot report; see gpu.py).
__device__ __forceinline__ void hps_flag_row(unsigned* status, long long i, int lane) {
  if (status != nullptr && lane == 0) atomicCAS(status + 1, 0u, static_cast<unsigned>(i + 1));
}

// Width of row i of the call, or -1 after flagging it (hps_flag_row) when it cannot be served:
// the prologue of every kernel that reads or writes a caller's flat rows.
__device__ __forceinline__ int hps_served_width(long long t, long long offset, int tables, const long long* dims,
                                                long long size, unsigned* status, long long i, int lane) {
  const int dim = hps_row_width(t, offset, tables, dims, size);
  if (dim < 0) hps_flag_row(status, i, lane);
  return dim;
}

// Warp-wide append: every lane whose `take` is set gets a distinct index into an output that
// `*count` fills, in lane order, with one atomicAdd per warp; lanes without `take` get 0.
__device__ __forceinline__ unsigned hps_warp_append(unsigned* count, bool take, int lane) {
  const unsigned mask = __ballot_sync(HPS_FULL_MASK, take);
  unsigned start = 0;
  if (lane == 0 && mask) start = atomicAdd(count, static_cast<unsigned>(__popc(mask)));
  start = __shfl_sync(HPS_FULL_MASK, start, 0);
  return take ? start + __popc(mask & ((1u << lane) - 1u)) : 0u;
}

// Table owning global index x (a set or a slot), given each table's first index `base`
// (ascending, base[0] == 0): the last t with base[t] <= x.
__device__ __forceinline__ int hps_table_of(const long long* base, int tables, long long x) {
  int lo = 0, hi = tables;  // invariant: base[lo] <= x, and x < base[hi] when hi < tables
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (base[mid] <= x) lo = mid; else hi = mid;
  }
  return lo;
}

// ---------------------------------------------------------------- grid

__device__ __forceinline__ int hps_lane() { return static_cast<int>(threadIdx.x) & (HPS_WARP - 1); }

__device__ __forceinline__ long long hps_warp_id() {
  return (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / HPS_WARP;
}

__device__ __forceinline__ long long hps_num_warps() {
  return (static_cast<long long>(gridDim.x) * blockDim.x) / HPS_WARP;
}

#endif  // HPS_COMMON_CUH
