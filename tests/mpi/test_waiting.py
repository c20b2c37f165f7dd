"""sparcomm.comm._waiting: waiting in MPI (``pause=None``) and polling with sleeps give
the same completed requests and statuses (the receive counts that recursive doubling
reads).  Every body works at any number of ranks (1 included: a rank sends to itself);
tests/test_mpi_ranks.py runs this directory under ``mpiexec`` at several process counts.
"""

from __future__ import annotations

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm.comm._waiting import wait, waitall  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


@pytest.mark.parametrize("pause", [None, 1e-5])
def test_waitall_completes_every_request_and_fills_the_statuses(pause):
    dest, source = (RANK + 1) % SIZE, (RANK - 1) % SIZE
    sends = [np.arange(RANK, RANK + 5 + m, dtype=np.int64) for m in range(3)]
    recvs = [np.full(20, -1, dtype=np.int64) for _ in range(3)]  # larger than the messages
    requests = [COMM.Irecv(r, source, tag=m) for m, r in enumerate(recvs)]
    requests += [COMM.Isend(s, dest, tag=m) for m, s in enumerate(sends)]
    statuses = [MPI.Status() for _ in requests]
    waitall(requests, pause, statuses)
    for m, received in enumerate(recvs):
        count = statuses[m].Get_count(MPI.INT64_T)
        assert count == 5 + m and statuses[m].Get_source() == source
        np.testing.assert_array_equal(received[:count], np.arange(source, source + 5 + m))
        assert np.all(received[count:] == -1)
    assert all(r == MPI.REQUEST_NULL for r in requests)


@pytest.mark.parametrize("pause", [None, 1e-5])
def test_wait_returns_when_the_request_completes(pause):
    value = np.array([RANK], dtype=np.int64)
    total = np.zeros(1, dtype=np.int64)
    request = COMM.Iallreduce(value, total, op=MPI.SUM)
    wait(request, pause)
    assert total[0] == SIZE * (SIZE - 1) // 2
