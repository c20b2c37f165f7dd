"""Collectives with CuPy inputs on several ranks, on the host CuPy double (no GPU).

Run by ``test_host_cupy.py`` as ``mpiexec -n P python _host_cupy_ranks.py`` with the
double first on ``PYTHONPATH`` and ``SPARCOMM_TEST_HOST_CUPY=1``.  Every collective is
called twice on every rank, on NumPy and on device arrays of the same data; the device
result must be a ``cupy.ndarray`` bitwise equal to the NumPy one on every rank (device
data is staged through pinned host buffers: the ``mpich`` wheel is not CUDA-aware).  Any
failure aborts the whole job, so no rank waits forever in a collective.

With ``--cuda-aware`` (and ``SPARCOMM_HOST_CUPY_MPI_READS_DEVICE=1``, which makes the
double's device pointers readable by MPI) sparcomm is told that MPI is CUDA-aware, and
the dense collectives hand device buffers to MPI directly: that path runs too.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np
from _gpu_emulator import install_host_cupy

cupy = install_host_cupy()

from mpi4py import MPI  # noqa: E402

import sparcomm  # noqa: E402
from sparcomm import FP16, QSGD, ErrorFeedback, OneBit, PowerSGD, TernGrad, TopK  # noqa: E402
from sparcomm.comm import set_tuning  # noqa: E402

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
    ("PowerSGD", lambda: PowerSGD(rank=2), {}),
]


def _cuda_aware_cases() -> list:
    """Only the dense path changes with a CUDA-aware MPI; in place and into ``out`` too."""
    from sparcomm.comm import _device

    if cupy.DEVICE_ADDRESS_OFFSET != 0:
        raise RuntimeError("--cuda-aware needs SPARCOMM_HOST_CUPY_MPI_READS_DEVICE=1")
    _device._CUDA_AWARE = True  # what cuda_aware_mpi() reports for a CUDA-aware MPI
    return [
        ("dense", lambda: None, {}),
        ("dense out", lambda: None, {"out": "new"}),
        ("dense in place", lambda: None, {"out": "x"}),
    ]


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    # Each case's host and device calls must run one algorithm: auto's race may time a
    # different candidate on each call, and QSGD's algorithms round differently.  The
    # model's choice is the same on both calls.
    set_tuning(comm, False)
    cases = _cuda_aware_cases() if "--cuda-aware" in sys.argv else CASES
    x = np.random.default_rng(100 + rank).standard_normal((23, 87)).astype(np.float32)
    # Subnormal sums and means: a flush-to-zero division on the device would show.
    x[0, :4] = np.float32(3e-39) * (rank + 1)
    failures = []
    for name, make, options in cases:
        for op in ("sum", "mean"):
            x_host, x_device = x.copy(), cupy.asarray(x)
            host, device = dict(options), dict(options)
            if options.get("out") == "new":
                host["out"], device["out"] = np.empty_like(x), cupy.empty(x.shape, x.dtype)
            elif options.get("out") == "x":
                host["out"], device["out"] = x_host, x_device
            expected = sparcomm.allreduce(x_host, codec=make(), comm=comm, op=op, key="w", **host)
            got = sparcomm.allreduce(x_device, codec=make(), comm=comm, op=op, key="w", **device)
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
