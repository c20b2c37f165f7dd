"""Local array work of the quantized collectives: chunk layout, payload slicing, and the
exact small-integer sums of TernGrad's shared-scale path.  Nothing here talks to MPI.

Chunks: the reduce-scatter algorithms give owner ``j`` the elements ``[b_j, b_{j+1})``.
Every boundary but ``n`` is a multiple of ``lcm(bucket, 8)`` elements, so

* a chunk holds whole buckets, and the quantization of a chunk is exactly the
  quantization of those buckets: a worker encodes its whole vector once and *slices*
  the payload (scales, means and packed bits) instead of encoding ``P`` pieces;
* a chunk starts on a byte of every packed field (1, 2, ... 8 bits per element), so a
  slice of the packed bytes is a valid packed array on its own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sparcomm._backend import kernels_for
from sparcomm.codecs import FP16, QSGD, OneBit, TernGrad
from sparcomm.payload import Payload

#: Codec classes the quantized collectives accept (their bare form).
QUANTIZED_CODECS = (QSGD, TernGrad, OneBit, FP16)

#: Bytes of the status that heads every data block of the quantized collectives (the
#: rank that failed, -1 for none, and its error class): see ``_quantized``.
STATUS_BYTES = 8

#: Bits per element of a TernGrad packed code (0 -> 0, 1 -> +s, 2 -> -s).
TERNARY_BITS = 2

#: Largest number of ranks whose ternary sums fit an int8 (|sum| <= P); up to
#: :data:`MAX_INT16_RANKS` they are summed in int16.
MAX_INT8_RANKS = 127
MAX_INT16_RANKS = 32767


def bucket_of(codec: Any) -> int:
    """Elements per scale (or pair of means) of a bare quantized codec; 1 when the codec
    has no buckets (FP16) or one scale per tensor (TernGrad's default), because slicing
    such a payload only copies that scale."""
    if isinstance(codec, (QSGD, OneBit)):
        return int(codec.bucket_size)
    if isinstance(codec, TernGrad) and codec.bucket_size is not None:
        return int(codec.bucket_size)
    return 1


def chunk_alignment(codec: Any) -> int:
    """Chunk boundaries are multiples of this many elements: ``lcm(bucket, 8)``."""
    return math.lcm(bucket_of(codec), 8)


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


def slice_payload(codec: Any, payload: Payload, start: int, stop: int) -> Payload:
    """The payload of elements ``[start, stop)`` of ``payload``, as views (no copy).

    ``start`` must be a multiple of :func:`chunk_alignment` and ``stop`` one too or
    ``payload.n``; the result decodes to exactly the same values as that part of the
    whole payload (same scales, same random draws).
    """
    length = stop - start
    arrays = payload.arrays
    bucket = bucket_of(codec)
    first, last = start // bucket, -(-stop // bucket)
    params = payload.params
    if isinstance(codec, QSGD):
        bits = codec.bits
        sliced = {
            "scales": arrays["scales"][first:last],
            "packed": arrays["packed"][start * bits // 8 : -(-stop * bits // 8)],
        }
    elif isinstance(codec, TernGrad):
        scales = arrays["scales"] if codec.bucket_size is None else arrays["scales"][first:last]
        sliced = {
            "scales": scales,
            "packed": arrays["packed"][start * TERNARY_BITS // 8 : -(-stop * TERNARY_BITS // 8)],
        }
        params = (codec.bucket_for(length),)
    elif isinstance(codec, OneBit):
        sliced = {
            "means": arrays["means"][2 * first : 2 * last],
            "packed": arrays["packed"][start // 8 : -(-stop // 8)],
        }
    elif isinstance(codec, FP16):
        sliced = {"values": arrays["values"][start:stop]}
    else:  # pragma: no cover - the entry point refuses other codecs first
        raise NotImplementedError(f"cannot slice a {type(codec).__name__} payload")
    return Payload(payload.codec_id, length, payload.dtype, (length,), params, sliced)


# ------------------------------------------------------ TernGrad integer sums


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
