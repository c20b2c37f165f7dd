"""Every collective algorithm at P = 8 and P = 16 (oversubscribed), on small inputs.

tests/test_mpi_ranks.py runs the whole tests/mpi directory at P = 2 to 5; at 8 and 16
ranks on a two-core machine that would take many minutes, so one program per P
(tests/_many_ranks_check.py) runs every algorithm's correctness check against the
references of tests/mpi, on inputs small enough that each P costs seconds: folding to a
power of two, split ranges with more ranks than elements, and quantized chunking meet
cases there that fewer ranks do not.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _mpiexec
import pytest

pytest.importorskip("mpi4py.MPI")

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = 300

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("ranks", [8, 16])
def test_every_collective_at_many_ranks(ranks):
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if ranks > (os.cpu_count() or 1):
        # A waiting rank yields its core (MPICH) instead of spinning through the time
        # slices of the ranks that have work.
        env.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    script = ROOT / "tests" / "_many_ranks_check.py"
    stdout = _mpiexec.run(
        ranks, [sys.executable, str(script)], env=env, cwd=ROOT, timeout=TIMEOUT_SECONDS
    )
    assert "identical on every rank" in stdout and f"at P = {ranks}," in stdout, stdout
