// The device plain-gather ceiling the benchmarks measure caches and lookups against
// (scripts/bench_cache.py, scripts/bench_lookup.py): out[i] = table[rows[i]], one warp per
// row, float4 loads and stores (dim % 4 == 0 and 16-byte aligned rows).
extern "C" __global__ void gather(const float* __restrict__ table, const long long* __restrict__ rows,
                                  float* __restrict__ out, long long n, int dim) {
  const long long warps = (long long)gridDim.x * blockDim.x / 32;
  const int lane = threadIdx.x & 31;
  for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; i < n; i += warps) {
    const float4* src = reinterpret_cast<const float4*>(table + rows[i] * dim);
    float4* dst = reinterpret_cast<float4*>(out + i * dim);
    for (int j = lane; j < dim / 4; j += 32) dst[j] = src[j];
  }
}
