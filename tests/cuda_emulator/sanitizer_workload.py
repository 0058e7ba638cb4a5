"""The workload test_sanitizers.py runs in a process of its own, with the emulated kernels
built under a sanitizer (HPS_EMU_SANITIZER) and its runtime LD_PRELOADed (an uninstrumented
Python must load it first): several host threads insert, update, query, evict, dump, size
and clear one GPU cache at once, and every hit is checked to be a row stored under its own
table and key. Exits 0 when every check held; the sanitizer's reports go to stderr.

    python -m tests.cuda_emulator.sanitizer_workload dynamic|static ROUNDS
    python -m tests.cuda_emulator.sanitizer_workload canary
    python -m tests.cuda_emulator.sanitizer_workload build

``build`` compiles, in parallel, every module the other modes load (no runtime needed:
nothing is loaded), so the test's sanitizer builds overlap.

``canary`` runs small kernels whose reports are known (two warps of a block and two blocks
racing on a word, lanes ordered by __syncwarp and warps by __syncthreads, a write before its
allocation), each after a line naming it on stderr, so the test can tell the tools still see
through the fibers.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from hps_core.row_formats import RowFormat
from hps_core.rows import row_offsets
from tests.cuda_emulator import fake_cupy

DIMS = [8, 3, 16]  # gcd 1: one vector shape, so each family is one small module to compile
UNIVERSE = 96  # keys per table: writers and readers keep meeting on the same rows and sets
BATCH = 64


def row_values(ids: np.ndarray, keys: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat rows for (ids, keys): every element of a row is key + 1000 * table, exactly
    representable in every format (fp8 e4m3 holds integers up to 16 exactly only when small,
    so the rows are the key's own value scaled into range), and one element also marks the
    write (step) so rows of different writes differ."""
    offs, total = row_offsets(ids, np.array(DIMS, np.int64))
    flat = np.zeros(total, np.float32)
    for i, (t, k) in enumerate(zip(ids.tolist(), keys.tolist())):
        flat[offs[i]: offs[i] + DIMS[t]] = float(k % 8) + (step % 2) * 0.5
    return flat, offs


def main(kind: str, rounds: int) -> int:
    sys.modules["cupy"] = fake_cupy  # no prebuild: only the modules this cache asks for are built
    from hps_core.cache import gpu
    from tests.hps_core.cache.test_gpu_cache import query_rows
    from tests.hps_core.cache.threads import run_writers_and_readers

    cp = fake_cupy
    formats = ((RowFormat.FP32, RowFormat.FP16, RowFormat.INT8) if kind == "dynamic"
               else (RowFormat.FP16, RowFormat.FP8, RowFormat.FP32))
    if kind == "dynamic":  # 32 ways: fewer slots than keys, so writes evict
        cache = gpu.GpuDynamicCache([64, 64, 64], DIMS, device=0, policy="lru", row_formats=formats)
    else:
        cache = gpu.GpuStaticCache([UNIVERSE] * 3, DIMS, device=0, row_formats=formats)
    errors: list[str] = []
    dims = np.array(DIMS, np.int64)

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        stream = cp.cuda.Stream(non_blocking=True)
        for step in range(rounds):
            flat_keys = rng.choice(3 * UNIVERSE, BATCH, replace=False)
            ids, keys = (flat_keys // UNIVERSE).astype(np.int64), (flat_keys % UNIVERSE).astype(np.int64)
            vals, offs = row_values(ids, keys, step)
            args = [cp.asarray(a) for a in (ids, keys, vals, offs)]
            cache.replace_tables(*args, stream=stream)
            cache.update_tables(*args, stream=stream)
            if seed == 1 and step % 4 == 3:
                cache.sizes(stream=stream)
                if kind == "dynamic":
                    cache.dump_sets(0, cache.total_sets, stream=stream)
                    cache.clear(step % 3, stream=stream)
            stream.synchronize()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        stream = cp.cuda.Stream(non_blocking=True)
        for _ in range(rounds):
            ids = rng.integers(0, 3, BATCH).astype(np.int64)
            keys = rng.integers(0, UNIVERSE, BATCH).astype(np.int64)
            flat, hit, offs = query_rows(cp, cache, ids, keys, dims, stream)
            for i in np.flatnonzero(hit).tolist():
                row = flat[offs[i]: offs[i] + DIMS[ids[i]]]
                base = float(keys[i] % 8)
                if not ((row == base).all() or (row == base + 0.5).all()):
                    errors.append(f"table {ids[i]} key {keys[i]}: {row.tolist()}")

    run_writers_and_readers(writer, reader, threading.Event())  # the writers stop after `rounds`
    for e in errors[:10]:
        print("wrong row:", e, file=sys.stderr)
    print(f"{kind}: {rounds} rounds, {len(errors)} wrong rows", file=sys.stderr)
    return 1 if errors else 0


CANARY_SOURCE = r"""
extern "C" __global__ void lanes_synced(int* p) {
  if (threadIdx.x == 0) *p = 1;
  __syncwarp();
  if (threadIdx.x == 1) *p += 1;
}
extern "C" __global__ void block_synced(int* p) {
  if (threadIdx.x == 0) *p = 1;
  __syncthreads();
  if (threadIdx.x == 40) *p += 1;
}
extern "C" __global__ void warps_race(int* p) {
  if ((threadIdx.x & 31) == 0) *p += 1;
}
extern "C" __global__ void blocks_race(int* p) {
  if (threadIdx.x == blockIdx.x) *p += 1;  // another thread index per block: a race even when
}                                          // one host thread runs both blocks (it reuses fibers)
extern "C" __global__ void write_at(float* out, long long i) {
  if (threadIdx.x == 0) out[i] = 1.0f;
}
"""
#: kernel, grid, block; what each should make the tools say (test_sanitizers.py)
CANARIES = [("lanes_synced", 1, 32), ("block_synced", 1, 64), ("warps_race", 1, 64), ("blocks_race", 4, 32)]


def canary() -> int:
    cp = fake_cupy
    module = cp.RawModule(code=CANARY_SOURCE, name_expressions=[c[0] for c in CANARIES] + ["write_at"])
    for name, grid, block in CANARIES:
        print(f"== canary {name}", file=sys.stderr, flush=True)
        word = cp.zeros(1, cp.int32)
        module.get_function(name)((grid,), (block,), (word,))
    print("== canary write_at", file=sys.stderr, flush=True)
    out = cp.zeros(64, cp.float32)
    # one float before the allocation's host buffer (guards and alignment padding included)
    module.get_function("write_at")((1,), (32,), (out, np.int64(-(out._alloc.start // 4) - 1)))
    print("== canary end", file=sys.stderr, flush=True)
    return 0


def build() -> int:
    from concurrent.futures import ThreadPoolExecutor

    from hps_core.cache import _kernels
    from tests.cuda_emulator import _build

    shapes = _kernels.vector_shapes(DIMS)
    jobs = [(_kernels.source(fam), sorted(_kernels.kernel_names(fam, np.int64, shapes).expressions()))
            for fam in ("dynamic", "static", "rows")]  # what the caches' loader asks for
    jobs.append((CANARY_SOURCE, sorted([c[0] for c in CANARIES] + ["write_at"])))
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda job: _build.build(*job), jobs))
    return 0


if __name__ == "__main__":
    mode = sys.argv[1]
    sys.exit(canary() if mode == "canary" else build() if mode == "build" else main(mode, int(sys.argv[2])))
