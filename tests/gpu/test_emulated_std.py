"""``GpuKernels.std`` (kernels/cuda/moments.cu) on the host CUDA emulation, bit for bit.

As in ``test_emulated.py``: the CUDA sources compiled with g++ against
``cuda_emulator.h``, small blocks and a grid cap of 3 blocks, so that inputs of a few
contract blocks (2**14 elements each) already take several grid-stride trips.  The
contract fixes the summation order, so the result equals ``reference.std`` exactly.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

if shutil.which("g++") is None:
    pytest.skip("the CUDA emulation needs g++ (C++20)", allow_module_level=True)

from _gpu_emulator import EmulatedRuntime  # noqa: E402
from sparcomm.kernels import reference  # noqa: E402
from sparcomm.kernels.cuda import CONTRACT, GpuKernels  # noqa: E402

BLOCK = reference.STD_BLOCK
DTYPES = (np.float32, np.float64)


def same_float(a: float, b: float) -> bool:
    """Equal bits, or both NaN (NaN payloads are not part of the contract)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return np.float64(a).view(np.uint64) == np.float64(b).view(np.uint64)


def gradient_like(n: int, dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 0.03 + 0.01).astype(dtype)


def test_block_matches_the_reference():
    assert GpuKernels.STD_BLOCK == BLOCK
    assert "std" in CONTRACT


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 7 * BLOCK + 13])
def test_std_equals_reference(kernels, runtime, dtype, n):
    x = gradient_like(n, dtype, seed=n)
    got = kernels.std(x)
    assert isinstance(got, float)
    assert same_float(got, reference.std(x))
    nblocks = -(-n // BLOCK)
    launches = runtime.launches[-4:]
    assert [name for name, _, _ in launches] == ["sc_std_block_sums", "sc_std_combine"] * 2
    assert launches[0][1] == min(3, nblocks)  # grid capped: grid-stride over blocks


@pytest.mark.parametrize("block", [32, 96])
def test_std_independent_of_the_launch_shape(block):
    # The contract's blocks are fixed: the CUDA block size and grid cap change nothing.
    kernels = GpuKernels(EmulatedRuntime(block=block, max_blocks=2))
    x = gradient_like(5 * BLOCK + 3, np.float32, seed=block)
    assert same_float(kernels.std(x), reference.std(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_std_subnormals_are_kept(kernels, dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    x = (np.random.default_rng(7).integers(-1000, 1000, BLOCK + 13) * tiny).astype(dtype)
    got = kernels.std(x)
    assert same_float(got, reference.std(x))
    if dtype == np.float32:
        assert got > 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_std_non_finite_propagates(kernels, dtype, bad):
    for where in (0, BLOCK + 4, -1):
        x = gradient_like(2 * BLOCK + 5, dtype)
        x[where] = bad
        assert math.isnan(kernels.std(x))


def test_std_zeros_and_overflow(kernels):
    zeros = np.zeros(BLOCK + 9, np.float32)
    zeros[::2] = -0.0
    assert same_float(kernels.std(zeros), 0.0)
    assert kernels.std(np.array([1e200, -1e200, 3.0])) == math.inf


def test_std_errors(kernels):
    with pytest.raises(ValueError, match=r"std of an empty array is undefined \(n = 0\)"):
        kernels.std(np.zeros(0, np.float32))
    with pytest.raises(TypeError, match="x must have dtype float32 or float64, got int64"):
        kernels.std(np.arange(5))
    with pytest.raises(ValueError, match=r"x must be 1-D and C-contiguous, got shape \(2, 3\)"):
        kernels.std(np.zeros((2, 3), np.float32))
