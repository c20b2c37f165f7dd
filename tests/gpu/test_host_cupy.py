"""The CuPy code paths of sparcomm, run without a GPU: host CuPy double + CUDA emulator.

The GPU test files (codecs, staging, kernels, collectives, GPU import) run in a child
pytest with ``tests/gpu/_host_cupy`` -- a strict test double of CuPy that computes
nothing on a GPU -- first on ``PYTHONPATH`` and ``SPARCOMM_TEST_HOST_CUPY=1``, which
makes ``_gpu_skip.require_gpu`` bind ``sparcomm.kernels.gpu`` to the host CUDA emulator
(``_gpu_emulator.HostCupyRuntime``).  So every line of sparcomm that handles a
``cupy.ndarray`` runs here, with CuPy's rules on host/device mixing enforced; what it
cannot check is device arithmetic and speed (``_host_cupy/cupy/__init__.py`` says what
the double does not model).

The collectives also run with CuPy inputs on 3 ranks under ``mpiexec``
(``_host_cupy_ranks.py``: staged through pinned memory, as with the ``mpich`` wheel),
and the dense path once more on 2 ranks through a simulated CUDA-aware MPI.

Skipped where g++ is missing (no emulator), and where a real CuPy with a device is
installed: there the GPU test files run for real instead.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import _mpiexec  # tests/_mpiexec.py (tests/ is on sys.path through tests/conftest.py)
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FILES = [
    "test_host_cupy_strict.py",
    "test_codecs_gpu.py",
    "test_staging.py",
    "test_kernels.py",
    "test_collectives_gpu.py",
    "test_gpu_import.py",
    "test_multi_device.py",
    "test_std_gpu.py",
    "test_convert_gpu.py",
]


@functools.cache
def _real_gpu() -> bool:
    """Whether a real CuPy sees a CUDA device (probed in a child: importing CuPy here
    would put ``cupy`` into this process's ``sys.modules``)."""
    if importlib.util.find_spec("cupy") is None:
        return False
    probe = "import cupy; print(int(cupy.cuda.runtime.getDeviceCount()))"
    try:
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return False
    lines = result.stdout.split()
    return result.returncode == 0 and bool(lines) and lines[-1] != "0"


def _double_env() -> dict[str, str]:
    """The environment of a child on the double; skips where it cannot or need not run."""
    if shutil.which("g++") is None:
        pytest.skip("the CUDA emulation needs g++ (C++20)")
    if _real_gpu():
        pytest.skip("a real CuPy with a CUDA device is installed: the GPU tests run for real")
    env = dict(os.environ)
    env["SPARCOMM_TEST_HOST_CUPY"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE / "_host_cupy"), env.get("PYTHONPATH")) if p
    )
    return env


def test_cupy_paths_on_the_host_double():
    env = _double_env()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(
        command + [str(HERE / name) for name in FILES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"child pytest failed (rc {result.returncode}):\n{output}"
    # Every file ran (nothing skipped as if no GPU were there).
    assert " skipped" not in output.splitlines()[-1], output


def _run_ranks(env: dict[str, str], ranks: int, *args: str) -> str:
    """``mpiexec -n ranks python _host_cupy_ranks.py *args``; its stdout, or a failure."""
    env.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")  # more ranks than cores
    command = [sys.executable, str(HERE / "_host_cupy_ranks.py"), *args]
    stdout = _mpiexec.run(ranks, command, env=env, cwd=ROOT, timeout=300)
    assert "mismatches: none" in stdout, stdout
    return stdout


@pytest.mark.mpi
def test_collectives_with_cupy_inputs_on_three_ranks():
    _run_ranks(_double_env(), 3)


@pytest.mark.mpi
def test_dense_allreduce_through_a_cuda_aware_mpi():
    env = _double_env()
    env["SPARCOMM_HOST_CUPY_MPI_READS_DEVICE"] = "1"  # device pointers readable by MPI
    _run_ranks(env, 2, "--cuda-aware")
