"""``sparcomm.kernels.gpu`` FP16 conversion and checked copy on a device, and the FP16 /
NoCompression codecs on CuPy arrays: bit for bit the CPU kernels and NumPy's ``astype``.

Production launch shape (256-thread blocks, a grid capped at a few blocks per SM), so
the large sizes take several grid-stride trips; on the host CUDA emulator
(``test_host_cupy.py``) the sizes shrink.  Skipped without CuPy or a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from _fp16_cases import UINT, all_halves, gradient, near_halves, same_bits, values_equal
from _gpu_skip import emulated, require_gpu

cupy = require_gpu()
EMULATED = emulated()

from sparcomm.kernels import cpu, gpu, reference  # noqa: E402

from sparcomm import FP16, ErrorFeedback, NoCompression  # noqa: E402

DTYPES = (np.float32, np.float64)
LARGE = 20_011 if EMULATED else (1 << 24) + 12_345
SIZES = (1, 7, 4099, LARGE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_near_every_half(dtype):
    x = near_halves(dtype)
    out = cupy.empty(x.size, dtype=np.float16)
    bad = gpu.fp16_encode(cupy.asarray(x), out)
    want = np.empty(x.size, np.float16)
    assert bad == reference.fp16_encode(x, want) > 0
    assert same_bits(cupy.asnumpy(out), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_encode_equals_cpu(dtype, n):
    x = gradient(n, dtype, seed=n)
    if n > 100:
        x[[2, n // 3, n - 1]] = [np.nan, -7e4, np.inf]
    out = cupy.empty(n, dtype=np.float16)
    want = np.empty(n, np.float16)
    assert gpu.fp16_encode(cupy.asarray(x), out) == cpu.fp16_encode(x, want)
    assert same_bits(cupy.asnumpy(out), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [0, 1, -1])
def test_decode_every_half(dtype, accumulate):
    halves = all_halves()
    base = gradient(halves.size, dtype, seed=4)
    base[1::101] = np.finfo(dtype).smallest_subnormal
    out = cupy.asarray(base)
    gpu.fp16_decode(cupy.asarray(halves), out, accumulate)
    want = base.copy()
    reference.fp16_decode(halves, want, accumulate)
    got = cupy.asnumpy(out)
    assert same_bits(got, want) if accumulate == 0 else values_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("accumulate", [0, -1])
def test_decode_equals_cpu(dtype, n, accumulate):
    half = gradient(n, np.float32, seed=n).astype(np.float16)
    base = gradient(n, dtype, seed=n + 1)
    out = cupy.asarray(base)
    gpu.fp16_decode(cupy.asarray(half), out, accumulate)
    cpu.fp16_decode(half, base, accumulate)
    assert values_equal(cupy.asnumpy(out), base)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_copy_finite_equals_cpu(dtype, n):
    x = gradient(n, dtype, seed=n)
    if n > 100:
        x[[0, n // 2]] = [-np.inf, np.nan]
        x.view(UINT[dtype])[3] = 0x7F800001 if dtype == np.float32 else 0x7FF0000000000001
    out = cupy.empty(n, dtype=dtype)
    assert gpu.copy_finite(cupy.asarray(x), out) == cpu.copy_finite(x, np.empty_like(x))
    assert same_bits(cupy.asnumpy(out), x)


def test_host_arrays_are_refused():
    x = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="x must be a cupy.ndarray on the GPU, got numpy"):
        gpu.fp16_encode(x, cupy.empty(4, dtype=np.float16))
    with pytest.raises(TypeError, match="half must be a cupy.ndarray on the GPU, got numpy"):
        gpu.fp16_decode(np.zeros(4, np.float16), cupy.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"accumulate must be 0 \(out = decoded\)"):
        gpu.fp16_decode(cupy.zeros(4, dtype=np.float16), cupy.zeros(4, dtype=np.float32), 2)


@pytest.mark.parametrize("codec", [FP16(), NoCompression()], ids=["FP16", "NoCompression"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_codec_payload_and_decode_match_cpu(codec, dtype):
    x = gradient(4096, dtype, seed=9).reshape(64, 64)
    host = codec.encode(x, key="w")
    device = codec.encode(cupy.asarray(x), key="w")
    assert same_bits(cupy.asnumpy(device.to_bytes()), host.to_bytes())
    base = gradient(4096, dtype, seed=10).reshape(64, 64)
    for accumulate in (0, 1, -1):
        want, out = base.copy(), cupy.asarray(base)
        codec.decode(host, want, accumulate=accumulate)
        codec.decode(device, out, accumulate=accumulate)
        assert values_equal(cupy.asnumpy(out), want)


def test_codec_overflow_raises_on_gpu():
    x = cupy.asarray(np.array([1.0, 7e4, -1e9, 3.0], np.float32))
    with pytest.raises(ValueError, match="x contains 2 non-finite values"):
        FP16().encode(x)
    with pytest.raises(ValueError, match="x contains 1 non-finite values"):
        NoCompression().encode(cupy.asarray(np.array([1.0, np.nan], np.float32)))


def test_error_feedback_fp16_on_gpu_matches_cpu():
    host, device = ErrorFeedback(FP16()), ErrorFeedback(FP16())
    for step in range(3):
        x = gradient(4099, np.float32, seed=step)
        a = host.encode(x, key="w")
        b = device.encode(cupy.asarray(x), key="w")
        assert same_bits(cupy.asnumpy(b.to_bytes()), a.to_bytes())
    assert same_bits(cupy.asnumpy(device.residual("w")), host.residual("w"))
