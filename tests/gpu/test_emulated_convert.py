"""``GpuKernels.fp16_encode`` / ``fp16_decode`` / ``copy_finite`` (kernels/cuda/convert.cu)
on the host CUDA emulation, bit for bit against the NumPy reference (NumPy's ``astype``).

As in ``test_emulated.py``: the CUDA source compiled with g++ against
``cuda_emulator.h``, 64-thread blocks and a grid cap of 3 blocks, so every input larger
than 192 elements takes several grid-stride trips.  The float -> half conversion is
checked near every half value (each half widened, one ulp either side, the midpoints
between consecutive halves and their neighbours) in float32 and float64, and the
half -> float one on all 2**16 halves.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from _fp16_cases import UINT, all_halves, gradient, near_halves, same_bits, values_equal

if shutil.which("g++") is None:
    pytest.skip("the CUDA emulation needs g++ (C++20)", allow_module_level=True)

from sparcomm.kernels import (
    cuda,  # noqa: E402
    reference,  # noqa: E402
)

DTYPES = (np.float32, np.float64)
SIZES = (1, 7, 191, 193, 5001)


def test_contract_names():
    module = cuda
    assert {"fp16_encode", "fp16_decode", "copy_finite"} <= set(module.CONTRACT)
    assert {"fp16_encode", "fp16_decode", "copy_finite"} <= set(dir(module.GpuKernels))


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_near_every_half(kernels, runtime, dtype):
    x = near_halves(dtype)
    got, want = np.empty(x.size, np.float16), np.empty(x.size, np.float16)
    got.view(np.uint16)[:] = 0xA5A5
    bad = kernels.fp16_encode(x, got)
    bad_reference = reference.fp16_encode(x, want)
    assert same_bits(got, want)
    assert bad == bad_reference > 0
    assert runtime.launches[-1] == ("sc_fp16_encode", 3, 64)  # grid capped: grid-stride


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_encode_sizes(kernels, dtype, n):
    x = gradient(n, dtype, seed=n)
    if n > 100:
        x[[3, n // 2]] = [np.nan, 1e5]
    got, want = np.empty(n, np.float16), np.empty(n, np.float16)
    bad = kernels.fp16_encode(x, got)
    assert bad == reference.fp16_encode(x, want)
    assert same_bits(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_every_half(kernels, dtype):
    halves = all_halves()
    got, want = np.empty(halves.size, dtype), np.empty(halves.size, dtype)
    kernels.fp16_decode(halves, got)
    reference.fp16_decode(halves, want)
    assert same_bits(got, want)  # NaN payloads too: stored as bit patterns


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [1, -1])
def test_decode_accumulate_every_half(kernels, dtype, accumulate):
    halves = all_halves()
    rng = np.random.default_rng(11)
    base = (rng.standard_normal(halves.size) * np.exp(rng.uniform(-25, 12, halves.size))).astype(
        dtype
    )
    with np.errstate(invalid="ignore"):
        base[::97] = -halves.astype(dtype)[::97] * accumulate  # exact zero results
    base[1::101] = np.finfo(dtype).smallest_subnormal
    got, want = base.copy(), base.copy()
    kernels.fp16_decode(halves, got, accumulate)
    reference.fp16_decode(halves, want, accumulate)
    assert values_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_copy_finite(kernels, dtype, n):
    x = gradient(n, dtype, seed=n)
    out = np.empty_like(x)
    assert kernels.copy_finite(x, out) == 0
    assert same_bits(out, x)
    if n > 100:
        x[[0, 77, n - 1]] = [np.inf, np.nan, -np.inf]
        x.view(UINT[dtype])[5] = 0x7F800001 if dtype == np.float32 else 0x7FF0000000000001
        assert kernels.copy_finite(x, out) == 4 == reference.copy_finite(x, np.empty_like(x))
        assert same_bits(out, x)


def test_empty(kernels, runtime):
    before = len(runtime.launches)
    assert kernels.fp16_encode(np.zeros(0, np.float32), np.zeros(0, np.float16)) == 0
    kernels.fp16_decode(np.zeros(0, np.float16), np.zeros(0), 1)
    assert kernels.copy_finite(np.zeros(0), np.zeros(0)) == 0
    assert len(runtime.launches) == before


def test_errors(kernels):
    x = np.zeros(5, np.float32)
    half = np.zeros(5, np.float16)
    with pytest.raises(TypeError, match="x must have dtype float32 or float64, got int64"):
        kernels.fp16_encode(np.arange(5), half)
    with pytest.raises(TypeError, match="out must have dtype float16, got float32"):
        kernels.fp16_encode(x, x.copy())
    with pytest.raises(ValueError, match="out must have 5 elements, got 4"):
        kernels.fp16_encode(x, np.zeros(4, np.float16))
    with pytest.raises(TypeError, match="half must have dtype float16, got float32"):
        kernels.fp16_decode(x, x.copy())
    with pytest.raises(ValueError, match="half must have 5 elements, got 6"):
        kernels.fp16_decode(np.zeros(6, np.float16), x)
    with pytest.raises(TypeError, match="out must have dtype float32, got float64"):
        kernels.copy_finite(x, np.zeros(5))
    with pytest.raises(ValueError, match=r"x must be 1-D and C-contiguous, got shape \(2, 3\)"):
        kernels.copy_finite(np.zeros((2, 3), np.float32), np.zeros(6, np.float32))
    with pytest.raises(TypeError, match="x must be a cupy.ndarray on the GPU, got builtins.list"):
        kernels.fp16_encode([1.0], half[:1])
    buffer = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="out overlaps x: .* out must be a separate buffer"):
        kernels.fp16_encode(buffer[:16], buffer.view(np.float16)[:16])
    with pytest.raises(ValueError, match="out overlaps half"):
        kernels.fp16_decode(buffer[8:16].view(np.float16), buffer[:16])
    with pytest.raises(ValueError, match="out overlaps x"):
        kernels.copy_finite(buffer, buffer)


@pytest.mark.parametrize(("bad", "shown"), [(2, "2 (int)"), (True, "True (bool)"), (1.0, "1.0")])
@pytest.mark.parametrize("n", [0, 5])
def test_decode_rejects_accumulate(kernels, bad, shown, n):
    out = np.zeros(n, np.float32)
    with pytest.raises(ValueError, match=r"accumulate must be 0 \(out = decoded\), 1 .*got "):
        kernels.fp16_decode(np.ones(n, np.float16), out, bad)
    with pytest.raises(ValueError) as cpu_error:
        reference.fp16_decode(np.ones(n, np.float16), out, bad)
    with pytest.raises(ValueError) as gpu_error:
        kernels.fp16_decode(np.ones(n, np.float16), out, bad)
    assert str(gpu_error.value) == str(cpu_error.value)  # the same message everywhere
    assert shown in str(gpu_error.value)
    assert not out.any()
