"""Every CUDA source in ``kernels/gpu`` compiles with nvcc for Hopper and for Ampere.

Two builds per source, each for sm_90 (Hopper) and sm_80 (Ampere; the kernels need sm_70
or newer for ``__match_any_sync``) with ``--fmad=false`` and warnings as errors:
the file as it stands (float32 values, int32 indices, ``#include "common.cuh"``), and the
exact text the CuPy runtime hands to NVRTC (header inlined) for float64 values and int64
indices.  Object files go to a temporary directory; nothing is linked or run.  Skipped
where nvcc is absent.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc")
GPU_DIR = Path(__file__).resolve().parent.parent / "kernels" / "gpu"
SOURCES = sorted(path.stem for path in GPU_DIR.glob("*.cu"))
ARCH_FLAGS = [
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_80,code=sm_80",
]

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


def _launch_logic():
    """``kernels/gpu/_kernels.py`` loaded by path (the package itself imports CuPy)."""
    spec = importlib.util.spec_from_file_location("_nvcc_test_kernels", GPU_DIR / "_kernels.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nvcc_command(source: Path, output: Path, defines: list[str]) -> list[str]:
    return [
        NVCC,
        "-c",
        "--fmad=false",
        "--Werror",
        "all-warnings",
        *ARCH_FLAGS,
        *defines,
        str(source),
        "-o",
        str(output),
    ]


def test_sources_found():
    expected = {
        "topk",
        "quantize",
        "packing",
        "sparse",
        "reduce",
        "random",
        "elementwise",
        "convert",
    }
    assert expected <= set(SOURCES)


@pytest.mark.parametrize("name", SOURCES)
def test_compiles_for_sm90_and_sm80(name, tmp_path):
    import numpy as np

    kernels = _launch_logic()
    inlined = tmp_path / f"{name}_inlined.cu"
    inlined.write_text(kernels.source_text(name))
    assert '#include "common.cuh"' not in inlined.read_text()
    wide = kernels.compile_defines(np.dtype(np.float64), np.dtype(np.int64))
    builds = [
        (GPU_DIR / f"{name}.cu", tmp_path / f"{name}_f32.o", []),  # the file as it stands
        (inlined, tmp_path / f"{name}_f64.o", wide),  # what the runtime hands to NVRTC
    ]
    # The two builds run side by side: nvcc is mostly single-threaded.
    running = [
        (
            subprocess.Popen(
                _nvcc_command(*build), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            ),
            build,
        )
        for build in builds
    ]
    for process, (source, output, defines) in running:
        log, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{' '.join(_nvcc_command(source, output, defines))}\n{log}"
        assert output.stat().st_size > 0
