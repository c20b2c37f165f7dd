"""Run a command under ``mpiexec -n P`` from a test: a hang or a failed rank fails the test.

The job gets a process session of its own, so that on a timeout mpiexec and every rank
are killed as one group and nothing is left spinning; MPICH's own ``MPIEXEC_TIMEOUT`` is
a second guard.  Shared by ``tests/test_mpi_ranks.py`` and ``tests/gpu/test_host_cupy.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest


def mpiexec() -> str:
    """Path of ``mpiexec``; skips the test where it is missing."""
    found = shutil.which("mpiexec")
    if found is None:
        pytest.skip("mpiexec not found; install the mpich wheel: pip install mpich")
    return found


def run(ranks: int, command: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> str:
    """``mpiexec -n ranks command``; returns its stdout, or fails the test with the output
    of the job (a non-zero exit, or a timeout: a hang)."""
    env = dict(env, MPIEXEC_TIMEOUT=str(int(timeout)))
    what = f"mpiexec -n {ranks} {' '.join(Path(c).name for c in command[:4])}"
    process = subprocess.Popen(
        [mpiexec(), "-n", str(ranks), *command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"{what} timed out after {timeout} s (a hang?)\n{stdout[-4000:]}\n{stderr[-4000:]}"
        )
    if process.returncode != 0:
        pytest.fail(
            f"{what} failed (exit {process.returncode})\n"
            f"--- stdout ---\n{stdout[-6000:]}\n--- stderr ---\n{stderr[-6000:]}"
        )
    return stdout
