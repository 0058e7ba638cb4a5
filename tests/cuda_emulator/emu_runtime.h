// The emulator's scheduler and launch entry points (see cuda_shim.h for the model). The
// generated translation unit of each module is: cuda_shim.h, the kernel source exactly as
// CuPy would get it, this file, then one HPS_EMU_KERNEL(...) line per name expression and
// HPS_EMU_TABLE_END. Only the hps_emu_* functions at the end are exported.
#ifndef HPS_EMU_RUNTIME_H
#define HPS_EMU_RUNTIME_H

namespace hps_emu {

// ---------------------------------------------------------------- fibers
// switch_stack(save, to): saves the callee-saved registers and the stack pointer of the
// running context in *save, then resumes the context whose stack pointer is `to`. A new
// fiber's stack is laid out so that its first resumption "returns" into fiber_entry with the
// fiber in r12.
extern "C" void hps_emu_switch_stack(void** save, void* to);
extern "C" void hps_emu_fiber_entry();
extern "C" void hps_emu_fiber_main(Fiber* f);
asm(R"(
  .text
  .hidden hps_emu_switch_stack
  .globl hps_emu_switch_stack
  .type hps_emu_switch_stack,@function
hps_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size hps_emu_switch_stack, .-hps_emu_switch_stack

  .hidden hps_emu_fiber_entry
  .globl hps_emu_fiber_entry
  .type hps_emu_fiber_entry,@function
hps_emu_fiber_entry:
  movq %r12, %rdi
  andq $-16, %rsp
  callq hps_emu_fiber_main
  ud2
  .size hps_emu_fiber_entry, .-hps_emu_fiber_entry
)");

using Invoker = void (*)(void** args);

struct Launch {
  Invoker invoke = nullptr;
  void** args = nullptr;
  dim3 grid{}, block{};
  std::atomic<long long> next_block{0};
  std::atomic<bool> aborted{false};
  double deadline = 0;
  std::mutex error_lock;
  std::string error;
  unsigned stall_every = 0, stall_us = 0;  // HPS_EMU_STALL_* (cuda_shim.h, stall_after_acquire)
  char done = 0;  // TSan: each CUDA thread releases here as it exits, the host acquires at the end
};

inline double now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

inline size_t env_size(const char* name, size_t fallback) {
  const char* v = getenv(name);
  return v && *v ? static_cast<size_t>(strtoull(v, nullptr, 10)) : fallback;
}

// Per host thread: the stacks of one block's fibers and the scheduler's queue of fibers ready
// to run. A FIFO, unless HPS_EMU_SEED picks among the ready fibers at random (another
// interleaving of the same launch, reproducible by its seed).
struct Worker {
  Launch* launch = nullptr;
  void* scheduler_sp = nullptr;
  Block block;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  char* stacks = nullptr;
  size_t stack_size = 0, stack_count = 0;
  std::vector<Fiber*> ready;
  size_t ready_head = 0;
  uint64_t rng = 0;
  unsigned long long switches = 0;
  // Sanitizers: the scheduler's own context (TSan fiber; ASan stack bounds and fake stack),
  // and one TSan fiber per CUDA thread index, kept for the blocks this worker runs (so the
  // stack of thread i is always touched by the same TSan fiber).
  void* tsan_sched = nullptr;
  std::vector<void*> tsan_fibers;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  void* sched_fake = nullptr;

  ~Worker() { release_stacks(); }

  // Stacks are mapped once per process and reused by later launches (a fresh mapping and 256
  // guard pages per block and launch cost more system time than the kernels themselves).
  static std::mutex& arenas_lock() {
    static std::mutex m;
    return m;
  }
  static std::vector<std::pair<char*, size_t>>& free_arenas() {
    static std::vector<std::pair<char*, size_t>> arenas;
    return arenas;
  }

  void release_stacks() {
    if (stacks == nullptr) return;
    std::lock_guard<std::mutex> g(arenas_lock());
    free_arenas().emplace_back(stacks, stack_count);
    stacks = nullptr;
    stack_count = 0;
  }

  void reserve_stacks(size_t count) {
    if (count <= stack_count) return;
    release_stacks();
    stack_size = env_size("HPS_EMU_STACK_KIB", 64) * 1024;
    {
      std::lock_guard<std::mutex> g(arenas_lock());
      auto& arenas = free_arenas();
      for (size_t i = 0; i < arenas.size(); ++i) {
        if (arenas[i].second >= count) {
          stacks = arenas[i].first;
          stack_count = arenas[i].second;
          arenas.erase(arenas.begin() + static_cast<long>(i));
          forget_stacks();
          return;
        }
      }
    }
    void* p = mmap(nullptr, count * stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) return;
    stacks = static_cast<char*>(p);
    stack_count = count;
    for (size_t i = 0; i < count; ++i) mprotect(stacks + i * stack_size, 4096, PROT_NONE);  // overflow guard
  }

  // TSan: stacks another launch's fibers used are new memory to this one's. Their accesses
  // are not ordered before ours (that order would hide races between the two launches), so
  // what TSan remembers of them goes.
  void forget_stacks() {
#ifdef HPS_EMU_TSAN
    for (size_t i = 0; i < stack_count; ++i) {
      AnnotateNewMemory(__FILE__, __LINE__, stacks + i * stack_size + 4096, stack_size - 4096);
    }
#endif
  }

  Fiber* pop_ready() {
    const size_t n = ready.size() - ready_head;
    if (n == 0) return nullptr;
    if (rng) {
      rng ^= rng << 13;
      rng ^= rng >> 7;
      rng ^= rng << 17;
      std::swap(ready[ready_head], ready[ready_head + rng % n]);
    }
    Fiber* f = ready[ready_head++];
    if (ready_head > 4096 && ready_head * 2 > ready.size()) {
      ready.erase(ready.begin(), ready.begin() + static_cast<long>(ready_head));
      ready_head = 0;
    }
    return f;
  }

  std::string describe() const;
  bool run_block(long long b);
};

inline thread_local Worker* worker = nullptr;

inline void make_ready(Fiber* f) { worker->ready.push_back(f); }

// The sanitizers' side of a switch from fiber f to the scheduler (for good when `exiting`)
// and back.
inline void leave_fiber(Fiber* f, bool exiting) {
#ifdef HPS_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->asan_fake, worker->sched_bottom, worker->sched_size);
#endif
#ifdef HPS_EMU_TSAN
  // read before the release: an exiting fiber touches nothing after it (the host thread
  // that acquires it may free its thread-local storage next)
  void* sched = worker->tsan_sched;
  if (exiting) tsan_release(&worker->launch->done);
  __tsan_switch_to_fiber(sched, 1 /* __tsan_switch_to_fiber_no_sync */);
#endif
  (void)f;
  (void)exiting;
}
inline void resumed_fiber(Fiber* f) {
#ifdef HPS_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake, nullptr, nullptr);
#endif
  (void)f;
}

inline void switch_to_scheduler() {
  Internal quiet;
  Fiber* f = cur;
  if (f->state == RUNNABLE) make_ready(f);  // a yield: runnable again at once
  f->yields = 0;
  leave_fiber(f, false);
  hps_emu_switch_stack(&f->sp, worker->scheduler_sp);
  resumed_fiber(f);
}

extern "C" void hps_emu_fiber_main(Fiber* f) {
#ifdef HPS_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &worker->sched_bottom, &worker->sched_size);
#endif
  const Launch* l = worker->launch;
  l->invoke(l->args);
  {
    Internal quiet;  // ends before the fiber leaves: its TSan fiber runs the next block's thread
    Warp& w = blk->warps[f->warp];
    w.exited |= 1u << f->lane;
    if (w.arrived & ~w.exited) {
      for (int i = 0; i < 32; ++i) {
        const Fiber& o = blk->fibers[f->warp * 32 + i];
        if (((w.arrived >> i) & 1u) && ((o.mask >> f->lane) & 1u)) {
          fault("lane %d of warp %d returned while lane %d waits for it in %s(mask 0x%08x)", f->lane, f->warp, i,
                op_name(o.op), o.mask);
        }
      }
    }
    f->state = DONE;
  }
  leave_fiber(f, true);
  hps_emu_switch_stack(&f->sp, worker->scheduler_sp);
  __builtin_unreachable();
}

[[noreturn]] inline void vfault(const char* fmt, va_list ap) {
  Internal quiet;
  char buf[1024];
  vsnprintf(buf, sizeof buf, fmt, ap);
  Worker* w = worker;
  if (w == nullptr || cur == nullptr) {  // not inside a launch: nothing to unwind to
    fprintf(stderr, "hps cuda emulator: %s\n", buf);
    abort();
  }
  Block& b = w->block;
  char where[128];
  snprintf(where, sizeof where, "block (%u,%u,%u) thread (%u,%u,%u): ", b.block_idx.x, b.block_idx.y, b.block_idx.z,
           cur->tid.x, cur->tid.y, cur->tid.z);
  b.error = std::string(where) + buf;
  cur->state = DONE;
  // Never resumed: the scheduler abandons the block's fibers (kernel code holds no resources).
  leave_fiber(cur, true);
  hps_emu_switch_stack(&cur->sp, w->scheduler_sp);
  __builtin_unreachable();
}

[[noreturn]] inline void fault(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfault(fmt, ap);
}

inline std::string Worker::describe() const {
  std::string s;
  char line[256];
  for (size_t wi = 0; wi < warps.size(); ++wi) {
    const Warp& w = warps[wi];
    snprintf(line, sizeof line, "\n  warp %zu: exited 0x%08x, waiting in an intrinsic 0x%08x", wi, w.exited, w.arrived);
    s += line;
    for (int l = 0; l < 32; ++l) {
      const Fiber& f = fibers[wi * 32 + l];
      if ((w.arrived >> l) & 1u) {
        snprintf(line, sizeof line, "\n    lane %d in %s(mask 0x%08x)", l, op_name(f.op), f.mask);
        s += line;
      } else if (f.state == WAIT_BLOCK) {
        snprintf(line, sizeof line, "\n    lane %d in __syncthreads", l);
        s += line;
      }
    }
  }
  return s;
}

// Runs block b to completion on this host thread; false (with block.error set) on a fault.
inline bool Worker::run_block(long long b) {
  const Launch& l = *launch;
  const dim3 g = l.grid, bd = l.block;
  block.grid_dim = g;
  block.block_dim = bd;
  block.block_idx = uint3{static_cast<unsigned>(b % g.x), static_cast<unsigned>((b / g.x) % g.y),
                          static_cast<unsigned>(b / (static_cast<long long>(g.x) * g.y))};
  block.error.clear();
  const int n = static_cast<int>(bd.x * bd.y * bd.z);
  const int nwarps = (n + 31) / 32;
  fibers.assign(n, Fiber());
  warps.assign(nwarps, Warp());
  reserve_stacks(n);
  if (stacks == nullptr) {
    block.error = "cannot map the fibers' stacks";
    return false;
  }
  block.fibers = fibers.data();
  block.warps = warps.data();
  block.nthreads = n;
  ready.clear();
  ready_head = 0;
#ifdef HPS_EMU_TSAN
  while (tsan_fibers.size() < static_cast<size_t>(n)) tsan_fibers.push_back(__tsan_create_fiber(0));
#endif
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    f.stack_lo = stacks + i * stack_size + 4096;
    f.stack_len = stack_size - 4096;
#ifdef HPS_EMU_ASAN
    // redzones of frames a previous fiber left on this stack (it never returns from them)
    __asan_unpoison_memory_region(f.stack_lo, f.stack_len);
#endif
#ifdef HPS_EMU_TSAN
    f.tsan = tsan_fibers[i];
#endif
    f.tid = uint3{static_cast<unsigned>(i % bd.x), static_cast<unsigned>((i / bd.x) % bd.y),
                  static_cast<unsigned>(i / (bd.x * bd.y))};
    f.warp = i / 32;
    f.lane = i % 32;
    warps[f.warp].present |= 1u << f.lane;
    // the first resumption pops six registers (r12 = the fiber) and returns into fiber_entry
    void** top = reinterpret_cast<void**>(stacks + (i + 1) * stack_size);
    *--top = nullptr;
    *--top = reinterpret_cast<void*>(&hps_emu_fiber_entry);
    *--top = nullptr;  // rbp
    *--top = nullptr;  // rbx
    *--top = &f;       // r12
    *--top = nullptr;  // r13
    *--top = nullptr;  // r14
    *--top = nullptr;  // r15
    f.sp = top;
    ready.push_back(&f);
  }
  blk = &block;
  int live = n;
  while (live > 0) {
    Fiber* f = pop_ready();
    if (f == nullptr) {
      // every live fiber waits: a __syncthreads all of them reached, or a deadlock
      int at_barrier = 0;
      for (Fiber& o : fibers) at_barrier += o.state == WAIT_BLOCK;
      if (at_barrier == live) {
        for (Fiber& o : fibers) {
          if (o.state == WAIT_BLOCK) {
            o.state = RUNNABLE;
            ready.push_back(&o);
          }
        }
        continue;
      }
      block.error = "deadlock: every thread of the block waits for another" + describe();
      break;
    }
    if ((++switches & 1023u) == 0 && (l.aborted.load(std::memory_order_relaxed) || now() > l.deadline)) {
      if (!l.aborted.load()) {
        block.error = "the launch ran past HPS_EMU_TIMEOUT (a lock never released, or a livelock?)" + describe();
      }
      break;
    }
    cur = f;
#ifdef HPS_EMU_ASAN
    __sanitizer_start_switch_fiber(&sched_fake, f->stack_lo, f->stack_len);
#endif
#ifdef HPS_EMU_TSAN
    __tsan_switch_to_fiber(f->tsan, 1 /* __tsan_switch_to_fiber_no_sync */);
#endif
    hps_emu_switch_stack(&scheduler_sp, f->sp);
#ifdef HPS_EMU_ASAN
    __sanitizer_finish_switch_fiber(sched_fake, nullptr, nullptr);
#endif
    cur = nullptr;
    if (!block.error.empty()) break;
    if (f->state == DONE) --live;
  }
  blk = nullptr;
  return block.error.empty();
}

inline void run_blocks(Launch* l) {
  Internal quiet;  // the scheduler runs no kernel code: all of its accesses are bookkeeping
  Worker w;
  w.launch = l;
  w.rng = env_size("HPS_EMU_SEED", 0);
#ifdef HPS_EMU_TSAN
  w.tsan_sched = __tsan_get_current_fiber();
#endif
  stall_every = l->stall_every;
  stall_us = l->stall_us;
  stall_count = 0;
  worker = &w;
  const long long total = static_cast<long long>(l->grid.x) * l->grid.y * l->grid.z;
  for (;;) {
    if (l->aborted.load()) break;
    const long long b = l->next_block.fetch_add(1);
    if (b >= total) break;
    if (w.rng) w.rng += static_cast<uint64_t>(b) * 0x9E3779B97F4A7C15ull;
    if (!w.run_block(b)) {
      std::lock_guard<std::mutex> g(l->error_lock);
      if (l->error.empty() && !w.block.error.empty()) l->error = w.block.error;
      l->aborted = true;
      break;
    }
  }
  // Stacks go back first, so the next launch to take them is not ordered after these fibers.
  w.release_stacks();
  tsan_acquire(&l->done);  // what the CUDA threads did happens before the launch returns
#ifdef HPS_EMU_TSAN
  for (void* f : w.tsan_fibers) __tsan_destroy_fiber(f);
#endif
  worker = nullptr;
}

inline int launch(Invoker invoke, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                  void** args, char* error, int error_size) {
  // On the heap: TSan keeps `done`'s clock until the memory is freed, and a later launch's
  // Launch at the same stack address would inherit it.
  std::unique_ptr<Launch> owned(new Launch);
  Launch& l = *owned;
  l.invoke = invoke;
  l.args = args;
  l.grid = dim3{gx, gy, gz};
  l.block = dim3{bx, by, bz};
  l.deadline = now() + static_cast<double>(env_size("HPS_EMU_TIMEOUT", 120));
  l.stall_every = static_cast<unsigned>(env_size("HPS_EMU_STALL_EVERY", 0));
  l.stall_us = static_cast<unsigned>(env_size("HPS_EMU_STALL_US", 100));
  const long long blocks = static_cast<long long>(gx) * gy * gz;
  const long long threads = static_cast<long long>(bx) * by * bz;
  if (blocks <= 0 || threads <= 0 || threads > 1024) {
    snprintf(error, error_size, "invalid configuration: grid (%u,%u,%u), block (%u,%u,%u)", gx, gy, gz, bx, by, bz);
    return 1;
  }
  const long long hosts = std::min<long long>(blocks, static_cast<long long>(env_size("HPS_EMU_THREADS", 3)));
  std::vector<std::thread> pool;
  for (long long i = 1; i < hosts; ++i) pool.emplace_back(run_blocks, &l);
  run_blocks(&l);
  for (std::thread& t : pool) t.join();
  if (l.error.empty()) return 0;
  snprintf(error, error_size, "%s", l.error.c_str());
  return 1;
}

// ---------------------------------------------------------------- kernel signatures
// A parameter as the Python side checks its argument: "P<pointee>" for a pointer, else
// "<kind><bytes>" with kind i (signed), u (unsigned), f (float), b (bool).
template <typename T>
std::string type_code() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_pointer_v<U>) {
    using E = std::remove_cv_t<std::remove_pointer_t<U>>;
    if constexpr (std::is_void_v<E>) return "Pv";
    else return "P" + type_code<E>();
  } else if constexpr (std::is_same_v<U, bool>) {
    return "b1";
  } else if constexpr (std::is_floating_point_v<U>) {
    return "f" + std::to_string(sizeof(U));
  } else if constexpr (std::is_integral_v<U>) {
    return (std::is_signed_v<U> ? "i" : "u") + std::to_string(sizeof(U));
  } else {
    return "s" + std::to_string(sizeof(U));  // a struct by value: size only
  }
}

template <typename F>
struct Signature;
template <typename... A>
struct Signature<void (*)(A...)> {
  static std::string text() {
    std::string s;
    ((s += type_code<A>() + ","), ...);
    if (!s.empty()) s.pop_back();
    return s;
  }
  template <size_t... I>
  static void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<A>*>(args[I])...);
  }
};

struct Entry {
  const char* name;
  std::string signature;
  Invoker invoke;
};

template <typename... A>
constexpr size_t arity(void (*)(A...)) {
  return sizeof...(A);
}

template <auto F>
void invoke_kernel(void** args) {
  Signature<decltype(F)>::call(F, args, std::make_index_sequence<arity(F)>{});
}

template <auto F>
Entry entry(const char* name) {
  return Entry{name, Signature<decltype(F)>::text(), &invoke_kernel<F>};
}

}  // namespace hps_emu

void __syncthreads() {
  hps_emu::Internal quiet;
  hps_emu::tsan_release(&hps_emu::blk->barrier);
  hps_emu::cur->state = hps_emu::WAIT_BLOCK;
  hps_emu::switch_to_scheduler();
  hps_emu::tsan_acquire(&hps_emu::blk->barrier);
}

// -fsanitize=alignment reports here (no sanitizer runtime is linked): a misaligned scalar
// access of a kernel is a fault of its launch, as on the GPU.
namespace hps_emu {
struct UbsanLocation {
  const char* file;
  unsigned line, column;
};
struct UbsanTypeMismatch {
  UbsanLocation loc;
  const void* type;
  unsigned char log_alignment;
  unsigned char kind;
};
}  // namespace hps_emu
extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_type_mismatch_v1(void* data, void* ptr) {
  const auto* d = static_cast<const hps_emu::UbsanTypeMismatch*>(data);
  hps_emu::fault("misaligned address %p (needs %u-byte alignment) at %s:%u", ptr, 1u << d->log_alignment,
                 d->loc.file, d->loc.line);
}

#define HPS_EMU_KERNEL(...) hps_emu::entry<&__VA_ARGS__>(#__VA_ARGS__),
#define HPS_EMU_TABLE_BEGIN static const hps_emu::Entry hps_emu_table[] = {
#define HPS_EMU_TABLE_END                                                                                    \
  }                                                                                                          \
  ;                                                                                                          \
  extern "C" __attribute__((visibility("default"))) int hps_emu_kernel_count() {                            \
    return static_cast<int>(sizeof hps_emu_table / sizeof hps_emu_table[0]);                                 \
  }                                                                                                          \
  extern "C" __attribute__((visibility("default"))) const char* hps_emu_kernel_name(int i) {                \
    return hps_emu_table[i].name;                                                                            \
  }                                                                                                          \
  extern "C" __attribute__((visibility("default"))) const char* hps_emu_kernel_signature(int i) {           \
    return hps_emu_table[i].signature.c_str();                                                               \
  }                                                                                                          \
  extern "C" __attribute__((visibility("default"))) int hps_emu_launch(                                     \
      int i, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, void** args,      \
      char* error, int error_size) {                                                                         \
    return hps_emu::launch(hps_emu_table[i].invoke, gx, gy, gz, bx, by, bz, args, error, error_size);        \
  }

#endif  // HPS_EMU_RUNTIME_H
