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


@pytest.fixture
def untimed_race_lengths(monkeypatch):
    """auto's races without the cheap-call rule: every round runs exactly its trials.

    Tests that compare two runs bit for bit (a run with a failed step against one
    without) need both runs' races to time the same candidates in the same calls.  The
    cheap-call rule (sparcomm.comm._tune.CHEAP_CALL_S) ends a round by the measured
    seconds, so a call descheduled for 10 ms on a loaded machine ends a round early in
    one run only; it failed a CI run of tests/mpi/test_failed_step_state.py under
    ``pytest -n 2`` (session 11).  With it off, which candidate a call times depends on
    call counts alone, as the tuner's restore must reproduce them."""
    from sparcomm.comm import _tune

    monkeypatch.setattr(_tune, "CHEAP_CALL_S", 0.0)
