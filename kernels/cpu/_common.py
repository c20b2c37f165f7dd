"""Shared Numba helpers of the CPU kernels: dtype dispatch, chunking, deterministic sums.

Numba compiles one specialisation per argument type; the small ``@overload`` helpers here
pick the bit-pattern view and constants of ``x.dtype`` at compile time, so every kernel
is written once for float32 and float64.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

CHUNK = 1 << 14
"""Elements per parallel task: a multiple of 64, small enough to stay in L1/L2."""


def abs_bits(x):  # pragma: no cover - replaced by the overload inside Numba
    """``|x|`` bit pattern view (uint32 or uint64); callers mask the sign bit."""
    raise NotImplementedError


@overload(abs_bits)
def _abs_bits_overload(x):
    if x.dtype == types.float32:
        return lambda x: x.view(np.uint32)
    return lambda x: x.view(np.uint64)


def abs_mask(x):  # pragma: no cover - replaced by the overload inside Numba
    """All bits but the sign bit, in the unsigned type of ``x.dtype``."""
    raise NotImplementedError


@overload(abs_mask)
def _abs_mask_overload(x):
    if x.dtype == types.float32:
        return lambda x: np.uint32(0x7FFFFFFF)
    return lambda x: np.uint64(0x7FFFFFFFFFFFFFFF)


def inf_bits(x):  # pragma: no cover - replaced by the overload inside Numba
    """Bit pattern of +inf of ``x.dtype``: abs bits at or above it are inf or NaN."""
    raise NotImplementedError


@overload(inf_bits)
def _inf_bits_overload(x):
    if x.dtype == types.float32:
        return lambda x: np.uint32(0x7F800000)
    return lambda x: np.uint64(0x7FF0000000000000)


def as_dtype(value, x):  # pragma: no cover - replaced by the overload inside Numba
    """``value`` converted to ``x.dtype`` (float32 arithmetic stays float32)."""
    raise NotImplementedError


@overload(as_dtype)
def _as_dtype_overload(value, x):
    if x.dtype == types.float32:
        return lambda value, x: np.float32(value)
    return lambda value, x: np.float64(value)


@njit(cache=True, nogil=True)
def n_chunks(n, chunk):
    return (n + chunk - 1) // chunk


@njit(cache=True, nogil=True)
def lane_sum_squares(x, start, stop):
    """Contract ``lane_sum`` of ``float64(x_i)**2`` over ``x[start:stop]``.

    Eight explicit accumulators give the contract's order (lane ``j`` takes elements
    ``j, j+8, ...``) and let LLVM keep them in one vector register.
    """
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    m = start + (stop - start) // 8 * 8
    for i in range(start, m, 8):
        v0 = np.float64(x[i])
        v1 = np.float64(x[i + 1])
        v2 = np.float64(x[i + 2])
        v3 = np.float64(x[i + 3])
        v4 = np.float64(x[i + 4])
        v5 = np.float64(x[i + 5])
        v6 = np.float64(x[i + 6])
        v7 = np.float64(x[i + 7])
        a0 += v0 * v0
        a1 += v1 * v1
        a2 += v2 * v2
        a3 += v3 * v3
        a4 += v4 * v4
        a5 += v5 * v5
        a6 += v6 * v6
        a7 += v7 * v7
    r = stop - m
    if r > 0:
        v = np.float64(x[m])
        a0 += v * v
    if r > 1:
        v = np.float64(x[m + 1])
        a1 += v * v
    if r > 2:
        v = np.float64(x[m + 2])
        a2 += v * v
    if r > 3:
        v = np.float64(x[m + 3])
        a3 += v * v
    if r > 4:
        v = np.float64(x[m + 4])
        a4 += v * v
    if r > 5:
        v = np.float64(x[m + 5])
        a5 += v * v
    if r > 6:
        v = np.float64(x[m + 6])
        a6 += v * v
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
