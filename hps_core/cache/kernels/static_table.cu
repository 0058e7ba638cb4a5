// Static embedding tables of several tables in one structure: each table wholly resident,
// open addressing key -> row, no eviction.
//
// Layout (the CPU twin's, hps_core/cache/cpu.py), per table t (device arrays built once):
//   dims[t]; codes[t] (its row format, row_formats.cuh); strides[t] (bytes per stored row);
//   slot_base[t] (T + 1 entries: table t owns slots [slot_base[t], slot_base[t+1]), a power
//   of two >= 2 * capacity, load <= 1/2); slot_mask[t] (that size - 1); value_base[t] (first
//   byte of its rows); row_base[t] (first global row); capacities[t]
//   slot_keys  K[total slots]
//   slot_rows  int[total slots]      -1 empty, -2 claimed by an insert in progress, -3 dead
//                                    (an insert that found no row left; see st_write), else
//                                    the row within the table
//   row_keys   K[total rows]         the key a row belongs to, checked by readers
//   row_ver    unsigned[total rows]  seqlock and writer lock of the row: bit 0 BUSY, +2 per write
//   values     u8[...]               packed rows; row r of table t at byte value_base[t] + r * strides[t]
//   row_count  unsigned[T]           rows handed out (the host checks room before inserting)
// Callers' rows are flat (hps_core/rows.py); a row that does not fit the caller's buffer is
// skipped and flagged (common.cuh, hps_row_width).
//
// Linear probing within the table's region, one warp per key: lane l looks at slot
// start + w + l, so one __ballot_sync scans 32 slots. Slots are never freed (clear resets a
// whole table), so a key is always before the first empty slot of its probe sequence.
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
// Writes and clears are serialised by the host (one at a time, each waiting for its kernel).
//
// Row formats (row_formats.cuh), as in dynamic_cache.cu: readers copy the packed row and
// decode an accepted copy; writers encode in registers first and skip a row its format
// cannot store before claiming anything. A replace's counting pass (st_count_new), and an
// update's check pass (hps_check_rows) when a table is not fp32, check that first, so the
// host refuses such a batch before a byte is written.
#include "common.cuh"
#include "row_formats.cuh"

#define HPS_SLOT_EMPTY (-1)
#define HPS_SLOT_CLAIMED (-2)
#define HPS_SLOT_DEAD (-3)

// Row of `key` in the region [region, region + mask + 1), or -1. Skips claimed and dead
// slots: a key whose insert has not published is absent.
template <typename K>
__device__ __forceinline__ int st_probe(const K key, long long region, unsigned long long mask, const K* slot_keys,
                                        const int* slot_rows, int lane) {
  const unsigned long long start = hps_mix64(hps_key_bits(key)) & mask;
  for (unsigned long long w = 0; w <= mask; w += HPS_WARP) {
    const long long s = region + static_cast<long long>((start + w + lane) & mask);
    const int r = hps_ld_acquire(slot_rows + s);
    const K k = hps_racy_ld(slot_keys + s);  // used only where r >= 0 was published after it
    const unsigned match = __ballot_sync(HPS_FULL_MASK, r >= 0 && k == key);
    if (match) return __shfl_sync(HPS_FULL_MASK, r, __ffs(match) - 1);
    if (__ballot_sync(HPS_FULL_MASK, r == HPS_SLOT_EMPTY)) return -1;
  }
  return -1;
}

// status[0] counts misses (their positions go to miss_pos), status[1] flags a row that does
// not fit `out`.
template <typename K, int VEC, int NV>
__global__ void st_query(const long long* __restrict__ table_ids, const K* __restrict__ keys, long long n,
                         float* __restrict__ out, const long long* __restrict__ offsets, long long out_size,
                         long long* __restrict__ miss_pos, unsigned* status, const long long* dims,
                         const long long* codes, const long long* strides, const long long* slot_base,
                         const unsigned long long* slot_mask, const long long* value_base,
                         const long long* row_base, int tables, const K* slot_keys, const int* slot_rows,
                         const K* row_keys, const unsigned* row_ver, const unsigned char* values) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long i = hps_warp_id(); i < n; i += nwarps) {
    const long long t = table_ids[i];
    const long long o = offsets[i];
    const int dim = hps_served_width(t, o, tables, dims, out_size, status, i, lane);
    if (dim < 0) continue;
    const K key = keys[i];
    const int code = static_cast<int>(codes[t]);
    unsigned packed[NV * VEC];
    HpsHeader h{0.0f, 0.0f, true};
    bool hit = false;
    for (int attempt = 0; attempt < HPS_MAX_READ_TRIES; ++attempt) {
      const int row = st_probe<K>(key, slot_base[t], slot_mask[t], slot_keys, slot_rows, lane);
      if (row < 0) break;
      const long long g = row_base[t] + row;
      const unsigned v1 = hps_ld_acquire(row_ver + g);
      const K rk = hps_racy_ld(row_keys + g);
      hps_row_copy_packed<VEC, NV>(values + value_base[t] + static_cast<long long>(row) * strides[t], code, dim, lane,
                                   packed, h);
      hps_fence();
      const unsigned v2 = hps_ld_relaxed(row_ver + g);
      const unsigned v1_lane0 = __shfl_sync(HPS_FULL_MASK, v1, 0);
      if (__all_sync(HPS_FULL_MASK, v1 == v2 && v1 == v1_lane0 && !(v1 & 1u) && rk == key)) {
        hit = true;
        break;
      }
    }
    if (hit) {
      hps_row_decode<VEC, NV>(out + o, code, dim, lane, packed, h, o % VEC == 0);
    } else if (lane == 0) {
      miss_pos[atomicAdd(status, 1u)] = i;
    }
  }
}

// Before a replace: status[HPS_STATUS_WORDS + t] counts the distinct keys of table t that
// the batch would add, de-duplicated through a scratch hash set of (table, key)
// (scratch_tables starts all -1; its size is a power of two >= 2n); status[1] flags a row
// that does not fit `src`, status[2] one its table's format cannot store, so the host
// refuses a bad batch, or one that does not fit a table, before anything is written.
template <typename K, int VEC, int NV>
__global__ void st_count_new(const long long* __restrict__ table_ids, const K* __restrict__ keys, long long n,
                             const float* __restrict__ src, const long long* __restrict__ src_offsets,
                             long long src_size, unsigned* status, const long long* dims, const long long* codes,
                             const long long* slot_base, const unsigned long long* slot_mask, int tables,
                             const K* slot_keys, const int* slot_rows, int* scratch_tables, K* scratch_keys,
                             unsigned long long scratch_mask) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long i = hps_warp_id(); i < n; i += nwarps) {
    const long long t = table_ids[i];
    const long long o = src_offsets[i];
    const int dim = hps_served_width(t, o, tables, dims, src_size, status, i, lane);
    if (dim < 0) continue;
    HpsStagedRow<VEC, NV> row;  // float32 stores any row: not read
    if (codes[t] != HPS_FP32 && !row.stage(src + o, o % VEC == 0, codes[t], dim, lane, status, i)) continue;
    const K key = keys[i];
    const bool stored = st_probe<K>(key, slot_base[t], slot_mask[t], slot_keys, slot_rows, lane) >= 0;
    if (!stored && lane == 0) {  // claim (-1 -> -2), write the key, publish the table id with a release
      unsigned long long s = (hps_mix64(hps_key_bits(key)) + static_cast<unsigned long long>(t)) & scratch_mask;
      for (;;) {
        int seen = atomicCAS(scratch_tables + s, HPS_SLOT_EMPTY, HPS_SLOT_CLAIMED);
        if (seen == HPS_SLOT_EMPTY) {
          scratch_keys[s] = key;
          hps_fence();
          hps_st_release(scratch_tables + s, static_cast<int>(t));
          atomicAdd(status + HPS_STATUS_WORDS + t, 1u);
          break;
        }
        do {  // acquire the published table id, so the key read below is the claimer's
          seen = hps_ld_acquire(scratch_tables + s);
        } while (seen == HPS_SLOT_CLAIMED);
        if (seen == t && scratch_keys[s] == key) break;  // a duplicate within the batch
        s = (s + 1) & scratch_mask;
      }
    }
    __syncwarp();
  }
}

// Write a staged row under its row lock (row_ver odd while held). `g` is the global row.
template <typename K, int VEC, int NV>
__device__ __forceinline__ void st_write_row(long long g, unsigned char* row, const K key,
                                             const HpsStagedRow<VEC, NV>& staged, int dim, K* row_keys,
                                             unsigned* row_ver, int lane) {
  unsigned v = 0;
  if (lane == 0) {
    for (;;) {
      v = hps_ld_relaxed(row_ver + g);
      if (!(v & 1u) && atomicCAS(row_ver + g, v, v | 1u) == v) break;
      __nanosleep(32);
    }
    hps_fence();  // BUSY is visible before any byte of the row changes
  }
  __syncwarp();
  hps_fence();
  staged.store(row, dim, lane);
  if (lane == 0) hps_racy_st(row_keys + g, key);
  hps_fence();
  __syncwarp();
  if (lane == 0) hps_st_release(row_ver + g, v + 2u);
}

// insert != 0: upsert (the host made sure the new keys fit); insert == 0: update only.
// status[0] counts the positions whose key was already stored; status[1] flags a row that
// does not fit `src`, or a new key that found its table without a free row (which the host's
// room check rules out; the slot is then marked dead rather than written past the table);
// status[2] a row its format cannot store (skipped before anything is claimed; the pass the
// host runs first has refused any batch holding one).
template <typename K, int VEC, int NV>
__global__ void st_write(const long long* __restrict__ table_ids, const K* __restrict__ keys, long long n,
                         const float* __restrict__ src, const long long* __restrict__ src_offsets,
                         long long src_size, unsigned* status, const long long* dims, const long long* codes,
                         const long long* strides, const long long* slot_base, const unsigned long long* slot_mask,
                         const long long* value_base, const long long* row_base, const long long* capacities,
                         int tables, K* slot_keys, int* slot_rows, K* row_keys, unsigned* row_ver,
                         unsigned char* values, unsigned* row_count, int insert) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long i = hps_warp_id(); i < n; i += nwarps) {
    const long long t = table_ids[i];
    const long long o = src_offsets[i];
    const int dim = hps_served_width(t, o, tables, dims, src_size, status, i, lane);
    if (dim < 0) continue;
    HpsStagedRow<VEC, NV> staged;
    if (!staged.stage(src + o, o % VEC == 0, codes[t], dim, lane, status, i)) continue;
    const K key = keys[i];
    const long long region = slot_base[t];
    const unsigned long long mask = slot_mask[t];
    const unsigned long long start = hps_mix64(hps_key_bits(key)) & mask;
    unsigned long long w = 0;
    int row = -1;
    bool claimed = false;
    long long claimed_slot = 0;
    while (w <= mask) {
      const long long s = region + static_cast<long long>((start + w + lane) & mask);
      const int r = hps_ld_acquire(slot_rows + s);
      const K k = hps_racy_ld(slot_keys + s);
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
      if (lane == 0) atomicAdd(status, 1u);
      st_write_row<K, VEC, NV>(row_base[t] + row, values + value_base[t] + static_cast<long long>(row) * strides[t],
                               key, staged, dim, row_keys, row_ver, lane);
    } else if (claimed) {
      int new_row = 0;
      if (lane == 0) new_row = static_cast<int>(atomicAdd(row_count + t, 1u));
      new_row = __shfl_sync(HPS_FULL_MASK, new_row, 0);
      if (new_row >= capacities[t]) {  // never past the table: the slot stays taken, unused
        if (lane == 0) hps_st_release(slot_rows + claimed_slot, HPS_SLOT_DEAD);
        hps_flag_row(status, i, lane);
        continue;
      }
      if (lane == 0) hps_racy_st(slot_keys + claimed_slot, key);
      st_write_row<K, VEC, NV>(row_base[t] + new_row,
                               values + value_base[t] + static_cast<long long>(new_row) * strides[t], key, staged,
                               dim, row_keys, row_ver, lane);
      // Publish: key and row contents happen-before a reader's acquire of the row number.
      if (lane == 0) hps_st_release(slot_rows + claimed_slot, new_row);
    }
  }
}

// (table, key) of every key held in slots [start_slot, end_slot) (whole tables): one warp
// per 32 slots, compacted with one atomicAdd per warp; status[0] counts them.
template <typename K>
__global__ void st_dump(const K* slot_keys, const int* slot_rows, const long long* slot_base, int tables,
                        long long start_slot, long long end_slot, K* __restrict__ out_keys,
                        long long* __restrict__ out_tables, unsigned* status) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long chunk = start_slot + hps_warp_id() * HPS_WARP; chunk < end_slot; chunk += nwarps * HPS_WARP) {
    const long long s = chunk + lane;
    const bool held = s < end_slot && hps_ld_acquire(slot_rows + s) >= 0;
    const unsigned at = hps_warp_append(status, held, lane);
    if (held) {
      out_keys[at] = slot_keys[s];
      out_tables[at] = hps_table_of(slot_base, tables, s);
    }
  }
}

// Empty tables [start_table, end_table): their slots [start_slot, end_slot) become empty,
// their rows [start_row, end_row) get a new version (a reader copying across the clear
// rejects its copy), their row counters restart at 0. One thread per element.
extern "C" __global__ void st_clear(int* slot_rows, unsigned* row_ver, unsigned* row_count, long long start_slot,
                                    long long end_slot, long long start_row, long long end_row, int start_table,
                                    int end_table) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;; j += stride) {
    const bool more_slots = start_slot + j < end_slot;
    const bool more_rows = start_row + j < end_row;
    if (!more_slots && !more_rows) break;
    // Queries may run meanwhile (only writes and clears are serialised): a reader sees a slot
    // or version before or after (aligned words), and a row whose version moved it rejects.
    if (more_slots) hps_racy_st(slot_rows + start_slot + j, HPS_SLOT_EMPTY);
    if (more_rows) hps_racy_st(row_ver + start_row + j, hps_racy_ld(row_ver + start_row + j) + 2u);
    if (start_table + j < end_table) row_count[start_table + j] = 0u;
  }
}
