"""Reductions: the streamed-read peer and per-bucket max |x| over the bit pattern."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import CHUNK, abs_bits, abs_mask, n_chunks

_STREAM_CHUNK = 1 << 16


@njit(cache=True, nogil=True, fastmath=True)
def _sum_chunk(x, a, b):
    # fastmath lets LLVM reorder the sum into vector lanes: a read at full bandwidth.
    xs = x[a:b]  # indexed from 0: Numba drops its negative-index test, loads vectorise
    total = 0.0
    for t in range(xs.size):
        total += xs[t]
    return total


@njit(cache=True, nogil=True, parallel=True)
def stream_read(x):
    """Sum of ``x`` read once, in parallel: the streamed-read peer of the benchmarks."""
    n = x.size
    nc = n_chunks(n, _STREAM_CHUNK)
    partial = np.empty(nc, dtype=np.float64)
    for c in prange(nc):
        partial[c] = _sum_chunk(x, c * _STREAM_CHUNK, min(n, (c + 1) * _STREAM_CHUNK))
    return partial.sum()


@njit(cache=True, nogil=True)
def max_bits(bits, mask, a, b):
    """Largest ``bits[i] & mask`` over ``[a, b)``: max |x| as an integer (vectorises)."""
    part = bits[a:b]
    best = part[0] & mask
    for t in range(1, part.size):
        best = max(best, part[t] & mask)
    return best


@njit(cache=True, nogil=True, parallel=True)
def max_abs(x, bucket, out):
    """``out[b] = max |x_i|`` over bucket ``b``, compared as bit patterns (NaN beats inf)."""
    n = x.size
    bits = abs_bits(x)
    mask = abs_mask(x)
    out_bits = abs_bits(out)
    nb = n_chunks(n, bucket)
    if bucket >= CHUNK:
        # Few large buckets: split each bucket into pieces so both threads work.
        per = n_chunks(bucket, CHUNK)
        zero = mask ^ mask  # a 0 of the unsigned type: int64 0 would widen uint64 to float
        partial = np.empty(nb * per, dtype=out_bits.dtype)
        for t in prange(nb * per):
            bk = t // per
            a = bk * bucket + (t % per) * CHUNK
            b = min(a + CHUNK, min(n, (bk + 1) * bucket))
            partial[t] = max_bits(bits, mask, a, b) if a < b else zero
        for bk in range(nb):
            out_bits[bk] = max_bits(partial, mask, bk * per, (bk + 1) * per)
    else:
        per = CHUNK // bucket
        for c in prange(n_chunks(nb, per)):
            for bk in range(c * per, min(nb, (c + 1) * per)):
                out_bits[bk] = max_bits(bits, mask, bk * bucket, min(n, (bk + 1) * bucket))
