"""1,100 GradientReducers created and dropped under ``mpiexec -n 2``, never closed: no
thread and no communicator survives them.

Each reducer holds two communicators once it has reduced (its duplicate and the
collectives' private one), so 1,100 of them need 2,200, more than MPICH has
(2,048 context ids): the loop completes only if dropped reducers give theirs back.
The script also counts the communicators MPI can still create, before and after.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import _mpiexec
import pytest

pytest.importorskip("mpi4py.MPI")

ROOT = Path(__file__).resolve().parent.parent
# Their 2,200 communicators exceed MPICH's ~2,046 context ids (see above).
REDUCERS = 1100

SCRIPT = """
import json, sys, threading, time
import numpy as np
from mpi4py import MPI
from sparcomm.reducer import GradientReducer, _Duplicates

comm = MPI.COMM_WORLD

def communicators_left():
    # How many more communicators MPI gives (then all freed again).
    held = []
    try:
        while True:
            held.append(comm.Dup())
    except MPI.Exception:
        pass
    for c in held:
        c.Free()
    return len(held)

def reducer_threads():
    return [t for t in threading.enumerate() if t.name == "sparcomm-reducer"]

GradientReducer().close()  # the first use sets up what lives as long as the process
left_before = communicators_left()
threads_before = threading.active_count()
most_threads = 0
grad = np.ones(8)
start = time.perf_counter()
for i in range(int(sys.argv[1])):
    reducer = GradientReducer(overlap=i % 2 == 0)
    reducer.reduce([grad])
    del reducer  # never closed
    most_threads = max(most_threads, threading.active_count())
seconds = time.perf_counter() - start
for thread in reducer_threads():
    thread.join(10)
GradientReducer().close()  # a collective point: frees what every rank has parked
duplicates = _Duplicates.of(comm)
# Rank 0 prints every rank's report: two ranks printing at once can interleave their
# bytes in mpiexec's forwarded stdout.
reports = comm.gather(json.dumps({
    "rank": comm.Get_rank(),
    "threads_before": threads_before,
    "most_threads": most_threads,
    "threads_after": threading.active_count(),
    "left_before": left_before,
    "left_after": communicators_left(),
    "open": duplicates.open,
    "parked": len(duplicates.parked),
    "seconds": seconds,
}))
if comm.Get_rank() == 0:
    print(chr(10).join(reports), flush=True)
"""


def test_dropped_reducers_leak_no_thread_and_no_communicator(tmp_path):
    script = tmp_path / "leak.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    stdout = _mpiexec.run(
        2, [sys.executable, str(script), str(REDUCERS)], env=env, cwd=ROOT, timeout=120
    )
    reports = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 2, stdout
    for report in reports:
        assert report["threads_after"] == report["threads_before"], report
        # A dropped reducer's thread ends shortly after the reducer is collected, on its
        # own time: a few may be on their way out at once on a busy machine, never a
        # number that grows with the reducers (about 1,000 per rank before the fix).
        assert report["most_threads"] <= report["threads_before"] + 8, report
        assert report["left_after"] == report["left_before"], report
        assert report["open"] == 0 and report["parked"] == 0, report
