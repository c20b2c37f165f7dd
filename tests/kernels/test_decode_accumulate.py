"""Fused decode-and-accumulate of the CPU decode kernels (``accumulate`` in the contract).

``{qsgd,terngrad,onebit}_decode(..., out, accumulate)`` with ``accumulate`` 1 / -1 must be
bit for bit the decode into a separate buffer followed by ``add(out, d, out)`` /
``subtract(out, d, out)`` (``kernels/__init__.py``): checked against that two-step
identity on the CPU twins and on the reference, and the CPU fused call against the
reference fused call.  ``out`` holds subnormals, signed zeros, inf and NaN, and entries
equal to +-d (exact zero results); sizes cover 0, 1, 7, a bucket +- 1 and more than one
parallel task (``CHUNK``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sparcomm.kernels import cpu
from sparcomm.kernels import reference as ref
from sparcomm.kernels.cpu._common import CHUNK

DTYPES = [np.float32, np.float64]
CODECS = ["qsgd", "terngrad", "onebit"]
STREAM = 0xF00DFACE_12345678


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def values_equal(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit for bit, except that a NaN matches any NaN (the contract leaves NaN payloads open)."""
    nan = np.isnan(want)
    return np.array_equal(np.isnan(got), nan) and same_bits(got[~nan], want[~nan])


def gradient(n: int, dtype: type, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-6, 3, n))).astype(dtype)
    x[::11] = 0.0
    x[5::13] = -0.0
    return x


def encoded(codec: str, x: np.ndarray, bucket: int) -> tuple[Any, ...]:
    """Reference encoding of ``x``: the arguments of ``{codec}_decode`` before ``out``."""
    n, nb = x.size, -(-x.size // bucket)
    if codec == "qsgd":
        scales, packed = np.empty(nb, x.dtype), np.empty(-(-n * 4 // 8), np.uint8)
        ref.qsgd_encode(x, 7, 4, bucket, 0, STREAM, scales, packed)
        return packed, scales, 7, 4, bucket
    if codec == "terngrad":
        scales, packed = np.empty(nb, x.dtype), np.empty(-(-n * 2 // 8), np.uint8)
        ref.max_abs(x, bucket, scales)
        ref.terngrad_encode(x, scales, bucket, np.inf, STREAM, packed)
        return packed, scales, bucket
    packed, means = np.empty(-(-n // 8), np.uint8), np.empty(2 * nb, x.dtype)
    ref.onebit_encode(x, bucket, packed, means)
    return packed, means, bucket


def base_out(decoded: np.ndarray, seed: int) -> np.ndarray:
    """``out`` before decoding: specials every 4th entry, +-d at ``i = 1, 2 mod 7``."""
    info = np.finfo(decoded.dtype)
    specials = np.array(
        [3 * info.smallest_subnormal, -5 * info.smallest_subnormal, 0.0, -0.0]
        + [np.inf, -np.inf, np.nan, 1.5 * info.tiny, -info.tiny],
        dtype=decoded.dtype,
    )
    base = gradient(decoded.size, decoded.dtype, seed)
    slots = np.arange(0, decoded.size, 4)
    base[slots] = specials[np.arange(slots.size) % specials.size]
    base[1::7] = decoded[1::7]
    base[2::7] = -decoded[2::7]
    return base


def check_fused(codec: str, x: np.ndarray, bucket: int, accumulate: int) -> None:
    name = f"{codec}_decode"
    args = encoded(codec, x, bucket)
    decoded = np.empty(x.size, x.dtype)
    getattr(cpu, name)(*args, decoded)
    ref_decoded = np.empty(x.size, x.dtype)
    getattr(ref, name)(*args, ref_decoded)
    assert same_bits(decoded, ref_decoded)
    base = base_out(decoded, seed=x.size)
    op = "add" if accumulate > 0 else "subtract"
    two_steps = {}
    for module in (cpu, ref):
        if accumulate == 0:
            two_steps[module] = decoded.copy()
        else:
            two_steps[module] = base.copy()
            getattr(module, op)(two_steps[module], decoded, two_steps[module])
    assert values_equal(two_steps[cpu], two_steps[ref])
    for module in (cpu, ref):
        fused = base.copy()
        getattr(module, name)(*args, fused, accumulate)
        assert values_equal(fused, two_steps[module]), f"{module.__name__}.{name}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("accumulate", [0, 1, -1])
def test_fused_decode_is_decode_then_add_or_subtract(
    dtype: type, codec: str, accumulate: int
) -> None:
    # 511 / 513: a bucket +- 1; 3 * CHUNK + 5: several parallel tasks and a short last one;
    # bucket 7: groups of 8 fields straddle buckets.
    for n, bucket in [(0, 512), (1, 512), (7, 512), (511, 512), (513, 512), (3 * CHUNK + 5, 512)]:
        check_fused(codec, gradient(n, dtype, seed=n), bucket, accumulate)
    check_fused(codec, gradient(1001, dtype, seed=3), 7, accumulate)
    check_fused(codec, gradient(CHUNK + 9, dtype, seed=4), CHUNK + 8, accumulate)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
def test_fused_decode_special_payloads(dtype: type, codec: str) -> None:
    # Subnormal scales and means give subnormal d; an inf input gives an inf scale, so
    # d is inf or NaN (0 * inf) in that bucket and out +- d is inf or NaN.
    tiny = np.finfo(dtype).smallest_subnormal
    subnormal = (np.arange(1, 200) % 13 - 6).astype(dtype) * tiny
    non_finite = gradient(200, dtype, seed=9)
    non_finite[[3, 150]] = [np.inf, -np.inf]
    for accumulate in (1, -1):
        check_fused(codec, subnormal, 16, accumulate)
        check_fused(codec, non_finite, 16, accumulate)


@pytest.mark.parametrize("module", [cpu, ref], ids=["cpu", "reference"])
@pytest.mark.parametrize("codec", CODECS)
def test_decode_rejects_bad_accumulate(module: Any, codec: str) -> None:
    for n in (0, 9):
        args = encoded(codec, gradient(n, np.float32, seed=1), 7)
        out = np.arange(n, dtype=np.float32)
        for bad in (2, -2, 0.5, 1.0, True, "1", None, np.int64(3)):
            with pytest.raises(ValueError, match=r"accumulate must be 0 .*, 1 .* or -1 .*, got"):
                getattr(module, f"{codec}_decode")(*args, out, bad)
        assert same_bits(out, np.arange(n, dtype=np.float32))  # rejected before any write
        getattr(module, f"{codec}_decode")(*args, out, np.int64(-1))  # a NumPy int is fine


@pytest.mark.parametrize("module", [cpu, ref], ids=["cpu", "reference"])
def test_terngrad_accumulate_by_hand(module: Any) -> None:
    packed = np.array([0b11100100], dtype=np.uint8)  # codes 0, 1, 2, 3: d = 0, 2, -2, 0
    scales = np.array([2.0], dtype=np.float32)
    added = np.array([-0.0, 1.0, 1.0, 5.0], dtype=np.float32)
    module.terngrad_decode(packed, scales, 4, added, 1)
    assert same_bits(added, np.array([0.0, 3.0, -1.0, 5.0], dtype=np.float32))  # -0 + 0 = +0
    subtracted = np.array([-0.0, 1.0, 1.0, 5.0], dtype=np.float32)
    module.terngrad_decode(packed, scales, 4, subtracted, -1)
    assert same_bits(subtracted, np.array([-0.0, -1.0, 3.0, 5.0], dtype=np.float32))
