// Dynamic (set-associative) embedding cache: query, replace/update, dump, clear.
//
// Layout (num_sets sets of 32 ways; slot = set * 32 + way):
//   slot_keys  K[num_sets * 32]
//   slot_ver   unsigned[num_sets * 32]   seqlock word: bit 0 BUSY (a writer owns the slot),
//                                        bit 1 OCC (holds a key), bits 2.. sequence number
//   slot_ts    unsigned[num_sets * 32]   last access (host clock, one tick per call): LRU
//   slot_freq  unsigned[num_sets * 32]   accesses since insertion: LFU
//   set_locks  int[num_sets]             0 free, 1 held; writers only
//   values     V[num_sets * 32 * dim]    float or hps_half (float16 bits)
//
// One warp per key. Lane l looks at way l, so one __ballot_sync probes a whole set.
//
// Concurrency scheme. Writers (replace, update, dump, clear) take the set lock with
// atomicCAS, so at most one warp changes a set at a time. Readers never lock: they read a
// slot as a seqlock. A writer marks the slot BUSY, fences, writes key and vector, fences,
// and publishes (sequence + 1) | OCC with a release store. A reader loads the version with
// acquire, reads key and vector into registers, fences, reloads the version, and accepts
// the copy only if both versions are equal, not BUSY, OCC, the key is the one it asked for,
// and every lane saw the same version. Any write that overlapped the copy changed the
// version (BUSY is set before the first byte changes, and the new sequence published after
// the last), so an accepted copy is one complete vector stored under that key: never torn,
// never another key's. Rejected copies retry HPS_MAX_READ_TRIES times, then count as a
// miss. Out rows are written only from an accepted register copy, so a miss leaves its row
// untouched. The 30-bit sequence would have to wrap exactly (2^30 writes to one slot during
// one copy) to fool a reader.
//
// LRU/LFU metadata written by readers (slot_ts store, slot_freq atomicAdd) is advisory: a
// race with a writer can only misjudge a victim, never a value.
#include "common.cuh"

#define HPS_BUSY 1u
#define HPS_OCC 2u
#define HPS_SEQ_STEP 4u

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

// Index (lane) of the smallest score in the warp; ties go to the lower lane.
__device__ __forceinline__ int hps_warp_argmin(unsigned long long score, int lane) {
  int best = lane;
#pragma unroll
  for (int off = HPS_WARP / 2; off > 0; off /= 2) {
    const unsigned long long s2 = __shfl_xor_sync(HPS_FULL_MASK, score, off);
    const int b2 = __shfl_xor_sync(HPS_FULL_MASK, best, off);
    if (s2 < score || (s2 == score && b2 < best)) {
      score = s2;
      best = b2;
    }
  }
  return best;
}

template <typename K, typename V, int VEC, int NV>
__global__ void dc_query(const K* __restrict__ keys, long long n, float* __restrict__ out, int dim,
                         K* __restrict__ miss_keys, long long* __restrict__ miss_pos,
                         unsigned* __restrict__ miss_count, const K* slot_keys,
                         const unsigned* slot_ver, unsigned* slot_ts, unsigned* slot_freq,
                         const V* values, unsigned long long num_sets, unsigned clock) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long i = hps_warp_id(); i < n; i += nwarps) {
    const K key = keys[i];
    const long long base = static_cast<long long>(hps_mix64(hps_key_bits(key)) % num_sets) * HPS_WARP;
    float buf[NV * VEC];
    long long slot = -1;
    for (int attempt = 0; attempt < HPS_MAX_READ_TRIES; ++attempt) {
      const unsigned v_l = hps_ld_acquire(slot_ver + base + lane);
      const K k_l = slot_keys[base + lane];
      const unsigned match = __ballot_sync(HPS_FULL_MASK, (v_l & HPS_OCC) && k_l == key);
      if (match == 0) break;  // not cached (a slot being filled with it counts as not yet)
      const long long s = base + (__ffs(match) - 1);
      const unsigned v1 = hps_ld_acquire(slot_ver + s);
      const K k = slot_keys[s];
      hps_row_load<V, VEC, NV>(values + s * dim, dim, lane, buf);
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
      hps_row_store<float, VEC, NV>(out + i * dim, dim, lane, buf);
      if (lane == 0) {
        slot_ts[slot] = clock;
        atomicAdd(slot_freq + slot, 1u);
      }
    } else if (lane == 0) {
      const unsigned m = atomicAdd(miss_count, 1u);
      miss_keys[m] = key;
      miss_pos[m] = i;
    }
  }
}

// replace (insert != 0): insert or overwrite, evicting per policy from a full set.
// update (insert == 0): overwrite keys already cached, insert nothing.
// found_count counts the positions whose key was cached.
template <typename K, typename V, int VEC, int NV>
__global__ void dc_write(const K* __restrict__ keys, long long n, const float* __restrict__ src, int dim,
                         K* slot_keys, unsigned* slot_ver, unsigned* slot_ts, unsigned* slot_freq,
                         int* set_locks, V* values, unsigned long long num_sets, unsigned clock,
                         int lfu, int insert, unsigned* __restrict__ found_count) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long i = hps_warp_id(); i < n; i += nwarps) {
    const K key = keys[i];
    const unsigned long long set = hps_mix64(hps_key_bits(key)) % num_sets;
    const long long base = static_cast<long long>(set) * HPS_WARP;
    hps_set_lock(set_locks + set, lane);

    const unsigned v_l = hps_ld_relaxed(slot_ver + base + lane);
    const K k_l = slot_keys[base + lane];
    const unsigned match = __ballot_sync(HPS_FULL_MASK, (v_l & HPS_OCC) && k_l == key);
    int way = -1;
    if (match) {
      way = __ffs(match) - 1;
      if (lane == 0) atomicAdd(found_count, 1u);
    } else if (insert) {
      const unsigned empty = __ballot_sync(HPS_FULL_MASK, !(v_l & HPS_OCC));
      if (empty) {
        way = __ffs(empty) - 1;
      } else {
        // Readers update ts/freq without the lock: volatile loads see their latest values.
        const unsigned ts = *(volatile unsigned*)(slot_ts + base + lane);
        const unsigned fr = *(volatile unsigned*)(slot_freq + base + lane);
        const unsigned long long score =
            lfu ? ((static_cast<unsigned long long>(fr) << 32) | ts) : static_cast<unsigned long long>(ts);
        way = hps_warp_argmin(score, lane);
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
      hps_row_copy_in<V, VEC, NV>(values + s * dim, src + i * dim, dim, lane);
      if (lane == 0) {
        slot_keys[s] = key;
        slot_ts[s] = clock;
        if (match) {
          atomicAdd(slot_freq + s, 1u);
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

// Keys of sets [start_set, end_set): one warp per set, compacted with one atomicAdd per set.
template <typename K>
__global__ void dc_dump(const K* slot_keys, const unsigned* slot_ver, int* set_locks,
                        long long start_set, long long end_set, K* __restrict__ out_keys,
                        unsigned* __restrict__ out_count) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long set = start_set + hps_warp_id(); set < end_set; set += nwarps) {
    const long long base = set * HPS_WARP;
    hps_set_lock(set_locks + set, lane);
    const bool occ = (hps_ld_relaxed(slot_ver + base + lane) & HPS_OCC) != 0;
    const K k = slot_keys[base + lane];
    hps_set_unlock(set_locks + set, lane);
    const unsigned mask = __ballot_sync(HPS_FULL_MASK, occ);
    unsigned start = 0;
    if (lane == 0 && mask) start = atomicAdd(out_count, static_cast<unsigned>(__popc(mask)));
    start = __shfl_sync(HPS_FULL_MASK, start, 0);
    if (occ) out_keys[start + __popc(mask & ((1u << lane) - 1u))] = k;
  }
}

// Empty every set under its lock, bumping each slot's sequence so that a reader copying
// a slot across the clear rejects its copy.
extern "C" __global__ void dc_clear(unsigned* slot_ver, unsigned* slot_ts, unsigned* slot_freq,
                                    int* set_locks, long long num_sets) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long set = hps_warp_id(); set < num_sets; set += nwarps) {
    const long long s = set * HPS_WARP + lane;
    hps_set_lock(set_locks + set, lane);
    const unsigned v = hps_ld_relaxed(slot_ver + s);
    slot_ts[s] = 0u;
    slot_freq[s] = 0u;
    hps_st_release(slot_ver + s, (v + HPS_SEQ_STEP) & ~(HPS_BUSY | HPS_OCC));
    hps_set_unlock(set_locks + set, lane);
  }
}
