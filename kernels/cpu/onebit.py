"""1-bit SGD: sign bits plus two reconstruction means per bucket.

As in QSGD, a parallel task owns whole buckets when they are small, so the bucket's
means (its two masked lane sums) and its packed sign bits come from one read of memory.

References
----------
F. Seide, H. Fu, J. Droppo, G. Li, D. Yu, "1-bit stochastic gradient descent and its
application to data-parallel distributed training of speech DNNs", Interspeech 2014.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._common import (
    CHUNK,
    LANES,
    as_dtype,
    check_accumulate,
    combine_lanes,
    lane_rows_by_sign,
    n_chunks,
    typed_arrays,
)
from ._stores import STREAM_MIN, store_fence, stream_copy
from .packing import pack_groups, pack_tail, unpack_groups


@njit(cache=True, nogil=True)
def _split(v):
    """``(v, 0)`` for ``v >= 0`` or NaN (bit 0), ``(0, v)`` for ``v < 0`` (bit 1)."""
    negative = v < 0.0
    return (0.0 if negative else v), (v if negative else 0.0)


@njit(cache=True, nogil=True)
def _bucket_means(x, a, b, out_means, bk):
    """Both groups' contract ``lane_sum`` over ``x[a:b]`` divided by their counts.

    Lane ``j`` takes the bucket's positions ``j, j+8, ...``; an element of the other
    group adds +0.0, which leaves a lane that starts at +0.0 unchanged.  Full rows of 8
    go through the lane vectors of ``lane_rows_by_sign``; the last ``< 8`` elements are
    the last terms of lanes ``0 .. r-1``.
    """
    xs = x[a:b]
    rows = xs.size // LANES
    p0, p1, p2, p3, p4, p5, p6, p7, q0, q1, q2, q3, q4, q5, q6, q7 = lane_rows_by_sign(xs, rows)
    tail = xs[LANES * rows :]
    r = tail.size
    if r > 0:
        s, t = _split(np.float64(tail[0]))
        p0 += s
        q0 += t
    if r > 1:
        s, t = _split(np.float64(tail[1]))
        p1 += s
        q1 += t
    if r > 2:
        s, t = _split(np.float64(tail[2]))
        p2 += s
        q2 += t
    if r > 3:
        s, t = _split(np.float64(tail[3]))
        p3 += s
        q3 += t
    if r > 4:
        s, t = _split(np.float64(tail[4]))
        p4 += s
        q4 += t
    if r > 5:
        s, t = _split(np.float64(tail[5]))
        p5 += s
        q5 += t
    if r > 6:
        s, t = _split(np.float64(tail[6]))
        p6 += s
        q6 += t
    negatives = 0
    for t in range(xs.size):
        negatives += xs[t] < 0
    count0 = xs.size - negatives
    sum0 = combine_lanes(p0, p1, p2, p3, p4, p5, p6, p7)
    sum1 = combine_lanes(q0, q1, q2, q3, q4, q5, q6, q7)
    out_means[2 * bk] = as_dtype(sum0 / count0 if count0 > 0 else 0.0, out_means)
    out_means[2 * bk + 1] = as_dtype(sum1 / negatives if negatives > 0 else 0.0, out_means)


@njit(cache=True, nogil=True)
def _sign_bits(x, a, b, lanes, offset):
    xs = x[a:b]
    fs = lanes[a - offset : b - offset]
    for t in range(xs.size):
        fs[t] = np.uint8(xs[t] < 0)


@njit(cache=True, nogil=True)
def _pack_task(scratch, a, b, out_packed):
    full = (b - a) // 8
    pack_groups(scratch, full, 1, out_packed, a // 8)
    if (b - a) % 8:
        scratch[0] = scratch[full]
        pack_tail(scratch, (b - a) % 8, 1, out_packed, a // 8 + full)


@njit(cache=True, nogil=True)
def _fused_task(x, a, b, bucket, out_packed, out_means):
    """Means and sign bits of the whole buckets ``[a, b)``, each read once from memory."""
    scratch = np.zeros((b - a + 7) // 8, dtype=np.uint64)
    lanes = scratch.view(np.uint8)
    for bk in range(a // bucket, (b + bucket - 1) // bucket):
        s = bk * bucket
        e = min(b, s + bucket)
        _bucket_means(x, s, e, out_means, bk)
        _sign_bits(x, s, e, lanes, a)
    _pack_task(scratch, a, b, out_packed)


@njit(cache=True, nogil=True)
def _bits_task(x, a, b, out_packed):
    scratch = np.zeros((b - a + 7) // 8, dtype=np.uint64)
    _sign_bits(x, a, b, scratch.view(np.uint8), a)
    _pack_task(scratch, a, b, out_packed)


@njit(cache=True, nogil=True, parallel=True)
def onebit_encode(x, bucket, out_packed, out_means):
    """Sign bits of ``x`` (1 = negative) and per bucket the means of both groups."""
    n = x.size
    group = bucket * 8 // math.gcd(bucket, 8)
    if group <= CHUNK:
        task = group * (CHUNK // group)
        for c in prange(n_chunks(n, task)):
            _fused_task(x, c * task, min(n, (c + 1) * task), bucket, out_packed, out_means)
    else:
        # Buckets larger than a task: a bucket's lane sum is sequential by definition,
        # so buckets run in parallel with each other, then the bits in parallel chunks.
        for bk in prange(n_chunks(n, bucket)):
            _bucket_means(x, bk * bucket, min(n, (bk + 1) * bucket), out_means, bk)
        for c in prange(n_chunks(n, CHUNK)):
            _bits_task(x, c * CHUNK, min(n, (c + 1) * CHUNK), out_packed)


@njit(cache=True, nogil=True)
def _feedback_task(x, residual, a, b, bucket, out_packed, out_means, compensated):
    """:func:`_fused_task` of ``c = x + residual`` on the whole buckets ``[a, b)``, then
    ``c -= decode`` there: error feedback's three passes over a task, in a buffer that
    stays in cache, streamed to ``compensated`` at the end (its old contents unread)."""
    block = np.empty(b - a, dtype=compensated.dtype)
    xs = x[a:b]
    rs = residual[a:b]
    for t in range(block.size):
        block[t] = xs[t] + rs[t]
    scratch = np.zeros((b - a + 7) // 8, dtype=np.uint64)
    lanes = scratch.view(np.uint8)
    for bk in range(a // bucket, (b + bucket - 1) // bucket):
        s = bk * bucket - a
        e = min(b, bk * bucket + bucket) - a
        _bucket_means(block, s, e, out_means, bk)
        _sign_bits(block, s, e, lanes, 0)
        positive = out_means[2 * bk]
        negative = out_means[2 * bk + 1]
        fs = lanes[s:e]
        os = block[s:e]
        for t in range(fs.size):
            os[t] = os[t] - (negative if fs[t] else positive)
    _pack_task(scratch, a, b, out_packed)
    stream_copy(block, compensated, a, b - a)
    store_fence()  # on this task's thread, before the parallel loop joins


@njit(cache=True, nogil=True, parallel=True)
def _onebit_feedback(x, residual, bucket, out_packed, out_means, compensated):
    n = x.size
    task = bucket * 8 // math.gcd(bucket, 8)
    task = task * (CHUNK // task)
    for c in prange(n_chunks(n, task)):
        _feedback_task(
            x,
            residual,
            c * task,
            min(n, (c + 1) * task),
            bucket,
            out_packed,
            out_means,
            compensated,
        )


def onebit_encode_feedback(
    x: np.ndarray,
    residual: np.ndarray,
    bucket: int,
    out_packed: np.ndarray,
    out_means: np.ndarray,
    compensated: np.ndarray,
) -> None:
    """Error feedback's encode of 1-bit SGD in one pass over memory.

    Bit for bit ``add(x, residual, compensated)``, ``onebit_encode(compensated, ...)``
    and ``onebit_decode(..., compensated, accumulate=-1)``: ``compensated`` ends as the
    new residual ``(x + residual) - decode``.  Each task's buckets are added, encoded
    and decoded while they sit in cache.  Host only (not part of the kernel contract:
    the GPU path runs the three kernels).  ``compensated`` must not overlap ``x`` or
    ``residual``.
    """
    for name, array in (("residual", residual), ("compensated", compensated)):
        if array.dtype != x.dtype or array.size != x.size:
            raise ValueError(
                f"{name} must have x's dtype and size ({x.dtype}, {x.size}), got "
                f"{array.dtype}, {array.size}"
            )
    if np.may_share_memory(compensated, x) or np.may_share_memory(compensated, residual):
        raise ValueError("compensated must not overlap x or residual; pass a separate buffer")
    bucket = int(bucket)
    if bucket * 8 // math.gcd(bucket, 8) > CHUNK:  # large buckets: no task holds a bucket
        from .elementwise import add

        add(x, residual, compensated)
        onebit_encode(compensated, bucket, out_packed, out_means)
        onebit_decode(out_packed, out_means, bucket, compensated, -1)
        return
    _onebit_feedback(x, residual, bucket, out_packed, out_means, compensated)


@njit(cache=True, nogil=True)
def _decode_buckets(lanes, means, bucket, accumulate, a, b, target, offset):
    """Decode elements ``[a, b)`` from their bits ``lanes[i - a]`` into
    ``target[i - offset]`` by ``accumulate`` (0 store, 1 add, -1 subtract)."""
    for bk in range(a // bucket, (b - 1) // bucket + 1):
        s = max(a, bk * bucket)
        e = min(b, (bk + 1) * bucket)
        positive = as_dtype(means[2 * bk], target)
        negative = as_dtype(means[2 * bk + 1], target)
        fs = lanes[s - a : e - a]
        os = target[s - offset : e - offset]
        # One loop per mode, the test outside: each loop stays branch-free.
        if accumulate == 0:
            for t in range(fs.size):
                os[t] = negative if fs[t] else positive
        elif accumulate == 1:
            for t in range(fs.size):
                os[t] = os[t] + (negative if fs[t] else positive)
        else:
            for t in range(fs.size):
                os[t] = os[t] - (negative if fs[t] else positive)


@njit(cache=True, nogil=True)
def _decode_task(packed, means, bucket, accumulate, a, b, out, stream):
    scratch = np.empty((b - a + 7) // 8, dtype=np.uint64)
    unpack_groups(packed, 1, a // 8, scratch.size, scratch)
    lanes = scratch.view(np.uint8)
    # A large plain decode goes through a buffer in cache, streamed out (see STREAM_MIN).
    if stream and accumulate == 0:
        block = np.empty(b - a, dtype=out.dtype)
        _decode_buckets(lanes, means, bucket, 0, a, b, block, a)
        stream_copy(block, out, a, b - a)
        store_fence()  # on this task's thread, before the parallel loop joins
    else:
        _decode_buckets(lanes, means, bucket, accumulate, a, b, out, 0)


@njit(cache=True, nogil=True, parallel=True)
def _onebit_decode(packed, means, bucket, accumulate, out):
    n = out.size
    stream = n >= STREAM_MIN
    for c in prange(n_chunks(n, CHUNK)):
        _decode_task(
            packed, means, bucket, accumulate, c * CHUNK, min(n, (c + 1) * CHUNK), out, stream
        )


@njit(cache=True, nogil=True)
def _decode_sum_task(packeds, meanss, bucket, a, b, out, stream):
    """Elements ``[a, b)`` of the sum: every payload added to one block in cache."""
    scratch = np.empty((b - a + 7) // 8, dtype=np.uint64)
    lanes = scratch.view(np.uint8)
    # As _qsgd_decode_sum_task: a large sum is built in cache and streamed out once.
    target = np.empty(b - a, dtype=out.dtype) if stream else out
    offset = a if stream else 0
    for p in range(len(packeds)):
        unpack_groups(packeds[p], 1, a // 8, scratch.size, scratch)
        _decode_buckets(lanes, meanss[p], bucket, 0 if p == 0 else 1, a, b, target, offset)
    if stream:
        stream_copy(target, out, a, b - a)
        store_fence()


@njit(cache=True, nogil=True, parallel=True)
def _onebit_decode_sum(packeds, meanss, bucket, out):
    n = out.size
    stream = n >= STREAM_MIN
    for c in prange(n_chunks(n, CHUNK)):
        _decode_sum_task(packeds, meanss, bucket, c * CHUNK, min(n, (c + 1) * CHUNK), out, stream)


def onebit_decode_sum(packeds: list, meanss: list, bucket: int, out: np.ndarray) -> None:
    """``out = d_0 + d_1 + ...`` of several 1-bit payloads of ``out.size`` elements each.

    Host-only fusion beyond the contract, as ``quantize.qsgd_decode_sum``: bit for bit
    ``onebit_decode`` of the first payload and ``accumulate=1`` decodes of the others in
    list order, with each block of ``out`` summed in cache and written once.
    """
    if not packeds or len(packeds) != len(meanss):
        raise ValueError(
            "expected one or more payloads and one means array per packed array, got "
            f"{len(packeds)} packed and {len(meanss)}"
        )
    _onebit_decode_sum(typed_arrays(packeds), typed_arrays(meanss), int(bucket), out)


def onebit_decode(
    packed: np.ndarray, means: np.ndarray, bucket: int, out: np.ndarray, accumulate: int = 0
) -> None:
    """``d_i = means[2b + bit_i]``, into ``out`` by ``accumulate``.

    ``accumulate`` 0 / 1 / -1: ``out = d`` / ``out += d`` / ``out -= d`` in one pass, bit
    for bit the decode into a separate buffer followed by the contract's ``add`` /
    ``subtract`` (``kernels/__init__.py``); any other value raises ValueError.
    """
    accumulate = check_accumulate(accumulate)
    _onebit_decode(packed, means, int(bucket), accumulate, out)
