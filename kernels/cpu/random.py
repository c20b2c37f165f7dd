"""Counter-based uniforms (a test hook for the RNG): kernel contract ``uniform``.

The twin of ``kernels/cuda/random.cu``; the hash itself is in :mod:`._random`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._random import as_stream, hash24, high_word, low_word, stream_halves, word_end

_U24 = 2.0**-24
"""``u = hash24(...) * 2**-24``: 24 random bits as a uniform in [0, 1), exact in float32."""


@njit(cache=True, nogil=True)
def _uniform_chunk(k1, k2, start, out, a, b):
    i0 = start + a
    stop = start + b
    while i0 < stop:
        i1 = word_end(i0, stop)
        key_lo = high_word(k1, i0)
        lo = low_word(i0)
        run = out[i0 - start : i1 - start]
        for t in range(run.size):
            run[t] = np.float64(hash24(key_lo, k2, np.uint32(lo + np.uint32(t)))) * _U24
        i0 = i1


@njit(cache=True, nogil=True, parallel=True)
def _uniform(stream, start, out):
    k1, k2 = stream_halves(stream)
    n = out.size
    chunk = 1 << 16
    for c in prange((n + chunk - 1) // chunk):
        _uniform_chunk(k1, k2, start, out, c * chunk, min(n, (c + 1) * chunk))


def uniform(stream: int, start: int, out: np.ndarray) -> None:
    """``out[i] = u(stream, start + i)`` as float64 (the RNG's test hook)."""
    _uniform(as_stream(stream), np.int64(start), out)
