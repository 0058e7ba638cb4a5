"""The emulated GPU itself: warp intrinsics and barriers give CUDA's answers, and what would
fault, hang or corrupt on a GPU is a KernelFault here (diverged intrinsics, a lane that left,
deadlock, a lock never released, misaligned accesses, writes past an allocation, arguments
that do not match their parameters); the CuPy stand-in refuses what CuPy refuses. Runs in
every CI run (no HPS_EMULATED_GPU needed): one small module, compiled once (cached)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.cuda_emulator import fake_cupy as cp
from tests.cuda_emulator._build import KernelFault

SOURCE = r"""
extern "C" __global__ void warp_ops(const int* in, unsigned* ballots, int* next, int* xored, int* all_pos) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x & 31;
  const unsigned b = __ballot_sync(0xffffffffu, in[t] > 0);
  if (lane == 0) ballots[t / 32] = b;
  next[t] = __shfl_sync(0xffffffffu, in[t], (lane + 1) & 31);
  xored[t] = __shfl_xor_sync(0xffffffffu, in[t], 1);
  all_pos[t] = __all_sync(0xffffffffu, in[t] > 0);
}
extern "C" __global__ void block_reverse(int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = blockIdx.x * 100 + threadIdx.x;
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = s[63 - threadIdx.x];
}
extern "C" __global__ void counters(unsigned* c32, unsigned long long* c64, int* first) {
  atomicAdd(c32, 1u);
  atomicAdd(c64, 3ull);
  atomicCAS(first, -1, static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x));
}
extern "C" __global__ void diverged(unsigned* out) {
  if ((threadIdx.x & 31) < 16) out[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
  else __syncwarp();
}
extern "C" __global__ void lane_leaves(unsigned* out) {
  if ((threadIdx.x & 31) == 5) return;
  out[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
}
extern "C" __global__ void wait_for_each_other(int* out) {
  if (threadIdx.x == 0) __syncwarp(0x3u);
  if (threadIdx.x == 1) __syncthreads();
}
extern "C" __global__ void never_released(int* lock) {
  if (threadIdx.x == 0) while (atomicCAS(lock, 0, 1) != 0) __nanosleep(32);
}
extern "C" __global__ void vector_load(const float* p, long long shift, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(p + shift);
  if (threadIdx.x == 0) out[0] = v.x + v.y + v.z + v.w;
}
extern "C" __global__ void word_load(const unsigned char* p, unsigned* out) {
  if (threadIdx.x == 0) out[0] = *reinterpret_cast<const unsigned*>(p + 1);
}
extern "C" __global__ void write_at(float* out, long long i) {
  if (threadIdx.x == 0) out[i] = 1.0f;
}
extern "C" __global__ void takes_scalars(int a, long long b, float* out) {
  if (threadIdx.x == 0) out[0] = static_cast<float>(a + b);
}
"""
NAMES = ["warp_ops", "block_reverse", "counters", "diverged", "lane_leaves", "wait_for_each_other",
         "never_released", "vector_load", "word_load", "write_at", "takes_scalars"]


@pytest.fixture(scope="module")
def kernels() -> dict[str, Any]:
    module = cp.RawModule(code=SOURCE, name_expressions=NAMES)
    return {name: module.get_function(name) for name in NAMES}


@pytest.mark.parametrize("seed", ["0", "7"], ids=["fifo", "random-order"])
def test_warp_intrinsics_answer_as_cuda(kernels: dict[str, Any], seed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPS_EMU_SEED", seed)
    n = 4 * 64  # 4 blocks of 2 warps
    host = np.random.default_rng(1).integers(-5, 5, n).astype(np.int32)
    host[64:96] = np.abs(host[64:96]) + 1  # one warp all positive
    ins = cp.asarray(host)
    ballots, nxt, xored, all_pos = cp.zeros(n // 32, cp.uint32), cp.zeros(n, cp.int32), cp.zeros(n, cp.int32), \
        cp.zeros(n, cp.int32)
    kernels["warp_ops"]((4,), (64,), (ins, ballots, nxt, xored, all_pos))
    lanes = np.arange(n) % 32
    warp_base = np.arange(n) - lanes
    expected_ballots = [int(sum(1 << i for i in range(32) if host[w * 32 + i] > 0)) for w in range(n // 32)]
    assert ballots.get().tolist() == expected_ballots
    np.testing.assert_array_equal(nxt.get(), host[warp_base + (lanes + 1) % 32])
    np.testing.assert_array_equal(xored.get(), host[warp_base + (lanes ^ 1)])
    np.testing.assert_array_equal(all_pos.get(), np.repeat([(host[w * 32:(w + 1) * 32] > 0).all()
                                                           for w in range(n // 32)], 32))


def test_syncthreads_and_shared_memory_are_per_block(kernels: dict[str, Any]) -> None:
    out = cp.zeros(6 * 64, cp.int32)
    kernels["block_reverse"]((6,), (64,), (out,))
    expected = (np.arange(6)[:, None] * 100 + 63 - np.arange(64)[None, :]).ravel()
    np.testing.assert_array_equal(out.get(), expected)


def test_atomics_from_many_blocks_and_host_threads(kernels: dict[str, Any]) -> None:
    c32, c64, first = cp.zeros(1, cp.uint32), cp.zeros(1, cp.uint64), cp.full(1, -1, cp.int32)
    kernels["counters"]((40,), (96,), (c32, c64, first))
    assert int(c32[0]) == 40 * 96 and int(c64[0]) == 3 * 40 * 96
    assert 0 <= int(first[0]) < 40 * 96


@pytest.mark.parametrize(("name", "message"), [
    ("diverged", "must meet at the same intrinsic"),
    ("lane_leaves", "returned while lane"),
    ("wait_for_each_other", "deadlock"),
])
def test_what_would_hang_a_gpu_is_a_fault(kernels: dict[str, Any], name: str, message: str) -> None:
    with pytest.raises(KernelFault, match=message):
        kernels[name]((2,), (64,), (cp.zeros(64, cp.uint32 if name != "wait_for_each_other" else cp.int32),))


def test_a_lock_never_released_times_out(kernels: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPS_EMU_TIMEOUT", "1")
    with pytest.raises(KernelFault, match="HPS_EMU_TIMEOUT"):
        kernels["never_released"]((1,), (32,), (cp.ones(1, cp.int32),))


def test_misaligned_accesses_fault(kernels: dict[str, Any]) -> None:
    src, out = cp.arange(16, dtype=cp.float32), cp.zeros(1, cp.float32)
    kernels["vector_load"]((1,), (32,), (src, np.int64(4), out))
    assert float(out[0]) == 4 + 5 + 6 + 7
    with pytest.raises(KernelFault, match="misaligned address.*16-byte alignment"):
        kernels["vector_load"]((1,), (32,), (src, np.int64(1), out))
    with pytest.raises(KernelFault, match="misaligned address"):
        kernels["word_load"]((1,), (32,), (cp.zeros(8, cp.uint8), cp.zeros(1, cp.uint32)))


def test_a_write_past_an_allocation_faults(kernels: dict[str, Any]) -> None:
    out = cp.zeros(10, cp.float32)
    kernels["write_at"]((1,), (32,), (out, np.int64(9)))
    with pytest.raises(KernelFault, match="argument 0 was written outside its allocation"):
        kernels["write_at"]((1,), (32,), (out, np.int64(10)))


@pytest.mark.parametrize(("args", "message"), [
    ((np.int32(1), np.int64(2)), "2 arguments for 3"),
    ((1, np.int64(2), "out"), "Python int"),
    ((np.int64(1), np.int64(2), "out"), "argument 0 .*int64"),
    ((np.int32(1), np.int32(2), "out"), "argument 1 .*int32"),
    ((np.int32(1), np.int64(2), "int_out"), "argument 2 .*array of int32"),
    ((np.int32(1), np.int64(2), "host_out"), "argument 2 .*ndarray"),
])
def test_arguments_must_match_their_parameters(kernels: dict[str, Any], args: tuple[Any, ...],
                                               message: str) -> None:
    arrays = {"out": cp.zeros(1, cp.float32), "int_out": cp.zeros(1, cp.int32),
              "host_out": np.zeros(1, np.float32)}
    args = tuple(arrays[a] if isinstance(a, str) else a for a in args)
    with pytest.raises(KernelFault, match=message):
        kernels["takes_scalars"]((1,), (32,), args)
    out = arrays["out"]
    kernels["takes_scalars"]((1,), (32,), (np.int32(2), np.int64(3), out))
    assert float(out[0]) == 5.0


def test_an_array_of_another_device_faults(kernels: dict[str, Any]) -> None:
    with cp.cuda.Device(1):
        out = cp.zeros(1, cp.float32)
    with pytest.raises(KernelFault, match="device 1 passed to a kernel on device 0"):
        kernels["takes_scalars"]((1,), (32,), (np.int32(2), np.int64(3), out))


def test_device_arrays_are_not_numpy_arrays() -> None:
    dev = cp.arange(300, dtype=cp.int64)
    assert dev.data.ptr % 256 == 0 and dev.device.id == 0
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(dev)
    with pytest.raises(TypeError, match="numpy array"):
        dev + np.ones(300, np.int64)
    view = dev[10:20]
    assert view.data.ptr == dev.data.ptr + 80
    view[...] = np.arange(10)  # a NumPy value is copied over, as CuPy does
    assert dev.get()[10:20].tolist() == list(range(10))
    assert isinstance((dev == 3).any(), cp.ndarray) and bool((dev == 3).any())


def test_runtime_copies_stay_inside_allocations() -> None:
    dev = cp.ones(4, cp.uint32)
    cp.cuda.runtime.memsetAsync(dev.data.ptr, 0, 16, 0)
    assert dev.get().tolist() == [0, 0, 0, 0]
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="not inside one device allocation"):
        cp.cuda.runtime.memsetAsync(dev.data.ptr, 0, 17, 0)
