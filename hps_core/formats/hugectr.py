"""HugeCTR sparse model folders: ``key`` + ``emb_vector``.

A HugeCTR sparse model (``sparse_files[i]`` in the HPS JSON) is a folder holding two raw
little-endian files with no header (HugeCTR ``src/hps/modelloader.cpp``, ``RawModelLoader``):

- ``key``:        n × int64, the row keys (HugeCTR writes int64 even for 32-bit key models
  and narrows to uint32 when it loads them);
- ``emb_vector``: n × dim × float32, the rows in key order, row-major.

The width ``dim`` is not stored; it comes from ``embedding_vecsize_per_table`` (or is
inferred as ``size(emb_vector) / 4 / n``). Other files HugeCTR may leave there (``meta``,
``slot_id``) are ignored.

Reads memory-map the files, so opening a terabyte table costs nothing until rows are touched;
:func:`iter_sparse_model_chunks` streams a table in bounded pieces. Writes go to temporary
names in the same folder and are renamed into place (``emb_vector`` first, then ``key``), so a
reader sees either the old or the new file, never a partial one.

Duplicate keys: one rule everywhere, each key appears once in a table file. HugeCTR does not
check (its tiers keep the last row of a key, its embedding cache warm-up the first of the leading
rows), and here "last wins" would not hold either: a tier loading a leading share
(``initial_cache_rate``) or a cache warmed from the first rows keeps another row than a tier
loading the whole file, so one key would answer differently by tier. So the writer refuses
duplicates, ``hps publish-model`` refuses a table with them, and every load that writes rows
(``hps load``, a server's start: :func:`hps_core.loader.load_table`) refuses a file whose loaded
rows repeat a key before writing any, all through :func:`check_unique_keys` (FormatError naming
the file, the count and one repeated key). Plain reads do not check (a sort of the keys; pass
``check_unique=True`` to ask for it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from hps_core.errors import FormatError
from hps_core.row_formats import non_finite_rows

__all__ = [
    "EMB_VECTOR_FILE",
    "KEY_FILE",
    "Chunk",
    "SparseTable",
    "first_non_finite",
    "iter_sparse_model_chunks",
    "read_sparse_model",
    "sparse_model_rows",
    "stream_sparse_model",
    "write_sparse_model",
]

KEY_FILE = "key"
EMB_VECTOR_FILE = "emb_vector"
KEY_DTYPE = np.dtype("<i8")
VECTOR_DTYPE = np.dtype("<f4")


@dataclass(frozen=True, eq=False)
class SparseTable:
    """An embedding table in host memory (possibly memory-mapped, then read-only).

    keys:    (n,) int64, host
    vectors: (n, dim) float32, host, C-contiguous; row i belongs to keys[i]
    """

    keys: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        if self.keys.ndim != 1 or self.keys.dtype != np.int64:
            raise FormatError(f"SparseTable.keys must be 1-D int64, got {self.keys.dtype} "
                              f"with shape {self.keys.shape}")
        if self.vectors.ndim != 2 or self.vectors.dtype != np.float32:
            raise FormatError(f"SparseTable.vectors must be 2-D float32, got "
                              f"{self.vectors.dtype} with shape {self.vectors.shape}")
        if self.vectors.shape[0] != self.keys.shape[0]:
            raise FormatError(f"SparseTable has {self.keys.shape[0]} keys but "
                              f"{self.vectors.shape[0]} vectors")

    @property
    def dim(self) -> int:
        """Floats per row."""
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.keys.shape[0])


# --------------------------------------------------------------------------------------------
# Validation shared with hps_core.formats.tables.
# --------------------------------------------------------------------------------------------
def as_keys(keys: Any, what: str) -> npt.NDArray[np.int64]:
    """``keys`` as a 1-D int64 array (memory maps kept); FormatError naming ``what`` otherwise."""
    arr: npt.NDArray[Any] = np.asanyarray(keys)
    if arr.ndim != 1:
        raise FormatError(f"{what}: keys must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.int64:
        return arr
    if arr.dtype.kind not in "iu":
        if arr.size == 0:
            return np.empty(0, dtype=np.int64)
        raise FormatError(f"{what}: keys must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise FormatError(f"{what}: key {int(arr.max())} does not fit int64 (HugeCTR keys "
                          "are signed 64-bit)")
    return arr.astype(np.int64)


def as_vectors(vectors: Any, n: int, what: str) -> npt.NDArray[np.float32]:
    """``vectors`` as a C-contiguous (n, dim) float32 array (memory maps kept when no
    conversion is needed); FormatError otherwise."""
    arr = np.asanyarray(vectors)
    if arr.ndim != 2:
        raise FormatError(f"{what}: vectors must be 2-D (rows, dim), got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise FormatError(f"{what}: vectors must be floating point, got dtype {arr.dtype}")
    if arr.shape[0] != n:
        raise FormatError(f"{what}: {n} keys but {arr.shape[0]} vector rows; give one row "
                          "per key")
    if arr.shape[1] < 1:
        raise FormatError(f"{what}: vectors have width 0; the embedding dim must be >= 1")
    return np.require(arr, dtype=np.float32, requirements="C")


def check_dim(dim: int | None, what: str) -> None:
    """FormatError unless ``dim`` is None or a positive int."""
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer))
                            or dim < 1):
        raise FormatError(f"{what}: dim must be a positive integer, got {dim!r}")


#: Most keys check_unique_keys sorts at once (256 MiB of int64): its memory, whatever the table's size.
UNIQUE_CHECK_KEYS = 1 << 25
_SCAN_KEYS = 1 << 20  # keys read at a time from a (memory-mapped) key array
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top bits of key * this pick a group


def check_unique_keys(keys: npt.NDArray[np.int64], what: str) -> None:
    """FormatError naming the count of duplicates and the smallest repeated key, if ``keys``
    ((n,) int64, host; a memory map is read in pieces of a million keys, never copied whole)
    holds a key twice; ``what`` names the file and table in front of the message.

    Cost, vectorised: a first piece tells whether the keys are strictly increasing (a written
    table often is: then a pass over them says they are unique, nothing is sorted); otherwise
    a sorted copy, of at most :data:`UNIQUE_CHECK_KEYS` keys at a time: more keys are split by
    a hash of the key into 2^k groups of about that size (a repeated key falls in one group),
    each found by one more read of the keys. The count is of rows whose key an earlier row has.
    """
    n = int(keys.shape[0])
    if n < 2 or _strictly_increasing(keys):
        return
    groups = 1 << max(0, (n - 1) // UNIQUE_CHECK_KEYS).bit_length()
    duplicates, example = 0, None
    for group in range(groups):
        part = np.array(keys, dtype=np.int64) if groups == 1 else _hash_group(keys, group, groups)
        part.sort()
        repeated = part[1:][part[1:] == part[:-1]]
        duplicates += int(repeated.shape[0])
        if repeated.shape[0] and (example is None or int(repeated[0]) < example):
            example = int(repeated[0])
    if duplicates:
        raise FormatError(f"{what}: {duplicates} duplicate key(s), e.g. {example}; each key may appear once "
                          "in a table (a tier would keep one row of the key, another tier or the cache "
                          "another): write the table again without the repeated rows")


def _strictly_increasing(keys: npt.NDArray[np.int64]) -> bool:
    """Whether ``keys`` are strictly increasing, read piece by piece (the first piece out of
    order ends it: unordered keys cost one piece)."""
    n = int(keys.shape[0])
    for lo in range(0, n - 1, _SCAN_KEYS):
        piece = np.asarray(keys[lo:min(lo + _SCAN_KEYS + 1, n)])  # one key of overlap with the next
        if not (piece[1:] > piece[:-1]).all():
            return False
    return True


def _hash_group(keys: npt.NDArray[np.int64], group: int, groups: int) -> npt.NDArray[np.int64]:
    """A copy of the keys whose hash falls in ``group`` of ``groups`` (a power of two)."""
    shift = np.uint64(64 - (groups.bit_length() - 1))
    found = []
    for lo in range(0, int(keys.shape[0]), _SCAN_KEYS):
        piece = np.ascontiguousarray(keys[lo:lo + _SCAN_KEYS], dtype=np.int64)
        found.append(piece[((piece.view(np.uint64) * _GOLDEN) >> shift) == np.uint64(group)])
    return np.concatenate(found)


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# HugeCTR folders.
# --------------------------------------------------------------------------------------------
def _files(folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    root = Path(folder)
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise FormatError(f"sparse model {root} {problem}; a HugeCTR sparse model is a folder "
                          f"with files '{KEY_FILE}' and '{EMB_VECTOR_FILE}' (check sparse_files "
                          "in the HPS JSON)")
    key_file, vec_file = root / KEY_FILE, root / EMB_VECTOR_FILE
    for path in (key_file, vec_file):
        if not path.is_file():
            raise FormatError(f"sparse model {root}: file '{path.name}' is missing; a HugeCTR "
                              f"sparse model folder holds '{KEY_FILE}' (int64) and "
                              f"'{EMB_VECTOR_FILE}' (float32)")
    return key_file, vec_file


def sparse_model_rows(folder: str | os.PathLike[str], dim: int | None = None
                      ) -> tuple[int, int]:
    """``(rows, dim)`` of a sparse model folder, from file sizes alone; checks consistency."""
    check_dim(dim, f"sparse model {folder}")
    key_file, vec_file = _files(folder)
    key_bytes, vec_bytes = key_file.stat().st_size, vec_file.stat().st_size
    if key_bytes % KEY_DTYPE.itemsize:
        raise FormatError(f"{key_file}: size {key_bytes} bytes is not a multiple of 8; the key "
                          "file holds int64 keys (truncated or not a HugeCTR key file)")
    n = key_bytes // KEY_DTYPE.itemsize
    if vec_bytes % VECTOR_DTYPE.itemsize:
        raise FormatError(f"{vec_file}: size {vec_bytes} bytes is not a multiple of 4; the file "
                          "holds float32 values (truncated?)")
    floats = vec_bytes // VECTOR_DTYPE.itemsize
    if dim is None:
        if n == 0:
            if floats:
                raise FormatError(f"{vec_file}: {floats} floats but '{KEY_FILE}' is empty")
            raise FormatError(f"sparse model {folder} is empty, so its dim cannot be inferred; "
                              "pass dim (embedding_vecsize_per_table)")
        if floats % n or floats == 0:
            raise FormatError(f"{vec_file}: {floats} floats is not a whole number of rows for "
                              f"{n} keys (size {vec_bytes} bytes); the file is truncated or "
                              "does not belong to this key file")
        return n, floats // n
    if floats != n * dim:
        inferred = f" (it holds {floats / n:g} floats per key)" if n else ""
        raise FormatError(f"{vec_file}: size {vec_bytes} bytes, expected {n * dim * 4} bytes = "
                          f"{n} keys x dim {dim} x 4{inferred}; check "
                          "embedding_vecsize_per_table for this table, or the file is truncated")
    return n, int(dim)


def read_sparse_model(folder: str | os.PathLike[str], dim: int | None = None, *,
                      check_unique: bool = False) -> SparseTable:
    """Memory-map a HugeCTR sparse model folder (read-only arrays).

    ``dim`` None infers the width from the file sizes; given, the sizes must match exactly.
    ``check_unique`` additionally rejects repeated keys (costs a sort of the keys).
    """
    n, width = sparse_model_rows(folder, dim)
    key_file, vec_file = _files(folder)
    if n == 0:
        keys = np.empty(0, dtype=np.int64)
        vectors = np.empty((0, width), dtype=np.float32)
    else:
        keys = np.memmap(key_file, dtype=KEY_DTYPE, mode="r", shape=(n,))
        vectors = np.memmap(vec_file, dtype=VECTOR_DTYPE, mode="r", shape=(n, width))
    if check_unique:
        check_unique_keys(keys, f"sparse model {folder}")
    return SparseTable(keys=keys, vectors=vectors)


def iter_sparse_model_chunks(folder: str | os.PathLike[str], dim: int | None,
                             chunk_rows: int) -> Iterator[SparseTable]:
    """Yield consecutive row ranges of at most ``chunk_rows`` rows (memory-mapped views)."""
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) \
            or chunk_rows < 1:
        raise FormatError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    table = read_sparse_model(folder, dim)
    for start in range(0, len(table), int(chunk_rows)):
        stop = start + int(chunk_rows)
        yield SparseTable(keys=table.keys[start:stop], vectors=table.vectors[start:stop])


#: One chunk of a table streamed in: (its first row in the file, keys int64 (n,), vectors
#: float32 (n, dim) C-contiguous, the index in the chunk of its first row holding a NaN or an
#: infinity or -1): every load checks rows coming in (row_formats.non_finite_rows).
Chunk = tuple[int, npt.NDArray[np.int64], npt.NDArray[np.float32], int]


def stream_sparse_model(folder: str | os.PathLike[str], dim: int, start: int, stop: int,
                        chunk_rows: int) -> Iterator[Chunk]:
    """Rows ``[start, stop)`` of a sparse model folder as :data:`Chunk` s of at most
    ``chunk_rows`` rows, read with plain reads into two pairs of buffers that take turns (a
    chunk is valid until the next but one is asked for): a load's memory is two chunks whatever
    the table's size, where slicing a memory map leaves every page read counted in the
    process's resident set. The next chunk is read, and checked for non-finite rows, by a
    thread while the caller writes this one (reads and NumPy's sums release the GIL)."""
    n, width = sparse_model_rows(folder, dim)
    stop = min(stop, n)
    if start >= stop:
        return
    key_file, vec_file = _files(folder)
    rows = min(int(chunk_rows), stop - start)
    buffers = [(np.empty(rows, KEY_DTYPE), np.empty((rows, width), VECTOR_DTYPE)) for _ in range(2)]
    firsts = list(range(start, stop, rows))
    with open(key_file, "rb", buffering=0) as kf, open(vec_file, "rb", buffering=0) as vf, \
            ThreadPoolExecutor(1, thread_name_prefix="hps-read") as reader:
        kf.seek(start * KEY_DTYPE.itemsize)
        vf.seek(start * width * VECTOR_DTYPE.itemsize)

        def read(k: int) -> Chunk:
            count = min(rows, stop - firsts[k])
            keys, vectors = buffers[k % 2]
            _read_exactly(kf, keys[:count], key_file)
            _read_exactly(vf, vectors[:count], vec_file)
            return firsts[k], keys[:count], vectors[:count], first_non_finite(vectors[:count])

        ahead = reader.submit(read, 0)
        for k in range(len(firsts)):
            chunk = ahead.result()
            if k + 1 < len(firsts):
                ahead = reader.submit(read, k + 1)
            yield chunk


def first_non_finite(vectors: npt.NDArray[np.float32]) -> int:
    """The index of the first row of ``vectors`` holding a NaN or an infinity, -1 when none."""
    bad = non_finite_rows(vectors)
    return int(bad[0]) if bad.size else -1


def _read_exactly(fh: Any, into: npt.NDArray[Any], path: Path) -> None:
    view = into.data.cast("B")  # into is C-contiguous: a slice of leading rows
    got = 0
    while got < view.nbytes:
        read = fh.readinto(view[got:])
        if not read:
            raise FormatError(f"{path}: the file ended early (truncated while being read?)")
        got += read


def write_sparse_model(folder: str | os.PathLike[str], keys: Any, vectors: Any) -> None:
    """Write ``keys`` (n,) and ``vectors`` (n, dim) as a HugeCTR sparse model folder.

    Creates the folder if needed. Keys must be unique integers that fit int64; vectors are
    stored as float32. Each file is replaced atomically.
    """
    root = Path(folder)
    what = f"sparse model {root}"
    key_arr = as_keys(keys, what)
    vec_arr = as_vectors(vectors, key_arr.shape[0], what)
    check_unique_keys(key_arr, what)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / EMB_VECTOR_FILE, lambda tmp: vec_arr.astype(VECTOR_DTYPE,
                                                                     copy=False).tofile(tmp))
    atomic_write(root / KEY_FILE, lambda tmp: key_arr.astype(KEY_DTYPE, copy=False).tofile(tmp))
