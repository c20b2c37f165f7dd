"""Every CUDA source in ``kernels/cuda`` compiles with nvcc for Hopper and for Ampere.

Two builds per source, each for sm_90 (Hopper) and sm_80 (Ampere; the kernels need sm_70
or newer for ``__match_any_sync``) with ``--fmad=false`` and warnings as errors:
the file as it stands (float32 values, int32 indices, ``#include "common.cuh"``), and the
exact text the CuPy runtime hands to NVRTC (header inlined) for float64 values and int64
indices.  Object files go to a temporary directory; nothing is linked or run.  Skipped
where nvcc is absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from sparcomm.kernels import cuda

NVCC = shutil.which("nvcc")
SOURCES = sorted(path.stem for path in cuda.SOURCE_DIR.glob("*.cu"))
ARCH_FLAGS = [
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_80,code=sm_80",
]

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


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
    # One source per kernel family (kernels/_checks.py FAMILIES), nothing else.
    assert set(SOURCES) == set(cuda.FAMILIES.values())


@pytest.mark.parametrize("name", SOURCES)
def test_compiles_for_sm90_and_sm80(name, tmp_path):
    import numpy as np

    kernels = cuda
    inlined = tmp_path / f"{name}_inlined.cu"
    inlined.write_text(kernels.source_text(name))
    assert '#include "common.cuh"' not in inlined.read_text()
    wide = kernels.compile_defines(np.dtype(np.float64), np.dtype(np.int64))
    builds = [
        (cuda.SOURCE_DIR / f"{name}.cu", tmp_path / f"{name}_f32.o", []),  # the file as it stands
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
