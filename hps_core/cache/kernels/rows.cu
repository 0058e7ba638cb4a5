// Row copies between two flat row buffers on the device (the layout of hps_core/rows.py):
// dst[dst_offsets[i] .. + w] = src[src_offsets[i] .. + w], w = dims[table_ids[i]]. The GPU
// twin of hps_core.rows.copy_rows, used by the lookup to scatter cached and fetched rows of
// every table into a request's output in one launch.
//
// One warp per row; lane l moves groups l, l+32, ... of VEC floats (VEC divides every
// table's dim; a row whose offsets are not multiples of VEC moves element by element). A
// row whose table id is out of range, or that does not fit either buffer, is skipped: the
// call does not wait for its kernel, so nothing reads an error back (host arrays are
// checked on the host before the launch).
//
// src and dst may be one buffer (the lookup copies a batch's repeated rows within its output),
// so they are not __restrict__; the rows one call reads and the rows it writes must not
// overlap (warps run in any order).
#include "common.cuh"

template <int VEC>
__global__ void copy_rows(const float* src, const long long* __restrict__ src_offsets,
                          long long src_size, float* dst, const long long* __restrict__ dst_offsets,
                          long long dst_size, const long long* __restrict__ table_ids, long long n,
                          const long long* dims, int tables) {
  const int lane = hps_lane();
  const long long nwarps = hps_num_warps();
  for (long long i = hps_warp_id(); i < n; i += nwarps) {
    const long long t = table_ids[i];
    const long long so = src_offsets[i];
    const long long d = dst_offsets[i];
    const int dim = hps_row_width(t, so, tables, dims, src_size);
    if (dim < 0 || hps_row_width(t, d, tables, dims, dst_size) < 0) continue;
    const bool aligned = so % VEC == 0 && d % VEC == 0;
    for (int e = lane * VEC; e < dim; e += HPS_WARP * VEC) {
      float g[VEC];
      hps_group_load<VEC>(src + so + e, g, aligned);
      hps_group_store<VEC>(dst + d + e, g, aligned);
    }
  }
}
