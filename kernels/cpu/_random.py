"""The contract's counter-based uniform ``u(stream, i)`` inside Numba kernels.

The hash that the stochastic quantizers (``quantize.py``) and the ``uniform`` kernel
(``random.py``) evaluate; the CUDA twin is ``sc_hash`` in ``kernels/cuda/common.cuh``.

Bit for bit the definition in ``sparcomm/_random.py``.  Numba widens ``uint32 * uint32``
to uint64, so every multiply and shift is cast back to uint32 explicitly; the hash is
branch-free integer arithmetic, which LLVM vectorises: 16 lanes with AVX-512 in the
kernels that ask for 512-bit vectors (``_vector.wide_vectors``), 8 lanes otherwise.
"""

from __future__ import annotations

import numpy as np
from numba import njit

GOLDEN32 = np.uint32(0x9E3779B9)
HIGH32 = np.uint32(0x85EBCA6B)
_MIX_A = np.uint32(0x7FEB352D)
_MIX_B = np.uint32(0x846CA68B)
_LOW32 = np.uint64(0xFFFFFFFF)
_S16 = np.uint32(16)
_S15 = np.uint32(15)
_S8 = np.uint32(8)
_S32 = np.uint64(32)
_WORD = np.int64(1) << np.int64(32)


@njit(cache=True, nogil=True)
def mix32(h):
    """The "lowbias32" finaliser on a uint32."""
    h = np.uint32(h ^ (h >> _S16))
    h = np.uint32(h * _MIX_A)
    h = np.uint32(h ^ (h >> _S15))
    h = np.uint32(h * _MIX_B)
    return np.uint32(h ^ (h >> _S16))


@njit(cache=True, nogil=True)
def stream_halves(stream):
    """``(k1, k2)``: the low and high 32 bits of a uint64 stream key (int64 or uint64)."""
    s = np.uint64(stream)
    return np.uint32(s & _LOW32), np.uint32(s >> _S32)


@njit(cache=True, nogil=True)
def high_word(k1, i):
    """``k1 ^ (hi * HIGH32)`` for index ``i``: constant over runs of 2**32 indices."""
    hi = np.uint32(np.uint64(i) >> _S32)
    return np.uint32(k1 ^ np.uint32(hi * HIGH32))


@njit(cache=True, nogil=True)
def hash24(key_lo, k2, lo):
    """Top 24 bits of the per-element hash of an index with low word ``lo``.

    ``key_lo = high_word(k1, i)`` folds in the stream's low half and the index's high
    word, which are constant over a run of 2**32 indices.
    """
    return hash24_golden(np.uint32(lo * GOLDEN32), key_lo, k2)


@njit(cache=True, nogil=True)
def hash24_golden(golden, key_lo, k2):
    """:func:`hash24` given ``golden = lo * GOLDEN32`` (mod 2**32).

    Loops over consecutive indices keep ``golden`` as an induction variable (add
    ``GOLDEN32`` per step), which spares one vector multiply per element.
    """
    h = mix32(np.uint32(golden ^ key_lo))
    h = mix32(np.uint32(h + k2))
    return np.uint32(h >> _S8)


@njit(cache=True, nogil=True)
def low_word(i):
    """The low 32 bits of index ``i`` as uint32."""
    return np.uint32(np.uint64(i) & _LOW32)


@njit(cache=True, nogil=True)
def word_end(i, stop):
    """End of the run of indices from ``i`` that share its high 32 bits (before ``stop``)."""
    return min(stop, (i // _WORD + 1) * _WORD)


def as_stream(stream: int) -> np.uint64:
    """A stream key as ``np.uint64``, so Numba always sees one argument type.

    A Python int types as int64 below 2**63 and uint64 above; once one specialisation
    exists, Numba converts later ints to it, and a key above 2**63 then fails to convert.
    """
    return np.uint64(int(stream) & 0xFFFFFFFFFFFFFFFF)
