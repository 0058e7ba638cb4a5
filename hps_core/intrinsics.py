"""What numba kernels need of LLVM that numba lacks: atomics, the reader-writer spinlocks
built on them, prefetches, and arrays viewed from raw addresses.

The in-process tiers (the hash map) and the CPU cache twins answer a multi-table batch in ONE
``@njit(nogil=True)`` call, so their locks must be taken inside the kernel: a Python
``threading.Lock`` per partition or stripe would put a Python call per lock on the request
path. numba has no CPU atomics, so this module emits LLVM's (``atomicrmw``, ``cmpxchg``,
atomic loads) through ``numba.extending.intrinsic``; they are sequentially consistent, which
also stops the compiler from moving a kernel's reads of shared arrays across them.

A lock is one int64 in a lock array, plus one int64 in a parallel array of waiting writers::

    lock word   0 free;  n > 0 held by n readers;  -1 held by one writer
    waiting     writers spinning for the lock; while > 0 no new reader enters, so a stream of
                overlapping readers cannot starve a writer

Each intrinsic is its typer function (``_*_typer``) wrapped by ``numba.extending.intrinsic``
and published typed ``Any``: kernels call it without the typing context, which mypy would
otherwise demand.

Spinning calls ``sched_yield`` (declared by symbol name, so the kernels stay cacheable): a
holder that was preempted gets the core back instead of a spinner burning its time slice.

Python code takes a write lock around work it must do between kernels (growing arrays) with
:meth:`LockArray.write_locked`. Readers and writers of the same lock must not nest it, and a
thread that holds several locks takes them in index order.

:func:`prefetch` asks for the cache line of an array element ahead of its use. A hash probe
of a large table waits on memory twice per key (its slot, then its row); issuing the loads a
few keys ahead lets those waits overlap (the hash map's lookup kernel: ~5x fewer ns per key
on 26 tables of 50,000 rows here).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "LockArray",
    "as_voidptr",
    "atomic_add",
    "atomic_cas",
    "atomic_load",
    "atomic_store",
    "atomic_tick",
    "fence_acquire",
    "fence_release",
    "prefetch",
    "read_acquire",
    "read_release",
    "sched_yield",
    "write_acquire",
    "write_release",
]

_WRITER = -1


def _item_pointer(context: Any, builder: Any, arr_type: Any, arr: Any, index: Any) -> Any:
    ary = context.make_array(arr_type)(context, builder, arr)
    # numba ships py.typed but leaves its code-generation helpers unannotated
    return cgutils.get_item_pointer(context, builder, arr_type, ary, [index])  # type: ignore[no-untyped-call]


def _int64_array(arr: Any) -> bool:
    return isinstance(arr, types.Array) and arr.dtype == types.int64


def _atomic_add_typer(typingctx: Any, arr: Any, index: Any, value: Any) -> Any:
    """``arr[index] += value`` atomically on an int64 array; returns the old value."""
    if not _int64_array(arr):
        return None
    sig = types.int64(arr, types.intp, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = _item_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


atomic_add: Any = intrinsic(_atomic_add_typer)


def _atomic_cas_typer(typingctx: Any, arr: Any, index: Any, expected: Any, new: Any) -> Any:
    """If ``arr[index] == expected`` set it to ``new``, atomically; True when it did."""
    if not _int64_array(arr):
        return None
    sig = types.boolean(arr, types.intp, types.int64, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = _item_pointer(context, builder, signature.args[0], args[0], args[1])
        pair = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 1)

    return sig, codegen


atomic_cas: Any = intrinsic(_atomic_cas_typer)


def _atomic_load_typer(typingctx: Any, arr: Any, index: Any) -> Any:
    """``arr[index]`` read atomically (sequentially consistent) from an int64 array."""
    if not _int64_array(arr):
        return None
    sig = types.int64(arr, types.intp)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = _item_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "seq_cst", 8)

    return sig, codegen


atomic_load: Any = intrinsic(_atomic_load_typer)


def _atomic_store_typer(typingctx: Any, arr: Any, index: Any, value: Any) -> Any:
    """``arr[index] = value`` stored atomically (sequentially consistent) into an int64 array:
    the commit points of the host store's writers (hps_core/db/shared_hash_map.py), which
    neither the compiler nor the CPU may move before the stores they publish."""
    if not _int64_array(arr):
        return None
    sig = types.void(arr, types.intp, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = _item_pointer(context, builder, signature.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "seq_cst", 8)
        return context.get_dummy_value()

    return sig, codegen


atomic_store: Any = intrinsic(_atomic_store_typer)


@njit(nogil=True, cache=True)
def atomic_tick(counter: Any, n: int) -> int:
    """Reserve ``n`` ticks of the logical clock ``counter[0]`` (int64); returns the first.
    Callable from Python as well as from kernels."""
    return atomic_add(counter, 0, n)  # type: ignore[no-any-return]


def _fence_typer(ordering: str) -> Any:
    def typer(typingctx: Any) -> Any:
        sig = types.void()

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            builder.fence(ordering)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = typer.__qualname__ = f"fence_{ordering}"  # numba keys intrinsics by name
    return typer


#: Loads before it complete before loads and stores after it (a seqlock reader's second look
#: at its sequence word must come after the data it checks; x86 keeps that order anyway).
fence_acquire: Any = intrinsic(_fence_typer("acquire"))
#: Loads and stores before it complete before stores after it (a seqlock writer's odd sequence
#: word is seen before the data it changes).
fence_release: Any = intrinsic(_fence_typer("release"))


def _sched_yield_typer(typingctx: Any) -> Any:
    sig = types.void()

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fn = cgutils.get_or_insert_function(  # type: ignore[no-untyped-call]  # unannotated in numba
            builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


sched_yield: Any = intrinsic(_sched_yield_typer)


def _as_voidptr_typer(typingctx: Any, address: Any) -> Any:
    """An int64 address as a ``void*``, for ``numba.carray(ptr, shape, dtype)``: a kernel that
    finds arrays through a table of addresses views them without Python objects."""
    sig = types.voidptr(types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return sig, codegen


as_voidptr: Any = intrinsic(_as_voidptr_typer)


def _prefetch_typer(typingctx: Any, arr: Any, index: Any, write: Any) -> Any:
    """Hint that ``arr[index]`` (C-contiguous array, flat index) will be read, or written when
    ``write`` (a literal bool: read-for-ownership ahead of a store), soon."""
    if not isinstance(arr, types.Array) or not isinstance(write, types.BooleanLiteral):
        return None
    sig = types.void(arr, types.intp, write)
    rw = int(write.literal_value)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        arr_type = signature.args[0]
        ary = context.make_array(arr_type)(context, builder, args[0])
        # flat index into the data pointer, whatever the array's rank
        ptr = builder.gep(ary.data, [args[1]])
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")  # type: ignore[no-untyped-call]  # unannotated in numba
        # read or write, keep in all cache levels, data cache
        builder.call(fn, [builder.bitcast(ptr, byte_ptr), ir.Constant(i32, rw), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


prefetch: Any = intrinsic(_prefetch_typer)


@njit(nogil=True, cache=True, inline="always")
def read_acquire(locks: Any, waiting: Any, i: int) -> None:
    """Take lock ``i`` shared; waits while a writer holds it or waits for it."""
    while True:
        if atomic_load(waiting, i) == 0:
            held = atomic_load(locks, i)
            if held >= 0 and atomic_cas(locks, i, held, held + 1):
                return
        sched_yield()


@njit(nogil=True, cache=True, inline="always")
def read_release(locks: Any, i: int) -> None:
    atomic_add(locks, i, -1)


@njit(nogil=True, cache=True)
def write_acquire(locks: Any, waiting: Any, i: int) -> None:
    """Take lock ``i`` exclusively; new readers stay out while this writer waits."""
    atomic_add(waiting, i, 1)
    while not atomic_cas(locks, i, 0, _WRITER):
        sched_yield()
    atomic_add(waiting, i, -1)


@njit(nogil=True, cache=True)
def write_release(locks: Any, i: int) -> None:
    atomic_add(locks, i, 1)  # -1 → 0


class LockArray:
    """``count`` reader-writer spinlocks: the arrays a kernel takes them from.

    Pass ``locks`` and ``waiting`` to a kernel, which calls :func:`read_acquire` /
    :func:`write_acquire` itself; Python takes a write lock with :meth:`write_locked`.
    """

    def __init__(self, count: int) -> None:
        self.locks = np.zeros(max(1, int(count)), np.int64)
        self.waiting = np.zeros_like(self.locks)

    def __len__(self) -> int:
        return int(self.locks.shape[0])

    @contextmanager
    def write_locked(self, i: int) -> Iterator[None]:
        """Hold lock ``i`` exclusively while the block runs (Python work between kernels)."""
        write_acquire(self.locks, self.waiting, i)
        try:
            yield
        finally:
            write_release(self.locks, i)

    @contextmanager
    def read_locked(self, i: int) -> Iterator[None]:
        """Hold lock ``i`` shared while the block runs (a Python reader beside the kernels)."""
        read_acquire(self.locks, self.waiting, i)
        try:
            yield
        finally:
            read_release(self.locks, i)

    @contextmanager
    def all_write_locked(self) -> Iterator[None]:
        """Hold every lock exclusively (taken in index order), e.g. to change shared structure."""
        taken = 0
        try:
            for i in range(len(self)):
                write_acquire(self.locks, self.waiting, i)
                taken += 1
            yield
        finally:
            for i in range(taken - 1, -1, -1):
                write_release(self.locks, i)

