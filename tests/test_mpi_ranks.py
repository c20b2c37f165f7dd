"""Run tests/mpi under ``mpiexec -n P`` for several P, from plain pytest.

Each P runs the whole directory once in P processes; a failure on any rank aborts the
job (tests/mpi/conftest.py) and a hang is cut by a timeout, so this test fails instead
of blocking the suite.  At P = 1 the directory runs in the ordinary pytest session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = 600

pytestmark = pytest.mark.mpi


def _mpiexec() -> str:
    found = shutil.which("mpiexec")
    if found is None:
        pytest.skip("mpiexec not found; install the mpich wheel: pip install mpich")
    return found


@pytest.mark.parametrize("ranks", [2, 3, 4, 5])
def test_mpi_directory_under_mpiexec(ranks):
    env = dict(os.environ)
    # Oversubscribed ranks (more ranks than cores) must not each start a thread pool.
    env.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["MPIEXEC_TIMEOUT"] = str(TIMEOUT_SECONDS)  # hydra's own limit, a second guard
    if ranks > (os.cpu_count() or 1):
        # More ranks than cores: let a waiting rank yield its core (MPICH), or ranks that
        # have work wait for time slices spent polling.
        env.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    command = [
        _mpiexec(),
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "pytest",
        str(ROOT / "tests" / "mpi"),
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
    ]
    # A session of its own, so that on a timeout the whole job (mpiexec and every rank)
    # is killed as one process group and nothing is left spinning.
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"mpiexec -n {ranks} timed out after {TIMEOUT_SECONDS} s (a hang?)\n"
            f"{stdout[-4000:]}\n{stderr[-4000:]}"
        )
    if process.returncode != 0:
        pytest.fail(
            f"mpiexec -n {ranks} pytest tests/mpi failed (exit {process.returncode})\n"
            f"--- stdout ---\n{stdout[-6000:]}\n--- stderr ---\n{stderr[-6000:]}"
        )
