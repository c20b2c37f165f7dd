"""Threads per rank (sparcomm/_threads.py): each rank's share of its node's cores, set at
the first collective unless the user chose, under ``mpiexec`` and in-process."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from pathlib import Path

import _mpiexec
import pytest

from sparcomm import _threads
from sparcomm._threads import (
    local_size_from_environment,
    ranks_sharing,
    set_thread_environment,
    threads_per_rank,
    user_threads,
)

numba = pytest.importorskip("numba")
MPI = pytest.importorskip("mpi4py.MPI")

ROOT = Path(__file__).resolve().parents[2]
POOL = numba.config.NUMBA_NUM_THREADS
_LAUNCH_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", *_threads.LOCAL_SIZE_VARIABLES)

# A first allreduce in the main thread, a second one in another thread; each reports
# Numba's thread count in its thread, and the log lines of sparcomm.threads are counted.
RANK_SCRIPT = """
import logging, sys, threading
import numba, numpy as np
from mpi4py import MPI
import sparcomm
from sparcomm._threads import usable_cpus

messages = []
class Keep(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
log = logging.getLogger("sparcomm.threads")
log.addHandler(Keep())
log.setLevel(logging.INFO)

comm = MPI.COMM_WORLD
x = np.arange(1000, dtype=np.float64) * (comm.Get_rank() + 1)
out = sparcomm.allreduce(x, codec=sparcomm.TopK(density=0.5), comm=comm, op="sum")
main = numba.get_num_threads()
other = []
def second():
    sparcomm.allreduce(x, comm=comm, op="sum")
    other.append(numba.get_num_threads())
thread = threading.Thread(target=second)
thread.start()
thread.join()
sys.stdout.write(
    f"<rank {comm.Get_rank()} main={main} other={other[0]} "
    f"pool={numba.config.NUMBA_NUM_THREADS} cpus={usable_cpus()} logs={len(messages)}>\\n"
)
sys.stdout.write("".join(f"[{m}]\\n" for m in messages))
"""


def _run_two_ranks(tmp_path: Path, **variables: str) -> tuple[list[dict[str, int]], str]:
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES}
    env.update(variables)
    out = _mpiexec.run(2, [sys.executable, str(script)], env=env, cwd=ROOT, timeout=180)
    found = re.findall(r"<rank (\d) main=(\d+) other=(\d+) pool=(\d+) cpus=(\d+) logs=(\d+)>", out)
    assert sorted(rank for rank, *_ in found) == ["0", "1"], out
    keys = ("rank", "main", "other", "pool", "cpus", "logs")
    return [dict(zip(keys, map(int, row), strict=True)) for row in found], out


@pytest.mark.mpi
def test_two_ranks_take_half_the_cores_each_in_every_thread(tmp_path):
    ranks, out = _run_two_ranks(tmp_path)
    for rank in ranks:
        expected = min(rank["pool"], max(1, rank["cpus"] // 2))
        assert rank["main"] == rank["other"] == expected, out
        assert rank["logs"] == 1, out  # said once per process, not once per collective
    assert f"[Numba kernels use {expected} threads per rank: " in out


@pytest.mark.mpi
def test_the_users_numba_num_threads_wins(tmp_path):
    share = max(1, _threads.usable_cpus() // 2)
    chosen = share + 1  # not what sparcomm would choose
    ranks, out = _run_two_ranks(tmp_path, NUMBA_NUM_THREADS=str(chosen))
    assert all(r["main"] == r["other"] == r["pool"] == chosen for r in ranks), out
    assert f"keep {chosen} threads per rank (NUMBA_NUM_THREADS is set)" in out


@pytest.mark.mpi
def test_the_users_omp_num_threads_sizes_numba_too(tmp_path):
    share = min(POOL, max(1, _threads.usable_cpus() // 2))
    if share + 1 > POOL:
        pytest.skip(f"Numba's pool has {POOL} thread(s): no count other than {share} to choose")
    ranks, out = _run_two_ranks(tmp_path, OMP_NUM_THREADS=str(share + 1))
    assert all(r["main"] == r["other"] == share + 1 for r in ranks), out
    assert f"from OMP_NUM_THREADS={share + 1}" in out


# -- in-process: the decision, with the node's facts substituted --------------------------


@pytest.fixture
def fresh(monkeypatch, caplog):
    """A process that has not decided yet; restores the decision and this thread's count."""
    saved = (_threads._decision, _threads._decided, getattr(_threads._applied, "done", False))
    before = numba.get_num_threads()
    for variable in _LAUNCH_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    _threads._reset_for_tests()
    caplog.set_level(logging.INFO, logger="sparcomm.threads")
    yield caplog
    _threads._decision, _threads._decided, _threads._applied.done = saved
    numba.set_num_threads(before)


needs_two = pytest.mark.skipif(POOL < 2, reason=f"Numba's pool has {POOL} thread")


@needs_two
def test_ranks_sharing_the_node_split_its_cores(fresh, monkeypatch):
    monkeypatch.setattr(_threads, "usable_cpus", lambda: POOL)
    monkeypatch.setattr(_threads, "_whole_node", lambda: True)
    monkeypatch.setenv("MPI_LOCALNRANKS", str(POOL))  # the launcher's count of ranks here
    _threads.set_rank_threads(MPI.COMM_SELF)
    assert numba.get_num_threads() == 1
    assert f"use 1 threads per rank: {POOL} usable cores shared by {POOL} ranks" in fresh.text
    seen = []

    def other_thread():
        seen.append(numba.get_num_threads())  # Numba's count is per thread: the default
        _threads.adopt_rank_threads()
        seen.append(numba.get_num_threads())

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen == [POOL, 1]


@needs_two
def test_a_set_num_threads_call_before_the_first_collective_wins(fresh, monkeypatch):
    monkeypatch.setattr(_threads, "usable_cpus", lambda: POOL)  # sparcomm would pick POOL
    monkeypatch.setattr(_threads, "_whole_node", lambda: True)
    numba.set_num_threads(1)
    _threads.set_rank_threads(MPI.COMM_SELF)
    assert numba.get_num_threads() == 1
    assert "keep 1 threads per rank (numba.set_num_threads was called)" in fresh.text
    _threads.set_rank_threads(MPI.COMM_SELF)  # a second communicator: decided already
    assert numba.get_num_threads() == 1
    assert len(fresh.records) == 1


def test_the_share_and_bad_inputs():
    assert threads_per_rank(4, cpus=16) == 4
    assert threads_per_rank(3, cpus=16) == 5
    assert threads_per_rank(8, cpus=4) == 1  # oversubscribed: never 0
    with pytest.raises(ValueError, match="ranks_on_node must be >= 1, got 0"):
        threads_per_rank(0)
    with pytest.raises(TypeError, match="ranks_on_node must be an int, got float"):
        threads_per_rank(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"OMP_NUM_THREADS must be a positive integer, got 'x'"):
        user_threads({"OMP_NUM_THREADS": "x"})


def test_ranks_compete_for_cores_only_where_their_masks_overlap():
    whole = [set(range(8))] * 4  # no binding: every rank may run anywhere
    assert [ranks_sharing(whole, r) for r in range(4)] == [4, 4, 4, 4]
    bound = [{0, 1}, {2, 3}, {4, 5}, {6, 7}]  # srun --cpus-per-task=2: cores of their own
    assert [ranks_sharing(bound, r) for r in range(4)] == [1, 1, 1, 1]
    sockets = [{0, 1, 2, 3}] * 3 + [{4, 5, 6, 7}]  # bound to a socket, 3 ranks on the first
    assert [ranks_sharing(sockets, r) for r in range(4)] == [3, 3, 3, 1]
    assert [threads_per_rank(ranks_sharing(sockets, r), 4) for r in range(4)] == [1, 1, 1, 4]


@needs_two
def test_ranks_bound_to_their_own_cores_keep_them_all(fresh, monkeypatch):
    # A rank whose mask is narrower than the node, and shared with no other rank (here:
    # the only rank of COMM_SELF), keeps every core of its mask, whatever the launcher
    # says about the ranks on the node.
    monkeypatch.setattr(_threads, "_affinity", lambda: set(range(POOL)))
    monkeypatch.setattr(_threads, "_whole_node", lambda: False)
    monkeypatch.setenv("MPI_LOCALNRANKS", str(POOL))
    _threads.set_rank_threads(MPI.COMM_SELF)
    assert numba.get_num_threads() == POOL
    assert f"use {POOL} threads per rank: {POOL} usable cores shared by 1 ranks" in fresh.text


def test_each_launchers_count_of_ranks_on_the_node():
    assert local_size_from_environment({}) is None
    assert local_size_from_environment({"MPI_LOCALNRANKS": "3"}) == 3  # hydra
    assert local_size_from_environment({"OMPI_COMM_WORLD_LOCAL_SIZE": "5"}) == 5
    slurm = {"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4(x2),3"}
    assert local_size_from_environment({**slurm, "SLURM_NODEID": "1"}) == 4
    assert local_size_from_environment({**slurm, "SLURM_NODEID": "2"}) == 3
    assert local_size_from_environment({"SLURM_STEP_TASKS_PER_NODE": "4"}) is None  # no step


def test_the_bootstrap_sets_the_environment_unless_the_user_did(monkeypatch):
    monkeypatch.setattr(_threads, "usable_cpus", lambda: 16)
    monkeypatch.setattr(_threads, "_whole_node", lambda: True)
    environ = {"MPI_LOCALNRANKS": "4"}
    assert set_thread_environment(environ) == 4
    assert environ["NUMBA_NUM_THREADS"] == environ["OMP_NUM_THREADS"] == "4"
    environ = {"MPI_LOCALNRANKS": "4", "OMP_NUM_THREADS": "2"}
    assert set_thread_environment(environ) is None
    assert environ["NUMBA_NUM_THREADS"] == "2"  # Numba follows the user's OpenMP count
    environ = {"MPI_LOCALNRANKS": "4", "NUMBA_NUM_THREADS": "3"}
    assert set_thread_environment(environ) is None and "OMP_NUM_THREADS" not in environ
    assert set_thread_environment({}) is None  # no launcher count: left to run time
    assert set_thread_environment(environ := {}, ranks_on_node=8) == 2
    assert environ == {"NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    # A narrower mask than the node may be this rank's own or shared: the first
    # collective compares the ranks' masks instead.
    monkeypatch.setattr(_threads, "_whole_node", lambda: False)
    environ = {"MPI_LOCALNRANKS": "4"}
    assert set_thread_environment(environ) is None and environ == {"MPI_LOCALNRANKS": "4"}
