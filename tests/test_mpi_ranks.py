"""Run tests/mpi under ``mpiexec -n P`` for several P, from plain pytest.

Each P runs the whole directory once in P processes; a failure on any rank aborts the
job (tests/mpi/conftest.py) and a hang is cut by a timeout, so this test fails instead
of blocking the suite.  At P = 1 the directory runs in the ordinary pytest session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _mpiexec
import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = 600

pytestmark = pytest.mark.mpi


# 3 is the odd, non-power-of-two case and 4 the power of two every algorithm takes its
# main branch at; tests/test_mpi_many_ranks.py runs every collective at 8 and 16.
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_mpi_directory_under_mpiexec(ranks):
    env = dict(os.environ)
    # Oversubscribed ranks (more ranks than cores) must not each start a thread pool.
    env.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if ranks > (os.cpu_count() or 1):
        # More ranks than cores: let a waiting rank yield its core (MPICH), or ranks that
        # have work wait for time slices spent polling.
        env.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    command = [
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
    _mpiexec.run(ranks, command, env=env, cwd=ROOT, timeout=TIMEOUT_SECONDS)
