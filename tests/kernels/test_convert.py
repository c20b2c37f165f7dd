"""``fp16_encode`` / ``fp16_decode`` / ``copy_finite``: Numba twins against the reference.

The reference *is* NumPy (``x.astype(numpy.float16)``, ``half.astype(out.dtype)``, a copy
and ``isfinite``), so holding ``kernels.cpu`` to it bit for bit holds it to NumPy.  The
float -> half test is exhaustive where that is cheap: every half value widened to float32
and float64, one ulp either side of each, and the midpoints between consecutive halves
(where round-to-nearest-even decides) with their neighbours, plus random bit patterns
across every exponent.  A few values are also checked against hand-computed bits, so the
reference itself is pinned.  Sizes cover 0, 1, 7 and the parallel path (more than one
task of ``_CHUNK`` elements).
"""

from __future__ import annotations

import numpy as np
import pytest
from _fp16_cases import UINT, all_halves, gradient, near_halves, same_bits, values_equal
from sparcomm.kernels import cpu
from sparcomm.kernels import reference as ref
from sparcomm.kernels.cpu.convert import _CHUNK

DTYPES = [np.float32, np.float64]
SIZES = [0, 1, 7, _CHUNK - 1, 3 * _CHUNK + 5]
ACCUMULATE_MESSAGE = (
    r"accumulate must be 0 \(out = decoded\), 1 \(out \+= decoded\) or -1 \(out -= decoded\), "
    r"got {got} \({kind}\); pass one of these ints"
)


def random_patterns(dtype, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.float32:
        return rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    # float64: every exponent is sampled, but most fall near the half range.
    sign = rng.integers(0, 2, n, dtype=np.uint64) << np.uint64(63)
    exponent = np.where(
        rng.random(n) < 0.8, rng.integers(1023 - 30, 1023 + 20, n), rng.integers(0, 2048, n)
    ).astype(np.uint64)
    mantissa = rng.integers(0, 1 << 52, n, dtype=np.uint64)
    return (sign | (exponent << np.uint64(52)) | mantissa).view(np.float64)


def encode_both(x: np.ndarray) -> tuple[np.ndarray, int, np.ndarray, int]:
    got, want = np.empty(x.size, np.float16), np.empty(x.size, np.float16)
    got.view(np.uint16)[:] = 0xA5A5  # a kernel that skips an element shows up
    return got, cpu.fp16_encode(x, got), want, ref.fp16_encode(x, want)


# ----------------------------------------------------------------------------- encode


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_exhaustive_near_every_half(dtype):
    x = near_halves(dtype)
    assert x.size > 4 * (1 << 16)
    got, bad, want, bad_ref = encode_both(x)
    assert same_bits(got, want)
    assert bad == bad_ref == int(np.count_nonzero(~np.isfinite(want)))
    # Round trip: a half widened and converted back is the same half (NaNs included).
    halves = all_halves()
    back = np.empty_like(halves)
    cpu.fp16_encode(halves.astype(dtype), back)
    assert same_bits(back, halves)


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_random_bit_patterns(dtype):
    x = random_patterns(dtype, 200_003, seed=1)
    got, bad, want, bad_ref = encode_both(x)
    assert same_bits(got, want)
    assert bad == bad_ref > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_encode_sizes(dtype, n):
    x = gradient(n, dtype, seed=n)
    got, bad, want, bad_ref = encode_both(x)
    assert same_bits(got, want)
    assert bad == bad_ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_hand_computed_bits(dtype):
    tiny = 2.0**-24  # the smallest subnormal half
    cases = [
        (1.0, 0x3C00),
        (-2.0, 0xC000),
        (0.0, 0x0000),
        (-0.0, 0x8000),
        (65504.0, 0x7BFF),  # the largest half
        (65519.0, 0x7BFF),  # below the midpoint to inf
        (65520.0, 0x7C00),  # the midpoint: ties to even, which is inf
        (-1e6, 0xFC00),
        (tiny, 0x0001),
        (tiny / 2, 0x0000),  # the midpoint between 0 and tiny: ties to even 0
        (tiny * 1.5, 0x0002),  # midpoint between 1 and 2 units: to even 2
        (tiny * 2.5, 0x0002),
        (2.0**-14 - tiny / 2, 0x0400),  # rounds up out of the subnormals
        (1.0 + 2.0**-11, 0x3C00),  # halfway to the next half: even stays
        (1.0 + 3 * 2.0**-11, 0x3C02),  # halfway, odd below: rounds up
        (1e-30, 0x0000),
        (float("inf"), 0x7C00),
        (float("-inf"), 0xFC00),
    ]  # a list, not a dict: 0.0 and -0.0 are one dict key
    x = np.array([value for value, _ in cases], dtype=dtype)
    got, bad, want, _ = encode_both(x)
    expected = np.array([bits for _, bits in cases], dtype=np.uint16)
    assert got.view(np.uint16).tolist() == expected.tolist()
    assert same_bits(want, got)
    assert bad == 4  # 65520, -1e6, inf, -inf


def test_encode_nan_payloads():
    # The top ten payload bits are kept; a payload only in the dropped bits becomes 1.
    x32 = np.array([0x7FC00000, 0x7F800001, 0xFFBFE000, 0x7F802000], np.uint32).view(np.float32)
    x64 = np.array([0x7FF8000000000000, 0x7FF0000000000001, 0xFFF7FC0000000000], np.uint64).view(
        np.float64
    )
    for x, expected in ((x32, [0x7E00, 0x7C01, 0xFDFF, 0x7C01]), (x64, [0x7E00, 0x7C01, 0xFDFF])):
        got, bad, want, _ = encode_both(x)
        assert got.view(np.uint16).tolist() == expected
        assert same_bits(got, want)
        assert bad == x.size


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_counts_non_finite_outputs(dtype):
    x = gradient(3 * _CHUNK + 5, dtype, seed=3)
    x[np.abs(x) > 60000] = 1.0
    out = np.empty(x.size, np.float16)
    assert cpu.fp16_encode(x, out) == 0
    x[[0, _CHUNK, 2 * _CHUNK + 9, x.size - 1]] = [np.nan, 7e4, -np.inf, -65520.0]
    assert cpu.fp16_encode(x, out) == 4 == ref.fp16_encode(x, np.empty_like(out))


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_every_half_exactly(dtype):
    halves = all_halves()
    got, want = np.full(halves.size, 7, dtype), np.empty(halves.size, dtype)
    cpu.fp16_decode(halves, got)
    ref.fp16_decode(halves, want)
    assert same_bits(got, want)  # NaN payloads too
    assert same_bits(want, halves.astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [1, -1])
def test_decode_accumulate_every_half(dtype, accumulate):
    halves = all_halves()
    rng = np.random.default_rng(5)
    base = (rng.standard_normal(halves.size) * np.exp(rng.uniform(-25, 12, halves.size))).astype(
        dtype
    )
    with np.errstate(invalid="ignore"):  # NaN halves
        base[::97] = -halves.astype(dtype)[::97] * accumulate  # exact zero results
    base[1::101] = np.finfo(dtype).smallest_subnormal
    base[2::103] = -0.0
    base[3::107] = np.inf
    got, want = base.copy(), base.copy()
    cpu.fp16_decode(halves, got, accumulate)
    ref.fp16_decode(halves, want, accumulate)
    assert values_equal(got, want)
    # The reference is the two-step identity of the contract: decode, then add/subtract.
    decoded = halves.astype(dtype)
    two_step = base.copy()
    (ref.add if accumulate == 1 else ref.subtract)(two_step, decoded, two_step)
    assert values_equal(want, two_step)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("accumulate", [0, 1, -1])
def test_decode_sizes(dtype, n, accumulate):
    half = gradient(n, np.float32, seed=n).astype(np.float16)
    base = gradient(n, dtype, seed=n + 1)
    got, want = base.copy(), base.copy()
    cpu.fp16_decode(half, got, accumulate)
    ref.fp16_decode(half, want, accumulate)
    assert values_equal(got, want)
    if accumulate == 0:
        assert same_bits(got, want)


# ----------------------------------------------------------------------------- copy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_copy_finite(dtype, n):
    x = gradient(n, dtype, seed=n)
    out = np.full(n, 3, dtype)
    assert cpu.copy_finite(x, out) == 0 == ref.copy_finite(x, np.empty_like(x))
    assert same_bits(out, x)
    if n >= 7:
        x[[0, n // 2, n - 1]] = [np.inf, -np.nan, -np.inf]
        x.view(UINT[dtype])[1] = 0x7F800001 if dtype == np.float32 else 0x7FF0000000000001
        assert cpu.copy_finite(x, out) == 4 == ref.copy_finite(x, np.empty_like(x))
        assert same_bits(out, x)


def test_copy_finite_keeps_nan_payloads():
    x = np.array([0x7F800001, 0xFFC01234, 0x3F800000], np.uint32).view(np.float32)
    out = np.empty_like(x)
    assert cpu.copy_finite(x, out) == 2
    assert same_bits(out, x)


# ----------------------------------------------------------------------------- errors


def test_errors():
    x = np.zeros(5, np.float32)
    half = np.zeros(5, np.float16)
    with pytest.raises(TypeError, match="x must have dtype float32 or float64, got int64"):
        cpu.fp16_encode(np.arange(5), half)
    with pytest.raises(TypeError, match="out must have dtype float16, got float32"):
        cpu.fp16_encode(x, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="out must have 5 elements, got 4"):
        cpu.fp16_encode(x, np.zeros(4, np.float16))
    with pytest.raises(ValueError, match=r"x must be 1-D and C-contiguous, got shape \(2, 3\)"):
        cpu.fp16_encode(np.zeros((2, 3), np.float32), np.zeros(6, np.float16))
    with pytest.raises(ValueError, match="x must be 1-D and C-contiguous, got shape"):
        cpu.copy_finite(np.zeros(10, np.float32)[::2], x)
    with pytest.raises(TypeError, match="x must be a numpy.ndarray, got builtins.list"):
        cpu.copy_finite([1.0, 2.0], x)
    with pytest.raises(TypeError, match="half must have dtype float16, got float32"):
        cpu.fp16_decode(x, x.copy())
    with pytest.raises(TypeError, match="out must have dtype float32 or float64, got float16"):
        cpu.fp16_decode(half, half.copy())
    with pytest.raises(ValueError, match="half must have 5 elements, got 6"):
        cpu.fp16_decode(np.zeros(6, np.float16), x)
    with pytest.raises(TypeError, match="out must have dtype float32, got float64"):
        cpu.copy_finite(x, np.zeros(5))
    readonly = np.zeros(5, np.float16)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        cpu.fp16_encode(x, readonly)


def test_overlap_is_refused():
    buffer = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="out overlaps x: .* out must be a separate buffer"):
        cpu.fp16_encode(buffer[:16], buffer[:16].view(np.float16)[:16])
    with pytest.raises(ValueError, match="out overlaps half"):
        cpu.fp16_decode(buffer[8:16].view(np.float16), buffer[:16])
    with pytest.raises(ValueError, match="out overlaps x"):
        cpu.copy_finite(buffer[:16], buffer[8:24])
    with pytest.raises(ValueError, match="out overlaps x"):
        cpu.copy_finite(buffer, buffer)


@pytest.mark.parametrize(
    ("bad", "got", "kind"),
    [(2, "2", "int"), (True, "True", "bool"), (1.0, "1.0", "float"), (None, "None", "NoneType")],
)
@pytest.mark.parametrize("n", [0, 5])
def test_decode_rejects_accumulate(bad, got, kind, n):
    message = ACCUMULATE_MESSAGE.format(got=got, kind=kind)
    for module in (cpu, ref):
        out = np.zeros(n, np.float32)
        with pytest.raises(ValueError, match=message):
            module.fp16_decode(np.zeros(n, np.float16), out, bad)
        assert not out.any()
    cpu.fp16_decode(np.ones(5, np.float16), np.zeros(5), np.int64(-1))  # numpy ints are fine


# ------------------------------------------------------- the F16C path and the integer one


@pytest.mark.parametrize("n", [7, 8, 9, _CHUNK + 3, 3 * _CHUNK + 5])
def test_conversion_instructions_and_integer_path_give_the_same_bits(n, monkeypatch):
    """Where the CPU has F16C (``_half_simd.AVAILABLE``), float32 encodes and
    accumulating decodes run in its instructions; both paths must give NumPy's bits
    (NaN payloads included in the encode), whichever one a machine takes."""
    from sparcomm.kernels.cpu import _half_simd

    rng = np.random.default_rng(n)
    x = np.concatenate([near_halves(np.float32), random_patterns(np.float32, n, seed=n)])[-n:]
    x = x.copy()
    x[: min(n, 3)] = np.array([np.nan, -np.inf, 70000.0], np.float32)[: min(n, 3)]
    start = rng.standard_normal(n).astype(np.float32)
    results = {}
    available = _half_simd.AVAILABLE  # before the loop patches it
    for simd in (False, True):
        if simd and not available:
            continue
        monkeypatch.setattr(_half_simd, "AVAILABLE", simd)
        half = np.empty(n, np.float16)
        bad = cpu.fp16_encode(x, half)
        finite = np.where(np.isfinite(half), half, np.float16(0))
        sums = []
        for accumulate in (1, -1):
            out = start.copy()
            cpu.fp16_decode(finite, out, accumulate)
            sums.append(out)
        results[simd] = (half, bad, sums)
    want = np.empty(n, np.float16)
    want_bad = ref.fp16_encode(x, want)
    finite = np.where(np.isfinite(want), want, np.float16(0))
    assert len(results) == 1 + available
    for half, bad, (added, subtracted) in results.values():
        assert same_bits(half, want) and bad == want_bad
        assert np.array_equal(added, start + finite.astype(np.float32))
        assert np.array_equal(subtracted, start - finite.astype(np.float32))


@pytest.mark.parametrize("n", [7, 8, 9, 17, _CHUNK + 3, 3 * _CHUNK + 5])
def test_the_stored_decode_keeps_numpys_bits_on_both_paths(n, monkeypatch):
    """The store (``accumulate=0``) on the F16C path converts eight halves per
    instruction, which quiets a signalling NaN; NumPy's ``astype`` keeps its bits, so
    the path rewrites NaNs.  Every half pattern, with signalling and quiet NaNs and
    infinities inside groups of eight and in the tail, must store NumPy's bits."""
    from sparcomm.kernels.cpu import _half_simd

    patterns = np.random.default_rng(n).integers(0, 1 << 16, n, dtype=np.uint64)
    half = patterns.astype(np.uint16)
    specials = np.array([0x7C01, 0xFE00, 0x7C00, 0xFC00, 0x7DFF, 0xFD55, 0x0001, 0x8000], np.uint16)
    for number, position in enumerate(sorted({0, 3, n // 2, n - 1})):
        half[position] = specials[(number * 3) % specials.size]
    half = half.view(np.float16)
    want = half.astype(np.float32)
    available = _half_simd.AVAILABLE  # before the loop patches it
    for simd in (False, True):
        if simd and not available:
            continue
        monkeypatch.setattr(_half_simd, "AVAILABLE", simd)
        out = np.full(n, 7.0, np.float32)
        cpu.fp16_decode(half, out, 0)
        assert same_bits(out, want), f"simd={simd}"
