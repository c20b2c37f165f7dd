"""The NVRTC build the CuPy runtime uses: IEEE float32 (no flush-to-zero), no FMA.

CuPy's own ``RawModule(code=...)`` forces ``-ftz=true``, which would flush float32
subnormals and break bitwise equality with the CPU; ``kernels/cuda/nvrtc.py`` compiles
with ``-ftz=false -fmad=false``.  This test inspects the PTX of every source in both
dtype variants.  It needs CuPy's NVRTC bindings and libnvrtc, not a GPU.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("cupy", reason="CuPy not installed")
from cupy.cuda import nvrtc  # noqa: E402

try:
    nvrtc.getVersion()
except Exception as error:  # noqa: BLE001 - libnvrtc missing
    pytest.skip(f"NVRTC unavailable ({error})", allow_module_level=True)

from sparcomm.kernels import cuda as kernels  # noqa: E402
from sparcomm.kernels.cuda import nvrtc as build  # noqa: E402

SOURCES = sorted(p.stem for p in kernels.SOURCE_DIR.glob("*.cu"))
VARIANTS = [(np.float32, np.int32), (np.float64, np.int64)]


@pytest.mark.parametrize("name", SOURCES)
@pytest.mark.parametrize("real, index", VARIANTS, ids=["f32", "f64"])
def test_ptx_has_no_ftz_and_no_fma(name, real, index):
    defines = kernels.compile_defines(np.dtype(real), np.dtype(index))
    ptx, kind = build.compile_source(kernels.source_text(name), name, defines, 90, kind="ptx")
    text = ptx.decode()
    assert kind == "ptx" and ".target sm_90" in text
    assert not re.search(r"\.ftz\b", text), "flush-to-zero instruction in the PTX"
    assert not re.search(r"\bfma\.", text), "fused multiply-add in the PTX"
    for kernel in re.findall(r'extern "C" __global__ void (\w+)\(', kernels.source_text(name)):
        assert f".entry {kernel}(" in text


def test_cupy_rawmodule_default_would_flush(tmp_path):
    # The reason for nvrtc.py: with CuPy's appended -ftz=true the PTX flushes.
    text = kernels.source_text("quantize")
    program = nvrtc.createProgram(text, "quantize.cu", (), ())
    try:
        nvrtc.compileProgram(program, ("-fmad=false", "-arch=compute_90", "-ftz=true"))
        ptx = nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    assert re.search(r"\.ftz\b", ptx.decode() if isinstance(ptx, bytes) else ptx)


def test_build_caches_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARCOMM_KERNEL_CACHE", str(tmp_path))
    defines = kernels.compile_defines(np.dtype(np.float32), np.dtype(np.int32))
    first = build.build(kernels.source_text("random"), "random", defines, 80)
    assert first.parent == tmp_path and first.suffix == ".cubin" and first.stat().st_size > 0
    stamp = first.stat().st_mtime_ns
    assert build.build(kernels.source_text("random"), "random", defines, 80) == first
    assert first.stat().st_mtime_ns == stamp  # not rebuilt
    other = build.build(kernels.source_text("random") + "\n", "random", defines, 80)
    assert other != first


def test_compile_error_shows_the_log():
    with pytest.raises(RuntimeError, match="NVRTC failed to compile kernels/cuda/broken.cu"):
        build.compile_source("this is not CUDA", "broken", [], 90)


def test_old_devices_are_refused_clearly():
    with pytest.raises(RuntimeError, match="compute capability 7.0 or newer, got 6.1"):
        build.target(61)
