"""QSGD and TernGrad: stochastic rounding with the counter-hash uniform, bit-packed.

Each parallel task owns a run of whole 8-element groups, so it packs its own bytes; with
QSGD's usual small buckets the task also owns whole buckets and computes their norms
itself, so a bucket is read from memory once and then re-read from L1 (one fused pass).

References
----------
D. Alistarh, D. Grubic, J. Li, R. Tomioka, M. Vojnovic, "QSGD: Communication-efficient
SGD via gradient quantization and encoding", NeurIPS 2017.
W. Wen, C. Xu, F. Yan, C. Wu, Y. Wang, Y. Chen, H. Li, "TernGrad: Ternary gradients to
reduce communication in distributed deep learning", NeurIPS 2017.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._common import (
    CHUNK,
    abs_bits,
    abs_mask,
    as_dtype,
    check_accumulate,
    lane_sum_squares,
    n_chunks,
    typed_arrays,
)
from ._random import (
    GOLDEN32,
    as_stream,
    hash24_golden,
    high_word,
    low_word,
    stream_halves,
    word_end,
)
from ._stores import STREAM_MIN, store_fence, stream_copy
from ._vector import wide_vectors
from .packing import pack_groups, pack_tail, unpack_groups
from .reduce import max_abs, max_bits

_TWO24 = 2.0**24  # u(stream, i) * 2**24 is the hash's top 24 bits, an integer


@njit(cache=True, nogil=True)
def _qsgd_fields(x, a, b, inv, levels, k1, k2, lanes, offset):
    """QSGD fields ``(level << 1) | sign`` of ``x[a:b]`` into ``lanes[i - offset]``.

    Loops run over slices indexed from 0 (see ``lane_sum_squares``) and over runs of
    indices sharing their high 32 bits, so the body is branch-free and vectorises.
    """
    wide_vectors()  # the hash's multiplies at 16 lanes (see _vector.py)
    levels_f = as_dtype(levels, x)
    one = as_dtype(1, x)
    zero = as_dtype(0, x)
    scale24 = as_dtype(_TWO24, x)
    i0 = a
    while i0 < b:
        i1 = word_end(i0, b)
        key_lo = high_word(k1, i0)
        golden = np.uint32(low_word(i0) * GOLDEN32)
        xs = x[i0:i1]
        fs = lanes[i0 - offset : i1 - offset]
        for t in range(xs.size):
            v = xs[t]
            scaled = abs(v) * inv
            low = np.floor(scaled)
            # u < frac  <=>  (u * 2**24) < frac * 2**24: both sides scale exactly.
            draw = as_dtype(hash24_golden(golden, key_lo, k2), x)
            level = low + (one if draw < (scaled - low) * scale24 else zero)
            # NaN fails `<=` and is clamped as well, so the field is always defined.
            level = level if level <= levels_f else levels_f
            fs[t] = np.uint8((np.uint8(level) << np.uint8(1)) | np.uint8(v < 0))
            golden = np.uint32(golden + GOLDEN32)
        i0 = i1


@njit(cache=True, nogil=True)
def _inverse_step(scale, levels, x):
    """``levels / scale`` in x.dtype, 0 for a zero scale."""
    return as_dtype(levels, x) / scale if scale != 0 else as_dtype(0, x)


@njit(cache=True, nogil=True)
def _bucket_scale(x, a, b, norm, out_scales, bk):
    """Write bucket ``bk``'s scale (``x[a:b]``) to ``out_scales`` and return it."""
    if norm == 0:
        out_scales[bk] = as_dtype(math.sqrt(lane_sum_squares(x, a, b)), x)
    else:
        out_bits = abs_bits(out_scales)
        out_bits[bk] = max_bits(abs_bits(x), abs_mask(x), a, b)
    return out_scales[bk]


@njit(cache=True, nogil=True)
def _pack_task(scratch, a, b, bits, out_packed):
    """Pack the fields of elements ``[a, b)`` (``a`` a multiple of 8) from ``scratch``."""
    full = (b - a) // 8
    pack_groups(scratch, full, bits, out_packed, a // 8)
    if (b - a) % 8:
        scratch[0] = scratch[full]
        pack_tail(scratch, (b - a) % 8, bits, out_packed, a // 8 + full)


@njit(cache=True, nogil=True)
def _qsgd_fused_task(x, a, b, levels, bits, bucket, norm, k1, k2, out_scales, out_packed):
    """Norms, fields and packing of whole buckets ``[a, b)`` while they sit in cache."""
    scratch = np.zeros((b - a + 7) // 8, dtype=np.uint64)
    lanes = scratch.view(np.uint8)
    for bk in range(a // bucket, (b + bucket - 1) // bucket):
        s = bk * bucket
        e = min(b, s + bucket)
        scale = _bucket_scale(x, s, e, norm, out_scales, bk)
        _qsgd_fields(x, s, e, _inverse_step(scale, levels, x), levels, k1, k2, lanes, a)
    _pack_task(scratch, a, b, bits, out_packed)


@njit(cache=True, nogil=True)
def _qsgd_task(x, a, b, levels, bits, bucket, k1, k2, scales, out_packed):
    """Fields and packing of ``[a, b)`` given every bucket's scale (large buckets)."""
    scratch = np.zeros((b - a + 7) // 8, dtype=np.uint64)
    lanes = scratch.view(np.uint8)
    for bk in range(a // bucket, (b - 1) // bucket + 1):
        s = max(a, bk * bucket)
        e = min(b, (bk + 1) * bucket)
        inv = _inverse_step(scales[bk], levels, x)
        _qsgd_fields(x, s, e, inv, levels, k1, k2, lanes, a)
    _pack_task(scratch, a, b, bits, out_packed)


@njit(cache=True, nogil=True, parallel=True)
def _l2_scales(x, bucket, out_scales):
    n = x.size
    for bk in prange(n_chunks(n, bucket)):
        s = bk * bucket
        out_scales[bk] = as_dtype(math.sqrt(lane_sum_squares(x, s, min(n, s + bucket))), x)


@njit(cache=True, nogil=True, parallel=True)
def _qsgd_encode(x, levels, bits, bucket, norm, stream, out_scales, out_packed):
    n = x.size
    k1, k2 = stream_halves(stream)
    group = bucket * 8 // math.gcd(bucket, 8)  # whole buckets and whole 8-element groups
    if group <= CHUNK:
        task = group * (CHUNK // group)
        for c in prange(n_chunks(n, task)):
            _qsgd_fused_task(
                x,
                c * task,
                min(n, (c + 1) * task),
                levels,
                bits,
                bucket,
                norm,
                k1,
                k2,
                out_scales,
                out_packed,
            )
    else:
        # A bucket larger than a task: norms first (the L2 lane sum of one bucket is
        # sequential by definition), then quantise in parallel.
        if norm == 0:
            _l2_scales(x, bucket, out_scales)
        else:
            max_abs(x, bucket, out_scales)
        for c in prange(n_chunks(n, CHUNK)):
            _qsgd_task(
                x,
                c * CHUNK,
                min(n, (c + 1) * CHUNK),
                levels,
                bits,
                bucket,
                k1,
                k2,
                out_scales,
                out_packed,
            )


def qsgd_encode(
    x: np.ndarray,
    levels: int,
    bits: int,
    bucket: int,
    norm: int,
    stream: int,
    out_scales: np.ndarray,
    out_packed: np.ndarray,
) -> None:
    """QSGD stochastic rounding of ``|x| / scale`` to ``levels`` levels, sign + level packed.

    See the contract in ``kernels/__init__.py``; ``norm`` 0 = L2, 1 = max.
    """
    _qsgd_encode(
        x, int(levels), int(bits), int(bucket), int(norm), as_stream(stream), out_scales, out_packed
    )


@njit(cache=True, nogil=True)
def _qsgd_value(f, step, out):
    """``±(level * step)`` of one field in out.dtype: the decoded ``d_i`` of the contract."""
    magnitude = as_dtype(f >> np.uint8(1), out) * step
    return -magnitude if f & np.uint8(1) else magnitude


@njit(cache=True, nogil=True)
def _qsgd_decode_buckets(lanes, scales, levels, bucket, accumulate, a, b, target, offset):
    """Decode elements ``[a, b)`` from their fields ``lanes[i - a]`` into
    ``target[i - offset]`` by ``accumulate`` (0 store, 1 add, -1 subtract)."""
    for bk in range(a // bucket, (b - 1) // bucket + 1):
        s = max(a, bk * bucket)
        e = min(b, (bk + 1) * bucket)
        step = as_dtype(scales[bk], target) / as_dtype(levels, target)
        fs = lanes[s - a : e - a]
        os = target[s - offset : e - offset]
        # One loop per mode, the test outside: each loop stays branch-free and vectorises.
        if accumulate == 0:
            for t in range(fs.size):
                os[t] = _qsgd_value(fs[t], step, target)
        elif accumulate == 1:
            for t in range(fs.size):
                os[t] = os[t] + _qsgd_value(fs[t], step, target)
        else:
            for t in range(fs.size):
                os[t] = os[t] - _qsgd_value(fs[t], step, target)


@njit(cache=True, nogil=True)
def _qsgd_decode_task(packed, scales, levels, bits, bucket, accumulate, a, b, out, stream):
    scratch = np.empty((b - a + 7) // 8, dtype=np.uint64)
    unpack_groups(packed, bits, a // 8, scratch.size, scratch)
    lanes = scratch.view(np.uint8)
    # A large plain decode goes through a buffer in cache, streamed out (see STREAM_MIN).
    if stream and accumulate == 0:
        block = np.empty(b - a, dtype=out.dtype)
        _qsgd_decode_buckets(lanes, scales, levels, bucket, 0, a, b, block, a)
        stream_copy(block, out, a, b - a)
        store_fence()  # on this task's thread, before the parallel loop joins
    else:
        _qsgd_decode_buckets(lanes, scales, levels, bucket, accumulate, a, b, out, 0)


@njit(cache=True, nogil=True, parallel=True)
def _qsgd_decode(packed, scales, levels, bits, bucket, accumulate, out):
    n = out.size
    stream = n >= STREAM_MIN
    for c in prange(n_chunks(n, CHUNK)):
        _qsgd_decode_task(
            packed,
            scales,
            levels,
            bits,
            bucket,
            accumulate,
            c * CHUNK,
            min(n, (c + 1) * CHUNK),
            out,
            stream,
        )


def qsgd_decode(
    packed: np.ndarray,
    scales: np.ndarray,
    levels: int,
    bits: int,
    bucket: int,
    out: np.ndarray,
    accumulate: int = 0,
) -> None:
    """``d_i = ±(level_i * (scale_b / levels))`` from packed QSGD fields, into ``out``.

    ``accumulate`` 0 stores ``d`` (``out = d``), 1 adds it (``out += d``), -1 subtracts
    it (``out -= d``), fused into the one decoding pass: bit for bit decoding into a
    separate buffer and then the contract's ``add`` / ``subtract`` (``kernels/__init__``).
    Any other ``accumulate`` raises ValueError.
    """
    accumulate = check_accumulate(accumulate)
    _qsgd_decode(packed, scales, int(levels), int(bits), int(bucket), accumulate, out)


@njit(cache=True, nogil=True)
def _qsgd_decode_sum_task(packeds, scaless, levels, bits, bucket, a, b, out, stream):
    """Elements ``[a, b)`` of the sum: every payload added to one block in cache."""
    scratch = np.empty((b - a + 7) // 8, dtype=np.uint64)
    lanes = scratch.view(np.uint8)
    # The block is the task's share of `out` for a small one; a large one is summed in a
    # buffer in cache and streamed out once (see STREAM_MIN).
    target = np.empty(b - a, dtype=out.dtype) if stream else out
    offset = a if stream else 0
    for p in range(len(packeds)):
        unpack_groups(packeds[p], bits, a // 8, scratch.size, scratch)
        accumulate = 0 if p == 0 else 1
        _qsgd_decode_buckets(lanes, scaless[p], levels, bucket, accumulate, a, b, target, offset)
    if stream:
        stream_copy(target, out, a, b - a)
        store_fence()


@njit(cache=True, nogil=True, parallel=True)
def _qsgd_decode_sum(packeds, scaless, levels, bits, bucket, out):
    n = out.size
    stream = n >= STREAM_MIN
    for c in prange(n_chunks(n, CHUNK)):
        _qsgd_decode_sum_task(
            packeds, scaless, levels, bits, bucket, c * CHUNK, min(n, (c + 1) * CHUNK), out, stream
        )


def qsgd_decode_sum(
    packeds: list, scaless: list, levels: int, bits: int, bucket: int, out: np.ndarray
) -> None:
    """``out = d_0 + d_1 + ...`` of several QSGD payloads of ``out.size`` elements each.

    Host-only fusion beyond the contract: bit for bit ``qsgd_decode`` of the first
    payload followed by ``qsgd_decode(..., accumulate=1)`` of each of the others, in list
    order, but each block of ``out`` takes every payload's terms while it sits in cache
    and is written to memory once.  ``packeds`` and ``scaless`` are equally long
    sequences (one or more payloads); the caller checks the arrays' lengths.
    """
    if not packeds or len(packeds) != len(scaless):
        raise ValueError(
            "expected one or more payloads and one scales array per packed array, got "
            f"{len(packeds)} packed and {len(scaless)}"
        )
    _qsgd_decode_sum(
        typed_arrays(packeds), typed_arrays(scaless), int(levels), int(bits), int(bucket), out
    )


@njit(cache=True, nogil=True)
def _terngrad_fields(x, a, b, scale, clip, k1, k2, lanes, offset):
    """TernGrad codes of ``x[a:b]`` (bucket scale ``scale``) into ``lanes[i - offset]``."""
    wide_vectors()
    if scale == 0:
        fs = lanes[a - offset : b - offset]
        for t in range(fs.size):
            fs[t] = 0
        return
    scale24 = as_dtype(_TWO24, x)
    i0 = a
    while i0 < b:
        i1 = word_end(i0, b)
        key_lo = high_word(k1, i0)
        golden = np.uint32(low_word(i0) * GOLDEN32)
        xs = x[i0:i1]
        fs = lanes[i0 - offset : i1 - offset]
        for t in range(xs.size):
            v = xs[t]
            magnitude = abs(v)
            # `>` keeps NaN as NaN (np.minimum's rule); the draw then fails for NaN.
            clipped = clip if magnitude > clip else magnitude
            p = clipped / scale
            draw = as_dtype(hash24_golden(golden, key_lo, k2), x)  # u * 2**24, exact
            code = np.uint8(1) if v > 0 else np.uint8(2)
            fs[t] = code if (draw < p * scale24 and v != 0) else np.uint8(0)
            golden = np.uint32(golden + GOLDEN32)
        i0 = i1


@njit(cache=True, nogil=True)
def _terngrad_task(x, scales, bucket, clip, k1, k2, a, b, out_packed):
    scratch = np.zeros((b - a + 7) // 8, dtype=np.uint64)
    lanes = scratch.view(np.uint8)
    for bk in range(a // bucket, (b - 1) // bucket + 1):
        s = max(a, bk * bucket)
        e = min(b, (bk + 1) * bucket)
        _terngrad_fields(x, s, e, as_dtype(scales[bk], x), clip, k1, k2, lanes, a)
    _pack_task(scratch, a, b, 2, out_packed)


@njit(cache=True, nogil=True, parallel=True)
def _terngrad_encode(x, scales, bucket, clip, stream, out_packed):
    n = x.size
    k1, k2 = stream_halves(stream)
    clip_x = as_dtype(clip, x)
    for c in prange(n_chunks(n, CHUNK)):
        _terngrad_task(
            x, scales, bucket, clip_x, k1, k2, c * CHUNK, min(n, (c + 1) * CHUNK), out_packed
        )


def terngrad_encode(
    x: np.ndarray,
    scales: np.ndarray,
    bucket: int,
    clip: float,
    stream: int,
    out_packed: np.ndarray,
) -> None:
    """TernGrad codes (0, 1 = +s, 2 = -s) drawn with probability ``min(|x|, clip) / s``."""
    _terngrad_encode(x, scales, int(bucket), float(clip), as_stream(stream), out_packed)


@njit(cache=True, nogil=True)
def _terngrad_value(code, scale, zero):
    return scale if code == 1 else (-scale if code == 2 else zero)


@njit(cache=True, nogil=True)
def _terngrad_decode_task(packed, scales, bucket, accumulate, a, b, out):
    scratch = np.empty((b - a + 7) // 8, dtype=np.uint64)
    unpack_groups(packed, 2, a // 8, scratch.size, scratch)
    lanes = scratch.view(np.uint8)
    zero = as_dtype(0, out)
    for bk in range(a // bucket, (b - 1) // bucket + 1):
        s = max(a, bk * bucket)
        e = min(b, (bk + 1) * bucket)
        scale = as_dtype(scales[bk], out)
        fs = lanes[s - a : e - a]
        os = out[s:e]
        # A code-0 entry adds +0.0 (or subtracts it), as add/subtract with d_i = +0.0
        # would: -0.0 + 0.0 is +0.0, so the sum is not skipped for zero codes.
        if accumulate == 0:
            for t in range(fs.size):
                os[t] = _terngrad_value(fs[t], scale, zero)
        elif accumulate == 1:
            for t in range(fs.size):
                os[t] = os[t] + _terngrad_value(fs[t], scale, zero)
        else:
            for t in range(fs.size):
                os[t] = os[t] - _terngrad_value(fs[t], scale, zero)


@njit(cache=True, nogil=True, parallel=True)
def _terngrad_decode(packed, scales, bucket, accumulate, out):
    n = out.size
    for c in prange(n_chunks(n, CHUNK)):
        _terngrad_decode_task(
            packed, scales, bucket, accumulate, c * CHUNK, min(n, (c + 1) * CHUNK), out
        )


def terngrad_decode(
    packed: np.ndarray, scales: np.ndarray, bucket: int, out: np.ndarray, accumulate: int = 0
) -> None:
    """``d_i``: code 1 -> ``+s_b``, 2 -> ``-s_b``, 0 and 3 -> 0, into ``out``.

    ``accumulate`` 0 / 1 / -1: ``out = d`` / ``out += d`` / ``out -= d`` in one pass, as
    :func:`qsgd_decode`; any other value raises ValueError.
    """
    accumulate = check_accumulate(accumulate)
    _terngrad_decode(packed, scales, int(bucket), accumulate, out)
