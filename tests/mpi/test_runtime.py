"""``sparcomm.init``, ``rank``, ``size``, ``local_rank``, ``local_size`` at any process count."""

from __future__ import annotations

import pytest

import sparcomm
from sparcomm import _runtime

MPI = pytest.importorskip("mpi4py.MPI")


def test_ranks_and_node_local_ranks_agree_with_mpi():
    comm = MPI.COMM_WORLD
    assert sparcomm.rank() == comm.Get_rank() and sparcomm.size() == comm.Get_size()
    sparcomm.init()
    sparcomm.init()  # again with the same communicator: nothing to do (not collective)
    assert sparcomm.rank() == comm.Get_rank() and sparcomm.size() == comm.Get_size()
    node = MPI.Get_processor_name()
    table = comm.allgather((node, sparcomm.local_rank(), sparcomm.local_size()))
    for name in {entry[0] for entry in table}:
        on_node = [entry for entry in table if entry[0] == name]
        # Every rank on a node reports the node's rank count, and the local ranks are
        # 0 .. local_size - 1 exactly once each.
        assert {size for _, _, size in on_node} == {len(on_node)}
        assert sorted(local for _, local, _ in on_node) == list(range(len(on_node)))


def test_init_on_a_sub_communicator_describes_that_communicator():
    comm = MPI.COMM_WORLD
    half = comm.Split(comm.Get_rank() % 2, comm.Get_rank())
    try:
        sparcomm.init(half)
        assert sparcomm.rank() == half.Get_rank() and sparcomm.size() == half.Get_size()
        assert 1 <= sparcomm.local_size() <= half.Get_size()
    finally:
        sparcomm.init()  # back to COMM_WORLD for the tests that follow
        half.Free()


def test_local_queries_before_init_and_a_bad_comm_are_refused(monkeypatch):
    monkeypatch.setattr(_runtime, "_layout", None)
    with pytest.raises(RuntimeError, match=r"local_rank\(\) needs sparcomm.init\(\) first"):
        sparcomm.local_rank()
    with pytest.raises(RuntimeError, match=r"local_size\(\) needs sparcomm.init\(\) first"):
        sparcomm.local_size()
    assert not _runtime.is_initialized()
    with pytest.raises(TypeError, match="must be an mpi4py.MPI.Comm .*got int"):
        sparcomm.init(0)
