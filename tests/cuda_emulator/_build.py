"""Compiles CUDA source text (as CuPy's RawModule gets it) into a host shared library that runs
its kernels on the emulator (cuda_shim.h, emu_runtime.h), and launches them through ctypes.

A module is the source text unchanged, with cuda_shim.h in front and, after it, the
scheduler and one launch entry per name expression (a C++ expression naming one kernel, as
CuPy's ``name_expressions``). Libraries are cached under ``build/`` by the hash of everything
that goes into them (text, flags, compiler), so a test session compiles each module once and
later sessions not at all.

Compiled in two steps on purpose: the objects are instrumented with ``-fsanitize=alignment``
but the library links no sanitizer runtime; emu_runtime.h's own handler turns a misaligned
access into a fault of the launch instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_DIR = Path(os.environ.get("HPS_EMU_BUILD_DIR", HERE / "build"))
COMPILER = os.environ.get("HPS_EMU_CXX", "g++")
#: -ffp-contract=off: no FMA fusion (the kernels' __fmul_rn/__fadd_rn promise separate
#: roundings); -fno-strict-aliasing: the kernels reinterpret row bytes as floats and words,
#: which NVCC compiles as meant and GCC's type-based alias analysis could reorder.
FLAGS = ("-std=c++17", "-O2", "-g", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-strict-aliasing",
         "-fvisibility=hidden", "-fsanitize=alignment", "-Wno-attributes")
HEADERS = ("cuda_shim.h", "emu_runtime.h")
#: HPS_EMU_SANITIZER=address or thread: every module built with that sanitizer (a process
#: that loads one must have its runtime LD_PRELOADed: see test_sanitizers.py). The flags are
#: part of the cache key, so these libraries sit beside the plain ones.
SANITIZER = os.environ.get("HPS_EMU_SANITIZER", "")
_SANITIZE_FLAGS = {"": (), "address": ("-fsanitize=address", "-fno-omit-frame-pointer"),
                   "thread": ("-fsanitize=thread",)}
if SANITIZER not in _SANITIZE_FLAGS:
    raise RuntimeError(f"HPS_EMU_SANITIZER={SANITIZER!r}: expected address or thread")
FLAGS += _SANITIZE_FLAGS[SANITIZER]


class BuildError(RuntimeError):
    """The compiler refused a module; the message holds its diagnostics."""


def translation_unit(code: str, expressions: Sequence[str]) -> str:
    lines = ['#include "cuda_shim.h"', "#line 1 \"kernels.cu\"", code, '#include "emu_runtime.h"',
             "HPS_EMU_TABLE_BEGIN"]
    lines += [f"HPS_EMU_KERNEL({expr})" for expr in expressions]
    lines.append("HPS_EMU_TABLE_END")
    return "\n".join(lines) + "\n"


_compiler_ids: dict[str, str] = {}


def _compiler_id() -> str:
    if COMPILER not in _compiler_ids:
        out = subprocess.run([COMPILER, "--version"], capture_output=True, text=True, check=True).stdout
        _compiler_ids[COMPILER] = out.splitlines()[0]
    return _compiler_ids[COMPILER]


def library_path(code: str, expressions: Sequence[str], extra_flags: Sequence[str] = ()) -> Path:
    """Where the library of ``code`` with kernels ``expressions`` is (or will be) cached."""
    digest = hashlib.sha256()
    for part in (translation_unit(code, expressions), " ".join((*FLAGS, *extra_flags)), _compiler_id(),
                 *((HERE / h).read_text() for h in HEADERS)):
        digest.update(part.encode())
        digest.update(b"\0")
    return BUILD_DIR / f"emu-{digest.hexdigest()[:24]}.so"


def build(code: str, expressions: Sequence[str], extra_flags: Sequence[str] = ()) -> Path:
    """The cached library of ``code`` with one launch entry per name expression (compiled now
    if needed). Raises BuildError with the compiler's messages."""
    target = library_path(code, expressions, extra_flags)
    if target.exists():
        return target
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
        source, obj, lib = Path(tmp) / "module.cpp", Path(tmp) / "module.o", Path(tmp) / "module.so"
        source.write_text(translation_unit(code, expressions))
        steps = ([COMPILER, *FLAGS, *extra_flags, f"-I{HERE}", "-c", str(source), "-o", str(obj)],
                 [COMPILER, "-shared", "-pthread", *_SANITIZE_FLAGS[SANITIZER], *extra_flags, str(obj), "-o", str(lib)])
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise BuildError(f"{' '.join(cmd)}\n{proc.stderr[-20000:]}")
        os.replace(lib, target)  # atomic: a concurrent build of the same module is harmless
    return target


@dataclass(frozen=True)
class Param:
    """A kernel parameter: a pointer to elements of ``kind``/``size`` (``pointer``), or a value."""

    pointer: bool
    kind: str  # i, u, f, b; v (void pointee); s (a struct by value)
    size: int

    @classmethod
    def parse(cls, code: str) -> Param:
        pointer = code.startswith("P")
        body = code[1:] if pointer else code
        return cls(pointer, body[0], int(body[1:] or 0))

    def __str__(self) -> str:
        return f"{'pointer to ' if self.pointer else ''}{self.kind}{self.size}"


class KernelFault(RuntimeError):
    """A launch that would fault, hang or misbehave on a GPU: diverged warp intrinsics, a
    deadlock, a misaligned access, a write past an argument's allocation, an argument that
    does not match its parameter. Nothing in hps_core catches it."""


class Library:
    """A loaded module: its kernels' signatures, and a synchronous launch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self._lib.hps_emu_kernel_name.restype = ctypes.c_char_p
        self._lib.hps_emu_kernel_signature.restype = ctypes.c_char_p
        self._lib.hps_emu_launch.argtypes = [ctypes.c_int, *[ctypes.c_uint] * 6, ctypes.POINTER(ctypes.c_void_p),
                                             ctypes.c_char_p, ctypes.c_int]
        self.kernels: dict[str, tuple[int, tuple[Param, ...]]] = {}
        for i in range(self._lib.hps_emu_kernel_count()):
            name = self._lib.hps_emu_kernel_name(i).decode()
            sig = self._lib.hps_emu_kernel_signature(i).decode()
            self.kernels[name] = (i, tuple(Param.parse(c) for c in sig.split(",")) if sig else ())

    def launch(self, name: str, grid: tuple[int, int, int], block: tuple[int, int, int],
               arg_bytes: Sequence[ctypes.Array[ctypes.c_char]]) -> None:
        """Runs kernel ``name`` to completion; ``arg_bytes`` holds each parameter's value.
        Releases the GIL (ctypes does), so launches from several Python threads overlap."""
        index, _ = self.kernels[name]
        args = (ctypes.c_void_p * max(1, len(arg_bytes)))(*[ctypes.addressof(a) for a in arg_bytes])
        error = ctypes.create_string_buffer(1 << 16)
        if self._lib.hps_emu_launch(index, *grid, *block, args, error, len(error)):
            raise KernelFault(f"{name}: {error.value.decode(errors='replace')}")


_libraries: dict[Path, Library] = {}
_lock = threading.Lock()


def load(code: str, expressions: Sequence[str], extra_flags: Sequence[str] = ()) -> Library:
    """The loaded library of ``code`` with ``expressions`` (built and loaded once per process)."""
    path = build(code, expressions, extra_flags)
    with _lock:
        if path not in _libraries:
            _libraries[path] = Library(path)
        return _libraries[path]
