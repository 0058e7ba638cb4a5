"""Every kernel family compiles with nvcc to PTX: the very text the loader
(hps_core/cache/_kernels.py) hands NVRTC (common.cuh and row_formats.cuh inlined),
standalone and with every template instantiation the loader can ask for. Row formats are
dispatched at run time per table, so every instantiation of a row kernel holds the paths of
every format (fp32, fp16, fp8, int8), and compiling the instantiations compiles them all;
the PTX is checked to hold them and to do their float32 arithmetic as row_formats.py does
(rounded division, no fused multiply-add, no fp16/fp8 conversion instruction).

This runs in CI without a GPU: it catches syntax and template errors before a GPU ever
sees the code. Skipped only when nvcc is absent (the source checks run regardless).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hps_core.cache import _kernels

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: cannot compile the kernels to PTX")
FAMILIES = sorted(_kernels.FAMILIES)


def nvcc_ptx(text: str, tmp_path: Path) -> str:
    """PTX of ``text`` compiled alone in an empty folder (no -I: nothing to include)."""
    source, out = tmp_path / "kernels.cu", tmp_path / "kernels.ptx"
    source.write_text(text)
    cmd = [str(NVCC), "-ptx", "-arch=sm_90", *_kernels.COMPILE_OPTIONS, "-diag-suppress", "550",
           "-o", str(out), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    return out.read_text()


def test_every_source_is_in_a_family() -> None:
    sources = {p.name for p in _kernels.kernel_dir().glob("*.cu")}
    assert sources and sources == {f.source for f in _kernels.FAMILIES.values()}


#: The headers each family includes (row_formats.cuh: the families that store rows).
INCLUDES = {"dynamic": _kernels.HEADERS, "static": _kernels.HEADERS, "rows": (_kernels.HEADER,)}


@pytest.mark.parametrize("family", FAMILIES)
def test_loader_source_inlines_the_headers(family: str) -> None:
    """CuPy caches compiled kernels by source text: the headers must be in that text."""
    text = _kernels.source(family)
    assert not [line for line in text.splitlines() if line.lstrip().startswith("#include")]
    for header in INCLUDES[family]:
        assert (_kernels.kernel_dir() / header).read_text().rstrip("\n") in text, header
    assert set(INCLUDES) == set(FAMILIES)


@pytest.mark.parametrize("header", _kernels.HEADERS)
def test_a_header_change_changes_every_source_that_includes_it(header: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "kernels"
    shutil.copytree(_kernels.kernel_dir(), copy)
    before = {family: _kernels.source(family) for family in FAMILIES}
    monkeypatch.setattr(_kernels, "kernel_dir", lambda: copy)
    (copy / header).write_text((copy / header).read_text() + "// edited\n")
    for family in FAMILIES:
        assert (_kernels.source(family) != before[family]) == (header in INCLUDES[family]), family


def test_every_shape_a_cache_can_ask_for_is_compiled_below() -> None:
    variants = {(vec, nv) for _, _, vec, nv in _kernels.all_variants()}
    for dim in range(1, _kernels.MAX_GPU_DIM + 1):
        for dims in ([dim], [dim, 4 * dim], [dim, 2]):
            if max(dims) <= _kernels.MAX_GPU_DIM:
                assert set(_kernels.vector_shapes(dims).items()) <= variants, dims


@needs_nvcc
@pytest.mark.parametrize("family", FAMILIES)
def test_source_compiles_standalone(family: str, tmp_path: Path) -> None:
    nvcc_ptx(_kernels.source(family), tmp_path)


@needs_nvcc
@pytest.mark.parametrize("family", FAMILIES)
def test_every_loader_instantiation_compiles(family: str, tmp_path: Path) -> None:
    """The loader's source plus a table taking the address of every kernel the loader can
    request (the name expressions it hands to cupy.RawModule), forcing each instantiation."""
    names = sorted({name for fam, kdt, vec, nv in _kernels.all_variants() if fam == family
                    for name in _kernels.kernel_names(fam, kdt, {vec: nv}).expressions()})
    body = ",\n".join(f"    (const void*)&{name}" for name in names)
    ptx = nvcc_ptx(f"{_kernels.source(family)}\nconst void* hps_kernels[] = {{\n{body}\n}};\n", tmp_path)
    assert ptx.count(".entry") >= len(names), "an instantiation is missing from the PTX"
    fam, shapes = _kernels.FAMILIES[family], len({(vec, nv) for *_, vec, nv in _kernels.all_variants()})
    key_types = 2
    assert len(names) == (len(fam.row_kernels) * key_types * shapes + len(fam.shape_kernels) * shapes
                          + len(fam.vec_kernels) * 3 + len(fam.key_kernels) * 2 + len(fam.plain_kernels))
    if INCLUDES[family] == _kernels.HEADERS:
        check_format_arithmetic(ptx)


def check_format_arithmetic(ptx: str) -> None:
    """The row-format paths are in the PTX and round as row_formats.py does: IEEE division
    (div.rn), rintf as cvt.rni, no fused multiply-add (a fused int8 dequantisation would
    differ from the CPU's separate multiply and add), no fp16/fp8 conversion instruction
    (rounding is done on the bits, the same on every GPU generation)."""
    assert "div.rn.f32" in ptx and "cvt.rni.f32.f32" in ptx
    assert "fma.rn.f32" not in ptx and "mad.f32" not in ptx
    assert not re.search(r"cvt\.[a-z.]*(f16|e4m3|e5m2|bf16)", ptx), "a hardware fp16/fp8 conversion"
    assert "shfl.sync.bfly" in ptx  # the warp reduction of a row's header


def test_benchmark_gather_kernel_compiles(tmp_path: Path) -> None:
    """The plain-gather ceiling the benchmarks load (scripts/kernels/gather.cu)."""
    source = Path(__file__).resolve().parents[3] / "scripts" / "kernels" / "gather.cu"
    assert ".entry gather" in nvcc_ptx(source.read_text(), tmp_path)
