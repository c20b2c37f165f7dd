"""``allreduce(x, codec=c, out=x)`` gives the bits of ``allreduce(x.copy(), codec=c)``
for every codec family and algorithm, error feedback included, over two steps.

The reducer writes a compressed bucket's result into a gradient the caller gave up
(``submit(..., in_place=True)``: ``DistributedOptimizer``'s gradients), so that no
fresh output is allocated, and faulted in, per bucket and step.  That is only sound if
no collective writes ``out`` before it has read all of ``x``.

Every body works at any number of ranks (1 included); tests/test_mpi_ranks.py runs this
directory under ``mpiexec`` at several process counts.
"""

from __future__ import annotations

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

import sparcomm  # noqa: E402
from sparcomm.comm import allreduce  # noqa: E402

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()

CASES = [
    ("dense", lambda: sparcomm.NoCompression(), ["mpi", "ring"]),
    ("fp16", lambda: sparcomm.FP16(), ["allgather", "reduce_scatter_allgather", "pipelined"]),
    ("fp16+ef", lambda: sparcomm.ErrorFeedback(sparcomm.FP16()), ["reduce_scatter_allgather"]),
    (
        "topk",
        lambda: sparcomm.TopK(density=0.05),
        ["allgather", "recursive_doubling", "split_allgather", "dsar", "dense"],
    ),
    (
        "topk+ef",
        lambda: sparcomm.ErrorFeedback(sparcomm.TopK(density=0.05)),
        ["allgather", "recursive_doubling", "split_allgather", "dsar", "dense"],
    ),
    ("qsgd", lambda: sparcomm.QSGD(bits=4), ["allgather", "reduce_scatter_allgather"]),
    (
        "qsgd+ef",
        lambda: sparcomm.ErrorFeedback(sparcomm.QSGD(bits=4)),
        ["allgather", "reduce_scatter_allgather"],
    ),
    ("terngrad", lambda: sparcomm.TernGrad(), ["allgather", "shared_scale"]),
    ("onebit", lambda: sparcomm.OneBit(), ["allgather", "reduce_scatter_allgather"]),
]


@pytest.mark.parametrize(
    ("name", "make", "algorithm"),
    # Each algorithm by name: ``auto``'s measured choice may differ between two calls.
    [(name, make, a) for name, make, algorithms in CASES for a in algorithms],
    ids=lambda v: v if isinstance(v, str) else "",
)
@pytest.mark.parametrize("n", [1, 70_001])  # one element (empty chunks), many buckets
def test_out_may_be_the_input(name, make, algorithm, n):
    separate, in_place = make(), make()  # each its own state (residuals, owners' memory)
    for step in range(2):  # the second with error feedback's residual
        rng = np.random.default_rng([RANK, step, n])
        x = rng.standard_normal(n).astype(np.float32)
        expected = allreduce(
            x.copy(), codec=separate, algorithm=algorithm, key="w", step=step, comm=COMM
        )
        result = allreduce(
            x, codec=in_place, algorithm=algorithm, key="w", step=step, comm=COMM, out=x
        )
        assert result is x
        assert np.array_equal(x, expected), (name, algorithm, step)
