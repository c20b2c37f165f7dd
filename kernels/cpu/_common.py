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


def as_key(value, keys):  # pragma: no cover - replaced by the overload inside Numba
    """``value`` converted to the unsigned type of the key array ``keys``."""
    raise NotImplementedError


@overload(as_key)
def _as_key_overload(value, keys):
    if keys.dtype == types.uint32:
        return lambda value, keys: np.uint32(value)
    return lambda value, keys: np.uint64(value)


@njit(cache=True, nogil=True)
def n_chunks(n, chunk):
    return (n + chunk - 1) // chunk


@njit(cache=True, nogil=True)
def lane_sum_squares(x, start, stop):
    """Contract ``lane_sum`` of ``float64(x_i)**2`` over ``x[start:stop]``.

    Eight explicit accumulators give the contract's order (lane ``j`` takes elements
    ``j, j+8, ...``).  The loop runs over a slice with indices from 0: Numba then knows
    they are non-negative and drops its wraparound test, which otherwise turns every
    load into a gather.
    """
    xs = x[start:stop]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    m = xs.size // 8
    for r in range(m):
        v0 = np.float64(xs[8 * r])
        v1 = np.float64(xs[8 * r + 1])
        v2 = np.float64(xs[8 * r + 2])
        v3 = np.float64(xs[8 * r + 3])
        v4 = np.float64(xs[8 * r + 4])
        v5 = np.float64(xs[8 * r + 5])
        v6 = np.float64(xs[8 * r + 6])
        v7 = np.float64(xs[8 * r + 7])
        a0 += v0 * v0
        a1 += v1 * v1
        a2 += v2 * v2
        a3 += v3 * v3
        a4 += v4 * v4
        a5 += v5 * v5
        a6 += v6 * v6
        a7 += v7 * v7
    tail = xs[8 * m :]
    r = tail.size
    if r > 0:
        a0 += np.float64(tail[0]) * np.float64(tail[0])
    if r > 1:
        a1 += np.float64(tail[1]) * np.float64(tail[1])
    if r > 2:
        a2 += np.float64(tail[2]) * np.float64(tail[2])
    if r > 3:
        a3 += np.float64(tail[3]) * np.float64(tail[3])
    if r > 4:
        a4 += np.float64(tail[4]) * np.float64(tail[4])
    if r > 5:
        a5 += np.float64(tail[5]) * np.float64(tail[5])
    if r > 6:
        a6 += np.float64(tail[6]) * np.float64(tail[6])
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
