// Dynamic (set-associative) embedding caches of several tables in one structure: query,
// replace/update, dump, clear, sizes, and the set of a key.
//
// Layout (the CPU twin's, hps_core/cache/cpu.py; global sets, slot = set * 32 + way):
//   per table t (device arrays of length T, built once when the cache is made):
//     dims[t], num_sets[t], set_base[t] (first global set), codes[t] (its row format,
//     row_formats.cuh), strides[t] (bytes per stored row), value_base[t] (its first byte)
//   the set of key k of table t is set_base[t] + mix64(k) % num_sets[t]
//   slot_keys  K[total_sets * 32]
//   slot_ver   unsigned[total_sets * 32]   seqlock word: bit 0 BUSY (a writer owns the slot),
//                                          bit 1 OCC (holds a key), bits 2.. sequence number
//   slot_ts    u64[total_sets * 32]        last access (host clock, one tick per call): LRU
//   slot_freq  unsigned[total_sets * 32]   accesses since insertion, saturating: LFU
//   set_locks  int[total_sets]             0 free, 1 held; writers only
//   values     u8[...]                     packed rows (row_formats.cuh); the row of slot s of
//                                          table t at byte value_base[t] + (s - set_base[t] * 32) * strides[t]
// Callers' rows are flat (hps_core/rows.py): key i of table table_ids[i] has its row at
// buffer[offsets[i] .. + dims[t]]; a row that does not fit the buffer is skipped and flagged
// (common.cuh, hps_row_width), never read or written.
//
// LRU stamps are 64-bit, so they never wrap: a 32-bit clock ticked once per call would wrap
// after 2^32 calls (days at a high request rate) and make the newest rows look oldest. LFU
// counts are 32-bit and saturate at HPS_FREQ_MAX instead of wrapping (a key that hot stays
// among the hottest; ties go to the stamps): 4 bytes a slot instead of 8 (docs/cache.md,
// memory per row). A victim is the slot with the smallest (count, stamp) under LFU, the
// smallest stamp under LRU, the lower way on ties; an empty way first. Same choice as the CPU
// twin.
//
// One warp per key. Lane l looks at way l, so one __ballot_sync probes a whole set.
//
// Concurrency scheme. Writers (replace, update, dump, clear) take the set lock with
// atomicCAS, so at most one warp changes a set at a time. Readers never lock: they read a
// slot as a seqlock. A writer marks the slot BUSY, fences, writes key and packed row,
// fences, and publishes (sequence + 1) | OCC with a release store. A reader loads the
// version with acquire, copies key and packed row (header included) into registers,
// fences, reloads the version, and accepts the copy only if both versions are equal, not
// BUSY, OCC, the key is the one it asked for, and every lane saw the same version; only an
// accepted copy is decoded. Any write that overlapped the copy changed the version (BUSY is
// set before the first byte changes, and the new sequence published after the last), so an
// accepted copy is one complete row stored under that key: never torn, never another
// key's. Rejected copies retry HPS_MAX_READ_TRIES times, then count as a miss. Out rows are
// written only from an accepted register copy, so a miss leaves its row untouched. The
// 30-bit sequence would have to wrap exactly (2^30 writes to one slot during one copy) to
// fool a reader. Keys of different tables never share a set, so a key equal in two tables
// cannot be confused either.
//
// Row formats (row_formats.cuh): a writer encodes before it takes the set lock. It reads
// the caller's float32 row into registers, reduces the header across the warp (int8's min
// and max, fp8's max |x|), and skips a row its format cannot store without touching the set
// (status[2] names it when the call waits). A cache with a compact table runs the check pass
// (hps_check_rows, row_formats.cuh) first, so a batch holding such a row is refused whole
// before dc_write runs. The format is per table, so every branch on it is warp-uniform. A
// query decodes into the caller's float32 `out`.
//
// LRU/LFU metadata written by readers (slot_ts store, slot_freq atomicAdd) is advisory: a
// race with a writer can only misjudge a victim, never a value. The keys and packed rows
// readers copy, the writers' stores to them, and that metadata are common.cuh's hps_racy_*
// accesses (races by design, spelled so the emulator's ThreadSanitizer build can tell them
// from the others).
#include "common.cuh"
#include "row_formats.cuh"

#define HPS_BUSY 1u
#define HPS_OCC 2u
#define HPS_SEQ_STEP 4u
// LFU counts stop here (cpu.py's FREQ_MAX): below 2^32 by more than the warps that can add
// at once after reading a count under it, so concurrent increments never wrap.
#define HPS_FREQ_MAX 0xFFFF0000u

// One more access to a slot (LFU), saturating at HPS_FREQ_MAX.
__device__ __forceinline__ void hps_count_access(unsigned* freq) {
  if (hps_volatile_ld(freq) < HPS_FREQ_MAX) atomicAdd(freq, 1u);
}

__device__ __forceinline__ void hps_set_lock(int* lock, int lane) {
  if (lane == 0) {
    while (atomicCAS(lock, 0, 1) != 0) {
      __nanosleep(32);
    }
  }
  __syncwarp();
  hps_fence();  // every lane: reads of the set come after the acquisition
}

__device__ __forceinline__ void hps_set_unlock(int* lock, int lane) {
  hps_fence();  // every lane: this holder's writes are visible before the release
  __syncwarp();
  if (lane == 0) atomicExch(lock, 0);
}

// Lane holding the smallest (hi, lo) in the warp; ties go to the lower lane, so every lane
// ends with the same answer.
__device__ __forceinline__ int hps_warp_argmin(unsigned long long hi, unsigned long long lo, int lane) {
  int best = lane;
#pragma unroll
  for (int off = HPS_WARP / 2; off > 0; off /= 2) {
    const unsigned long long h2 = __shfl_xor_sync(HPS_FULL_MASK, hi, off);
    const unsigned long long l2 = __shfl_xor_sync(HPS_FULL_MASK, lo, off);
    const int b2 = __shfl_xor_sync(HPS_FULL_MASK, best, off);
    if (h2 < hi || (h2 == hi && (l2 < lo || (l2 == lo && b2 < best)))) {
      hi = h2;
      lo = l2;
      best = b2;
    }
  }
  return best;
}

__device__ __forceinline__ long long hps_set_of(unsigned long long key_bits, long long t, const long long* set_base,
                                                const unsigned long long* num_sets) {
  return set_base[t] + static_cast<long long>(hps_mix64(key_bits) % num_sets[t]);
}

// status[0] counts misses (their positions go to miss_pos), status[1] flags a row that does
// not fit `out`.
template <typename K, int VEC, int NV>
__global__ void dc_query(const long long* __restrict__ table_ids, const K* __restrict__ keys, long long n,
                         float* __restrict__ out, const long long* __restrict__ offsets, long long out_size,
                         long long* __restrict__ miss_pos, unsigned* status, const long long* dims,
                         const long long* codes, const long long* strides, const long long* set_base,
                         const unsigned long long* num_sets, const long long* value_base, int tables,
                         const K* slot_keys, const unsigned* slot_ver, unsigned long long* slot_ts,
                         unsigned* slot_freq, const unsigned char* values, unsigned long long clock) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long i = hps_warp_id(); i < n; i += nwarps) {
    const long long t = table_ids[i];
    const long long o = offsets[i];
    const int dim = hps_served_width(t, o, tables, dims, out_size, status, i, lane);
    if (dim < 0) continue;
    const K key = keys[i];
    const long long base = hps_set_of(hps_key_bits(key), t, set_base, num_sets) * HPS_WARP;
    const long long first_slot = set_base[t] * HPS_WARP;  // table t's rows start at its first slot
    const int code = static_cast<int>(codes[t]);
    unsigned packed[NV * VEC];
    HpsHeader h{0.0f, 0.0f, true};
    long long slot = -1;
    for (int attempt = 0; attempt < HPS_MAX_READ_TRIES; ++attempt) {
      const unsigned v_l = hps_ld_acquire(slot_ver + base + lane);
      const K k_l = hps_racy_ld(slot_keys + base + lane);
      const unsigned match = __ballot_sync(HPS_FULL_MASK, (v_l & HPS_OCC) && k_l == key);
      if (match == 0) break;  // not cached (a slot being filled with it counts as not yet)
      const long long s = base + (__ffs(match) - 1);
      const unsigned v1 = hps_ld_acquire(slot_ver + s);
      const K k = hps_racy_ld(slot_keys + s);
      hps_row_copy_packed<VEC, NV>(values + value_base[t] + (s - first_slot) * strides[t], code, dim, lane, packed, h);
      hps_fence();
      const unsigned v2 = hps_ld_relaxed(slot_ver + s);
      const unsigned v1_lane0 = __shfl_sync(HPS_FULL_MASK, v1, 0);
      const bool ok = v1 == v2 && v1 == v1_lane0 && !(v1 & HPS_BUSY) && (v1 & HPS_OCC) && k == key;
      if (__all_sync(HPS_FULL_MASK, ok)) {
        slot = s;
        break;
      }
    }
    if (slot >= 0) {
      hps_row_decode<VEC, NV>(out + o, code, dim, lane, packed, h, o % VEC == 0);
      if (lane == 0) {
        hps_racy_st(slot_ts + slot, clock);
        hps_count_access(slot_freq + slot);
      }
    } else if (lane == 0) {
      miss_pos[atomicAdd(status, 1u)] = i;
    }
  }
}

// replace (insert != 0): insert or overwrite, evicting per policy from a full set.
// update (insert == 0): overwrite keys already cached, insert nothing.
// status[0] counts the positions whose key was cached, status[1] flags a row that does not
// fit `src`, status[2] one its table's format cannot store (skipped before the set is
// touched; the check pass the host runs first has refused any batch holding one); status is
// null for a replace (it does not wait for its kernel).
template <typename K, int VEC, int NV>
__global__ void dc_write(const long long* __restrict__ table_ids, const K* __restrict__ keys, long long n,
                         const float* __restrict__ src, const long long* __restrict__ src_offsets,
                         long long src_size, unsigned* status, const long long* dims, const long long* codes,
                         const long long* strides, const long long* set_base, const unsigned long long* num_sets,
                         const long long* value_base, int tables, K* slot_keys, unsigned* slot_ver,
                         unsigned long long* slot_ts, unsigned* slot_freq, int* set_locks,
                         unsigned char* values, unsigned long long clock, int lfu, int insert) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long i = hps_warp_id(); i < n; i += nwarps) {
    const long long t = table_ids[i];
    const long long o = src_offsets[i];
    const int dim = hps_served_width(t, o, tables, dims, src_size, status, i, lane);
    if (dim < 0) continue;
    HpsStagedRow<VEC, NV> row;
    if (!row.stage(src + o, o % VEC == 0, codes[t], dim, lane, status, i)) continue;
    const K key = keys[i];
    const long long set = hps_set_of(hps_key_bits(key), t, set_base, num_sets);
    const long long base = set * HPS_WARP;
    hps_set_lock(set_locks + set, lane);

    const unsigned v_l = hps_ld_relaxed(slot_ver + base + lane);
    const K k_l = slot_keys[base + lane];
    const unsigned match = __ballot_sync(HPS_FULL_MASK, (v_l & HPS_OCC) && k_l == key);
    int way = -1;
    if (match) {
      way = __ffs(match) - 1;
      if (status != nullptr && lane == 0) atomicAdd(status, 1u);
    } else if (insert) {
      const unsigned empty = __ballot_sync(HPS_FULL_MASK, !(v_l & HPS_OCC));
      if (empty) {
        way = __ffs(empty) - 1;
      } else {
        // Readers update ts/freq without the lock: volatile loads see their latest values.
        const unsigned long long ts = hps_volatile_ld(slot_ts + base + lane);
        const unsigned long long fr = hps_volatile_ld(slot_freq + base + lane);
        way = lfu ? hps_warp_argmin(fr, ts, lane) : hps_warp_argmin(ts, 0ull, lane);
      }
    }
    if (way >= 0) {  // warp-uniform: derived from ballots and shuffles only
      const long long s = base + way;
      const unsigned v = __shfl_sync(HPS_FULL_MASK, v_l, way);
      if (lane == 0) {
        hps_st_relaxed(slot_ver + s, v | HPS_BUSY);
        hps_fence();  // BUSY is visible before any byte of key or vector changes
      }
      __syncwarp();
      hps_fence();
      row.store(values + value_base[t] + (s - set_base[t] * HPS_WARP) * strides[t], dim, lane);
      if (lane == 0) {
        hps_racy_st(slot_keys + s, key);
        hps_racy_st(slot_ts + s, clock);
        if (match) {
          hps_count_access(slot_freq + s);
        } else {
          atomicExch(slot_freq + s, 1u);
        }
      }
      hps_fence();  // every lane's part of the vector is visible before the publish
      __syncwarp();
      if (lane == 0) hps_st_release(slot_ver + s, ((v + HPS_SEQ_STEP) & ~(HPS_BUSY | HPS_OCC)) | HPS_OCC);
    }
    hps_set_unlock(set_locks + set, lane);
  }
}

// (table, key) of every key held in global sets [start_set, end_set): one warp per set,
// compacted with one atomicAdd per set; status[0] counts them.
template <typename K>
__global__ void dc_dump(const K* slot_keys, const unsigned* slot_ver, int* set_locks, const long long* set_base,
                        int tables, long long start_set, long long end_set, K* __restrict__ out_keys,
                        long long* __restrict__ out_tables, unsigned* status) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long set = start_set + hps_warp_id(); set < end_set; set += nwarps) {
    const long long base = set * HPS_WARP;
    hps_set_lock(set_locks + set, lane);
    const bool occ = (hps_ld_relaxed(slot_ver + base + lane) & HPS_OCC) != 0;
    const K k = slot_keys[base + lane];
    hps_set_unlock(set_locks + set, lane);
    const unsigned at = hps_warp_append(status, occ, lane);
    if (occ) {
      out_keys[at] = k;
      out_tables[at] = hps_table_of(set_base, tables, set);
    }
  }
}

// sets[i] = global set of keys[i] in table table_ids[i] (-1 for a table id out of range):
// the formula every other kernel uses, for the host's sets_of. One thread per key.
template <typename K>
__global__ void dc_sets(const long long* __restrict__ table_ids, const K* __restrict__ keys, long long n,
                        const long long* set_base, const unsigned long long* num_sets, int tables,
                        long long* __restrict__ sets) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const long long t = table_ids[i];
    sets[i] = (t < 0 || t >= tables) ? -1 : hps_set_of(hps_key_bits(keys[i]), t, set_base, num_sets);
  }
}

// Empty global sets [start_set, end_set) (all tables, or one table's range) under each set's
// lock, bumping each slot's sequence so that a reader copying a slot across the clear
// rejects its copy.
extern "C" __global__ void dc_clear(unsigned* slot_ver, unsigned long long* slot_ts, unsigned* slot_freq,
                                    int* set_locks, long long start_set, long long end_set) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long set = start_set + hps_warp_id(); set < end_set; set += nwarps) {
    const long long s = set * HPS_WARP + lane;
    hps_set_lock(set_locks + set, lane);
    const unsigned v = hps_ld_relaxed(slot_ver + s);
    hps_racy_st(slot_ts + s, 0ull);
    hps_racy_st(slot_freq + s, 0u);
    hps_st_release(slot_ver + s, (v + HPS_SEQ_STEP) & ~(HPS_BUSY | HPS_OCC));
    hps_set_unlock(set_locks + set, lane);
  }
}

// status[HPS_STATUS_WORDS + t] += keys held by table t: one warp per set, one atomicAdd per non-empty set.
// A snapshot without locks: concurrent writers may be counted before or after their write.
extern "C" __global__ void dc_sizes(const unsigned* slot_ver, const long long* set_base, int tables,
                                    long long total_sets, unsigned* status) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long set = hps_warp_id(); set < total_sets; set += nwarps) {
    const bool occ = (hps_ld_relaxed(slot_ver + set * HPS_WARP + lane) & HPS_OCC) != 0;
    const unsigned mask = __ballot_sync(HPS_FULL_MASK, occ);
    if (lane == 0 && mask) {
      atomicAdd(status + HPS_STATUS_WORDS + hps_table_of(set_base, tables, set), static_cast<unsigned>(__popc(mask)));
    }
  }
}
