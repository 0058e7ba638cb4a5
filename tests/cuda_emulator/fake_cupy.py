"""A CuPy stand-in for the emulated device: exactly what hps_core (and its GPU tests) use of
CuPy, with CuPy's conventions, so ``hps_core/cache/gpu.py`` runs unchanged on kernels compiled
for the CPU (``_build``). Installed as ``sys.modules["cupy"]`` by
``tests.cuda_emulator.install()``; nothing imports it by the name ``cupy`` otherwise.

Device memory is host memory: an :class:`ndarray` wraps a NumPy array in an allocation of its
own, 256-byte aligned like CuPy's pool, with guard bytes on both sides that every launch
checks on the allocations it was given (a kernel that writes past an argument is a
KernelFault). Like CuPy, an ndarray is not a NumPy array: NumPy refuses to convert one
implicitly (``np.asarray(device_array)`` raises TypeError), arithmetic with a NumPy array
raises TypeError, and ``get()`` copies to the host. Reductions give 0-d arrays.

Stricter than CuPy where CuPy would pass garbage to a kernel: each launch argument must match
its parameter (device array of the pointee's dtype on the current device; NumPy scalar of the
parameter's kind and size; 0 for a null pointer), checked against the signature the compiler
saw. Launches run to completion before returning (the order CuPy's streams guarantee is
trivially kept; concurrency comes from launches of several host threads, each released from
the GIL).

Devices: ``HPS_EMU_DEVICES`` (default 2, so "array on another device" paths run),
``HPS_EMU_SMS`` multiprocessors each (default 2; gpu.py sizes grids from it).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import mmap
import os
import struct
import threading
import types
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from tests.cuda_emulator import _build
from tests.cuda_emulator._build import KernelFault

__name__ = "cupy"  # noqa: A001 - code names the module by it (base.py's messages: xp.__name__)
__version__ = "0.0-emulated"

_ALIGN = 256  # CuPy's pool hands out 256-byte aligned blocks; gpu.py relies on it
_GUARD = 64
_GUARD_BYTE = 0xA5
_DEVICES = int(os.environ.get("HPS_EMU_DEVICES", "2"))
_SMS = int(os.environ.get("HPS_EMU_SMS", "2"))

# numpy dtypes, as cupy re-exports them
bool_ = np.bool_
int8, int16, int32, int64 = np.int8, np.int16, np.int32, np.int64
uint8, uint16, uint32, uint64 = np.uint8, np.uint16, np.uint32, np.uint64
float16, float32, float64 = np.float16, np.float32, np.float64
dtype = np.dtype


# --------------------------------------------------------------------------- errors


class CUDARuntimeError(RuntimeError):
    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or f"cudaError {status}")
        self.status = status


class CUDADriverError(RuntimeError):
    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or f"CUDA_ERROR {status}")
        self.status = status


class OutOfMemoryError(MemoryError):
    pass


class CompileException(Exception):
    pass


_INVALID_VALUE = 1  # cudaErrorInvalidValue
_NOT_FOUND = 500  # CUDA_ERROR_NOT_FOUND


# --------------------------------------------------------------------------- devices and streams

_local = threading.local()


def _current_device() -> int:
    return getattr(_local, "device", 0)


class Device:
    """A CUDA ordinal; ``with Device(i):`` makes it this thread's current device."""

    def __init__(self, device: int | None = None) -> None:
        self.id = _current_device() if device is None else int(device)
        if not 0 <= self.id < _DEVICES:
            raise CUDARuntimeError(101, f"cudaErrorInvalidDevice: device {self.id} (emulating {_DEVICES})")
        self._saved: list[int] = []

    def __enter__(self) -> Device:
        self._saved.append(_current_device())
        _local.device = self.id
        return self

    def __exit__(self, *exc: object) -> None:
        _local.device = self._saved.pop()

    def use(self) -> None:
        _local.device = self.id

    def synchronize(self) -> None:
        """Nothing to wait for: launches complete before they return."""

    @property
    def attributes(self) -> dict[str, int]:
        return {"MultiProcessorCount": _SMS, "WarpSize": 32, "MaxThreadsPerBlock": 1024}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id} (emulated)>"


_stream_ids = itertools.count(0x1000, 0x10)


class Stream:
    """A stream of the current device. Work completes at launch, so it orders itself; the
    stream is checked to belong to the device a launch runs on, as CUDA requires."""

    null: Stream

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
        self.ptr = 0 if null else next(_stream_ids)
        self.non_blocking = non_blocking
        self.device_id = _current_device()
        self._saved: list[Stream | None] = []

    def __enter__(self) -> Stream:
        self._saved.append(getattr(_local, "stream", None))
        _local.stream = self
        return self

    def __exit__(self, *exc: object) -> None:
        _local.stream = self._saved.pop()

    def use(self) -> Stream:
        _local.stream = self
        return self

    def synchronize(self) -> None:
        """Nothing to wait for: launches complete before they return."""

    def __repr__(self) -> str:
        return f"<Stream {self.ptr:#x} of device {self.device_id} (emulated)>"


Stream.null = Stream(null=True)


def get_current_stream() -> Stream:
    stream = getattr(_local, "stream", None)
    return Stream.null if stream is None else stream


# --------------------------------------------------------------------------- memory


class _Allocation:
    """One device allocation: ``nbytes`` at a 256-byte aligned address, guard bytes around."""

    def __init__(self, nbytes: int, device: int) -> None:
        self.nbytes = nbytes
        self.device = device
        self.raw = np.empty(nbytes + 2 * _GUARD + _ALIGN, np.uint8)
        base = self.raw.ctypes.data
        self.start = -(-(base + _GUARD) // _ALIGN) * _ALIGN - base  # offset of the data in raw
        self.raw[: self.start] = _GUARD_BYTE
        self.raw[self.start + nbytes :] = _GUARD_BYTE
        self.ptr = base + self.start
        _live[self.ptr] = self

    def freed(self) -> bool:
        """Whether the memory behind this allocation was freed by its exporter (an IPC mapping
        whose exporter released it: on a GPU, any access is then undefined, usually
        cudaErrorIllegalAddress)."""
        return False

    def guards_intact(self) -> bool:
        return bool((self.raw[: self.start] == _GUARD_BYTE).all() and
                    (self.raw[self.start + self.nbytes :] == _GUARD_BYTE).all())

    def array(self, shape: Any, dt: Any) -> np.ndarray:
        return np.ndarray(shape, dt, buffer=self.raw.data, offset=self.start)


_live: weakref.WeakValueDictionary[int, _Allocation] = weakref.WeakValueDictionary()


def _allocation_of(ptr: int, nbytes: int) -> _Allocation | None:
    """The live allocation holding [ptr, ptr + nbytes), if any."""
    for alloc in list(_live.values()):
        if alloc.ptr <= ptr and ptr + nbytes <= alloc.ptr + alloc.nbytes:
            return alloc
    return None


class _Mapped(_Allocation):
    """A device allocation another process can map: ``nbytes`` in a memfd (so
    :func:`_ipc_get_mem_handle` can name it), 256 guard bytes on both sides. Made by
    :class:`Memory` in the exporting process, and by :func:`_ipc_open_mem_handle` in one that
    maps the same memfd (which it opens through the exporter's ``/proc/<pid>/fd``: gone when
    the exporter is, as CUDA refuses a handle whose exporter freed it or exited)."""

    def __init__(self, nbytes: int, device: int, fd: int = -1) -> None:  # noqa: super().__init__ allocates
        self.nbytes = nbytes
        self.device = device
        size = nbytes + 2 * _ALIGN
        self.owned = fd < 0
        self.fd = os.memfd_create("hps-emu-device", os.MFD_CLOEXEC) if fd < 0 else fd
        if self.owned:
            os.ftruncate(self.fd, size)
        self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.raw = np.frombuffer(self._mm, np.uint8)
        self.start = _ALIGN
        if self.owned:
            self.raw[: self.start] = _GUARD_BYTE
            self.raw[self.start + nbytes :] = _GUARD_BYTE
        self.ptr = self.raw.ctypes.data + self.start
        _live[self.ptr] = self
        _mapped[self.ptr] = self

    def freed(self) -> bool:
        return not self.owned and hasattr(self, "raw") and bytes(self.raw[: len(_FREED)]) == _FREED

    def release(self) -> None:
        """Unmap (and close the memfd): the pointer is no longer a device allocation. The
        exporter's release poisons the memory first (a mark in its leading guard bytes, which
        every importer maps): an importer still using it fails its next launch or copy with
        cudaErrorIllegalAddress, where a GPU would read or write freed memory."""
        if self.owned and hasattr(self, "raw"):
            self.raw[: len(_FREED)] = np.frombuffer(_FREED, np.uint8)
        _live.pop(self.ptr, None)
        _mapped.pop(self.ptr, None)
        del self.raw
        with contextlib.suppress(BufferError):
            self._mm.close()  # an array still viewing it keeps the mapping until it goes
        with contextlib.suppress(OSError):
            os.close(self.fd)


_FREED = b"HPSFREED"  # written over an exported allocation's leading guard bytes when it is freed
_ILLEGAL_ADDRESS = 700  # cudaErrorIllegalAddress


def _check_not_freed(alloc: _Allocation | None, what: str) -> None:
    if alloc is not None and alloc.freed():
        raise CUDARuntimeError(_ILLEGAL_ADDRESS, f"cudaErrorIllegalAddress: {what} is IPC-mapped memory its exporter "
                                                 "freed (an illegal memory access on a GPU)")


#: Exportable allocations alive in this process, by pointer (kept until freed or closed).
_mapped: dict[int, _Mapped] = {}


class BaseMemory:
    """What a :class:`MemoryPointer` points into: ``ptr``, ``size``, ``device_id``."""

    ptr: int
    size: int
    device_id: int


class Memory(BaseMemory):
    """``cupy.cuda.Memory(size)``: one device allocation of its own (cudaMalloc, not the
    pool), freed when this object goes."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.device_id = _current_device()
        self._alloc = _Mapped(max(1, self.size), self.device_id)
        self.ptr = self._alloc.ptr

    def __del__(self) -> None:
        alloc = getattr(self, "_alloc", None)
        if alloc is not None and alloc.ptr in _mapped:
            alloc.release()


class UnownedMemory(BaseMemory):
    """``cupy.cuda.UnownedMemory(ptr, size, owner, device_id=None)``: memory allocated
    elsewhere (an IPC mapping); ``owner`` is kept alive with it."""

    def __init__(self, ptr: int, size: int, owner: Any, device_id: int | None = None) -> None:
        if _allocation_of(ptr, size) is None:
            raise CUDARuntimeError(_INVALID_VALUE, f"cudaErrorInvalidValue: [{ptr:#x}, +{size}) is not device memory")
        self.ptr, self.size, self.owner = ptr, size, owner
        self.device_id = _allocation_of(ptr, size).device if device_id is None else device_id  # type: ignore[union-attr]


class _Raw(BaseMemory):
    def __init__(self, ptr: int, device_id: int) -> None:
        self.ptr, self.size, self.device_id = ptr, 0, device_id


class MemoryPointer:
    """``cupy.cuda.MemoryPointer(mem, offset)``: ``mem.ptr + offset`` on ``mem``'s device."""

    def __init__(self, mem: BaseMemory, offset: int) -> None:
        self.mem = mem
        self.ptr = mem.ptr + int(offset)
        self.device_id = mem.device_id


def _alloc_pinned_memory(nbytes: int) -> bytearray:
    """Page-locked host memory: a buffer NumPy can wrap (``np.frombuffer``), as CuPy's."""
    return bytearray(max(1, nbytes))


# --------------------------------------------------------------------------- ndarray


def _unwrap(x: Any) -> Any:
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}: mixing a cupy array with a numpy array (use cupy.asarray)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _unwrap_index(key: Any) -> Any:
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, tuple):
        return tuple(_unwrap_index(k) for k in key)
    return key


class ndarray:  # noqa: N801 - CuPy's name
    """A device array: a NumPy array in an emulated device allocation."""

    __array_priority__ = 100  # numpy defers binary operators to ours (which refuse numpy arrays)

    def __init__(self, shape: Any, dtype: Any = float, memptr: Any = None, strides: Any = None,
                 order: str = "C") -> None:
        if strides is not None or order != "C":
            raise NotImplementedError("the emulated cupy.ndarray() takes shape, dtype and memptr only")
        dt = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if memptr is not None:  # a view of memory allocated elsewhere (cupy.cuda.Memory, an IPC mapping)
            alloc = _allocation_of(memptr.ptr, nbytes)
            if alloc is None:
                raise CUDARuntimeError(_INVALID_VALUE, f"cudaErrorInvalidValue: memptr [{memptr.ptr:#x}, +{nbytes}) "
                                                       "is not inside one device allocation")
            self._a = np.ndarray(shape, dt, buffer=alloc.raw.data, offset=alloc.start + memptr.ptr - alloc.ptr)
            self._alloc = alloc
            self._memptr = memptr  # keeps the memory (and its owner) alive, as CuPy's does
            return
        alloc = _Allocation(nbytes, _current_device())
        self._a = alloc.array(shape, dt)
        self._alloc = alloc

    @classmethod
    def _view(cls, arr: np.ndarray, alloc: _Allocation) -> ndarray:
        out = cls.__new__(cls)
        out._a = arr
        out._alloc = alloc
        return out

    def _result(self, res: Any) -> Any:
        """A NumPy result of an operation on this array, as a device array: a view stays in
        this allocation, anything else is copied into a new one (CuPy's results are on the
        device; a reduction is a 0-d array)."""
        if isinstance(res, np.ndarray) and res.base is not None and np.may_share_memory(res, self._alloc.raw):
            return ndarray._view(res, self._alloc)
        if isinstance(res, (np.ndarray, np.generic)):
            with Device(self._alloc.device):
                return _from_host(np.asarray(res))
        return res

    # -- attributes
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: self._result(self._a.T))

    @property
    def data(self) -> MemoryPointer:
        return MemoryPointer(_Raw(self._a.ctypes.data if self._a.size else self._alloc.ptr, self._alloc.device), 0)

    @property
    def device(self) -> Device:
        return Device(self._alloc.device)

    # -- host transfers
    def get(self, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
        _check_not_freed(self._alloc, "get() of an array")
        if out is not None:
            out[...] = self._a
            return out  # type: ignore[no-any-return]
        return np.array(self._a, order=order)

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        _check_not_freed(self._alloc, "set() of an array")
        self._a[...] = arr

    def tolist(self) -> Any:
        return self._a.tolist()

    def item(self) -> Any:
        return self._a.item()

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
                        "NumPy array explicitly.")

    # -- conversions
    def __int__(self) -> int:
        return int(self._a)

    def __float__(self) -> float:
        return float(self._a)

    def __bool__(self) -> bool:
        return bool(self._a)

    def __index__(self) -> int:
        if self._a.ndim != 0 or self._a.dtype.kind not in "iu":
            raise TypeError("only integer scalar arrays can be converted to a scalar index")
        return int(self._a)

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self._a)):
            yield self[i]

    def __repr__(self) -> str:
        return f"array({self._a.tolist()!r}, dtype={self._a.dtype}) (emulated device {self._alloc.device})"

    # -- indexing
    def __getitem__(self, key: Any) -> Any:
        return self._result(self._a[_unwrap_index(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        # CuPy copies a NumPy value to the device; a device value is used as is
        self._a[_unwrap_index(key)] = value._a if isinstance(value, ndarray) else value

    # -- methods
    def copy(self, order: str = "C") -> ndarray:
        return self._result(self._a.copy(order=order))  # type: ignore[no-any-return]

    def astype(self, dtype: Any, order: str = "K", casting: Any = None, subok: Any = None,
               copy: bool = True) -> ndarray:
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return self._result(self._a.astype(dtype, order=order))  # type: ignore[no-any-return]

    def reshape(self, *shape: Any, order: str = "C") -> ndarray:
        return self._result(self._a.reshape(*shape, order=order))  # type: ignore[no-any-return]

    def ravel(self, order: str = "C") -> ndarray:
        return self._result(self._a.ravel(order=order))  # type: ignore[no-any-return]

    def view(self, dtype: Any = None) -> ndarray:
        return self._result(self._a.view(dtype) if dtype is not None else self._a.view())  # type: ignore[no-any-return]

    def fill(self, value: Any) -> None:
        self._a.fill(value)

    def _reduce(name: str) -> Any:  # noqa: N805 - builds methods
        def method(self: ndarray, *args: Any, **kwargs: Any) -> Any:
            return self._result(getattr(self._a, name)(*_unwrap(args), **kwargs))
        method.__name__ = name
        return method

    all = _reduce("all")
    any = _reduce("any")
    sum = _reduce("sum")
    min = _reduce("min")
    max = _reduce("max")
    argmin = _reduce("argmin")
    argmax = _reduce("argmax")
    mean = _reduce("mean")
    cumsum = _reduce("cumsum")
    nonzero = _reduce("nonzero")
    argsort = _reduce("argsort")
    del _reduce

    def __neg__(self) -> ndarray:
        return self._result(-self._a)  # type: ignore[no-any-return]

    def __invert__(self) -> ndarray:
        return self._result(~self._a)  # type: ignore[no-any-return]

    def __abs__(self) -> ndarray:
        return self._result(abs(self._a))  # type: ignore[no-any-return]

    __hash__ = None  # type: ignore[assignment]


def _binary(name: str) -> Any:
    def op(self: ndarray, other: Any) -> Any:
        return self._result(getattr(self._a, name)(_unwrap(other)))
    op.__name__ = name
    return op


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift",
            "eq", "ne", "lt", "le", "gt", "ge", "radd", "rsub", "rmul", "rtruediv", "rfloordiv", "rmod", "rand",
            "ror", "rxor", "iadd", "isub", "imul", "itruediv", "ifloordiv", "iand", "ior", "ixor"):
    setattr(ndarray, f"__{_op}__", _binary(f"__{_op}__"))
del _op


def _from_host(arr: np.ndarray, dt: Any = None) -> ndarray:
    """A new device array on the current device holding ``arr``'s values."""
    arr = np.asarray(arr, dtype=dt)
    out = ndarray(arr.shape, arr.dtype)
    out._a[...] = arr
    return out


# --------------------------------------------------------------------------- creation


def asarray(a: Any, dtype: Any = None, order: Any = None) -> ndarray:
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    return _from_host(a, dtype)


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", ndmin: int = 0) -> ndarray:
    if isinstance(obj, ndarray):
        return obj.astype(dtype or obj.dtype) if copy else asarray(obj, dtype)
    return _from_host(obj, dtype)


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    arr = asarray(a, dtype)
    return arr if arr.flags.c_contiguous else arr.copy()


def asnumpy(a: Any, stream: Any = None, order: str = "C") -> np.ndarray:
    return a.get(order=order) if isinstance(a, ndarray) else np.asarray(a, order=order)


def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return ndarray(shape, dtype)


def zeros(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    out = ndarray(shape, dtype)
    out._a[...] = 0
    return out


def ones(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    out = ndarray(shape, dtype)
    out._a[...] = 1
    return out


def full(shape: Any, fill_value: Any, dtype: Any = None, order: str = "C") -> ndarray:
    out = ndarray(shape, np.asarray(fill_value).dtype if dtype is None else dtype)
    out._a[...] = fill_value
    return out


def empty_like(a: ndarray, dtype: Any = None) -> ndarray:
    return empty(a.shape, a.dtype if dtype is None else dtype)


def zeros_like(a: ndarray, dtype: Any = None) -> ndarray:
    return zeros(a.shape, a.dtype if dtype is None else dtype)


def arange(start: Any, stop: Any = None, step: Any = 1, dtype: Any = None) -> ndarray:
    return _from_host(np.arange(start, stop, step, dtype=dtype) if stop is not None else
                      np.arange(start, dtype=dtype))


def concatenate(arrays: Iterable[Any], axis: int = 0) -> ndarray:
    parts = list(arrays)
    for p in parts:
        if not isinstance(p, ndarray):
            raise TypeError(f"Only cupy arrays can be concatenated, got {type(p).__name__}")
    return _from_host(np.concatenate([p._a for p in parts], axis=axis))


# --------------------------------------------------------------------------- runtime API


def _get_device_count() -> int:
    return _DEVICES


def _device_get_pci_bus_id(device: int) -> str:
    """``cudaDeviceGetPCIBusId``: a distinct bus id per emulated device (CUDA's format,
    upper-case hex). ``HPS_EMU_BUS_OFFSET`` shifts them, as CUDA_VISIBLE_DEVICES would show a
    process another physical GPU under the same ordinal."""
    if not 0 <= device < _DEVICES:
        raise CUDARuntimeError(101, f"cudaErrorInvalidDevice: device {device} (emulating {_DEVICES})")
    return f"0000:{0x41 + device + int(os.environ.get('HPS_EMU_BUS_OFFSET', '0')):02X}:00.0"


def _check_device_range(ptr: int, nbytes: int, what: str) -> None:
    alloc = _allocation_of(ptr, nbytes) if nbytes else None
    _check_not_freed(alloc, f"{what} [{ptr:#x}, +{nbytes})")
    if nbytes and alloc is None:
        raise CUDARuntimeError(_INVALID_VALUE, f"cudaErrorInvalidValue: {what} [{ptr:#x}, +{nbytes}) is not inside "
                                               "one device allocation")


def _memset_async(ptr: int, value: int, nbytes: int, stream: int) -> None:
    _check_device_range(ptr, nbytes, "memsetAsync of")
    ctypes.memset(ptr, value, nbytes)


def _memcpy_async(dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
    if kind == _D2H:
        _check_device_range(src, nbytes, "memcpyAsync source")  # into pinned or pageable host memory
    elif kind == _H2D:
        _check_device_range(dst, nbytes, "memcpyAsync destination")
    elif kind == _D2D:
        _check_device_range(src, nbytes, "memcpyAsync source")
        _check_device_range(dst, nbytes, "memcpyAsync destination")
    ctypes.memmove(dst, src, nbytes)


_H2H, _H2D, _D2H, _D2D = 0, 1, 2, 3

#: CUDA's cudaIpcMemHandle_t is 64 opaque bytes; the emulator's hold (magic, exporter pid,
#: memfd number in the exporter, bytes, device).
_IPC_HANDLE = struct.Struct("<8sqqqq24x")
_IPC_MAGIC = b"HPSEMU01"
_INVALID_HANDLE = 400  # cudaErrorInvalidResourceHandle
_MAP_FAILED = 205  # cudaErrorMapBufferObjectFailed
_opened: dict[int, tuple[_Mapped, int]] = {}  # pointer -> (mapping, times opened)
_ipc_lock = threading.Lock()


def _ipc_get_mem_handle(dev_ptr: int) -> bytes:
    """The handle naming the whole allocation that starts at ``dev_ptr`` (CUDA names the
    base of a cudaMalloc allocation; a pointer inside one is refused here)."""
    alloc = _mapped.get(dev_ptr)
    if alloc is None or not alloc.owned:
        raise CUDARuntimeError(_INVALID_VALUE, f"cudaErrorInvalidValue: {dev_ptr:#x} is not the start of a device "
                                               "allocation of this process (cupy.cuda.Memory)")
    return _IPC_HANDLE.pack(_IPC_MAGIC, os.getpid(), alloc.fd, alloc.nbytes, alloc.device)


def _ipc_open_mem_handle(handle: bytes, flags: int = 1) -> int:
    """Map the allocation ``handle`` names; opening it twice in one process gives the same
    pointer (counted, as CUDA's). Fails when its exporter is gone."""
    if len(handle) != _IPC_HANDLE.size:
        raise CUDARuntimeError(_INVALID_VALUE, f"cudaErrorInvalidValue: an IPC handle has {_IPC_HANDLE.size} bytes")
    magic, pid, fd, nbytes, device = _IPC_HANDLE.unpack(handle)
    if magic != _IPC_MAGIC:
        raise CUDARuntimeError(_INVALID_HANDLE, "cudaErrorInvalidResourceHandle: not an IPC memory handle")
    if pid == os.getpid():
        raise CUDARuntimeError(_INVALID_VALUE, "cudaErrorInvalidValue: an IPC handle cannot be opened by its exporter")
    with _ipc_lock:
        for ptr, (alloc, count) in _opened.items():
            if (alloc.exporter, alloc.exporter_fd) == (pid, fd):
                _opened[ptr] = (alloc, count + 1)
                return ptr
        try:
            mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise CUDARuntimeError(_MAP_FAILED, f"cudaErrorMapBufferObjectFailed: the exporter (pid {pid}) of this "
                                                f"IPC handle is gone ({exc.strerror})") from exc
        if os.fstat(mine).st_size != nbytes + 2 * _ALIGN:
            os.close(mine)
            raise CUDARuntimeError(_MAP_FAILED, "cudaErrorMapBufferObjectFailed: the exporter freed that allocation")
        alloc = _Mapped(nbytes, device, mine)
        alloc.exporter, alloc.exporter_fd = pid, fd
        _opened[alloc.ptr] = (alloc, 1)
        return alloc.ptr


def _ipc_close_mem_handle(dev_ptr: int) -> None:
    with _ipc_lock:
        entry = _opened.get(dev_ptr)
        if entry is None:
            raise CUDARuntimeError(_INVALID_VALUE, f"cudaErrorInvalidValue: {dev_ptr:#x} is no IPC mapping")
        alloc, count = entry
        if count > 1:
            _opened[dev_ptr] = (alloc, count - 1)
            return
        del _opened[dev_ptr]
    alloc.release()

runtime = types.SimpleNamespace(
    CUDARuntimeError=CUDARuntimeError,
    getDeviceCount=_get_device_count,
    deviceGetPCIBusId=_device_get_pci_bus_id,
    getDevice=_current_device,
    deviceSynchronize=lambda: None,
    memsetAsync=_memset_async,
    memcpyAsync=_memcpy_async,
    memcpyHostToHost=_H2H,
    memcpyHostToDevice=_H2D,
    memcpyDeviceToHost=_D2H,
    memcpyDeviceToDevice=_D2D,
    ipcGetMemHandle=_ipc_get_mem_handle,
    ipcOpenMemHandle=_ipc_open_mem_handle,
    ipcCloseMemHandle=_ipc_close_mem_handle,
    cudaIpcMemLazyEnablePeerAccess=1,
)
driver = types.SimpleNamespace(CUDADriverError=CUDADriverError)
memory = types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError, MemoryPointer=MemoryPointer, Memory=Memory,
                               UnownedMemory=UnownedMemory, BaseMemory=BaseMemory)
compiler = types.SimpleNamespace(CompileException=CompileException)


# --------------------------------------------------------------------------- kernels

#: Libraries compiled ahead (tests.cuda_emulator.prebuild) for a source text, by its hash:
#: a RawModule of that text whose name expressions they hold loads without compiling.
_prebuilt: dict[str, _build.Library] = {}


def _code_key(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def register_prebuilt(code: str, library: _build.Library) -> None:
    _prebuilt[_code_key(code)] = library


def _arg_bytes(index: int, param: _build.Param, arg: Any, device: int) -> ctypes.Array[ctypes.c_char]:
    """The bytes a launch passes for one argument, after checking it against its parameter."""
    where = f"argument {index} ({param})"
    if param.pointer:
        if isinstance(arg, ndarray):
            if arg._alloc.device != device:
                raise KernelFault(f"{where}: an array on device {arg._alloc.device} passed to a kernel on device "
                                  f"{device} (an illegal memory access on a GPU without peer access)")
            if param.kind not in "vs" and (arg.dtype.kind, arg.dtype.itemsize) != (
                    {"b": "b"}.get(param.kind, param.kind), param.size):
                raise KernelFault(f"{where}: got an array of {arg.dtype}")
            return ctypes.create_string_buffer(arg.data.ptr.to_bytes(8, "little"), 8)
        if isinstance(arg, np.generic) and arg.dtype.itemsize == 8 and arg.dtype.kind in "iu" and int(arg) == 0:
            return ctypes.create_string_buffer(8)  # a null pointer, as gpu.py's _NO_STATUS
        raise KernelFault(f"{where}: got {type(arg).__name__} {arg!r}; a pointer takes a device array (or a "
                          "NumPy 0 of 8 bytes for null)")
    if isinstance(arg, ndarray):
        raise KernelFault(f"{where}: got a device array for a value parameter")
    if not isinstance(arg, np.generic):
        raise KernelFault(f"{where}: got Python {type(arg).__name__} {arg!r}; pass a NumPy scalar of the "
                          "parameter's type (CuPy guesses the C type of a Python number)")
    if (arg.dtype.kind, arg.dtype.itemsize) != (param.kind, param.size):
        raise KernelFault(f"{where}: got a NumPy {arg.dtype} scalar")
    data = arg.tobytes()
    return ctypes.create_string_buffer(data, len(data))


class RawKernel:
    """One kernel of a RawModule, launched as CuPy launches it:
    ``kernel(grid, block, args, shared_mem=0, stream=None)``."""

    def __init__(self, library: _build.Library, name: str) -> None:
        self._library = library
        self.name = name
        self.params = library.kernels[name][1]

    def __call__(self, grid: Sequence[int], block: Sequence[int], args: Sequence[Any], *, shared_mem: int = 0,
                 stream: Any = None) -> None:
        device = _current_device()
        if shared_mem:
            raise KernelFault(f"{self.name}: dynamic shared memory is not emulated")
        stream = get_current_stream() if stream is None else stream
        if not isinstance(stream, Stream):
            raise TypeError(f"{self.name}: stream must be a cupy.cuda.Stream, got {type(stream).__name__}")
        if stream.ptr and stream.device_id != device:
            raise CUDADriverError(400, f"CUDA_ERROR_INVALID_HANDLE: {self.name} launched on device {device} with a "
                                       f"stream of device {stream.device_id}")
        if len(args) != len(self.params):
            raise KernelFault(f"{self.name}: {len(args)} arguments for {len(self.params)} parameters")
        arg_bytes = [_arg_bytes(i, p, a, device) for i, (p, a) in enumerate(zip(self.params, args))]
        for i, a in enumerate(args):
            if isinstance(a, ndarray):
                _check_not_freed(a._alloc, f"{self.name}: argument {i}")
        g = (tuple(grid) + (1, 1))[:3]
        b = (tuple(block) + (1, 1))[:3]
        self._library.launch(self.name, g, b, arg_bytes)
        for i, a in enumerate(args):
            if isinstance(a, ndarray) and not a._alloc.guards_intact():
                raise KernelFault(f"{self.name}: argument {i} was written outside its allocation")


class RawModule:
    """Source text compiled for the emulator, its kernels got by name expression."""

    def __init__(self, code: str | None = None, path: str | None = None, options: Sequence[str] = (),
                 backend: str = "nvrtc", translate_cucomplex: bool = False, *, enable_cooperative_groups: bool = False,
                 name_expressions: Sequence[str] | None = None, jitify: bool = False) -> None:
        if code is None:
            raise NotImplementedError("the emulated RawModule compiles source text only")
        self.code = code
        self.options = tuple(options)
        self.name_expressions = tuple(name_expressions or ())
        self._library: _build.Library | None = None

    def compile(self, log_stream: Any = None) -> None:
        if self._library is not None:
            return
        prebuilt = _prebuilt.get(_code_key(self.code))
        if prebuilt is not None and set(self.name_expressions) <= set(prebuilt.kernels):
            self._library = prebuilt
            return
        try:
            self._library = _build.load(self.code, self.name_expressions)
        except _build.BuildError as exc:
            raise CompileException(str(exc)) from exc

    def get_function(self, name: str) -> RawKernel:
        self.compile()
        assert self._library is not None
        if name not in self._library.kernels:
            raise CUDADriverError(_NOT_FOUND, f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name} (the emulator "
                                              "knows the kernels named in name_expressions)")
        return RawKernel(self._library, name)


# --------------------------------------------------------------------------- the cuda namespace

cuda = types.SimpleNamespace(
    Device=Device,
    Stream=Stream,
    get_current_stream=get_current_stream,
    runtime=runtime,
    driver=driver,
    memory=memory,
    compiler=compiler,
    alloc_pinned_memory=_alloc_pinned_memory,
    MemoryPointer=MemoryPointer,
    Memory=Memory,
    UnownedMemory=UnownedMemory,
)
