"""The Numba CPU kernels equal their NumPy references bit for bit (kernels/reference.py).

Buckets are shrunk (1, 7, 512, larger than n, larger than a parallel task) so the
multi-bucket, short-last-bucket, two-pass and fused paths all run on small inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sparcomm.kernels import cpu
from sparcomm.kernels import reference as ref
from sparcomm.kernels.cpu._common import CHUNK

DTYPES = [np.float32, np.float64]
SIZES = [1, 7, 511, 513, 20_003]
BIG = 2**20 + 3
STREAM = 0xF00DFACE_12345678  # above 2**63: the uint64 path of the stream key


def bucket_cases(n: int) -> list[int]:
    # 1 and 7: groups of 8 straddle buckets; 512: the default; n + 5: one short bucket;
    # CHUNK + 8: a bucket larger than a parallel task (norms first, then quantise).
    return sorted({1, 7, 512, n + 5, CHUNK + 8})


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes: +0.0 vs -0.0 and NaN payloads count."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def gradient(n: int, dtype: type, seed: int = 0) -> np.ndarray:
    """Normal values with exact zeros, -0.0 and repeated values mixed in."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(dtype)
    x[::11] = 0.0
    x[5::13] = -0.0
    x[3::17] = x[0]
    return x


def n_buckets(n: int, bucket: int) -> int:
    return -(-n // bucket)


def packed_size(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def run_both(name: str, *args: np.ndarray | int | float) -> tuple[list, list, object, object]:
    """Call kernel ``name`` on copies of ``args`` with cpu and reference; return outputs."""
    cpu_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    ref_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    got = getattr(cpu, name)(*cpu_args)
    want = getattr(ref, name)(*ref_args)
    return cpu_args, ref_args, got, want


def assert_outputs_equal(cpu_args: list, ref_args: list, first_out: int) -> None:
    for position, (a, b) in enumerate(zip(cpu_args[first_out:], ref_args[first_out:], strict=True)):
        assert same_bits(a, b), f"output argument {first_out + position} differs"


# --------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 511, 513, 3 * CHUNK + 5])
def test_pack_unpack_match_reference(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    fields = rng.integers(0, 256, n, dtype=np.uint8)  # high bits must be ignored
    out = np.full(packed_size(n, bits), 0xAA, dtype=np.uint8)
    cpu_args, ref_args, _, _ = run_both("pack_bits", fields, bits, out)
    assert_outputs_equal(cpu_args, ref_args, 2)
    packed = cpu_args[2]
    unpacked = np.empty(n, dtype=np.uint8)
    cpu_args, ref_args, _, _ = run_both("unpack_bits", packed, bits, unpacked)
    assert_outputs_equal(cpu_args, ref_args, 2)
    assert np.array_equal(cpu_args[2], fields & ((1 << bits) - 1))


def test_pack_layout_is_lsb_first() -> None:
    # Fields 1, 2, 3 at 3 bits: 001 010 011 -> bits 0..8 = 1,0,0, 0,1,0, 1,1,0.
    out = np.empty(2, dtype=np.uint8)
    cpu.pack_bits(np.array([1, 2, 3], dtype=np.uint8), 3, out)
    assert out.tolist() == [0b11010001, 0b0]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(0, 255), min_size=1, max_size=300))
def test_pack_round_trip_property(bits: int, values: list[int]) -> None:
    fields = np.array(values, dtype=np.uint8) & np.uint8((1 << bits) - 1)
    packed = np.empty(packed_size(fields.size, bits), dtype=np.uint8)
    cpu.pack_bits(fields, bits, packed)
    back = np.empty(fields.size, dtype=np.uint8)
    cpu.unpack_bits(packed, bits, back)
    assert np.array_equal(back, fields)
    # Unused trailing bits are zero.
    tail = fields.size * bits % 8
    if tail:
        assert packed[-1] >> tail == 0


# --------------------------------------------------------------------- reductions


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_max_abs_matches_reference(dtype: type, n: int) -> None:
    x = gradient(n, dtype)
    for bucket in bucket_cases(n):
        out = np.empty(n_buckets(n, bucket), dtype=dtype)
        cpu_args, ref_args, _, _ = run_both("max_abs", x, bucket, out)
        assert_outputs_equal(cpu_args, ref_args, 2)


def test_max_abs_large_bucket_split_across_tasks() -> None:
    x = gradient(BIG, np.float32)
    x[BIG - 11] = -50.0  # the maximum sits at the very end of the first, long bucket
    out = np.empty(2, dtype=np.float32)
    cpu.max_abs(x, BIG - 10, out)
    assert out.tolist() == [50.0, float(np.abs(x[-10:]).max())]


@pytest.mark.parametrize("dtype", DTYPES)
def test_stream_read_is_the_sum(dtype: type) -> None:
    x = gradient(BIG, dtype)
    total = cpu.stream_read(x)
    # Summation orders differ: bound by n * eps * sum |x| (a loose, order-free bound).
    bound = BIG * np.finfo(dtype).eps * float(np.abs(x).sum(dtype=np.float64))
    assert abs(total - float(np.sum(x, dtype=np.float64))) <= bound


# --------------------------------------------------------------------- QSGD


QSGD_FORMATS = [(1, 2), (3, 3), (7, 4), (127, 8)]  # (levels, bits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("norm", [0, 1])
def test_qsgd_matches_reference(dtype: type, n: int, norm: int) -> None:
    x = gradient(n, dtype, seed=n)
    for bucket in bucket_cases(n):
        for levels, bits in QSGD_FORMATS:
            scales = np.empty(n_buckets(n, bucket), dtype=dtype)
            packed = np.empty(packed_size(n, bits), dtype=np.uint8)
            args = (x, levels, bits, bucket, norm, STREAM, scales, packed)
            cpu_args, ref_args, _, _ = run_both("qsgd_encode", *args)
            assert_outputs_equal(cpu_args, ref_args, 6)
            out = np.empty(n, dtype=dtype)
            args = (cpu_args[7], cpu_args[6], levels, bits, bucket, out)
            dec_cpu, dec_ref, _, _ = run_both("qsgd_decode", *args)
            assert_outputs_equal(dec_cpu, dec_ref, 5)


@pytest.mark.parametrize("norm", [0, 1])
def test_qsgd_matches_reference_large(norm: int) -> None:
    x = gradient(BIG, np.float32)
    for bucket in (512, 3 * CHUNK + 1):
        scales = np.empty(n_buckets(BIG, bucket), dtype=np.float32)
        packed = np.empty(packed_size(BIG, 4), dtype=np.uint8)
        cpu_args, ref_args, _, _ = run_both(
            "qsgd_encode", x, 7, 4, bucket, norm, STREAM, scales, packed
        )
        assert_outputs_equal(cpu_args, ref_args, 6)


def test_qsgd_zero_bucket_and_stream_changes_draws() -> None:
    x = np.zeros(16, dtype=np.float32)
    x[8:] = np.linspace(-1, 1, 8, dtype=np.float32)
    scales = np.empty(2, dtype=np.float32)
    packed = np.empty(packed_size(16, 4), dtype=np.uint8)
    cpu.qsgd_encode(x, 7, 4, 8, 0, 1, scales, packed)
    assert scales[0] == 0 and packed[:4].tolist() == [0, 0, 0, 0]
    rng = np.random.default_rng(3)
    y = rng.standard_normal(4096).astype(np.float32)
    draws = []
    for stream in (1, 2):
        s = np.empty(8, dtype=np.float32)
        p = np.empty(packed_size(4096, 4), dtype=np.uint8)
        cpu.qsgd_encode(y, 7, 4, 512, 0, stream, s, p)
        draws.append(p)
    assert not np.array_equal(draws[0], draws[1])


# --------------------------------------------------------------------- TernGrad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_terngrad_matches_reference(dtype: type, n: int) -> None:
    x = gradient(n, dtype, seed=n + 1)
    for bucket in bucket_cases(n):
        scales = np.empty(n_buckets(n, bucket), dtype=dtype)
        cpu.max_abs(x, bucket, scales)
        scales[0] = 0  # a zero scale encodes its bucket as zeros
        for clip in (np.inf, 0.5):
            packed = np.empty(packed_size(n, 2), dtype=np.uint8)
            args = (x, scales, bucket, clip, STREAM, packed)
            cpu_args, ref_args, _, _ = run_both("terngrad_encode", *args)
            assert_outputs_equal(cpu_args, ref_args, 5)
            out = np.empty(n, dtype=dtype)
            dec_cpu, dec_ref, _, _ = run_both("terngrad_decode", cpu_args[5], scales, bucket, out)
            assert_outputs_equal(dec_cpu, dec_ref, 3)


def test_terngrad_matches_reference_large() -> None:
    x = gradient(BIG, np.float32)
    scales = np.empty(n_buckets(BIG, 512), dtype=np.float32)
    cpu.max_abs(x, 512, scales)
    packed = np.empty(packed_size(BIG, 2), dtype=np.uint8)
    cpu_args, ref_args, _, _ = run_both("terngrad_encode", x, scales, 512, 1.0, STREAM, packed)
    assert_outputs_equal(cpu_args, ref_args, 5)


def test_terngrad_decode_maps_code_three_to_zero() -> None:
    packed = np.array([0b11100100], dtype=np.uint8)  # codes 0, 1, 2, 3
    out = np.empty(4, dtype=np.float32)
    cpu.terngrad_decode(packed, np.array([2.0], dtype=np.float32), 4, out)
    assert out.tolist() == [0.0, 2.0, -2.0, 0.0]


# --------------------------------------------------------------------- OneBit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [*SIZES, BIG])
def test_onebit_matches_reference(dtype: type, n: int) -> None:
    if n == BIG and dtype == np.float64:
        pytest.skip("one large size is enough")
    x = gradient(n, dtype, seed=n + 2)
    for bucket in bucket_cases(n) if n != BIG else [512, 3 * CHUNK + 1]:
        nb = n_buckets(n, bucket)
        packed = np.empty(packed_size(n, 1), dtype=np.uint8)
        means = np.empty(2 * nb, dtype=dtype)
        cpu_args, ref_args, _, _ = run_both("onebit_encode", x, bucket, packed, means)
        assert_outputs_equal(cpu_args, ref_args, 2)
        out = np.empty(n, dtype=dtype)
        dec_cpu, dec_ref, _, _ = run_both("onebit_decode", cpu_args[2], cpu_args[3], bucket, out)
        assert_outputs_equal(dec_cpu, dec_ref, 3)


def test_onebit_all_negative_zero_bucket_has_positive_zero_mean() -> None:
    x = np.full(9, -0.0, dtype=np.float32)
    packed = np.empty(2, dtype=np.uint8)
    means = np.empty(2, dtype=np.float32)
    cpu.onebit_encode(x, 16, packed, means)
    assert packed.tolist() == [0, 0]
    assert not np.signbit(means).any() and means.tolist() == [0.0, 0.0]


# --------------------------------------------------------------------- scatter_add


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_scatter_add_matches_reference(dtype: type, index_dtype: type) -> None:
    rng = np.random.default_rng(7)
    indices = rng.integers(0, 50, 400).astype(index_dtype)  # many duplicates
    values = rng.standard_normal(400).astype(dtype)
    out = rng.standard_normal(50).astype(dtype)
    cpu_args, ref_args, _, _ = run_both("scatter_add", indices, values, out)
    assert_outputs_equal(cpu_args, ref_args, 2)


# --------------------------------------------------------------------- add / subtract


def elementwise_operands(n: int, dtype: type, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gradient values with special pairs at every third position: subnormal results
    (from subnormal and from normal operands), signed zeros, NaN, inf, overflow."""
    info = np.finfo(dtype)
    tiny, normal, big = info.smallest_subnormal, info.tiny, info.max
    pairs = np.array(
        [
            (3 * tiny, -5 * tiny),
            (1.5 * normal, -normal),
            (1.5 * normal, normal),
            (0.0, -0.0),
            (-0.0, -0.0),
            (-0.0, 0.0),
            (np.nan, 1.0),
            (np.inf, -np.inf),
            (np.inf, np.inf),
            (big, big),
        ],
        dtype=dtype,
    )
    if n == 0:
        return np.empty(0, dtype), np.empty(0, dtype)
    a, b = gradient(n, dtype, seed), gradient(n, dtype, seed + 1)
    slots = np.arange(0, n, 3)
    chosen = pairs[np.arange(slots.size) % len(pairs)]
    a[slots], b[slots] = chosen[:, 0], chosen[:, 1]
    return a, b


def values_equal(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit for bit, but any NaN matches any NaN (the contract leaves NaN bits open)."""
    nan = np.isnan(want)
    return np.array_equal(np.isnan(got), nan) and same_bits(got[~nan], want[~nan])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["add", "subtract"])
@pytest.mark.parametrize("n", [0, 1, 7, 20_003, BIG])  # BIG: the parallel path
def test_elementwise_matches_reference(dtype: type, name: str, n: int) -> None:
    a, b = elementwise_operands(n, dtype, seed=n)
    expected = np.empty(n, dtype)
    getattr(ref, name)(a, b, expected)
    kernel = getattr(cpu, name)
    out = np.full(n, 7.0, dtype)
    kernel(a, b, out)
    assert values_equal(out, expected)
    for in_place in ("a", "b"):
        x, y = a.copy(), b.copy()
        kernel(x, y, x if in_place == "a" else y)
        assert values_equal(x if in_place == "a" else y, expected)
        assert same_bits(y if in_place == "a" else x, b if in_place == "a" else a)
    x = a.copy()
    kernel(x, x, x)
    both = np.empty(n, dtype)
    getattr(ref, name)(a, a, both)
    assert values_equal(x, both)


def test_elementwise_keeps_subnormals() -> None:
    tiny = np.finfo(np.float32).smallest_subnormal
    a = np.array([3, 1, -8] * 30_000, np.float32) * tiny
    b = np.array([2, 1, 5] * 30_000, np.float32) * tiny
    out = np.empty_like(a)
    cpu.subtract(a, b, out)
    assert np.array_equal(out, np.array([1, 0, -13] * 30_000, np.float32) * tiny)
    assert out[0] != 0


def test_elementwise_rejects_bad_operands() -> None:
    x = np.ones(10, np.float32)
    with pytest.raises(TypeError, match="share one dtype, got float32, float64, float32"):
        cpu.add(x, np.ones(10), np.empty(10, np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32 or float64, got int64"):
        cpu.subtract(x, x, np.empty(10, np.int64))
    with pytest.raises(ValueError, match="same size, got 10, 10, 9"):
        cpu.add(x, x, np.empty(9, np.float32))
    with pytest.raises(ValueError, match="1-D and C-contiguous"):
        cpu.add(x.reshape(2, 5), x.reshape(2, 5), np.empty((2, 5), np.float32))
    with pytest.raises(TypeError, match="b must be a numpy.ndarray, got builtins.list"):
        cpu.add(x, [1.0] * 10, np.empty(10, np.float32))
    with pytest.raises(ValueError, match="out is read-only"):
        frozen = np.empty(10, np.float32)
        frozen.flags.writeable = False
        cpu.add(x, x, frozen)
    buffer = np.arange(11, dtype=np.float32)
    before = buffer.copy()
    with pytest.raises(ValueError, match="out partly overlaps a"):
        cpu.add(buffer[:10], x, buffer[1:])
    with pytest.raises(ValueError, match="out partly overlaps b"):
        cpu.subtract(x, buffer[1:], buffer[:10])
    assert same_bits(buffer, before)  # rejected before any write


# --------------------------------------------------------------------- divide_scalar


def divide_operands(n: int, dtype: type) -> np.ndarray:
    """Values whose quotients by 3 or 4 include subnormals, zeros, inf and NaN."""
    info = np.finfo(dtype)
    special = np.array(
        [
            info.tiny,
            -info.tiny * 3,
            info.smallest_subnormal * 7,
            -0.0,
            0.0,
            info.max,
            np.inf,
            -np.inf,
            np.nan,
            1.0,
        ],
        dtype=dtype,
    )
    values = np.random.default_rng(n).standard_normal(n).astype(dtype)
    values[::7] = np.resize(special, values[::7].size)
    return values


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 7, 1000, (1 << 16) + 3, 3 * (1 << 16) + 1])
@pytest.mark.parametrize("divisor", [3, 4, 0.1])
def test_divide_scalar_matches_reference(dtype: type, n: int, divisor: float) -> None:
    x = divide_operands(n, dtype)
    expected = np.empty_like(x)
    ref.divide_scalar(x, divisor, expected)
    out = np.empty_like(x)
    cpu.divide_scalar(x, divisor, out)
    assert out.tobytes() == expected.tobytes()
    cpu.divide_scalar(x, divisor, x)  # in place
    assert x.tobytes() == expected.tobytes()


def test_divide_scalar_keeps_subnormal_quotients() -> None:
    tiny = np.finfo(np.float32).smallest_subnormal
    x = np.full((1 << 16) + 5, 12 * tiny, np.float32)  # the parallel path
    cpu.divide_scalar(x, 4, x)
    assert np.all(x == 3 * tiny)


def test_divide_scalar_rejects_bad_arguments() -> None:
    x = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="finite and non-zero, got 0"):
        cpu.divide_scalar(x, 0, x)
    with pytest.raises(ValueError, match="finite and non-zero, got nan"):
        cpu.divide_scalar(x, float("nan"), x)
    with pytest.raises(TypeError, match="divisor must be a real number, got str"):
        cpu.divide_scalar(x, "4", x)
    with pytest.raises(TypeError, match="share one dtype"):
        cpu.divide_scalar(x, 4, np.empty(10))
    with pytest.raises(ValueError, match="same size"):
        cpu.divide_scalar(x, 4, np.empty(9, np.float32))
    buffer = np.ones(11, np.float32)
    with pytest.raises(ValueError, match="partly overlaps"):
        cpu.divide_scalar(buffer[:10], 4, buffer[1:])
