"""Collectives with CuPy inputs equal their NumPy results (one process: COMM_SELF/WORLD).

Skipped without CuPy or a GPU.  Multi-rank GPU runs need one device per rank and are
not part of the automatic suite.
"""

from __future__ import annotations

import numpy as np
import pytest
from _gpu_skip import require_gpu

cupy = require_gpu()
MPI = pytest.importorskip("mpi4py.MPI")

import sparcomm  # noqa: E402
from sparcomm import ErrorFeedback, NoCompression, TopK  # noqa: E402


@pytest.mark.parametrize(
    "codec",
    [None, NoCompression(), TopK(density=0.01), ErrorFeedback(TopK(density=0.01))],
    ids=repr,
)
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_allreduce_cupy_equals_numpy(codec, op):
    x = np.random.default_rng(5).standard_normal(100_003).astype(np.float32)
    expected = sparcomm.allreduce(x, codec=codec, comm=MPI.COMM_SELF, op=op, key="w")
    if isinstance(codec, ErrorFeedback):
        codec = ErrorFeedback(codec.codec)  # fresh residuals for the GPU run
    got = sparcomm.allreduce(cupy.asarray(x), codec=codec, comm=MPI.COMM_SELF, op=op, key="w")
    assert isinstance(got, cupy.ndarray)
    assert cupy.asnumpy(got).tobytes() == np.asarray(expected).tobytes()


def test_sparse_allreduce_cupy_equals_numpy():
    rng = np.random.default_rng(9)
    indices = rng.integers(0, 50_000, 4_000).astype(np.int64)  # unsorted, duplicates
    values = rng.standard_normal(4_000).astype(np.float64)
    expected = sparcomm.sparse_allreduce(indices, values, 50_000, comm=MPI.COMM_SELF)
    got = sparcomm.sparse_allreduce(
        cupy.asarray(indices), cupy.asarray(values), 50_000, comm=MPI.COMM_SELF
    )
    assert cupy.asnumpy(got).tobytes() == np.asarray(expected).tobytes()
