"""``sparcomm.kernels.gpu`` on a real device, bit for bit against the NumPy reference.

The same bodies as ``test_emulated.py`` (``_gpu_cases``), now through CuPy and NVRTC with
the production launch shape (256-thread blocks, a grid of a few blocks per SM), plus
sizes large enough that every grid-stride loop takes several trips.  Skipped without
CuPy or a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from _gpu_skip import emulated, require_gpu

cupy = require_gpu()
EMULATED = emulated()

from _gpu_cases import (  # noqa: E402
    DECODERS,
    SIZES,
    Device,
    case_decode_accumulate,
    case_decode_rejects_accumulate,
    case_elementwise,
    case_max_abs,
    case_merge,
    case_merge_streams,
    case_onebit,
    case_pack,
    case_qsgd,
    case_scatter_add,
    case_stream_read,
    case_terngrad,
    case_topk,
    case_uniform,
    elementwise_operands,
    gradient_like,
    values_equal,
)
from sparcomm.kernels import gpu, reference  # noqa: E402

DTYPES = (np.float32, np.float64)


def scaled(n: int) -> int:
    """``n`` on a GPU; about n / 50 (still awkward) on the host CUDA emulator."""
    return n // 50 + 3 if EMULATED else n


# More elements than one pass of the capped grid covers (on the emulator: over two passes of
# its small grid, a few thousand elements).
PASS = gpu.runtime.max_blocks * gpu.runtime.block * 8
BIG = 2 * PASS + 345 if EMULATED else (1 << 20) + 12345
dev = Device(put=cupy.asarray, get=cupy.asnumpy, empty=lambda n, d: cupy.empty(n, dtype=d))


@pytest.mark.parametrize("start", [0, 2**32 - 100, 2**40 + 3])
def test_uniform(start):
    case_uniform(gpu, dev, start, 300)
    case_uniform(gpu, dev, start, BIG)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack(bits):
    for n in (0, 1, 7, 9, 1001, BIG):
        case_pack(gpu, dev, bits, n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_topk(dtype, index_dtype):
    for n in (1, 9, 1001, 3001, BIG):
        x = gradient_like(n, dtype, seed=n)
        for k in sorted({0, 1, min(n, 3), n // 100, n // 10, n // 2, n}):
            case_topk(gpu, dev, x, k, index_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_ties_and_non_finite(dtype):
    case_topk(gpu, dev, np.full(BIG, -2.5, dtype), BIG // 3, np.int64)
    x = gradient_like(BIG, dtype)
    x[[10, 500, BIG - 1]] = [np.inf, -np.inf, np.nan]
    case_topk(gpu, dev, x, min(5000, BIG // 2), np.int32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add(dtype):
    rng = np.random.default_rng(1)
    case_scatter_add(gpu, dev, np.arange(0, 3 * BIG, 3, dtype=np.int32), dtype)
    case_scatter_add(gpu, dev, np.sort(rng.integers(0, 5000, BIG)).astype(np.int64), dtype)
    case_scatter_add(gpu, dev, rng.integers(0, 4000, BIG).astype(np.int32), dtype)


def test_scatter_add_rejects_out_of_range():
    out = cupy.zeros(10, np.float32)
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        gpu.scatter_add(cupy.array([1, 10], np.int32), cupy.ones(2, np.float32), out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_abs(dtype):
    x = gradient_like(BIG, dtype)
    x[[5, 700]] = [-np.inf, np.nan]
    for bucket in (1, 7, 512, 2049, BIG, BIG + 1):
        case_max_abs(gpu, dev, x, bucket)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [0, 1])
def test_qsgd(dtype, norm):
    for n, bucket, levels in [
        (1001, 512, 7),
        (1001, 7, 1),
        (3001, 1000, 127),
        (9, 4, 3),
        (BIG, 512, 7),
        (BIG, 333, 15),
        (scaled(100_000), scaled(100_000), 3),
    ]:
        case_qsgd(gpu, dev, gradient_like(n, dtype, seed=n), levels, bucket, norm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_terngrad(dtype):
    for n, bucket, clip in [
        (1001, 1001, np.inf),
        (1001, 5, np.inf),
        (BIG, BIG, np.inf),
        (BIG, 512, 0.5),
        (9, 2, 0.1),
    ]:
        case_terngrad(gpu, dev, gradient_like(n, dtype, seed=n), bucket, clip)


@pytest.mark.parametrize("dtype", DTYPES)
def test_onebit(dtype):
    for n, bucket in [(1001, 512), (1001, 4), (BIG, 512), (BIG, 1000), (9, 2)]:
        case_onebit(gpu, dev, gradient_like(n, dtype, seed=n), bucket)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stream_read(dtype):
    for n in SIZES + (BIG,):
        case_stream_read(gpu, dev, gradient_like(n, dtype, specials=False))


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_merge(index_dtype):
    for na, nb in [(0, 5), (1, 1), (1001, 700), (BIG, scaled(50_000)), (scaled(300_000),) * 2]:
        case_merge(gpu, dev, na, nb, index_dtype, np.float32)
    case_merge(gpu, dev, 6000, 6000, index_dtype, np.float64)


def test_numpy_input_is_a_type_error():
    with pytest.raises(TypeError, match="cupy.ndarray"):
        gpu.max_abs(np.ones(4, np.float32), 2, cupy.empty(2, np.float32))


def test_modules_are_memoised():
    x = cupy.ones(100, np.float32)
    gpu.stream_read(x)
    before = dict(gpu.runtime._modules)
    gpu.stream_read(x)
    assert gpu.runtime._modules == before
    assert any(key[1] == "reduce" for key in before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_subnormal_buckets(dtype):
    # Would fail with CuPy's default -ftz=true build (kernels/cuda/nvrtc.py avoids it).
    tiny = np.finfo(dtype).smallest_subnormal
    x = (np.arange(1, 200) % 13 - 6).astype(dtype) * tiny
    for norm in (0, 1):
        case_qsgd(gpu, dev, x, 7, 16, norm)
    case_terngrad(gpu, dev, x, 16, np.inf)
    case_onebit(gpu, dev, x, 16)
    case_max_abs(gpu, dev, x, 16)
    case_topk(gpu, dev, x, 50, np.int32)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_merge_streams(index_dtype):
    long = [scaled(30_000), scaled(20_000), scaled(10_000), 5]
    for lengths in ([7], [5, 0, 9], long, [scaled(4000)] * 8):
        case_merge_streams(gpu, dev, lengths, index_dtype, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", DECODERS)
def test_decode_accumulate(dtype, codec):
    # Device arithmetic: the fused add / subtract must be unfused from QSGD's level * step
    # (-fmad=false) and keep subnormal sums (-ftz=false), bit for bit the two-step result.
    cases = [(0, 512), (1, 512), (7, 512), (511, 512), (513, 512), (BIG, 512), (BIG, 7)]
    for accumulate in (0, 1, -1):
        for n, bucket in cases:
            case_decode_accumulate(
                gpu, dev, codec, gradient_like(n, dtype, seed=n), bucket, accumulate
            )
    tiny = np.finfo(dtype).smallest_subnormal
    subnormal = (np.arange(1, 200) % 13 - 6).astype(dtype) * tiny
    non_finite = gradient_like(1001, dtype, seed=9)
    non_finite[[3, 700]] = [np.inf, -np.inf]
    for accumulate in (1, -1):
        case_decode_accumulate(gpu, dev, codec, subnormal, 16, accumulate)
        case_decode_accumulate(gpu, dev, codec, non_finite, 16, accumulate)


@pytest.mark.parametrize("codec", DECODERS)
def test_decode_rejects_bad_accumulate(codec):
    for n in (0, 9):
        case_decode_rejects_accumulate(gpu, dev, codec, n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["add", "subtract"])
def test_elementwise(dtype, name):
    for n in (0, 1, 7, 1001, BIG):
        a, b = elementwise_operands(n, dtype, seed=n)
        for out_is in ("new", "a", "b"):
            case_elementwise(gpu, dev, name, a, b, out_is)
    a, b = elementwise_operands(BIG, dtype, seed=5)
    for offsets in [(1, 1, 1), (0, 1, 0), (1, 0, 2)]:  # scalar head + vectors; all scalar
        case_elementwise(gpu, dev, name, a, b, "new", offsets)
        case_elementwise(gpu, dev, name, a, b, "a", offsets)


def test_elementwise_keeps_what_cupy_flushes():
    # cupy.subtract is built with -ftz=true; gpu.subtract (kernels/cuda/nvrtc.py) is not.
    tiny = np.finfo(np.float32).smallest_subnormal
    a = cupy.asarray(np.array([3, 1, -8] * 1000, np.float32) * tiny)
    b = cupy.asarray(np.array([2, 1, 5] * 1000, np.float32) * tiny)
    out = cupy.empty_like(a)
    gpu.subtract(a, b, out)
    assert np.array_equal(cupy.asnumpy(out), np.array([1, 0, -13] * 1000, np.float32) * tiny)


def test_elementwise_rejects_partial_overlap():
    buffer = cupy.arange(11, dtype=cupy.float32)
    with pytest.raises(ValueError, match="out partly overlaps a"):
        gpu.add(buffer[:10], cupy.ones(10, cupy.float32), buffer[1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divisor", [3, 4, 0.1])
def test_divide_scalar(dtype, divisor):
    for n in (0, 1, 7, BIG):
        x = elementwise_operands(n, dtype, seed=n)[0]
        expected = np.empty_like(x)
        reference.divide_scalar(x, divisor, expected)
        device_x = cupy.asarray(x)
        out = cupy.empty_like(device_x)
        gpu.divide_scalar(device_x, divisor, out)
        assert values_equal(cupy.asnumpy(out), expected)
        gpu.divide_scalar(device_x, divisor, device_x)  # in place
        assert values_equal(cupy.asnumpy(device_x), expected)


def test_divide_scalar_keeps_what_cupy_flushes():
    tiny = np.finfo(np.float32).smallest_subnormal
    x = cupy.asarray(np.full(3000, 12 * tiny, np.float32))
    gpu.divide_scalar(x, 4, x)
    assert np.array_equal(cupy.asnumpy(x), np.full(3000, 3 * tiny, np.float32))
    with pytest.raises(ValueError, match="finite and non-zero"):
        gpu.divide_scalar(x, 0, x)
