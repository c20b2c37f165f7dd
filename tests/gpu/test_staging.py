"""Pinned host staging of CuPy arrays (for MPI libraries that are not CUDA-aware).

Skipped without CuPy or a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from _gpu_skip import require_gpu

cupy = require_gpu()

from sparcomm.kernels.gpu.staging import PinnedStaging  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8])
def test_round_trip(dtype):
    staging = PinnedStaging()
    x = cupy.arange(10_001).astype(dtype)
    host = staging.to_host(x)
    assert isinstance(host, np.ndarray) and host.dtype == x.dtype
    assert np.array_equal(host, cupy.asnumpy(x))
    out = cupy.empty_like(x)
    staging.to_device(host, out)
    assert bool((out == x).all())


def test_buffers_are_reused_and_grow():
    staging = PinnedStaging()
    first = staging.buffer("send", 10_000)
    smaller = staging.buffer("send", 5_000)
    assert smaller.ctypes.data == first.ctypes.data
    held = staging.nbytes()
    staging.buffer("send", 10 * held)
    assert staging.nbytes() >= 10 * held
    staging.buffer("recv", 100)
    assert staging.nbytes() >= 10 * held + 100


def test_to_device_checks_the_output():
    staging = PinnedStaging()
    with pytest.raises(ValueError, match="C-contiguous float32 array of 4 elements"):
        staging.to_device(np.ones(4, np.float32), cupy.empty(5, np.float32))
    with pytest.raises(TypeError, match="cupy.ndarray"):
        staging.to_host(np.ones(3))
    with pytest.raises(TypeError, match="out must be a cupy.ndarray, got ndarray"):
        staging.to_device(np.ones(4, np.float32), np.empty(4, np.float32))
