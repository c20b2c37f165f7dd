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


QUANTIZED = {
    "QSGD": lambda: sparcomm.QSGD(bits=4, bucket_size=64),
    "ErrorFeedback(QSGD)": lambda: ErrorFeedback(sparcomm.QSGD(bits=4, bucket_size=64)),
    "TernGrad(clip)": lambda: sparcomm.TernGrad(bucket_size=100, clip=2.5),
    "OneBit": lambda: sparcomm.OneBit(bucket_size=64),
    "FP16": sparcomm.FP16,
}


@pytest.mark.parametrize("make_codec", list(QUANTIZED.values()), ids=list(QUANTIZED))
@pytest.mark.parametrize("algorithm", ["allgather", "reduce_scatter_allgather"])
def test_quantized_allreduce_cupy_equals_numpy_over_steps(make_codec, algorithm):
    # Several steps: error-feedback residuals stay on the device and evolve as on the host.
    rng = np.random.default_rng(11)
    host_codec, device_codec = make_codec(), make_codec()
    for step in range(3):
        x = rng.standard_normal((N // 7, 7)).astype(np.float32)
        kwargs = dict(comm=MPI.COMM_SELF, op="mean", key="w", step=step, algorithm=algorithm)
        expected = sparcomm.allreduce(x, codec=host_codec, **kwargs)
        out = cupy.empty(x.shape, np.float32)
        got = sparcomm.allreduce(cupy.asarray(x), codec=device_codec, out=out, **kwargs)
        assert got is out
        assert cupy.asnumpy(got).tobytes() == np.asarray(expected).tobytes()


def test_terngrad_shared_scale_and_in_place_on_the_device():
    x = np.random.default_rng(12).standard_normal(N).astype(np.float64)
    kwargs = dict(comm=MPI.COMM_SELF, key="w", step=0, algorithm="shared_scale")
    expected = sparcomm.allreduce(x, codec=ErrorFeedback(sparcomm.TernGrad()), **kwargs)
    device_x = cupy.asarray(x)
    got = sparcomm.allreduce(
        device_x, codec=ErrorFeedback(sparcomm.TernGrad()), out=device_x, **kwargs
    )
    assert got is device_x
    assert cupy.asnumpy(got).tobytes() == np.asarray(expected).tobytes()


def test_qdsar_on_the_device():
    x = np.random.default_rng(13).standard_normal(N).astype(np.float32)
    kwargs = dict(comm=MPI.COMM_SELF, key="w", step=0, dense_phase=sparcomm.QSGD(bits=8))
    expected = sparcomm.allreduce(x, codec=TopK(density=0.3), **kwargs)
    got = sparcomm.allreduce(cupy.asarray(x), codec=TopK(density=0.3), **kwargs)
    assert isinstance(got, cupy.ndarray)
    assert cupy.asnumpy(got).tobytes() == np.asarray(expected).tobytes()


def test_sparse_allreduce_sparse_output_stays_on_the_device():
    rng = np.random.default_rng(14)
    indices = np.sort(rng.choice(50_000, 3_000, replace=False)).astype(np.int32)
    values = rng.standard_normal(3_000).astype(np.float32)
    kwargs = dict(comm=MPI.COMM_SELF, dense_output=False, algorithm="allgather")
    want_i, want_v = sparcomm.sparse_allreduce(indices, values, 50_000, **kwargs)
    got_i, got_v = sparcomm.sparse_allreduce(
        cupy.asarray(indices), cupy.asarray(values), 50_000, **kwargs
    )
    assert isinstance(got_i, cupy.ndarray) and isinstance(got_v, cupy.ndarray)
    assert cupy.asnumpy(got_i).tobytes() == want_i.tobytes()
    assert cupy.asnumpy(got_v).tobytes() == want_v.tobytes()


def test_device_inputs_refuse_host_outputs_and_mixed_streams():
    x = cupy.ones(100, np.float32)
    with pytest.raises(TypeError, match=r"out must be a cupy.ndarray of dtype float32"):
        sparcomm.allreduce(x, codec=TopK(k=5), comm=MPI.COMM_SELF, out=np.empty(100, np.float32))
    with pytest.raises(TypeError, match=r"out must be a cupy.ndarray of dtype float32"):
        sparcomm.allreduce(x, comm=MPI.COMM_SELF, out=np.empty(100, np.float32))
    with pytest.raises(TypeError, match="indices and values must be on the same device"):
        sparcomm.sparse_allreduce(np.arange(3), cupy.ones(3, np.float32), 10, comm=MPI.COMM_SELF)
    with pytest.raises(ValueError, match="out overlaps x partially"):
        buffer = cupy.ones(101, np.float32)
        sparcomm.allreduce(buffer[:100], comm=MPI.COMM_SELF, out=buffer[1:])
