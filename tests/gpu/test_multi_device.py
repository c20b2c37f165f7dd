"""sparcomm on a device other than 0: results stay on the caller's device.

The usual data-parallel setup runs one rank per GPU and makes device ``local_rank``
current (``cupy.cuda.Device(local_rank).use()``).  The current device is per host
thread (CUDA), so every thread sparcomm starts must make the caller's device current
before touching device arrays.  Needs two devices: a real multi-GPU machine, or the host
CuPy double with two pretend devices (``test_host_cupy.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from _gpu_skip import emulated, require_gpu

cupy = require_gpu()
MPI = pytest.importorskip("mpi4py.MPI")

import sparcomm  # noqa: E402
from sparcomm import QSGD, ErrorFeedback, TopK  # noqa: E402
from sparcomm.reducer import GradientReducer  # noqa: E402


@pytest.fixture(autouse=True)
def two_devices(monkeypatch):
    if emulated():
        monkeypatch.setenv("SPARCOMM_HOST_CUPY_DEVICES", "2")
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")


def _x() -> np.ndarray:
    return np.random.default_rng(8).standard_normal(3000).astype(np.float32)


@pytest.mark.parametrize("make_codec", [lambda: TopK(density=0.01), lambda: QSGD(bits=4)])
def test_codecs_and_collectives_on_device_1(make_codec):
    x = _x()
    expected = sparcomm.allreduce(x, codec=make_codec(), comm=MPI.COMM_SELF, key="w", step=0)
    with cupy.cuda.Device(1):
        got = sparcomm.allreduce(
            cupy.asarray(x), codec=make_codec(), comm=MPI.COMM_SELF, key="w", step=0
        )
    assert got.device.id == 1
    assert cupy.asnumpy(got).tobytes() == np.asarray(expected).tobytes()


def test_gradient_reducer_keeps_the_callers_device():
    # The progress thread has its own current device (per thread in CUDA): the reducer
    # must switch to the gradients' device there.
    x = _x()
    reducer = GradientReducer(ErrorFeedback(TopK(density=0.01)), MPI.COMM_SELF)
    expected = reducer.reduce({"w": x})["w"]
    reducer.close()
    with cupy.cuda.Device(1):
        reducer = GradientReducer(ErrorFeedback(TopK(density=0.01)), MPI.COMM_SELF)
        try:
            got = reducer.reduce({"w": cupy.asarray(x)})["w"]
        finally:
            reducer.close()
    assert got.device.id == 1
    assert cupy.asnumpy(got).tobytes() == np.asarray(expected).tobytes()


def test_gradient_reducer_refuses_gradients_on_two_devices():
    reducer = GradientReducer(TopK(density=0.01), MPI.COMM_SELF, overlap=False)
    try:
        reducer.setup([("a", (100,), np.float32), ("b", (100,), np.float32)])
        reducer.submit("a", cupy.ones(100, np.float32))
        with cupy.cuda.Device(1):
            b = cupy.ones(100, np.float32)
        with pytest.raises(ValueError, match="is on GPU 1, this step's other gradients on GPU 0"):
            reducer.submit("b", b)
    finally:
        reducer.close()
