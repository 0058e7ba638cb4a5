// Static embedding table: the whole table resident, open addressing key -> row, no eviction.
//
// Layout:
//   slot_keys  K[nslots]          nslots a power of two >= 2 * capacity (load <= 1/2)
//   slot_rows  int[nslots]        -1 empty, -2 claimed by an insert in progress, else the row
//   row_keys   K[capacity]        the key a row belongs to, checked by readers
//   row_ver    unsigned[capacity] seqlock and writer lock of the row: bit 0 BUSY, +2 per write
//   values     V[capacity * dim]
//   n_rows     unsigned[1]        rows handed out (the host checks room before inserting)
//
// Linear probing, one warp per key: lane l looks at slot start + w + l, so one
// __ballot_sync scans 32 slots. Slots are never freed (clear resets the whole table), so
// a key is always before the first empty slot of its probe sequence.
//
// Concurrency. An insert claims an empty slot with atomicCAS(-1 -> -2), writes the key and
// the row, then publishes the row number with a release store; a reader (acquire load)
// that sees a row >= 0 therefore sees the slot's key. A claimed slot (-2) is skipped by
// readers (that key is not inserted yet) and waited on by writers (it may be their own key,
// a duplicate in the batch). Row contents are a seqlock: writers take the row by atomicCAS
// on row_ver from even to odd, write, and release even + 2; readers copy into registers
// between an acquire load and a fenced reload of row_ver and keep the copy only if both
// are equal and even and row_keys[row] is their key (which also rejects a row reused after
// a concurrent clear). See dynamic_cache.cu for why that cannot yield a torn vector.
#include "common.cuh"

#define HPS_SLOT_EMPTY (-1)
#define HPS_SLOT_CLAIMED (-2)

// Row of `key`, or -1. Skips claimed slots: a key whose insert has not published is absent.
template <typename K>
__device__ __forceinline__ int st_probe(const K key, const K* slot_keys, const int* slot_rows,
                                        unsigned long long mask, int lane) {
  const unsigned long long start = hps_mix64(hps_key_bits(key)) & mask;
  for (unsigned long long w = 0; w <= mask; w += HPS_WARP) {
    const unsigned long long s = (start + w + lane) & mask;
    const int r = hps_ld_acquire(slot_rows + s);
    const K k = slot_keys[s];
    const unsigned match = __ballot_sync(HPS_FULL_MASK, r >= 0 && k == key);
    if (match) return __shfl_sync(HPS_FULL_MASK, r, __ffs(match) - 1);
    if (__ballot_sync(HPS_FULL_MASK, r == HPS_SLOT_EMPTY)) return -1;
  }
  return -1;
}

template <typename K, typename V, int VEC, int NV>
__global__ void st_query(const K* __restrict__ keys, long long n, float* __restrict__ out, int dim,
                         K* __restrict__ miss_keys, long long* __restrict__ miss_pos,
                         unsigned* __restrict__ miss_count, const K* slot_keys, const int* slot_rows,
                         const K* row_keys, const unsigned* row_ver, const V* values,
                         unsigned long long mask) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long i = hps_warp_id(); i < n; i += nwarps) {
    const K key = keys[i];
    float buf[NV * VEC];
    bool hit = false;
    for (int attempt = 0; attempt < HPS_MAX_READ_TRIES; ++attempt) {
      const int row = st_probe<K>(key, slot_keys, slot_rows, mask, lane);
      if (row < 0) break;
      const unsigned v1 = hps_ld_acquire(row_ver + row);
      const K rk = row_keys[row];
      hps_row_load<V, VEC, NV>(values + static_cast<long long>(row) * dim, dim, lane, buf);
      hps_fence();
      const unsigned v2 = hps_ld_relaxed(row_ver + row);
      const unsigned v1_lane0 = __shfl_sync(HPS_FULL_MASK, v1, 0);
      if (__all_sync(HPS_FULL_MASK, v1 == v2 && v1 == v1_lane0 && !(v1 & 1u) && rk == key)) {
        hit = true;
        break;
      }
    }
    if (hit) {
      hps_row_store<float, VEC, NV>(out + i * dim, dim, lane, buf);
    } else if (lane == 0) {
      const unsigned m = atomicAdd(miss_count, 1u);
      miss_keys[m] = key;
      miss_pos[m] = i;
    }
  }
}

// rows[i] = row of keys[i] or -1 (the host counts new keys before an insert).
template <typename K>
__global__ void st_find(const K* __restrict__ keys, long long n, const K* slot_keys,
                        const int* slot_rows, unsigned long long mask, int* __restrict__ rows) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long i = hps_warp_id(); i < n; i += nwarps) {
    const int row = st_probe<K>(keys[i], slot_keys, slot_rows, mask, lane);
    if (lane == 0) rows[i] = row;
  }
}

// Write a row under its row lock (row_ver odd while held).
template <typename K, typename V, int VEC, int NV>
__device__ __forceinline__ void st_write_row(int row, const K key, const float* src, int dim,
                                             K* row_keys, unsigned* row_ver, V* values, int lane) {
  unsigned v = 0;
  if (lane == 0) {
    for (;;) {
      v = hps_ld_relaxed(row_ver + row);
      if (!(v & 1u) && atomicCAS(row_ver + row, v, v | 1u) == v) break;
      __nanosleep(32);
    }
    hps_fence();  // BUSY is visible before any byte of the row changes
  }
  __syncwarp();
  hps_fence();
  hps_row_copy_in<V, VEC, NV>(values + static_cast<long long>(row) * dim, src, dim, lane);
  if (lane == 0) row_keys[row] = key;
  hps_fence();
  __syncwarp();
  if (lane == 0) hps_st_release(row_ver + row, v + 2u);
}

// insert != 0: upsert (the host made sure the new keys fit); insert == 0: update only.
// found_count counts the positions whose key was already stored.
template <typename K, typename V, int VEC, int NV>
__global__ void st_write(const K* __restrict__ keys, long long n, const float* __restrict__ src, int dim,
                         K* slot_keys, int* slot_rows, K* row_keys, unsigned* row_ver, V* values,
                         unsigned long long mask, unsigned* n_rows, int insert,
                         unsigned* __restrict__ found_count) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long i = hps_warp_id(); i < n; i += nwarps) {
    const K key = keys[i];
    const unsigned long long start = hps_mix64(hps_key_bits(key)) & mask;
    unsigned long long w = 0;
    int row = -1;
    bool claimed = false;
    unsigned long long claimed_slot = 0;
    while (w <= mask) {
      const unsigned long long s = (start + w + lane) & mask;
      const int r = hps_ld_acquire(slot_rows + s);
      const K k = slot_keys[s];
      const unsigned match = __ballot_sync(HPS_FULL_MASK, r >= 0 && k == key);
      const unsigned empty = __ballot_sync(HPS_FULL_MASK, r == HPS_SLOT_EMPTY);
      const unsigned busy = __ballot_sync(HPS_FULL_MASK, r == HPS_SLOT_CLAIMED);
      if (match) {
        row = __shfl_sync(HPS_FULL_MASK, r, __ffs(match) - 1);
        break;
      }
      // A claim before the first empty slot may be this very key: wait for it to publish.
      const unsigned before_empty = empty ? ((1u << (__ffs(empty) - 1)) - 1u) : HPS_FULL_MASK;
      if (busy & before_empty) {
        __nanosleep(64);
        continue;
      }
      if (!empty) {
        w += HPS_WARP;
        continue;
      }
      if (!insert) break;
      const int e = __ffs(empty) - 1;
      int won = 0;
      if (lane == e) won = atomicCAS(slot_rows + s, HPS_SLOT_EMPTY, HPS_SLOT_CLAIMED) == HPS_SLOT_EMPTY;
      if (__shfl_sync(HPS_FULL_MASK, won, e)) {
        claimed = true;
        claimed_slot = __shfl_sync(HPS_FULL_MASK, s, e);
        break;
      }
      // lost the race for that slot: look at the window again
    }
    if (row >= 0) {
      if (lane == 0) atomicAdd(found_count, 1u);
      st_write_row<K, V, VEC, NV>(row, key, src + i * dim, dim, row_keys, row_ver, values, lane);
    } else if (claimed) {
      int new_row = 0;
      if (lane == 0) {
        slot_keys[claimed_slot] = key;
        new_row = static_cast<int>(atomicAdd(n_rows, 1u));
      }
      new_row = __shfl_sync(HPS_FULL_MASK, new_row, 0);
      st_write_row<K, V, VEC, NV>(new_row, key, src + i * dim, dim, row_keys, row_ver, values, lane);
      // Publish: key and row contents happen-before a reader's acquire of the row number.
      if (lane == 0) hps_st_release(slot_rows + claimed_slot, new_row);
    }
  }
}
