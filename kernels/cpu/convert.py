"""Half-precision conversion and the checked copy (contract ``fp16_encode``, ``fp16_decode``,
``copy_finite``).

The dense baselines of the codec tables (``sparcomm/codecs/baselines.py``): FP16 rounds
each value to IEEE 754 binary16 (the half-precision gradient exchange of Micikevicius
et al., "Mixed precision training", ICLR 2018), NoCompression copies it.  NumPy needs two
passes for each (``astype`` or ``copy``, then ``isfinite``) on one thread; these kernels
convert or copy and count the non-finite values in one pass, split over the Numba
threads.

On x86 CPUs with F16C, float32 -> half and half -> float32 (stored or accumulated) run
in the CPU's conversion instructions (``_half_simd``: 4-7x faster than the integer path,
NumPy's bits for every value, NaNs rewritten).  Elsewhere, and for float64, the float ->
half conversion is integer arithmetic on the bit patterns (Numba has no float16 type on
the CPU), written once for float32 and float64 (NumPy converts float64 to half directly,
not through float32, and so does this): round to nearest even, subnormal halves, signed
zeros, overflow to ±inf, and NaN payloads as NumPy's
``npy_floatbits_to_halfbits`` / ``npy_doublebits_to_halfbits`` (the top ten significand
bits, at least 1 so that a NaN stays a NaN).  The half -> float store writes the bit
pattern too (NaN payloads kept, as ``astype``); the accumulating decode forms the exact
value arithmetically instead, ``mantissa * 2**(e - 25)``, and adds it in one IEEE
operation (a NaN there may differ in payload, as the contract allows).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from . import _half_simd
from ._common import abs_mask, as_dtype, check_accumulate, inf_bits, n_chunks

_CHUNK = 1 << 16
"""Elements per parallel task; arrays up to this size run on the calling thread."""
PARALLEL_FROM = _CHUNK
"""Elements above which the conversions and ``copy_finite`` run their parallel variant
(another compiled function: a warm-up must go past it to reach it)."""

_POW2 = 2.0 ** (np.arange(32, dtype=np.float64) - 25.0)
"""``2**(e - 25)`` for a half's exponent field ``e`` (index 1 also serves ``e = 0``)."""


@njit(cache=True, nogil=True, inline="always")
def _half_bits(f, mbits, ebits):
    """Half bit pattern of the float whose bit pattern (sign-extended to int64) is ``f``.

    ``mbits``/``ebits``: significand and exponent widths of the source (23/8 or 52/11).
    """
    sign = (f >> 48) & 0x8000  # bit 63 of the sign-extended pattern is the sign bit
    a = f & ((1 << (mbits + ebits)) - 1)
    e = a >> mbits
    emax = (1 << ebits) - 1
    bias = emax >> 1
    shift = mbits - 10
    if e == emax:  # inf, or NaN keeping its top payload bits (at least one set)
        payload = (a >> shift) & 0x3FF
        if a & ((1 << mbits) - 1) == 0:
            h = 0x7C00
        else:
            h = 0x7C00 | max(payload, 1)
    elif e >= bias + 16:  # |x| >= 65536: beyond the largest half (65504) and its midpoint
        h = 0x7C00
    elif e >= bias - 14:  # a normal half; a carry out of the significand rounds up to inf
        base = a - ((bias - 15) << mbits)
        h = (base + ((1 << (shift - 1)) - 1) + ((base >> shift) & 1)) >> shift
    else:  # a subnormal half (or zero): round m * 2**(e - bias - mbits) to units of 2**-24
        m = (a & ((1 << mbits) - 1)) | (1 << mbits)
        s = min(bias + mbits - 24 - e, 62)  # >= 14; beyond 62 the result is 0 anyway
        q = m >> s
        rest = m & ((1 << s) - 1)
        halfway = 1 << (s - 1)
        h = q + ((rest > halfway) | ((rest == halfway) & ((q & 1) == 1)))
    return sign | h


@njit(cache=True, nogil=True, inline="always")
def _float_bits(h, mbits, ebits):
    """Bit pattern (int64) of the float32/float64 equal to the half with bits ``h``."""
    sign = (h & 0x8000) << (mbits + ebits - 15)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    shift = mbits - 10
    emax = (1 << ebits) - 1
    bias = emax >> 1
    if e == 0x1F:
        bits = (emax << mbits) | (m << shift)
    elif e != 0:
        bits = ((e + bias - 15) << mbits) | (m << shift)
    elif m == 0:
        bits = 0
    else:  # subnormal half m * 2**-24: normalise by its leading bit p (0..9)
        p = (
            (m >= 2)
            + (m >= 4)
            + (m >= 8)
            + (m >= 16)
            + (m >= 32)
            + (m >= 64)
            + (m >= 128)
            + (m >= 256)
            + (m >= 512)
        )
        bits = ((p - 24 + bias) << mbits) | ((m << (mbits - p)) & ((1 << mbits) - 1))
    return sign | bits


@njit(cache=True, nogil=True)
def _encode_range(bits, out, mbits, ebits, lo, hi):
    """Convert ``bits[lo:hi]`` (int32/int64 view of x) into ``out`` (uint16); count inf/NaN."""
    xs, hs = bits[lo:hi], out[lo:hi]
    bad = 0
    for t in range(hs.size):
        h = _half_bits(np.int64(xs[t]), mbits, ebits)
        hs[t] = h
        bad += (h & 0x7C00) == 0x7C00
    return bad


@njit(cache=True, nogil=True, parallel=True)
def _encode_parallel(bits, out, mbits, ebits):
    n = out.size
    chunks = n_chunks(n, _CHUNK)
    counts = np.zeros(chunks, np.int64)
    for c in prange(chunks):
        counts[c] = _encode_range(bits, out, mbits, ebits, c * _CHUNK, min(n, (c + 1) * _CHUNK))
    return counts.sum()


@njit(cache=True, nogil=True)
def _encode_range_simd(x, bits, out, lo, hi):
    """:func:`_encode_range` of float32 with F16C (``_half_simd``) for whole groups of
    eight, the integer path for the rest."""
    whole = hi - (hi - lo) % _half_simd.LANES
    bad = _half_simd.encode_range(x, out, lo, whole)  # counts the infs and NaNs
    if bad:  # rare: give each NaN NumPy's payload, not the instruction's quiet NaN
        for t in range(lo, whole):
            if (out[t] & 0x7C00) == 0x7C00 and out[t] & 0x3FF:
                out[t] = _half_bits(np.int64(bits[t]), 23, 8)
    return bad + _encode_range(bits, out, 23, 8, whole, hi)


@njit(cache=True, nogil=True, parallel=True)
def _encode_parallel_simd(x, bits, out):
    n = out.size
    chunks = n_chunks(n, _CHUNK)
    counts = np.zeros(chunks, np.int64)
    for c in prange(chunks):
        counts[c] = _encode_range_simd(x, bits, out, c * _CHUNK, min(n, (c + 1) * _CHUNK))
    return counts.sum()


@njit(cache=True, nogil=True)
def _store_range_simd(half, out, out_bits, lo, hi):
    """``out[lo:hi] = float32(half[lo:hi])`` with F16C for whole groups of eight, bit for
    bit :func:`_decode_range`'s store: a range with an inf or NaN half has its NaNs
    rewritten from the bit pattern (the instruction quiets a signalling NaN)."""
    whole = hi - (hi - lo) % _half_simd.LANES
    if _half_simd.store_range(half, out, lo, whole):
        for t in range(lo, whole):
            if (half[t] & 0x7C00) == 0x7C00 and half[t] & 0x3FF:
                out_bits[t] = _float_bits(np.int64(half[t]), 23, 8)
    _decode_range(half, out, out_bits, 23, 8, 0, whole, hi)


@njit(cache=True, nogil=True, parallel=True)
def _store_parallel_simd(half, out, out_bits):
    n = out.size
    for c in prange(n_chunks(n, _CHUNK)):
        _store_range_simd(half, out, out_bits, c * _CHUNK, min(n, (c + 1) * _CHUNK))


@njit(cache=True, nogil=True)
def _accumulate_range_simd(half, out, out_bits, accumulate, lo, hi):
    """``out[lo:hi] +=`` (``-=``) the halves into float32 with F16C for whole groups of
    eight (exact conversions, one float32 rounding each, as :func:`_decode_range`)."""
    whole = hi - (hi - lo) % _half_simd.LANES
    _half_simd.accumulate_range(half, out, accumulate < 0, lo, whole)
    _decode_range(half, out, out_bits, 23, 8, accumulate, whole, hi)


@njit(cache=True, nogil=True, parallel=True)
def _accumulate_parallel_simd(half, out, out_bits, accumulate):
    n = out.size
    for c in prange(n_chunks(n, _CHUNK)):
        _accumulate_range_simd(
            half, out, out_bits, accumulate, c * _CHUNK, min(n, (c + 1) * _CHUNK)
        )


@njit(cache=True, nogil=True)
def _decode_range(half, out, out_bits, mbits, ebits, accumulate, lo, hi):
    hs = half[lo:hi]
    if accumulate == 0:  # the bit pattern: exact, NaN payloads kept (as astype)
        zs = out_bits[lo:hi]
        for t in range(hs.size):
            zs[t] = _float_bits(np.int64(hs[t]), mbits, ebits)
        return
    ys = out[lo:hi]
    for t in range(hs.size):
        h = np.int64(hs[t])
        e = (h >> 10) & 0x1F
        m = h & 0x3FF
        if e == 0x1F:
            d = np.inf if m == 0 else np.nan
        else:  # exact in float64 (11 significant bits) and then in out.dtype
            d = (m if e == 0 else m + 1024) * _POW2[max(e, 1)]
        if h & 0x8000:
            d = -d
        v = as_dtype(d, ys)  # exact: the one rounding is the addition, in out.dtype
        if accumulate > 0:
            ys[t] += v
        else:
            ys[t] -= v


@njit(cache=True, nogil=True, parallel=True)
def _decode_parallel(half, out, out_bits, mbits, ebits, accumulate):
    n = out.size
    for c in prange(n_chunks(n, _CHUNK)):
        _decode_range(
            half, out, out_bits, mbits, ebits, accumulate, c * _CHUNK, min(n, (c + 1) * _CHUNK)
        )


@njit(cache=True, nogil=True)
def _copy_range(x, bits, out, lo, hi):
    xs, ks, zs = x[lo:hi], bits[lo:hi], out[lo:hi]
    mask, inf = abs_mask(x), inf_bits(x)
    bad = 0
    for t in range(zs.size):
        zs[t] = xs[t]
        bad += (ks[t] & mask) >= inf  # |x| at or above inf's pattern: inf or NaN
    return bad


@njit(cache=True, nogil=True, parallel=True)
def _copy_parallel(x, bits, out):
    n = out.size
    chunks = n_chunks(n, _CHUNK)
    counts = np.zeros(chunks, np.int64)
    for c in prange(chunks):
        counts[c] = _copy_range(x, bits, out, c * _CHUNK, min(n, (c + 1) * _CHUNK))
    return counts.sum()


_REALS = (np.dtype(np.float32), np.dtype(np.float64))
_HALF = np.dtype(np.float16)


def _check(name: str, array: Any, dtypes: tuple[np.dtype, ...], size: int | None) -> None:
    if not isinstance(array, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy.ndarray, got {type(array).__module__}."
            f"{type(array).__qualname__}; convert it with numpy.asarray()"
        )
    if array.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {array.dtype}; cast it first")
    if array.ndim != 1 or not array.flags.c_contiguous:
        raise ValueError(
            f"{name} must be 1-D and C-contiguous, got shape {array.shape}; "
            "pass numpy.ascontiguousarray(a).ravel()"
        )
    if size is not None and array.size != size:
        raise ValueError(f"{name} must have {size} elements, got {array.size}")


def _check_out(out: np.ndarray, source_name: str, source: np.ndarray) -> None:
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable buffer")
    if out.size and np.may_share_memory(out, source):
        raise ValueError(
            f"out overlaps {source_name}: the conversion reads and writes different "
            "element widths, so out must be a separate buffer; pass a new array"
        )


def _widths(dtype: np.dtype) -> tuple[int, int]:
    """(significand bits, exponent bits) of float32 or float64."""
    return (23, 8) if dtype == np.float32 else (52, 11)


def _signed_bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.int32 if x.dtype == np.float32 else np.int64)


def fp16_encode(x: np.ndarray, out: np.ndarray) -> int:
    """``out[i] = float16(x[i])``, round to nearest even, bit for bit NumPy's ``astype``.

    Parameters
    ----------
    x : numpy.ndarray
        1-D C-contiguous float32 or float64.
    out : numpy.ndarray
        1-D C-contiguous float16 of ``x.size`` elements, not overlapping ``x``.

    Returns
    -------
    int
        The number of non-finite outputs (NaN, inf, or values beyond ±65504 that
        overflowed); the FP16 codec refuses the tensor when it is not zero.

    Raises
    ------
    TypeError, ValueError
        For a non-NumPy array, another dtype, a shape or size mismatch, a read-only or
        overlapping ``out``.
    """
    _check("x", x, _REALS, None)
    _check("out", out, (_HALF,), x.size)
    _check_out(out, "x", x)
    mbits, ebits = _widths(x.dtype)
    bits, half = _signed_bits(x), out.view(np.uint16)
    if _half_simd.AVAILABLE and x.dtype == np.float32:
        # The CPU's conversion instructions (same bits for finite values: _half_simd).
        if x.size <= _CHUNK:
            return int(_encode_range_simd(x, bits, half, 0, x.size))
        return int(_encode_parallel_simd(x, bits, half))
    if x.size <= _CHUNK:
        return int(_encode_range(bits, half, mbits, ebits, 0, x.size))
    return int(_encode_parallel(bits, half, mbits, ebits))


def fp16_decode(half: np.ndarray, out: np.ndarray, accumulate: int = 0) -> None:
    """``d_i = out.dtype(half[i])`` (exact) into ``out`` by ``accumulate``.

    Parameters
    ----------
    half : numpy.ndarray
        1-D C-contiguous float16.
    out : numpy.ndarray
        1-D C-contiguous float32 or float64 of ``half.size`` elements, not overlapping
        ``half``.
    accumulate : {0, 1, -1}
        ``out = d`` / ``out += d`` / ``out -= d``, one IEEE operation in ``out.dtype``.

    Raises
    ------
    TypeError, ValueError
        As :func:`fp16_encode`; ValueError for another ``accumulate``.
    """
    accumulate = check_accumulate(accumulate)
    _check("out", out, _REALS, None)
    _check("half", half, (_HALF,), out.size)
    _check_out(out, "half", half)
    mbits, ebits = _widths(out.dtype)
    if _half_simd.AVAILABLE and out.dtype == np.float32:
        if accumulate == 0:
            store = (half.view(np.uint16), out, _signed_bits(out))
            if out.size <= _CHUNK:
                _store_range_simd(*store, 0, out.size)
            else:
                _store_parallel_simd(*store)
            return
        simd = (half.view(np.uint16), out, _signed_bits(out), accumulate)
        if out.size <= _CHUNK:
            _accumulate_range_simd(*simd, 0, out.size)
        else:
            _accumulate_parallel_simd(*simd)
        return
    args = (half.view(np.uint16), out, _signed_bits(out), mbits, ebits, accumulate)
    if out.size <= _CHUNK:
        _decode_range(*args, 0, out.size)
    else:
        _decode_parallel(*args)


def copy_finite(x: np.ndarray, out: np.ndarray) -> int:
    """``out[i] = x[i]``; returns the number of non-finite entries of ``x`` (one pass).

    ``out`` has ``x``'s dtype and size and must not overlap ``x`` (TypeError or
    ValueError otherwise, as :func:`fp16_encode`).
    """
    _check("x", x, _REALS, None)
    _check("out", out, (x.dtype,), x.size)
    _check_out(out, "x", x)
    bits = x.view(np.uint32 if x.dtype == np.float32 else np.uint64)
    if x.size <= _CHUNK:
        return int(_copy_range(x, bits, out, 0, x.size))
    return int(_copy_parallel(x, bits, out))
