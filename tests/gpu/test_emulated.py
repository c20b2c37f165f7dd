"""The CUDA kernels and their launch logic, run on the host emulation (no GPU needed).

``kernels/cuda/_kernels.py`` drives ``kernels/cuda/*.cu`` compiled with g++ against
``cuda_emulator.h`` (each CUDA thread a fiber, switched at barriers and warp shuffles),
with 64-thread blocks and a grid cap of 3 blocks so that multi-block, multi-tile and
grid-stride paths all run on small inputs.  Every result is held bit for bit to
``sparcomm.kernels.reference``.  This checks the kernels' logic; the device build is
checked by ``tests/test_nvcc_compile.py`` and the device run by ``test_kernels.py``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

if shutil.which("g++") is None:
    pytest.skip("the CUDA emulation needs g++ (C++20)", allow_module_level=True)

from _gpu_cases import (  # noqa: E402
    DECODERS,
    SIZES,
    Device,
    bitwise_equal,
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
from _gpu_emulator import EmulatedRuntime  # noqa: E402
from sparcomm.kernels import cuda, reference  # noqa: E402

DTYPES = (np.float32, np.float64)


@pytest.mark.parametrize("start", [0, 2**32 - 100, 2**40 + 3])
def test_uniform(kernels, dev, start):
    case_uniform(kernels, dev, start, 300)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack(kernels, dev, bits):
    for n in (0, 1, 7, 9, 1001):
        case_pack(kernels, dev, bits, n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_topk(kernels, dev, dtype, index_dtype):
    for n in (1, 9, 1001, 3001):
        x = gradient_like(n, dtype, seed=n)
        for k in sorted({0, 1, min(n, 3), n // 10, n // 2, n}):
            case_topk(kernels, dev, x, k, index_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_all_ties_and_non_finite(kernels, dev, dtype):
    case_topk(kernels, dev, np.full(1001, -2.5, dtype), 300, np.int64)
    x = gradient_like(1001, dtype)
    x[[10, 500, 900]] = [np.inf, -np.inf, np.nan]
    case_topk(kernels, dev, x, 50, np.int32)  # count 3, and the selection still matches
    zeros = np.zeros(600, dtype)
    zeros[::2] = -0.0
    case_topk(kernels, dev, zeros, 17, np.int32)  # -0.0 == +0.0: lowest indices


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_single_digit_bins(kernels, dev, dtype):
    # Values differing only in their last mantissa bits exercise the final radix pass.
    one = np.array(1.0, dtype).view(np.uint32 if dtype == np.float32 else np.uint64)
    x = (one + np.arange(700, dtype=one.dtype) % 5).view(dtype)
    case_topk(kernels, dev, x, 333, np.int32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add(kernels, dev, dtype):
    rng = np.random.default_rng(1)
    case_scatter_add(kernels, dev, np.arange(0, 3000, 3, dtype=np.int32), dtype)  # ascending
    dup_sorted = np.sort(rng.integers(0, 50, 700)).astype(np.int64)
    case_scatter_add(kernels, dev, dup_sorted, dtype)
    case_scatter_add(kernels, dev, rng.integers(0, 40, 900).astype(np.int32), dtype)
    case_scatter_add(kernels, dev, rng.permutation(800).astype(np.int64), dtype)


def test_scatter_add_rejects_out_of_range(kernels):
    out = np.zeros(10, np.float32)
    for bad in (10, -1):
        with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
            kernels.scatter_add(np.array([1, bad], np.int32), np.ones(2, np.float32), out)
    assert not out.any()  # rejected before any write


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_abs(kernels, dev, dtype):
    x = gradient_like(3001, dtype)
    for bucket in (7, 512, 2049, 5000):  # 2049: a bucket split over two warp segments
        case_max_abs(kernels, dev, x, bucket)
    case_max_abs(kernels, dev, x[:100], 1)
    x[[5, 700]] = [-np.inf, np.nan]
    case_max_abs(kernels, dev, x, 512)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [0, 1])
def test_qsgd(kernels, dev, dtype, norm):
    for n, bucket, levels in [
        (1001, 512, 7),
        (1001, 7, 1),
        (3001, 1000, 127),
        (9, 4, 3),
        (100, 100, 15),
        (1, 1, 7),
    ]:
        case_qsgd(kernels, dev, gradient_like(n, dtype, seed=n), levels, bucket, norm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qsgd_zero_bucket(kernels, dev, dtype):
    x = gradient_like(1001, dtype)
    x[512:1001] = 0
    case_qsgd(kernels, dev, x, 7, 512, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_terngrad(kernels, dev, dtype):
    for n, bucket, clip in [
        (1001, 1001, np.inf),
        (1001, 5, np.inf),
        (3001, 512, 0.5),
        (9, 2, 0.1),
        (1, 1, np.inf),
    ]:
        case_terngrad(kernels, dev, gradient_like(n, dtype, seed=n), bucket, clip)


@pytest.mark.parametrize("dtype", DTYPES)
def test_onebit(kernels, dev, dtype):
    for n, bucket in [(1001, 512), (1001, 4), (3001, 3001), (9, 2), (1, 1)]:
        case_onebit(kernels, dev, gradient_like(n, dtype, seed=n), bucket)
    x = np.abs(gradient_like(100, dtype))  # buckets with no negative entries
    case_onebit(kernels, dev, x, 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stream_read(kernels, dev, dtype):
    for n in SIZES:
        case_stream_read(kernels, dev, gradient_like(n, dtype, specials=False))


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_merge(kernels, dev, index_dtype):
    for na, nb in [(0, 5), (5, 0), (1, 1), (1001, 700), (3000, 20)]:
        case_merge(kernels, dev, na, nb, index_dtype, np.float32)
    case_merge(kernels, dev, 600, 600, index_dtype, np.float64)


def test_merge_shared_everything(kernels):
    a_i = np.arange(0, 1500, 2, dtype=np.int32)
    a_v = np.ones(a_i.size, np.float32)
    out_i = np.empty(2 * a_i.size, np.int32)
    out_v = np.empty(2 * a_i.size, np.float32)
    count = kernels.merge_sum_two(a_i, a_v, a_i, a_v, out_i, out_v)
    assert count == a_i.size
    assert np.array_equal(out_i[:count], a_i) and np.all(out_v[:count] == 2)


def test_merge_rejects_unsorted(kernels):
    a = np.array([3, 1], np.int64)
    v = np.ones(2)
    with pytest.raises(ValueError, match="strictly ascending"):
        kernels.merge_sum_two(
            a, v, np.array([0], np.int64), np.ones(1), np.empty(3, np.int64), np.empty(3)
        )


# ------------------------------------------------------------------ input checks


def test_checks_types_and_sizes(kernels):
    x = np.ones(10, np.float32)
    with pytest.raises(TypeError, match="dtype float32 or float64, got int64"):
        kernels.topk(np.arange(10), 2, np.empty(2, np.int32), np.empty(2, np.float32))
    with pytest.raises(TypeError, match="cupy.ndarray"):
        kernels.topk([1.0, 2.0], 1, np.empty(1, np.int32), np.empty(1, np.float32))
    with pytest.raises(ValueError, match=r"k must be in \[0, 10\], got 11"):
        kernels.topk(x, 11, np.empty(11, np.int32), np.empty(11, np.float32))
    with pytest.raises(ValueError, match="out_values must have 2 elements, got 3"):
        kernels.topk(x, 2, np.empty(2, np.int32), np.empty(3, np.float32))
    with pytest.raises(TypeError, match="out_indices must have dtype int32 or int64"):
        kernels.topk(x, 2, np.empty(2, np.uint32), np.empty(2, np.float32))
    with pytest.raises(ValueError, match="1-D and C-contiguous"):
        kernels.max_abs(np.ones((2, 5), np.float32), 2, np.empty(1, np.float32))
    with pytest.raises(ValueError, match=r"bits must be in \[1, 8\], got 9"):
        kernels.pack_bits(np.zeros(4, np.uint8), 9, np.empty(5, np.uint8))
    with pytest.raises(ValueError, match=r"levels must be in \[1, 7\], got 8"):
        kernels.qsgd_encode(x, 8, 4, 5, 0, 0, np.empty(2, np.float32), np.empty(5, np.uint8))
    with pytest.raises(ValueError, match="norm must be 0"):
        kernels.qsgd_encode(x, 7, 4, 5, 2, 0, np.empty(2, np.float32), np.empty(5, np.uint8))
    with pytest.raises(ValueError, match="bucket must be in"):
        kernels.onebit_encode(x, 0, np.empty(2, np.uint8), np.empty(2, np.float32))
    with pytest.raises(ValueError, match="clip must be a number"):
        kernels.terngrad_encode(x, np.ones(1, np.float32), 10, np.nan, 0, np.empty(3, np.uint8))
    with pytest.raises(ValueError, match="room for 3 entries"):
        kernels.merge_sum_two(
            np.arange(2), np.ones(2), np.arange(1), np.ones(1), np.empty(2, np.int64), np.empty(2)
        )


def test_emulator_checks_argument_widths(runtime):
    # The emulator refuses what CuPy would pack wrongly: a Python int for an `int`.
    launch = runtime.function("packing", "sc_pack_bits", None, None)
    with pytest.raises(TypeError, match="numpy int32 scalar"):
        launch(1, 32, (np.zeros(8, np.uint8), np.int64(8), 3, np.zeros(3, np.uint8), np.int64(3)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_subnormal_buckets(kernels, dev, dtype):
    # Scales, steps and means are themselves subnormal here: the hardest case for a build
    # that flushes to zero (tests/gpu/test_nvrtc_build.py checks the device build does not).
    tiny = np.finfo(dtype).smallest_subnormal
    x = (np.arange(1, 200) % 13 - 6).astype(dtype) * tiny
    for norm in (0, 1):
        case_qsgd(kernels, dev, x, 7, 16, norm)
    case_terngrad(kernels, dev, x, 16, np.inf)
    case_onebit(kernels, dev, x, 16)
    case_max_abs(kernels, dev, x, 16)
    case_topk(kernels, dev, x, 50, np.int32)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_merge_streams(kernels, dev, index_dtype):
    for lengths in ([], [0], [7], [5, 0, 9], [300, 200, 100, 50, 25], [40] * 8, [1] * 5):
        case_merge_streams(kernels, dev, lengths, index_dtype, np.float32)
    case_merge_streams(kernels, dev, [600, 1, 333], index_dtype, np.float64)


def test_merge_streams_rejects_bad_offsets(kernels):
    buffers = [np.empty(4, np.int64), np.empty(4), np.empty(4, np.int64), np.empty(4)]
    with pytest.raises(ValueError, match="offsets must start at 0 and never decrease"):
        kernels.merge_sum_streams(np.arange(4), np.ones(4), np.array([0, 3, 2]), *buffers)
    with pytest.raises(ValueError, match="out_values needs room for 4 entries"):
        kernels.merge_sum_streams(
            np.arange(4),
            np.ones(4),
            np.array([0, 4]),
            buffers[0],
            np.empty(3),
            buffers[2],
            buffers[3],
        )


@pytest.mark.parametrize("block", [32, 256])
def test_other_block_sizes(block):
    # The device runs 256-thread blocks; the kernels must not depend on the block size.
    runtime = EmulatedRuntime(block=block, max_blocks=2)
    kernels = cuda.GpuKernels(runtime)
    dev = Device(put=np.array, get=np.array, empty=runtime.empty)
    for dtype in DTYPES:
        x = gradient_like(5003, dtype, seed=3)
        case_topk(kernels, dev, x, 777, np.int32)
        case_qsgd(kernels, dev, x, 7, 500, 0)
        case_onebit(kernels, dev, x, 300)
        case_terngrad(kernels, dev, x, 1000, np.inf)
        case_max_abs(kernels, dev, x, 5003)
        case_stream_read(kernels, dev, x)
        a, b = elementwise_operands(5003, dtype, seed=4)
        case_elementwise(kernels, dev, "subtract", a, b, "a", (1, 1, 1))
        case_elementwise(kernels, dev, "add", a, b, "new", (0, 0, 0))
        for codec, accumulate in zip(DECODERS, (1, -1, 1), strict=True):
            case_decode_accumulate(kernels, dev, codec, x, 500, accumulate)
    case_merge(kernels, dev, 5000, 3000, np.int64, np.float32)
    indices = np.random.default_rng(2).integers(0, 300, 4000).astype(np.int32)
    case_scatter_add(kernels, dev, indices, np.float32)
    case_pack(kernels, dev, 5, 4001)


# ------------------------------------------------------------------ decode + accumulate


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", DECODERS)
def test_decode_accumulate(kernels, dev, dtype, codec):
    # 511 / 513: a bucket +- 1; 3001 with bucket 7: more groups than the capped grid
    # (3 blocks of 64 threads) covers in one trip, and a short last bucket.
    cases = [(0, 512), (1, 512), (7, 512), (511, 512), (513, 512), (3001, 7)]
    for accumulate in (0, 1, -1):
        for n, bucket in cases:
            x = gradient_like(n, dtype, seed=n)
            case_decode_accumulate(kernels, dev, codec, x, bucket, accumulate)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", DECODERS)
def test_decode_accumulate_special_payloads(kernels, dev, dtype, codec):
    # Subnormal decoded values (subnormal scales / means), and a non-finite input that
    # makes a bucket's scale inf, so d is inf or NaN (0 * inf) there.
    tiny = np.finfo(dtype).smallest_subnormal
    subnormal = (np.arange(1, 200) % 13 - 6).astype(dtype) * tiny
    non_finite = gradient_like(200, dtype, seed=9)
    non_finite[[3, 150]] = [np.inf, -np.inf]
    for accumulate in (1, -1):
        case_decode_accumulate(kernels, dev, codec, subnormal, 16, accumulate)
        case_decode_accumulate(kernels, dev, codec, non_finite, 16, accumulate)


@pytest.mark.parametrize("codec", DECODERS)
def test_decode_rejects_bad_accumulate(kernels, dev, codec):
    for n in (0, 9):
        case_decode_rejects_accumulate(kernels, dev, codec, n)


# ------------------------------------------------------------------ add / subtract


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["add", "subtract"])
def test_elementwise(kernels, dev, dtype, name):
    # 3001: more 16-byte vectors than the capped grid (3 blocks of 64) covers in one trip.
    for n in (0, 1, 2, 7, 1001, 3001):
        a, b = elementwise_operands(n, dtype, seed=n)
        for out_is in ("new", "a", "b"):
            case_elementwise(kernels, dev, name, a, b, out_is)
    a, b = elementwise_operands(1001, dtype, seed=5)
    for offsets in [(1, 1, 1), (3, 3, 3), (0, 1, 0), (1, 0, 2), (0, 0, 1)]:
        case_elementwise(kernels, dev, name, a, b, "new", offsets)
        case_elementwise(kernels, dev, name, a, b, "a", offsets)
        case_elementwise(kernels, dev, name, a, b, "b", offsets)
    for n in (1, 2, 3):  # shorter than the scalar head before the first aligned vector
        a, b = elementwise_operands(n, dtype, seed=n)
        case_elementwise(kernels, dev, name, a, b, "new", (1, 1, 1))


@pytest.mark.parametrize("name", ["add", "subtract"])
def test_elementwise_all_operands_one_buffer(kernels, name):
    x, _ = elementwise_operands(1001, np.float32)
    expected = np.empty_like(x)
    getattr(reference, name)(x, x, expected)
    getattr(kernels, name)(x, x, x)
    assert values_equal(x, expected)


def test_elementwise_keeps_subnormals(kernels):
    # The reason for these kernels: cupy.add / -= flush these results to zero.
    tiny = np.finfo(np.float32).smallest_subnormal
    a = np.array([3, 1, -8] * 100, np.float32) * tiny
    b = np.array([2, 1, 5] * 100, np.float32) * tiny
    out = np.empty_like(a)
    kernels.subtract(a, b, out)
    assert np.array_equal(out, np.array([1, 0, -13] * 100, np.float32) * tiny)
    assert out[0] != 0 and out[2] != 0


def test_elementwise_rejects_bad_operands(kernels):
    x = np.ones(10, np.float32)
    with pytest.raises(TypeError, match="b must have dtype float32, got float64"):
        kernels.add(x, np.ones(10), np.empty(10, np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32, got float64"):
        kernels.subtract(x, x, np.empty(10))
    with pytest.raises(ValueError, match="out must have 10 elements, got 9"):
        kernels.add(x, x, np.empty(9, np.float32))
    with pytest.raises(TypeError, match="a must have dtype float32 or float64, got int64"):
        kernels.add(np.arange(10), np.arange(10), np.empty(10, np.int64))
    with pytest.raises(TypeError, match="cupy.ndarray"):
        kernels.add([1.0], np.ones(1, np.float32), np.empty(1, np.float32))
    buffer = np.arange(11, dtype=np.float32)
    before = buffer.copy()
    with pytest.raises(ValueError, match="out partly overlaps a"):
        kernels.add(buffer[:10], x, buffer[1:])
    with pytest.raises(ValueError, match="out partly overlaps b"):
        kernels.subtract(x, buffer[1:], buffer[:10])
    assert bitwise_equal(buffer, before)  # rejected before any write


# ------------------------------------------------------------------ divide_scalar


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divisor", [3, 4, 0.1])
def test_divide_scalar(kernels, dtype, divisor):
    for n in (0, 1, 7, 1001, 3001):  # 3001: more than one pass of the capped grid
        x, _ = elementwise_operands(n, dtype, seed=n)
        expected = np.empty_like(x)
        reference.divide_scalar(x, divisor, expected)
        out = np.empty_like(x)
        kernels.divide_scalar(x, divisor, out)
        assert values_equal(out, expected)
        kernels.divide_scalar(x, divisor, x)  # in place
        assert values_equal(x, expected)


def test_divide_scalar_keeps_subnormals_and_checks_arguments(kernels):
    # cupy's `/=` flushes these float32 quotients to zero; the kernel keeps them.
    tiny = np.finfo(np.float32).smallest_subnormal
    x = np.full(1001, 12 * tiny, np.float32)
    kernels.divide_scalar(x, 4, x)
    assert np.array_equal(x, np.full(1001, 3 * tiny, np.float32))
    with pytest.raises(ValueError, match="finite and non-zero, got 0"):
        kernels.divide_scalar(x, 0, x)
    with pytest.raises(TypeError, match="divisor must be a real number"):
        kernels.divide_scalar(x, "4", x)
    with pytest.raises(TypeError, match="out must have dtype float32, got float64"):
        kernels.divide_scalar(x, 4, np.empty(1001))
    with pytest.raises(ValueError, match="partly overlaps"):
        kernels.divide_scalar(x[:1000], 4, x[1:])
