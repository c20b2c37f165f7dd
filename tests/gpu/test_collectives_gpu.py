"""Collectives with CuPy inputs equal their NumPy results (one process: COMM_SELF/WORLD).

Skipped without CuPy or a GPU.  Multi-rank GPU runs need one device per rank and are
not part of the automatic suite.
"""

from __future__ import annotations

import numpy as np
import pytest
from _gpu_skip import emulated, require_gpu

cupy = require_gpu()
MPI = pytest.importorskip("mpi4py.MPI")
N = 12_007 if emulated() else 100_003  # the host CUDA emulator needs a smaller input

import sparcomm  # noqa: E402
from sparcomm import ErrorFeedback, NoCompression, TopK  # noqa: E402

# Factories, not instances: a codec with error feedback keeps residuals, and one instance
# shared by the parametrized tests would carry them from one test into the next.
CODECS = {
    "dense": lambda: None,
    "NoCompression": NoCompression,
    "TopK": lambda: TopK(density=0.01),
    "ErrorFeedback(TopK)": lambda: ErrorFeedback(TopK(density=0.01)),
}


@pytest.mark.parametrize("make_codec", list(CODECS.values()), ids=list(CODECS))
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_allreduce_cupy_equals_numpy(make_codec, op):
    x = np.random.default_rng(5).standard_normal(N).astype(np.float32)
    expected = sparcomm.allreduce(x, codec=make_codec(), comm=MPI.COMM_SELF, op=op, key="w")
    got = sparcomm.allreduce(
        cupy.asarray(x), codec=make_codec(), comm=MPI.COMM_SELF, op=op, key="w"
    )
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
