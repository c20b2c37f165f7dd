"""Local array work of the quantized collectives: chunk layout and the exact
small-integer sums of the shared-scale path.  Nothing here talks to MPI, and nothing
here knows a codec class: codecs describe their layout (``Codec.slice_alignment``,
``Codec.slice_payload``, derived from their declared wire arrays).

Chunks: the reduce-scatter algorithms give owner ``j`` the elements ``[b_j, b_{j+1})``.
Every boundary but ``n`` is a multiple of ``lcm(bucket, 8)`` elements, so

* a chunk holds whole buckets, and the quantization of a chunk is exactly the
  quantization of those buckets: a worker encodes its whole vector once and *slices*
  the payload (``codec.slice_payload``) instead of encoding ``P`` pieces;
* a chunk starts on a byte of every packed field (1, 2, ... 8 bits per element), so a
  slice of the packed bytes is a valid packed array on its own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sparcomm._backend import kernels_for

#: Bits per element of the packed ternary codes of a ``shares_scale`` codec
#: (0 -> 0, 1 -> +s, 2 -> -s; see ``Codec.shares_scale``).
TERNARY_BITS = 2

#: Chunk alignment of the shared-scale path: the scale is known to every rank, so only
#: the packed 2-bit codes and w-bit sums need byte boundaries.
SHARED_SCALE_ALIGNMENT = 8

#: Largest number of ranks whose ternary sums fit an int8 (|sum| <= P); up to
#: :data:`MAX_INT16_RANKS` they are summed in int16.
MAX_INT8_RANKS = 127
MAX_INT16_RANKS = 32767


def chunk_alignment(codec: Any) -> int:
    """Chunk boundaries are multiples of this many elements: the codec's slice alignment
    (whole buckets, whole bytes of packed fields) and 8, ``lcm(bucket, 8)``."""
    return math.lcm(codec.slice_alignment(), 8)


def chunk_bounds(n: int, size: int, align: int) -> np.ndarray:
    """``size + 1`` boundaries of the owners' chunks, multiples of ``align`` but the last.

    Units of ``align`` elements are split as evenly as possible (chunks differ by at
    most one unit); with ``n < size * align`` some chunks are empty.
    """
    units = -(-n // align)
    bounds = (np.arange(size + 1, dtype=np.int64) * units // size) * align
    return np.minimum(bounds, n)


def chunk_nbytes(codec: Any, length: int, dtype: Any) -> int:
    """Bytes of the payload of a chunk of ``length`` elements (0 for an empty chunk)."""
    return 0 if length == 0 else int(codec.encoded_nbytes(length, dtype))


def owner_key(key: Any) -> str:
    """The key of the owner-side residual and random stream of tensor ``key``.

    Owners keep their error-feedback residual in the same memory as the worker-side
    ones (so ``state_dict`` saves both), under a key no tensor name is expected to use.
    """
    return f"sparcomm.owner:{key!r}"


# ------------------------------------------------------ shared-scale integer sums


def sum_dtype(size: int) -> np.dtype:
    """The narrowest integer dtype that holds a sum of ``size`` values in {-1, 0, 1}."""
    if size <= MAX_INT8_RANKS:
        return np.dtype(np.int8)
    if size <= MAX_INT16_RANKS:
        return np.dtype(np.int16)
    raise NotImplementedError(
        f"shared_scale sums ternary values in int16, which holds at most "
        f"{MAX_INT16_RANKS} ranks, got {size}; use algorithm='reduce_scatter_allgather'"
    )


def sum_bits(size: int) -> int:
    """Bits per element of the gathered sums: ``ceil(log2(2 P + 1))`` packed while they
    fit a byte (``P <= 127``), else the 16 bits of the raw int16."""
    if sum_dtype(size) == np.int8:
        return max(1, math.ceil(math.log2(2 * size + 1)))
    return 16


def sums_nbytes(length: int, size: int) -> int:
    """Bytes of ``length`` gathered sums."""
    return -(-length * sum_bits(size) // 8)


def ternary_accumulate(
    packed: np.ndarray, acc: np.ndarray, codes: np.ndarray, ones: np.ndarray
) -> None:
    """``acc += t`` for the ternary values ``t`` in {-1, 0, 1} of 2-bit codes ``packed``.

    Code 1 is +1 and code 2 is -1, so ``t = (code & 1) - (code >> 1)``; integers add
    exactly and in any order.  ``codes`` and ``ones`` are uint8 scratch of ``acc.size``.
    """
    kernels_for(np).unpack_bits(packed, TERNARY_BITS, codes)
    np.bitwise_and(codes, 1, out=ones)
    np.right_shift(codes, 1, out=codes)
    if acc.dtype == np.int8:
        # 0/1 have the same bits in uint8 and int8: add without a widening loop
        np.add(acc, ones.view(np.int8), out=acc)
        np.subtract(acc, codes.view(np.int8), out=acc)
    else:
        np.add(acc, ones, out=acc)
        np.subtract(acc, codes, out=acc)


def pack_sums(acc: np.ndarray, size: int, fields: np.ndarray, out: np.ndarray) -> None:
    """Write the sums ``acc`` (int8 or int16) into the wire buffer ``out`` (uint8).

    int8 sums are offset by ``P`` into ``[0, 2P]`` and bit-packed ``sum_bits(P)`` wide;
    int16 sums travel as they are.  ``fields`` is uint8 scratch of ``acc.size``.
    """
    if acc.dtype == np.int8:
        # uint8 arithmetic wraps, and acc + P lies in [0, 2P] <= 254: no overflow
        np.add(acc.view(np.uint8), np.uint8(size), out=fields)
        kernels_for(np).pack_bits(fields, sum_bits(size), out)
    else:
        out[:] = acc.view(np.uint8)


def expand_sums(wire: np.ndarray, size: int, fields: np.ndarray, out: np.ndarray) -> None:
    """``out = sum`` as floats, from a buffer written by :func:`pack_sums`."""
    if sum_bits(size) <= 8:
        kernels_for(np).unpack_bits(wire, sum_bits(size), fields)
        np.subtract(fields, out.dtype.type(size), out=out)
    else:
        out[:] = wire.view(np.int16)


def apply_scales(out: np.ndarray, scales: np.ndarray, bucket: int) -> None:
    """``out *= scale of each element's bucket`` (one rounding per element)."""
    if scales.size == 1:
        out *= scales[0]
        return
    full = (out.size // bucket) * bucket
    blocks = out[:full].reshape(-1, bucket)  # a view: the product lands in out
    blocks *= scales[: full // bucket, None]
    if full < out.size:
        out[full:] *= scales[-1]
