"""``sparcomm.kernels.gpu.std`` on a real device: the same float64 as the CPU and reference.

The contract fixes the summation order, so the device result equals ``kernels.cpu.std``
bit for bit, at the production launch shape (256-thread blocks, a grid capped at a few
blocks per SM, so large inputs take several grid-stride trips).  TernGrad's clipping
threshold ``clip * std(x)`` is therefore the same on both devices, and so is a clipped
payload.  Skipped without CuPy or a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _gpu_skip import emulated, require_gpu

cupy = require_gpu()

from sparcomm.kernels import cpu, gpu, reference  # noqa: E402

from sparcomm import TernGrad  # noqa: E402

BLOCK = reference.STD_BLOCK
# On the host emulation (one thread per CUDA thread) keep to a few blocks.
LARGE = 5 * BLOCK + 3 if emulated() else (1 << 24) + 12345
SIZES = (1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, LARGE)


def same_float(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return np.float64(a).view(np.uint64) == np.float64(b).view(np.uint64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", SIZES)
def test_std_equals_cpu(dtype, n):
    x = (np.random.default_rng(n).standard_normal(n) * 0.03 + 0.01).astype(dtype)
    got = gpu.std(cupy.asarray(x))
    assert isinstance(got, float)
    assert same_float(got, cpu.std(x))
    if n < 1 << 20:  # the reference is slow on the largest input
        assert same_float(got, reference.std(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_std_specials(dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    subnormal = (np.random.default_rng(3).integers(-99, 99, BLOCK + 5) * tiny).astype(dtype)
    assert same_float(gpu.std(cupy.asarray(subnormal)), cpu.std(subnormal))
    for bad in (np.nan, np.inf):
        x = np.ones(2 * BLOCK + 1, dtype)
        x[BLOCK + 2] = bad
        assert math.isnan(gpu.std(cupy.asarray(x)))
    with pytest.raises(ValueError, match=r"std of an empty array is undefined \(n = 0\)"):
        gpu.std(cupy.zeros(0, dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_terngrad_clip_threshold_and_payload_match_cpu(dtype):
    rng = np.random.default_rng(11)
    n = 3 * BLOCK + 7 if emulated() else (1 << 22) + 5
    x = rng.standard_normal(n).astype(dtype)
    x[::1000] *= 40  # outliers beyond 2.5 sigma, so the clip binds
    codec = TernGrad(clip=2.5, seed=4)
    device_x = cupy.asarray(x)
    threshold = codec.clip_threshold(x)
    assert threshold < float(np.abs(x).max())
    assert same_float(codec.clip_threshold(device_x), threshold)
    on_cpu = codec.encode(x, key="w", step=1)
    on_gpu = codec.encode(device_x, key="w", step=1)
    assert cupy.asnumpy(on_gpu.to_bytes()).tobytes() == on_cpu.to_bytes().tobytes()
