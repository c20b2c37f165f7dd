"""Harness for tests that run under ``mpiexec`` (see tests/test_mpi_ranks.py).

Plain ``pytest`` collects this directory at one rank; the harness relaunches it at
several.  Under more than one rank a failing test aborts the whole job (after printing
its report), because the other ranks would otherwise wait forever in the next
collective: a failure is reported, never turned into a hang.
"""

from __future__ import annotations

import sys

import pytest

MPI = pytest.importorskip("mpi4py.MPI")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    comm = MPI.COMM_WORLD
    if report.failed and comm.Get_size() > 1:
        sys.stderr.write(
            f"\n[rank {comm.Get_rank()} of {comm.Get_size()}] FAILED {item.nodeid} "
            f"({report.when})\n{report.longreprtext}\n"
        )
        sys.stderr.flush()
        comm.Abort(1)
