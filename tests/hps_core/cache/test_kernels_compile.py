"""Every kernel source compiles with nvcc to PTX, standalone and with every template
instantiation the loader (hps_core/cache/_kernels.py) can ask NVRTC for.

This runs in CI without a GPU: it catches syntax and template errors before a GPU ever
sees the code. Skipped only when nvcc is absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hps_core.cache import _kernels

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: cannot compile the kernels to PTX")
SOURCES = sorted(p.name for p in _kernels.kernel_dir().glob("*.cu"))


def nvcc_ptx(source: Path, out: Path) -> None:
    cmd = [str(NVCC), "-ptx", "-arch=sm_90", *_kernels.COMPILE_OPTIONS, f"-I{_kernels.kernel_dir()}",
           "-diag-suppress", "550", "-o", str(out), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"


def test_every_source_is_in_a_family() -> None:
    assert SOURCES and set(SOURCES) == {f[0] for f in _kernels.FAMILIES.values()}


@pytest.mark.parametrize("source", SOURCES)
def test_source_compiles_standalone(source: str, tmp_path: Path) -> None:
    nvcc_ptx(_kernels.kernel_dir() / source, tmp_path / "out.ptx")


@pytest.mark.parametrize("family", sorted(_kernels.FAMILIES))
def test_every_loader_instantiation_compiles(family: str, tmp_path: Path) -> None:
    """A translation unit that takes the address of every kernel the loader can request
    (the same name expressions it hands to cupy.RawModule), forcing each instantiation."""
    names = sorted({name for fam, kdt, vdt, vec, nv in _kernels.all_variants() if fam == family
                    for name in _kernels.name_expressions(fam, kdt, vdt, vec, nv)})
    source = _kernels.FAMILIES[family][0]
    body = ",\n".join(f"    (const void*)&{name}" for name in names)
    tu = tmp_path / "instantiate.cu"
    tu.write_text(f'#include "{source}"\nconst void* hps_kernels[] = {{\n{body}\n}};\n')
    ptx = tmp_path / "instantiate.ptx"
    nvcc_ptx(tu, ptx)
    text = ptx.read_text()
    templated = [n for n in names if "<" in n]
    assert text.count(".entry") >= len(names), "an instantiation is missing from the PTX"
    assert len(templated) > 10
