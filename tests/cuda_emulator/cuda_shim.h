// The CUDA execution model on the CPU, for this project's kernels (test tooling only; see
// tests/cuda_emulator/__init__.py for what it proves and what it cannot).
//
// The .cu sources of hps_core/cache/kernels compile unchanged as host C++ after this header
// (g++ -x c++ -include cuda_shim.h): it supplies the CUDA keywords, the thread/block/grid
// built-ins, the warp intrinsics with their rendezvous semantics, atomics, bit and float
// intrinsics and the vector types, and defines HPS_EMULATOR so that common.cuh takes its
// memory-ordering helpers (inline PTX on a GPU) from here, as C++ atomics of the same order.
//
// Execution model. A launch runs its blocks on a few host threads at once (HPS_EMU_THREADS),
// so warps of different blocks race for real. Inside a block, every CUDA thread is a fiber
// (its own stack, switched by a few instructions of assembly) on that block's host thread.
// A fiber runs until it reaches a warp-synchronous intrinsic (__ballot_sync, __shfl_sync,
// __shfl_xor_sync, __all_sync, __any_sync, __syncwarp), __syncthreads, __nanosleep or (every
// few calls) an atomic or ordered memory access; there it waits for the other lanes of its
// mask, or lets another fiber run. An intrinsic returns only when every lane of its mask has
// reached the same intrinsic with the same mask, exactly as on sm_70+; lanes that disagree
// (another intrinsic, another mask, a lane left out of its own mask, a mask naming a lane that
// exited, a shuffle from a lane outside the mask), a block whose fibers all wait for each
// other, and a launch that runs past HPS_EMU_TIMEOUT seconds (a lock never released) are
// faults: the launch stops and the Python side raises KernelFault with the lanes' states.
// A misaligned vector access (float4, uint2, ... at an address not a multiple of its size) is
// a fault too, as the GPU's "misaligned address"; scalar accesses are checked by the
// compiler's alignment instrumentation (-fsanitize=alignment, reported through the handler
// at the end of this file).
//
// __shared__ variables are per block: a block's fibers all run on one host thread and a host
// thread runs one block at a time, so `static thread_local` storage is the block's.
//
// Sanitizers (tests/cuda_emulator/test_sanitizers.py): built with -fsanitize=address or
// -fsanitize=thread, every fiber switch is announced to the tool (ASan: the stack being
// switched to; TSan: each CUDA thread is a TSan fiber, switched without synchronisation), so
// the tools see CUDA threads, not host threads. For TSan, happens-before between CUDA threads
// comes only from what CUDA orders: the lanes of a mask at a warp intrinsic (each lane's past
// reaches every lane of the mask), atomics and common.cuh's acquire/release accesses, and a
// launch's end before the host reads its results. The emulator's own bookkeeping (fiber
// states, the ready queue, the rendezvous slots) is hidden from TSan: it is not the kernels'.
#ifndef HPS_CUDA_SHIM_H
#define HPS_CUDA_SHIM_H

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define HPS_EMULATOR 1

#if defined(__SANITIZE_ADDRESS__)
#define HPS_EMU_ASAN 1
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
}
#endif
#if defined(__SANITIZE_THREAD__)
#define HPS_EMU_TSAN 1
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
void AnnotateNewMemory(const char* file, int line, const volatile void* mem, size_t size);
}
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local
#define warpSize 32

// ---------------------------------------------------------------- vector types
// Copying one through a pointer checks that pointer's alignment (the GPU faults on a
// misaligned vector access; x86 would not): the user-declared copy constructor and
// assignment receive the address the kernel dereferenced.
namespace hps_emu {
[[noreturn]] inline void fault(const char* fmt, ...);
template <typename V>
inline void check_aligned(const V* p, const char* type) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(V) != 0) {
    fault("misaligned address: %s access at %p (needs %zu-byte alignment)", type, static_cast<const void*>(p),
          alignof(V));
  }
}

// The emulator's own bookkeeping, done on a fiber (a lane's rendezvous slot, the ready queue,
// the yield counters): TSan ignores its reads and writes, which are no access of the kernel's
// (the scheduler's host thread ignores all of its own). RAII: a fiber switched out inside
// one resumes inside it (TSan keeps the ignore state per fiber).
#ifdef HPS_EMU_TSAN
struct Internal {
  Internal() { AnnotateIgnoreReadsBegin(__FILE__, __LINE__); AnnotateIgnoreWritesBegin(__FILE__, __LINE__); }
  ~Internal() { AnnotateIgnoreReadsEnd(__FILE__, __LINE__); AnnotateIgnoreWritesEnd(__FILE__, __LINE__); }
  Internal(const Internal&) = delete;
  Internal& operator=(const Internal&) = delete;
};
inline void tsan_release(void* p) { __tsan_release(p); }
inline void tsan_acquire(void* p) { __tsan_acquire(p); }
#else
struct Internal {
  Internal() {}  // user-provided: no unused-variable warning where it is only a scope
};
inline void tsan_release(void*) {}
inline void tsan_acquire(void*) {}
#endif
}  // namespace hps_emu

#define HPS_EMU_VECTOR_TYPE(NAME, T, ALIGN, ...)                                       \
  struct alignas(ALIGN) NAME {                                                         \
    T __VA_ARGS__;                                                                     \
    NAME() = default;                                                                  \
    NAME(const NAME& o) {                                                              \
      hps_emu::check_aligned(&o, #NAME);                                               \
      memcpy(static_cast<void*>(this), static_cast<const void*>(&o), sizeof(NAME));    \
    }                                                                                  \
    NAME& operator=(const NAME& o) {                                                   \
      hps_emu::check_aligned(this, #NAME);                                             \
      memcpy(static_cast<void*>(this), static_cast<const void*>(&o), sizeof(NAME));    \
      return *this;                                                                    \
    }                                                                                  \
  };

HPS_EMU_VECTOR_TYPE(float2, float, 8, x, y)
HPS_EMU_VECTOR_TYPE(float4, float, 16, x, y, z, w)
HPS_EMU_VECTOR_TYPE(uint2, unsigned, 8, x, y)
HPS_EMU_VECTOR_TYPE(uint4, unsigned, 16, x, y, z, w)
#undef HPS_EMU_VECTOR_TYPE

inline float2 make_float2(float x, float y) { float2 v; v.x = x; v.y = y; return v; }
inline float4 make_float4(float x, float y, float z, float w) { float4 v; v.x = x; v.y = y; v.z = z; v.w = w; return v; }
inline uint2 make_uint2(unsigned x, unsigned y) { uint2 v; v.x = x; v.y = y; return v; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  uint4 v; v.x = x; v.y = y; v.z = z; v.w = w; return v;
}

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };

// ---------------------------------------------------------------- runtime state
namespace hps_emu {

enum State { RUNNABLE, WAIT_WARP, WAIT_BLOCK, DONE };
enum Op { OP_SYNCWARP, OP_BALLOT, OP_ALL, OP_ANY, OP_SHFL, OP_SHFL_XOR };
inline const char* op_name(int op) {
  static const char* names[] = {"__syncwarp", "__ballot_sync", "__all_sync", "__any_sync", "__shfl_sync",
                                "__shfl_xor_sync"};
  return names[op];
}

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  int state = RUNNABLE;
  uint3 tid{};
  int lane = 0, warp = 0;
  unsigned yields = 0;  // ordered accesses since the last switch (see maybe_yield)
  // the warp intrinsic this lane waits in
  int op = 0;
  unsigned mask = 0;
  uint64_t value = 0;
  int arg = 0;
  uint64_t result = 0;
  void* tsan = nullptr;       // this CUDA thread as a TSan fiber
  void* asan_fake = nullptr;  // ASan's fake stack while switched out
  char* stack_lo = nullptr;   // its usable stack, for ASan
  size_t stack_len = 0;
};

struct Warp {
  // TSan sync objects (their addresses): each lane releases into `arrive` as it reaches an
  // intrinsic, the last one acquires it and releases into `leave`, which the others acquire
  // as they return: the lanes' pasts meet, as a warp's at bar.warp.sync. (Two objects, so
  // a lane that returned and ran ahead to the next intrinsic does not hand what it did
  // since to the lanes still returning from this one; every intrinsic of the kernels names
  // the full warp.)
  char arrive = 0, leave = 0;
  unsigned arrived = 0;  // lanes waiting in a warp intrinsic
  unsigned exited = 0;   // lanes whose thread returned
  unsigned present = 0;  // lanes that exist (a block of 48 threads has a half warp)
};

struct Block;
inline thread_local Fiber* cur = nullptr;
inline thread_local Block* blk = nullptr;

inline void switch_to_scheduler();  // the fiber waits (its state says for what) or yields
inline void make_ready(Fiber* f);

struct Block {
  uint3 block_idx{};
  dim3 block_dim{}, grid_dim{};
  Fiber* fibers = nullptr;
  int nthreads = 0;
  Warp* warps = nullptr;
  std::string error;
  char barrier = 0;  // TSan: __syncthreads, as Warp::arrive (every thread arrives before any leaves)
};

// Rendezvous of the lanes of `mask` at intrinsic `op`: returns this lane's result once all
// of them arrived (the last one to arrive computes every lane's result).
inline uint64_t warp_sync(int op, unsigned mask, uint64_t value, int arg) {
  Internal quiet;
  Fiber* f = cur;
  Warp& w = blk->warps[f->warp];
  if (!((mask >> f->lane) & 1u)) {
    fault("lane %d of warp %d calls %s with mask 0x%08x, which leaves the calling lane out", f->lane, f->warp,
          op_name(op), mask);
  }
  if (mask & ~w.present) {
    fault("lane %d of warp %d calls %s with mask 0x%08x naming lanes that do not exist (0x%08x)", f->lane, f->warp,
          op_name(op), mask, w.present);
  }
  if (mask & w.exited) {
    fault("lane %d of warp %d calls %s with mask 0x%08x, but lanes 0x%08x of that mask have exited", f->lane,
          f->warp, op_name(op), mask, mask & w.exited);
  }
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  tsan_release(&w.arrive);
  w.arrived |= 1u << f->lane;
  if ((w.arrived & mask) != mask) {
    f->state = WAIT_WARP;
    switch_to_scheduler();
    tsan_acquire(&w.leave);
    return f->result;
  }
  tsan_acquire(&w.arrive);
  tsan_release(&w.leave);
  Fiber* lanes = blk->fibers + f->warp * 32;
  unsigned ballot = 0;
  bool all = true, any = false;
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const Fiber& o = lanes[l];
    if (o.op != op || o.mask != mask) {
      fault("warp %d: lane %d is in %s(mask 0x%08x) while lane %d is in %s(mask 0x%08x): lanes of one mask must "
            "meet at the same intrinsic",
            f->warp, f->lane, op_name(op), mask, l, op_name(o.op), o.mask);
    }
    if (o.value) { ballot |= 1u << l; any = true; } else { all = false; }
  }
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    Fiber& o = lanes[l];
    switch (op) {
      case OP_SYNCWARP: o.result = 0; break;
      case OP_BALLOT: o.result = ballot; break;
      case OP_ALL: o.result = all; break;
      case OP_ANY: o.result = any; break;
      case OP_SHFL:
      case OP_SHFL_XOR: {
        // width 32 only (the kernels' only width): the source lane, within the warp
        const int src = op == OP_SHFL ? (o.arg & 31) : (l ^ (o.arg & 31));
        if (!((mask >> src) & 1u)) {
          fault("warp %d: lane %d reads lane %d with %s(mask 0x%08x), a lane outside the mask (undefined value)",
                f->warp, l, src, op_name(op), mask);
        }
        o.result = lanes[src].value;
        break;
      }
    }
    if (&o != f) {
      o.state = RUNNABLE;
      make_ready(&o);
    }
  }
  w.arrived &= ~mask;
  return f->result;
}

// Gives other fibers of the block a turn every few ordered accesses (atomics, common.cuh's
// acquire/release/relaxed accesses), so warps of one block interleave between their intrinsics
// too, and a lane spinning on a lock held by another warp of its own block cannot starve it.
// Every HPS_EMU_PREEMPT-th such turn (default 4; 0: never) also yields the host thread, so
// other blocks and other launches run inside this warp's window between two ordered accesses,
// as they would on a GPU; without it a window is a few nanoseconds of one host thread's time.
// Loads yield before they read, stores and read-modify-writes after they wrote (what they
// publish is seen while the lane is paused); a release store, the publication of a seqlock or
// a slot, always yields.
inline unsigned preempt_every() {
  static const unsigned every = [] {
    const char* v = getenv("HPS_EMU_PREEMPT");
    return v && *v ? static_cast<unsigned>(strtoul(v, nullptr, 10)) : 4u;
  }();
  return every;
}
inline thread_local unsigned turns = 0;
inline void yield_now() {
  Internal quiet;
  cur->yields = 0;
  const unsigned every = preempt_every();
  if (every && ++turns >= every) {
    turns = 0;
    std::this_thread::yield();
  }
  switch_to_scheduler();
}
// HPS_EMU_STALL_EVERY=n, HPS_EMU_STALL_US=u: every n-th acquire load of a host thread stops
// that host thread for u microseconds right after it read, the lane holding what it read (a
// reader with its seqlock version, a prober with a slot's row number) while the other host
// threads' launches run: the window between a version check and what it guards, widened to
// a whole write (test_gpu_cache.py's seqlock test; the lanes of one warp otherwise run one
// after another, so a copy torn by a write never lines up across them). Read per launch.
inline thread_local unsigned stall_every = 0, stall_us = 0, stall_count = 0;
inline void stall_after_acquire() {
  if (stall_every == 0) return;
  Internal quiet;
  if (++stall_count < stall_every) return;
  stall_count = 0;
  const timespec ts{0, static_cast<long>(stall_us) * 1000};
  nanosleep(&ts, nullptr);
}
inline void maybe_yield() {
  Internal quiet;
  if (++cur->yields >= 8) yield_now();
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp intrinsics move at most 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace hps_emu

#define threadIdx (::hps_emu::cur->tid)
#define blockIdx (::hps_emu::blk->block_idx)
#define blockDim (::hps_emu::blk->block_dim)
#define gridDim (::hps_emu::blk->grid_dim)

// ---------------------------------------------------------------- warp intrinsics
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(hps_emu::warp_sync(hps_emu::OP_BALLOT, mask, pred != 0, 0));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(hps_emu::warp_sync(hps_emu::OP_ALL, mask, pred != 0, 0));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(hps_emu::warp_sync(hps_emu::OP_ANY, mask, pred != 0, 0));
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { hps_emu::warp_sync(hps_emu::OP_SYNCWARP, mask, 0, 0); }
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  if (width != 32) hps_emu::fault("__shfl_sync: only width 32 is emulated, got %d", width);
  return hps_emu::from_bits<T>(hps_emu::warp_sync(hps_emu::OP_SHFL, mask, hps_emu::to_bits(var), src_lane));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  if (width != 32) hps_emu::fault("__shfl_xor_sync: only width 32 is emulated, got %d", width);
  return hps_emu::from_bits<T>(hps_emu::warp_sync(hps_emu::OP_SHFL_XOR, mask, hps_emu::to_bits(var), lane_mask));
}
// The lanes of the warp that have not exited: the emulator never splits a converged warp.
inline unsigned __activemask() {
  hps_emu::Internal quiet;
  const hps_emu::Warp& w = hps_emu::blk->warps[hps_emu::cur->warp];
  return w.present & ~w.exited;
}
void __syncthreads();
inline void __nanosleep(unsigned) { hps_emu::switch_to_scheduler(); }

// ---------------------------------------------------------------- atomics (device scope, relaxed: CUDA's atomicX)
// Under TSan they are acquire-release instead: TSan does not model fences, and the kernels
// pair relaxed atomics with common.cuh's fences (the set locks: atomicCAS then fence; fence
// then atomicExch), which is how CUDA code orders them. Stronger atomics give TSan those
// orders without a fence model; a missing fence is what only a real GPU shows (gpu_check.md).
#ifdef HPS_EMU_TSAN
#define HPS_EMU_RMW __ATOMIC_ACQ_REL
#define HPS_EMU_RMW_FAIL __ATOMIC_ACQUIRE
#else
#define HPS_EMU_RMW __ATOMIC_RELAXED
#define HPS_EMU_RMW_FAIL __ATOMIC_RELAXED
#endif
#define HPS_EMU_ATOMIC(T)                                                                                  \
  inline T atomicAdd(T* p, T v) { const T r = __atomic_fetch_add(p, v, HPS_EMU_RMW); hps_emu::maybe_yield(); return r; } \
  inline T atomicSub(T* p, T v) { const T r = __atomic_fetch_sub(p, v, HPS_EMU_RMW); hps_emu::maybe_yield(); return r; } \
  inline T atomicExch(T* p, T v) { const T r = __atomic_exchange_n(p, v, HPS_EMU_RMW); hps_emu::maybe_yield(); return r; } \
  inline T atomicCAS(T* p, T expected, T desired) {                                                        \
    __atomic_compare_exchange_n(p, &expected, desired, false, HPS_EMU_RMW, HPS_EMU_RMW_FAIL);         \
    hps_emu::maybe_yield();                                                                                \
    return expected;                                                                                       \
  }                                                                                                        \
  inline T atomicMax(T* p, T v) {                                                                          \
    hps_emu::maybe_yield();                                                                                \
    T old = __atomic_load_n(p, HPS_EMU_RMW_FAIL);                                                          \
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, HPS_EMU_RMW, HPS_EMU_RMW_FAIL)) { \
    }                                                                                                      \
    return old;                                                                                            \
  }                                                                                                        \
  inline T atomicMin(T* p, T v) {                                                                          \
    hps_emu::maybe_yield();                                                                                \
    T old = __atomic_load_n(p, HPS_EMU_RMW_FAIL);                                                          \
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, HPS_EMU_RMW, HPS_EMU_RMW_FAIL)) { \
    }                                                                                                      \
    return old;                                                                                            \
  }
HPS_EMU_ATOMIC(int)
HPS_EMU_ATOMIC(unsigned)
HPS_EMU_ATOMIC(unsigned long long)
#undef HPS_EMU_ATOMIC

// ---------------------------------------------------------------- common.cuh's ordered accesses
// The PTX of common.cuh (ld.acquire.gpu, ld.relaxed.gpu, st.relaxed.gpu, st.release.gpu,
// fence.acq_rel.gpu) as C++ atomics of the same order; common.cuh leaves them out under
// HPS_EMULATOR. x86 is stronger than the GPU (TSO), so these prove the algorithm under the
// orders it asks for, not that the GPU's weaker hardware honours them.
inline unsigned hps_ld_acquire(const unsigned* p) {
  hps_emu::maybe_yield();
  const unsigned v = __atomic_load_n(p, __ATOMIC_ACQUIRE);
  hps_emu::stall_after_acquire();
  return v;
}
inline unsigned hps_ld_relaxed(const unsigned* p) { hps_emu::maybe_yield(); return __atomic_load_n(p, __ATOMIC_RELAXED); }
inline int hps_ld_acquire(const int* p) {
  hps_emu::maybe_yield();
  const int v = __atomic_load_n(p, __ATOMIC_ACQUIRE);
  hps_emu::stall_after_acquire();
  return v;
}
inline void hps_st_relaxed(unsigned* p, unsigned v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); hps_emu::maybe_yield(); }
inline void hps_st_release(unsigned* p, unsigned v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); hps_emu::yield_now(); }
inline void hps_st_release(int* p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); hps_emu::yield_now(); }
inline void hps_fence() { __atomic_thread_fence(__ATOMIC_ACQ_REL); }

// Accesses that race by design (common.cuh, "accesses that race by design"): plain or
// volatile on the GPU, relaxed C++ atomics here, which is what a seqlock's payload and
// advisory metadata are in the C++ memory model, so TSan knows these races are meant and
// still reports every other one. A vector type moves as relaxed 32-bit words (no 16-byte
// atomic on the host), after the alignment check its plain copy does.
template <typename T>
inline T hps_racy_ld(const T* p) {
  T v;
  if constexpr (std::is_class_v<T>) {
    hps_emu::check_aligned(p, "vector");
    unsigned w[sizeof(T) / 4];
    const unsigned* words = reinterpret_cast<const unsigned*>(p);
    for (size_t i = 0; i < sizeof(T) / 4; ++i) w[i] = __atomic_load_n(words + i, __ATOMIC_RELAXED);
    memcpy(static_cast<void*>(&v), w, sizeof(T));
  } else {
    hps_emu::check_aligned(p, "scalar");
    __atomic_load(p, &v, __ATOMIC_RELAXED);
  }
  return v;
}
template <typename T>
inline void hps_racy_st(T* p, const T& v) {
  if constexpr (std::is_class_v<T>) {
    hps_emu::check_aligned(p, "vector");
    unsigned w[sizeof(T) / 4];
    memcpy(w, static_cast<const void*>(&v), sizeof(T));
    unsigned* words = reinterpret_cast<unsigned*>(p);
    for (size_t i = 0; i < sizeof(T) / 4; ++i) __atomic_store_n(words + i, w[i], __ATOMIC_RELAXED);
  } else {
    hps_emu::check_aligned(p, "scalar");
    T c = v;
    __atomic_store(p, &c, __ATOMIC_RELAXED);
  }
}
template <typename T>
inline T hps_volatile_ld(const T* p) {
  return hps_racy_ld(p);
}

// ---------------------------------------------------------------- bits and floats
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __float_as_uint(float x) { unsigned u; memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; memcpy(&x, &u, 4); return x; }
inline int __float_as_int(float x) { int u; memcpy(&u, &x, 4); return u; }
inline float __int_as_float(int u) { float x; memcpy(&x, &u, 4); return x; }
// Each rounded alone, round to nearest even: the library builds with -ffp-contract=off, so
// no product is fused into an FMA (as __fmul_rn/__fadd_rn promise on the GPU).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

#endif  // HPS_CUDA_SHIM_H
