"""Collectives with CuPy inputs on several ranks, on the host CuPy double (no GPU).

Run by ``test_host_cupy.py`` as ``mpiexec -n P python _host_cupy_ranks.py`` with the
double first on ``PYTHONPATH`` and ``SPARCOMM_TEST_HOST_CUPY=1``.  Every collective is
called twice on every rank, on NumPy and on device arrays of the same data; the device
result must be a ``cupy.ndarray`` bitwise equal to the NumPy one on every rank (device
data is staged through pinned host buffers: the ``mpich`` wheel is not CUDA-aware).  Any
failure aborts the whole job, so no rank waits forever in a collective.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np
from _gpu_emulator import install_host_cupy

cupy = install_host_cupy()

from mpi4py import MPI  # noqa: E402

import sparcomm  # noqa: E402
from sparcomm import FP16, QSGD, ErrorFeedback, OneBit, TernGrad, TopK  # noqa: E402

CASES = [
    ("dense", lambda: None, {}),
    ("TopK auto", lambda: TopK(density=0.05), {}),
    ("TopK recursive_doubling", lambda: TopK(density=0.05), {"algorithm": "recursive_doubling"}),
    ("TopK split_allgather", lambda: TopK(density=0.05), {"algorithm": "split_allgather"}),
    ("TopK dsar", lambda: TopK(density=0.4), {"algorithm": "dsar"}),
    ("TopK allgather", lambda: ErrorFeedback(TopK(density=0.05)), {"algorithm": "allgather"}),
    ("QSGD", lambda: QSGD(bits=4), {}),
    (
        "EF(QSGD) reduce_scatter_allgather",
        lambda: ErrorFeedback(QSGD(bits=4)),
        {"algorithm": "reduce_scatter_allgather"},
    ),
    ("TernGrad shared_scale", lambda: TernGrad(), {"algorithm": "shared_scale"}),
    ("OneBit", lambda: OneBit(bucket_size=64), {"algorithm": "reduce_scatter_allgather"}),
    ("FP16", FP16, {}),
]


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    x = np.random.default_rng(100 + rank).standard_normal((23, 87)).astype(np.float32)
    failures = []
    for name, make, options in CASES:
        for op in ("sum", "mean"):
            expected = sparcomm.allreduce(x, codec=make(), comm=comm, op=op, key="w", **options)
            got = sparcomm.allreduce(
                cupy.asarray(x), codec=make(), comm=comm, op=op, key="w", **options
            )
            ok = (
                isinstance(got, cupy.ndarray)
                and got.shape == x.shape
                and cupy.asnumpy(got).tobytes() == np.asarray(expected).tobytes()
            )
            if not ok:
                failures.append(f"{name} op={op}")
    rng = np.random.default_rng(rank)
    indices = rng.integers(0, 5000, 300).astype(np.int64)  # unsorted, with duplicates
    values = rng.standard_normal(300)
    expected = sparcomm.sparse_allreduce(indices, values, 5000, comm=comm)
    got = sparcomm.sparse_allreduce(cupy.asarray(indices), cupy.asarray(values), 5000, comm=comm)
    if cupy.asnumpy(got).tobytes() != np.asarray(expected).tobytes():
        failures.append("sparse_allreduce")
    everyone = comm.allgather(failures)
    if rank == 0:
        bad = {f"rank {r}: {f}" for r, fs in enumerate(everyone) for f in fs}
        print(
            f"{len(CASES) * 2 + 1} collectives on {comm.Get_size()} ranks; mismatches: "
            f"{sorted(bad) or 'none'}",
            flush=True,
        )
    if any(everyone):
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # one rank failing must not leave the others in a collective
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
